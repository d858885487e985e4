"""Gemma 4's preprocessing limits, defined once (transformers 5.23, processing_gemma4.py).

Gemma4Processor: one audio soft token per 40 ms (two stride-2 convolutions over 10 ms
mel frames), at most 750 per clip (30 s); 280 soft tokens per image by default, and the
image processor takes budgets of 70, 140, 280, 560 or 1120 (image_processing_gemma4.py).
"""

from __future__ import annotations

AUDIO_MS_PER_TOKEN = 40
AUDIO_MAX_TOKENS = 750
MEL_BINS = 128  # Gemma4AudioFeatureExtractor feature_size
MEL_FRAMES_PER_TOKEN = 4  # 10 ms hops, 40 ms per token
IMAGE_SOFT_TOKENS = 280
VISION_TOKEN_BUDGETS: tuple[int, ...] = (70, 140, 280, 560, 1120)
