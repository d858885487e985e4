"""Image -> patches for the Gemma 4 vision tower, in numpy + Pillow (no torch, no transformers).

A port of transformers' Gemma4ImageProcessorPil (transformers/models/gemma4/
image_processing_pil_gemma4.py, v5.23, the backend used without torchvision), making the
same Pillow calls so pixels match exactly:

    path  -> Image.open, exif_transpose, convert("RGB")      (image_utils.load_image)
    PIL   -> RGB, transparency composited onto white         (image_transforms.convert_to_rgb)
          -> resize to the largest (h, w), both multiples of patch * pooling, with
             h * w <= max_soft_tokens * pooling^2 patches     (get_aspect_ratio_preserving_size)
             by Image.resize((w, h), BICUBIC)                 (image_transforms.resize)
          -> float64 * 1/255 -> float32                       (image_transforms.rescale)
          -> patches in row-major order, each (row, col, channel) flattened
          -> zero patches up to max_patches, their position ids (-1, -1)

Soft tokens per image = patches / pooling^2: at most 70, 140, 280, 560 or 1120.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from edgekit.errors import InputError
from edgekit.models.gemma4 import limits

# Gemma4ImageProcessorPil accepts only these soft-token budgets (_SUPPORTED_SOFT_TOKENS).
SUPPORTED_SOFT_TOKENS = limits.VISION_TOKEN_BUDGETS

# PILImageResampling values (= PIL.Image.Resampling); a manifest may name them instead.
_RESAMPLE_BY_NAME = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImageParams:
    """Gemma4ImageProcessorPil's settings (class defaults); field names are its config keys."""

    patch_size: int = 16
    pooling_kernel_size: int = 3
    max_soft_tokens: int = 280
    resample: int = 3  # PILImageResampling.BICUBIC; a name ("bicubic") is accepted too
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = False  # Gemma 4 was trained on pixels in [0, 1]
    image_mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    image_std: tuple[float, ...] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        if isinstance(self.resample, str):
            if self.resample.lower() not in _RESAMPLE_BY_NAME:
                raise InputError(f"unknown image resample filter {self.resample!r}; "
                                 f"expected one of {', '.join(_RESAMPLE_BY_NAME)}")
            object.__setattr__(self, "resample", _RESAMPLE_BY_NAME[self.resample.lower()])
        object.__setattr__(self, "image_mean", _per_channel(self.image_mean, "image_mean"))
        object.__setattr__(self, "image_std", _per_channel(self.image_std, "image_std"))
        if self.max_soft_tokens not in SUPPORTED_SOFT_TOKENS:
            raise InputError(f"image max_soft_tokens must be one of {', '.join(map(str, SUPPORTED_SOFT_TOKENS))}; "
                             f"got {self.max_soft_tokens}")
        if self.patch_size < 1 or self.pooling_kernel_size < 1:
            raise InputError(f"invalid image settings: patch_size={self.patch_size}, "
                             f"pooling_kernel_size={self.pooling_kernel_size}")

    @property
    def max_patches(self) -> int:
        return self.max_soft_tokens * self.pooling_kernel_size**2

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ImageParams:
        """From processor_config.json's "image_processor" section, preprocessor_config.json or a
        manifest's image settings; unknown keys (image_seq_length, size, ...) are ignored."""
        for flag in ("do_resize", "do_convert_rgb"):
            if d.get(flag) is False:  # the vision tower needs both; the reference would fail or differ
                raise InputError(f"image processor config sets {flag}=false, which Gemma 4 does not support")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})


def _per_channel(values: Any, name: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in np.atleast_1d(np.asarray(values, dtype=np.float64)))
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise InputError(f"image {name} needs 1 or 3 values; got {len(values)}")
    return values


# --- sizing (get_aspect_ratio_preserving_size) --------------------------------------------


def target_size(height: int, width: int, *, params: ImageParams) -> tuple[int, int]:
    """The (height, width) an image is resized to: largest multiples of patch * pooling
    that keep the aspect ratio and fit max_patches."""
    p, k = params.patch_size, params.pooling_kernel_size
    target_px = params.max_patches * p**2
    factor = math.sqrt(target_px / (height * width))
    side_mult = k * p
    target_h = int(math.floor(factor * height / side_mult)) * side_mult
    target_w = int(math.floor(factor * width / side_mult)) * side_mult
    if target_h == 0 and target_w == 0:
        raise InputError(f"cannot fit a {width}x{height} image into {params.max_soft_tokens} soft tokens")
    # A very thin image keeps one block on its short side and grows the long one, capped.
    max_side = (params.max_patches // k**2) * side_mult
    if target_h == 0:
        target_h = side_mult
        target_w = min(int(math.floor(width / height)) * side_mult, max_side)
    elif target_w == 0:
        target_w = side_mult
        target_h = min(int(math.floor(height / width)) * side_mult, max_side)
    if target_h * target_w > target_px:
        raise InputError(f"a {width}x{height} image resized to {target_w}x{target_h} exceeds "
                         f"{params.max_patches} patches of {p} px")
    return target_h, target_w


def num_soft_tokens(height: int, width: int, *, params: ImageParams) -> int:
    """Soft tokens for an image of this size (Gemma4Processor._get_num_multimodal_tokens)."""
    h, w = target_size(height, width, params=params)
    return (h // params.patch_size) * (w // params.patch_size) // params.pooling_kernel_size**2


# --- decoding -----------------------------------------------------------------------------


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Decode an image file as transformers' load_image does: EXIF rotation, then RGB.

    Note convert("RGB") drops transparency here (no white background), as the reference
    does for paths; pass an already-open PIL image to get compositing onto white.
    """
    try:
        with Image.open(path) as im:
            im.load()
            return ImageOps.exif_transpose(im).convert("RGB")
    except FileNotFoundError:
        raise InputError(f"cannot decode image {os.fspath(path)}: file not found") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise InputError(f"cannot decode image {os.fspath(path)}: {reason}") from None


def to_rgb(image: Image.Image) -> np.ndarray:
    """[H, W, 3] uint8; transparency (alpha band or palette transparency) over white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.array(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.array(image.convert("RGB"))


# --- patches ------------------------------------------------------------------------------


def pixel_value_table(params: ImageParams) -> np.ndarray:
    """[3, 256] float32: the value each uint8 level of each RGB channel becomes (rescale, then
    normalize). The math is per value, so looking levels up equals computing them; the .pte's
    vision_encoder carries this table to take uint8 images (export/executorch/methods.py)."""
    levels = np.arange(256, dtype=np.float64)
    if params.do_rescale:
        levels = levels * params.rescale_factor  # upcast first, as image_transforms.rescale
    table = np.repeat(levels.astype(np.float32)[None], 3, axis=0)
    if params.do_normalize:
        table = ((table - np.array(params.image_mean, np.float32)[:, None])
                 / np.array(params.image_std, np.float32)[:, None])
    return table.astype(np.float32)


def resized_rgb(image: Image.Image | str | os.PathLike[str], *, params: ImageParams) -> np.ndarray:
    """[h, w, 3] uint8: the image decoded, made RGB and resized to target_size, as the processor
    does before rescaling; what the .pte's vision_encoder (and ExecuTorch's stock runner) take."""
    if not isinstance(image, Image.Image):
        image = load_image(image)
    try:
        rgb = to_rgb(image)
    except (OSError, ValueError) as exc:  # a lazily-opened PIL image may fail only now
        raise InputError(f"cannot decode image {getattr(image, 'filename', '') or '<PIL image>'}: "
                         f"{' '.join(str(exc).split())}") from None
    height, width = rgb.shape[:2]
    if height == 0 or width == 0:
        raise InputError(f"image is empty ({width}x{height} pixels)")
    target_h, target_w = target_size(height, width, params=params)
    if (target_h, target_w) != (height, width):
        # image_transforms.resize: uint8 array -> PIL -> resize((w, h), resample) -> array.
        rgb = np.array(Image.fromarray(rgb).resize((target_w, target_h), resample=params.resample))
    return rgb


def image_from_patches(pixel_values: np.ndarray, position_ids: np.ndarray, *, params: ImageParams) -> np.ndarray:
    """preprocess_image's patches -> the [3, h, w] uint8 image they were cut from (channels
    first, as ExecuTorch's stock runner passes images). Lossless: each pixel value is an
    entry of pixel_value_table, so its level is found again; padding rows (-1) are dropped."""
    p = params.patch_size
    positions = np.asarray(position_ids).reshape(-1, 2)
    real = (positions >= 0).all(axis=-1)
    positions, patches = positions[real], np.asarray(pixel_values, np.float32).reshape(-1, 3 * p * p)[real]
    if len(patches) == 0:
        raise InputError("the image has no patches")
    cols, rows = int(positions[:, 0].max()) + 1, int(positions[:, 1].max()) + 1
    image = np.zeros((rows * p, cols * p, 3), np.float32)
    for (col, row), patch in zip(positions, patches):
        image[row * p:(row + 1) * p, col * p:(col + 1) * p] = patch.reshape(p, p, 3)
    table = pixel_value_table(params)
    # Each channel's table rises with the level (a positive scale and std): the exact entry's index.
    levels = np.stack([np.searchsorted(table[c], image[..., c]).clip(0, 255) for c in range(3)])
    return levels.astype(np.uint8)


def preprocess_image(image: Image.Image | str | os.PathLike[str], *,
                     params: ImageParams) -> tuple[np.ndarray, np.ndarray, int]:
    """Gemma4ImageProcessorPil()(image) for one image.

    Returns (pixel_values [1, max_patches, 3 * patch^2] float32,
    position_ids [1, max_patches, 2] int64 as (column, row), -1 for padding,
    num_soft_tokens).
    """
    rgb = resized_rgb(image, params=params)
    target_h, target_w = rgb.shape[:2]
    pixels = pixel_value_table(params)[np.arange(3), rgb]  # [H, W, 3]: channel c's table at each level

    # convert_image_to_patches: [H, W, C] -> [rows, cols, p, p, C] -> [rows * cols, p * p * C].
    p = params.patch_size
    rows, cols = target_h // p, target_w // p
    patches = pixels.reshape(rows, p, cols, p, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, p * p * 3)
    cols_ids, rows_ids = np.meshgrid(np.arange(cols), np.arange(rows), indexing="xy")
    positions = np.stack([cols_ids, rows_ids], axis=-1).reshape(rows * cols, 2).astype(np.int64)

    pixel_values = np.zeros((1, params.max_patches, p * p * 3), np.float32)
    position_ids = np.full((1, params.max_patches, 2), -1, np.int64)
    pixel_values[0, : rows * cols] = patches
    position_ids[0, : rows * cols] = positions
    return pixel_values, position_ids, rows * cols // params.pooling_kernel_size**2


__all__ = ["ImageParams", "SUPPORTED_SOFT_TOKENS", "load_image", "num_soft_tokens", "pixel_value_table",
           "image_from_patches", "preprocess_image", "resized_rgb", "target_size", "to_rgb"]
