"""The forward benchmark on a tiny checkpoint: result structure, timings, ratio and logit agreement (never speed)."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from big_vision_lite.bench.forward import (
    TARGET_RATIO,
    TORCH_IMPLS,
    format_forward_table,
    prefill_logits,
    run_forward_bench,
)
from big_vision_lite.bench.harness import bench_tokens
from big_vision_lite.checkpoints import load
from big_vision_lite.cli import main

from conftest import build_tiny_hf

BATCHES = (1, 2)
REPEATS = 3


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    folder = build_tiny_hf("gemma3", tmp_path_factory.mktemp("bench") / "gemma3")
    return run_forward_bench(str(folder), seq_len=24, batches=BATCHES, repeats=REPEATS, warmup=1)


def test_result_structure(result):
    assert result["benchmark"] == "forward" and isinstance(result["ok"], bool)
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


def test_timed_function_is_the_last_logits_of_a_full_forward(tiny_checkpoints):
    loaded = load(tiny_checkpoints["gemma3"], "float32")
    tokens = jnp.asarray(bench_tokens(loaded.config.vocab_size, 2, 10))
    mask = jnp.ones(tokens.shape, bool)
    last = prefill_logits(loaded.module, loaded.params, tokens, mask)
    positions = jnp.broadcast_to(jnp.arange(10), tokens.shape)
    causal = jnp.broadcast_to(jnp.tril(jnp.ones((10, 10), bool)), (2, 10, 10))
    every = loaded.module.apply({"params": loaded.params}, tokens, positions, causal, None)[0]
    assert last.shape == (2, 1, loaded.config.vocab_size) and last.dtype == jnp.float32
    np.testing.assert_allclose(last, every[:, -1:], rtol=1e-5, atol=1e-5)


def test_cli_prints_the_table_and_writes_the_json(tiny_checkpoints, tmp_path, capsys):
    path = tmp_path / "out" / "forward.json"
    status = main(["bench", "forward", str(tiny_checkpoints["gemma3"]), "--seq-len", "8", "--json", str(path)])
    written = json.loads(path.read_text())
    assert written["benchmark"] == "forward" and written["seq_len"] == 8
    assert status == (0 if written["ok"] else 1)
    assert "ratio = ours / min(eager, sdpa)" in capsys.readouterr().out


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        run_forward_bench("unused", seq_len=0)
    with pytest.raises(ValueError):
        run_forward_bench("unused", batches=())
