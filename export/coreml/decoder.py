"""The Core ML text decoder: one multifunction ML program, `prefill` and `decode`, KV caches as states.

    prefill(inputs_embeds [1,C,H], per_layer_inputs [1,C,L*P], cache_position int32 [C],
            last_index int32 [1]) -> logits [1,V]        C = the fixed prefill chunk
    decode (inputs_embeds [1,1,H], per_layer_inputs [1,1,L*P], cache_position int32 [1],
            last_index int32 [1]) -> logits [1,V]

Both functions hold the same weights (coremltools' save_multifunction stores equal weights
once) and the same states: one fp16 K and one V per cache-owning layer, named k_cache_<i> /
v_cache_<i>, global layers `max_context` slots, sliding layers a ring of window + C - 1
(export/components/static_kv_decoder.py holds the math and its parity tests). The shared-KV
tail layers read their producers' states.

Core ML prefers fixed shapes (the Neural Engine takes nothing else), so prefill takes exactly
C tokens. A shorter chunk is padded after its tokens with any ids at the positions that follow,
and `last_index` names the last real token, whose logits come back. Padding is harmless: a
real token never attends to a later position, the next call overwrites the padded slots
before anything reads them, and a padded slot in the sliding ring is outside every later
token's window. A chunk whose padding would pass `max_context` is fed through decode instead.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from edgekit.export.components.static_kv_decoder import StaticKVDecoder
from edgekit.export.executorch.methods import Widths
# The names the runtime calls the functions and their inputs by.
from edgekit.runtimes.backends.coreml_backend import DECODE, DECODER_INPUTS, PREFILL


HEAD_ROWS_PER_PART = 16384


class SplitHead(nn.Module):
    """The tied lm_head as its own copy in the program's precision, in blocks of at most
    HEAD_ROWS_PER_PART vocabulary rows whose logits are concatenated.

    coremltools handles each weight constant whole: its fp16 pass checks an fp32 constant for
    overflow through np.where (about 33 bytes per element at once) and its int4 quantizer
    makes several float copies. E2B's 262144 x 1536 head as one constant took about 12 GB to
    convert, its blocks a few hundred MB each. (The Neural Engine also prefers narrow outputs.)"""

    def __init__(self, weight: torch.Tensor, *, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype
        self.parts = nn.ParameterList(nn.Parameter(rows.detach().to(dtype).clone(), requires_grad=False)
                                      for rows in weight.split(HEAD_ROWS_PER_PART))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        return torch.cat([F.linear(x, rows) for rows in self.parts], dim=-1).to(torch.float32)


class StatefulTextDecoder(StaticKVDecoder):
    """StaticKVDecoder with Core ML's input types (positions arrive as int32) and its lm_head
    split into row blocks in the program's precision (SplitHead)."""

    def __init__(self, lm, *, max_context: int, max_seq_len: int, precision: str) -> None:
        super().__init__(lm, max_context=max_context, max_seq_len=max_seq_len)
        self.lm_head = SplitHead(self.lm_head.weight,
                                 dtype=torch.float16 if precision == "float16" else torch.float32)
        # Rotary cos/sin as tables over every position, looked up by position: an fp16 program
        # that computes position x frequency is off by up to p * 2^-11 radians (0.3 at
        # position 700, 1.5 at 3000), while a table of fp16 cos/sin values is off by 2^-11.
        positions = torch.arange(max_context).unsqueeze(0)
        probe = torch.zeros(1, 1, dtype=torch.float32)
        for kind in set(self.layout.layer_types):
            cos, sin = self.text.rotary_emb(probe, positions, kind)
            self.register_buffer(f"rope_cos_{kind}", cos[0].float(), persistent=False)  # [positions, D]
            self.register_buffer(f"rope_sin_{kind}", sin[0].float(), persistent=False)

    def _rope(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        positions = position_ids.reshape(-1)
        return (getattr(self, f"rope_cos_{kind}").index_select(0, positions).unsqueeze(0),
                getattr(self, f"rope_sin_{kind}").index_select(0, positions).unsqueeze(0))

    def forward(self, inputs_embeds: torch.Tensor, per_layer_inputs: torch.Tensor, cache_position: torch.Tensor,
                last_index: torch.Tensor) -> torch.Tensor:
        return super().forward(inputs_embeds, per_layer_inputs, cache_position.long(), last_index=last_index.long())


def state_names(decoder: StaticKVDecoder) -> tuple[str, ...]:
    return tuple(f"{kv}_cache_{i}" for i in decoder.layout.owners for kv in ("k", "v"))


def convert_text_decoder(lm, *, max_context: int, chunk: int, precision: str, out: Path, scratch: Path,
                         compress: Callable[[object], object]) -> dict:
    """Convert, compress (`compress(MLModel) -> MLModel`) and save the decoder to `out`.

    Returns what the manifest says about it: functions, their chunk sizes and the states."""
    import coremltools as ct

    from edgekit.export.coreml.torch_ops import coremltools_quiet, register_index_copy

    register_index_copy()
    widths = Widths.of(lm)
    decoder = StatefulTextDecoder(lm, max_context=max_context, max_seq_len=chunk, precision=precision).eval()
    states = [ct.StateType(wrapped_type=ct.TensorType(shape=tuple(getattr(decoder, n).shape), dtype=np.float16),
                           name=n) for n in state_names(decoder)]
    functions = {DECODE: 1} if chunk == 1 else {PREFILL: chunk, DECODE: 1}
    descriptor = ct.utils.MultiFunctionDescriptor()
    for name, tokens in functions.items():
        example = (torch.zeros(1, tokens, widths.hidden), torch.zeros(1, tokens, widths.ple),
                   torch.arange(tokens, dtype=torch.int32), torch.tensor([tokens - 1], dtype=torch.int32))
        with torch.no_grad(), coremltools_quiet():
            traced = torch.jit.trace(decoder, example)
            model = ct.convert(
                traced, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                compute_precision=ct.precision.FLOAT16 if precision == "float16" else ct.precision.FLOAT32,
                inputs=[ct.TensorType(n, shape=tuple(x.shape), dtype=np.int32 if x.dtype == torch.int32 else np.float32)
                        for n, x in zip(DECODER_INPUTS, example)],
                outputs=[ct.TensorType("logits", dtype=np.float32)], states=states)
            del traced
            model = compress(model)
            path = scratch / f"{name}.mlpackage"
            model.save(str(path))
        del model
        gc.collect()
        descriptor.add_function(str(path), src_function_name="main", target_function_name=name)
    descriptor.default_function_name = DECODE
    with coremltools_quiet():
        ct.utils.save_multifunction(descriptor, str(out))
    return {
        "functions": functions,
        "states": {n: {"shape": list(getattr(decoder, n).shape), "dtype": "float16"} for n in state_names(decoder)},
        "kv_cache_slots": {kind: int(n) for kind, n in decoder.cache_slots.items()},
    }
