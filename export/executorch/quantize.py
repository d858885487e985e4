"""Apply an edgekit recipe to the modules of an ExecuTorch export with torchao.

    scheme (edgekit.recipes)                     torchao config
    int4/int8 weights + int8 dynamic activations Int8DynamicActivationIntxWeightConfig (linears)
    int2/int4/int8 weights, float activations     IntxWeightOnlyConfig (embedding tables only)
    fp32                                          untouched

Weight-only linears are refused: on XNNPACK they give wrong outputs and no smaller file
(docs/export-notes.md), and edgekit.formats keeps them out of the executorch recipes.
Quantization parameters use the "affine" algorithm: the default hqq_scale_only took ~350 s
on a 0.89 B model against 18 s (docs/export-notes.md).

Modules are quantized in place (the loaded model is consumed). A linear whose input width
is not a multiple of its group size stays in float and is reported (tiny test models
only: every released E2B/E4B linear is a multiple of 128).

Tables keep their scales in the scheme's scale width: a 16-bit scheme stores the table as fp16
(fp16 scales, fp16 rows cast to fp32 after the lookup), which ExecuTorch fuses into
`embedding_{2,4}bit.dtype` / `embedding_byte.dtype`. (fp16 scales under an fp32 table pick the
plain `embedding_4bit` kernel, which reads the fp16 scales as fp32: inf/nan out.)

Weights may arrive in the checkpoint's bf16 (edgekit.export.lazy_upcast): each linear is
upcast to fp32 just before it is quantized, and a table one column block at a time (to its
storage type), so at most one module or block exists upcast at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from edgekit.errors import ExportError
from edgekit.export.lazy_upcast import release_pages, upcast_
from edgekit.models.family import PER_LAYER_EMBEDDING
from edgekit.recipes import QuantScheme, Recipe

# torchao's embedding quantization overflows int32 on the full 2.35 B-element E2B
# per-layer table (docs/export-notes.md, after ExecuTorch's gemma4 example): tables
# above this many elements are split by columns into parts quantized one at a time.
# 2**28 elements keeps each part's fp32 copy at 1 GiB (E2B's table: 9 parts).
MAX_TABLE_ELEMENTS = 2**28


@dataclass
class QuantReport:
    """What one method got: scheme name per weight kind, counts, and what stayed float."""

    schemes: dict[str, str] = field(default_factory=dict)  # kind -> scheme name
    quantized: int = 0
    kept_float: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"schemes": dict(self.schemes), "quantized_modules": self.quantized,
                "float_modules": list(self.kept_float)}


def _config(scheme: QuantScheme, *, embedding: bool):
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quantize_.workflows.intx.intx_choose_qparams_algorithm import (
        IntxChooseQParamsAlgorithm,
    )

    dtype = {2: torch.int2, 4: torch.int4, 8: torch.int8}.get(scheme.weight_bits)
    if dtype is None or (dtype is torch.int2 and not embedding):
        raise ExportError(f"scheme {scheme.name}: ExecuTorch export supports 4- or 8-bit linears and "
                          "2-, 4- or 8-bit embedding tables")
    granularity = PerGroup(scheme.group_size) if scheme.group_size else PerAxis(0)
    affine = IntxChooseQParamsAlgorithm.AFFINE
    if scheme.activations == "int8_dynamic":
        if embedding:
            raise ExportError(f"scheme {scheme.name} quantizes activations; embedding tables take weight-only schemes")
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=dtype, weight_granularity=granularity,
                                                     intx_choose_qparams_algorithm=affine)
    if not embedding:
        raise ExportError(f"scheme {scheme.name} is weight-only; on XNNPACK weight-only linears give wrong "
                          "outputs (use an 8da4w / 8da8w recipe)")
    return IntxWeightOnlyConfig(weight_dtype=dtype, granularity=granularity, intx_choose_qparams_algorithm=affine,
                                scale_dtype=table_dtype(scheme))


def table_dtype(scheme: QuantScheme) -> torch.dtype:
    """The float type a quantized table is stored and looked up in: its scales' width."""
    return torch.float16 if scheme.scale_bits == 16 else torch.float32


def quantize_linears(module: nn.Module, *, recipe: Recipe, component: str, lm_head: nn.Module | None = None,
                     report: QuantReport) -> None:
    """Quantize the nn.Linear modules of `module` by `recipe`: "<component>.lm_head" for
    `lm_head`, "<component>.linear" for the others."""
    from torchao.quantization import quantize_

    linears = [(name, m) for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    for kind in ("linear", "lm_head"):
        targets = [(name, m) for name, m in linears if (m is lm_head) == (kind == "lm_head")]
        if not targets:
            continue
        scheme = recipe.scheme_for(component, kind)
        report.schemes[kind] = scheme.name
        if not scheme.quantized:
            continue
        config, group = _config(scheme, embedding=False), scheme.group_size
        chosen = set()
        for name, m in targets:
            if group is None or m.in_features % group == 0:
                chosen.add(id(m))
            else:
                report.kept_float.append(f"{name} (in_features {m.in_features} % {group})")
        for _name, m in targets:  # one at a time: only this module is ever in fp32
            if id(m) in chosen:
                upcast_(m)
                quantize_(module, config, filter_fn=lambda x, _fqn, m=m: x is m)
        report.quantized += len(chosen)


def quantize_table(embedding: nn.Embedding, *, scheme: QuantScheme, report: QuantReport, kind_key: str,
                   max_elements: int = MAX_TABLE_ELEMENTS) -> nn.Module:
    """A quantized version of an embedding table (returned; the caller puts it in place):
    a ColumnSplitEmbedding of quantized column blocks, one block when the table is under
    `max_elements`."""
    from torchao.quantization import quantize_

    report.schemes[kind_key] = scheme.name
    if not scheme.quantized:
        return embedding
    config = _config(scheme, embedding=True)
    if scheme.group_size and embedding.weight.shape[1] % scheme.group_size:
        report.kept_float.append(f"{kind_key} (width {embedding.weight.shape[1]} % {scheme.group_size})")
        return embedding

    def quantized(part: nn.Embedding) -> nn.Embedding:
        quantize_(part, config, filter_fn=lambda m, _fqn: m is part)
        report.quantized += 1
        return part

    return ColumnSplitEmbedding.of(embedding, max_elements=max_elements, multiple=scheme.group_size or 1,
                                   dtype=table_dtype(scheme), prepare=quantized)


class ColumnSplitEmbedding(nn.Module):
    """An embedding table stored as column blocks, each under the quantizer's size limit.

    Looks up every block and concatenates, casts to fp32 and multiplies by the table's own
    scale (Gemma 4's tables scale their rows: Gemma4TextScaledWordEmbedding.embed_scale).
    """

    def __init__(self, parts: list[nn.Embedding], scale: float) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.scale = scale

    @classmethod
    def of(cls, table: nn.Embedding, *, max_elements: int, multiple: int, dtype: torch.dtype = torch.float32,
           prepare=lambda part: part) -> "ColumnSplitEmbedding":
        """`table` cut into `dtype` column blocks of at most `max_elements`; each block goes
        through `prepare` (the quantizer) before the next is made."""
        rows, cols = table.weight.shape
        width = max(multiple, (max_elements // rows) // multiple * multiple)
        parts = []
        for start in range(0, cols, width):
            block = table.weight.detach()[:, start:start + width].to(dtype, copy=True)
            release_pages(table.weight)  # the bf16 rows just read (a mapped checkpoint's pages)
            part = nn.Embedding(rows, block.shape[1], _weight=block)
            part.weight.requires_grad_(False)
            parts.append(prepare(part))
        scale = float(getattr(table, "scalar_embed_scale", 1.0))
        return cls(parts, scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.parts[0](ids) if len(self.parts) == 1 else torch.cat([part(ids) for part in self.parts], dim=-1)
        return rows.float() * self.scale


def quantize_token_embedding(packed, *, recipe: Recipe, report: QuantReport,
                             max_elements: int = MAX_TABLE_ELEMENTS) -> None:
    """Quantize the token and per-layer tables of a PackedTokenEmbedding in place."""
    from edgekit.manifest import METHOD_TOKEN_EMBEDDING

    tokens = packed.tokens
    scheme = recipe.scheme_for(METHOD_TOKEN_EMBEDDING, "embedding")
    tokens.embed_tokens = quantize_table(tokens.embed_tokens, scheme=scheme, report=report,
                                         kind_key="embedding", max_elements=max_elements)
    if tokens.embed_tokens_per_layer is not None:
        scheme = recipe.scheme_for(PER_LAYER_EMBEDDING, "embedding")
        tokens.embed_tokens_per_layer = quantize_table(tokens.embed_tokens_per_layer, scheme=scheme, report=report,
                                                       kind_key=PER_LAYER_EMBEDDING, max_elements=max_elements)
