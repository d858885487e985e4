"""Manifest values checked before a runtime trusts them: against the schema, the files, the machine.

Manifest.from_dict checks every key the manifest's models define (types, ranges,
patterns: `eos_ids: []` would never stop generating); the values the runtime reads from
free-form places, and the files, need more. A manifest is refused when:

- a value the runtime reads from a method's or the manifest's `extra` has the wrong type
  or range, or a special token id is outside the vocabulary;
- it disagrees with the exported files: a max_context beyond what the decoder was
  exported for, or anything else the format's own check of its files finds (each format
  names it in edgekit.formats: ONNX reads genai_config.json, ExecuTorch parses its program);
- what it would make the runtime allocate is more than this machine's memory.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Collection

from edgekit.errors import BundleError
from edgekit.formats import get_format
from edgekit.machine import check_memory
from edgekit.manifest import METHOD_AUDIO_ENCODER, Manifest

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2, "int8": 1,
                "uint8": 1, "bool": 1}
_JSON_TYPES: dict[str, Any] = {"integer": int, "number": (int, float), "string": str, "boolean": bool,
                               "array": list, "object": dict, "null": type(None)}

# What the runtime reads from `extra` (a method's, or the manifest's): the type it needs and
# the least value it can work with (None: any).
_METHOD_EXTRAS: dict[str, tuple[type, int | None]] = {
    "frame_multiple": (int, 1), "min_frames": (int, 0), "max_seq_len": (int, 1), "sliding_window": (int, 1),
    "sliding_cache_layers": (list, 0), "kernels": (list, None),
}
_MANIFEST_EXTRAS: dict[str, tuple[type, int | None]] = {
    "program": (str, None), "program_data": (str, None), "genai_config": (str, None), "max_seq_len": (int, 1),
}


# --- the manifest alone ------------------------------------------------------------------


def check_manifest_values(manifest: Manifest) -> None:
    """Everything that needs no file beyond the models' own rules (edgekit.manifest): the
    runtime's extras, token ids."""
    for method in manifest.methods:
        _check_extras(method.extra, _METHOD_EXTRAS, f"methods.{method.name}.extra")
    _check_extras(manifest.extra, _MANIFEST_EXTRAS, "extra")
    vocab = manifest.model.vocab_size
    tokens = manifest.special_tokens
    ids = {"bos_id": tokens.bos_id, "pad_id": tokens.pad_id,
           **{f"eos_ids[{i}]": t for i, t in enumerate(tokens.eos_ids)},
           **{f"extra.{k}": v for k, v in tokens.extra.items()},
           **{k: getattr(tokens, k) for k in ("sot_id", "eot_id", "image_token_id", "audio_token_id",
                                              "video_token_id", "boi_id", "eoi_id", "boa_id", "eoa_id")}}
    for key, token in ids.items():
        if token is not None and not 0 <= token < vocab:
            raise BundleError(f"bundle manifest key 'special_tokens.{key}' is {token}, outside the model's "
                              f"vocabulary of {vocab}")


def check_app_target(manifest: Manifest, *, format: str, devices: Collection[str], data_files: bool) -> None:
    """What an app built for one format and some device profiles refuses before it loads anything
    (android_demo's BundleManifest.kt checks the same, in this order): a bundle for another format
    or device, a program whose weights are in a data file its runtime cannot pass (`data_files`
    False: the Android library's multimodal LlmModule), a manifest without prompt pieces."""
    if manifest.format != format:
        raise BundleError(f"this is a {manifest.format} bundle; this app runs {format} bundles "
                          f"(export with --device {sorted(devices)[0]})")
    if manifest.device not in devices:
        raise BundleError(f"this bundle was exported for {manifest.device}; this app takes bundles for "
                          f"{', '.join(sorted(devices))} (export again with --device {sorted(devices)[0]})")
    data = manifest.extra.get("program_data")
    if data and not data_files:
        raise BundleError(f"this bundle keeps its weights in {data} (--external-weights), which this app's runtime "
                          f"cannot load; export again without --external-weights")
    if manifest.prompt is None:
        raise BundleError("this bundle's manifest has no prompt pieces (an older edgekit, or a chat template they "
                          "cannot describe); export it again")


def _check_extras(extra: dict[str, Any], wanted: dict[str, tuple[type, int | None]], where: str) -> None:
    for name, (kind, least) in wanted.items():
        value = extra.get(name)
        if value is None:
            continue
        items = value if kind is list and isinstance(value, list) else [value]
        item_kind = (str if name == "kernels" else int) if kind is list else kind
        if not isinstance(value, kind) or any(isinstance(v, bool) or not isinstance(v, item_kind) for v in items):
            raise BundleError(f"bundle manifest key '{where}.{name}' must be {kind.__name__}"
                              f"{' of ' + item_kind.__name__ if kind is list else ''}, got {value!r:.40}")
        if least is not None and any(v < least for v in items):
            raise BundleError(f"bundle manifest key '{where}.{name}' must be at least {least}, got {value!r:.40}")


# --- against the files and the machine ---------------------------------------------------


def check_against_files(root: Path, manifest: Manifest) -> None:
    """The manifest agrees with the exported files, and what it sizes fits this machine.
    Called once the files are verified, so what is read here is what the manifest vouches for."""
    limit = get_format(manifest.format).check_exported_files(root, manifest)
    if limit is not None and manifest.max_context > limit[0]:
        raise BundleError(f"bundle manifest says max_context {manifest.max_context}, but the decoder was exported "
                          f"for {limit[0]} tokens ({limit[1]}); the manifest was changed after export")
    _check_tensor_memory(manifest)


def _check_tensor_memory(manifest: Manifest) -> None:
    """Inputs the runtime builds at their manifest shape (an ExecuTorch vision budget, the
    audio encoder's least frames) must fit this machine."""
    for method in manifest.methods:
        for tensor in (*method.inputs, *method.outputs):
            static = [d for d in tensor.shape if isinstance(d, int)]
            nbytes = math.prod(static) * _DTYPE_BYTES[tensor.dtype]
            check_memory(f"method {method.name}'s {tensor.name} {list(tensor.shape)}", nbytes, error=BundleError)
    audio = manifest.audio_preprocessing
    if audio is not None and manifest.has_method(METHOD_AUDIO_ENCODER):
        frames = manifest.method(METHOD_AUDIO_ENCODER).extra.get("min_frames") or 0
        check_memory(f"the audio encoder's {frames} frames", frames * audio.feature_size * 4, error=BundleError)
