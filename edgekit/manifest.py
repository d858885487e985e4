"""The bundle manifest (manifest.json): its key names, its dataclasses, and validation.

This is the contract between `export/` (writer), `runtimes/` and the CLI (readers) and
the Android app. Every key name lives here once, as a constant; readers use these
constants or the dataclasses, never a re-typed string. manifest.schema.json beside this
file describes the same JSON for other languages (tests keep the two in agreement).

Compatibility: a reader refuses a newer `schema_version` and ignores keys it does not
know, so an additive change within a version does not break older readers.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Mapping

from edgekit import __version__
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

# `edgekit verify` saves its report under Key.VERIFICATION; this bool says if it passed.
VERIFICATION_PASSED = "passed"


# --- key names ---------------------------------------------------------------------------
# Dataclass field names equal these values (a test checks it), so attribute and key agree.


class Key:
    SCHEMA_VERSION = "schema_version"
    EDGEKIT_VERSION = "edgekit_version"
    CREATED_AT = "created_at"
    MODEL = "model"
    DEVICE = "device"
    FORMAT = "format"
    BACKEND = "backend"
    EXECUTION_PROVIDERS = "execution_providers"
    RECIPE = "recipe"
    QUANT_SCHEMES = "quant_schemes"
    METHODS = "methods"
    MAX_CONTEXT = "max_context"
    PREFILL_CHUNK = "prefill_chunk"
    SPECIAL_TOKENS = "special_tokens"
    CHAT_TEMPLATE = "chat_template"
    AUDIO = "audio_preprocessing"
    IMAGE = "image_preprocessing"
    FILES = "files"
    VERIFICATION = "verification"
    EXTRA = "extra"


class ModelKey:
    NAME = "name"
    ARCHITECTURE = "architecture"
    SOURCE_CONFIG_SHA256 = "source_config_sha256"
    SIZE = "size"
    NUM_LAYERS = "num_layers"
    HIDDEN_SIZE = "hidden_size"
    VOCAB_SIZE = "vocab_size"


class MethodKey:
    NAME = "name"
    FILE = "file"
    INPUTS = "inputs"
    OUTPUTS = "outputs"
    EXTRA = "extra"


class TensorKey:
    NAME = "name"
    DTYPE = "dtype"
    SHAPE = "shape"


class FileKey:
    PATH = "path"
    SIZE = "size"
    SHA256 = "sha256"


class TokenKey:
    BOS_ID = "bos_id"
    EOS_IDS = "eos_ids"
    PAD_ID = "pad_id"
    SOT_ID = "sot_id"
    EOT_ID = "eot_id"
    IMAGE_TOKEN_ID = "image_token_id"
    AUDIO_TOKEN_ID = "audio_token_id"
    VIDEO_TOKEN_ID = "video_token_id"
    BOI_ID = "boi_id"
    EOI_ID = "eoi_id"
    BOA_ID = "boa_id"
    EOA_ID = "eoa_id"
    EXTRA = "extra"


class AudioKey:
    SAMPLING_RATE = "sampling_rate"
    FEATURE_SIZE = "feature_size"
    FRAME_LENGTH = "frame_length"
    HOP_LENGTH = "hop_length"
    FFT_LENGTH = "fft_length"
    MIN_FREQUENCY = "min_frequency"
    MAX_FREQUENCY = "max_frequency"
    MEL_FLOOR = "mel_floor"
    PREEMPHASIS = "preemphasis"
    PREEMPHASIS_HTK_FLAVOR = "preemphasis_htk_flavor"
    INPUT_SCALE_FACTOR = "input_scale_factor"
    MS_PER_TOKEN = "ms_per_token"
    MAX_TOKENS = "max_tokens"
    EXTRA = "extra"


class ImageKey:
    PATCH_SIZE = "patch_size"
    POOLING_KERNEL_SIZE = "pooling_kernel_size"
    MAX_SOFT_TOKENS = "max_soft_tokens"
    RESCALE_FACTOR = "rescale_factor"
    IMAGE_MEAN = "image_mean"
    IMAGE_STD = "image_std"
    RESAMPLE = "resample"
    EXTRA = "extra"


# --- dataclasses -------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    name: str
    architecture: str = ARCHITECTURE
    source_config_sha256: str  # sha256 of the checkpoint's config.json: which model this is
    size: str  # a released size of the family (e2b, e4b, ...) or "custom"
    num_layers: int
    hidden_size: int
    vocab_size: int


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a method; a str in `shape` names a dynamic dim ("seq_len")."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(self.shape))
        if self.dtype not in DTYPES:
            raise BundleError(f"tensor {self.name!r} has dtype {self.dtype!r}; expected one of {', '.join(DTYPES)}")

    @property
    def is_dynamic(self) -> bool:
        return any(isinstance(d, str) for d in self.shape)


@dataclass(frozen=True)
class MethodSpec:
    """A callable graph in a model file: a .pte method, an .onnx graph, an .mlpackage."""

    name: str
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative, "/"-separated
    size: int
    sha256: str


@dataclass(frozen=True)
class SpecialTokens:
    bos_id: int
    eos_ids: tuple[int, ...]  # generation stops at any of these
    pad_id: int
    sot_id: int | None = None  # <|turn>
    eot_id: int | None = None  # <turn|>
    image_token_id: int | None = None
    audio_token_id: int | None = None
    video_token_id: int | None = None
    boi_id: int | None = None
    eoi_id: int | None = None
    boa_id: int | None = None
    eoa_id: int | None = None
    extra: dict[str, int] = field(default_factory=dict)  # other roles, e.g. "think_token"

    def __post_init__(self) -> None:
        object.__setattr__(self, "eos_ids", tuple(self.eos_ids))

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


@dataclass(frozen=True)
class AudioPreprocessing:
    """Log-mel settings of the audio tower; defaults mirror transformers' Gemma4AudioFeatureExtractor."""

    sampling_rate: int
    feature_size: int  # mel bins
    frame_length: int  # samples
    hop_length: int  # samples
    fft_length: int
    ms_per_token: int  # one soft token per this many ms of audio
    max_tokens: int  # soft tokens per clip at most
    min_frequency: float = 0.0
    max_frequency: float = 8000.0
    mel_floor: float = 1e-3
    preemphasis: float = 0.0
    preemphasis_htk_flavor: bool = True
    input_scale_factor: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ImagePreprocessing:
    """Resize/patch settings of the vision tower; defaults mirror transformers' Gemma4ImageProcessor."""

    patch_size: int
    pooling_kernel_size: int
    max_soft_tokens: int
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    image_std: tuple[float, ...] = (1.0, 1.0, 1.0)
    resample: str = "bicubic"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_mean", tuple(self.image_mean))
        object.__setattr__(self, "image_std", tuple(self.image_std))


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, kw_only=True)
class Manifest:
    model: ModelInfo
    device: str  # device profile name from devices.yaml
    format: str  # a name in edgekit.formats.FORMATS
    backend: str  # e.g. "xnnpack", "cpu", "cuda", "coreml"
    execution_providers: tuple[str, ...] = ()  # onnxruntime providers in order of preference
    recipe: str  # the quantization recipe the bundle was exported with (edgekit.recipes)
    quant_schemes: dict[str, str]  # method name -> the storage schemes its weights use, "+"-joined
    methods: tuple[MethodSpec, ...]
    max_context: int
    prefill_chunk: int  # most tokens one text_decoder call takes; the runner feeds prompts in such chunks
    special_tokens: SpecialTokens
    chat_template: str | None = CHAT_TEMPLATE_FILE  # a file name inside the bundle
    audio_preprocessing: AudioPreprocessing | None = None
    image_preprocessing: ImagePreprocessing | None = None
    files: tuple[FileEntry, ...] = ()  # filled in by BundleWriter.finalize
    verification: dict[str, Any] | None = None  # report saved by `edgekit verify`
    extra: dict[str, Any] = field(default_factory=dict)  # format-specific: opset, ir_version, ...
    schema_version: int = SCHEMA_VERSION
    edgekit_version: str = __version__
    created_at: str = field(default_factory=_utc_now)

    def __post_init__(self) -> None:
        for name in ("execution_providers", "methods", "files"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        formats, sizes = format_names(), (*model_sizes(), "custom")
        if self.format not in formats:
            raise BundleError(f"bundle format {self.format!r} is unknown; expected one of {', '.join(formats)}")
        if self.model.size not in sizes:
            raise BundleError(f"model size {self.model.size!r} is unknown; expected one of {', '.join(sizes)}")
        if self.max_context <= 0:
            raise BundleError(f"max_context must be positive, got {self.max_context}")
        if not 0 < self.prefill_chunk <= self.max_context:
            raise BundleError(f"prefill_chunk must be from 1 to max_context ({self.max_context}), got {self.prefill_chunk}")
        _no_duplicates("method", [m.name for m in self.methods])
        _no_duplicates("file", [f.path for f in self.files])
        named = [m.file for m in self.methods] + [f.path for f in self.files]
        for name in named + ([self.chat_template] if self.chat_template else []):
            check_relative_path(name)

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
        """JSON-ready dict, keys in the order of Key (what manifest.json looks like)."""
        data = _plain(self)
        return {key: data[key] for key in all_keys(Key)}

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        return _read_manifest(data)


def format_names() -> tuple[str, ...]:
    """The formats table's names (edgekit.formats): the manifest's format enum."""
    from edgekit.formats import FORMATS  # the table imports recipes, which import method names from here

    return FORMATS.names()


def model_sizes() -> tuple[str, ...]:
    from edgekit.models import model_sizes as sizes

    return sizes()


def all_keys(namespace: type) -> list[str]:
    return [v for k, v in vars(namespace).items() if k.isupper()]


def check_relative_path(path: str) -> str:
    """A bundle path must stay inside the bundle: relative, "/"-separated, no "..", not the manifest."""
    parts = PurePosixPath(path).parts
    if (not path or "\\" in path or path.startswith("/") or ".." in parts or "." in path.split("/")
            or "" in path.split("/") or path == MANIFEST_FILE):
        raise BundleError(f"bundle file name {path!r} is not a plain relative path inside the bundle")
    return path


def _no_duplicates(what: str, names: list[str]) -> None:
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise BundleError(f"bundle manifest lists {what} {dup[0]!r} twice")


def _plain(value: Any) -> Any:
    """Dataclasses -> dicts, tuples -> lists, recursively (dataclasses.asdict keeps tuples)."""
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


# --- reading and validation --------------------------------------------------------------


class _Obj:
    """Typed access to one JSON object; errors name the full key path ("methods[0].file")."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise BundleError(f"bundle manifest: '{where or 'manifest'}' must be an object, got {type(data).__name__}")
        self.data, self.where = data, where

    def path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def req(self, key: str, kind: type) -> Any:
        if key not in self.data or self.data[key] is None:
            raise BundleError(f"bundle manifest is missing key '{self.path(key)}'")
        return _check(self.data[key], kind, self.path(key))

    def opt(self, key: str, kind: type, default: Any = None) -> Any:
        value = self.data.get(key)
        return default if value is None else _check(value, kind, self.path(key))

    def obj(self, key: str, *, required: bool = True) -> _Obj | None:
        if not required and self.data.get(key) is None:
            return None
        return _Obj(self.req(key, dict), self.path(key))

    def objs(self, key: str) -> list[_Obj]:
        return [_Obj(item, f"{self.path(key)}[{i}]") for i, item in enumerate(self.req(key, list))]

    def list_of(self, key: str, kind: type, *, required: bool = True) -> tuple | None:
        items = self.req(key, list) if required else self.opt(key, list)
        if items is None:
            return None
        return tuple(_check(v, kind, f"{self.path(key)}[{i}]") for i, v in enumerate(items))

    def dict_of(self, key: str, kind: type, *, required: bool = True) -> dict:
        items = self.req(key, dict) if required else self.opt(key, dict, {})
        return {k: _check(v, kind, f"{self.path(key)}.{k}") for k, v in items.items()}


def _check(value: Any, kind: type, where: str) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is object or (isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)):
        return value
    raise BundleError(f"bundle manifest key '{where}' must be {kind.__name__}, got {type(value).__name__} {value!r:.40}")


def _tensor(o: _Obj) -> TensorSpec:
    shape = o.req(TensorKey.SHAPE, list)
    for i, dim in enumerate(shape):
        if isinstance(dim, bool) or not (isinstance(dim, int) and dim >= 0 or isinstance(dim, str) and dim):
            raise BundleError(f"bundle manifest key '{o.path(TensorKey.SHAPE)}[{i}]' must be a size or a dim name")
    dtype = o.req(TensorKey.DTYPE, str)
    if dtype not in DTYPES:
        raise BundleError(f"bundle manifest key '{o.path(TensorKey.DTYPE)}' is {dtype!r}; expected one of {', '.join(DTYPES)}")
    return TensorSpec(name=o.req(TensorKey.NAME, str), dtype=dtype, shape=tuple(shape))


def _method(o: _Obj) -> MethodSpec:
    return MethodSpec(
        name=o.req(MethodKey.NAME, str), file=o.req(MethodKey.FILE, str),
        inputs=tuple(_tensor(t) for t in o.objs(MethodKey.INPUTS)),
        outputs=tuple(_tensor(t) for t in o.objs(MethodKey.OUTPUTS)),
        extra=o.opt(MethodKey.EXTRA, dict, {}),
    )


def _choice(o: _Obj, key: str, choices: tuple[str, ...]) -> str:
    value = o.req(key, str)
    if value not in choices:
        raise BundleError(f"bundle manifest key '{o.path(key)}' is {value!r}; expected one of {', '.join(choices)}")
    return value


def _model(o: _Obj) -> ModelInfo:
    return ModelInfo(
        name=o.req(ModelKey.NAME, str), architecture=o.req(ModelKey.ARCHITECTURE, str),
        source_config_sha256=o.req(ModelKey.SOURCE_CONFIG_SHA256, str), size=_choice(o, ModelKey.SIZE, (*model_sizes(), "custom")),
        num_layers=o.req(ModelKey.NUM_LAYERS, int), hidden_size=o.req(ModelKey.HIDDEN_SIZE, int),
        vocab_size=o.req(ModelKey.VOCAB_SIZE, int),
    )


def _tokens(o: _Obj) -> SpecialTokens:
    optional = [k for k in all_keys(TokenKey) if k not in (TokenKey.BOS_ID, TokenKey.EOS_IDS, TokenKey.PAD_ID,
                                                            TokenKey.EXTRA)]
    return SpecialTokens(
        bos_id=o.req(TokenKey.BOS_ID, int), eos_ids=o.list_of(TokenKey.EOS_IDS, int), pad_id=o.req(TokenKey.PAD_ID, int),
        extra=o.dict_of(TokenKey.EXTRA, int, required=False), **{k: o.opt(k, int) for k in optional},
    )


def _audio(o: _Obj) -> AudioPreprocessing:
    K, d = AudioKey, AudioPreprocessing
    defaults = {f.name: f.default for f in dataclasses.fields(d)}
    return d(
        **{k: o.req(k, int) for k in (K.SAMPLING_RATE, K.FEATURE_SIZE, K.FRAME_LENGTH, K.HOP_LENGTH, K.FFT_LENGTH)},
        **{k: o.opt(k, float, defaults[k]) for k in (K.MIN_FREQUENCY, K.MAX_FREQUENCY, K.MEL_FLOOR, K.PREEMPHASIS,
                                                    K.INPUT_SCALE_FACTOR)},
        preemphasis_htk_flavor=o.opt(K.PREEMPHASIS_HTK_FLAVOR, bool, defaults[K.PREEMPHASIS_HTK_FLAVOR]),
        ms_per_token=o.req(K.MS_PER_TOKEN, int),
        max_tokens=o.req(K.MAX_TOKENS, int),
        extra=o.opt(K.EXTRA, dict, {}),
    )


def _image(o: _Obj) -> ImagePreprocessing:
    K, d = ImageKey, ImagePreprocessing
    defaults = {f.name: f.default for f in dataclasses.fields(d)}
    return d(
        **{k: o.req(k, int) for k in (K.PATCH_SIZE, K.POOLING_KERNEL_SIZE, K.MAX_SOFT_TOKENS)},
        rescale_factor=o.opt(K.RESCALE_FACTOR, float, defaults[K.RESCALE_FACTOR]),
        image_mean=o.list_of(K.IMAGE_MEAN, float, required=False) or defaults[K.IMAGE_MEAN],
        image_std=o.list_of(K.IMAGE_STD, float, required=False) or defaults[K.IMAGE_STD],
        resample=o.opt(K.RESAMPLE, str, defaults[K.RESAMPLE]), extra=o.opt(K.EXTRA, dict, {}),
    )


def _file(o: _Obj) -> FileEntry:
    sha = o.req(FileKey.SHA256, str)
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise BundleError(f"bundle manifest key '{o.path(FileKey.SHA256)}' is not a lowercase hex sha256")
    size = o.req(FileKey.SIZE, int)
    if size < 0:
        raise BundleError(f"bundle manifest key '{o.path(FileKey.SIZE)}' is negative")
    return FileEntry(path=o.req(FileKey.PATH, str), size=size, sha256=sha)


def _read_manifest(data: Any) -> Manifest:
    o = _Obj(data, "")
    version = o.req(Key.SCHEMA_VERSION, int)
    # Checked first: a newer manifest may lack keys this version requires.
    if version > SCHEMA_VERSION:
        raise BundleError(f"bundle manifest schema {version} is newer than this edgekit understands "
                          f"({SCHEMA_VERSION}); upgrade edgekit")
    if version < SCHEMA_VERSION:
        raise BundleError(f"bundle manifest schema {version} is older than this edgekit reads ({SCHEMA_VERSION}); "
                          "export the bundle again")
    audio, image = o.obj(Key.AUDIO, required=False), o.obj(Key.IMAGE, required=False)
    return Manifest(
        schema_version=version,
        edgekit_version=o.req(Key.EDGEKIT_VERSION, str),
        created_at=o.req(Key.CREATED_AT, str),
        model=_model(o.obj(Key.MODEL)),
        device=o.req(Key.DEVICE, str),
        format=_choice(o, Key.FORMAT, format_names()),
        backend=o.req(Key.BACKEND, str),
        execution_providers=o.list_of(Key.EXECUTION_PROVIDERS, str, required=False) or (),
        recipe=o.req(Key.RECIPE, str),
        quant_schemes=o.dict_of(Key.QUANT_SCHEMES, str),
        methods=tuple(_method(m) for m in o.objs(Key.METHODS)),
        max_context=o.req(Key.MAX_CONTEXT, int),
        prefill_chunk=o.req(Key.PREFILL_CHUNK, int),
        special_tokens=_tokens(o.obj(Key.SPECIAL_TOKENS)),
        chat_template=o.opt(Key.CHAT_TEMPLATE, str),
        audio_preprocessing=_audio(audio) if audio else None,
        image_preprocessing=_image(image) if image else None,
        files=tuple(_file(f) for f in o.objs(Key.FILES)),
        verification=o.opt(Key.VERIFICATION, dict),
        extra=o.opt(Key.EXTRA, dict, {}),
    )
