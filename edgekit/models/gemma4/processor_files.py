"""processor_config.json for random-weight checkpoints, and the reference processor.

transformers 5 saves a processor as ONE processor_config.json (ProcessorMixin.save_pretrained
-> to_json_file, transformers/processing_utils.py): the sub-processors nested under their
attribute names, the processor's own __init__ arguments at the top level, and
"processor_class". The tokenizer and chat template are separate files
(edgekit.testing.tokenizer_builder). For Gemma 4 (google/gemma-4-e2b-it):

    processor_config.json
      audio_ms_per_token, audio_seq_length, image_seq_length   Gemma4Processor.__init__
      feature_extractor   Gemma4AudioFeatureExtractor (16 kHz, 128 mel bins, 20 ms / 10 ms)
      image_processor     Gemma4ImageProcessor (patch 16, pooling 3, 280 soft tokens)
      video_processor     Gemma4VideoProcessor (32 frames, 70 soft tokens per frame)
      processor_class     "Gemma4Processor"

Values are transformers 5.23's defaults for those classes (what `save_pretrained` writes
for a default-constructed one), patch and pooling sizes taken from the checkpoint's
vision_config; tests/test_tokenizer_files.py checks that transformers loads each part
back with exactly these values. No preprocessor_config.json is written: transformers 5
reads the nested sections of processor_config.json (image_processing_base /
feature_extraction_utils `get_*_dict`).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from edgekit.models.gemma4 import limits

PROCESSOR_CONFIG = "processor_config.json"

IMAGE_SEQ_LENGTH = limits.IMAGE_SOFT_TOKENS
AUDIO_SEQ_LENGTH = limits.AUDIO_MAX_TOKENS
AUDIO_MS_PER_TOKEN = limits.AUDIO_MS_PER_TOKEN
_RESCALE = 1 / 255
_BICUBIC = 3  # PILImageResampling.BICUBIC


def _feature_extractor() -> dict[str, Any]:
    # Gemma4AudioFeatureExtractor() defaults; frame/hop/fft lengths are derived from
    # frame_length_ms=20, hop_length_ms=10 at 16 kHz and saved in samples.
    return {
        "dither": 0.0,
        "feature_extractor_type": "Gemma4AudioFeatureExtractor",
        "feature_size": 128,
        "fft_length": 512,
        "fft_overdrive": False,
        "frame_length": 320,
        "hop_length": 160,
        "input_scale_factor": 1.0,
        "max_frequency": 8000.0,
        "mel_floor": 0.001,
        "min_frequency": 0.0,
        "padding_side": "right",
        "padding_value": 0.0,
        "per_bin_mean": None,
        "per_bin_stddev": None,
        "preemphasis": 0.0,
        "preemphasis_htk_flavor": True,
        "return_attention_mask": True,
        "sampling_rate": 16000,
    }


def _image_processor(*, patch_size: int, pooling_kernel_size: int) -> dict[str, Any]:
    # Gemma4ImageProcessor / Gemma4ImageProcessorPil class defaults. The released file also
    # carries image_seq_length here; the processors ignore it.
    return {
        "do_convert_rgb": True,
        "do_normalize": False,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.0, 0.0, 0.0],
        "image_processor_type": "Gemma4ImageProcessor",
        "image_seq_length": IMAGE_SEQ_LENGTH,
        "image_std": [1.0, 1.0, 1.0],
        "max_soft_tokens": IMAGE_SEQ_LENGTH,
        "patch_size": patch_size,
        "pooling_kernel_size": pooling_kernel_size,
        "resample": _BICUBIC,
        "rescale_factor": _RESCALE,
    }


def _video_processor(*, patch_size: int, pooling_kernel_size: int) -> dict[str, Any]:
    # Gemma4VideoProcessor class defaults (needs torchvision to load; see below).
    return {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "do_sample_frames": True,
        "image_mean": [0.0, 0.0, 0.0],
        "image_std": [1.0, 1.0, 1.0],
        "max_soft_tokens": 70,
        "num_frames": 32,
        "patch_size": patch_size,
        "pooling_kernel_size": pooling_kernel_size,
        "resample": _BICUBIC,
        "rescale_factor": _RESCALE,
        "return_metadata": False,
        "video_processor_type": "Gemma4VideoProcessor",
    }


def processor_config(config: dict[str, Any]) -> dict[str, Any]:
    """The processor_config.json for a checkpoint whose config.json is `config`."""
    vision = config.get("vision_config") or {}
    sizes = {"patch_size": int(vision.get("patch_size", 16)),
             "pooling_kernel_size": int(vision.get("pooling_kernel_size", 3))}
    return {
        "audio_ms_per_token": AUDIO_MS_PER_TOKEN,
        "audio_seq_length": AUDIO_SEQ_LENGTH,
        "feature_extractor": _feature_extractor(),
        "image_processor": _image_processor(**sizes),
        "image_seq_length": IMAGE_SEQ_LENGTH,
        "processor_class": "Gemma4Processor",
        "video_processor": _video_processor(**sizes),
    }


def write_processor_files(out_dir: Path, *, config: dict[str, Any]) -> None:
    """Write processor_config.json into `out_dir` (keys sorted, as transformers writes it)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(processor_config(config), indent=2, sort_keys=True) + "\n"
    (out_dir / PROCESSOR_CONFIG).write_text(text, encoding="utf-8")


# --- loading with transformers (host side, the numerical reference) --------------------
def load_reference_processor(path: Path):
    """transformers' Gemma4Processor for the checkpoint at `path`, offline.

    With torchvision installed this is simply `AutoProcessor.from_pretrained(path)`.
    Without it (torchvision wheels do not load beside torch 2.13.0, docs/export-notes.md)
    AutoProcessor fails: the video processor needs torchvision, and Gemma4Processor
    refuses video_processor=None because its class check looks the expected
    VideoProcessorMixin up on the top-level transformers module, where only a dummy
    stands. So the processor is assembled from its parts, each loaded the way
    AutoProcessor would load it, and video is left out:

        from transformers import (AutoFeatureExtractor, AutoImageProcessor, AutoTokenizer,
                                  Gemma4Processor)
        cfg = json.load(open(path / "processor_config.json"))
        processor = _Gemma4ProcessorWithoutVideo(          # Gemma4Processor, no video check
            feature_extractor=AutoFeatureExtractor.from_pretrained(path),
            image_processor=AutoImageProcessor.from_pretrained(path),  # -> Gemma4ImageProcessorPil
            tokenizer=AutoTokenizer.from_pretrained(path),
            video_processor=None,
            chat_template=(path / "chat_template.jinja").read_text(),
            image_seq_length=cfg["image_seq_length"], audio_seq_length=cfg["audio_seq_length"],
            audio_ms_per_token=cfg["audio_ms_per_token"],
        )

    Text, image and audio inputs go through the same Gemma4Processor code either way;
    passing `videos=` to the assembled processor raises.
    """
    from edgekit.errors import require

    transformers = require("transformers", extra="export")
    from transformers.utils import is_torchvision_available

    path = Path(path)
    if is_torchvision_available():
        return transformers.AutoProcessor.from_pretrained(path, local_files_only=True)

    cfg = json.loads((path / PROCESSOR_CONFIG).read_text(encoding="utf-8"))
    template = path / "chat_template.jinja"
    return _processor_without_video_class()(
        feature_extractor=transformers.AutoFeatureExtractor.from_pretrained(path, local_files_only=True),
        image_processor=transformers.AutoImageProcessor.from_pretrained(path, local_files_only=True),
        tokenizer=transformers.AutoTokenizer.from_pretrained(path, local_files_only=True),
        video_processor=None,
        chat_template=template.read_text(encoding="utf-8") if template.exists() else None,
        image_seq_length=cfg.get("image_seq_length", IMAGE_SEQ_LENGTH),
        audio_seq_length=cfg.get("audio_seq_length", AUDIO_SEQ_LENGTH),
        audio_ms_per_token=cfg.get("audio_ms_per_token", AUDIO_MS_PER_TOKEN),
    )


@functools.cache
def _processor_without_video_class():
    """Gemma4Processor that accepts video_processor=None (built lazily: needs transformers)."""
    from transformers import Gemma4Processor

    class _Gemma4ProcessorWithoutVideo(Gemma4Processor):
        """Gemma4Processor for hosts without torchvision: text, image and audio only."""

        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

        def __call__(self, *args, videos=None, **kwargs):
            if videos is not None:
                raise ValueError("video inputs need torchvision, which this environment lacks")
            return super().__call__(*args, **kwargs)

    return _Gemma4ProcessorWithoutVideo
