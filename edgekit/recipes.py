"""Quantization recipes: frozen data saying what to quantize and how, by name.

A recipe is an ordered tuple of rules matched against a weight key
`"<component>.<kind>"` (e.g. `"text_decoder.linear"`, `"per_layer_embedding.embedding"`);
the first match wins and anything unmatched keeps the recipe's float dtype. A recipe
says nothing about backends, packing or tensor subclasses: applying it is the
exporters' job, and which formats accept which recipe lives in `edgekit.formats`.
Modelled on pytorch/executorch extension/llm/export/quant/recipe.py (QuantRule,
QuantRecipe: first match wins).

Weight kinds (see `edgekit.models.family.ComponentParams`): `embedding` (gathered tables), `linear`
(matmul weights), `lm_head` (the output projection, stored in the decoder even when tied
to the token embedding), `other` (norms, convolutions, biases, position tables: small,
always left in float).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Literal

from edgekit.registry import Registry
from edgekit.models.family import PER_LAYER_EMBEDDING

WeightKind = Literal["embedding", "linear", "lm_head", "other"]
WEIGHT_KINDS: tuple[str, ...] = ("embedding", "linear", "lm_head", "other")

# --- schemes: how one tensor is stored --------------------------------------------------


@dataclass(frozen=True)
class QuantScheme:
    """Storage of one weight tensor. `group_size=None` on a quantized scheme: per channel."""

    name: str
    weight_bits: int
    group_size: int | None = None
    activations: Literal["float", "int8_dynamic"] = "float"
    scale_bits: int = 16
    zero_point_bits: int = 0  # 0: symmetric

    @property
    def quantized(self) -> bool:
        return self.weight_bits < 16

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight, scale and zero-point overhead included.

        Per-channel overhead is left out: one fp16 scale per row of >= 1024 weights
        adds < 0.02 bits.
        """
        if not self.quantized or self.group_size is None:
            return float(self.weight_bits)
        return self.weight_bits + (self.scale_bits + self.zero_point_bits) / self.group_size


FP32 = QuantScheme("fp32", 32)
FP16 = QuantScheme("fp16", 16)


def _w4a8(group: int) -> QuantScheme:
    # torchao Int8DynamicActivationIntxWeightConfig(weight_dtype=int4, PerGroup(g)): symmetric
    # int4, one fp16 scale per group: 4 + 16/32 = 4.5 bits at group 32.
    return QuantScheme(f"8da4w-g{group}", 4, group, activations="int8_dynamic")


def _int4_blockwise(block: int) -> QuantScheme:
    # ONNX Runtime MatMulNBits, symmetric (no zero points); its scales take the graph's float
    # type, fp32 on CPU: 4 + 32/32 = 5 bits at block 32.
    return QuantScheme(f"int4-b{block}", 4, block, scale_bits=32)


def _int4_table(block: int) -> QuantScheme:
    # ONNX Runtime GatherBlockQuantized, symmetric, fp16 scales (the rows are cast to fp32
    # after the lookup): 4 + 16/32 = 4.5 bits at block 32, 0.17 GB less than fp32 scales on
    # E2B's 2.75 B table parameters.
    return QuantScheme(f"int4-emb-b{block}", 4, block, scale_bits=16)


def _int8_blockwise(block: int) -> QuantScheme:
    # ONNX Runtime MatMulNBits bits=8, symmetric, fp32 scales: 8 + 32/128 = 8.25 bits at
    # block 128. Block 128 rather than per channel: the operator quantizes along K in
    # power-of-two blocks; at 8 bits the block barely moves the error, and 128 ran a one-token
    # 1536 x 8192 MatMul in 0.28 ms against 0.64 ms at block 32 (x86, 2 threads).
    return QuantScheme(f"int8-b{block}", 8, block, scale_bits=32)


def _int8_table(block: int) -> QuantScheme:
    # ONNX Runtime GatherBlockQuantized bits=8 (uint8 rows, values offset by 128), symmetric,
    # fp16 scales as the int4 tables: 8 + 16/128 = 8.125 bits at block 128.
    return QuantScheme(f"int8-emb-b{block}", 8, block, scale_bits=16)


W8A8 = QuantScheme("8da8w", 8, None, activations="int8_dynamic")  # per-channel int8
INT8_WEIGHT_ONLY = QuantScheme("int8", 8, None)  # per-channel (per-row for tables)
INT4_EMB_G32 = QuantScheme("int4-emb-g32", 4, 32)  # symmetric 4-bit rows, fp16 scale per 32
# Symmetric 2-bit rows (levels -2..1), fp16 scale per 64: 2.25 bits. Loses far more than
# 4-bit (a Gaussian row keeps cosine ~0.89 against ~0.995), so only the size-first recipe
# uses it, on the per-layer table alone (ExecuTorch's embedding_2bit kernel).
INT2_EMB_G64 = QuantScheme("int2-emb-g64", 2, 64)


# --- recipes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """`pattern` is an fnmatch glob over `"<component>.<kind>"`."""

    pattern: str
    scheme: QuantScheme


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    rules: tuple[Rule, ...]
    float_dtype: Literal["fp32", "fp16"] = "fp16"  # unmatched weights (the KV cache dtype is the format's)
    _float: QuantScheme = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_float", FP32 if self.float_dtype == "fp32" else FP16)

    def scheme_for(self, component: str, kind: str) -> QuantScheme:
        """The scheme of weights of `kind` in `component`: first matching rule wins."""
        key = weight_key(component, kind)
        for rule in self.rules:
            if fnmatchcase(key, rule.pattern):
                return rule.scheme
        return self._float

    def bits_for(self, component: str, kind: str) -> float:
        return self.scheme_for(component, kind).bits_per_weight

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "description": self.description,
            "float_dtype": self.float_dtype,
            "rules": [{"pattern": r.pattern, "scheme": r.scheme.name,
                       "bits_per_weight": r.scheme.bits_per_weight} for r in self.rules],
        }


def weight_key(component: str, kind: str) -> str:
    """The name rules match: `"<component>.<kind>"`."""
    return f"{component}.{kind}"


def _w4a8_recipe(group: int) -> Recipe:
    return Recipe(
        f"8da4w-g{group}" if group != 32 else "8da4w",
        f"decoder linears int4 (group {group}) with int8 dynamic activations; embeddings int8; "
        "audio/vision linears 8da8w",
        (
            Rule("*_embedding.embedding", INT8_WEIGHT_ONLY),
            Rule("text_decoder.linear", _w4a8(group)),
            Rule("text_decoder.lm_head", _w4a8(group)),
            Rule("*_encoder.linear", W8A8),
        ),
    )


def _int4_recipe(block: int, head_block: int | None = None, name: str | None = None) -> Recipe:
    head_block = head_block or block
    head = f", lm_head block {head_block}" if head_block != block else ""
    return Recipe(
        name or (f"int4-b{block}" if block != 32 else "int4"),
        f"int4 block-wise weights (block {block}{head}) for decoder linears, lm_head and embedding "
        "tables; audio/vision linears int8 weight-only (block 128)",
        (
            Rule("*_embedding.embedding", _int4_table(block)),
            Rule("text_decoder.linear", _int4_blockwise(block)),
            Rule("text_decoder.lm_head", _int4_blockwise(head_block)),
            # The towers are ~9% of E2B: int8 keeps their error small for ~0.2 GB.
            Rule("*_encoder.linear", _int8_blockwise(128)),
        ),
    )


def _int4_ple2_recipe(name: str, *, towers_bits: int) -> Recipe:
    """Size first: 2-bit per-layer rows (block 64), 4-bit token rows (block 32) and decoder
    (block 128); the towers int4 (block 32) or int8 (block 128)."""
    towers = _int4_blockwise(32) if towers_bits == 4 else _int8_blockwise(128)
    return Recipe(
        name,
        f"size first{', towers at 8 bits' if towers_bits == 8 else ''}: per-layer table int2 (block 64), token "
        f"table int4 (block 32), decoder int4 (block 128), audio/vision int{towers_bits} "
        f"(block {32 if towers_bits == 4 else 128})",
        (
            Rule(f"{PER_LAYER_EMBEDDING}.embedding", INT2_EMB_G64),
            Rule("*_embedding.embedding", _int4_table(32)),
            Rule("text_decoder.linear", _int4_blockwise(128)),
            Rule("text_decoder.lm_head", _int4_blockwise(128)),
            Rule("*_encoder.linear", towers),
        ),
    )


RECIPES: Registry[Recipe] = Registry("quantization recipe", (
    Recipe("fp32", "no quantization, fp32 weights and KV cache", (Rule("*", FP32),), float_dtype="fp32"),
    Recipe("fp16", "no quantization, fp16 weights and KV cache", (Rule("*", FP16),)),
    _w4a8_recipe(32),
    _w4a8_recipe(64),
    _w4a8_recipe(128),
    Recipe(
        "8da8w",
        "int8 per-channel weights with int8 dynamic activations for all linears; embeddings int8",
        (Rule("*_embedding.embedding", INT8_WEIGHT_ONLY), Rule("*.linear", W8A8), Rule("*.lm_head", W8A8)),
    ),
    # Android default. Embeddings dominate E2B (2.75 B of 5.1 B parameters), so int4 rows
    # save ~1.4 GB over int8 (docs/export-notes.md: 973 MB -> 731 MB at 4 layers).
    # Vision keeps 8-bit weights through 8da8w: weight-only linears give wrong outputs on
    # XNNPACK (docs/export-notes.md).
    Recipe(
        "8da4w-emb4",
        "decoder 8da4w (group 32), embeddings int4 weight-only (group 32), audio and vision 8da8w",
        (
            Rule("*_embedding.embedding", INT4_EMB_G32),
            Rule("text_decoder.linear", _w4a8(32)),
            Rule("text_decoder.lm_head", _w4a8(32)),
            Rule("audio_encoder.linear", W8A8),
            Rule("vision_encoder.linear", W8A8),
        ),
    ),
    # Size first: E2B with every tower in <= 2.5 GB (the class of LiteRT-LM's 2.58 GB bundle).
    # 4-bit everywhere still leaves E2B at ~3 GB (its 2.35 B per-layer table alone is 1.2 GB);
    # only 2-bit per-layer rows get under, plus group 128 and 4-bit audio linears.
    Recipe(
        "8da4w-ple2",
        "size first: per-layer table int2 (group 64), token table int4 (group 32), decoder and "
        "audio 8da4w (group 128 / 32), vision 8da8w",
        (
            Rule(f"{PER_LAYER_EMBEDDING}.embedding", INT2_EMB_G64),
            Rule("*_embedding.embedding", INT4_EMB_G32),
            Rule("text_decoder.linear", _w4a8(128)),
            Rule("text_decoder.lm_head", _w4a8(128)),
            Rule("audio_encoder.linear", _w4a8(32)),
            Rule("vision_encoder.linear", W8A8),
        ),
    ),
    Recipe(
        "int8",
        "int8 block-wise weights (block 128) for every linear, the lm_head and the embedding tables; "
        "activations stay float",
        (Rule("*.embedding", _int8_table(128)), Rule("*.linear", _int8_blockwise(128)),
         Rule("*.lm_head", _int8_blockwise(128))),
    ),
    # Core ML's per-channel int8 (coremltools' linear_quantize_weights per_channel): one scale
    # per output row. ONNX's MatMulNBits quantizes along K in blocks, so ONNX keeps int8.
    Recipe(
        "int8-channel",
        "int8 per-channel weights (one scale per output row) for every linear and the lm_head; "
        "embedding tables int8 per row; activations stay float",
        (Rule("*.embedding", INT8_WEIGHT_ONLY), Rule("*.linear", INT8_WEIGHT_ONLY), Rule("*.lm_head", INT8_WEIGHT_ONLY)),
    ),
    _int4_recipe(32),
    _int4_recipe(64),
    _int4_recipe(128),
    _int4_recipe(32, 128, name="int4-head128"),
    # ONNX's size-first recipe, as 8da4w-ple2 is ExecuTorch's: 2-bit per-layer rows
    # (GatherBlockQuantized bits=2) and every linear int4, the encoders too.
    _int4_ple2_recipe("int4-ple2", towers_bits=4),
    # int4-ple2 with the towers at 8 bits as in int4: 4-bit towers save 0.2 GB of E2B and
    # cost them accuracy on random weights (Core ML, tiny-e2b: audio cosine 0.934 against
    # 0.9999). Full E2B with every tower in 2.58 GB on Core ML (bench/RESULTS.md section 17).
    _int4_ple2_recipe("int4-ple2-t8", towers_bits=8),
))


def get_recipe(name: str) -> Recipe:
    """Look a recipe up by name; unknown names list the known ones (InputError)."""
    return RECIPES.get(name)
