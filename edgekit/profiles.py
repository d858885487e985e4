"""Device profiles: devices.yaml, loaded into frozen dataclasses and checked on load.

Adding a device means adding an entry to devices.yaml, nothing else. Every key is
checked when the file loads (after litert-torch's `LayerQuantRecipe.verify`): unknown
or missing keys, wrong types, and values the rest of edgekit cannot honour — a recipe
the format cannot export, a backend the format has no runtime for, a vision budget the
processor does not offer. Errors name the file, the profile and the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from edgekit.errors import DeviceProfileError
from edgekit.formats import FORMATS
from edgekit.models import FAMILIES, model_sizes
from edgekit.models.family import MODALITIES
from edgekit.recipes import RECIPES
from edgekit.registry import Registry

PACKAGED_PROFILES = Path(__file__).resolve().parent / "devices.yaml"

MODEL_SIZES: tuple[str, ...] = model_sizes()
# Soft-token budgets any family's image processor offers; a profile's must be its model's.
VISION_TOKEN_BUDGETS: tuple[int, ...] = tuple(sorted({b for f in FAMILIES for b in f.vision_token_budgets}))
CPU_ARCHES: tuple[str, ...] = ("arm64", "x86_64")
# Closed so a typo ("dotprd") fails on load instead of silently disabling a kernel.
ISA_FEATURES: tuple[str, ...] = (
    "neon", "fp16", "dotprod", "i8mm", "bf16", "sve", "sve2", "sme", "sme2", "avx2", "avx512", "avx512_vnni", "amx",
)
ACCELERATOR_KINDS: tuple[str, ...] = ("gpu", "npu")


@dataclass(frozen=True)
class CpuSpec:
    arch: str
    cores: int
    core: str  # core names, e.g. "4x Cortex-A76"
    isa: tuple[str, ...]


@dataclass(frozen=True)
class Accelerator:
    kind: str
    name: str
    tops: float | None = None  # vendor's peak int8 TOPS, where published


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    ram_gb: float
    bundle_memory_share: float  # fraction of RAM one bundle may use
    cpu: CpuSpec
    memory_bandwidth_gbps: float
    accelerators: tuple[Accelerator, ...]
    format: str
    backend: str
    execution_providers: tuple[str, ...]  # ONNX Runtime EPs in priority order; () for other formats
    recipe: str
    model: str  # recommended model size: e2b | e4b
    max_context: int
    vision_token_budget: int
    modalities: tuple[str, ...]

    @property
    def memory_budget_bytes(self) -> int:
        # Devices sell "8 GB" of RAM meaning 8 GiB.
        return int(self.ram_gb * 1024**3 * self.bundle_memory_share)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "memory_budget_bytes": self.memory_budget_bytes}


class ProfileRegistry(Registry[DeviceProfile]):
    """The profiles of one devices.yaml; `.get(name)` raises DeviceProfileError listing names."""

    def __init__(self, profiles: list[DeviceProfile], *, source: Path) -> None:
        super().__init__("device", profiles, error=DeviceProfileError)
        self.source = source


def load_profiles(path: Path | None = None) -> ProfileRegistry:
    """Read and check devices.yaml (the packaged one unless `path` is given)."""
    path = Path(path) if path is not None else PACKAGED_PROFILES
    where = f"{path.name}: "
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise DeviceProfileError(f"cannot read device profiles {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        raise DeviceProfileError(f"{where}not valid YAML{line}") from None
    if not isinstance(data, dict) or set(data) != {"devices"} or not isinstance(data["devices"], list):
        raise DeviceProfileError(f"{where}must hold one key 'devices' with a list of profiles")
    profiles = []
    seen: set[str] = set()
    for i, entry in enumerate(data["devices"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise DeviceProfileError(f"{where}entry {i + 1} must be a mapping with a 'name'")
        if entry["name"] in seen:
            raise DeviceProfileError(f"{where}duplicate profile {entry['name']!r}")
        seen.add(entry["name"])
        profiles.append(_parse_profile(entry, _Where(f"{where}profile {entry['name']!r}: ")))
    return ProfileRegistry(profiles, source=path)


# --- checking one entry ------------------------------------------------------------------


@dataclass(frozen=True)
class _Where:
    prefix: str

    def fail(self, key: str, message: str, value: Any = dataclasses.MISSING) -> DeviceProfileError:
        got = "" if value is dataclasses.MISSING else f", got {value!r}"
        return DeviceProfileError(f"{self.prefix}key {key!r} {message}{got}")


_REQUIRED = {f.name for f in dataclasses.fields(DeviceProfile)} - {"execution_providers"}
_OPTIONAL = {"execution_providers"}


def _check_keys(d: Mapping[str, Any], required: set[str], optional: set[str], where: _Where, prefix: str = "") -> None:
    for key in d:
        if key not in required | optional:
            known = ", ".join(sorted(required | optional))
            raise where.fail(prefix + str(key), f"is unknown (known keys: {known})")
    for key in sorted(required):
        if key not in d:
            raise where.fail(prefix + key, "is missing")


def _number(d: Mapping[str, Any], key: str, where: _Where, *, integer: bool = False, label: str = "") -> Any:
    value = d[key]
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or value <= 0:
        raise where.fail(label or key, f"must be a positive {'integer' if integer else 'number'}", value)
    return value


def _string(d: Mapping[str, Any], key: str, where: _Where, *, label: str = "") -> str:
    value = d[key]
    if not isinstance(value, str) or not value.strip():
        raise where.fail(label or key, "must be a non-empty string", value)
    return value


def _choice(d: Mapping[str, Any], key: str, choices: tuple, where: _Where, *, label: str = "") -> Any:
    value = d[key]
    if isinstance(value, bool) or value not in choices:
        raise where.fail(label or key, f"must be one of {', '.join(map(str, choices))}", value)
    return value


def _string_list(d: Mapping[str, Any], key: str, where: _Where, *, choices: tuple | None = None,
                 label: str = "") -> tuple[str, ...]:
    value = d[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise where.fail(label or key, "must be a list of strings", value)
    if len(set(value)) != len(value):
        raise where.fail(label or key, "must not repeat an entry", value)
    for v in value:
        if choices is not None and v not in choices:
            raise where.fail(label or key, f"has unknown entry {v!r} (choose from {', '.join(choices)})")
    return tuple(value)


def _parse_cpu(value: Any, where: _Where) -> CpuSpec:
    if not isinstance(value, dict):
        raise where.fail("cpu", "must be a mapping with arch, cores, core, isa", value)
    _check_keys(value, {"arch", "cores", "core", "isa"}, set(), where, prefix="cpu.")
    return CpuSpec(
        arch=_choice(value, "arch", CPU_ARCHES, where, label="cpu.arch"),
        cores=_number(value, "cores", where, integer=True, label="cpu.cores"),
        core=_string(value, "core", where, label="cpu.core"),
        isa=_string_list(value, "isa", where, choices=ISA_FEATURES, label="cpu.isa"),
    )


def _parse_accelerators(value: Any, where: _Where) -> tuple[Accelerator, ...]:
    if not isinstance(value, list):
        raise where.fail("accelerators", "must be a list (possibly empty)", value)
    out = []
    for i, acc in enumerate(value):
        label = f"accelerators[{i}]"
        if not isinstance(acc, dict):
            raise where.fail(label, "must be a mapping with kind, name and optional tops", acc)
        _check_keys(acc, {"kind", "name"}, {"tops"}, where, prefix=f"{label}.")
        tops = _number(acc, "tops", where, label=f"{label}.tops") if "tops" in acc else None
        out.append(Accelerator(_choice(acc, "kind", ACCELERATOR_KINDS, where, label=f"{label}.kind"),
                               _string(acc, "name", where, label=f"{label}.name"), tops))
    return tuple(out)


def _parse_profile(entry: Mapping[str, Any], where: _Where) -> DeviceProfile:
    _check_keys(entry, _REQUIRED, _OPTIONAL, where)
    share = entry["bundle_memory_share"]
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
        raise where.fail("bundle_memory_share", "must be a fraction in (0, 1]", share)
    fmt = FORMATS.get(_choice(entry, "format", FORMATS.names(), where))
    backend = _string(entry, "backend", where)
    if backend not in fmt.backend_names:
        raise where.fail("backend", f"{backend!r} is not a backend of format {fmt.name!r} "
                                    f"(choose one of: {', '.join(fmt.backend_names)})")
    recipe = _choice(entry, "recipe", RECIPES.names(), where)
    if recipe not in fmt.recipes_for(backend):
        raise where.fail("recipe", f"{recipe!r} is not supported by format {fmt.name!r} on {backend} "
                                   f"(supported: {', '.join(fmt.recipes_for(backend))})")
    providers = _execution_providers(entry, fmt, backend, where)
    modalities = _string_list(entry, "modalities", where, choices=MODALITIES)
    if "text" not in modalities:
        raise where.fail("modalities", "must include 'text'", list(modalities))
    return DeviceProfile(
        name=entry["name"],
        description=_string(entry, "description", where),
        ram_gb=_number(entry, "ram_gb", where),
        bundle_memory_share=float(share),
        cpu=_parse_cpu(entry["cpu"], where),
        memory_bandwidth_gbps=_number(entry, "memory_bandwidth_gbps", where),
        accelerators=_parse_accelerators(entry["accelerators"], where),
        format=fmt.name,
        backend=backend,
        execution_providers=providers,
        recipe=recipe,
        model=_choice(entry, "model", MODEL_SIZES, where),
        max_context=_number(entry, "max_context", where, integer=True),
        vision_token_budget=_choice(entry, "vision_token_budget", VISION_TOKEN_BUDGETS, where),
        modalities=tuple(m for m in MODALITIES if m in modalities),
    )


def _execution_providers(entry: Mapping[str, Any], fmt: Any, backend: str, where: _Where) -> tuple[str, ...]:
    allowed = fmt.backend(backend).execution_providers
    if not fmt.uses_execution_providers:
        if entry.get("execution_providers"):
            raise where.fail("execution_providers", f"only applies to format onnx, not {fmt.name!r}")
        return ()
    if "execution_providers" not in entry:
        raise where.fail("execution_providers", f"is missing (format {fmt.name!r} needs it)")
    providers = _string_list(entry, "execution_providers", where, choices=allowed)
    if not providers:
        raise where.fail("execution_providers", "must list at least one provider")
    return providers
