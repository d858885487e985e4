"""Plan tier checked against reality: `edgekit plan` sizes within 10% of the files an export
really writes, for every (format, backend, recipe) an exporter writes (tests/plan_sizes.py:
one checkpoint where each kind of weight is a sizeable share, exported in the background).
"""

from __future__ import annotations

import pytest

from tests.plan_sizes import WEIGHT_FILES, Case, cases, plan_for


@pytest.mark.parametrize("case", cases(), ids=lambda c: c.id)
def test_plan_size_within_ten_percent_of_the_bundle(plan_size_bundle, plan_size_checkpoint, case: Case) -> None:
    bundle = plan_size_bundle(case)
    plan = plan_for(plan_size_checkpoint, case)
    manifest = bundle.manifest
    assert (manifest.format, manifest.backend, manifest.recipe) == (case.format, case.backend,
                                                                                     case.recipe)
    weights = sum(f.size for f in manifest.files if f.path.endswith(WEIGHT_FILES[case.format]))
    assert abs(plan.bundle_size_bytes - weights) / weights < 0.10, (plan.bundle_size_bytes, weights)
