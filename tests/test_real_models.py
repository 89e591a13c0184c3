"""The golden tests that matter most: real Google / HuggingFaceTB weights, ours against transformers."""

import pytest

from big_vision_lite.parity import run_parity

pytestmark = pytest.mark.real


@pytest.mark.parametrize("name", ["gemma3-270m", "smollm2-135m"])
def test_real_model_parity_float32(name):
    report = run_parity(name)
    print(report.table())
    assert report.tolerance == 1e-4
    assert report.max_rel_err <= 1e-4, report.table()
    assert report.greedy_match, report.table()
    assert report.ok


@pytest.mark.parametrize("name", ["gemma3-270m", "smollm2-135m"])
def test_real_model_parity_bfloat16_against_the_float32_truth(name):
    """In bfloat16 every stage of ours is within TRUTH_FACTOR of transformers' bfloat16 distance from transformers
    in float32, and greedy ids part only at near-ties."""
    report = run_parity(name, "bfloat16")
    print(report.table())
    assert report.truth_dtype == "float32" and len(report.truth) == len(report.layers)
    assert all(t.passes for t in report.truth), report.table()
    assert all(d.near_tie for d in report.divergences), report.table()
    assert report.ok
