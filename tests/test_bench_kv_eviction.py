"""The kv-eviction benchmark on the real SmolLM2 with short settings: the JSON contract, figures that must hold
whatever the speed (the full cache against itself, budgets honoured), the plot, and refused input."""

import json
import sys

import matplotlib
import numpy as np
import pytest

from big_vision_lite.bench import kv_eviction as bench
from big_vision_lite.cli import main


@pytest.fixture(scope="module")
def smollm2_cache(converted, packaged_cache):
    converted("smollm2-135m")
    return packaged_cache


@pytest.mark.real
def test_bench_on_real_text(smollm2_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BVL_CACHE_DIR", str(smollm2_cache))
    monkeypatch.setattr(bench, "MIN_DOCUMENT_TOKENS", 200)  # the README's figures use 2048 tokens
    monkeypatch.setattr(bench, "SPEED_STEPS", 4)
    policies = (bench.EvictionPolicy("streaming", 4, 16), bench.EvictionPolicy("recently_activated", 4, 16))
    result = bench.run_kv_eviction_bench("smollm2-135m", text_files=["jargon"], max_tokens=256, budgets=(0.3, 0.6),
                                         policies=policies, greedy_steps=8, passkey_tokens=200, speed_capacity=64,
                                         speed_lengths=(64, 128))
    assert result["documents"] == [{"name": "jargon_hack.txt", "tokens": 256, "available": result["documents"][0][
        "available"]}] and result["documents"][0]["available"] > 3000
    assert result["benchmark"] == "kv_eviction" and isinstance(result["ok"], bool) and result["env"]["cpu_count"] >= 1
    assert len(result["results"]) == 4
    for row in result["results"]:
        assert row["policy"] in ("streaming", "recently_activated")
        for key in ("budget", "ppl_ratio", "kl_mean", "kl_p99", "top1_agreement", "mass_lost",
                    "greedy_agreement", "memory", "passkey"):
            assert np.isfinite(row[key]), key
        assert row["kl_mean"] > 0 and 0 < row["mass_lost"] < 1 and 0 <= row["top1_agreement"] <= 1
        assert 0 < row["memory"] < 1  # tokens held per head, over the full cache's, mean of the run
        assert len(row["passkey_by_depth"]) == 3
    streaming = [r for r in result["results"] if r["policy"] == "streaming"]
    assert streaming[0]["mass_lost"] > streaming[1]["mass_lost"]  # a smaller cache loses more attention
    assert streaming[0]["forced_share"] == 1.0  # every streaming eviction is a capacity one
    speed = result["speed"]
    assert [r["context"] for r in speed["crossover"]] == [64, 128] and len(speed["overhead"]) == 2
    assert all(r["step_ms"] > 0 for r in speed["overhead"])
    table = bench.format_kv_eviction_table(result)
    assert "| recently_activated (p 0.95, t 50) | 30% |" in table
    bench.plot_kv_eviction(result, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 20_000
    json.dumps(result)  # serialisable as the CLI writes it


@pytest.mark.real
def test_bad_input_is_refused(smollm2_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BVL_CACHE_DIR", str(smollm2_cache))
    short = tmp_path / "short.txt"
    short.write_text("Too short to measure anything. " * 10)
    cases = [
        (["--text-file", str(tmp_path / "missing.txt")], "missing.txt does not exist"),
        (["--text-file", str(short)], "tokens with smollm2-135m's tokenizer; the evaluation needs at least 2000"),
        (["--budgets", "0.1", "1.5"], "argument --budgets: expected a finite number in (0, 1), got 1.5"),
        (["--policies", "lru"], "--policies ['lru'] not among"),
        (["--max-tokens", "500"], "max_tokens must be at least 2000, got 500"),
        (["--max-tokens", "-1"], "argument --max-tokens: expected an integer in [1, inf), got -1"),
        (["--budgets", "0.02"], "capacity 40 (row 0) must exceed num_sinks + recent_window = 68"),
    ]
    for extra, message in cases:
        assert main(["bench", "kv-eviction", "smollm2-135m", *extra]) == 2
        assert message in capsys.readouterr().err, extra


def test_plot_leaves_the_matplotlib_session_alone(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the benchmark must not change the session's matplotlib backend")

    monkeypatch.setattr(matplotlib, "use", refuse)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)  # importing pyplot now fails
    rows = [bench._policy_fields(policy) | {"budget": budget, "memory": budget, "ppl_ratio": 1 + 1 / budget,
                                            "top1_agreement": 1 - budget / 2}
            for policy in bench.POLICY_SET[:2] for budget in (0.2, 0.5)]
    crossover = [{"context": n, "full_ms": n / 100, "evicting_ms": 3.0} for n in (256, 512, 1024)]
    result = {"model": "toy", "results": rows, "speed": {"capacity": 512, "crossover": crossover}}
    bench.plot_kv_eviction(result, tmp_path / "plots" / "kv.png")
    assert (tmp_path / "plots" / "kv.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
