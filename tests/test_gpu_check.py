"""bench/gpu_check.py, the GPU check of issue 19: its plan, statuses and budget, and a dry run of a few of its steps
on the CPU through bench/gpu_check.sh (the whole dry run is `GPU_CHECK_DRY_RUN=1 bash bench/gpu_check.sh`)."""

import importlib.util
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


def test_the_dry_run_runs_the_same_steps_as_the_gpu_run():
    names = gpu_check.step_names(dry_run=False)
    assert gpu_check.step_names(dry_run=True) == names
    for model in ("gemma3-270m", "smollm2-135m"):
        for dtype in ("float32", "bfloat16"):
            assert f"parity_{model}_{dtype}" in names
    for name in ("env", "models", "bench_forward_gemma3-270m_float32", "bench_decode_gemma3-270m_float32",
                 "bench_decode_gemma3-270m_bfloat16", "bench_siglip-train", "bench_paligemma-train_caption",
                 "bench_paligemma-train_large", "device_forward_decode"):
        assert name in names


def test_the_gpu_run_calls_the_cli_as_a_user_would(tmp_path):
    steps = {s["name"]: s for s in gpu_check.plan(False, tmp_path)}
    model = str(tmp_path / "models" / "gemma3-270m")
    assert steps["parity_gemma3-270m_bfloat16"]["argv"] == ["parity", model, "--dtype", "bfloat16", "--json",
                                                            "{json}"]
    assert steps["bench_decode_gemma3-270m_bfloat16"]["argv"] == ["bench", "decode", model, "--dtype", "bfloat16",
                                                                  "--json", "{json}"]
    assert steps["bench_siglip-train"]["argv"] == ["bench", "siglip-train", "--json", "{json}"]
    described = gpu_check.describe(steps["bench_forward_gemma3-270m_float32"])
    assert described == f"bvl bench forward {model} --json {{json}}"
    assert all(s["timeout_s"] <= gpu_check.BUDGET_S / 2 for s in steps.values())  # no one step takes the budget
    # The real shapes, as the packaged models' conversions have them.
    assert gpu_check.REAL_MODELS["gemma3-270m"][1]["hidden_size"] == 640
    assert gpu_check.REAL_MODELS["smollm2-135m"][1]["num_hidden_layers"] == 30


def test_select_keeps_the_models_step_when_needed(tmp_path):
    steps = gpu_check.plan(True, tmp_path)
    names = [s["name"] for s in gpu_check.select(steps, ["parity_smollm2-135m_float32"])]
    assert names == ["models", "parity_smollm2-135m_float32"]
    assert [s["name"] for s in gpu_check.select(steps, ["env"])] == ["env"]
    with pytest.raises(ValueError, match="unknown step"):
        gpu_check.select(steps, ["parity_nope"])


def test_statuses_and_timeouts():
    classify = gpu_check.classify
    assert classify(0, False, {"ok": True}) == "passed"
    assert classify(1, False, {"ok": False}) == "failed"  # ran; a check or target said no
    assert classify(1, False, None) == "error"  # a crash exits 1 without its JSON
    assert classify(2, False, None) == "error"
    assert classify(3, False, {"missing": "bvl bench x"}) == "missing"
    assert classify(None, True, None) == "timeout"
    assert classify(0, False, {"present": "x"}, presence_only=True) == "present"
    assert set(gpu_check.STATUS_LEGEND) == {"passed", "failed", "error", "timeout", "missing", "present", "skipped"}
    assert gpu_check.step_timeout({"timeout_s": 150}, 500) == 150
    assert gpu_check.step_timeout({"timeout_s": 150}, 60) == 60
    assert gpu_check.step_timeout({"timeout_s": 150}, gpu_check.MIN_STEP_S - 1) is None
    assert gpu_check.headline({"ok": True, "ratio": 1.5, "env": {"jax": "x"}, "batches": []}) == {"ok": True,
                                                                                                 "ratio": 1.5}


def test_outside_pins_names_what_the_gpu_image_has_outside_our_pins():
    found = gpu_check.outside_pins({"jax": "0.11.2", "flax": "0.12.8", "transformers": "5.17.0", "gguf": None})
    assert set(found) == {"jax", "transformers"}
    assert found["jax"].startswith("0.11.2 (jax>=0.10,<0.11")


def test_a_failed_step_is_recorded_and_the_rest_continue_within_the_budget(tmp_path, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(gpu_check, "time", types.SimpleNamespace(
        perf_counter=lambda: clock[0], time=time.time, strftime=time.strftime, localtime=time.localtime))
    ran = []

    def runner(step, timeout_s, scratch, env):
        ran.append(step["name"])
        clock[0] += 100.0  # every step takes 100 s of the budget
        assert env["JAX_DEFAULT_MATMUL_PRECISION"] == "highest" and str(gpu_check.REPO) in env["PYTHONPATH"]
        status = "error" if step["name"] == "parity_gemma3-270m_float32" else "passed"
        return {"name": step["name"], "status": status, "rc": 0 if status == "passed" else 1, "seconds": 100.0,
                "command": gpu_check.describe(step), "headline": {}, "result": {"ok": status == "passed"},
                "tail": "", "output": f"output of {step['name']}"}

    results = gpu_check.run_check(tmp_path / "out", tmp_path / "work", dry_run=True, budget_s=450, runner=runner)
    assert ran == ["env", "models", "parity_gemma3-270m_float32", "parity_smollm2-135m_float32",
                   "parity_gemma3-270m_bfloat16"]
    summary = results["summary"]
    assert summary["parity_gemma3-270m_float32"] == "error" and summary["parity_smollm2-135m_float32"] == "passed"
    skipped = [s for s in results["steps"] if s["status"] == "skipped"]
    assert skipped and all("budget" in s["reason"] for s in skipped)
    assert results["rerun"] == "bash bench/gpu_check.sh --dry-run --only " + ",".join(s["name"] for s in skipped)
    written = json.loads((tmp_path / "out" / gpu_check.RESULT_FILE).read_text())
    assert written["summary"] == summary and written["mode"] == "dry-run" and "on the CPU" in written["measures"]
    log = (tmp_path / "out" / gpu_check.LOG_FILE).read_text()
    assert "===== parity_gemma3-270m_float32 (error" in log and "output of env" in log
    assert all("output" not in s for s in written["steps"])  # the output went to the log


def test_steps_that_need_the_models_are_skipped_when_the_models_step_fails(tmp_path):
    def runner(step, timeout_s, scratch, env):
        status = "error" if step["name"] == "models" else "passed"
        return {"name": step["name"], "status": status, "command": "", "output": ""}

    results = gpu_check.run_check(tmp_path / "out", tmp_path / "work", dry_run=True, budget_s=1000, runner=runner)
    steps = {s["name"]: s for s in results["steps"]}
    assert steps["env"]["status"] == "passed" and steps["bench_siglip-train"]["status"] == "passed"
    assert steps["parity_gemma3-270m_float32"]["status"] == "skipped"
    assert steps["device_forward_decode"]["reason"] == "the models step did not pass"


def test_a_step_past_its_timeout_is_killed(tmp_path):
    started = time.perf_counter()
    record = gpu_check.run_step({"name": "env", "kind": "env", "timeout_s": 1}, 0.5, tmp_path, dict(os.environ))
    assert record["status"] == "timeout" and record["rc"] is None and record["result"] is None
    assert time.perf_counter() - started < 30


def test_dry_run_through_the_shell_script(tmp_path):
    """A few steps of the dry run as a session runs the check (the shell script, then the JSON): the environment
    report, the random-init models, a parity run through `bvl parity`, the GPU-against-GPU step (on the CPU here)
    and the paligemma-train command's presence."""
    out, work = tmp_path / "out", tmp_path / "work"
    only = "env,parity_smollm2-135m_float32,bench_paligemma-train_caption,device_forward_decode"
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run", "--only", only, "--out", str(out),
                           "--work", str(work)], capture_output=True, text=True, env=env, timeout=240)
    results = json.loads((out / gpu_check.RESULT_FILE).read_text())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert results["mode"] == "dry-run" and results["rerun"] is None
    assert results["summary"] == {"env": "passed", "models": "passed", "parity_smollm2-135m_float32": "passed",
                                  "bench_paligemma-train_caption": "present", "device_forward_decode": "passed"}
    steps = {s["name"]: s for s in results["steps"]}
    env_report = steps["env"]["result"]
    assert env_report["import_errors"] == {} and env_report["missing"] == []
    assert env_report["precision"]["jax_default_matmul_precision"] == "highest"
    assert env_report["precision"]["torch.backends.cuda.matmul.allow_tf32"] is False
    assert env_report["jax_backend"] == "cpu"
    models = steps["models"]["result"]["models"]
    assert models["smollm2-135m"]["model_type"] == "llama" and models["smollm2-135m"]["params"] < 1e6  # tiny
    parity = steps["parity_smollm2-135m_float32"]["result"]
    assert parity["ok"] is True and parity["dtype"] == "float32" and parity["greedy_match"] is True
    assert steps["parity_smollm2-135m_float32"]["command"].startswith("bvl parity ")
    device = steps["device_forward_decode"]["result"]
    assert device["torch_device"] == "cpu" and device["jax_backend"] == "cpu"
    assert {(r["what"], r["dtype"]) for r in device["rows"]} == {("forward", "float32"), ("decode", "float32")}
    for row in device["rows"]:
        assert set(row["ms"]) == {"ours", "eager", "sdpa"} and row["ratio"] > 0
        if row["what"] == "forward":
            assert max(row["logits_rel_err"].values()) < 1e-5
        else:
            assert all(row["tokens_match"].values())
    assert (out / gpu_check.LOG_FILE).read_text().count("=====") == 5
