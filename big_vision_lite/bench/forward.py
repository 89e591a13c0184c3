"""Prefill forward benchmark: our jitted decoder against transformers (eager and sdpa attention), same weights.

What is timed, per batch size B: one prefill forward of B rows of `seq_len` deterministic random token ids (no
padding) that returns the last token's logits [B, 1, V] in float32.

- Ours: `decoding.engine.prefill(..., last_logits_only=True)` (the positions and the causal mask built from an
  all-true input mask inside the call) under `jax.jit`, compiled ahead of time with
  `jax.jit(f).lower(...).compile(compiler_options)`; each call waits on `block_until_ready`. Tracing/lowering and
  XLA compilation are timed separately (`lower_s`, `compile_s`) and never counted in the forward time.
- PyTorch: the transformers model loaded from the same HF folder (`harness.load_both_sides`: a packaged name
  resolves to its converted folder, so both sides read the very same tensors), once with
  `attn_implementation="eager"` and once with
  `"sdpa"`, called as `model(input_ids, use_cache=False, logits_to_keep=1)` under `torch.inference_mode()` with
  torch using every CPU core.

Each side first makes one untimed call whose logits are compared (max |ours - ref|, relative L2 error, argmax),
then `warmup` more untimed calls. Then `repeats` rounds run the three sides in turn, rotating the order each round
(`harness.interleaved_times`). Reported per batch: the median ms of each side, `ratio = ours / min(eager, sdpa)`,
and overall `ok` = every ratio <= `TARGET_RATIO`; also the share of the CPUs other processes took while timing
(`harness.background_cpu`: only runs on a quiet machine give fair ratios).
"""

import functools
import gc
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from big_vision_lite.bench.harness import (
    bench_tokens,
    busy_cell,
    busy_warning,
    cpu_count,
    environment,
    load_both_sides,
    loadavg,
    median_ms,
    peak_rss_gib,
    timed_interleaved,
    times_ms,
    torch_num_threads,
)
from big_vision_lite.decoding.engine import prefill
from big_vision_lite.parity.report import default_tolerance

TARGET_RATIO = 0.8  # ours must take at most this fraction of the faster PyTorch path's time
TORCH_IMPLS = ("eager", "sdpa")

# Our configuration, tuned on the 2-core AVX-512 CPU (gemma3-270m, float32, 512 tokens; both are arguments of
# `run_forward_bench`). Unrolled layers and scanned ones ran within noise of each other (unrolled ~4% faster at
# batch 1, ~1% slower at batch 8; it compiles in ~1.6 s against ~0.6 s). No XLA option tried helped: turning off
# the YNNPACK dot fusions, XNNPACK graph fusion, 512-bit vectors, the concurrency-optimised scheduler and the
# legacy emitters were all equal or slower, and fast-math (~6% faster) changes the numerics, so it is not used.
DEFAULT_SCAN_LAYERS = False
DEFAULT_COMPILER_OPTIONS: dict[str, Any] = {}


def prefill_logits(module: Any, params: Any, tokens: jax.Array, input_mask: jax.Array) -> jax.Array:
    """Our timed function: the last token's logits [B, 1, V] of a prefill without a cache (`engine.prefill`)."""
    return prefill(module, params, tokens, input_mask, last_logits_only=True)[0]


def _jax_forward(compiled: Any, args: tuple) -> jax.Array:
    return compiled(*args).block_until_ready()


def _torch_forward(model: Any, ids: Any) -> Any:
    import torch

    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits


def _logit_agreement(ours: np.ndarray, ref: np.ndarray, tolerance: float) -> dict[str, Any]:
    if ours.shape != ref.shape:
        raise AssertionError(f"our logits have shape {ours.shape}, the reference's {ref.shape}")
    diff = ours.astype(np.float64) - ref.astype(np.float64)
    rel = float(np.linalg.norm(diff) / max(np.linalg.norm(ref.astype(np.float64)), 1e-30))
    argmax = bool((ours.argmax(-1) == ref.argmax(-1)).all())
    return {"max_abs_diff": float(np.abs(diff).max()), "rel_err": rel, "argmax_match": argmax,
            "agree": rel <= tolerance}


def run_forward_bench(
    model: str,
    *,
    seq_len: int = 512,
    batches: Sequence[int] = (1, 8),
    dtype: str = "float32",
    repeats: int = 5,
    warmup: int = 1,
    scan_layers: bool = DEFAULT_SCAN_LAYERS,
    compiler_options: Mapping[str, Any] | None = None,
    torch_threads: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Times the prefill forward of `model` (packaged name or HF folder) on both sides; see the module docstring.

    Our side's configuration: `scan_layers` (a `checkpoints.load` option: `nn.scan` over a stacked layer axis, or an
    unrolled Python loop) and `compiler_options` (XLA debug options passed to `.compile()`, e.g.
    `{"xla_cpu_experimental_ynn_fusion_type": ""}`; None means `DEFAULT_COMPILER_OPTIONS`). `torch_threads`
    defaults to every CPU this process may use; torch's previous setting is restored afterwards.

    Returns a JSON-serialisable dict (`harness.report`'s contract): `benchmark`, `model`, `dtype`, `seq_len`,
    `repeats`, `warmup`, `target_ratio`, `ours` (its configuration), `env`, `load_s`, `batches` (one entry per
    batch size: `batch`, `lower_s`, `compile_s`, `ours_ms`, `eager_ms`, `sdpa_ms` (medians), `ratio`, `ok`,
    `background_cpu` (the fraction of the machine's CPU time other processes took while timing), `times_ms` (every
    timed call), `logits` (per torch implementation: `max_abs_diff`, `rel_err`, `argmax_match`, `agree`)),
    `peak_rss_gib`, `logits_agree` and `ok`.
    """
    import torch

    if seq_len < 1 or repeats < 1 or warmup < 0 or not batches or min(batches) < 1:
        raise ValueError(f"need seq_len >= 1, repeats >= 1, warmup >= 0 and batch sizes >= 1; got seq_len={seq_len}, "
                         f"repeats={repeats}, warmup={warmup}, batches={tuple(batches)}")
    options = dict(DEFAULT_COMPILER_OPTIONS if compiler_options is None else compiler_options)
    loadavg_start = loadavg()
    threads = torch_threads or cpu_count()
    with torch_num_threads(threads):
        loaded, refs, load_s = load_both_sides(model, dtype, scan_layers, TORCH_IMPLS)
        module, params, cfg = loaded.module, loaded.params, loaded.config

        n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
        tolerance = default_tolerance(params, dtype)
        forward = jax.jit(functools.partial(prefill_logits, module))

        rows = []
        for batch in batches:
            tokens = bench_tokens(cfg.vocab_size, batch, seq_len, seed)
            args = (params, jnp.asarray(tokens), jnp.ones((batch, seq_len), bool))
            t0 = time.perf_counter()
            lowered = forward.lower(*args)
            lower_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            compiled = lowered.compile(compiler_options=options) if options else lowered.compile()
            compile_s = time.perf_counter() - t0
            ids = torch.from_numpy(tokens.astype(np.int64))
            fns: dict[str, Callable[[], Any]] = {
                "ours": functools.partial(_jax_forward, compiled, args),
                **{impl: functools.partial(_torch_forward, refs[impl], ids) for impl in TORCH_IMPLS},
            }
            ours_logits = np.asarray(fns["ours"](), np.float32)
            logits = {impl: _logit_agreement(ours_logits, fns[impl]().float().numpy(), tolerance)
                      for impl in TORCH_IMPLS}
            for fn in fns.values():
                for _ in range(warmup):
                    fn()
            times, background = timed_interleaved(fns, repeats)
            medians = {name: median_ms(ts) for name, ts in times.items()}
            ratio = round(medians["ours"] / min(medians[impl] for impl in TORCH_IMPLS), 4)
            rows.append({
                "batch": batch,
                "lower_s": round(lower_s, 3),
                "compile_s": round(compile_s, 3),
                **{f"{name}_ms": ms for name, ms in medians.items()},
                "ratio": ratio,
                "ok": ratio <= TARGET_RATIO,
                "background_cpu": background,
                "times_ms": {name: times_ms(ts) for name, ts in times.items()},
                "logits": logits,
            })
            del compiled, lowered, args, fns, ours_logits
            gc.collect()

        result = {
            "benchmark": "forward",
            "model": str(model),
            "model_type": cfg.family,
            "params": n_params,
            "dtype": dtype,
            "seq_len": seq_len,
            "repeats": repeats,
            "warmup": warmup,
            "target_ratio": TARGET_RATIO,
            "ours": {"scan_layers": scan_layers, "compiler_options": options, "jit": "jax.jit + lower().compile()",
                     "last_logits_only": True},
            "env": environment(loadavg_start=loadavg_start, torch_threads=threads, compiler_options=options),
            "load_s": {k: round(v, 3) for k, v in load_s.items()},
            "logit_tolerance": tolerance,
            "peak_rss_gib": peak_rss_gib(),
            "batches": rows,
            "logits_agree": all(v["agree"] for row in rows for v in row["logits"].values()),
            "ok": all(row["ok"] for row in rows),
        }
        del loaded, module, params, refs
        gc.collect()
        return result


def format_forward_table(result: dict[str, Any]) -> str:
    """A readable table of `run_forward_bench`'s result."""
    env, ours = result["env"], result["ours"]
    lines = [
        f"forward bench {result['model']} ({result['dtype']}): prefill {result['seq_len']} tokens/row, last-token "
        f"logits, median of {result['repeats']} (after {result['warmup']} warm-up)",
        f"ours: jax {env['jax']} {env['jax_backend']}, scan_layers={ours['scan_layers']}, "
        f"compiler_options={ours['compiler_options'] or '{}'}; torch {env['torch']} ({env['torch_num_threads']} "
        f"threads, {env['cpu_count']} CPUs), transformers {env['transformers']}",
        f"{'batch':>5} {'compile_s':>9} {'ours_ms':>9} {'eager_ms':>9} {'sdpa_ms':>9} {'ratio':>6} {'ok':>3} "
        f"{'busy':>5}   logits max|diff| eager / sdpa (agree)",
    ]
    for row in result["batches"]:
        diffs = " / ".join(f"{row['logits'][impl]['max_abs_diff']:.2e}" for impl in TORCH_IMPLS)
        agree = all(v["agree"] for v in row["logits"].values())
        lines.append(
            f"{row['batch']:>5} {row['compile_s']:>9.2f} {row['ours_ms']:>9.1f} {row['eager_ms']:>9.1f} "
            f"{row['sdpa_ms']:>9.1f} {row['ratio']:>6.3f} {'yes' if row['ok'] else 'no':>3} "
            f"{busy_cell(row.get('background_cpu')):>5}   {diffs} ({agree})"
        )
    lines.append(f"ratio = ours / min(eager, sdpa); target <= {result['target_ratio']}: "
                 f"{'met' if result['ok'] else 'NOT met'}; logits agree: {result['logits_agree']}; busy = CPU share "
                 f"other processes took while timing; compile_s = our XLA compile, not in ours_ms")
    if warning := busy_warning((row.get("background_cpu") for row in result["batches"]),
                               "they slow torch's OpenMP threads more than XLA's, so the ratios may read low"):
        lines.append(warning)
    return "\n".join(lines)
