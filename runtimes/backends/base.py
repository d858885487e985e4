"""The one small interface every device backend implements.

A backend owns the model's state (the KV cache): `forward` feeds a chunk of tokens and
advances it, `reset` clears it. ONNX keeps past/present tensors on the host, ExecuTorch
and Core ML keep the cache inside the program; the engine cannot tell the difference.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from edgekit.manifest import Manifest


class Backend(Protocol):
    manifest: Manifest
    max_prefill_tokens: int | None  # most tokens one forward takes (None: no limit)

    @property
    def position(self) -> int:
        """How many tokens the cache holds."""

    def forward(self, input_ids: np.ndarray, *, image_features: np.ndarray | None = None,
                audio_features: np.ndarray | None = None) -> np.ndarray:
        """Feed `input_ids` [S] (image/audio soft-token positions carry their placeholder ids and
        take the next rows of the features, in order). Returns logits [n, V] float32 for the
        last n >= 1 positions (the last only; an ONNX bundle without logits_to_keep returns all S)."""

    def encode_image(self, pixel_values: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """Preprocessed image -> soft-token rows [n, >= hidden] (padding removed) that this
        backend's forward takes; the first `hidden` columns are the soft tokens."""

    def encode_audio(self, features: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Log-mel features [T, mels] + mask [T] -> soft-token rows, as encode_image."""

    def truncate(self, length: int) -> bool:
        """Keep only the first `length` cached tokens (a chat turn re-rendered the rest);
        False when the backend cannot, and the caller must reset and start over."""

    def mark_turn_start(self, position: int | None) -> None:
        """The answer being generated starts at `position` (None: no turn is open). The next
        chat turn re-renders that answer, so its `truncate` goes back to about there; a
        backend that drops old cache rows keeps what such a truncate needs."""

    def reset(self) -> None:
        """Forget every token (start a new conversation)."""


def pad_audio_frames(features: np.ndarray, mask: np.ndarray, *, extra: dict) -> tuple[np.ndarray, np.ndarray]:
    """Features [T, mels] + mask [T] -> [1, T', mels] + [1, T'] with T' what the exported
    audio encoder takes: a multiple of `frame_multiple`, at least `min_frames` (both
    recorded in the method's manifest entry by the exporter). Padded frames are masked out."""
    multiple = int(extra.get("frame_multiple", 4))
    frames = max(int(extra.get("min_frames", 0)), -(-len(features) // multiple) * multiple)
    padded = np.zeros((1, frames, features.shape[-1]), np.float32)
    padded[0, : len(features)] = features
    padded_mask = np.zeros((1, frames), bool)
    padded_mask[0, : len(mask)] = mask
    return padded, padded_mask
