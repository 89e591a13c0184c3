"""The SigLIP loss benchmark at tiny sizes: the JSON contract, the derived ratios and the table (never speed)."""

import json

import numpy as np
import pytest

from big_vision_lite.bench.siglip_loss import (
    AGREE_TOL,
    IMPLS,
    TARGETS,
    format_siglip_loss_table,
    max_rel_diff,
    rss_in_subprocess,
    run_siglip_loss_bench,
)

BATCHES, DIM, BLOCK = (16, 40), 8, 16  # 40 is not a multiple of the block: the padded path runs too


@pytest.fixture(scope="module")
def result() -> dict:
    return run_siglip_loss_bench(BATCHES, dim=DIM, block_size=BLOCK, repeats=2, warmup=1, measure_rss=False)


def test_json_contract(result):
    for key in ("rows", "per_batch", "memory_ratio", "time_ratio", "max_rel_diff", "targets", "targets_met", "ok",
                "env", "block_size", "dim"):
        assert key in result, key
    assert result["benchmark"] == "siglip_loss" and (result["dim"], result["block_size"]) == (DIM, BLOCK)
    assert isinstance(result["ok"], bool)
    assert [(row["batch"], row["impl"]) for row in result["rows"]] == [(b, i) for b in BATCHES for i in IMPLS]
    assert result["env"]["cpu_count"] >= 1 and result["env"]["jax_backend"] == "cpu"
    assert set(result["targets_met"]) == set(TARGETS) and result["targets"]["at_batch"] == BATCHES[-1]
    json.dumps(result)  # the CLI writes it as JSON


def test_rows_and_ratios(result):
    rows = {(row["batch"], row["impl"]): row for row in result["rows"]}
    for row in rows.values():
        mem = row["memory_bytes"]
        assert mem["peak"] == mem["temp"] + mem["argument"] + mem["output"] > 0
        assert len(row["times_ms"]) == 2 and row["median_ms"] > 0 and row["compile_s"] > 0
        assert "rss" not in row
    last = BATCHES[-1]
    dense, blocked = rows[(last, "dense")], rows[(last, "blocked")]
    assert result["memory_ratio"] == pytest.approx(dense["memory_bytes"]["peak"] / blocked["memory_bytes"]["peak"],
                                                   rel=1e-3)
    assert result["time_ratio"] == pytest.approx(blocked["median_ms"] / dense["median_ms"], rel=1e-2, abs=1e-3)
    assert result["max_rel_diff"] <= AGREE_TOL and result["agree"]
    assert all(pb["stats_max_abs_diff"] < 1e-4 for pb in result["per_batch"])
    met = result["targets_met"]
    assert met["memory_ratio"] == (result["memory_ratio"] >= TARGETS["memory_ratio"])
    assert result["ok"] == (all(met.values()) and result["agree"])


def test_table(result):
    table = format_siglip_loss_table(result)
    assert "memory_ratio" in table and "time_ratio" in table
    for b in BATCHES:
        assert f"{b:>6}   dense" in table and f"{b:>6} blocked" in table


def test_table_warns_when_busy(result):
    busy = {**result, "per_batch": [{**pb, "background_cpu": 0.4} for pb in result["per_batch"]]}
    assert "warning: other processes used up to 40% of the CPUs while timing" in format_siglip_loss_table(busy)
    quiet = {**result, "per_batch": [{**pb, "background_cpu": 0.0} for pb in result["per_batch"]]}
    assert "warning" not in format_siglip_loss_table(quiet)


def test_rss_probe_in_subprocess():
    rss = rss_in_subprocess("blocked", 24, DIM, 8)
    assert "error" not in rss, rss
    assert rss["peak_rss_gib"] > 0 and 0 <= rss["rss_growth_gib"] <= rss["peak_rss_gib"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="block_size"):
        run_siglip_loss_bench((8,), dim=4, block_size=0)


def test_a_nan_gradient_breaks_the_agreement():
    ref = (np.float32(1.0), np.ones(3, np.float32))
    assert max_rel_diff(ref, ref) == 0.0
    assert np.isnan(max_rel_diff(ref, (np.float32(1.0), np.array([1.0, np.nan, 1.0], np.float32))))
    assert not max_rel_diff(ref, (np.float32(np.nan), np.ones(3, np.float32))) <= AGREE_TOL
