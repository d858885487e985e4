"""The methods of an edgekit .pte, their modules and their I/O contract.

ExecuTorch's stock LLM runner (extension/llm/runner, MultimodalPrefiller and
MultimodalDecoderRunner) drives a program through two calls:

    token_embedding(tokens Long[1,S]) -> embeds          text_decoder(embeds, cache_position Long[S]) -> logits

and for media it feeds an encoder's first output straight into text_decoder. Gemma 4 also
needs, per token, the per-layer embedding (PLE) row of its token id (the pad id's row at
image/audio positions), which the runner never passes. edgekit keeps the runner's two-input
text_decoder by PACKING the PLE rows into the embeddings: every method that produces rows
for the decoder returns them H + L*P wide,

    embeds[..., :H]   the input embedding (token embedding, or an encoder's soft token)
    embeds[..., H:]   the L*P token-identity PLE values (Gemma4's embed_tokens_per_layer
                      of the token id; for soft tokens, of the pad id — a constant row
                      the encoders append themselves)

so a runner concatenates rows from any producer along S and calls text_decoder without
knowing about PLE. Signatures (S dynamic, 1 <= S <= get_max_seq_len):

    token_embedding(tokens Long[1,S])                        -> embeds Float[1,S,H+L*P]
    text_decoder(embeds Float[1,S,H+L*P], cache_position Long[S]) -> logits Float[1,V]
                                                                 (last position, softcapped)
    vision_encoder(pixel_values Float[1,P,3*p*p], pixel_position_ids Long[1,P,2])
                                                      -> soft_tokens Float[1,N,H+L*P], valid_mask Bool[1,N]
    audio_encoder(input_features Float[1,T,128], input_features_mask Bool[1,T])
                                                      -> soft_tokens Float[1,T/4,H+L*P], token_mask Bool[1,T/4]
    audio_preprocessor(waveform Float[N], num_samples Long[1])
                                                      -> input_features Float[1,T,128], input_features_mask Bool[1,T]
                      (16 kHz mono zero-padded to a multiple of 128 samples, 384 <= N <= 480000;
                       Gemma 4's log-mel transform, so a device needs only the .pte and the tokenizer)

The encoders' input contracts are those of export/components/vision_encoder.py and
audio_encoder.py (P = budget * k^2 static; T dynamic, a multiple of 4, >= min_frames);
valid rows are a prefix. The stock runner's own image/audio inputs (raw uint8 image,
[1,bins,frames] features) do not fit these encoders; its text path does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from edgekit.export import bundle_metadata
from edgekit.export.components.audio_encoder import MAX_FRAMES, AudioEncoder
from edgekit.export.components.audio_preprocessor import LogMelSpectrogram
from edgekit.export.components.static_kv_decoder import StaticKVDecoder
from edgekit.export.components.token_embedding import TokenEmbedding
from edgekit.export.components.vision_encoder import VisionEncoder
from edgekit.manifest import (METHOD_AUDIO_ENCODER, METHOD_AUDIO_PREPROCESSOR, METHOD_TEXT_DECODER,
                              METHOD_TOKEN_EMBEDDING, METHOD_VISION_ENCODER, TensorSpec)
from edgekit.compute_shapes import vision_query_chunk
from edgekit.runtimes.mel_features import MAX_SAMPLES, PAD_TO_MULTIPLE_OF, MelParams

# Dim names in the manifest (TensorSpec shapes) for the dynamic dimensions.
SEQ_LEN = "seq_len"
NUM_FRAMES = "num_frames"
NUM_AUDIO_TOKENS = "num_audio_tokens"
PACKED_LAYOUT = "packed_ple"  # manifest extra: how embeds carry the PLE rows


@dataclass
class MethodBuild:
    """One method ready for torch.export: module, sample inputs, dynamic dims, manifest specs."""

    name: str
    module: nn.Module
    example_inputs: tuple
    dynamic_shapes: tuple | None
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    component: str  # recipe component of its linears (edgekit.recipes weight keys)
    hints: dict = field(default_factory=dict)  # runner constraints for the manifest


@dataclass(frozen=True)
class Widths:
    hidden: int
    ple: int  # L * P (0 for a model without per-layer embeddings)
    vocab: int

    @property
    def packed(self) -> int:
        return self.hidden + self.ple

    @classmethod
    def of(cls, lm) -> "Widths":
        return cls.of_config(lm.config.text_config.to_dict())

    @classmethod
    def of_config(cls, text: dict) -> "Widths":
        ple = text["num_hidden_layers"] * (text.get("hidden_size_per_layer_input") or 0)
        return cls(text["hidden_size"], ple, text["vocab_size"])


# --- modules -------------------------------------------------------------------------------

class PackedTokenEmbedding(nn.Module):
    """tokens [1,S] -> embeds [1,S,H+L*P]: the token row and its PLE row side by side."""

    def __init__(self, lm) -> None:
        super().__init__()
        self.tokens = TokenEmbedding(lm)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        embeds, per_layer = self.tokens(tokens)
        return torch.cat([embeds, per_layer], dim=-1)


class PackedTextDecoder(nn.Module):
    """(embeds [1,S,H+L*P], cache_position [S]) -> logits [1,V], the KV cache inside."""

    def __init__(self, decoder: StaticKVDecoder, hidden: int) -> None:
        super().__init__()
        self.decoder = decoder
        self.hidden = hidden

    def forward(self, embeds: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        return self.decoder(embeds[..., :self.hidden], embeds[..., self.hidden:], cache_position)


class PackedEncoder(nn.Module):
    """An encoder whose soft tokens get the pad id's PLE row appended (what the decoder
    would have looked up for the placeholder token at their positions)."""

    def __init__(self, encoder: nn.Module, pad_row: torch.Tensor) -> None:
        super().__init__()
        self.encoder = encoder
        self.register_buffer("pad_row", pad_row.reshape(1, 1, -1).clone(), persistent=False)

    def forward(self, features: torch.Tensor, positions_or_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, mask = self.encoder(features, positions_or_mask)
        rows = self.pad_row.expand(1, tokens.shape[1], self.pad_row.shape[-1])
        return torch.cat([tokens, rows], dim=-1), mask


def pad_row(embedding: PackedTokenEmbedding, pad_id: int, hidden: int) -> torch.Tensor:
    """The PLE values of the pad id, as the (possibly quantized) embedding method returns them."""
    with torch.no_grad():
        return embedding(torch.tensor([[pad_id]]))[0, 0, hidden:].detach().clone()


# --- builds --------------------------------------------------------------------------------

def token_embedding(lm, *, max_seq_len: int) -> MethodBuild:
    w = Widths.of(lm)
    seq = torch.export.Dim(SEQ_LEN, min=1, max=max_seq_len)
    return MethodBuild(
        METHOD_TOKEN_EMBEDDING, PackedTokenEmbedding(lm).eval(),
        (torch.ones(1, min(4, max_seq_len), dtype=torch.long),), ({1: seq},),
        inputs=(TensorSpec("tokens", "int64", (1, SEQ_LEN)),),
        outputs=(TensorSpec("embeds", "float32", (1, SEQ_LEN, w.packed)),),
        component=METHOD_TOKEN_EMBEDDING,
    )


def text_decoder(lm, *, max_context: int, max_seq_len: int, llm_ops: bool = False) -> MethodBuild:
    w = Widths.of(lm)
    decoder = StaticKVDecoder(lm, max_context=max_context, max_seq_len=max_seq_len, llm_ops=llm_ops).eval()
    seq = torch.export.Dim(SEQ_LEN, min=1, max=max_seq_len)
    sample = min(4, max_seq_len)
    return MethodBuild(
        METHOD_TEXT_DECODER, PackedTextDecoder(decoder, w.hidden).eval(),
        (torch.randn(1, sample, w.packed), torch.arange(sample)), ({1: seq}, {0: seq}),
        inputs=(TensorSpec("embeds", "float32", (1, SEQ_LEN, w.packed)),
                TensorSpec("cache_position", "int64", (SEQ_LEN,))),
        outputs=(TensorSpec("logits", "float32", (1, w.vocab)),),
        component=METHOD_TEXT_DECODER,
        hints={"max_seq_len": max_seq_len, "max_context": max_context,
               "kv_cache_slots": {kind: int(n) for kind, n in decoder.cache_slots.items()},
               "logits": "last_position",
               "cache_position": "consecutive absolute positions continuing the previous call; "
                                 "restart at 0 for a new conversation (no reset needed)"},
    )


def vision_encoder(lm, *, budget: int) -> MethodBuild:
    w = Widths.of(lm)
    tower = lm.config.vision_config
    chunk = vision_query_chunk(tower.num_attention_heads, budget * tower.pooling_kernel_size**2)
    encoder = VisionEncoder(lm, max_soft_tokens=budget, query_chunk=chunk).eval()
    pixels, positions = encoder.example_inputs()
    return MethodBuild(
        METHOD_VISION_ENCODER, encoder, (pixels, positions), None,
        inputs=(TensorSpec("pixel_values", "float32", tuple(pixels.shape)),
                TensorSpec("pixel_position_ids", "int64", tuple(positions.shape))),
        outputs=(TensorSpec("soft_tokens", "float32", (1, budget, w.packed)),
                 TensorSpec("valid_mask", "bool", (1, budget))),
        component=METHOD_VISION_ENCODER,
        hints={"max_soft_tokens": budget, "max_patches": encoder.max_patches, "attention_query_chunk": chunk},
    )


def audio_encoder(lm) -> MethodBuild:
    w = Widths.of(lm)
    encoder = AudioEncoder(lm).eval()
    return MethodBuild(
        METHOD_AUDIO_ENCODER, encoder, encoder.example_inputs(200), encoder.dynamic_shapes(),
        inputs=(TensorSpec("input_features", "float32", (1, NUM_FRAMES, encoder.mel_bins)),
                TensorSpec("input_features_mask", "bool", (1, NUM_FRAMES))),
        outputs=(TensorSpec("soft_tokens", "float32", (1, NUM_AUDIO_TOKENS, w.packed)),
                 TensorSpec("token_mask", "bool", (1, NUM_AUDIO_TOKENS))),
        component=METHOD_AUDIO_ENCODER,
        hints={"frame_multiple": encoder.frame_multiple, "min_frames": encoder.min_frames, "max_frames": MAX_FRAMES},
    )


def pack_encoder(build: MethodBuild, row: torch.Tensor) -> MethodBuild:
    """`build` with the pad id's PLE row appended to its soft tokens (call after quantizing)."""
    build.module = PackedEncoder(build.module, row).eval()
    return build


# --- audio preprocessor (no weights) -------------------------------------------------------

PADDED_SAMPLES = "padded_samples"  # manifest dim name: the waveform's length, a multiple of 128


def audio_preprocessor(checkpoint_or_params) -> MethodBuild:
    """waveform Float[N], num_samples Long[1] -> features Float[1,T,mels], mask Bool[1,T].

    `checkpoint_or_params` is an edgekit.checkpoint.Checkpoint (settings read as the manifest's
    audio_preprocessing is, bundle_metadata.audio_preprocessing, and turned into MelParams
    as the runner does) or a MelParams. The features feed audio_encoder after the runner pads
    them to its frame_multiple / min_frames (zeros, mask False), as for numpy features.
    """
    params = checkpoint_or_params
    if not isinstance(params, MelParams):
        audio = bundle_metadata.audio_preprocessing(checkpoint_or_params)
        params = MelParams.from_dict({**audio.model_dump(), **audio.extra})
    module = LogMelSpectrogram(params).eval()
    return MethodBuild(
        METHOD_AUDIO_PREPROCESSOR, module, module.example_inputs(), module.dynamic_shapes(),
        inputs=(TensorSpec("waveform", "float32", (PADDED_SAMPLES,)),
                TensorSpec("num_samples", "int64", (1,))),
        outputs=(TensorSpec("input_features", "float32", (1, NUM_FRAMES, module.mel_bins)),
                 TensorSpec("input_features_mask", "bool", (1, NUM_FRAMES))),
        component=METHOD_AUDIO_PREPROCESSOR,
        hints={"sampling_rate": params.sampling_rate, "pad_to_multiple_of": PAD_TO_MULTIPLE_OF,
               "padding_value": params.padding_value, "min_samples": module.min_samples,
               "max_samples": MAX_SAMPLES,
               "num_samples": "int64 [1]: the clip's real length before padding; frames reaching "
                              "past it are False in the mask and zero in the features",
               "short_clips": "pad to min_samples (the extra frames come back masked); a clip under "
                              "one frame has no features, as in the reference"},
    )
