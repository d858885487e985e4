"""ExecuTorch bundle exporter: one multi-method model.pte for XNNPACK, quantized by the plan's recipe.

    checkpoint ─► transformers model, weights in the checkpoint's bf16 (lazy_upcast.py)
        ─► method modules (methods.py) ─► quantize per component, each weight upcast to
        fp32 just before (quantize.py) ─► pad-id PLE row appended to the encoders
        ─► strict torch.export per method ─► one to_edge_transform_and_lower ─► model.pte
        ─► bundle (manifest, tokenizer files)

How the per-layer embeddings reach the decoder without a third input: methods.py (the
packed embeds; the manifest says so under extra["packed_ple"]). The KV cache is inside
text_decoder (export/components/static_kv_decoder.py); metadata methods: metadata.py.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import torch

from edgekit.bundle import Bundle, BundleWriter
from edgekit.export import bundle_metadata
from edgekit.export.executorch import methods as M
from edgekit.export.executorch.lower import export_method, lower_to_pte, xnnpack_partitioner
from edgekit.export.executorch.metadata import METADATA_METHODS, constant_methods
from edgekit.export.executorch.quantize import QuantReport, quantize_linears, quantize_token_embedding
from edgekit.export.lazy_upcast import load_in_checkpoint_dtype, upcast_
from edgekit.manifest import (METHOD_AUDIO_ENCODER, METHOD_AUDIO_PREPROCESSOR, METHOD_TEXT_DECODER,
                              METHOD_TOKEN_EMBEDDING, METHOD_VISION_ENCODER, Manifest, MethodSpec)
from edgekit.checkpoint import Checkpoint
from edgekit.compute_shapes import prefill_chunk
from edgekit.plan import ExportPlan
from edgekit.progress import progress_bar
from edgekit.runtimes.image_preprocess import ImageParams

PTE_FILE = "model.pte"
# --external-weights: ExecuTorch's named data, loaded beside the program; lower_to_pte writes
# it as the .pte's stem + ".ptd" (the external-constant tag), so the name is derived, not repeated.
PTD_FILE = str(Path(PTE_FILE).with_suffix(".ptd"))


def max_seq_len(text_config, plan: ExportPlan) -> int:
    """Most tokens one text_decoder call takes: edgekit.compute_shapes.prefill_chunk (PREFILL_CHUNK,
    never more than the sliding window, which keeps a sliding layer's ring under two windows:
    window + chunk - 1 slots; for the released models both are 512), but at least the vision
    budget: ExecuTorch's stock runner feeds an image's soft tokens in one call."""
    return prefill_chunk(text_config.to_dict(), plan.context_length, whole_input_tokens=plan.whole_input_tokens)


# --- methods -------------------------------------------------------------------------------

def build_methods(lm, plan, *, seq_len: int, image: ImageParams | None = None
                  ) -> tuple[dict[str, M.MethodBuild], dict[str, QuantReport]]:
    """The methods `plan` asks for, quantized by its recipe, every float weight in fp32.

    `lm` is consumed: its modules are quantized in place and its embedding tables dropped
    once the methods hold their own. It may come in the checkpoint's bf16
    (edgekit.export.lazy_upcast): the largest float weights are quantized first, so the
    fp32 copies never pile up.
    """
    recipe = plan.recipe
    image = image or ImageParams(max_soft_tokens=plan.vision_token_budget)  # the processor's defaults
    reports = {name: QuantReport() for name in (METHOD_TOKEN_EMBEDDING, METHOD_TEXT_DECODER,
                                                 METHOD_VISION_ENCODER, METHOD_AUDIO_ENCODER)}
    builds = {METHOD_TOKEN_EMBEDDING: M.token_embedding(lm, max_seq_len=seq_len),
              METHOD_TEXT_DECODER: M.text_decoder(lm, max_context=plan.context_length, max_seq_len=seq_len,
                                                  llm_ops=True)}
    if "vision" in plan.modalities:
        builds[METHOD_VISION_ENCODER] = M.vision_encoder(lm, budget=plan.vision_token_budget, image=image)
    if "audio" in plan.modalities:
        builds[METHOD_AUDIO_ENCODER] = M.audio_encoder(lm)

    decoder = builds[METHOD_TEXT_DECODER].module.decoder
    quantize_linears(decoder, recipe=recipe, component=METHOD_TEXT_DECODER, lm_head=decoder.lm_head,
                     report=reports[METHOD_TEXT_DECODER])
    quantize_token_embedding(builds[METHOD_TOKEN_EMBEDDING].module, recipe=recipe,
                             report=reports[METHOD_TOKEN_EMBEDDING])
    _release_tables(lm)
    upcast_(builds[METHOD_TOKEN_EMBEDDING].module)
    hidden = M.Widths.of(lm).hidden
    row = M.pad_row(builds[METHOD_TOKEN_EMBEDDING].module, lm.config.text_config.pad_token_id, hidden)
    for name in (METHOD_VISION_ENCODER, METHOD_AUDIO_ENCODER):
        if name in builds:
            quantize_linears(builds[name].module, recipe=recipe, component=name, report=reports[name])
            M.pack_encoder(builds[name], row)
    for build in builds.values():
        upcast_(build.module)  # norms, convolutions, linears a recipe keeps float
    gc.collect()
    return builds, {name: reports[name] for name in builds}


def _release_tables(lm) -> None:
    """Drop the loaded model's own references to the embedding tables (and the lm_head tied
    to one): the methods hold quantized copies now, and E2B's per-layer table alone is
    4.7 GB in bf16."""
    text = lm.model.language_model
    text.embed_tokens = None
    text.embed_tokens_per_layer = None
    lm.lm_head = None
    gc.collect()


# --- entry point ---------------------------------------------------------------------------

def export_executorch(checkpoint: Checkpoint, *, plan: ExportPlan, output: Path, overwrite: bool = False) -> Bundle:
    """Write an ExecuTorch bundle for `plan` to `output` and return it (loaded, files checked)."""
    started = time.monotonic()
    with progress_bar("Loading the checkpoint", total=None):
        lm = load_in_checkpoint_dtype(checkpoint)  # bf16 weights, upcast one module at a time
    seq_len = max_seq_len(lm.config.text_config, plan)
    vocab_size = lm.config.text_config.vocab_size
    tokens = bundle_metadata.special_tokens(checkpoint)
    output = Path(output)
    with BundleWriter(output, overwrite=overwrite) as writer:
        with progress_bar("Exporting ExecuTorch program", total=3) as advance:
            advance(0, description="Quantizing")
            with torch.no_grad():
                image = ImageParams.from_dict(bundle_metadata.image_preprocessing(
                    checkpoint, max_soft_tokens=plan.vision_token_budget).model_dump())
                builds, reports = build_methods(lm, plan, seq_len=seq_len, image=image)
                if "audio" in plan.modalities:  # waveform -> log-mel; no weights, nothing to quantize
                    builds[METHOD_AUDIO_PREPROCESSOR] = M.audio_preprocessor(checkpoint)
                    reports[METHOD_AUDIO_PREPROCESSOR] = QuantReport(schemes={"transform": "fp32"})
            advance(1, description="Tracing methods")
            programs = {name: export_method(build) for name, build in builds.items()}
            # The programs hold every weight now; what the eager modules kept (E2B's quantized
            # decoder and tables: ~3 GB) would otherwise sit beside lowering's own copies.
            for build in builds.values():
                build.module = None
            del lm
            gc.collect()
            advance(1, description=f"Lowering to {plan.backend}")
            lowered = lower_to_pte(
                programs, partitioners={name: [xnnpack_partitioner()] for name in programs},
                out=writer.path_for(PTE_FILE), external_weights=plan.external_weights,
                constant_methods=constant_methods(tokens=tokens, vocab_size=vocab_size, max_seq_len=seq_len,
                                                  max_context=plan.context_length))
            advance(1)
        bundle_metadata.copy_tokenizer_files(checkpoint, writer)
        manifest = _manifest(checkpoint, plan, builds, reports, lowered, tokens=tokens, seq_len=seq_len,
                             seconds=time.monotonic() - started)
        return writer.finalize(manifest)


def _manifest(checkpoint: Checkpoint, plan, builds, reports, lowered, *, tokens, seq_len: int,
              seconds: float) -> Manifest:
    widths = M.Widths.of_config(checkpoint.text_config)
    methods = tuple(
        MethodSpec(name=name, file=PTE_FILE, inputs=b.inputs, outputs=b.outputs,
                   extra={**b.hints, "quantization": reports[name].to_dict(),
                          "delegates": lowered[name].delegates, "kernels": list(lowered[name].kernels),
                          "planned_memory_bytes": lowered[name].planned_bytes})
        for name, b in builds.items())
    schemes = {name: "+".join(dict.fromkeys(r.schemes.values())) for name, r in reports.items()}
    return bundle_metadata.manifest_for(
        checkpoint, plan, methods=methods, quant_schemes=schemes, tokens=tokens,
        extra={
            "program": PTE_FILE,
            **({"program_data": PTD_FILE} if plan.external_weights else {}),
            "metadata_methods": list(METADATA_METHODS),
            "max_seq_len": seq_len,
            M.PACKED_LAYOUT: {"embedding": [0, widths.hidden], "per_layer_inputs": [widths.hidden, widths.packed],
                              "soft_token_rows": "pad id", "note": "embeds = concat(input embedding, PLE rows)"},
            "kv_cache_dtype": "float32",
            # Embedding tables (the PLE table is most of E2B) are read in place from the file:
            # load the program memory-mapped without mlock, or they become resident.
            "program_load": "mmap",
            "export_seconds": round(seconds, 1),
        },
    )
