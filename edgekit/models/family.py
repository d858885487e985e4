"""What a model family tells the rest of edgekit: the interface every family folder fills.

Plan, recipes, formats, bundle, engine and backends depend on this interface only; the
family's own folder (edgekit/models/<family>/) holds its facts. Everything here is
torch-free: the two entries that need torch (`tensor_specs`, `reference_model`) are
called by the host side only and import it themselves.

A family's components are keyed by bundle method name (edgekit.manifest), plus the
per-layer embedding table, a component of its own because it stays memory-mapped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

PER_LAYER_EMBEDDING = "per_layer_embedding"
MODALITIES: tuple[str, ...] = ("text", "audio", "vision")


@dataclass(frozen=True)
class ComponentParams:
    """Parameter counts of one component, by weight kind (what recipes match on)."""

    name: str
    embedding: int = 0
    linear: int = 0
    lm_head: int = 0  # only an untied lm_head is a parameter of its own
    other: int = 0  # norms, convolutions, biases, position tables, per-dim scales

    @property
    def total(self) -> int:
        return self.embedding + self.linear + self.lm_head + self.other

    def by_kind(self) -> dict[str, int]:
        return {"embedding": self.embedding, "linear": self.linear, "lm_head": self.lm_head, "other": self.other}


@dataclass(frozen=True)
class TextLayer:
    """The attention shape of one decoder layer: what the KV cache estimate needs."""

    index: int
    kind: str  # "sliding_attention" | "full_attention"
    head_dim: int
    num_kv_heads: int
    shares_kv: bool  # reuses an earlier layer's K/V: owns no k/v projections and no cache
    intermediate_size: int
    has_v_proj: bool


@dataclass(frozen=True)
class Towers:
    """Which modalities a checkpoint can export, and why the ones it cannot are left out."""

    available: tuple[str, ...]  # "text" first, then the towers the config has
    unsupported: Mapping[str, str]  # modality -> reason it cannot be exported (the tower exists)


@dataclass(frozen=True)
class AudioLimits:
    ms_per_token: int
    max_tokens: int  # soft tokens per clip

    @property
    def max_seconds(self) -> float:
        return self.max_tokens * self.ms_per_token / 1000


@dataclass(frozen=True, kw_only=True)
class ModelFamily:
    """One model family. Each field is a value or a function of config.json's dict."""

    name: str  # the manifest's model.architecture
    display_name: str  # as users know it: "Gemma 4"
    description: str
    model_types: tuple[str, ...]  # config.json "model_type" values this family reads
    sizes: Mapping[str, tuple[int, int]]  # named size -> (hidden_size, num_hidden_layers) of the release
    check_config: Callable[[dict[str, Any], Path], None]  # CheckpointError naming the bad key
    count_parameters: Callable[[Mapping[str, Any]], dict[str, ComponentParams]]
    text_layers: Callable[[Mapping[str, Any]], list[TextLayer]]  # from text_config
    towers: Callable[[Mapping[str, Any]], Towers]
    # Peak working memory (bytes) of the stages a bundle runs: (config, modalities, context,
    # vision soft tokens, vision queries chunked) -> bytes.
    activation_bytes: Callable[[Mapping[str, Any], tuple[str, ...], int, int, bool, int], int]  # ..., prefill chunk
    audio: AudioLimits
    vision_token_budgets: tuple[int, ...]  # the soft-token budgets its image processor takes
    presets: Mapping[str, Any]  # name -> random-weight shape for `edgekit make-checkpoint` (edgekit.testing)
    ignored_tensors: Callable[[str], bool]  # checkpoint tensors the reference model drops on load
    tensor_specs: Callable[[dict[str, Any]], list[Any]]  # needs torch: every tensor a checkpoint holds
    reference_model: Callable[[Path, str], Any]  # needs torch: the transformers model, the numerical reference

    def size_of(self, text_config: Mapping[str, Any]) -> str:
        """The released size a config has ("e2b", ...), or "custom"."""
        shape = (text_config.get("hidden_size"), text_config.get("num_hidden_layers"))
        return next((name for name, s in self.sizes.items() if s == shape), "custom")
