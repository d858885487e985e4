"""ExportPlan: what a bundle for one device will hold and whether it fits, from config.json alone.

Nothing here reads weights or imports torch: the plan comes from the model family's
parameter counts and memory estimates (edgekit.models), the recipe's bits per weight
(edgekit.recipes) and the device profile. `edgekit plan` prints it; `edgekit export` checks it before any work.

    memory needed = resident weights + KV cache + peak activations
    resident      = every stored weight except the per-layer embedding table, which is
                    memory-mapped: each token reads one row (~9 K values) per lookup, so
                    only touched pages become resident; it is reported as `mapped`
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from edgekit.checkpoint import read_config
from edgekit.compute_shapes import prefill_chunk
from edgekit.errors import CheckpointError, DoesNotFitError, InputError
from edgekit.formats import FORMATS, Format, get_format
from edgekit.manifest import METHOD_AUDIO_ENCODER, METHOD_TEXT_DECODER, METHOD_VISION_ENCODER
from edgekit.models import family_for_config
from edgekit.models.family import MODALITIES, PER_LAYER_EMBEDDING, ComponentParams, ModelFamily, TextLayer
from edgekit.profiles import DeviceProfile
from edgekit.recipes import Recipe, get_recipe

GB = 1e9
_MODALITY_COMPONENT = {"audio": METHOD_AUDIO_ENCODER, "vision": METHOD_VISION_ENCODER}


@dataclass(frozen=True)
class ComponentPlan:
    name: str
    parameters: int
    stored_parameters: int  # + the tied lm_head, which the decoder stores again once quantized
    size_bytes: int
    memory_mapped: bool

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.size_bytes / self.stored_parameters if self.stored_parameters else 0.0


@dataclass(frozen=True)
class KVCache:
    context_length: int
    sliding_window: int
    sliding_layers: int  # cache-owning sliding layers
    global_layers: int  # cache-owning full-attention layers
    shared_layers: int  # reuse an earlier layer's K/V: no cache of their own
    dtype_bits: int
    bytes_per_token: int  # all cache-owning layers, while the context is within the window
    bytes_per_token_past_window: int  # global layers only: sliding layers stop growing
    total_bytes: int


@dataclass(frozen=True)
class MemoryEstimate:
    resident_weights_bytes: int
    mapped_weights_bytes: int
    kv_cache_bytes: int
    activations_bytes: int
    budget_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.resident_weights_bytes + self.kv_cache_bytes + self.activations_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.budget_bytes


@dataclass(frozen=True)
class ExportPlan:
    checkpoint: Path
    family: ModelFamily
    model: str  # a size of the family (e2b, e4b, ...) or custom
    profile: DeviceProfile
    format: Format
    backend: str
    execution_providers: tuple[str, ...]
    recipe: Recipe
    context_length: int
    modalities: tuple[str, ...]
    vision_token_budget: int
    components: tuple[ComponentPlan, ...]
    checkpoint_parameters: int
    kv_cache: KVCache
    memory: MemoryEstimate
    notes: tuple[str, ...] = ()
    external_weights: bool = False  # ExecuTorch: weights in model.ptd beside the program

    @property
    def device(self) -> str:
        return self.profile.name

    @property
    def whole_input_tokens(self) -> int:
        """The most tokens one input fed whole takes (compute_shapes.prefill_chunk)."""
        return whole_input_tokens(self.format, self.modalities, self.vision_token_budget)

    @property
    def fits(self) -> bool:
        return self.memory.fits

    @property
    def bundle_size_bytes(self) -> int:
        return sum(c.size_bytes for c in self.components)

    @property
    def export_memory_bytes(self) -> int | None:
        """Host memory the export itself peaks at, where the format estimates it (Core ML)."""
        return self.format.export_memory_bytes(self)

    def check_fits(self, *, force: bool = False) -> None:
        """Raise DoesNotFitError unless the estimate is within the budget or `force` is set."""
        if self.fits or force:
            return
        raise DoesNotFitError(
            f"{self.recipe.name} {self.format.name} bundle needs {self.memory.total_bytes / GB:.2f} GB but "
            f"{self.device} allows {self.memory.budget_bytes / GB:.2f} GB; use a smaller recipe/context or --force"
        )

    def to_dict(self) -> dict[str, Any]:
        m = self.memory
        return {
            "checkpoint": str(self.checkpoint),
            "family": self.family.name,
            "model": self.model,
            "device": self.device,
            "recommended_model": self.profile.model,
            "format": self.format.name,
            "extension": self.format.extension,
            "backend": self.backend,
            "execution_providers": list(self.execution_providers),
            "recipe": self.recipe.name,
            "context_length": self.context_length,
            "modalities": list(self.modalities),
            "vision_token_budget": self.vision_token_budget,
            "checkpoint_parameters": self.checkpoint_parameters,
            "bundle_parameters": sum(c.parameters for c in self.components),
            "components": [{**dataclasses.asdict(c), "bits_per_weight": round(c.bits_per_weight, 3)}
                           for c in self.components],
            "bundle_size_bytes": self.bundle_size_bytes,
            "kv_cache": dataclasses.asdict(self.kv_cache),
            "memory": {**dataclasses.asdict(m), "total_bytes": m.total_bytes},
            "fits": self.fits,
            "export_memory_bytes": self.export_memory_bytes,
            "notes": list(self.notes),
        }


# --- building a plan ---------------------------------------------------------------------


def whole_input_tokens(fmt: Format, modalities: tuple[str, ...], vision_token_budget: int) -> int:
    """Tokens of the largest input a format's stock runner feeds the decoder whole: an image's
    soft tokens (audio clips and text pieces are as long as the user makes them; the manifest's
    prefill_chunk tells an app where they stop fitting)."""
    return vision_token_budget if fmt.feeds_inputs_whole and "vision" in modalities else 0


def make_plan(checkpoint: Path, *, profile: DeviceProfile, format_name: str | None = None,
              recipe_name: str | None = None, modalities: str | None = None,
              context: int | None = None, external_weights: bool = False) -> ExportPlan:
    """Plan a bundle of `checkpoint` for `profile`; overrides default to the profile's choices."""
    checkpoint = Path(checkpoint)
    try:
        config = read_config(checkpoint)
    except OSError as exc:
        raise CheckpointError(f"cannot read {checkpoint / 'config.json'}: {exc.strerror or exc}") from None
    text = config["text_config"]
    family = family_for_config(config)
    notes: list[str] = []
    fmt, backend, providers = _resolve_format(profile, format_name)
    recipe = _resolve_recipe(profile, fmt, backend, recipe_name)
    if external_weights and not fmt.external_weights:
        takes = ", ".join(f.name for f in FORMATS if f.external_weights)
        raise InputError(f"--external-weights is for {takes} bundles; {fmt.name} bundles keep their weights "
                         "where their format puts them")
    if fmt.name != profile.format:
        notes.append(f"format {fmt.name} instead of {profile.name}'s {profile.format}: backend {backend}"
                     + ("" if recipe_name or recipe.name == profile.recipe else f", its default recipe {recipe.name}"))
    mods = _resolve_modalities(profile, family, config, modalities, notes)
    context_length = _resolve_context(profile, text, context, notes)

    counts = family.count_parameters(config)
    wanted = {c for m, c in _MODALITY_COMPONENT.items() if m in mods}
    included = [p for name, p in counts.items() if name not in _MODALITY_COMPONENT.values() or name in wanted]
    tied_lm_head = _tied_lm_head_copy(text, counts)
    components = tuple(_component_plan(p, recipe, tied_lm_head=tied_lm_head) for p in included)
    chunk = prefill_chunk(text, context_length, ring_buffer=fmt.ring_takes_a_chunk,
                          whole_input_tokens=whole_input_tokens(fmt, mods, profile.vision_token_budget))
    ring_extra = chunk - 1 if fmt.ring_takes_a_chunk else 0
    kv = kv_cache(family.text_layers(text), sliding_window=int(text.get("sliding_window", 512)),
                  context_length=context_length, dtype_bits=fmt.kv_cache_bits, ring_extra_slots=ring_extra)
    activations = family.activation_bytes(config, mods, context_length, profile.vision_token_budget,
                                          fmt.vision_query_chunked, chunk)
    memory = MemoryEstimate(
        resident_weights_bytes=sum(c.size_bytes for c in components if not c.memory_mapped),
        mapped_weights_bytes=sum(c.size_bytes for c in components if c.memory_mapped),
        kv_cache_bytes=kv.total_bytes,
        activations_bytes=activations,
        budget_bytes=profile.memory_budget_bytes,
    )
    model = family.size_of(text)
    if model != "custom" and model != profile.model:
        notes.append(f"{profile.name} recommends {profile.model}; this checkpoint is {model}")
    return ExportPlan(
        checkpoint=checkpoint, family=family, model=model, profile=profile, format=fmt, backend=backend,
        execution_providers=providers, recipe=recipe, context_length=context_length, modalities=mods,
        vision_token_budget=profile.vision_token_budget, components=components,
        checkpoint_parameters=sum(p.total for p in counts.values()), kv_cache=kv, memory=memory, notes=tuple(notes),
        external_weights=external_weights,
    )


def _resolve_format(profile: DeviceProfile, format_name: str | None) -> tuple[Format, str, tuple[str, ...]]:
    fmt = get_format(format_name or profile.format)
    if fmt.name == profile.format:
        return fmt, profile.backend, profile.execution_providers
    if profile.backend in fmt.backend_names:  # a backend the profile's format shares with this one
        backend = fmt.backend(profile.backend)
    else:
        backend = fmt.backends[0]  # another format than the profile's: its first (portable) backend
    return fmt, backend.name, backend.execution_providers


def _resolve_recipe(profile: DeviceProfile, fmt: Format, backend: str, recipe_name: str | None) -> Recipe:
    allowed = fmt.recipes_for(backend)
    if recipe_name is None:
        return get_recipe(profile.recipe if profile.recipe in allowed else fmt.default_recipe_for(backend))
    recipe = get_recipe(recipe_name)
    if recipe.name not in allowed:
        where = f"format {fmt.name!r}" + (f" with backend {backend!r}" if len(fmt.backends) > 1 else "")
        raise InputError(f"recipe {recipe.name!r} is not supported by {where}; choose one of: {', '.join(allowed)}")
    return recipe


def _resolve_context(profile: DeviceProfile, text: Mapping[str, Any], context: int | None,
                     notes: list[str]) -> int:
    max_positions = text.get("max_position_embeddings", 131_072)
    if context is None:  # the profile's context is a default: a smaller model's own limit wins
        if profile.max_context > max_positions:
            notes.append(f"context {max_positions}: the model's max_position_embeddings, below {profile.name}'s "
                         f"{profile.max_context}")
            return max_positions
        return profile.max_context
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise InputError(f"context must be a positive integer, got {context!r}")
    if context > max_positions:
        raise InputError(f"context {context} exceeds the model's max_position_embeddings ({max_positions})")
    return context


def _resolve_modalities(profile: DeviceProfile, family: ModelFamily, config: Mapping[str, Any],
                        requested: str | None, notes: list[str]) -> tuple[str, ...]:
    towers = family.towers(config)
    available, unsupported = set(towers.available), towers.unsupported
    if requested is None:
        for m in profile.modalities:
            if m not in available:
                notes.append(f"{profile.name} enables {m} by default, but the checkpoint has no {m} tower")
            elif m in unsupported:
                notes.append(f"{profile.name} enables {m} by default, but {unsupported[m]}: left out")
        return tuple(m for m in profile.modalities if m in available and m not in unsupported)
    names = [m.strip() for m in requested.split(",") if m.strip()]
    for m in names:
        if m not in MODALITIES:
            raise InputError(f"unknown modality {m!r}; choose from: {', '.join(MODALITIES)}")
        if m not in available:
            raise InputError(f"the checkpoint has no {m} tower ({m}_config is null); drop {m} from --modalities")
        if m in unsupported:
            raise InputError(f"cannot export {m}: {unsupported[m]}; drop {m} from --modalities")
    if "text" not in names:
        raise InputError("modalities must include text (the decoder every bundle runs)")
    return tuple(m for m in MODALITIES if m in names)


def _tied_lm_head_copy(text: Mapping[str, Any], counts: Mapping[str, ComponentParams]) -> int:
    """Parameters of the tied lm_head's own stored copy (every format stores the head apart from
    the token table); none for an untied head, a parameter of its own counted already."""
    if counts[METHOD_TEXT_DECODER].lm_head:
        return 0
    return text["vocab_size"] * text["hidden_size"]


def _component_plan(p: ComponentParams, recipe: Recipe, *, tied_lm_head: int) -> ComponentPlan:
    bits = sum(n * recipe.bits_for(p.name, kind) for kind, n in p.by_kind().items())
    stored = p.total
    if p.name == METHOD_TEXT_DECODER and tied_lm_head:
        # Quantized exports store the tied lm_head apart from the embedding table (torchao
        # quantizes the two separately), and the ONNX decoder graph needs its own copy anyway.
        bits += tied_lm_head * recipe.bits_for(p.name, "lm_head")
        stored += tied_lm_head
    return ComponentPlan(p.name, p.total, stored, int(round(bits / 8)), memory_mapped=p.name == PER_LAYER_EMBEDDING)


# --- KV cache and activations ------------------------------------------------------------


def kv_cache(layers: list[TextLayer], *, sliding_window: int, context_length: int, dtype_bits: int,
             ring_extra_slots: int = 0) -> KVCache:
    """K and V of every cache-owning layer at `context_length` tokens.

    Sliding layers keep at most `sliding_window` tokens (+ `ring_extra_slots` where a ring
    buffer takes a whole chunk past the window); shared-KV layers read an earlier layer's
    cache and add nothing. Global layers have their own head_dim.

    Real E2B in fp16: 12 sliding layers x (1 KV head x 256 x 2 (K,V) x 2 bytes) = 12 KiB plus
    3 global layers x (1 x 512 x 2 x 2) = 6 KiB: 18 KiB (18432 B) per token, counting all 15
    cache-owning layers. That holds only up to the 512-token window: past it the sliding
    caches stop growing and each further token costs 6 KiB (global layers). At 4096 tokens:
    12 x 1 KiB x 512 + 3 x 2 KiB x 4096 = 30 MiB, not 4096 x 18 KiB = 72 MiB.
    E4B: 20 x 2 KiB + 4 x 4 KiB = 56 KiB per token within the window.
    """
    per_token = per_token_global = total = 0
    counts = {"sliding": 0, "global": 0, "shared": 0}
    for layer in layers:
        if layer.shares_kv:
            counts["shared"] += 1
            continue
        row = 2 * layer.num_kv_heads * layer.head_dim * dtype_bits // 8
        per_token += row
        if layer.kind == "sliding_attention":
            counts["sliding"] += 1
            total += row * min(context_length, sliding_window + ring_extra_slots)
        else:
            counts["global"] += 1
            per_token_global += row
            total += row * context_length
    return KVCache(context_length, sliding_window, counts["sliding"], counts["global"], counts["shared"], dtype_bits,
                   per_token, per_token_global, total)
