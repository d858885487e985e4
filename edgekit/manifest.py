"""The bundle manifest (manifest.json), defined once: the pydantic models below.

This is the contract between `export/` (writer), `runtimes/` and the CLI (readers) and
the Android app. Field names are the JSON keys. manifest.schema.json beside this file is
generated from the models for other languages (`python -m edgekit.manifest --schema`;
a test checks the committed file is current).

Compatibility: a reader refuses a newer `schema_version` and ignores keys it does not
know, so an additive change within a version does not break older readers. Every
failure to read is one BundleError naming the key path ("methods[1].inputs[0].dtype").
"""

from __future__ import annotations

import datetime as _dt
import re
from typing import Annotated, Any, Callable, Literal, Union

from annotated_types import Ge, MinLen
from pydantic import (AfterValidator, BeforeValidator, Field, Strict, StringConstraints, ValidationError,
                      ValidationInfo, field_validator, model_validator)

from edgekit import __version__
from edgekit.contract import Bool, Float, Frozen, Int, Str, first_error, schema_main, schema_text
from edgekit.errors import BundleError

# 2: `recipe` and `quant_schemes` (were mixed in `quant_recipes`), `prefill_chunk`.
SCHEMA_VERSION = 2
MANIFEST_FILE = "manifest.json"
BUNDLE_SUFFIX = ".edgekit"

# Files every bundle carries beside its model files.
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

# Method names follow ExecuTorch's LLM runner conventions (docs/architecture.md), so a stock runner
# finds them in a .pte; ONNX and Core ML bundles use the same names for their graphs.
METHOD_TOKEN_EMBEDDING = "token_embedding"
METHOD_TEXT_DECODER = "text_decoder"
METHOD_AUDIO_ENCODER = "audio_encoder"
METHOD_VISION_ENCODER = "vision_encoder"
# waveform -> log-mel frames (no weights), so a device needs no feature code of its own.
METHOD_AUDIO_PREPROCESSOR = "audio_preprocessor"

# Tensor dtypes as numpy spells them (bfloat16 excepted): the runner maps them 1:1.
DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")
ARCHITECTURE = "gemma4"

# `edgekit verify` saves its report under the manifest's `verification`; this bool says if it passed.
VERIFICATION_PASSED = "passed"


class _Spec(Frozen):
    """A manifest part: a failed construction or read is one BundleError naming the key path."""

    @classmethod
    def _error(cls, exc: ValidationError) -> Exception:
        path, problem = first_error(exc, mapping="an object")
        if problem == "is missing":
            return BundleError(f"bundle manifest is missing key '{path}'")
        return BundleError(f"bundle manifest key '{path}' {problem}" if path else f"bundle manifest {problem}")


def _one_of(choices: Callable[[], tuple[str, ...]]) -> Any:
    """A string from a table that is read when checked (the tables import this module)."""

    def check(value: str) -> str:
        if value not in choices():
            raise ValueError(f"must be one of {', '.join(choices())}")
        return value

    return Annotated[Str, AfterValidator(check),
                     Field(json_schema_extra=lambda schema: schema.update(enum=list(choices())))]


def _dim(value: Any) -> Any:
    if isinstance(value, bool) or not (isinstance(value, int) and value >= 0 or isinstance(value, str) and value):
        raise ValueError("must be a size or a dim name")
    return value


# A bundle path stays inside the bundle: relative, "/"-separated, no empty, "." or ".." part, not the
# manifest. One regex, so the check here and the JSON Schema's pattern are the same rule.
_BUNDLE_PATH = r"^(?!manifest\.json$)(?!(?:.*/)?\.{1,2}(?:/|$))[^/\\]+(?:/[^/\\]+)*$"


def _relative(path: str) -> str:
    if not re.fullmatch(_BUNDLE_PATH, path):
        raise ValueError("is not a plain relative path inside the bundle")
    return path


def check_relative_path(path: str) -> str:
    try:
        return _relative(path)
    except ValueError:
        raise BundleError(f"bundle file name {path!r} is not a plain relative path inside the bundle") from None


def _unique(what: str, key: Callable[[Any], str]) -> AfterValidator:
    def check(items: tuple[Any, ...]) -> tuple[Any, ...]:
        names = [key(item) for item in items]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"lists {what} {dup[0]!r} twice")
        return items

    return AfterValidator(check)


NonNegative = Annotated[int, Strict(), Ge(0)]
Positive = Annotated[int, Strict(), Ge(1)]
BundlePath = Annotated[Str, AfterValidator(_relative), Field(json_schema_extra={"pattern": _BUNDLE_PATH})]
# A str in a shape names a dynamic dim ("seq_len"); the union documents it, _dim checks it.
Dim = Annotated[Union[NonNegative, Annotated[str, Strict(), MinLen(1)]], BeforeValidator(_dim)]
Sha256 = Annotated[str, Strict(), StringConstraints(pattern=r"^[0-9a-f]{64}$")]
FormatName = _one_of(lambda: format_names())
ModelSize = _one_of(lambda: (*model_sizes(), "custom"))  # a released size of the family (e2b, e4b, ...)


class ModelInfo(_Spec):
    name: Str
    architecture: Str = ARCHITECTURE
    source_config_sha256: Str  # sha256 of the checkpoint's config.json: which model this is
    size: ModelSize
    num_layers: Positive
    hidden_size: Positive
    vocab_size: Positive


class TensorSpec(_Spec):
    """One input or output of a method."""

    name: Str
    dtype: Literal[DTYPES]
    shape: tuple[Dim, ...]

    @property
    def is_dynamic(self) -> bool:
        return any(isinstance(d, str) for d in self.shape)


class MethodSpec(_Spec):
    """A callable graph in a model file: a .pte method, an .onnx graph, an .mlpackage."""

    name: Str
    file: BundlePath
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    extra: dict[str, Any] = {}


class FileEntry(_Spec):
    path: BundlePath  # relative, "/"-separated
    size: NonNegative
    sha256: Sha256


class SpecialTokens(_Spec):
    bos_id: NonNegative
    eos_ids: Annotated[tuple[NonNegative, ...], MinLen(1)]  # generation stops at any of these: none would never stop
    pad_id: NonNegative
    sot_id: NonNegative | None = None  # <|turn>
    eot_id: NonNegative | None = None  # <turn|>
    image_token_id: NonNegative | None = None
    audio_token_id: NonNegative | None = None
    video_token_id: NonNegative | None = None
    boi_id: NonNegative | None = None
    eoi_id: NonNegative | None = None
    boa_id: NonNegative | None = None
    eoa_id: NonNegative | None = None
    extra: dict[str, NonNegative] = {}  # other roles, e.g. "think_token"

    @classmethod
    def from_layout(cls, layout: Any) -> SpecialTokens:
        """From an edgekit.models.gemma4.special_tokens.SpecialTokenLayout, so no exporter re-types ids."""
        ids = dict(layout.ids)
        named = {
            "bos_token": "bos_id", "pad_token": "pad_id", "sot_token": "sot_id", "eot_token": "eot_id",
            "image_token": "image_token_id", "audio_token": "audio_token_id", "video_token": "video_token_id",
            "boi_token": "boi_id", "eoi_token": "eoi_id", "boa_token": "boa_id", "eoa_token": "eoa_id",
        }
        kwargs = {attr: ids.pop(role) for role, attr in named.items() if role in ids}
        return cls(eos_ids=tuple(layout.eos_ids), extra=ids, **kwargs)


class AudioPreprocessing(_Spec):
    """Log-mel settings of the audio tower; defaults mirror transformers' Gemma4AudioFeatureExtractor."""

    sampling_rate: Positive
    feature_size: Positive  # mel bins
    frame_length: Positive  # samples
    hop_length: Positive  # samples
    fft_length: Positive
    min_frequency: Float = 0.0
    max_frequency: Float = 8000.0
    mel_floor: Float = 1e-3
    preemphasis: Float = 0.0
    preemphasis_htk_flavor: Bool = True
    input_scale_factor: Float = 1.0
    ms_per_token: Positive  # one soft token per this many ms of audio
    max_tokens: Positive  # soft tokens per clip at most
    extra: dict[str, Any] = {}


class ImagePreprocessing(_Spec):
    """Resize/patch settings of the vision tower; defaults mirror transformers' Gemma4ImageProcessor."""

    patch_size: Positive
    pooling_kernel_size: Positive
    max_soft_tokens: Positive
    rescale_factor: Float = 1 / 255
    image_mean: tuple[Float, ...] = (0.0, 0.0, 0.0)
    image_std: tuple[Float, ...] = (1.0, 1.0, 1.0)
    resample: Str = "bicubic"
    extra: dict[str, Any] = {}


class PromptPieces(_Spec):
    """The text around each turn and media input, rendered from the bundle's own chat template at
    export (edgekit.runtimes.prompt.prompt_pieces), so an app with no template engine (android_demo)
    feeds the stock runner the text the runner's template renders. With thinking off, no system
    message, each earlier answer as the model wrote it:

        begin + user_start + USER + user_end + model_start + ANSWER + model_end + user_start + USER
              + user_end + generation_prompt

    USER is the message's parts in order, the turn's leading and trailing whitespace dropped,
    each image as image_start + the image + image_end, each clip as audio_start + clip + audio_end."""

    begin: Str
    user_start: Str
    user_end: Str
    model_start: Str
    model_end: Str
    generation_prompt: Str
    image_start: Str
    image_end: Str
    audio_start: Str
    audio_end: Str


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


class Manifest(_Spec):
    """manifest.json. Readers ignore keys they do not know, so an additive change keeps schema_version;
    a removal or rename bumps it."""

    schema_version: Literal[SCHEMA_VERSION] = SCHEMA_VERSION
    # No default in the schema: it would go stale with every release.
    edgekit_version: Str = Field(__version__, json_schema_extra=lambda schema: schema.pop("default", None))
    created_at: Str = Field(default_factory=_utc_now)
    model: ModelInfo
    device: Str  # device profile name from devices.yaml
    format: FormatName  # a name in edgekit.formats.FORMATS
    backend: Str  # e.g. "xnnpack", "cpu", "cuda", "coreml"
    execution_providers: tuple[Str, ...] = ()  # onnxruntime providers in order of preference
    recipe: Str  # the quantization recipe the bundle was exported with (edgekit.recipes)
    quant_schemes: dict[str, Str]  # method name -> the storage schemes its weights use, "+"-joined
    methods: Annotated[tuple[MethodSpec, ...], _unique("method", lambda m: m.name)]
    max_context: Positive
    prefill_chunk: Positive  # most tokens one text_decoder call takes; the runner feeds prompts in such chunks
    special_tokens: SpecialTokens
    chat_template: BundlePath | None = CHAT_TEMPLATE_FILE  # a file name inside the bundle
    audio_preprocessing: AudioPreprocessing | None = None
    image_preprocessing: ImagePreprocessing | None = None
    prompt: PromptPieces | None = None  # None: the chat template is not one these pieces describe
    files: Annotated[tuple[FileEntry, ...], _unique("file", lambda f: f.path)] = ()  # BundleWriter.finalize
    verification: dict[str, Any] | None = None  # report saved by `edgekit verify`
    extra: dict[str, Any] = {}  # format-specific: opset, ir_version, ...

    @model_validator(mode="before")
    @classmethod
    def _version_first(cls, data: Any) -> Any:
        # Checked before anything else: a newer manifest may lack keys this version requires.
        version = data.get("schema_version") if isinstance(data, dict) else None
        if type(version) is int and version > SCHEMA_VERSION:
            raise BundleError(f"bundle manifest schema {version} is newer than this edgekit understands "
                              f"({SCHEMA_VERSION}); upgrade edgekit")
        if type(version) is int and version < SCHEMA_VERSION:
            raise BundleError(f"bundle manifest schema {version} is older than this edgekit reads "
                              f"({SCHEMA_VERSION}); export the bundle again")
        return data

    @field_validator("prefill_chunk")
    @classmethod
    def _chunk_fits_context(cls, chunk: int, info: ValidationInfo) -> int:
        context = info.data.get("max_context")
        if context is not None and chunk > context:
            raise ValueError(f"must be at most max_context ({context})")
        return chunk

    def method(self, name: str) -> MethodSpec:
        for m in self.methods:
            if m.name == name:
                return m
        raise BundleError(f"bundle has no method {name!r} (it has: {', '.join(m.name for m in self.methods)})")

    def has_method(self, name: str) -> bool:
        return any(m.name == name for m in self.methods)

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, keys in field order (what manifest.json looks like)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise cls._error(exc) from None


def format_names() -> tuple[str, ...]:
    """The formats table's names (edgekit.formats): the manifest's format enum."""
    from edgekit.formats import FORMATS  # the table imports recipes, which import method names from here

    return FORMATS.names()


def model_sizes() -> tuple[str, ...]:
    from edgekit.models import model_sizes as sizes

    return sizes()


def schema_json() -> str:
    """manifest.schema.json, generated: `python -m edgekit.manifest --schema > edgekit/manifest.schema.json`."""
    return schema_text(Manifest, f"edgekit bundle manifest (manifest.json), schema_version {SCHEMA_VERSION}",
                       f"urn:edgekit:bundle-manifest:{SCHEMA_VERSION}", mode="serialization")


if __name__ == "__main__":
    raise SystemExit(schema_main(schema_json))
