"""The forward benchmark on a tiny checkpoint: result structure, timings, ratio and logit agreement (never speed)."""

import json
import math

import pytest

from big_vision_lite.bench.forward import (
    TARGET_RATIO,
    TORCH_IMPLS,
    bench_tokens,
    format_forward_table,
    interleaved_times,
    run_forward_bench,
)

from conftest import build_tiny_hf

BATCHES = (1, 2)
REPEATS = 3


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    folder = build_tiny_hf("gemma3", tmp_path_factory.mktemp("bench") / "gemma3")
    return run_forward_bench(str(folder), seq_len=24, batches=BATCHES, repeats=REPEATS, warmup=1)


def test_result_structure(result):
    assert result["benchmark"] == "forward"
    assert result["dtype"] == "float32" and result["seq_len"] == 24 and result["repeats"] == REPEATS
    assert result["target_ratio"] == TARGET_RATIO
    assert set(result["ours"]) >= {"scan_layers", "compiler_options"}
    env = result["env"]
    for key in ("jax", "torch", "transformers", "torch_num_threads", "cpu_count", "loadavg_start"):
        assert key in env, key
    assert env["torch_num_threads"] == env["cpu_count"] >= 1
    assert set(result["load_s"]) == {"ours", *TORCH_IMPLS}
    assert [row["batch"] for row in result["batches"]] == list(BATCHES)
    json.dumps(result)  # the CLI writes it as JSON


def test_timings_and_ratio(result):
    for row in result["batches"]:
        assert row["compile_s"] > 0 and row["lower_s"] > 0
        for side in ("ours", *TORCH_IMPLS):
            times = row["times_ms"][side]
            assert len(times) == REPEATS and all(t > 0 for t in times)
            assert row[f"{side}_ms"] == pytest.approx(sorted(times)[REPEATS // 2], abs=0.01)  # the median
        expected = row["ours_ms"] / min(row[f"{impl}_ms"] for impl in TORCH_IMPLS)
        assert row["ratio"] == pytest.approx(expected, rel=1e-3, abs=1e-4)
        assert row["ok"] == (row["ratio"] <= TARGET_RATIO)
    assert result["ok"] == all(row["ok"] for row in result["batches"])


def test_logits_agree(result):
    assert result["logits_agree"]
    for row in result["batches"]:
        for impl in TORCH_IMPLS:
            agreement = row["logits"][impl]
            assert agreement["agree"] and agreement["argmax_match"], (row["batch"], impl, agreement)
            assert math.isfinite(agreement["max_abs_diff"]) and agreement["max_abs_diff"] < 1e-4


def test_table(result):
    table = format_forward_table(result)
    assert "ours_ms" in table and "sdpa_ms" in table and "eager_ms" in table
    assert len([line for line in table.splitlines() if line.strip().startswith(("1 ", "2 "))]) == len(BATCHES)


def test_table_warns_when_busy(result):
    busy = {**result, "batches": [{**row, "background_cpu": 0.5} for row in result["batches"]]}
    assert "warning: other processes used up to 50%" in format_forward_table(busy)


def test_helpers():
    tokens = bench_tokens(50, 3, 7, seed=1)
    assert tokens.shape == (3, 7) and tokens.dtype.name == "int32" and tokens.min() >= 1 and tokens.max() < 50
    assert (tokens == bench_tokens(50, 3, 7, seed=1)).all()
    calls = []
    times = interleaved_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=2)
    assert calls == ["a", "b", "b", "a"] and all(len(v) == 2 for v in times.values())


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        run_forward_bench("unused", seq_len=0)
    with pytest.raises(ValueError):
        run_forward_bench("unused", batches=())
