"""Write a random-weight Gemma 4 checkpoint with the same files as a downloaded one.

    OUT_DIR/
      config.json                       Gemma4ForConditionalGeneration, model_type gemma4
      model.safetensors                 or model-0000k-of-0000n.safetensors + index
      generation_config.json
      tokenizer.json  tokenizer_config.json  chat_template.jinja
      processor_config.json
      .edgekit-checkpoint               the files above, so --overwrite knows edgekit wrote them

Tensor names and shapes come from transformers' own module tree built on the meta
device, so a checkpoint written here loads through exactly the code path of a real one.
Weights are generated tensor by tensor in bf16 and written shard by shard, so a
full-depth 5 B model never has to fit in RAM at once. Needs `gemma-edgekit[export]`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from edgekit.bundle import replace_directory
from edgekit.checkpoint_output import (
    check_checkpoint_target, check_memory_for_shards, finish_checkpoint_dir, make_checkpoint_temp_dir,
)
from edgekit.errors import InputError
from edgekit.models.gemma4.presets import Preset, build_config
from edgekit.models.gemma4.tensor_specs import TensorSpec, tensor_specs
from edgekit.progress import progress_bar
from edgekit.models.gemma4.special_tokens import layout_for

# Like transformers' save_pretrained: shards of at most this many bytes.
MAX_SHARD_BYTES = 2 * 1024**3
# Rows generated at a time for huge tensors (the per-layer table is 262144 x 8960).
_ROW_CHUNK_ELEMENTS = 64 * 1024 * 1024
# Finite clip bounds, as released checkpoints have (transformers' init uses +-inf):
# the exporters must handle real values, not infinities.
_CLIP_BOUND = 8.0


def _init_tensor(spec: TensorSpec, *, seed: int):
    """A random tensor for `spec`, reproducible from (seed, name) whatever the shard order."""
    import torch

    name, shape = spec.name, spec.shape
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("input_min", "output_min"):
        return torch.full(shape, -_CLIP_BOUND, dtype=torch.bfloat16)
    if leaf in ("input_max", "output_max"):
        return torch.full(shape, _CLIP_BOUND, dtype=torch.bfloat16)
    if leaf == "layer_scalar":
        return torch.ones(shape, dtype=torch.bfloat16)
    out = torch.empty(shape, dtype=torch.bfloat16)
    if name.endswith(("q_norm.weight", "k_norm.weight")):
        # Gemma 4 attends with scale 1: q_norm/k_norm carry the 1/sqrt(head_dim) a trained
        # model learns. Unit norms would give one-hot attention and a chaotic network
        # that no quantized export could track; d^-1/4 on each side keeps scores O(1).
        return out.normal_(shape[0] ** -0.25, 0.02, generator=gen)
    if "language_model" in name and leaf == "weight" and ".post_" in name:
        # Post-branch norms set how far each layer moves the residual stream. Trained
        # models move it a little per layer; unit scales make a random deep stack
        # chaotic (one int4-rounded matrix early on changed the logits' direction by 35%),
        # which would hide real export bugs behind noise.
        return out.normal_(0.25, 0.05, generator=gen)
    if len(shape) <= 1 and ("norm" in name or leaf == "weight"):
        # RMSNorm scales multiply (no +1 in Gemma 4): centre them on 1 with some spread
        # so a parity test notices a norm applied to the wrong tensor.
        return out.normal_(1.0, 0.1, generator=gen)
    if len(shape) <= 1:  # biases, per-dim scales
        return out.normal_(0.0, 0.02, generator=gen)
    # Fan-in scaled weights keep activations O(1) through a deep random network.
    fan_in = math.prod(shape[1:])
    std = fan_in ** -0.5
    if "embed_tokens" in name or "position_embedding" in name:
        std = shape[-1] ** -0.5
    rows_per_chunk = max(1, _ROW_CHUNK_ELEMENTS // max(1, fan_in))
    for start in range(0, shape[0], rows_per_chunk):
        out[start : start + rows_per_chunk].normal_(0.0, std, generator=gen)
    return out


def _shards(specs: list[TensorSpec]) -> list[list[TensorSpec]]:
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > MAX_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _write_weights(out_dir: Path, specs: list[TensorSpec], *, seed: int) -> None:
    from safetensors.torch import save_file

    shards = _shards(specs)
    total_bytes = sum(s.nbytes for s in specs)
    index: dict[str, str] = {}
    with progress_bar("Writing weights", total=total_bytes) as advance:
        for k, shard in enumerate(shards, start=1):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for spec in shard:
                tensors[spec.name] = _init_tensor(spec, seed=seed)
                advance(spec.nbytes)
            save_file(tensors, str(out_dir / fname), metadata={"format": "pt"})
            del tensors
            index.update({spec.name: fname for spec in shard})
    if len(shards) > 1:
        (out_dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total_bytes}, "weight_map": index}, indent=2) + "\n"
        )


def _generation_config(config: dict[str, Any]) -> dict[str, Any]:
    text = config["text_config"]
    # Sampling defaults recommended for Gemma models (temperature 1, top-k 64, top-p 0.95).
    return {
        "bos_token_id": text["bos_token_id"],
        "eos_token_id": text["eos_token_id"],
        "pad_token_id": text["pad_token_id"],
        "do_sample": True,
        "temperature": 1.0,
        "top_k": 64,
        "top_p": 0.95,
    }


def make_checkpoint(preset: Preset, out_dir: Path, *, seed: int = 0, layers: int | None = None,
                    audio: bool = True, vision: bool = True, overwrite: bool = False) -> Path:
    """Write a random-weight checkpoint of `preset` to `out_dir`; returns the directory.

    Written into a temporary directory beside `out_dir` and renamed into place when
    complete, so an interrupted run never leaves a checkpoint that looks finished.
    """
    from edgekit.models.gemma4.processor_files import write_processor_files
    from edgekit.testing.tokenizer_builder import write_tokenizer_files

    out_dir = Path(os.path.abspath(out_dir))  # "." too has a parent to write the new one in
    check_checkpoint_target(out_dir, overwrite=overwrite)
    try:
        config = build_config(preset, layers=layers)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    # A checkpoint without a tower has null in its config, as text-only releases do.
    config["audio_config"] = config["audio_config"] if audio else None
    config["vision_config"] = config["vision_config"] if vision else None
    specs = tensor_specs(config)
    _check_disk_space(out_dir, sum(s.nbytes for s in specs))
    check_memory_for_shards([sum(s.nbytes for s in shard) for shard in _shards(specs)])

    tmp = make_checkpoint_temp_dir(out_dir)
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(_generation_config(config), indent=2) + "\n")
        write_tokenizer_files(tmp, layout=layout_for(config["text_config"]["vocab_size"]))
        write_processor_files(tmp, config=config)
        _write_weights(tmp, specs, seed=seed)
        finish_checkpoint_dir(tmp)
        replace_directory(tmp, out_dir)  # an old checkpoint is deleted only once the new one is in
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _check_disk_space(out_dir: Path, needed: int) -> None:
    probe = out_dir.parent if not out_dir.exists() else out_dir
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    # Headroom for the tokenizer and filesystem overhead.
    if free < needed * 1.05 + 64 * 1024**2:
        raise InputError(
            f"not enough disk space in {probe}: the checkpoint needs {needed / 1e9:.2f} GB, {free / 1e9:.2f} GB free"
        )


def iter_tensor_names(out_dir: Path) -> Iterator[str]:
    """Names of the tensors in a written checkpoint (for tests and tools)."""
    from safetensors import safe_open

    for f in sorted(Path(out_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as handle:
            yield from handle.keys()
