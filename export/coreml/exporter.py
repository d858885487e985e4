"""Core ML bundle exporter: stateful ML programs for iOS 18 / macOS 15, embedding tables as row files.

    checkpoint ─► transformers model (checkpoint dtype) ─► embedding tables, a block of rows
        at a time (embedding_tables.py) ─► text decoder: prefill + decode, one multifunction
        program, KV caches as states (decoder.py) ─► encoders (encoders.py) ─► linears
        compressed by the recipe (quantize.py) ─► bundle (manifest, tokenizer files)

Bundle layout:

    text_decoder.mlpackage          functions prefill (C tokens) and decode (1 token), states k/v_cache_<i>
    vision_encoder.mlpackage        pixel_values, pixel_position_ids -> soft_tokens, valid_mask
    audio_encoder.mlpackage         one function per frame bucket (frames_<T>)
    embeddings/token_embedding.bin  rows the app reads per token (edgekit.runtimes.embedding_tables)
    embeddings/per_layer_embedding.bin
    manifest.json, tokenizer files, chat template

The manifest's extra["embedding_tables"] and each method's extra say everything an app
needs (docs/apple.md); nothing here is needed at run time.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import torch

from edgekit.bundle import Bundle, BundleWriter
from edgekit.checkpoint import Checkpoint
from edgekit.compute_shapes import prefill_chunk
from edgekit.export import bundle_metadata
from edgekit.export.coreml import decoder as D
from edgekit.export.coreml import encoders as E
from edgekit.export.coreml.embedding_tables import ROWS_PER_BLOCK, layout_for, write_table
from edgekit.export.coreml.quantize import compress_linears, stored_schemes
from edgekit.export.coreml.torch_ops import coremltools_quiet
from edgekit.export.executorch.methods import Widths
from edgekit.export.lazy_upcast import load_in_checkpoint_dtype, upcast_
from edgekit.manifest import (METHOD_AUDIO_ENCODER, METHOD_TEXT_DECODER, METHOD_TOKEN_EMBEDDING, METHOD_VISION_ENCODER,
                              Manifest, MethodSpec, TensorSpec)
from edgekit.models.family import PER_LAYER_EMBEDDING
from edgekit.plan import ExportPlan
from edgekit.progress import progress_bar

DECODER_FILE = "text_decoder.mlpackage"
VISION_FILE = "vision_encoder.mlpackage"
AUDIO_FILE = "audio_encoder.mlpackage"
TABLE_FILES = {METHOD_TOKEN_EMBEDDING: "embeddings/token_embedding.bin",
               PER_LAYER_EMBEDDING: "embeddings/per_layer_embedding.bin"}
IOS_TARGET = "iOS18"  # Core ML states (the KV caches) need iOS 18 / macOS 15


def precision_for(plan: ExportPlan) -> str:
    """Core ML compute precision: fp32 for the fp32 recipe, fp16 for the rest (the device's)."""
    return "float32" if plan.recipe.float_dtype == "fp32" else "float16"


def export_coreml(checkpoint: Checkpoint, *, plan: ExportPlan, output: Path, overwrite: bool = False) -> Bundle:
    """Write a Core ML bundle for `plan` to `output` and return it (loaded, files checked)."""
    started = time.monotonic()
    with progress_bar("Loading the checkpoint", total=None):
        lm = load_in_checkpoint_dtype(checkpoint)
    text = checkpoint.text_config
    chunk = prefill_chunk(text, plan.context_length, ring_buffer=True)
    tokens = bundle_metadata.special_tokens(checkpoint)
    widths = Widths.of_config(text)
    output = Path(output)
    schemes: dict[str, str] = {}  # per program: what its linears hold once compressed
    with BundleWriter(output, overwrite=overwrite) as writer:
        tables = _write_tables(lm, plan, writer, widths)
        lm.model.language_model.embed_tokens_per_layer = None  # the decoder never reads the tables
        gc.collect()
        with progress_bar("Converting the text decoder", total=None), torch.no_grad():
            _upcast_text_model(lm)
            decoder = D.convert_text_decoder(
                lm, max_context=plan.context_length, chunk=chunk, precision=precision_for(plan),
                out=writer.path_for(DECODER_FILE), scratch=writer.scratch_dir(),
                compress=_compress(METHOD_TEXT_DECODER, plan, schemes))
        methods = [_decoder_method(decoder, widths, chunk=chunk, context=plan.context_length)]
        lm.model.language_model = None  # the encoders never read it: its float copy goes before theirs is made
        gc.collect()
        lm.float()
        if "vision" in plan.modalities:
            methods.append(_vision_encoder(lm, plan, writer, widths, schemes))
        if "audio" in plan.modalities:
            methods.append(_audio_encoder(lm, plan, writer, widths, schemes))
        del lm
        gc.collect()
        bundle_metadata.copy_tokenizer_files(checkpoint, writer)
        manifest = _manifest(checkpoint, plan, methods, tables, schemes, tokens=tokens,
                             seconds=time.monotonic() - started)
        return writer.finalize(manifest)


def _upcast_text_model(lm) -> None:
    """The text model in fp32 for tracing, the encoders left as stored until their turn: at
    full depth an fp32 copy of everything is 11 GB. The head is a copy of the tied embedding
    in the program's precision (decoder.SplitHead), so that table is not upcast."""
    for name, module in lm.model.language_model.named_children():
        if name != "embed_tokens":
            upcast_(module)


def _write_tables(lm, plan: ExportPlan, writer: BundleWriter, widths: Widths) -> dict[str, dict]:
    """The token and per-layer tables as row files; returns their manifest entries."""
    text = lm.model.language_model
    modules = {METHOD_TOKEN_EMBEDDING: (text.embed_tokens, widths.hidden)}
    if widths.ple:
        modules[PER_LAYER_EMBEDDING] = (text.embed_tokens_per_layer, widths.ple)
    entries = {}
    for name, (module, columns) in modules.items():
        scheme = plan.recipe.scheme_for(name, "embedding")
        layout = layout_for(scheme, rows=widths.vocab, columns=columns)
        blocks = -(-layout.rows // ROWS_PER_BLOCK)
        with progress_bar(f"Writing the {name.replace('_', ' ')} table", total=blocks) as advance:
            write_table(module, layout, writer.path_for(TABLE_FILES[name]), on_block=advance)
        # A group that does not divide the row fell back to one scale per row: say so.
        stored = scheme.name if not scheme.quantized or layout.group_size == (scheme.group_size or columns) \
            else f"{layout.dtype}-per-row"
        entries[name] = {"file": TABLE_FILES[name], **layout.to_dict(), "scheme": stored}
    return entries


def _decoder_method(info: dict, widths: Widths, *, chunk: int, context: int) -> MethodSpec:
    return MethodSpec(
        name=METHOD_TEXT_DECODER, file=DECODER_FILE,
        inputs=tuple(TensorSpec(name, dtype, shape) for name, (dtype, shape) in zip(D.DECODER_INPUTS, (
            ("float32", (1, "chunk", widths.hidden)), ("float32", (1, "chunk", widths.ple)),
            ("int32", ("chunk",)), ("int32", (1,))))),
        outputs=(TensorSpec("logits", "float32", (1, widths.vocab)),),
        extra={"functions": info["functions"], "states": info["states"], "kv_cache_slots": info["kv_cache_slots"],
               "max_context": context, "max_seq_len": chunk, "logits": "position last_index of the chunk",
               "cache_position": "consecutive absolute positions continuing the previous call; a short "
                                 "prefill chunk is padded after its tokens with the positions that follow",
               "minimum_deployment_target": IOS_TARGET})


def _compress(component: str, plan: ExportPlan, schemes: dict[str, str]):
    """model -> model with `component`'s linears stored as the recipe says; records what they hold."""
    def compress(model):
        model = compress_linears(model, recipe=plan.recipe, component=component)
        schemes[component] = stored_schemes(model, recipe=plan.recipe, component=component)
        return model
    return compress


def _vision_encoder(lm, plan: ExportPlan, writer: BundleWriter, widths: Widths, schemes: dict[str, str]) -> MethodSpec:
    budget = plan.vision_token_budget
    with progress_bar("Converting the vision encoder", total=None), torch.no_grad(), coremltools_quiet():
        model = _compress(METHOD_VISION_ENCODER, plan, schemes)(
            E.convert_vision_encoder(lm, budget=budget, precision=precision_for(plan)))
        model.save(str(writer.path_for(VISION_FILE)))
    pixels, positions = (model.get_spec().description.input[i].type.multiArrayType.shape for i in (0, 1))
    return MethodSpec(
        name=METHOD_VISION_ENCODER, file=VISION_FILE,
        inputs=(TensorSpec(E.VISION_INPUTS[0], "float32", tuple(pixels)),
                TensorSpec(E.VISION_INPUTS[1], "int32", tuple(positions))),
        outputs=(TensorSpec(E.VISION_OUTPUTS[0], "float32", (1, budget, widths.hidden)),
                 TensorSpec(E.VISION_OUTPUTS[1], "int32", (1, budget))),
        extra={"max_soft_tokens": budget, "max_patches": int(pixels[1]), "functions": {"main": int(pixels[1])},
               "padding": "patches past the image's: zeros, positions (-1, -1)", "minimum_deployment_target": IOS_TARGET})


def _audio_encoder(lm, plan: ExportPlan, writer: BundleWriter, widths: Widths, schemes: dict[str, str]) -> MethodSpec:
    min_frames = E.FRAME_MULTIPLE * (lm.config.audio_config.attention_chunk_size + 1)
    buckets = E.audio_buckets(min_frames=min_frames)
    with progress_bar(f"Converting the audio encoder ({len(buckets)} lengths)", total=None), torch.no_grad(), \
            coremltools_quiet():
        E.convert_audio_encoder(lm, buckets=buckets, precision=precision_for(plan), out=writer.path_for(AUDIO_FILE),
                                compress=_compress(METHOD_AUDIO_ENCODER, plan, schemes))
    return MethodSpec(
        name=METHOD_AUDIO_ENCODER, file=AUDIO_FILE,
        inputs=(TensorSpec(E.AUDIO_INPUTS[0], "float32", (1, "num_frames", lm.config.audio_config.subsampling_conv_channels[0])),
                TensorSpec(E.AUDIO_INPUTS[1], "int32", (1, "num_frames"))),
        outputs=(TensorSpec(E.AUDIO_OUTPUTS[0], "float32", (1, "num_audio_tokens", widths.hidden)),
                 TensorSpec(E.AUDIO_OUTPUTS[1], "int32", (1, "num_audio_tokens"))),
        extra={"functions": {E.bucket_function_name(f): f for f in buckets}, "frame_multiple": E.FRAME_MULTIPLE,
               "min_frames": min_frames,
               "padding": "features and mask zero-padded to the smallest function's frames that hold the clip",
               "minimum_deployment_target": IOS_TARGET})


def _manifest(checkpoint: Checkpoint, plan: ExportPlan, methods: list[MethodSpec], tables: dict[str, dict],
              schemes: dict[str, str], *, tokens, seconds: float) -> Manifest:
    schemes = {**schemes, **{name: entry["scheme"] for name, entry in tables.items()}}
    return bundle_metadata.manifest_for(
        checkpoint, plan, methods=tuple(methods), quant_schemes=schemes, tokens=tokens,
        extra={"embedding_tables": tables, "kv_cache_dtype": "float16",
               "compute_precision": precision_for(plan), "export_seconds": round(seconds, 1)})
