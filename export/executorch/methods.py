"""The methods of an edgekit .pte, their modules and their I/O contract.

ExecuTorch's stock LLM runner (extension/llm/runner, MultimodalPrefiller and
MultimodalDecoderRunner) drives a program through two calls:

    token_embedding(tokens Long[1,S]) -> embeds          text_decoder(embeds, cache_position Long[S]) -> logits

and for media it feeds an encoder's FIRST output straight into text_decoder, all of its rows
in one call (multimodal_prefiller.cpp): it passes an image as one tensor [1,C,H,W] (uint8 or
float, per the method's input dtype) and audio as one tensor [batch, bins, frames]. Gemma 4
also needs, per token, the per-layer embedding (PLE) row of its token id (the pad id's row at
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
    vision_encoder(image Byte[1,3,H,W])                      -> soft_tokens Float[1,N,H+L*P]
                      (RGB, already resized to Gemma 4's size for the image: H and W multiples
                       of patch * pooling (48), (H/48) * (W/48) = N <= the vision budget;
                       rescaling and patching happen inside)
    audio_encoder(features Float[1,bins,T])                  -> soft_tokens Float[1,ceil(T/4),H+L*P]
                      (log-mel frames of one clip, every frame real: what audio_preprocessor
                       returns, its mask's True prefix, bins first; padding happens inside)
    audio_preprocessor(waveform Float[N], num_samples Long[1])
                                                      -> input_features Float[1,T,128], input_features_mask Bool[1,T]
                      (16 kHz mono zero-padded to a multiple of 128 samples, 384 <= N <= 480000;
                       Gemma 4's log-mel transform, so a device needs only the .pte and the tokenizer)

The encoders return only real soft tokens and no mask (the stock runner feeds every row of
the first output). Inside, they run export/components/vision_encoder.py and audio_encoder.py
(P = budget * k^2 static patches; T' a multiple of 4, >= min_frames) on padded inputs and
cut the padding off: StockImageInput, StockAudioInput. As the runner feeds one input per
text_decoder call, get_max_seq_len is at least the vision budget (compute_shapes.prefill_chunk).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

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
from edgekit.runtimes.image_preprocess import ImageParams, pixel_value_table
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
    # An encoder's wrapper taking the stock runner's input (StockImageInput, StockAudioInput),
    # applied by pack_encoder around the packed (quantized) encoder.
    stock_input: Callable[["PackedEncoder"], nn.Module] | None = None


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


class StockImageInput(nn.Module):
    """image Byte[1,3,H,W] -> soft tokens [1,N,D]: ExecuTorch's stock runner's image input for a
    packed VisionEncoder. Levels become pixel values through the processor's own table
    (runtimes/image_preprocess.pixel_value_table), the image becomes Gemma 4's row-major
    patches and (column, row) positions, padded to the encoder's static patch count, and
    only the image's own N = patches / k^2 soft tokens come back."""

    def __init__(self, packed: "PackedEncoder", *, pixel_table: torch.Tensor, patch_size: int) -> None:
        super().__init__()
        self.packed = packed
        encoder = packed.encoder
        self.patch, self.kernel, self.max_patches = patch_size, encoder.kernel, encoder.max_patches
        self.register_buffer("pixel_table", pixel_table.reshape(3, 256).float().clone(), persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        p = self.patch
        height, width = image.shape[2], image.shape[3]
        rows, cols = height // p, width // p
        patches = rows * cols
        torch._check(patches <= self.max_patches)  # the runner's size error instead of a bad slice
        # Each patch value's (channel, y, x) for all max_patches slots, gathered straight from
        # the image: a reshape of the [H, W] grid has two dynamic dims (XNNPACK's reshape takes
        # one), and static-size intermediates keep the planned memory at the budget's (sized by
        # H and W's bounds, an arange(rows * cols) would plan for a 26880 x 26880 image).
        n = torch.arange(self.max_patches)[:, None]
        real = n < patches
        j = torch.arange(p * p * 3)[None]  # (row, col, channel) within a patch, row-major
        y = torch.where(real, (n // cols) * p + j // (3 * p), 0)
        x = torch.where(real, (n % cols) * p + (j // 3) % p, 0)
        channel = j % 3
        # Indexed whole: image[0] would be a select, which ExecuTorch runs as a copy of the
        # image planned at H and W's bounds (2.2 GB).
        levels = image[torch.zeros_like(channel), channel, y, x].long()  # [max_patches, p * p * 3]
        pixels = torch.where(real, self.pixel_table[channel, levels], 0.0)[None]
        positions = torch.where(real, torch.cat([n % cols, n // cols], dim=-1), -1)[None]  # (column, row)
        tokens, _ = self.packed(pixels, positions)  # real soft tokens are a prefix
        return tokens[:, : patches // self.kernel**2]


class StockAudioInput(nn.Module):
    """features Float[1,bins,T] -> soft tokens [1,ceil(T/4),D]: ExecuTorch's stock runner's audio
    input (every frame real) for a packed AudioEncoder, which takes [1,T',bins] with a mask:
    zero frames, masked, pad T to T' = a multiple of frame_multiple plus min_frames (so any T
    passes the encoder's minimum), and only the clip's own tokens come back."""

    def __init__(self, packed: "PackedEncoder") -> None:
        super().__init__()
        self.packed = packed
        encoder = packed.encoder
        self.multiple, self.min_frames = encoder.frame_multiple, encoder.min_frames

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        frames = features.shape[2]
        tokens = (frames + self.multiple - 1) // self.multiple  # the mask's True count after two stride-2 convs
        pad = tokens * self.multiple - frames + self.min_frames
        x = torch.cat([features.transpose(1, 2), features.new_zeros(1, pad, features.shape[1])], dim=1)
        mask = (torch.arange(frames + pad) < frames)[None]
        out, _ = self.packed(x, mask)
        return out[:, :tokens]


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


IMAGE_HEIGHT, IMAGE_WIDTH = "image_height", "image_width"  # manifest dim names (pixels)
NUM_IMAGE_TOKENS = "num_image_tokens"


def vision_encoder(lm, *, budget: int, image: ImageParams) -> MethodBuild:
    """image Byte[1,3,H,W] (resized as `image` says) -> soft tokens [1,N,packed]."""
    w = Widths.of(lm)
    tower = lm.config.vision_config
    chunk = vision_query_chunk(tower.num_attention_heads, budget * tower.pooling_kernel_size**2)
    encoder = VisionEncoder(lm, max_soft_tokens=budget, query_chunk=chunk).eval()
    block = image.patch_size * image.pooling_kernel_size  # H and W are multiples of one pooled cell
    rows = torch.export.Dim("image_block_rows", min=1, max=budget)
    cols = torch.export.Dim("image_block_cols", min=1, max=budget)
    side = max(1, int(budget**0.5))
    sample = torch.randint(0, 256, (1, 3, block * side, block * (budget // side)), dtype=torch.uint8)
    table = torch.from_numpy(pixel_value_table(image))
    return MethodBuild(
        METHOD_VISION_ENCODER, encoder, (sample,), ({2: block * rows, 3: block * cols},),
        inputs=(TensorSpec("image", "uint8", (1, 3, IMAGE_HEIGHT, IMAGE_WIDTH)),),
        outputs=(TensorSpec("soft_tokens", "float32", (1, NUM_IMAGE_TOKENS, w.packed)),),
        component=METHOD_VISION_ENCODER,
        hints={"max_soft_tokens": budget, "max_patches": encoder.max_patches, "attention_query_chunk": chunk,
               "image": "RGB, channels first, uint8, resized to the processor's target size: height and width "
                        "multiples of size_multiple, (height / size_multiple) * (width / size_multiple) soft tokens",
               "size_multiple": block},
        stock_input=lambda packed: StockImageInput(packed, pixel_table=table, patch_size=image.patch_size),
    )


def audio_encoder(lm) -> MethodBuild:
    """log-mel features Float[1,bins,T] (every frame real) -> soft tokens [1,ceil(T/4),packed]."""
    w = Widths.of(lm)
    encoder = AudioEncoder(lm).eval()
    # DYNAMIC, not a named Dim: the padding's ceil-division makes guards sympy cannot prove
    # (e.g. (24 + 12*q) % (2 + q) == 0); export keeps them as runtime checks, which always hold.
    frames = torch.export.Dim.DYNAMIC(min=1, max=MAX_FRAMES)
    features, mask = encoder.example_inputs(200)
    return MethodBuild(
        METHOD_AUDIO_ENCODER, encoder, (features[:, mask[0]].transpose(1, 2).contiguous(),), ({2: frames},),
        inputs=(TensorSpec("features", "float32", (1, encoder.mel_bins, NUM_FRAMES)),),
        outputs=(TensorSpec("soft_tokens", "float32", (1, NUM_AUDIO_TOKENS, w.packed)),),
        component=METHOD_AUDIO_ENCODER,
        hints={"frame_multiple": encoder.frame_multiple, "min_frames": encoder.min_frames, "max_frames": MAX_FRAMES,
               "features": "audio_preprocessor's features of the frames its mask marks real, bins first"},
        stock_input=StockAudioInput,
    )


def pack_encoder(build: MethodBuild, row: torch.Tensor) -> MethodBuild:
    """`build` with the pad id's PLE row appended to its soft tokens, taking the stock runner's
    input (call after quantizing)."""
    packed = PackedEncoder(build.module, row).eval()
    build.module = (build.stock_input(packed) if build.stock_input else packed).eval()
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
