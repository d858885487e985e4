"""What every bundle says about its model, whatever the format: read from the checkpoint.

Token ids come from the checkpoint's own config and tokenizer (a real downloaded one
has the released ids; ours has whatever layout it was written with), never re-typed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgekit.bundle import BundleWriter
from edgekit.checkpoint import Checkpoint
from edgekit.compute_shapes import prefill_chunk
from edgekit.manifest import (CHAT_TEMPLATE_FILE, METHOD_AUDIO_ENCODER, METHOD_VISION_ENCODER, TOKENIZER_CONFIG_FILE,
                              TOKENIZER_FILE, AudioPreprocessing, ImagePreprocessing, Manifest, MethodSpec, ModelInfo,
                              PromptPieces, SpecialTokens)
from edgekit.models.gemma4.special_tokens import TOKEN_STRINGS

if TYPE_CHECKING:
    from edgekit.plan import ExportPlan

# Files copied from the checkpoint into every bundle (the chat template may also live
# inside tokenizer_config.json in older checkpoints).
TOKENIZER_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, CHAT_TEMPLATE_FILE)


def manifest_for(checkpoint: Checkpoint, plan: ExportPlan, *, methods: tuple[MethodSpec, ...],
                 quant_schemes: dict[str, str], tokens: SpecialTokens | None = None,
                 extra: dict[str, Any]) -> Manifest:
    """The manifest every exporter writes: what the plan decided, what the checkpoint says,
    and the exporter's own methods, schemes and format-specific `extra`."""
    names = {m.name for m in methods}
    return Manifest(
        model=model_info(checkpoint, size=plan.model), device=plan.device, format=plan.format.name,
        backend=plan.backend, execution_providers=plan.execution_providers,
        recipe=plan.recipe.name, quant_schemes=quant_schemes, methods=methods,
        max_context=plan.context_length,
        prefill_chunk=prefill_chunk(checkpoint.text_config, plan.context_length,
                                    ring_buffer=plan.format.ring_takes_a_chunk,
                                    whole_input_tokens=plan.whole_input_tokens),
        special_tokens=tokens or special_tokens(checkpoint),
        audio_preprocessing=audio_preprocessing(checkpoint) if METHOD_AUDIO_ENCODER in names else None,
        image_preprocessing=(image_preprocessing(checkpoint, max_soft_tokens=plan.vision_token_budget)
                             if METHOD_VISION_ENCODER in names else None),
        prompt=prompt_pieces(checkpoint, tokens or special_tokens(checkpoint)),
        extra={"modalities": list(plan.modalities), **extra},
    )


def prompt_pieces(checkpoint: Checkpoint, tokens: SpecialTokens) -> PromptPieces | None:
    """The manifest's `prompt`, from the chat template and tokenizer the bundle carries."""
    from tokenizers import Tokenizer

    from edgekit.runtimes.prompt import ChatTemplate, PromptBuilder, special_tokens_map
    from edgekit.runtimes.prompt import prompt_pieces as pieces_of

    source = chat_template_source(checkpoint)
    if source is None:
        return None
    config_path = checkpoint.path / TOKENIZER_CONFIG_FILE
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    template = ChatTemplate(source, special_tokens=special_tokens_map(config if isinstance(config, dict) else {}))
    tokenizer = Tokenizer.from_file(str(checkpoint.path / TOKENIZER_FILE))
    return pieces_of(PromptBuilder(template=template, tokenizer=tokenizer, special_tokens=tokens))


def model_info(checkpoint: Checkpoint, *, size: str) -> ModelInfo:
    text = checkpoint.text_config
    digest = hashlib.sha256((checkpoint.path / "config.json").read_bytes()).hexdigest()
    return ModelInfo(name=checkpoint.path.name, architecture=checkpoint.family.name,
                     source_config_sha256=digest, size=size,
                     num_layers=text["num_hidden_layers"], hidden_size=text["hidden_size"],
                     vocab_size=text["vocab_size"])


def special_tokens(checkpoint: Checkpoint) -> SpecialTokens:
    config, text = checkpoint.config, checkpoint.text_config
    vocab = _tokenizer_vocab(checkpoint.path)
    eos = _eos_ids(checkpoint)
    turn_end = vocab.get(TOKEN_STRINGS["eot_token"])
    if turn_end is not None and turn_end not in eos:
        eos.append(turn_end)  # an answer ends with <turn|>
    extra = {role: vocab[s] for role, s in TOKEN_STRINGS.items()
             if s in vocab and role in ("soc_token", "eoc_token", "think_token", "mask_token", "unk_token")}
    return SpecialTokens(
        bos_id=text.get("bos_token_id", 2), eos_ids=tuple(eos), pad_id=text.get("pad_token_id", 0),
        sot_id=vocab.get(TOKEN_STRINGS["sot_token"]), eot_id=turn_end,
        image_token_id=config.get("image_token_id"), audio_token_id=config.get("audio_token_id"),
        video_token_id=config.get("video_token_id"), boi_id=config.get("boi_token_id"),
        eoi_id=config.get("eoi_token_id"), boa_id=config.get("boa_token_id"),
        eoa_id=config.get("eoa_token_index", config.get("eoa_token_id")), extra=extra,
    )


def _eos_ids(checkpoint: Checkpoint) -> list[int]:
    gen = checkpoint.path / "generation_config.json"
    value = json.loads(gen.read_text()).get("eos_token_id") if gen.is_file() else None
    if value is None:
        value = checkpoint.text_config.get("eos_token_id", 1)
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def _tokenizer_vocab(path: Path) -> dict[str, int]:
    data = json.loads((path / TOKENIZER_FILE).read_text())
    vocab = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    model_vocab = data.get("model", {}).get("vocab", {})
    if isinstance(model_vocab, dict):
        for s in TOKEN_STRINGS.values():
            if s in model_vocab and s not in vocab:
                vocab[s] = model_vocab[s]
    return vocab


def audio_preprocessing(checkpoint: Checkpoint) -> AudioPreprocessing:
    fe = _processor_section(checkpoint.path, "feature_extractor")
    processor, limits = _processor_config(checkpoint.path), checkpoint.family.audio
    rate = int(fe.get("sampling_rate", 16000))
    frame = int(round(rate * fe.get("frame_length_ms", 20.0) / 1000))
    hop = int(round(rate * fe.get("hop_length_ms", 10.0) / 1000))
    return AudioPreprocessing(
        sampling_rate=rate, feature_size=int(fe.get("feature_size", 128)), frame_length=frame, hop_length=hop,
        fft_length=int(fe.get("fft_length", 1 << (frame - 1).bit_length())),
        min_frequency=float(fe.get("min_frequency", 0.0)), max_frequency=float(fe.get("max_frequency", 8000.0)),
        mel_floor=float(fe.get("mel_floor", 1e-3)), preemphasis=float(fe.get("preemphasis", 0.0)),
        preemphasis_htk_flavor=bool(fe.get("preemphasis_htk_flavor", True)),
        input_scale_factor=float(fe.get("input_scale_factor", 1.0)),
        ms_per_token=int(processor.get("audio_ms_per_token", limits.ms_per_token)),
        max_tokens=int(processor.get("audio_seq_length", limits.max_tokens)),
        extra={k: fe[k] for k in ("frame_length_ms", "hop_length_ms", "fft_overdrive", "dither") if k in fe},
    )


def image_preprocessing(checkpoint: Checkpoint, *, max_soft_tokens: int) -> ImagePreprocessing:
    ip = _processor_section(checkpoint.path, "image_processor")
    vision = checkpoint.config.get("vision_config") or {}
    return ImagePreprocessing(
        patch_size=int(ip.get("patch_size", vision.get("patch_size", 16))),
        pooling_kernel_size=int(ip.get("pooling_kernel_size", vision.get("pooling_kernel_size", 3))),
        max_soft_tokens=max_soft_tokens, rescale_factor=float(ip.get("rescale_factor", 1 / 255)),
    )


def _processor_config(path: Path) -> dict:
    f = path / "processor_config.json"
    data = json.loads(f.read_text()) if f.is_file() else {}
    return data if isinstance(data, dict) else {}


def _processor_section(path: Path, key: str) -> dict:
    for name in ("processor_config.json", "preprocessor_config.json"):
        f = path / name
        if f.is_file():
            data = json.loads(f.read_text())
            if isinstance(data.get(key), dict):
                return data[key]
            if name == "preprocessor_config.json":
                return data
    return {}


def copy_tokenizer_files(checkpoint: Checkpoint, writer: BundleWriter) -> None:
    for name in TOKENIZER_FILES:
        src = checkpoint.path / name
        if src.is_file():
            writer.add_file(src, name)
    if not (checkpoint.path / CHAT_TEMPLATE_FILE).is_file():
        template = chat_template_source(checkpoint)
        if template is not None:
            writer.write_text(CHAT_TEMPLATE_FILE, template)


def chat_template_source(checkpoint: Checkpoint) -> str | None:
    """The checkpoint's chat template: chat_template.jinja, or, in older checkpoints, the
    `chat_template` string inside tokenizer_config.json; None when it has neither."""
    path = checkpoint.path / CHAT_TEMPLATE_FILE
    if path.is_file():
        return path.read_text(encoding="utf-8")
    config_path = checkpoint.path / TOKENIZER_CONFIG_FILE
    template = json.loads(config_path.read_text()).get("chat_template") if config_path.is_file() else None
    return template if isinstance(template, str) else None
