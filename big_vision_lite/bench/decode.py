"""Decode benchmark: greedy generation with our jitted loop against transformers, same weights and prompts.

What is timed, per batch size B: greedy generation of `new_tokens` ids after a prompt of `prompt_len`
deterministic random ids per row (no padding, no end ids: every side produces exactly `new_tokens` ids per row),
from the token ids in host memory to the generated ids in host memory. tokens/s = B * new_tokens / seconds.

- Ours (`ours`): `decoding.engine.generate(module, params, tokens, mask, new_tokens)`: the prefill, then the
  jitted `lax.while_loop` over the fixed-capacity cache, up to the ids as a numpy array. The first call compiles;
  the JAX tracing, lowering and XLA compilation it does (the union of the spans JAX reports through
  `jax.monitoring`) is `compile_s`. Should a later, timed call compile again, that span is measured the same way
  and subtracted from its time (reported as `recompile_s`, and the table warns), so compilation is never counted
  as generation.
- `ours_1`: the same call with `new_tokens=1` (prefill and one loop step), so our per-step decode time is
  `(ours - ours_1) / (new_tokens - 1)` and our prefill about `ours_1 - step`.
- transformers `generate` (`generate_<attn>`): `model.generate(input_ids, attention_mask, max_new_tokens=N,
  min_new_tokens=N, do_sample=False)` with no end id, under `torch.inference_mode()`.
- A manual PyTorch loop (`static_<attn>`): a transformers `StaticCache` of prompt_len + new_tokens slots, one
  prefill forward, then one-token forwards with explicit `cache_position` / `position_ids` and argmax; its
  prefill and mean per-step times are recorded inside the loop.

Both PyTorch sides load the same HF folder as ours (`harness.load_both_sides`) with `attn_implementation` from
`attn_implementations` (sdpa by default: on the 2-core AVX-512 CPU it was as fast as eager at batch 1 and faster
at batch 8) and torch using every CPU core. torch.compile is not used: with
transformers 5.23 the StaticCache's Python-int length is guarded on, so it recompiles (~20 s) at every step.

Each side first makes one untimed call whose ids are compared (`tokens_match`: ours equal transformers `generate`
exactly; `agree_prefix`: per row, how many leading ids agree), then `warmup` more untimed calls. Then `repeats`
rounds run the sides in turn, rotating the order each round (`harness.interleaved_times`); medians are reported.
`speedup` = our tokens/s over the best PyTorch side's. The share of the CPUs other processes took while timing is
recorded too.

The memory-bandwidth floor: per decode step every weight must be read once (a tied embedding in full, for the
logits; the input-embedding lookup reads B rows) plus the KV cache at the mean cache length prompt_len +
new_tokens / 2 (sliding layers at most their window). The bandwidth is measured in the same run (before the models
load and after each batch size's timings), each probe timing a jitted matrix-vector product and a torch sum over a
1 GiB float32 array, best of `bandwidth_repeats` calls each. The floor uses the median of all those figures, as
the step time is a median too: on a shared host the bandwidth left to this machine varies from probe to probe
(35-81 GB/s seen on the 2-core AVX-512 CPU, the highest ones short bursts), so the maximum would swing the
fraction with the luckiest probe. The maximum is reported as well (`bandwidth_max_gbps`).
`floor_step_ms` = bytes / bandwidth and `bandwidth_fraction` = floor_step_ms / our measured step time.

The compute floor beside it: the FLOPs of one decode step (`decode_flops_per_step`: 2 per multiply-add of every
matmul weight, the logits head included, for each of the B new tokens, plus the attention scores and their
weighted sum over the cached keys) over a matmul rate measured in the same run (`measure_matmul_rate`: a jitted
square matmul in the benchmark's dtype, best of its calls, probed with the bandwidth). `compute_floor_ms` =
FLOPs / rate and `compute_fraction` = compute_floor_ms / our step time. A step far above both floors is bound by
neither bandwidth nor arithmetic but by per-step overhead (dispatch, small kernels, copies).
"""

import copy
import functools
import gc
import time
from collections.abc import Callable, Sequence
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
    interleaved_times,
    load_both_sides,
    loadavg,
    peak_rss_gib,
    timed_interleaved,
    torch_num_threads,
)
from big_vision_lite.decoding.engine import generate
from big_vision_lite.models.gemma import DecoderConfig
from big_vision_lite.utils.timing import CompileSpans

TARGET_SPEEDUP = {1: 1.5, 8: 2.0}  # ours / best PyTorch tokens/s, per batch size (float32)
TARGET_SPEEDUP_BF16 = {1: 1.0, 8: 1.0}  # bfloat16: at least PyTorch's bfloat16 kernels' pace
TARGET_BANDWIDTH_FRACTION = 0.6  # at batch 1 (float32): floor_step_ms / our step time
DEFAULT_ATTN_IMPLEMENTATIONS = ("sdpa",)
# Decode is dominated by per-step weight reads: with scanned layers the while loop slices (copies) every layer's
# weights out of the stacked arrays on every step; unrolled it does not (~33 against ~60 ms/step on gemma3-270m).
DEFAULT_SCAN_LAYERS = False
BANDWIDTH_GIB = 1.0
MATMUL_PROBE_SIZE = 1024


def measure_bandwidth(gib: float = BANDWIDTH_GIB, repeats: int = 5) -> dict[str, float]:
    """Memory read bandwidth in GB/s (1e9 bytes/s), best of `repeats`, over a `gib` GiB float32 array, two ways:
    `jax_matvec` (a jitted [n, 1024] @ [1024] product: the access pattern of a decode step) and `torch_sum`
    (every torch thread). `best` is the larger."""
    import torch

    cols = 1024
    rows = max(int(gib * 2**30) // (4 * cols), 1)
    nbytes = rows * cols * 4
    matvec = jax.jit(jnp.matmul)
    jax_call = functools.partial(_wait_jax, matvec, jnp.ones((rows, cols), jnp.float32), jnp.ones((cols,), jnp.float32))
    torch_call = torch.ones(rows * cols, dtype=torch.float32).sum
    result: dict[str, float] = {}
    for name, call in (("jax_matvec", jax_call), ("torch_sum", torch_call)):
        call()
        result[name] = round(nbytes / min(interleaved_times({name: call}, repeats)[name]) / 1e9, 2)
    del jax_call, torch_call
    gc.collect()
    return result | {"best": max(result.values()), "gib": gib}


def measure_matmul_rate(dtype: str, size: int = MATMUL_PROBE_SIZE, repeats: int = 5) -> float:
    """GFLOP/s of a jitted [size, size] @ [size, size] matmul in `dtype`, best of `repeats` calls: what this host's
    matmul kernels reach when the arithmetic, not memory, limits them."""
    a = jnp.ones((size, size), dtype)
    call = functools.partial(_wait_jax, jax.jit(jnp.matmul), a, a)
    call()
    best = min(interleaved_times({"matmul": call}, repeats)["matmul"])
    return round(2 * size**3 / best / 1e9, 2)


def _wait_jax(fn: Callable[..., jax.Array], *args: Any) -> jax.Array:
    return fn(*args).block_until_ready()


def mean_cache_length(prompt_len: int, new_tokens: int) -> float:
    """Keys a decode step reads on average: step j = 1 .. N-1 feeds generated id j and attends T + j keys."""
    return prompt_len + new_tokens / 2


def decode_bytes_per_step(cfg: DecoderConfig, params: Any, batch: int, cache_length: float,
                          cache_dtype: str) -> dict[str, float]:
    """Bytes one decode step must read: `weights` (every parameter once; a tied embedding in full for the logits,
    plus B looked-up rows of the input embedding) and `kv_cache` (keys and values of `cache_length` tokens per
    layer, at most `sliding_window` in sliding layers), and their `total`."""
    param_bytes = sum(int(a.size) * a.dtype.itemsize for a in jax.tree.leaves(params))
    table = params["embedder"]["input_embedding"]
    table_bytes = int(table.size) * table.dtype.itemsize
    weights = param_bytes + batch * cfg.width * table.dtype.itemsize - (0 if cfg.tie_embeddings else table_bytes)
    keys = sum(min(cache_length, cfg.sliding_window) if sliding else cache_length for sliding in cfg.is_sliding)
    kv_cache = 2 * batch * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cache_dtype).itemsize * keys
    return {"weights": float(weights), "kv_cache": float(kv_cache), "total": float(weights + kv_cache)}


def decode_flops_per_step(cfg: DecoderConfig, params: Any, batch: int, cache_length: float) -> float:
    """FLOPs of one decode step: 2 x every matmul weight (each parameter but norm scales and the input embedding
    table, which is only looked up; the logits head, a tied table included) x B tokens, plus per layer 4 x B x
    heads x head_dim x keys for the attention scores and their weighted sum (keys: `cache_length`, at most the
    window in sliding layers)."""
    def is_matmul(path: tuple[Any, ...]) -> bool:
        names = [getattr(k, "key", "") for k in path]
        return names[-1] != "scale" and names[-2:] != ["embedder", "input_embedding"]
    weights = sum(int(a.size) for path, a in jax.tree_util.tree_leaves_with_path(params) if is_matmul(path))
    if cfg.tie_embeddings:
        weights += int(params["embedder"]["input_embedding"].size)
    keys = sum(min(cache_length, cfg.sliding_window) if sliding else cache_length for sliding in cfg.is_sliding)
    return float(2 * weights * batch + 4 * batch * cfg.num_heads * cfg.head_dim * keys)


def agree_prefix(ours: np.ndarray, ref: np.ndarray) -> list[int]:
    """Per row, how many leading ids of `ours` [B, N] and `ref` [B, N] agree."""
    differ = ours != ref
    return [int(row.argmax()) if row.any() else int(row.size) for row in differ]


def _ours(module: Any, params: Any, tokens: np.ndarray, mask: np.ndarray, new_tokens: int, spans: CompileSpans,
          recompile: list[float]) -> np.ndarray:
    """One timed call of ours; appends the seconds JAX spent compiling during it to `recompile`."""
    first = len(spans.spans)
    out = generate(module, params, tokens, mask, new_tokens).tokens
    recompile.append(spans.seconds_since(first))
    return out


def _generation_config(model: Any, new_tokens: int, pad_id: int) -> Any:
    config = copy.deepcopy(model.generation_config)
    # No end id: both sides produce exactly new_tokens ids (and min_new_tokens then masks nothing).
    config.update(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                  pad_token_id=pad_id, top_k=None, top_p=None, temperature=None)
    return config


def _torch_generate(model: Any, config: Any, ids: Any, mask: Any) -> np.ndarray:
    import torch

    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    return out[:, ids.shape[1]:].numpy()


def _torch_static_loop(model: Any, ids: Any, new_tokens: int, stats: list[tuple[float, float]]) -> np.ndarray:
    """Greedy ids [B, N] from a StaticCache loop; appends (prefill seconds, mean seconds per decode step)."""
    import torch
    from transformers import StaticCache

    batch, prompt_len = ids.shape
    with torch.inference_mode():
        t0 = time.perf_counter()
        cache = StaticCache(config=model.config, max_cache_len=prompt_len + new_tokens)
        positions = torch.arange(prompt_len)
        out = model(input_ids=ids, past_key_values=cache, cache_position=positions,
                    position_ids=positions.expand(batch, prompt_len), use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens = [token]
        t1 = time.perf_counter()
        for i in range(new_tokens - 1):
            position = torch.tensor([prompt_len + i])
            out = model(input_ids=token, past_key_values=cache, cache_position=position,
                        position_ids=position.expand(batch, 1), use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
        t2 = time.perf_counter()
    stats.append((t1 - t0, (t2 - t1) / max(new_tokens - 1, 1)))
    return torch.cat(tokens, dim=1).numpy()


def _median(values: Sequence[float]) -> float:
    return float(np.median(values))


def run_decode_bench(
    model: str,
    *,
    prompt_len: int = 64,
    new_tokens: int = 128,
    batches: Sequence[int] = (1, 8),
    dtype: str = "float32",
    repeats: int = 3,
    warmup: int = 1,
    scan_layers: bool = DEFAULT_SCAN_LAYERS,
    attn_implementations: Sequence[str] = DEFAULT_ATTN_IMPLEMENTATIONS,
    torch_threads: int | None = None,
    bandwidth_gib: float = BANDWIDTH_GIB,
    bandwidth_repeats: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Times greedy decoding of `model` (packaged name or HF folder) on every side; see the module docstring.

    `scan_layers` configures our side (a `checkpoints.load` option). `attn_implementations` lists the transformers
    attention kernels to run (each gives a `generate_<attn>` and a `static_<attn>` side). `torch_threads` defaults
    to every CPU this process may use; torch's previous setting is restored afterwards. `bandwidth_gib` sizes the
    bandwidth probe's array (0 skips the probe: no floor is reported).

    Returns a JSON-serialisable dict: the headline `speedup_b<B>` (ours / best PyTorch tokens/s),
    `bandwidth_fraction_b<B>` and `bytes_per_step_b<B>` per batch size, `tokens_match` (ours equal transformers
    `generate` at every batch size), `bandwidth_gbps`, `ok` (targets met; in float32 also the ids match); the run's
    settings, `env`, `load_s`, `bandwidth` (every probe) and `batches`: one entry per batch size with
    `compile_s`, `first_call_s`, `recompile_s`, `seconds` (medians per side; ours net of recompilation),
    `tokens_per_s`, `best_torch`, `speedup`, `ours_step_ms`, `ours_prefill_ms`, `static_step_ms`,
    `static_prefill_ms`, `bytes_per_step`, `floor_step_ms`, `bandwidth_fraction`, `tokens_match`, `agree_prefix`,
    `torch_sides_agree`, `background_cpu` and `times_s` (every timed call).
    """
    if prompt_len < 1 or new_tokens < 2 or repeats < 1 or warmup < 0 or not batches or min(batches) < 1:
        raise ValueError(f"need prompt_len >= 1, new_tokens >= 2, repeats >= 1, warmup >= 0 and batch sizes >= 1; "
                         f"got prompt_len={prompt_len}, new_tokens={new_tokens}, repeats={repeats}, "
                         f"warmup={warmup}, batches={tuple(batches)}")
    if not attn_implementations:
        raise ValueError("attn_implementations is empty: name at least one of 'sdpa', 'eager'")
    loadavg_start = loadavg()
    threads = torch_threads or cpu_count()
    with torch_num_threads(threads):
        bandwidth = [measure_bandwidth(bandwidth_gib, bandwidth_repeats)] if bandwidth_gib > 0 else []
        matmul_gflops = [measure_matmul_rate(dtype)] if bandwidth_gib > 0 else []
        loaded, refs, load_s = load_both_sides(model, dtype, scan_layers, attn_implementations)
        module, params, cfg = loaded.module, loaded.params, loaded.config
        pad_id = 0
        configs = {impl: _generation_config(ref, new_tokens, pad_id) for impl, ref in refs.items()}
        cache_length = mean_cache_length(prompt_len, new_tokens)

        spans = CompileSpans()
        rows = []
        with spans.recording():
            for batch in batches:
                rows.append(_bench_batch(module, params, cfg, refs, configs, spans, batch=batch,
                                         prompt_len=prompt_len, new_tokens=new_tokens, dtype=dtype, repeats=repeats,
                                         warmup=warmup, seed=seed, cache_length=cache_length))
                gc.collect()
                if bandwidth_gib > 0:
                    bandwidth.append(measure_bandwidth(bandwidth_gib, bandwidth_repeats))
                    matmul_gflops.append(measure_matmul_rate(dtype))
        probes = [v for b in bandwidth for k, v in b.items() if k not in ("best", "gib")]
        bandwidth_gbps = round(float(np.median(probes)), 2) if probes else None
        matmul_rate = max(matmul_gflops, default=None)  # the rate the kernels can reach: a floor takes the best
        for row in rows:
            _add_floor(row, bandwidth_gbps, matmul_rate)

        n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
        tokens_match = all(row["tokens_match"] for row in rows)
        result: dict[str, Any] = {
            "benchmark": "decode",
            "model": str(model),
            "model_type": cfg.family,
            "params": n_params,
            "dtype": dtype,
            "prompt_len": prompt_len,
            "new_tokens": new_tokens,
            "repeats": repeats,
            "warmup": warmup,
            **{f"speedup_b{row['batch']}": row["speedup"] for row in rows},
            **{f"bandwidth_fraction_b{row['batch']}": row["bandwidth_fraction"] for row in rows},
            **{f"compute_fraction_b{row['batch']}": row["compute_fraction"] for row in rows},
            **{f"bytes_per_step_b{row['batch']}": row["bytes_per_step"]["total"] for row in rows},
            "tokens_match": tokens_match,
            "bandwidth_gbps": bandwidth_gbps,
            "bandwidth_max_gbps": max(probes, default=None),
            "matmul_gflops": matmul_rate,
            "matmul_probes_gflops": matmul_gflops,
            "mean_cache_length": cache_length,
            "targets": {"speedup": {f"b{b}": t for b, t in _speedup_targets(dtype).items()},
                        **({"bandwidth_fraction_b1": TARGET_BANDWIDTH_FRACTION} if dtype == "float32" else {})},
            "ours": {"scan_layers": scan_layers,
                     "api": "big_vision_lite.decoding.engine.generate (greedy, no end ids)"},
            "torch": {"attn_implementations": list(attn_implementations), "compile": False},
            "env": environment(loadavg_start=loadavg_start, torch_threads=threads),
            "load_s": {k: round(v, 3) for k, v in load_s.items()},
            "bandwidth": bandwidth,
            "peak_rss_gib": peak_rss_gib(),
            "batches": rows,
        }
        result["targets_met"] = targets_met(rows, dtype)
        result["ok"] = all(result["targets_met"].values()) and (tokens_match or dtype != "float32")
        del loaded, module, params, refs
        gc.collect()
        return result


def _bench_batch(module: Any, params: Any, cfg: DecoderConfig, refs: dict[str, Any], configs: dict[str, Any],
                 spans: CompileSpans, *, batch: int, prompt_len: int, new_tokens: int, dtype: str, repeats: int,
                 warmup: int, seed: int, cache_length: float) -> dict[str, Any]:
    """One batch size: the checked first calls, warm-up, interleaved timed rounds and the derived figures."""
    import torch

    tokens = bench_tokens(cfg.vocab_size, batch, prompt_len, seed)
    mask = np.ones(tokens.shape, bool)
    ids = torch.from_numpy(tokens.astype(np.int64))
    torch_mask = torch.ones_like(ids)
    recompile: dict[str, list[float]] = {"ours": [], "ours_1": []}
    static_stats: dict[str, list[tuple[float, float]]] = {impl: [] for impl in refs}
    fns: dict[str, Callable[[], np.ndarray]] = {
        "ours": functools.partial(_ours, module, params, tokens, mask, new_tokens, spans, recompile["ours"]),
        "ours_1": functools.partial(_ours, module, params, tokens, mask, 1, spans, recompile["ours_1"]),
    }
    for impl, ref in refs.items():
        fns[f"generate_{impl}"] = functools.partial(_torch_generate, ref, configs[impl], ids, torch_mask)
        fns[f"static_{impl}"] = functools.partial(_torch_static_loop, ref, ids, new_tokens, static_stats[impl])

    t0 = time.perf_counter()
    ours_ids = fns["ours"]()
    first_call_s = time.perf_counter() - t0
    compile_s = recompile["ours"].pop()
    fns["ours_1"]()
    recompile["ours_1"].pop()
    ids_by_side = {name: fns[name]() for name in fns if name.startswith(("generate_", "static_"))}
    reference = ids_by_side[f"generate_{next(iter(refs))}"]
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    for values in (*recompile.values(), *static_stats.values()):
        values.clear()

    times, background = timed_interleaved(fns, repeats)

    net = {name: [t - c for t, c in zip(times[name], recompile[name], strict=True)] for name in recompile}
    seconds = {name: _median(net.get(name, ts)) for name, ts in times.items()}
    seconds["ours_wall"] = _median(times["ours"])
    tokens_per_s = {name: batch * new_tokens / s for name, s in seconds.items()
                    if name == "ours" or name.startswith(("generate_", "static_"))}
    torch_sides = [name for name in tokens_per_s if name != "ours"]
    best = max(torch_sides, key=tokens_per_s.__getitem__)
    step_s = (seconds["ours"] - seconds["ours_1"]) / (new_tokens - 1)
    step_s = step_s if step_s > 0 else None
    static = {impl: (_median([p for p, _ in stats]), _median([s for _, s in stats]))
              for impl, stats in static_stats.items()}
    return {
        "batch": batch,
        "compile_s": round(compile_s, 3),
        "first_call_s": round(first_call_s, 3),
        "recompile_s": round(_median(recompile["ours"]), 3),
        "seconds": {name: round(s, 6) for name, s in seconds.items()},
        "tokens_per_s": {name: round(v, 2) for name, v in tokens_per_s.items()},
        "best_torch": best,
        "speedup": round(tokens_per_s["ours"] / tokens_per_s[best], 4),
        "ours_step_ms": None if step_s is None else round(step_s * 1e3, 6),
        "ours_prefill_ms": None if step_s is None else round((seconds["ours_1"] - step_s) * 1e3, 6),
        **{f"static_{impl}_step_ms": round(s * 1e3, 6) for impl, (_, s) in static.items()},
        **{f"static_{impl}_prefill_ms": round(p * 1e3, 6) for impl, (p, _) in static.items()},
        "bytes_per_step": decode_bytes_per_step(cfg, params, batch, cache_length, dtype),
        "flops_per_step": decode_flops_per_step(cfg, params, batch, cache_length),
        "tokens_match": bool(np.array_equal(ours_ids, reference)),
        "agree_prefix": agree_prefix(ours_ids, reference),
        "torch_sides_agree": all(np.array_equal(v, reference) for v in ids_by_side.values()),
        "background_cpu": background,
        "times_s": {name: [round(t, 6) for t in ts] for name, ts in times.items()},
        "recompile_times_s": {name: [round(t, 6) for t in ts] for name, ts in recompile.items()},
    }


def _add_floor(row: dict[str, Any], bandwidth_gbps: float | None, matmul_gflops: float | None) -> None:
    """Adds `floor_step_ms` and `bandwidth_fraction`, `compute_floor_ms` and `compute_fraction` (None without a
    probe or a step time)."""
    step = row["ours_step_ms"]
    floors = {"floor_step_ms": (bandwidth_gbps, row["bytes_per_step"]["total"], "bandwidth_fraction"),
              "compute_floor_ms": (matmul_gflops, row["flops_per_step"], "compute_fraction")}
    for name, (rate, work, fraction) in floors.items():
        floor = None if not rate else work / (rate * 1e9)
        row[name] = None if floor is None else round(floor * 1e3, 6)
        row[fraction] = None if floor is None or not step else round(floor * 1e3 / step, 4)


def _speedup_targets(dtype: str) -> dict[int, float]:
    return TARGET_SPEEDUP_BF16 if dtype == "bfloat16" else TARGET_SPEEDUP


def targets_met(rows: Sequence[dict[str, Any]], dtype: str) -> dict[str, bool]:
    met = {}
    for row in rows:
        if (target := _speedup_targets(dtype).get(row["batch"])) is not None:
            met[f"speedup_b{row['batch']}"] = row["speedup"] >= target
        if row["batch"] == 1 and dtype == "float32":  # the bfloat16 floor is reported, not a target
            met["bandwidth_fraction_b1"] = (row["bandwidth_fraction"] or 0.0) >= TARGET_BANDWIDTH_FRACTION
    return met


def format_decode_table(result: dict[str, Any]) -> str:
    """A readable table of `run_decode_bench`'s result."""
    env, impls = result["env"], result["torch"]["attn_implementations"]
    probes = ", ".join(f"{k} {v:.1f}" for b in result["bandwidth"] for k, v in b.items() if k not in ("best", "gib"))
    bandwidth = "not measured" if result["bandwidth_gbps"] is None else f"{result['bandwidth_gbps']:.1f} GB/s"
    side_names = [f"{kind}_{impl}" for impl in impls for kind in ("generate", "static")]
    lines = [
        f"decode bench {result['model']} ({result['dtype']}): {result['prompt_len']}-token prompts + "
        f"{result['new_tokens']} greedy tokens/row, median of {result['repeats']} (after {result['warmup']} warm-up)",
        f"ours: generate() on jax {env['jax']} {env['jax_backend']}, scan_layers={result['ours']['scan_layers']}; "
        f"torch {env['torch']} ({env['torch_num_threads']} threads, {env['cpu_count']} CPUs), transformers "
        f"{env['transformers']}",
        f"memory bandwidth {bandwidth} (median of the probes: {probes or 'none'}); matmul rate "
        f"{_fmt(result['matmul_gflops'], 0, 1).strip()} GFLOP/s ({result['dtype']}, best probe); floors at mean cache "
        f"length {result['mean_cache_length']:g}",
        f"{'batch':>5} {'compile_s':>9} {'ours':>8} " + " ".join(f"{n:>14}" for n in side_names)
        + f" {'speedup':>7} {'step_ms':>8} {'floor_ms':>8} {'bw_frac':>7} {'flop_ms':>8} {'fl_frac':>7} {'match':>5}"
        f" {'busy':>5}",
    ]
    for row in result["batches"]:
        tps = row["tokens_per_s"]
        lines.append(
            f"{row['batch']:>5} {row['compile_s']:>9.2f} {tps['ours']:>8.1f} "
            + " ".join(f"{tps[n]:>14.1f}" for n in side_names)
            + f" {row['speedup']:>7.3f} {_fmt(row['ours_step_ms'], 8, 2)} {_fmt(row['floor_step_ms'], 8, 2)} "
            f"{_fmt(row['bandwidth_fraction'], 7, 3)} {_fmt(row['compute_floor_ms'], 8, 2)} "
            f"{_fmt(row['compute_fraction'], 7, 3)} {'yes' if row['tokens_match'] else 'no':>5} "
            f"{busy_cell(row.get('background_cpu')):>5}"
        )
    lines.append("tokens/s per side; speedup = ours / best PyTorch side; step_ms = our decode step "
                 "((ours - ours_1) / (new_tokens - 1)); floor_ms = bytes per step / bandwidth; bw_frac = floor / step; "
                 "flop_ms = FLOPs per step / matmul rate; fl_frac = flop_ms / step")
    targets = ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in result["targets_met"].items())
    speedups = _speedup_targets(result["dtype"])
    fraction = f", bandwidth fraction b1 >= {TARGET_BANDWIDTH_FRACTION}" if result["dtype"] == "float32" else ""
    lines.append(f"targets: speedup b1 >= {speedups[1]}, b8 >= {speedups[8]}{fraction} ({targets or 'none apply'}); "
                 "tokens match transformers generate: "
                 f"{result['tokens_match']}; ok: {result['ok']}")
    for row in result["batches"]:
        if not row["tokens_match"]:
            lines.append(f"batch {row['batch']}: leading ids that agree per row: {row['agree_prefix']} of "
                         f"{result['new_tokens']}")
    if recompiled := [row for row in result["batches"] if row["recompile_s"] > 0.001]:
        lines.append("warning: generate() compiled again inside timed calls ("
                     + ", ".join(f"batch {row['batch']}: {row['recompile_s']:.2f} s/call" for row in recompiled)
                     + "); that time is subtracted from ours, but it is a real per-call cost of generate() today")
    if warning := busy_warning((row.get("background_cpu") for row in result["batches"]), "the figures are noisy"):
        lines.append(warning)
    return "\n".join(lines)


def _fmt(value: float | None, width: int, digits: int) -> str:
    return f"{'n/a':>{width}}" if value is None else f"{value:>{width}.{digits}f}"
