"""Attention inspection during greedy generation: capture per-layer attention as scan outputs, then report it.

Axis letters: L captured layers, B batch, N query heads, K kv heads, T prompt tokens, M decode steps (new tokens),
S = T + M cache slots, H head dim.

`capture_generation` runs the decoding engine (`engine.generate`: the prefill, then the jitted decode loop that
`generate` runs, no early stop) with a Decoder that returns its probabilities, and an `AttentionRecord` that
reduces every step's attention on the device: the chosen layers' top-p membership [L, B, N, S], set size
[L, B, N], sink mass [L, B, N] and, with `keep_probs`, their probabilities [L, B, N, S]; no Python runs per step.

`write_report` turns a capture into `summary.json` and PNG plots: the prompt's attention per layer and head, a
key x decode-step map of top-p membership, the top-p set size over the steps, and forgotten / revived counts per
layer and head (definitions in `decoding.attention_stats`).
"""

import dataclasses
import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.colors
import matplotlib.ticker
import numpy as np
from matplotlib.figure import Figure

from big_vision_lite.decoding import attention_stats as stats
from big_vision_lite.decoding.engine import check_prompts, generate
from big_vision_lite.models.cache import KVCache
from big_vision_lite.models.masks import positions_from_mask
from big_vision_lite.utils.atomic import atomic_file, write_text_atomic

MAX_PLOTTED_LAYERS = 6  # panels of the per-layer plots; more captured layers are subsampled evenly
MAX_PLOTTED_HEADS = 12


@dataclasses.dataclass(frozen=True)
class Capture:
    """What `capture_generation` returns (numpy arrays); `layers` are the captured layers' indices, in order."""

    prompt_tokens: np.ndarray  # [B, T]
    input_mask: np.ndarray  # [B, T] bool
    tokens: np.ndarray  # [B, M] the greedy ids (no early stop)
    layers: tuple[int, ...]
    p: float
    num_sinks: int
    key_positions: np.ndarray  # [B, S] each slot's token position
    key_valid: np.ndarray  # [B, S] bool: the slot holds a token (not padding)
    prefill_member: np.ndarray  # [L, B, N, T, T] bool; padding queries' rows are False
    prefill_sink_mass: np.ndarray  # [L, B, N, T]; padding queries 0
    step_member: np.ndarray  # [M, L, B, N, S] bool
    step_set_size: np.ndarray  # [M, L, B, N] int32
    step_sink_mass: np.ndarray  # [M, L, B, N]
    k: np.ndarray  # [L, B, S, K, H] the captured layers' cache after the last step
    v: np.ndarray  # [L, B, S, K, H]
    prefill_probs: np.ndarray | None = None  # [L, B, N, T, T] with keep_probs; padding queries' rows 0
    step_probs: np.ndarray | None = None  # [M, L, B, N, S] with keep_probs

    def membership(self) -> np.ndarray:
        """bool [L, B, N, S, S]: top-p sets of every query slot (prompt then decode steps) over every key slot."""
        return np.asarray(stats.sequence_membership(self.prefill_member, self.step_member))


def check_settings(max_new_tokens: int, p: float, num_sinks: int = 1, look_back: int = 1,
                   similarity_threshold: float = 0.9) -> None:
    """Raises ValueError naming the first setting outside its range (before any model is loaded)."""
    if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens}")
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top-p mass p must be in (0, 1], got {p}")
    if int(num_sinks) != num_sinks or num_sinks < 1:
        raise ValueError(f"num_sinks must be an integer >= 1, got {num_sinks}")
    if int(look_back) != look_back or look_back < 1:
        raise ValueError(f"look_back must be an integer >= 1, got {look_back}")
    if not -1.0 <= similarity_threshold <= 1.0:
        raise ValueError(f"cosine threshold must be in [-1, 1], got {similarity_threshold}")


def check_layers(layers: Sequence[int] | None, depth: int) -> tuple[int, ...]:
    """The captured layers (all when None), each in 0 .. depth - 1 and named once."""
    if layers is None:
        return tuple(range(depth))
    layers = tuple(int(i) for i in layers)
    if not layers:
        raise ValueError("layers is empty: name at least one layer (or None for all)")
    if bad := [i for i in layers if not 0 <= i < depth]:
        raise ValueError(f"layer {bad[0]} is out of range: the model has {depth} layers, indices 0..{depth - 1}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers {list(layers)} name a layer twice")
    return layers


@dataclasses.dataclass(frozen=True)
class AttentionRecord:
    """What the decode loop keeps of each step (hashable: the jitted loop specialises on it): the `layers`'
    top-p membership of the new query over every key slot, the set sizes, the sink mass and, with `keep_probs`,
    the probabilities."""

    layers: tuple[int, ...]
    p: float
    num_sinks: int
    keep_probs: bool

    def __call__(self, out: dict[str, Any], cache: KVCache) -> dict[str, jax.Array]:
        probs = out["attn_probs"][np.asarray(self.layers), :, :, 0]  # [L, B, N, S]
        ys = {"member": stats.top_p_mask(probs, self.p), "set_size": stats.top_p_size(probs, self.p),
              "sink_mass": stats.sink_mass(probs, self.num_sinks, cache.positions[:, None, :])}
        if self.keep_probs:
            ys["probs"] = probs
        return ys


@functools.partial(jax.jit, static_argnums=(1, 2))
def _reduce_prefill(probs: jax.Array, p: float, num_sinks: int, input_mask: jax.Array,
                    positions: jax.Array) -> dict[str, jax.Array]:
    """probs [L, B, N, T, T] -> padding query rows zeroed, top-p membership and sink mass per query."""
    query_valid = input_mask[None, :, None, :, None]  # [1, B, 1, T, 1]
    probs = jnp.where(query_valid, probs, 0.0)
    return {"probs": probs, "member": stats.top_p_mask(probs, p) & query_valid,
            "sink_mass": stats.sink_mass(probs, num_sinks, positions[:, None, None, :])}


def capture_generation(
    module: nn.Module,
    params: Any,
    tokens: np.ndarray,
    input_mask: np.ndarray,
    max_new_tokens: int,
    *,
    layers: Sequence[int] | None = None,
    p: float = 0.95,
    keep_probs: bool = True,
    num_sinks: int = 1,
) -> Capture:
    """Greedy generation from left-padded prompts `tokens` [B, T] that records the chosen layers' attention.

    Decodes exactly `max_new_tokens` ids (no early stop; the ids equal `engine.generate`'s greedy ids). `layers` are the
    decoder layers to capture (None: all); `p` the top-p mass of the membership and set sizes; `num_sinks` the
    leading positions counted as attention sinks. With `keep_probs` the full probabilities come back too
    (prefill [L, B, N, T, T], steps [M, L, B, N, S]); without, only the reduced statistics.
    """
    tokens, input_mask = check_prompts(tokens, input_mask)
    check_settings(max_new_tokens, p, num_sinks)
    layers = check_layers(layers, module.configs[0].depth)
    record = AttentionRecord(layers, float(p), int(num_sinks), bool(keep_probs))
    decoded = generate(module.clone(return_probs=True), params, tokens, input_mask, max_new_tokens, record=record)
    mask = jnp.asarray(input_mask)
    prefill = _reduce_prefill(decoded.prefill_out["attn_probs"][np.asarray(layers)], float(p), int(num_sinks), mask,
                              positions_from_mask(mask))
    ys, cache = decoded.records, decoded.cache
    chosen = np.asarray(layers)
    return Capture(
        prompt_tokens=tokens, input_mask=input_mask, tokens=decoded.tokens, layers=layers, p=float(p),
        num_sinks=int(num_sinks), key_positions=np.asarray(cache.positions),
        key_valid=np.pad(input_mask, [(0, 0), (0, max_new_tokens)], constant_values=True),
        prefill_member=np.asarray(prefill["member"]), prefill_sink_mass=np.asarray(prefill["sink_mass"]),
        step_member=np.asarray(ys["member"]), step_set_size=np.asarray(ys["set_size"]),
        step_sink_mass=np.asarray(ys["sink_mass"]), k=np.asarray(cache.k[chosen]), v=np.asarray(cache.v[chosen]),
        prefill_probs=np.asarray(prefill["probs"]) if keep_probs else None,
        step_probs=np.asarray(ys["probs"]) if keep_probs else None,
    )


def summarize(capture: Capture, *, look_back: int = 20, similarity_threshold: float = 0.9,
              row: int = 0) -> dict[str, Any]:
    """Per captured layer (of batch row `row`): top-p set sizes, sink shares, forgotten / revived counts per
    head, the largest revival gap per head, and the k/v cosine-similarity counts per kv head."""
    check_settings(1, capture.p, capture.num_sinks, look_back, similarity_threshold)
    if not 0 <= row < capture.tokens.shape[0]:
        raise ValueError(f"row {row} is out of range: the capture has {capture.tokens.shape[0]} rows")
    valid = capture.key_valid[row]  # [S]
    member = stats.sequence_membership(capture.prefill_member[:, row], capture.step_member[:, :, row])  # [L,N,S,S]
    forgotten = np.asarray(stats.forgotten_tokens(member, look_back, valid))  # [L, N, S]
    revived, gap = (np.asarray(a) for a in stats.revived_tokens(member, look_back, valid))  # [L, N, S]
    eligible = int(np.asarray(stats.eligible_keys(valid.shape[0], look_back, valid)).sum())
    sim = stats.kv_cosine_similarity(capture.k[:, row], capture.v[:, row], similarity_threshold, valid)
    query_valid = capture.input_mask[row]  # [T]
    prefill_sink = capture.prefill_sink_mass[:, row][..., query_valid].mean(axis=(1, 2))  # [L]
    prefill_size = capture.prefill_member[:, row].sum(-1)[..., query_valid]  # [L, N, T']
    per_layer = []
    for i, layer in enumerate(capture.layers):
        per_layer.append({
            "layer": layer,
            "sink_share_prefill": round(float(prefill_sink[i]), 5),
            "sink_share_decode": round(float(capture.step_sink_mass[:, i, row].mean()), 5),
            "mean_set_size_prefill": round(float(prefill_size[i].mean()), 3),
            "mean_set_size_decode": round(float(capture.step_set_size[:, i, row].mean()), 3),
            "mean_set_size_decode_per_head": _rounded(capture.step_set_size[:, i, row].mean(0), 3),
            "forgotten_per_head": forgotten[i].sum(-1).tolist(),
            "revived_per_head": revived[i].sum(-1).tolist(),
            "largest_gap_per_head": gap[i].max(-1).tolist(),
            "forgotten_by_every_head": int(np.asarray(stats.forgotten_tokens(member[i].any(0), look_back,
                                                                             valid)).sum()),
            "kv_similarity": {"key_pairs": np.asarray(sim.key_pairs[i]).tolist(),
                              "value_pairs": np.asarray(sim.value_pairs[i]).tolist(),
                              "both_pairs": np.asarray(sim.both_pairs[i]).tolist(),
                              "key_mean": _rounded(sim.key_mean[i], 4),
                              "value_mean": _rounded(sim.value_mean[i], 4),
                              "num_pairs": int(sim.num_pairs[i])},
        })
    steps_in_set = np.asarray(stats.key_steps(capture.step_member[:, :, row], head_axis=-2)).any(0)  # [S, M]
    return {
        "row": row, "p": capture.p, "look_back": look_back, "num_sinks": capture.num_sinks,
        "similarity_threshold": similarity_threshold, "layers": list(capture.layers),
        "prompt_len": int(query_valid.sum()), "new_tokens": int(capture.tokens.shape[1]),
        "num_heads": int(capture.step_member.shape[3]), "num_kv_heads": int(capture.k.shape[3]),
        "eligible_keys": eligible,
        "forgotten_total": int(forgotten.sum()), "revived_total": int(revived.sum()),
        "per_layer": per_layer,
        # Per valid key slot: at how many decode steps some head of some captured layer had it in its set.
        "key_steps_in_set": steps_in_set.sum(-1)[valid].tolist(),
        "arrays": {"forgotten": forgotten.sum(-1), "revived": revived.sum(-1)},  # [L, N], for the plots
    }


def _rounded(values: Any, digits: int) -> list[float]:
    return [round(float(x), digits) for x in np.asarray(values).ravel()]


def _plotted(count: int, most: int) -> list[int]:
    """Up to `most` indices spread evenly over range(count), first and last included."""
    return sorted(set(np.linspace(0, count - 1, min(count, most)).round().astype(int).tolist()))


def write_report(capture: Capture, out_dir: str | Path, *, look_back: int = 20, similarity_threshold: float = 0.9,
                 tokenizer: Any = None, model: str | None = None, prompt: str | None = None,
                 row: int = 0) -> dict[str, Any]:
    """Writes `summary.json` and the PNG plots of batch row `row` into `out_dir`; returns the summary.

    Plots: `prompt_attention.png` (the prompt's probabilities, rows = up to 6 captured layers spread evenly,
    columns = up to 12 heads; top-p membership when the capture kept no probabilities), `top_p_membership.png`
    (per plotted layer, key slot x decode step, coloured by how many heads hold the key), `top_p_set_size.png`
    (mean set size over heads per decode step) and `forgotten_revived.png` ([L, N] counts).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(capture, look_back=look_back, similarity_threshold=similarity_threshold, row=row)
    arrays = summary.pop("arrays")
    num_layers, num_heads = len(capture.layers), summary["num_heads"]
    plotted = _plotted(num_layers, MAX_PLOTTED_LAYERS)
    heads = list(range(min(num_heads, MAX_PLOTTED_HEADS)))
    summary["plotted_layers"] = [capture.layers[i] for i in plotted]
    summary["plotted_heads"] = heads
    query_valid = capture.input_mask[row]
    files = []

    kept = capture.prefill_probs is not None
    maps = capture.prefill_probs if kept else capture.prefill_member.astype(np.float32)
    norm = matplotlib.colors.PowerNorm(0.4, vmin=0, vmax=1) if kept else matplotlib.colors.Normalize(0, 1)
    fig, axes = _figure(len(plotted), len(heads), figsize=(1.6 * len(heads) + 1, 1.6 * len(plotted) + 0.8),
                             squeeze=False)
    for r, i in enumerate(plotted):
        for c, h in enumerate(heads):
            ax = axes[r, c]
            ax.imshow(maps[i, row, h][query_valid][:, query_valid], cmap="viridis", norm=norm)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"head {h}", fontsize=8)
            if c == 0:
                ax.set_ylabel(f"layer {capture.layers[i]}", fontsize=8)
    what = "attention probabilities (power 0.4)" if kept else f"top-{capture.p} membership"
    fig.suptitle(f"prompt {what}: query (rows) x key (columns)", fontsize=9)
    fig.tight_layout()
    files.append(_save(fig, out / "prompt_attention.png"))

    valid = capture.key_valid[row]
    fig, axes = _figure(1, len(plotted), figsize=(3.2 * len(plotted), 3.6), squeeze=False)
    for c, i in enumerate(plotted):
        heads_holding = capture.step_member[:, i, row].sum(1)[:, valid].T  # [S', M]
        ax = axes[0, c]
        image = ax.imshow(heads_holding, aspect="auto", origin="lower", cmap="magma", vmin=0, vmax=num_heads,
                          interpolation="nearest")
        ax.axhline(query_valid.sum() - 0.5, color="cyan", lw=0.8)
        ax.set_title(f"layer {capture.layers[i]}", fontsize=9)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("decode step")
        if c == 0:
            ax.set_ylabel("key position (above the line: generated)")
    fig.colorbar(image, ax=axes[0, -1], label=f"heads with the key in their top-{capture.p} set")
    fig.tight_layout()
    files.append(_save(fig, out / "top_p_membership.png"))

    fig, ax = _figure(figsize=(7, 4))
    steps = np.arange(capture.tokens.shape[1])
    for i in plotted:
        ax.plot(steps, capture.step_set_size[:, i, row].mean(-1), label=f"layer {capture.layers[i]}")
    ax.plot(steps, query_valid.sum() + steps + 1, "k--", lw=0.8, label="keys in the cache")
    ax.set_xlabel("decode step")
    ax.set_ylabel(f"top-{capture.p} set size (mean over heads)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    files.append(_save(fig, out / "top_p_set_size.png"))

    fig, axes = _figure(1, 2, figsize=(3 + 0.8 * num_heads, 1.5 + 0.22 * num_layers), squeeze=False)
    for ax, name in zip(axes[0], ("forgotten", "revived"), strict=True):
        counts = arrays[name]  # [L, N]
        image = ax.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(num_layers), [str(layer) for layer in capture.layers], fontsize=6)
        ax.set_xticks(range(num_heads))
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(f"{name} keys (look-back {look_back})", fontsize=9)
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    files.append(_save(fig, out / "forgotten_revived.png"))

    if tokenizer is not None:
        generated = capture.tokens[row].tolist()
        ends = [i for i, t in enumerate(generated) if t in tokenizer.eos_ids]
        summary["completion"] = tokenizer.decode(generated[: ends[0] if ends else None])
        summary["end_step"] = ends[0] if ends else None
        ids = capture.prompt_tokens[row][query_valid].tolist() + generated
        summary["key_texts"] = [tokenizer.decode([t], skip_special_tokens=False) for t in ids]
    summary = {"model": model, "prompt": prompt, "prompt_tokens": capture.prompt_tokens[row][query_valid].tolist(),
               "generated_tokens": capture.tokens[row].tolist(), **summary, "files": files}
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


def _figure(rows: int = 1, cols: int = 1, **kwargs: Any) -> tuple[Figure, Any]:
    """A figure and its axes, drawn without pyplot: nothing touches the session's backend (a notebook keeps
    showing its plots inline)."""
    fig = Figure(figsize=kwargs.pop("figsize", None))
    return fig, fig.subplots(rows, cols, **kwargs)


def _save(fig: Figure, path: Path) -> str:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    return path.name
