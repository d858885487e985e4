"""Device profiles: devices.yaml, defined once as the pydantic models below.

Adding a device means adding an entry to devices.yaml, nothing else; a user adds or
replaces profiles with their own files (`--devices FILE`, EDGEKIT_DEVICES), never by
editing the installed package. Every key is checked when a file loads: the models check
each key (unknown or missing keys, types, ranges, names from edgekit's tables), and
_check_profile what spans keys — a recipe the format cannot export on that backend, a
backend the format has no runtime for, a vision budget the model's family does not offer,
execution providers. Errors name the file, the profile and the key. devices.schema.json
is generated from the models (`python -m edgekit.profiles --schema`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence

import yaml
from annotated_types import Gt, Le
from pydantic import AfterValidator, ConfigDict, Strict, StringConstraints, ValidationError

from edgekit.contract import Float, Frozen, first_error, schema_main, schema_text
from edgekit.errors import DeviceProfileError
from edgekit.formats import FORMATS
from edgekit.models import FAMILIES, model_sizes
from edgekit.models.family import MODALITIES
from edgekit.recipes import RECIPES
from edgekit.registry import Registry

PACKAGED_PROFILES = Path(__file__).resolve().parent / "devices.yaml"
DEVICES_ENV = "EDGEKIT_DEVICES"  # the user's profile files, joined by os.pathsep

MODEL_SIZES: tuple[str, ...] = model_sizes()
# Soft-token budgets any family's image processor offers; a profile's must be its model's.
VISION_TOKEN_BUDGETS: tuple[int, ...] = tuple(sorted({b for f in FAMILIES for b in f.vision_token_budgets}))
CPU_ARCHES: tuple[str, ...] = ("arm64", "x86_64")
# Closed so a typo ("dotprd") fails on load instead of silently disabling a kernel.
ISA_FEATURES: tuple[str, ...] = (
    "neon", "fp16", "dotprod", "i8mm", "bf16", "sve", "sve2", "sme", "sme2", "avx2", "avx512", "avx512_vnni", "amx",
)
ACCELERATOR_KINDS: tuple[str, ...] = ("gpu", "npu")


class _Entry(Frozen):
    """A devices.yaml mapping: an unknown key is a typo, so it fails instead of being ignored."""

    model_config = ConfigDict(extra="forbid")


def _unique(items: tuple[Any, ...]) -> tuple[Any, ...]:
    if len(set(items)) != len(items):
        raise ValueError("must not repeat an entry")
    return items


def _in_model_order(modalities: tuple[str, ...]) -> tuple[str, ...]:
    if "text" not in modalities:
        raise ValueError("must include 'text'")
    return tuple(m for m in MODALITIES if m in modalities)


PositiveInt = Annotated[int, Strict(), Gt(0)]
PositiveNumber = Annotated[Float, Gt(0)]
NonEmpty = Annotated[str, Strict(), StringConstraints(strip_whitespace=False, min_length=1, pattern=r"\S")]


def _names(*choices: Any) -> Any:
    return Literal[choices]  # Literal[("a", "b")] is Literal["a", "b"]: an enum in the schema


class CpuSpec(_Entry):
    arch: _names(*CPU_ARCHES)
    cores: PositiveInt
    core: NonEmpty  # core names, e.g. "4x Cortex-A76"
    isa: Annotated[tuple[_names(*ISA_FEATURES), ...], AfterValidator(_unique)]


class Accelerator(_Entry):
    kind: _names(*ACCELERATOR_KINDS)
    name: NonEmpty
    tops: PositiveNumber | None = None  # vendor's peak int8 TOPS, where published


class DeviceProfile(_Entry):
    name: NonEmpty
    description: NonEmpty
    ram_gb: PositiveNumber
    bundle_memory_share: Annotated[Float, Gt(0), Le(1)]  # fraction of RAM one bundle may use
    cpu: CpuSpec
    memory_bandwidth_gbps: PositiveNumber
    accelerators: tuple[Accelerator, ...]
    format: _names(*FORMATS.names())
    backend: NonEmpty  # one of the format's backends (checked in _check_profile)
    # ONNX Runtime EPs in priority order; () for other formats.
    execution_providers: Annotated[tuple[NonEmpty, ...], AfterValidator(_unique)] = ()
    recipe: _names(*RECIPES.names())
    model: _names(*MODEL_SIZES)  # recommended model size
    max_context: PositiveInt
    vision_token_budget: _names(*VISION_TOKEN_BUDGETS)
    modalities: Annotated[tuple[_names(*MODALITIES), ...], AfterValidator(_unique), AfterValidator(_in_model_order)]

    @property
    def memory_budget_bytes(self) -> int:
        # Devices sell "8 GB" of RAM meaning 8 GiB.
        return int(self.ram_gb * 1024**3 * self.bundle_memory_share)

    def to_dict(self) -> dict[str, Any]:
        return {**self.model_dump(mode="json"), "memory_budget_bytes": self.memory_budget_bytes}


class DevicesFile(_Entry):
    """The whole devices.yaml; only for the schema: the loader checks entry by entry to name each."""

    devices: tuple[DeviceProfile, ...]


def schema_json() -> str:
    """devices.schema.json, generated: `python -m edgekit.profiles --schema > edgekit/devices.schema.json`."""
    return schema_text(DevicesFile, "edgekit device profiles (devices.yaml)", "urn:edgekit:devices",
                       mode="validation")


class ProfileRegistry(Registry[DeviceProfile]):
    """The profiles of devices.yaml and the user's files; `.get(name)` raises DeviceProfileError listing names."""

    def __init__(self, profiles: list[DeviceProfile], *, sources: tuple[Path, ...]) -> None:
        super().__init__("device", profiles, error=DeviceProfileError)
        self.sources = sources  # in the order read: later files override earlier ones by name


def user_profile_files(devices: Sequence[Path | str] = ()) -> tuple[Path, ...]:
    """EDGEKIT_DEVICES (paths joined by os.pathsep), then `--devices` files: the later wins."""
    env = os.environ.get(DEVICES_ENV, "")
    return tuple(Path(p) for p in env.split(os.pathsep) if p) + tuple(Path(p) for p in devices)


def load_profiles(path: Path | None = None, *, devices: Sequence[Path | str] = ()) -> ProfileRegistry:
    """Read and check devices.yaml (the packaged one unless `path` is given), then the user's
    files (EDGEKIT_DEVICES, then `devices`), each adding profiles or replacing one by name."""
    base = Path(path) if path is not None else PACKAGED_PROFILES
    # A packaged file is named by its file name; a user's file by the path they gave.
    files = [(base, f"{base.name}: ")] + [(p, f"{p}: ") for p in user_profile_files(devices)]
    profiles: dict[str, DeviceProfile] = {}
    for file, where in files:
        for profile in _read_file(file, where):
            profiles[profile.name] = profile
    return ProfileRegistry(list(profiles.values()), sources=tuple(f for f, _ in files))


def _read_file(path: Path, where: str) -> list[DeviceProfile]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise DeviceProfileError(f"cannot read device profiles {path}: {reason}") from None
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
        prefix = f"{where}profile {entry['name']!r}: "
        try:
            profile = DeviceProfile.model_validate(entry)
        except ValidationError as exc:
            key, problem = first_error(exc)
            raise DeviceProfileError(f"{prefix}key '{key}' {problem}") from None
        _check_profile(profile, prefix)
        profiles.append(profile)
    return profiles


# --- checks across keys (each key alone is checked by the models above) ----------------


def _check_profile(p: DeviceProfile, prefix: str) -> None:
    def fail(key: str, message: str) -> DeviceProfileError:
        return DeviceProfileError(f"{prefix}key '{key}' {message}")

    fmt = FORMATS.get(p.format)
    if p.backend not in fmt.backend_names:
        raise fail("backend", f"{p.backend!r} is not a backend of format {fmt.name!r} "
                              f"(choose one of: {', '.join(fmt.backend_names)})")
    if p.recipe not in fmt.recipes_for(p.backend):
        raise fail("recipe", f"{p.recipe!r} is not supported by format {fmt.name!r} on {p.backend} "
                             f"(supported: {', '.join(fmt.recipes_for(p.backend))})")
    family = next(f for f in FAMILIES if p.model in f.sizes)
    if p.vision_token_budget not in family.vision_token_budgets:
        raise fail("vision_token_budget", f"{p.vision_token_budget} is not offered by {family.display_name} "
                                          f"(choose one of: {', '.join(map(str, family.vision_token_budgets))})")
    allowed = fmt.backend(p.backend).execution_providers
    if not fmt.uses_execution_providers:
        if p.execution_providers:
            raise fail("execution_providers", f"only applies to format onnx, not {fmt.name!r}")
        return
    if not p.execution_providers:
        raise fail("execution_providers", f"must list at least one provider (format {fmt.name!r} needs it)")
    for provider in p.execution_providers:
        if provider not in allowed:
            raise fail("execution_providers", f"has unknown entry {provider!r} (choose from {', '.join(allowed)})")


if __name__ == "__main__":
    raise SystemExit(schema_main(schema_json))
