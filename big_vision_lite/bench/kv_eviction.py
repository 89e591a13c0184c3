"""`bvl bench kv-eviction MODEL`: what each KV-eviction policy costs in quality and what its bookkeeping costs
in time, on real text, with the full cache as the peer in the same run.

Quality (teacher-forced, as StreamingLLM evaluates): each document (at least `MIN_DOCUMENT_TOKENS` tokens; by
default the shipped KJV excerpt, `--text-file jargon` adds the Jargon File one) is cut to `max_tokens`, prefilled
for `prompt_len` tokens and then fed token by token through the evicting decode step. One jitted scan per policy
carries a batch of rows: row 0 keeps everything (the reference), the others hold at most `budget * max_tokens`
tokens per kv head on the evicting layers (all layers of SmolLM2; Gemma 3's global ones, its sliding layers keep
their window). Per (policy, budget): `ppl_ratio` (perplexity over the full cache's), `kl_mean` and `kl_p99`
(KL(full || evicted) of the next-token distributions), `top1_agreement`, `mass_lost` (the full cache's attention on
keys the row no longer holds), `greedy_agreement` (after the document, each row continues greedily; the share of
`greedy_steps` ids equal to the full cache's), `memory` (mean tokens held per kv head over the full cache's:
recently_activated may hold fewer than its budget) and, for recently_activated, how many evictions the cap forced.
A passkey probe hides a number at several depths of a `passkey_tokens`-token text and asks for it at the end;
`passkey` is the share of depths whose greedy answer contains it.

Speed (`speed`): one decode step at batch 1 with random cache contents (timing does not depend on them),
timed as a jitted scan of `SPEED_STEPS` steps, best of 3. `overhead` = a policy's step over the same slot cache
without eviction at the same capacity (target at most `TARGET_OVERHEAD`); `crossover`: the full cache's step
at growing context lengths against recently_activated at a fixed `speed_capacity`.
"""

import functools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from big_vision_lite.bench.harness import environment, loadavg
from big_vision_lite.checkpoints import load
from big_vision_lite.checkpoints.tokenizer import load_tokenizer
from big_vision_lite.decoding.kv_eviction import (
    EvictionPolicy,
    EvictionState,
    check_capacity,
    global_layers,
    step,
    teacher_forced,
)
from big_vision_lite.models.cache import SlotCache
from big_vision_lite.utils.atomic import atomic_file
from big_vision_lite.utils.inputs import read_text_file

TEXTS = Path(__file__).parents[1] / "data" / "texts"
SHIPPED_TEXTS = {"kjv": TEXTS / "kjv_genesis_1-6.txt", "jargon": TEXTS / "jargon_hack.txt"}
DEFAULT_TEXTS = ("kjv",)
MIN_DOCUMENT_TOKENS = 2000
BUDGETS = (0.1, 0.2, 0.3, 0.5)
SINKS, RECENT = 4, 64
POLICY_SET = (
    EvictionPolicy("streaming", SINKS, RECENT),
    EvictionPolicy("h2o", SINKS, RECENT),
    EvictionPolicy("tova", SINKS, RECENT),
    EvictionPolicy("random", SINKS, RECENT),
    EvictionPolicy("recently_activated", SINKS, RECENT, top_p=0.95, threshold=50),
    EvictionPolicy("recently_activated", SINKS, RECENT, top_p=0.95, threshold=200),
    EvictionPolicy("recently_activated", SINKS, RECENT, top_p=0.9, threshold=50),
)
PASSKEY = "71432"
PASSKEY_DEPTHS = (0.1, 0.5, 0.9)
TARGET_OVERHEAD = 1.15
SPEED_STEPS = 32
SPEED_LENGTHS = (256, 512, 1024, 2048, 4096)


def load_documents(model: str, paths: Sequence[str | Path], max_tokens: int) -> list[dict[str, Any]]:
    """Tokenises each text file (or shipped text: `kjv`, `jargon`); refuses ones under MIN_DOCUMENT_TOKENS tokens."""
    tokenizer = load_tokenizer(model)
    documents = []
    for path in (SHIPPED_TEXTS.get(str(p), Path(p)) for p in paths):
        ids = tokenizer.encode(read_text_file(path, "--text-file"))
        if len(ids) < MIN_DOCUMENT_TOKENS:
            raise ValueError(f"--text-file {path} has {len(ids)} tokens with {model}'s tokenizer; the evaluation "
                             f"needs at least {MIN_DOCUMENT_TOKENS}")
        documents.append({"name": path.name, "tokens": np.asarray(ids[:max_tokens], np.int32), "available": len(ids)})
    return documents


def passkey_rows(tokenizer: Any, filler: np.ndarray, length: int, depths: Sequence[float]) -> np.ndarray:
    """[depths, length] token ids: an instruction, filler text with the passkey sentence at each depth, and the
    question at the end (the answer is what the model says next)."""
    head = tokenizer.encode("There is a pass key hidden inside a lot of irrelevant text. Find it and remember it.\n")
    key = tokenizer.encode(f"\nThe pass key is {PASSKEY}. Remember it. {PASSKEY} is the pass key.\n")
    question = tokenizer.encode("\nWhat is the pass key? The pass key is")
    room = length - len(head) - len(key) - len(question)
    if room < 16 or len(filler) < room:
        raise ValueError(f"passkey_tokens {length} leaves {room} filler tokens (the document has {len(filler)})")
    rows = []
    for depth in depths:
        cut = round(depth * room)
        rows.append(np.concatenate([head, filler[:cut], key, filler[cut:room], question]))
    return np.stack(rows).astype(np.int32)


def _policy_fields(policy: EvictionPolicy) -> dict[str, Any]:
    fields = {"policy": policy.name, "num_sinks": policy.num_sinks, "recent_window": policy.recent_window}
    if policy.name == "recently_activated":
        fields |= {"top_p": policy.top_p, "threshold": policy.threshold}
    return fields


def _quality(module: Any, params: Any, document: np.ndarray, policy: EvictionPolicy, budgets: Sequence[float],
             evict_layers: tuple[bool, ...], prompt_len: int, greedy_steps: int) -> list[dict[str, Any]]:
    length = len(document)
    slots = length + greedy_steps
    capacity = [slots] + [int(b * length) for b in budgets]
    out = teacher_forced(module, params, np.repeat(document[None], len(capacity), 0), capacity, policy=policy,
                         evict_layers=evict_layers, prompt_len=prompt_len, greedy_steps=greedy_steps)
    forced = length - prompt_len - 1  # teacher-forced steps with a target
    nll, kl = out["nll"][:forced], out["kl"][:forced]
    greedy = out["argmax"][forced:]
    rows = []
    for row, budget in enumerate(budgets, start=1):
        rows.append({
            "budget": budget, "capacity": capacity[row],
            "ppl_ratio": float(np.exp(nll[:, row].mean() - nll[:, 0].mean())),
            "kl_mean": float(kl[:, row].mean()), "kl_p99": float(np.percentile(kl[:, row], 99)),
            "top1_agreement": float(out["top1"][:forced, row].mean()),
            "mass_lost": float(out["mass_lost"][:forced, row].mean()),
            "greedy_agreement": float((greedy[:, row] == greedy[:, 0]).mean()),
            "memory": float(out["held"][:, row].mean() / out["held"][:, 0].mean()),
            "evicted": int(out["evicted"][row]), "forced": int(out["forced"][row]),
            "ppl_full": float(np.exp(nll[:, 0].mean())),
        })
    return rows


def _passkey(module: Any, params: Any, tokenizer: Any, rows: np.ndarray, policy: EvictionPolicy,
             budgets: Sequence[float], evict_layers: tuple[bool, ...], prompt_len: int) -> dict[float, list[bool]]:
    """Per budget (1.0 = the full cache), whether each depth's greedy answer holds the passkey."""
    answer_steps = 8
    depths, length = rows.shape
    shares = (1.0, *budgets)
    slots = length + answer_steps
    capacity = [slots if s == 1.0 else int(s * length) for s in shares for _ in range(depths)]
    tokens = np.tile(rows, (len(shares), 1))
    out = teacher_forced(module, params, tokens, capacity, policy=policy, evict_layers=evict_layers,
                         prompt_len=prompt_len, greedy_steps=answer_steps)
    answers = out["argmax"][length - prompt_len - 1:].T  # [rows, answer_steps]
    found = [PASSKEY in tokenizer.decode(a.tolist()) for a in answers]
    return {s: found[i * depths:(i + 1) * depths] for i, s in enumerate(shares)}


def _random_state(cfg: Any, slots: int, held: int, batch: int, dtype: Any, seed: int = 0) -> EvictionState:
    """A slot cache whose first `held` slots hold positions 0..held-1 with random keys and values."""
    rng = np.random.default_rng(seed)
    shape = (batch, slots, cfg.num_kv_heads, cfg.head_dim)
    positions = np.where(np.arange(slots) < held, np.arange(slots), -1)
    positions = jnp.asarray(np.broadcast_to(positions, (batch, cfg.num_kv_heads, slots)).astype(np.int32))
    ks = tuple(jnp.asarray(rng.standard_normal(shape, np.float32), dtype) for _ in range(cfg.depth))
    vs = tuple(jnp.asarray(rng.standard_normal(shape, np.float32), dtype) for _ in range(cfg.depth))
    empty = tuple(jnp.zeros((batch, cfg.num_kv_heads), jnp.int32) for _ in range(cfg.depth))
    scores = tuple(jnp.zeros((batch, cfg.num_kv_heads, slots), jnp.float32) for _ in range(cfg.depth))
    per_layer = tuple(positions.copy() for _ in range(cfg.depth))  # distinct buffers: the state is donated
    counts = (jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), jnp.int32))
    return EvictionState(SlotCache(ks, vs, per_layer, empty), scores, *counts)


@functools.partial(jax.jit, static_argnames=("module", "policy", "evict_layers", "steps"), donate_argnums=(2,))
def _run_steps(module: Any, params: Any, state: EvictionState, capacity: jax.Array, start: jax.Array, *,
               policy: EvictionPolicy, evict_layers: tuple[bool, ...], steps: int) -> tuple[EvictionState, jax.Array]:
    batch = capacity.shape[0]

    def body(carry, j):
        state, token = carry
        logits, _, _, state = step(module, params, state, token, jnp.full((batch,), start, jnp.int32) + j, capacity,
                                   policy, evict_layers, jax.random.key(0))
        return (state, jnp.argmax(logits, -1).astype(jnp.int32)), None

    (state, token), _ = jax.lax.scan(body, (state, jnp.zeros((batch,), jnp.int32)), jnp.arange(steps))
    return state, token


def step_times(module: Any, params: Any, cfg: Any, configs: dict[str, tuple[EvictionPolicy, int, int, int]],
               evict_layers: tuple[bool, ...], rounds: int = 3) -> dict[str, float]:
    """Milliseconds per decode step (batch 1) of each configuration `(policy, slots, held tokens, capacity)`.

    All are compiled first, then timed in `rounds` interleaved rounds (the best of each is kept), so a burst of
    load on the shared host slows every configuration of a round alike instead of one of them.
    """
    dtype = jax.tree.leaves(params)[0].dtype

    def once(policy: EvictionPolicy, slots: int, held: int, capacity: int) -> float:
        state = _random_state(cfg, slots, held, 1, dtype)
        begin = time.perf_counter()
        _, token = _run_steps(module, params, state, jnp.asarray([capacity], jnp.int32), jnp.asarray(held),
                              policy=policy, evict_layers=evict_layers, steps=SPEED_STEPS)
        token.block_until_ready()
        return (time.perf_counter() - begin) / SPEED_STEPS * 1000

    for config in configs.values():
        once(*config)  # compiles
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(rounds):
        for name, config in configs.items():
            times[name].append(once(*config))
    return {name: min(values) for name, values in times.items()}


def _speed(module: Any, params: Any, cfg: Any, policies: Sequence[EvictionPolicy], evict_layers: tuple[bool, ...],
           capacity: int, lengths: Sequence[int]) -> dict[str, Any]:
    full = EvictionPolicy("full", SINKS, RECENT)
    evicting = next((p for p in policies if p.name == "recently_activated"), POLICY_SET[4])
    # Overhead: the same slot cache, half full so no step runs out of room; the bookkeeping runs on every step
    # anyway (jitted code has no data-dependent branches), whether or not it frees anything.
    configs = {"no eviction": (full, capacity, capacity // 2, capacity)}
    configs |= {f"policy {i}": (p, capacity, capacity // 2, capacity - 1) for i, p in enumerate(policies)}
    # Crossover: at capacity, evicting on every step (its time does not depend on the context length), against
    # the full cache at each context length.
    configs["evicting"] = (evicting, capacity, capacity - 1, capacity)
    configs |= {f"full {n}": (full, n + SPEED_STEPS + 1, n, n + SPEED_STEPS + 1) for n in lengths}
    ms = step_times(module, params, cfg, configs, evict_layers)
    base = ms["no eviction"]
    overhead = [_policy_fields(p) | {"step_ms": ms[f"policy {i}"], "overhead": ms[f"policy {i}"] / base}
                for i, p in enumerate(policies)]
    crossover = [{"context": n, "full_ms": ms[f"full {n}"], "evicting_ms": ms["evicting"]} for n in lengths]
    return {"capacity": capacity, "no_eviction_step_ms": base, "overhead": overhead, "crossover": crossover,
            "target_overhead": TARGET_OVERHEAD}


def run_kv_eviction_bench(model: str, *, text_files: Sequence[str | Path] = (), max_tokens: int = 2048,
                          budgets: Sequence[float] = BUDGETS, policies: Sequence[EvictionPolicy] = POLICY_SET,
                          prompt_len: int = 32, greedy_steps: int = 32, passkey_tokens: int = 768,
                          speed_capacity: int = 512, speed_lengths: Sequence[int] = SPEED_LENGTHS,
                          dtype: str = "float32", quality: bool = True) -> dict[str, Any]:
    """Runs the quality evaluation and the passkey probe (unless not `quality`), then the speed measurements;
    see the module docstring. Returns a JSON-serialisable dict (`harness.report`'s contract): `benchmark`, `model`,
    `dtype`, `documents`, `settings`, `results` (per policy and budget), `passkey_full_cache`, `speed`,
    `quality_s`, `env` and `ok` (every policy's step overhead within `TARGET_OVERHEAD`)."""
    if bad := [b for b in budgets if not 0.0 < b < 1.0]:
        raise ValueError(f"budgets must be fractions in (0, 1), got {bad}")
    if max_tokens < MIN_DOCUMENT_TOKENS:
        raise ValueError(f"max_tokens must be at least {MIN_DOCUMENT_TOKENS}, got {max_tokens}")
    loadavg_start = loadavg()
    documents = load_documents(model, text_files or DEFAULT_TEXTS, max_tokens)
    for policy in policies:  # refuse budgets below the protected tokens now, not after an hour of evaluation
        for length in [len(d["tokens"]) for d in documents] + [passkey_tokens]:
            check_capacity(policy, [int(b * length) for b in budgets], length, prompt_len)
    loaded = load(model, dtype)  # unrolled layers: the evicting step runs them one by one
    if loaded.kind != "decoder" or loaded.tokenizer is None:
        raise ValueError(f"{model}: the kv-eviction benchmark needs a decoder with its tokenizer, got a "
                         f"{loaded.kind} model" + ("" if loaded.tokenizer else " without tokenizer files"))
    module, params, cfg, tokenizer = loaded.module, loaded.params, loaded.config, loaded.tokenizer
    evict_layers = global_layers(cfg)
    started = time.perf_counter()
    results, full_passkey = [], None
    for policy in policies if quality else ():
        per_document = [_quality(module, params, d["tokens"], policy, budgets, evict_layers, prompt_len, greedy_steps)
                        for d in documents]
        pass_rows = passkey_rows(tokenizer, documents[0]["tokens"], passkey_tokens, PASSKEY_DEPTHS)
        found = _passkey(module, params, tokenizer, pass_rows, policy, budgets, evict_layers, prompt_len)
        weights = np.array([len(d["tokens"]) for d in documents], float)
        for i, budget in enumerate(budgets):
            rows = [doc[i] for doc in per_document]
            merged = {key: float(np.average([r[key] for r in rows], weights=weights))
                      for key in rows[0] if key not in ("budget", "capacity", "evicted", "forced")}
            merged["forced_share"] = (sum(r["forced"] for r in rows) / max(1, sum(r["evicted"] for r in rows)))
            results.append(_policy_fields(policy) | {"budget": budget} | merged | {
                "passkey": float(np.mean(found[budget])), "passkey_by_depth": found[budget],
                "per_document": {d["name"]: r for d, r in zip(documents, rows, strict=True)},
            })
        full_passkey = found[1.0]
        print(f"  {policy.name} {_policy_fields(policy)}: done ({time.perf_counter() - started:.0f} s)", flush=True)
    speed = _speed(module, params, cfg, policies, evict_layers, speed_capacity, speed_lengths)
    worst = max(row["overhead"] for row in speed["overhead"])
    return {
        "benchmark": "kv_eviction", "model": model, "dtype": dtype,
        "documents": [{"name": d["name"], "tokens": len(d["tokens"]), "available": d["available"]} for d in documents],
        "settings": {"budgets": list(budgets), "prompt_len": prompt_len, "greedy_steps": greedy_steps,
                     "passkey_tokens": passkey_tokens, "passkey_depths": list(PASSKEY_DEPTHS),
                     "evict_layers": [i for i, e in enumerate(evict_layers) if e]},
        "results": results, "passkey_full_cache": full_passkey, "speed": speed,
        "quality_s": round(time.perf_counter() - started, 1),
        "env": environment(loadavg_start=loadavg_start),
        "ok": worst <= TARGET_OVERHEAD,
    }


def format_kv_eviction_table(result: dict[str, Any]) -> str:
    docs = ", ".join(f"{d['name']} ({d['tokens']} tokens)" for d in result["documents"])
    found = result["passkey_full_cache"]
    lines = [f"kv-eviction {result['model']} on {docs}; passkey with the full cache: "
             + (f"{sum(found)}/{len(found)} depths" if found else "not run"),
             "| policy | budget | memory | ppl ratio | KL mean | KL p99 | top-1 | mass lost | greedy | passkey "
             "| forced |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["results"]:
        name = r["policy"] + (f" (p {r['top_p']}, t {r['threshold']})" if "threshold" in r else "")
        lines.append(f"| {name} | {r['budget']:.0%} | {r['memory']:.2f} | {r['ppl_ratio']:.3f} | {r['kl_mean']:.3f} | "
                     f"{r['kl_p99']:.2f} | {r['top1_agreement']:.3f} | {r['mass_lost']:.3f} | "
                     f"{r['greedy_agreement']:.2f} | {r['passkey']:.2f} | {r['forced_share']:.2f} |")
    speed = result["speed"]
    lines.append(f"decode step at capacity {speed['capacity']}, no eviction: {speed['no_eviction_step_ms']:.2f} ms")
    for r in speed["overhead"]:
        name = r["policy"] + (f" (p {r['top_p']}, t {r['threshold']})" if "threshold" in r else "")
        lines.append(f"  {name}: {r['step_ms']:.2f} ms, overhead {r['overhead']:.3f} (target <= {TARGET_OVERHEAD})")
    for r in speed["crossover"]:
        lines.append(f"  context {r['context']}: full cache {r['full_ms']:.2f} ms/step, evicting at "
                     f"{speed['capacity']} slots {r['evicting_ms']:.2f} ms/step")
    return "\n".join(lines)


def plot_kv_eviction(result: dict[str, Any], path: str | Path) -> None:
    """Quality against memory per policy, and the crossover of step times, into one PNG. Drawn on a bare
    `Figure` (no pyplot), so the session's matplotlib backend is left as it is (notebooks keep inline plots)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 4.5))
    axes = fig.subplots(1, 3)
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in result["results"]:
        name = r["policy"] + (f" p{r['top_p']} t{r['threshold']}" if "threshold" in r else "")
        groups.setdefault(name, []).append(r)
    for name, rows in groups.items():
        memory = [r["memory"] for r in rows]
        axes[0].plot(memory, [r["ppl_ratio"] for r in rows], "o-", label=name)
        axes[1].plot(memory, [r["top1_agreement"] for r in rows], "o-", label=name)
    axes[0].set(xlabel="memory (tokens held / full cache)", ylabel="perplexity / full cache's",
                title="perplexity ratio")
    axes[1].set(xlabel="memory (tokens held / full cache)", ylabel="top-1 agreement with the full cache",
                title="top-1 agreement")
    axes[0].legend(fontsize=7)
    cross = result["speed"]["crossover"]
    lengths = [r["context"] for r in cross]
    axes[2].plot(lengths, [r["full_ms"] for r in cross], "o-", label="full cache")
    axes[2].plot(lengths, [r["evicting_ms"] for r in cross], "o-",
                 label=f"recently_activated, {result['speed']['capacity']} slots")
    axes[2].set(xlabel="context length (tokens)", ylabel="ms per decode step (batch 1)", xscale="log",
                title="decode step time")
    axes[2].set_xticks(lengths, [str(n) for n in lengths])
    axes[2].minorticks_off()
    axes[2].legend(fontsize=8)
    fig.suptitle(f"KV eviction, {result['model']}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def settings_from_args(args: Any) -> dict[str, Any]:
    """The keyword arguments of `run_kv_eviction_bench` that the CLI sets."""
    kwargs = {"text_files": args.text_file or (), "max_tokens": args.max_tokens, "dtype": args.dtype}
    if args.speed_only:
        kwargs["quality"] = False
    if args.budgets:
        kwargs["budgets"] = tuple(args.budgets)
    if args.policies:
        known = {p.name for p in POLICY_SET}
        if bad := sorted(set(args.policies) - known):
            raise ValueError(f"--policies {bad} not among {sorted(known)}")
        kwargs["policies"] = tuple(p for p in POLICY_SET if p.name in args.policies)
    return kwargs

