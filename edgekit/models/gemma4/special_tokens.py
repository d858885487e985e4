"""Gemma 4's special tokens: their strings, and where they sit in a vocabulary.

Strings are those of the released tokenizer (google/gemma-4-e2b-it tokenizer_config.json
`extra_special_tokens`, mirrored by transformers' Gemma4Processor attributes). Ids for the
real 262144-entry vocabulary come from transformers' Gemma4Config defaults
(image 258880, audio 258881, video 258884, boi 255999, boa 256000, eoi 258882, eoa 258883)
and the Gemma tokenizer layout (pad 0, eos 1, bos 2, unk 3, mask 4, <|turn> 105, <turn|> 106).
Small random-weight vocabularies pack the same tokens at the front instead.
"""

from __future__ import annotations

from dataclasses import dataclass

REAL_VOCAB_SIZE = 262_144

# role -> token string. Roles are the attribute names transformers' tokenizer exposes.
TOKEN_STRINGS: dict[str, str] = {
    "pad_token": "<pad>",
    "eos_token": "<eos>",
    "bos_token": "<bos>",
    "unk_token": "<unk>",
    "mask_token": "<mask>",
    "sot_token": "<|turn>",
    "eot_token": "<turn|>",
    "soc_token": "<|channel>",
    "eoc_token": "<channel|>",
    "think_token": "<|think|>",
    "escape_token": '<|"|>',
    "str_token": "<|tool_response>",
    "etr_token": "<tool_response|>",
    "stc_token": "<|tool_call>",
    "etc_token": "<tool_call|>",
    "std_token": "<|tool>",
    "etd_token": "<tool|>",
    "boi_token": "<|image>",
    "eoi_token": "<image|>",
    "image_token": "<|image|>",
    "boa_token": "<|audio>",
    "eoa_token": "<audio|>",
    "audio_token": "<|audio|>",
    "video_token": "<|video|>",
}

# Ids in the released 262144-entry vocabulary, for the roles whose id a config or the
# runtime needs. Roles not listed here are packed into free low ids (the real tokenizer
# keeps its control tokens in the first few hundred ids too).
_REAL_IDS: dict[str, int] = {
    "pad_token": 0,
    "eos_token": 1,
    "bos_token": 2,
    "unk_token": 3,
    "mask_token": 4,
    "sot_token": 105,
    "eot_token": 106,
    "boi_token": 255_999,
    "boa_token": 256_000,
    "image_token": 258_880,
    "audio_token": 258_881,
    "eoi_token": 258_882,
    "eoa_token": 258_883,
    "video_token": 258_884,
}


@dataclass(frozen=True)
class SpecialTokenLayout:
    """Which id each special token has in one vocabulary."""

    vocab_size: int
    ids: dict[str, int]

    def id(self, role: str) -> int:
        return self.ids[role]

    def string(self, role: str) -> str:
        return TOKEN_STRINGS[role]

    def by_string(self) -> dict[str, int]:
        return {TOKEN_STRINGS[role]: i for role, i in self.ids.items()}

    @property
    def eos_ids(self) -> list[int]:
        # Generation stops at <eos> and at the end of a model turn.
        return [self.ids["eos_token"], self.ids["eot_token"]]


def layout_for(vocab_size: int) -> SpecialTokenLayout:
    """The real ids for a real-size vocabulary, a packed layout for a small one."""
    if vocab_size >= REAL_VOCAB_SIZE:
        ids = dict(_REAL_IDS)
        free = (i for i in range(5, 105))
        for role in TOKEN_STRINGS:
            if role not in ids:
                ids[role] = next(free)
        return SpecialTokenLayout(vocab_size=vocab_size, ids=ids)
    if vocab_size < 512:
        raise ValueError(f"vocab_size {vocab_size} is too small for Gemma 4's special tokens and bytes (need >= 512)")
    return SpecialTokenLayout(vocab_size=vocab_size, ids={role: i for i, role in enumerate(TOKEN_STRINGS)})
