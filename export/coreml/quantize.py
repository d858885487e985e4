"""A recipe's linear weights in Core ML: coremltools' post-training weight compression.

Weight-only, symmetric, as the recipe says: int8 per channel or per block, int4 per block
(constexpr_blockwise_shift_scale, iOS 18). Only weights that feed a `linear` are compressed:
norms, convolutions and the exact rotate-half permutations stay float. Activations stay
float16 (Core ML has no dynamic int8 activations: the 8da* recipes are not offered).
"""

from __future__ import annotations

from typing import Any

from edgekit.errors import ExportError
from edgekit.recipes import QuantScheme, Recipe

# Consts that feed a linear but must stay exact: the signed permutations rope uses.
KEEP_FLOAT_PREFIXES = ("rotate_half_",)
LM_HEAD_PREFIX = "lm_head"


def linear_config(scheme: QuantScheme) -> Any | None:
    """coremltools' quantizer config for `scheme`; None keeps the weights float."""
    if not scheme.quantized:
        return None
    if scheme.activations != "float" or scheme.weight_bits not in (4, 8) or scheme.zero_point_bits:
        raise ExportError(f"Core ML cannot store {scheme.name} weights (weight-only symmetric int4 / int8 only)")
    from coremltools.optimize.coreml import OpLinearQuantizerConfig

    if scheme.group_size is None:
        return OpLinearQuantizerConfig(mode="linear_symmetric", dtype=f"int{scheme.weight_bits}",
                                       granularity="per_channel", weight_threshold=0)
    return OpLinearQuantizerConfig(mode="linear_symmetric", dtype=f"int{scheme.weight_bits}",
                                   granularity="per_block", block_size=scheme.group_size, weight_threshold=0)


def stored_schemes(model, *, recipe: Recipe, component: str) -> str:
    """What the linears of `model` hold, "+"-joined: the recipe's scheme where coremltools
    compressed the weight, the float type where it left it (a block that does not divide the
    input width: tiny test models' 16-wide per-layer projections)."""
    float_name = "fp32" if recipe.float_dtype == "fp32" else "fp16"
    found: dict[str, None] = {}
    for function in model._mil_program.functions.values():
        for op in function.operations:
            if op.op_type != "linear":
                continue
            source = op.weight.op
            if source is not None and source.op_type.startswith("constexpr_"):
                kind = "lm_head" if op.weight.name.startswith(LM_HEAD_PREFIX) else "linear"
                found[recipe.scheme_for(component, kind).name] = None
            elif not (source is not None and source.name.startswith(KEEP_FLOAT_PREFIXES)):
                found[float_name] = None
    return "+".join(found) or float_name


def compress_linears(model, *, recipe: Recipe, component: str):
    """`model` (an MLModel) with the weights of its linears stored as `recipe` says for `component`."""
    linear = linear_config(recipe.scheme_for(component, "linear"))
    head = linear_config(recipe.scheme_for(component, "lm_head"))
    if linear is None and head is None:
        return model
    from coremltools.optimize.coreml import OptimizationConfig, linear_quantize_weights

    names: dict[str, Any] = {}
    for function in model._mil_program.functions.values() if model._mil_program else ():
        for op in function.operations:
            if op.op_type == "const" and op.name.startswith(KEEP_FLOAT_PREFIXES):
                names[op.name] = None
            elif op.op_type == "const" and op.name.startswith(LM_HEAD_PREFIX):
                names[op.name] = head
    config = OptimizationConfig(op_type_configs={"linear": linear}, op_name_configs=names)
    return linear_quantize_weights(model, config)
