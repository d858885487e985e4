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

    @property
    def position(self) -> int:
        """How many tokens the cache holds."""

    def forward(self, input_ids: np.ndarray, *, image_features: np.ndarray | None = None,
                audio_features: np.ndarray | None = None) -> np.ndarray:
        """Feed `input_ids` [S] (image/audio soft-token positions carry their placeholder ids and
        take the next rows of the features, in order). Returns logits [S, V] float32."""

    def encode_image(self, pixel_values: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """Preprocessed image -> soft tokens [n, hidden] (padding rows removed)."""

    def encode_audio(self, features: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Log-mel features [T, mels] + mask [T] -> soft tokens [n, hidden] (padding removed)."""

    def truncate(self, length: int) -> None:
        """Keep only the first `length` cached tokens (a chat turn re-rendered the rest)."""

    def reset(self) -> None:
        """Forget every token (start a new conversation)."""
