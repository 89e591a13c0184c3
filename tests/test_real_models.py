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
