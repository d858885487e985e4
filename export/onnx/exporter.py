"""ONNX bundle exporter: one graph per method, quantized by the plan's recipe.

    checkpoint ─► transformers model (bf16 as stored) ─► per graph: upcast its modules to fp32
        ─► torch.onnx (dynamo) ─► raw graph ─► quantize ─► bundle (+ genai_config.json)

Quantized graphs (int4, int8: weight-only, MatMulNBits / GatherBlockQuantized) are quantized
one weight at a time (stream_quantize.py) and the embedding tables never enter a graph in
fp32: at full E2B depth this is what lets the export run in well under the 24 GiB that an
fp32 load plus an in-memory quantizer needed (RESULTS.md).

Raw graphs go to a scratch directory beside the bundle; only finished graphs enter the
bundle's temporary directory, which BundleWriter renames into place at the very end.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from edgekit import onnx_layout as L
from edgekit.bundle import Bundle, BundleWriter
from edgekit.errors import ExportError
from edgekit.export import bundle_metadata
from edgekit.export.components.audio_encoder import AudioEncoder
from edgekit.export.components.text_decoder import TextDecoder
from edgekit.export.components.token_embedding import MultimodalEmbedding
from edgekit.export.components.vision_encoder import VisionEncoder
from edgekit.export.onnx import genai_config
from edgekit.export.onnx.fusable_norms import use_fusable_norms_
from edgekit.export.onnx.graph_export import OPSET, GraphSpec, export_graph
from edgekit.export.onnx.logits_to_keep import add_logits_to_keep
from edgekit.export.lazy_upcast import load_in_checkpoint_dtype, upcast_
from edgekit.export.onnx.quantize import to_fp16
from edgekit.export.onnx.stream_quantize import TableSource, quantize_graph_weights
from edgekit.manifest import (METHOD_AUDIO_ENCODER, METHOD_TEXT_DECODER, METHOD_TOKEN_EMBEDDING,
                              METHOD_VISION_ENCODER, Manifest, MethodSpec, TensorSpec)
from edgekit.checkpoint import Checkpoint
from edgekit.models.family import PER_LAYER_EMBEDDING
from edgekit.plan import ExportPlan
from edgekit.progress import progress_bar

# Which recipe key governs the big weights of each graph (edgekit.recipes weight keys).
_GRAPH_WEIGHTS = {
    METHOD_TOKEN_EMBEDDING: ("token_embedding", "embedding"),
    METHOD_TEXT_DECODER: ("text_decoder", "linear"),
    METHOD_VISION_ENCODER: ("vision_encoder", "linear"),
    METHOD_AUDIO_ENCODER: ("audio_encoder", "linear"),
}


@dataclass(frozen=True)
class BuiltGraph:
    method: str
    file: str
    scheme: str
    extra: dict


# --- graph specs ---------------------------------------------------------------------------

def _embedding_spec(lm) -> GraphSpec:
    hidden = lm.config.text_config.hidden_size
    return GraphSpec(
        name=METHOD_TOKEN_EMBEDDING, module=MultimodalEmbedding(lm).eval(),
        args=(torch.ones(1, 4, dtype=torch.int64), torch.zeros(2, hidden), torch.zeros(3, hidden)),
        input_names=(L.INPUT_IDS, L.IMAGE_FEATURES, L.AUDIO_FEATURES),
        output_names=(L.INPUTS_EMBEDS, L.PER_LAYER_INPUTS),
        dynamic_axes={L.INPUT_IDS: {0: L.BATCH, 1: L.SEQUENCE}, L.IMAGE_FEATURES: {0: L.NUM_IMAGE_TOKENS},
                      L.AUDIO_FEATURES: {0: L.NUM_AUDIO_TOKENS}, L.INPUTS_EMBEDS: {0: L.BATCH, 1: L.SEQUENCE},
                      L.PER_LAYER_INPUTS: {0: L.BATCH, 1: L.SEQUENCE}},
    )


def _decoder_spec(lm) -> GraphSpec:
    decoder = TextDecoder(lm).eval()
    text = lm.config.text_config
    # Sliding layers' past is shorter than the global layers' in the sample, as the runner
    # feeds it, so tracing keeps the two lengths apart.
    batch, seq, past, sliding_past = 1, 4, 3, 2
    ple_width = text.num_hidden_layers * text.hidden_size_per_layer_input
    args: list = [torch.randn(batch, seq, text.hidden_size), torch.randn(batch, seq, ple_width),
                  torch.arange(past, past + seq)[None], torch.ones(batch, past + seq, dtype=torch.int64)]
    names = [L.INPUTS_EMBEDS, L.PER_LAYER_INPUTS, L.POSITION_IDS, L.ATTENTION_MASK]
    outputs = [L.LOGITS]
    axes = {L.INPUTS_EMBEDS: {0: L.BATCH, 1: L.SEQUENCE}, L.PER_LAYER_INPUTS: {0: L.BATCH, 1: L.SEQUENCE},
            L.POSITION_IDS: {0: L.BATCH, 1: L.SEQUENCE}, L.ATTENTION_MASK: {0: L.BATCH, 1: L.TOTAL_SEQUENCE},
            L.LOGITS: {0: L.BATCH, 1: L.SEQUENCE}}
    past_kv = []
    layout = decoder.layout
    for layer in layout.owners:
        sliding = layer in decoder.sliding_cache_layers
        length = sliding_past if sliding else past
        for past_name, present_name in ((L.PAST_KEY, L.PRESENT_KEY), (L.PAST_VALUE, L.PRESENT_VALUE)):
            past_kv.append(torch.randn(batch, layout.kv_heads[layer], length, layout.head_dims[layer]))
            names.append(past_name % layer)
            outputs.append(present_name % layer)
            axes[past_name % layer] = {0: L.BATCH, 2: L.SLIDING_PAST_SEQUENCE if sliding else L.PAST_SEQUENCE}
            axes[present_name % layer] = {0: L.BATCH, 2: L.SLIDING_TOTAL_SEQUENCE if sliding else L.TOTAL_SEQUENCE}
    return GraphSpec(name=METHOD_TEXT_DECODER, module=decoder, args=(*args, tuple(past_kv)),
                     input_names=tuple(names), output_names=tuple(outputs), dynamic_axes=axes)


class _OneImage(torch.nn.Module):
    """onnxruntime-genai wants image_features as [num_image_tokens, hidden] (rank 2)."""

    def __init__(self, encoder: VisionEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, pixel_values: torch.Tensor, pixel_position_ids: torch.Tensor):
        tokens, valid = self.encoder(pixel_values, pixel_position_ids)
        return tokens[0], valid[0]


def _vision_spec(lm, *, budget: int) -> GraphSpec:
    encoder = VisionEncoder(lm, max_soft_tokens=budget).eval()
    # Any number of patches up to the budget (k^2 per soft token): onnxruntime-genai
    # feeds an image's own patches only; edgekit's runner trims the padding too.
    return GraphSpec(name=METHOD_VISION_ENCODER, module=_OneImage(encoder), args=encoder.example_inputs(),
                     input_names=(L.PIXEL_VALUES, L.PIXEL_POSITION_IDS),
                     output_names=(L.IMAGE_FEATURES, L.IMAGE_FEATURES + "_mask"),
                     dynamic_axes={L.PIXEL_VALUES: {1: L.NUM_PATCHES}, L.PIXEL_POSITION_IDS: {1: L.NUM_PATCHES},
                                   L.IMAGE_FEATURES: {0: L.NUM_IMAGE_TOKENS},
                                   L.IMAGE_FEATURES + "_mask": {0: L.NUM_IMAGE_TOKENS}},
                     dynamic_shapes=encoder.dynamic_shapes())


def _audio_spec(lm) -> GraphSpec:
    encoder = AudioEncoder(lm).eval()
    # 200 frames, as the ExecuTorch method traces: a sample past min_frames is all it needs.
    return GraphSpec(name=METHOD_AUDIO_ENCODER, module=encoder, args=encoder.example_inputs(200), strict=True,
                     input_names=(L.INPUT_FEATURES, L.INPUT_FEATURES_MASK),
                     output_names=(L.AUDIO_FEATURES, L.AUDIO_FEATURES + "_mask"),
                     dynamic_axes={L.INPUT_FEATURES: {1: L.NUM_FRAMES}, L.INPUT_FEATURES_MASK: {1: L.NUM_FRAMES},
                                   L.AUDIO_FEATURES: {1: L.NUM_AUDIO_TOKENS},
                                   L.AUDIO_FEATURES + "_mask": {1: L.NUM_AUDIO_TOKENS}},
                     dynamic_shapes=encoder.dynamic_shapes())


# Export order: the decoder (the largest graph in fp32) last, so the loaded model can be
# dropped before its graph is quantized.
_SPECS = {
    METHOD_TOKEN_EMBEDDING: lambda lm, plan: _embedding_spec(lm),
    METHOD_VISION_ENCODER: lambda lm, plan: _vision_spec(lm, budget=plan.vision_token_budget),
    METHOD_AUDIO_ENCODER: lambda lm, plan: _audio_spec(lm),
    METHOD_TEXT_DECODER: lambda lm, plan: _decoder_spec(lm),
}


def graph_methods(plan) -> tuple[str, ...]:
    """The graphs a plan asks for, in export order."""
    wanted = {METHOD_TOKEN_EMBEDDING, METHOD_TEXT_DECODER}
    wanted |= {METHOD_VISION_ENCODER} if "vision" in plan.modalities else set()
    wanted |= {METHOD_AUDIO_ENCODER} if "audio" in plan.modalities else set()
    return tuple(m for m in _SPECS if m in wanted)


# --- quantization --------------------------------------------------------------------------

def _scheme(method: str, recipe):
    """The scheme of `method`'s graph; a recipe this exporter cannot write fails here, before the
    slow load. The decoder is quantized in one pass: its lm_head may take a block size of its
    own, not bits of its own."""
    component, kind = _GRAPH_WEIGHTS[method]
    scheme = recipe.scheme_for(component, kind)
    bits = _stored_bits(scheme, recipe)
    head = recipe.scheme_for(component, "lm_head")
    if method == METHOD_TEXT_DECODER and head != scheme and (bits is None or _stored_bits(head, recipe) != bits):
        raise ExportError(f"recipe {recipe.name}: ONNX export needs the lm_head quantized like the decoder "
                          "linears (it may differ in block size only)")
    return scheme


def _stored_bits(scheme, recipe) -> int | None:
    """The bits MatMulNBits / GatherBlockQuantized store `scheme`'s weights in; None for a float
    scheme. Both operators quantize weights only, in blocks."""
    if not scheme.quantized:
        return None
    if scheme.activations != "float" or scheme.group_size is None:
        raise ExportError(f"recipe {recipe.name}: ONNX bundles store block-wise weight-only schemes, "
                          f"not {scheme.name}")
    return scheme.weight_bits


def _lm_head_block(method: str, recipe, vocab_size: int) -> tuple[int, int] | None:
    """(vocab size, block) when the recipe gives the decoder's lm_head its own block size."""
    if method != METHOD_TEXT_DECODER:
        return None
    head = recipe.scheme_for(_GRAPH_WEIGHTS[method][0], "lm_head")
    linear = recipe.scheme_for(*_GRAPH_WEIGHTS[method])
    if head.quantized and linear.quantized and head.group_size != linear.group_size:
        return vocab_size, head.group_size
    return None


def _is_table_graph(method: str) -> bool:
    return _GRAPH_WEIGHTS[method][1] == "embedding"


def _finish_graph(raw: Path, out: Path, *, method: str, scheme, tables: dict[str, TableSource],
                  lm_head: tuple[int, int] | None = None) -> None:
    """Quantize `raw` by `scheme` and save it as `out` (+ out.data).
    `tables`: the embedding graph's placeholder tables (quantized recipes), filled in here;
    `lm_head`: (vocab size, block) for a decoder whose lm_head takes its own block size."""
    if scheme.quantized:
        quantize_graph_weights(raw, out, bits=scheme.weight_bits, block_size=scheme.group_size,
                               matmuls=not _is_table_graph(method), tables=tables, lm_head=lm_head)
        return
    model = onnx.load(str(raw))
    if scheme.weight_bits == 16:
        model = to_fp16(model)
    _save(model, out)


def _recorded_scheme(method: str, scheme, recipe) -> str:
    """The scheme the manifest names for a graph: for the embedding graph, both tables'; for
    the decoder, the lm_head's too when it differs."""
    if method == METHOD_TEXT_DECODER:
        return "+".join(dict.fromkeys((scheme.name, recipe.scheme_for(_GRAPH_WEIGHTS[method][0], "lm_head").name)))
    if not _is_table_graph(method):
        return scheme.name
    tables = (recipe.scheme_for(c, "embedding").name for c in (METHOD_TOKEN_EMBEDDING, PER_LAYER_EMBEDDING))
    return "+".join(dict.fromkeys(tables))


@contextlib.contextmanager
def _placeholder_tables(spec: GraphSpec, scheme, recipe) -> Iterator[dict[str, TableSource]]:
    """For quantized recipes, trace the embedding graph with 2-row stand-ins for its tables, so
    neither torch.onnx nor onnx.load ever holds them in fp32 (E2B's are 11 GB as fp32): the
    quantizer reads the real rows, still in the checkpoint's dtype, in chunks, each table by
    its own scheme (the per-layer table may take 2 bits)."""
    if not (scheme.quantized and _is_table_graph(spec.name)):
        yield {}
        return
    swapped: list[tuple[nn.Embedding, nn.Parameter, int | None]] = []
    tables: dict[str, TableSource] = {}
    for name, module in spec.module.named_modules():
        if isinstance(module, nn.Embedding):
            table = recipe.scheme_for(PER_LAYER_EMBEDDING if "per_layer" in name else METHOD_TOKEN_EMBEDDING,
                                      "embedding")
            if _stored_bits(table, recipe) not in (2, 4, 8):
                raise ExportError(f"recipe {recipe.name}: quantized ONNX bundles store tables in 2, 4 or 8 "
                                  f"bits, not {table.name} ({name})")
            real, padding_idx = module.weight, module.padding_idx
            rows, cols = real.shape
            tables[f"{name}.weight"] = TableSource(rows, cols, lambda a, b, w=real: w.detach()[a:b].float().numpy(),
                                                   bits=table.weight_bits, block_size=table.group_size,
                                                   fp16_scales=table.scale_bits == 16)
            # A value of its own per stand-in: the exporter merges equal initializers, and two
            # tables of one width (hidden == layers x per-layer width) would become one Gather input.
            module.weight = nn.Parameter(torch.full((2, cols), float(len(tables))), requires_grad=False)
            module.padding_idx = None  # only steers gradients; 2 rows cannot hold the pad id
            swapped.append((module, real, padding_idx))
    try:
        yield tables
    finally:
        for module, real, padding_idx in swapped:
            module.weight, module.padding_idx = real, padding_idx


def _save(model: onnx.ModelProto, out: Path) -> None:
    data = out.with_name(out.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing .data file
    onnx.save(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
              location=data.name, size_threshold=1024)


# --- manifest ------------------------------------------------------------------------------

_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.INT64: "int64",
           onnx.TensorProto.INT32: "int32", onnx.TensorProto.BOOL: "bool", onnx.TensorProto.BFLOAT16: "bfloat16"}


def _runner_hints(module) -> dict:
    """What the runner must honour or may do (audio: pad frames to a multiple, a minimum; the
    decoder: which past inputs may hold only the last sliding_window - 1 positions)."""
    keys = ("frame_multiple", "min_frames", "max_soft_tokens", "sliding_window", "sliding_cache_layers")
    hints = {k: getattr(module, k) for k in keys if hasattr(module, k)}
    return {k: [int(x) for x in v] if isinstance(v, (tuple, list)) else int(v) for k, v in hints.items()}


def _method_spec(method: str, path: Path, hints: dict) -> MethodSpec:
    model = onnx.load(str(path), load_external_data=False)

    def specs(values) -> tuple[TensorSpec, ...]:
        out = []
        for v in values:
            t = v.type.tensor_type
            shape = tuple(d.dim_param or d.dim_value for d in t.shape.dim)
            out.append(TensorSpec(v.name, _DTYPES.get(t.elem_type, "float32"), shape))
        return tuple(out)

    data = path.with_name(path.name + ".data")
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=OPSET)
    return MethodSpec(name=method, file=path.name, inputs=specs(model.graph.input), outputs=specs(model.graph.output),
                      extra={"data_file": data.name if data.exists() else None, "opset": opset,
                             "ir_version": model.ir_version, **hints})


# --- entry point ---------------------------------------------------------------------------

def export_onnx(checkpoint: Checkpoint, *, plan: ExportPlan, output: Path, overwrite: bool = False) -> Bundle:
    """Write an ONNX bundle for `plan` to `output` and return it (loaded, files checked)."""
    methods = graph_methods(plan)
    # a recipe the format cannot write fails before the slow load
    schemes = {method: _scheme(method, plan.recipe) for method in methods}
    with progress_bar("Loading the checkpoint", total=None):
        lm = load_in_checkpoint_dtype(checkpoint)  # bf16 weights; each graph upcasts its own modules
    vocab_size = lm.config.text_config.vocab_size
    use_fusable_norms_(lm)  # one SimplifiedLayerNormalization per norm once onnxruntime loads a graph
    output = Path(output)
    with BundleWriter(output, overwrite=overwrite) as writer:
        scratch = writer.scratch_dir()
        built: list[BuiltGraph] = []
        with progress_bar("Exporting ONNX graphs", total=2 * len(methods)) as advance:
            for method in methods:
                advance(0, description=f"Tracing {method}")
                spec = _SPECS[method](lm, plan)
                hints = _runner_hints(getattr(spec.module, "encoder", spec.module))
                with _placeholder_tables(spec, schemes[method], plan.recipe) as tables:
                    upcast_(spec.module)
                    raw = export_graph(spec, scratch / f"{method}.onnx")
                if method == METHOD_TEXT_DECODER:
                    add_logits_to_keep(raw)
                del spec
                _release_exported_modules(lm, method)
                if method == methods[-1]:
                    lm = None  # the decoder's fp32 weights go before its graph is quantized
                gc.collect()
                advance(1, description=f"Quantizing {method}")
                file = L.GRAPH_FILES[method]
                _finish_graph(raw, writer.path_for(file), method=method, scheme=schemes[method], tables=tables,
                              lm_head=_lm_head_block(method, plan.recipe, vocab_size))
                del tables
                raw.unlink()
                raw.with_name(raw.name + ".data").unlink(missing_ok=True)
                built.append(BuiltGraph(method, file, _recorded_scheme(method, schemes[method], plan.recipe),
                                        hints))
                advance(1)
        bundle_metadata.copy_tokenizer_files(checkpoint, writer)
        manifest = _manifest(checkpoint, plan, writer.temp_dir, built)
        genai_config.write(writer, manifest=manifest, checkpoint=checkpoint, plan=plan)
        return writer.finalize(manifest)


def _release_exported_modules(lm, method: str) -> None:
    """Drop the loaded model's modules that only `method`'s graph reads, now that it is
    traced, so they are not held (upcast to fp32) while the decoder is exported. E2B's
    per-layer table is 4.7 GB in bf16 (the quantizer still holds it until the embedding
    graph is written); the towers are 1.9 GB once upcast."""
    model = lm.model
    if method == METHOD_TOKEN_EMBEDDING:
        model.language_model.embed_tokens_per_layer = None  # the decoder takes its rows as an input
    elif method == METHOD_VISION_ENCODER:
        model.vision_tower = model.embed_vision = None
    elif method == METHOD_AUDIO_ENCODER:
        model.audio_tower = model.embed_audio = None


def _manifest(checkpoint: Checkpoint, plan: ExportPlan, root: Path, built: list[BuiltGraph]) -> Manifest:
    return bundle_metadata.manifest_for(
        checkpoint, plan, methods=tuple(_method_spec(g.method, root / g.file, g.extra) for g in built),
        quant_schemes={g.method: g.scheme for g in built}, extra={"genai_config": L.GENAI_CONFIG_FILE},
    )
