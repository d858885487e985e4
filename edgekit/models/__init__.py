"""Model families: one folder each (edgekit/models/<family>/) and one line in FAMILIES.

    family_for_config(config)   the family that reads a config.json (by its model_type)
    get_family(name)            by the name a bundle manifest records (model.architecture)
"""

from __future__ import annotations

from typing import Any, Mapping

from edgekit.errors import CheckpointError
from edgekit.models import gemma4
from edgekit.models.family import ModelFamily
from edgekit.registry import Registry

FAMILIES: Registry[ModelFamily] = Registry("model family", (
    gemma4.FAMILY,
), error=CheckpointError)


def family_for_config(config: Mapping[str, Any]) -> ModelFamily:
    """The family whose model_types include config['model_type'] (CheckpointError otherwise)."""
    model_type = config.get("model_type")
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    known = sorted(t for f in FAMILIES for t in f.model_types)
    families = " or ".join(f.display_name for f in FAMILIES)
    raise CheckpointError(f"a {model_type!r} checkpoint, not {families} (model_type must be one of: "
                          f"{', '.join(known)})")


def get_family(name: str) -> ModelFamily:
    return FAMILIES.get(name)


def model_sizes() -> tuple[str, ...]:
    """Every family's released size names, in registry order."""
    return tuple(size for family in FAMILIES for size in family.sizes)


def get_preset(name: str) -> Any:
    """A random-weight preset of any family, by name (InputError listing them all)."""
    from edgekit.errors import InputError

    for family in FAMILIES:
        if name in family.presets:
            return family.presets[name]
    known = [p for family in FAMILIES for p in family.presets]
    raise InputError(f"unknown preset {name!r}; choose one of: {', '.join(known)}")


def preset_names() -> tuple[str, ...]:
    return tuple(p for family in FAMILIES for p in family.presets)
