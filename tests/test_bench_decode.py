"""The decode benchmark on a tiny checkpoint: the JSON contract, ids, derived figures and the table (never speed)."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

from big_vision_lite.bench.decode import (
    TARGET_BANDWIDTH_FRACTION,
    TARGET_SPEEDUP,
    agree_prefix,
    decode_bytes_per_step,
    decode_flops_per_step,
    format_decode_table,
    mean_cache_length,
    measure_matmul_rate,
    run_decode_bench,
    targets_met,
)
from big_vision_lite.models.gemma import DecoderConfig
from big_vision_lite.utils.timing import CompileSpans

BATCHES = (1, 8)
PROMPT_LEN, NEW_TOKENS, REPEATS = 12, 8, 1
TORCH_SIDES = ("generate_sdpa", "static_sdpa")


@pytest.fixture(scope="module")
def folder(tiny_checkpoints):
    return tiny_checkpoints["gemma3"]  # sliding layers (window 8) shorter than the mean cache length (16)


@pytest.fixture(scope="module")
def result(folder) -> dict:
    return run_decode_bench(str(folder), prompt_len=PROMPT_LEN, new_tokens=NEW_TOKENS, batches=BATCHES,
                            repeats=REPEATS, warmup=0, bandwidth_gib=1 / 16, bandwidth_repeats=2)


def test_json_contract(result):
    for key in ("speedup_b1", "speedup_b8", "tokens_match", "bandwidth_gbps", "bytes_per_step_b1",
                "bytes_per_step_b8", "bandwidth_fraction_b1", "dtype", "env", "ok", "targets_met", "batches"):
        assert key in result, key
    assert result["benchmark"] == "decode" and result["dtype"] == "float32" and isinstance(result["ok"], bool)
    assert (result["prompt_len"], result["new_tokens"], result["repeats"]) == (PROMPT_LEN, NEW_TOKENS, REPEATS)
    assert result["env"]["torch_num_threads"] == result["env"]["cpu_count"] >= 1
    assert [row["batch"] for row in result["batches"]] == list(BATCHES)
    assert result["bandwidth_gbps"] > 0 and len(result["bandwidth"]) == 1 + len(BATCHES)  # before, after each batch
    probes = [p[k] for p in result["bandwidth"] for k in ("jax_matvec", "torch_sum")]
    assert result["bandwidth_gbps"] == pytest.approx(np.median(probes), abs=0.01)  # the floor uses the median
    assert result["bandwidth_max_gbps"] == max(probes)
    json.dumps(result)  # the CLI writes it as JSON


def test_ids_match_transformers(result):
    assert result["tokens_match"]
    for row in result["batches"]:
        assert row["tokens_match"] and row["torch_sides_agree"]
        assert row["agree_prefix"] == [NEW_TOKENS] * row["batch"]


def test_timings_and_speedup(result):
    for row in result["batches"]:
        batch = row["batch"]
        assert row["compile_s"] > 0 and row["first_call_s"] >= row["compile_s"] and row["recompile_s"] >= 0
        for side in ("ours", "ours_1", *TORCH_SIDES):
            assert len(row["times_s"][side]) == REPEATS and all(t > 0 for t in row["times_s"][side])
        for side in ("ours", *TORCH_SIDES):
            assert row["tokens_per_s"][side] > 0
            assert row["tokens_per_s"][side] == pytest.approx(batch * NEW_TOKENS / row["seconds"][side], rel=1e-2)
        # Ours is net of any compilation inside the timed call.
        expected_ours = row["times_s"]["ours"][0] - row["recompile_times_s"]["ours"][0]
        assert row["seconds"]["ours"] == pytest.approx(expected_ours, abs=1e-3)
        best = max(row["tokens_per_s"][side] for side in TORCH_SIDES)
        assert row["tokens_per_s"][row["best_torch"]] == best
        assert row["speedup"] == pytest.approx(row["tokens_per_s"]["ours"] / best, rel=1e-3)
        assert result[f"speedup_b{batch}"] == row["speedup"]
        assert row["static_sdpa_step_ms"] > 0 and row["static_sdpa_prefill_ms"] > 0
        assert row["ours_step_ms"] is None or row["ours_step_ms"] > 0


def test_bytes_per_step_is_a_hand_count(result, folder):
    hf = json.loads((folder / "config.json").read_text())
    v, d, f, n_layers = hf["vocab_size"], hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"]
    n, k, h, window = hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"], hf["sliding_window"]
    # q, kv, out projections, q/k norms, 4 norms around attention and MLP, gate+up and down projections.
    layer = n * d * h + 2 * k * d * h + n * h * d + 2 * h + 4 * d + 2 * d * f + f * d
    params = v * d + n_layers * layer + d  # tied embedding (read in full for the logits) and the final norm
    mean_len = PROMPT_LEN + NEW_TOKENS / 2
    keys = sum(min(mean_len, window) if t == "sliding_attention" else mean_len for t in hf["layer_types"])
    assert result["mean_cache_length"] == mean_len
    for row in result["batches"]:
        b = row["batch"]
        weights = 4 * (params + b * d)  # float32; the input-embedding lookup reads B rows
        kv = 4 * 2 * b * k * h * keys
        assert row["bytes_per_step"] == {"weights": weights, "kv_cache": kv, "total": weights + kv}
        assert result[f"bytes_per_step_b{b}"] == weights + kv
        floor_ms = (weights + kv) / (result["bandwidth_gbps"] * 1e9) * 1e3
        assert row["floor_step_ms"] == pytest.approx(floor_ms, rel=1e-2, abs=1e-3)
        if row["ours_step_ms"] is not None:
            assert row["bandwidth_fraction"] == pytest.approx(row["floor_step_ms"] / row["ours_step_ms"], rel=0.05)


def test_bfloat16_targets_are_parity_with_pytorch_and_no_floor():
    rows = [{"batch": 1, "speedup": 1.01, "bandwidth_fraction": 0.1}, {"batch": 8, "speedup": 0.99,
                                                                        "bandwidth_fraction": 0.1}]
    assert targets_met(rows, "bfloat16") == {"speedup_b1": True, "speedup_b8": False}
    assert targets_met(rows, "float32") == {"speedup_b1": False, "speedup_b8": False, "bandwidth_fraction_b1": False}


def test_ok_follows_targets(result):
    met = result["targets_met"]
    assert met["speedup_b1"] == (result["speedup_b1"] >= TARGET_SPEEDUP[1])
    assert met["speedup_b8"] == (result["speedup_b8"] >= TARGET_SPEEDUP[8])
    assert met["bandwidth_fraction_b1"] == ((result["bandwidth_fraction_b1"] or 0.0) >= TARGET_BANDWIDTH_FRACTION)
    assert result["ok"] == (all(met.values()) and result["tokens_match"])


def test_table(result):
    table = format_decode_table(result)
    assert "generate_sdpa" in table and "static_sdpa" in table and "speedup" in table and "GB/s" in table
    assert len([line for line in table.splitlines() if line.strip().startswith(("1 ", "8 "))]) == len(BATCHES)


def test_table_warnings(result):
    rows = [{**row, "background_cpu": 0.5, "recompile_s": 0.25, "tokens_match": False, "agree_prefix": [3]}
            for row in result["batches"]]
    table = format_decode_table({**result, "batches": rows, "tokens_match": False})
    assert "warning: other processes used up to 50%" in table
    assert "compiled again inside timed calls" in table and "leading ids that agree per row: [3]" in table


def test_compile_spans_union():
    spans = CompileSpans()
    spans.spans = [(0.0, 1.0), (0.5, 2.0), (0.6, 0.7), (5.0, 6.0)]  # nested and overlapping spans count once
    assert spans.seconds_since(0) == pytest.approx(3.0)
    assert spans.seconds_since(3) == pytest.approx(1.0) and spans.seconds_since(4) == 0.0


def test_helpers():
    assert agree_prefix(np.array([[1, 2, 3], [1, 5, 3]]), np.array([[1, 2, 3], [1, 2, 3]])) == [3, 1]
    assert mean_cache_length(64, 128) == 128.0
    cfg = DecoderConfig(vocab_size=10, width=4, depth=2, mlp_dim=8, num_heads=2, num_kv_heads=1, head_dim=2,
                        tie_embeddings=False, layer_types=("sliding", "full"), sliding_window=3)
    params = {"embedder": {"input_embedding": jnp.zeros((10, 4), jnp.bfloat16),
                           "output_embedding": jnp.zeros((10, 4), jnp.bfloat16)},
              "final_norm": {"scale": jnp.zeros((4,), jnp.bfloat16)}}
    counted = decode_bytes_per_step(cfg, params, batch=2, cache_length=5.0, cache_dtype="bfloat16")
    # Untied: the output head in full, 2 looked-up input rows, the norm; keys: min(5, 3) + 5 layers.
    assert counted == {"weights": 2 * (40 + 2 * 4 + 4), "kv_cache": 2 * 2 * 2 * 1 * 2 * 8.0,
                       "total": 2 * (40 + 2 * 4 + 4) + 2 * 2 * 2 * 1 * 2 * 8.0}
    # FLOPs: the untied head (10 x 4) is the only matmul weight here, for 2 tokens; attention: 4 x B x N x H x keys.
    assert decode_flops_per_step(cfg, params, batch=2, cache_length=5.0) == 2 * 40 * 2 + 4 * 2 * 2 * 2 * 8.0
    layers = {"layers": {"attn": {"q_einsum": {"w": jnp.zeros((2, 4, 2))}}, "pre_attention_norm": {"scale":
                         jnp.zeros((2, 4))}}}  # a scanned stack: norm scales are 2-D, still not matmuls
    tied = dataclasses.replace(cfg, tie_embeddings=True)
    params_tied = {"embedder": {"input_embedding": jnp.zeros((10, 4))}, **layers}
    assert decode_flops_per_step(tied, params_tied, batch=1, cache_length=5.0) == 2 * (16 + 40) + 4 * 2 * 2 * 8.0


def test_matmul_rate_is_a_positive_rate():
    assert measure_matmul_rate("float32", size=64, repeats=2) > 0


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        run_decode_bench("unused", new_tokens=1)
    with pytest.raises(ValueError):
        run_decode_bench("unused", batches=())
    with pytest.raises(ValueError):
        run_decode_bench("unused", attn_implementations=())
