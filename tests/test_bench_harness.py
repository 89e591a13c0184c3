"""The bench harness: interleaved timing, the busy warning, the environment record, the result contract and what
`report` does with a result (print, JSON, exit status)."""

import json

import pytest

from big_vision_lite.bench import harness


def test_interleaved_times_rotates_the_order():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = harness.interleaved_times(fns, repeats=4)
    assert calls == list("abc" "bca" "cab" "abc")
    assert set(times) == set("abc") and all(len(ts) == 4 and min(ts) >= 0 for ts in times.values())


def test_background_cpu_is_the_others_share_of_the_machine(monkeypatch):
    """(busy CPU-seconds of the machine, of this process, wall seconds): between the two readings the machine was
    busy 4 s, 1 of them ours, over 2 s on 2 CPUs: the others took 3 / 4 of it."""
    monkeypatch.setattr(harness.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(harness, "cpu_counters", lambda: (14.0, 2.0, 102.0))
    assert harness.background_cpu((10.0, 1.0, 100.0)) == 0.75
    assert harness.background_cpu(None) is None
    monkeypatch.setattr(harness, "cpu_counters", lambda: (30.0, 1.0, 101.0))  # more than every core: capped
    assert harness.background_cpu((10.0, 1.0, 100.0)) == 1.0
    times, _ = harness.timed_interleaved({"a": lambda: sum(range(10_000))}, repeats=3)
    assert len(times["a"]) == 3


def test_milliseconds():
    assert harness.median_ms([0.003, 0.001, 0.0020004]) == 2.0
    assert harness.times_ms([0.0012346, 1.0]) == [1.235, 1000.0]  # rounded to the microsecond


def test_busy_cell_and_warning():
    assert harness.busy_cell(None) == "n/a" and harness.busy_cell(0.123) == "12%"
    assert harness.busy_warning([None, 0.01, harness.BUSY_WARNING], "noisy") is None  # quiet, or not measured
    warning = harness.busy_warning([0.1, None, 0.5], "the figures are noisy")
    assert warning == ("warning: other processes used up to 50% of the CPUs while timing; the figures are noisy: "
                       "rerun on a quiet machine")


def test_bench_tokens():
    tokens = harness.bench_tokens(50, 3, 7, seed=1)
    assert tokens.shape == (3, 7) and tokens.dtype.name == "int32" and tokens.min() >= 1 and tokens.max() < 50
    assert (tokens == harness.bench_tokens(50, 3, 7, seed=1)).all()
    assert (tokens != harness.bench_tokens(50, 3, 7, seed=2)).any()


def test_environment():
    jax_only = harness.environment(loadavg_start=[1.0, 2.0, 3.0])
    assert jax_only["loadavg_start"] == [1.0, 2.0, 3.0] and jax_only["jax_backend"] == "cpu"
    assert jax_only["cpu_count"] >= 1 and "torch" not in jax_only
    with_torch = harness.environment(loadavg_start=None, torch_threads=3, compiler_options={"opt": "1"})
    assert with_torch["torch_num_threads"] == 3 and with_torch["compiler_options"] == {"opt": "1"}
    assert {"torch", "transformers", "torch_num_interop_threads"} <= set(with_torch)
    json.dumps(with_torch)


def test_torch_num_threads_restores_the_setting():
    import torch

    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    with harness.torch_num_threads(wanted):
        assert torch.get_num_threads() == wanted
        torch.set_num_threads(before + 1)  # the block may change it again
    assert torch.get_num_threads() == before


def test_load_both_sides(tiny_checkpoints):
    folder = tiny_checkpoints["gemma3"]
    loaded, refs, load_s = harness.load_both_sides(str(folder), "float32", False, ("eager", "sdpa"))
    assert loaded.kind == "decoder" and loaded.source == folder
    assert {impl: ref.config._attn_implementation for impl, ref in refs.items()} == {"eager": "eager", "sdpa": "sdpa"}
    assert set(load_s) == {"ours", "eager", "sdpa"} and min(load_s.values()) > 0


def test_load_both_sides_refuses_other_kinds(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip"}))
    with pytest.raises(ValueError, match="siglip model; this benchmark times decoders"):
        harness.load_both_sides(str(tmp_path), "float32", False, ("eager",))


def test_report_prints_writes_json_and_returns_the_status(tmp_path, capsys):
    result = {"benchmark": "toy", "ok": True, "env": {"cpu_count": 2}, "rows": [1.5, None]}
    path = tmp_path / "new" / "folder" / "toy.json"
    assert harness.report(result, "the table", str(path)) == 0
    assert capsys.readouterr().out == "the table\n"
    assert json.loads(path.read_text()) == result
    assert not list(path.parent.glob(".*tmp"))  # the atomic write left no temporary file

    missed = {**result, "ok": False}
    assert harness.report(missed, "missed", str(path)) == 1
    assert json.loads(path.read_text())["ok"] is False  # replaced
    assert harness.report(missed, "no file", None) == 1 and capsys.readouterr().out == "missed\nno file\n"


def test_report_refuses_a_broken_contract(tmp_path, capsys):
    with pytest.raises(ValueError, match="lacks env"):
        harness.report({"benchmark": "toy", "ok": True}, "table", None)
    with pytest.raises(ValueError, match="ok must be a bool"):
        harness.report({"benchmark": "toy", "ok": 1, "env": {}}, "table", None)
    assert capsys.readouterr().out == ""  # refused before printing anything
