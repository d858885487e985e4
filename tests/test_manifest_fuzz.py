"""Fuzz the manifest loader: a mutated manifest loads or raises BundleError, nothing else.

A manifest comes from a file anyone can edit; a TypeError or KeyError from the loader
would reach the user as an internal error (exit 1 with a traceback) instead of one line.
Bounded so it runs in a few seconds in CI.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgekit.errors import BundleError
from edgekit.manifest import Manifest
from tests.test_bundle import make_manifest

BASE: dict[str, Any] = json.loads(json.dumps(make_manifest().to_dict()))

ODD_STRINGS = st.sampled_from(["", " ", "..", "../x", "/etc/passwd", "manifest.json", "a\\b", "a//b", "\x00",
                               "é" * 3, "1e309", "NaN", "null", "true", "256", "onnx ", "ONNX", "x" * 10_000])
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**63, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20), ODD_STRINGS,
)
JUNK = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                    max_leaves=12)


def _containers(value: Any, path: tuple = ()) -> list[tuple]:
    """Paths of every dict and list inside `value` (the root included)."""
    out = [path] if isinstance(value, (dict, list)) else []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        out += _containers(child, (*path, key))
    return out


def _at(value: Any, path: tuple) -> Any:
    for key in path:
        value = value[key]
    return value


@st.composite
def mutated(draw: st.DrawFn) -> Any:
    data = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        if not isinstance(data, (dict, list)):
            break
        paths = _containers(data)
        path = draw(st.sampled_from(paths))
        node = _at(data, path)
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        op = draw(st.sampled_from(["drop", "replace", "add", "swap_type"] if keys else ["add"]))
        if op == "add":
            if isinstance(node, dict):
                node[draw(st.text(max_size=8))] = draw(JUNK)
            else:
                node.append(draw(JUNK))
            continue
        key = draw(st.sampled_from(keys))
        if op == "drop":
            del node[key]
        elif op == "replace":
            node[key] = draw(JUNK)
        else:  # the same value in another JSON type: 256 -> "256", [..] -> {..}, {..} -> [..]
            old = node[key]
            node[key] = (list(old.values()) if isinstance(old, dict) else {str(i): v for i, v in enumerate(old)}
                         if isinstance(old, list) else str(old) if not isinstance(old, str) else [old])
    if draw(st.booleans()) and draw(st.integers(0, 9)) == 0:
        return draw(JUNK)  # sometimes not a manifest at all
    return data


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 300)), deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutated())
def test_mutated_manifest_loads_or_raises_bundle_error(data: Any) -> None:
    try:
        manifest = Manifest.from_dict(data)
    except BundleError as exc:
        assert "\n" not in str(exc)  # one line, as the CLI prints it
        return
    # What loads must write back out as JSON and load to the same manifest (compared as JSON: NaN != NaN).
    text = json.dumps(manifest.to_dict(), sort_keys=True)
    assert json.dumps(Manifest.from_dict(json.loads(text)).to_dict(), sort_keys=True) == text
