"""Next-token choice from logits, in numpy: greedy, or temperature + top-k + top-p sampling.

The warpers run in the order transformers' `generate` applies them
(transformers/generation/utils.py `_get_logits_processor`, v5.23), with their semantics
(transformers/generation/logits_process.py):

    logits [V] -> repetition penalty   RepetitionPenaltyLogitsProcessor: seen tokens' logit
                                       x penalty if < 0, / penalty otherwise
               -> greedy? argmax       (temperature == 0: do_sample=False)
               -> / temperature        TemperatureLogitsWarper
               -> top-k                TopKLogitsWarper: keep logits >= the k-th largest (ties kept)
               -> top-p                TopPLogitsWarper: keep the smallest set of most likely tokens
                                       whose probabilities sum to >= p; never fewer than one
               -> softmax -> one draw from Generator(PCG64(seed))

Each draw consumes exactly one uniform number, so a seed fixes the whole sequence of
choices whatever the logits are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgekit.errors import InputError


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to pick each next token. The defaults decode greedily (deterministic output)."""

    temperature: float = 0.0  # 0 = greedy (argmax)
    top_k: int = 0  # 0 = no top-k filter (transformers' top_k=0 / None)
    top_p: float = 1.0  # 1 = no nucleus filter
    seed: int | None = None  # None = fresh OS entropy per Sampler
    max_new_tokens: int = 256
    repetition_penalty: float | None = None  # None or 1.0 = off; > 1 discourages repeats

    def __post_init__(self) -> None:
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not math.isfinite(self.temperature) or self.temperature < 0:
            raise InputError(f"temperature must be a finite number >= 0 (0 = greedy); got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise InputError(f"top_k must be an int >= 0 (0 = off); got {self.top_k!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) \
                or not (0.0 < self.top_p <= 1.0):  # also rejects NaN
            raise InputError(f"top_p must be in (0, 1] (1 = off); got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer))
                                      or self.seed < 0):
            raise InputError(f"seed must be an int >= 0 or None; got {self.seed!r}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, (int, np.integer)) \
                or self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be an int >= 1; got {self.max_new_tokens!r}")
        rp = self.repetition_penalty
        if rp is not None and (isinstance(rp, bool) or not isinstance(rp, (int, float))
                               or not math.isfinite(rp) or rp <= 0):
            raise InputError(f"repetition_penalty must be a finite number > 0 or None; got {rp!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: np.ndarray, seen_ids: Sequence[int] | np.ndarray,
                             penalty: float) -> np.ndarray:
    """A copy of `logits` with every seen token penalised once (RepetitionPenaltyLogitsProcessor)."""
    seen = np.unique(np.asarray(seen_ids, dtype=np.int64))
    seen = seen[(seen >= 0) & (seen < logits.shape[0])]  # ids past the lm_head can't be generated anyway
    out = logits.copy()
    s = out[seen]
    out[seen] = np.where(s < 0, s * penalty, s / penalty)
    return out


def filter_candidates(logits: np.ndarray, *, top_k: int, top_p: float) -> np.ndarray:
    """Ids that survive top-k then top-p (logits already temperature-scaled); -inf never does.

    Most likely first when top-p applies, else in id order (a draw needs no order).
    """
    v = logits.shape[0]
    keep = logits > -np.inf  # masked-out tokens are never drawn
    if 0 < top_k < v:
        # TopKLogitsWarper removes scores < the k-th largest, so ties with it stay.
        keep &= logits >= np.partition(logits, v - top_k)[v - top_k]
    candidates = np.flatnonzero(keep)
    if candidates.size == 0:
        raise InputError("every logit is -inf: nothing can be sampled")
    if top_p >= 1.0:
        return candidates
    x = logits[candidates]
    probs = _softmax(x)
    # The nucleus is a prefix of the candidates sorted by logit. Sorting all 262144 would
    # dominate a decode step, so sort only the n most likely (ties with the n-th included,
    # so the prefix equals that of a full sort), growing n until the prefix holds >= p.
    n = 64
    while True:
        if n < x.size:
            prefix = np.flatnonzero(x >= np.partition(x, x.size - n)[x.size - n])
        else:
            prefix = np.arange(x.size)
        # Stable sort on -logit: most likely first, ties in id order (as argmax breaks them).
        prefix = prefix[np.argsort(-x[prefix], kind="stable")]
        cum = np.cumsum(probs[prefix])
        if cum[-1] >= top_p or prefix.size == x.size:
            break
        n *= 4
    # TopPLogitsWarper removes a token when the mass at or below it is <= 1 - p, i.e. when
    # the mass strictly above it is >= p; the top token always stays. Tokens past the
    # prefix have at least cum[-1] >= p above them, so they are out too.
    mass_above = cum - probs[prefix]
    return candidates[prefix[mass_above < top_p]]


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x.astype(np.float64) - np.max(x))
    return z / z.sum()


class Sampler:
    """Picks next tokens for one generation; holds its own random stream."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._rng = np.random.Generator(np.random.PCG64(params.seed))

    def next_token(self, logits: np.ndarray, *, seen_ids: Sequence[int] | np.ndarray | None = None) -> int:
        """The next token id from the last position's logits [V].

        `seen_ids` (prompt + generated so far) feeds the repetition penalty, which
        transformers applies over the whole sequence; it is ignored when the penalty is off.
        """
        x = np.asarray(logits)
        if x.ndim != 1 or x.shape[0] == 0:
            raise InputError(f"next_token takes the logits of one position, shape [vocab]; got {x.shape}")
        if not np.issubdtype(x.dtype, np.floating):
            raise InputError(f"logits must be floating point; got {x.dtype}")
        if np.isnan(x).any() or np.isposinf(x).any():
            raise InputError("logits contain NaN or +inf: the model produced invalid output")
        p = self.params
        if p.repetition_penalty not in (None, 1.0) and seen_ids is not None and len(seen_ids):
            x = apply_repetition_penalty(x, seen_ids, p.repetition_penalty)
        if p.greedy:
            return int(np.argmax(x))
        # Scale in float32 like the model's logits; the softmax below is float64.
        with np.errstate(over="ignore"):
            scaled = x.astype(np.float32, copy=False) / np.float32(p.temperature)
        if np.isposinf(scaled).any():  # a temperature so small that scaling overflows: its limit, greedy
            self._rng.random()  # keep the stream aligned: one uniform per step, always
            return int(np.argmax(x))
        x = scaled
        candidates = filter_candidates(x, top_k=p.top_k, top_p=p.top_p)
        if candidates.size == 1:
            self._rng.random()  # keep the stream aligned: one uniform per step, always
            return int(candidates[0])
        cdf = np.cumsum(_softmax(x[candidates]))
        u = self._rng.random() * cdf[-1]
        return int(candidates[min(int(np.searchsorted(cdf, u, side="right")), candidates.size - 1)])


__all__ = ["SamplingParams", "Sampler", "apply_repetition_penalty", "filter_candidates"]
