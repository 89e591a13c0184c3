"""Decoder parity (Gemma 1/2/3, Llama, Qwen3): the batch and the forward passes of both sides.

Both sides get the same weights and the same batch: B >= 2 rows, the second left-padded, longer than any
sliding window. Compared on real (non-pad) tokens: the embeddings, every layer's output, the final norm and the
logits. Then both sides greedy-decode a batch of 4 left-padded prompts of different lengths (ours: the decoding
engine's jitted loop; theirs: transformers' `generate`): real models continue `GREEDY_PROMPTS` through their own
tokenizer, tiny random ones random ids.

When a layer is out of tolerance, the first such layer is drilled down: both sides run the batch again recording
that layer's sub-stages (`SUBSTAGES`, in the order they are computed; ours sown by the modules, theirs hooked in
transformers), and the report names the first sub-stage out of tolerance: where the defect is.

Axis letters: B batch, T tokens, V vocab, N query heads, K kv heads, G = N / K, H head dim, S keys.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_vision_lite.checkpoints import Loaded
from big_vision_lite.decoding.engine import generate, jitted_prefill, left_pad
from big_vision_lite.models.masks import positions_from_mask, prefill_mask, prefix_lm_mask
from big_vision_lite.parity import torch_side
from big_vision_lite.parity.golden import ReferenceSide
from big_vision_lite.parity.report import DrillDown, LayerError, compare_stage, compare_stages, greedy_fields, within
from big_vision_lite.utils.timing import Stopwatch

# Real models continue text of different token lengths (random ids would make near-tied logits likely).
GREEDY_PROMPTS = ("The capital of France is", "Here is a short poem about the sea:\n",
                  "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n", "1, 1, 2, 3, 5, 8,")


def parity_batch(vocab_size: int, seq_len: int, batch: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic token ids [B, T] and mask: every odd row left-padded by a quarter of T."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab_size, size=(batch, seq_len)).astype(np.int32)
    mask = np.ones((batch, seq_len), bool)
    mask[1::2, : seq_len // 4] = False
    tokens[~mask] = 0
    return tokens, mask


def greedy_batch(vocab_size: int, longest: int, batch: int = 4, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic left-padded prompts [B, T] of different lengths: `longest`, then ~3/4, 1/2, 1/4 of it."""
    rng = np.random.default_rng(seed)
    lengths = [max(1, longest * (batch - row) // batch) for row in range(batch)]
    return left_pad([rng.integers(1, vocab_size, size=n).tolist() for n in lengths])


# A decoder layer's sub-stages in the order they are computed (post norms: Gemma 2/3 only).
SUBSTAGES = ("normed", "q", "k", "v", "logits", "logits_capped", "probs", "attn_out", "post_attn_normed",
             "residual_attn", "ffw_normed", "mlp_gate", "mlp_hidden", "mlp_out", "post_ffw_normed", "output")
ATTENTION_MAPS = ("logits", "logits_capped", "probs")  # [B, N, T, S]


def top_two_margin(logits: jax.Array) -> jax.Array:
    """logits [B, V] -> [B] float32: how far each row's chosen (largest) logit is ahead of the runner-up."""
    top_two = jax.lax.top_k(logits.astype(jnp.float32), 2)[0]
    return top_two[:, 0] - top_two[:, 1]


@dataclasses.dataclass(frozen=True)
class TopTwoMargin:
    """A decoding-loop record (`engine.generate(record=...)`): each step's `top_two_margin` [B]."""

    def __call__(self, out: dict[str, Any], cache: Any) -> jax.Array:
        del cache
        return top_two_margin(out["logits"][:, -1])


def our_greedy(module: nn.Module, params: Any, prompts: np.ndarray, mask: np.ndarray, max_new_tokens: int,
               **inputs: Any) -> dict[str, np.ndarray]:
    """Our greedy `ids` [B, N] (the engine's jitted loop, no early stop) and at each step the `margins` [B, N]
    between the two largest logits, as `torch_side.greedy` returns them; `inputs` go to `generate`."""
    out = generate(module, params, prompts, mask, max_new_tokens, record=TopTwoMargin(), **inputs)
    # records[s] saw the logits choosing id s + 1; id 0 was chosen by the prefill's logits.
    margins = np.concatenate([np.asarray(top_two_margin(out.first_logits))[:, None],
                              np.asarray(out.records).T[:, :-1]], axis=1)
    return {"ids": out.tokens, "margins": margins}


def _reference_forward(model: Any, tokens: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """Runs transformers once; records the input of layer 0, each layer's output, the final norm and the logits."""
    import torch

    positions = np.asarray(positions_from_mask(jnp.asarray(mask)))
    with torch_side.capture_decoder_stages(model.model) as captured, torch.no_grad():
        out = model(input_ids=torch_side.long_tensor(tokens), attention_mask=torch_side.long_tensor(mask),
                    position_ids=torch_side.long_tensor(positions), use_cache=False)
    captured["logits"] = out.logits
    return torch_side.to_numpy(captured)


def _our_forward(loaded: Loaded, tokens: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    logits, _, out = jitted_prefill(loaded.module, loaded.params, jnp.asarray(tokens), jnp.asarray(mask),
                                    last_logits_only=False)
    ours = {"embeddings": out["embeddings"], "final_norm": out["final"], "logits": logits}
    ours |= {f"layer_{i}": h for i, h in enumerate(out["hidden"])}
    return {k: np.asarray(jnp.asarray(v, jnp.float32)) for k, v in ours.items()}


def reference_substages(layer: Any, forward: Callable[[], Any]) -> dict[str, np.ndarray]:
    """transformers' sub-stages of decoder layer module `layer` while `forward()` runs the model
    (`torch_side.capture_layer_substages`), in our layouts: q/k/v [B, T, N|K, H], attention maps [B, N, T, S]."""
    import torch

    with torch_side.capture_layer_substages(layer) as captured, torch.no_grad():
        forward()
    ref = torch_side.to_numpy(captured)
    return ref | {k: ref[k].transpose(0, 2, 1, 3) for k in ("q", "k", "v")}


def our_substages(loaded: Loaded, layer: int, tokens: np.ndarray, mask: np.ndarray, mask_ar: np.ndarray | None = None,
                  **inputs: np.ndarray) -> dict[str, np.ndarray]:
    """Our sub-stages of decoder layer `layer` (of a decoder, or PaliGemma's with `mask_ar` and `images` in
    `inputs`), as the modules sow them (`gemma.Block`, `attention.Attention`), named and laid out as
    `reference_substages` returns them (float32)."""
    module = loaded.module.clone(return_hidden=False)
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
    attn_mask = prefill_mask(mask) if mask_ar is None else prefix_lm_mask(mask, jnp.asarray(mask_ar))

    @jax.jit
    def sown(params: Any) -> Any:
        _, state = module.apply({"params": params}, tokens, positions_from_mask(mask), attn_mask,
                                mutable=["intermediates"], **inputs)
        return state["intermediates"]

    tree = sown(loaded.params)
    tree = tree.get("llm", tree)  # PaliGemma's decoder
    scanned = "layers" in tree  # a scanned stack sows every layer's values stacked on a leading L axis
    block = tree["layers"] if scanned else tree[f"layers_{layer}"]
    flat = {**{k: v for k, v in block.items() if k not in ("attn", "mlp")}, **block["attn"],
            **{f"mlp_{k}": v for k, v in block["mlp"].items()}}
    ours = {}
    for name, (value,) in flat.items():  # sow keeps a tuple of the values sown under a name
        value = np.asarray(jnp.asarray(value[layer] if scanned else value, jnp.float32))
        if name in ATTENTION_MAPS:
            value = value.reshape(value.shape[0], -1, *value.shape[-2:])  # [B, K, G, T, S] -> [B, N, T, S]
        ours[name] = value
    return ours


def drill_down(name: str, ours: dict[str, np.ndarray], ref: dict[str, np.ndarray], mask: np.ndarray,
               tolerance: float) -> DrillDown:
    """Compares the sub-stages both sides recorded for layer `name`, on real query tokens, in `SUBSTAGES` order."""
    assert set(ref) <= set(ours), f"sub-stages only transformers recorded: {sorted(set(ref) - set(ours))}"
    stages = []
    for stage in SUBSTAGES:
        if stage not in ref:
            continue
        a, b = ours[stage], ref[stage]
        if stage in ATTENTION_MAPS:  # [B, N, T, S] -> [B, T, N, S]: compared on real query tokens
            a, b = a.transpose(0, 2, 1, 3), b.transpose(0, 2, 1, 3)
        stages.append(compare_stage(stage, a, b, mask))
    first = next((e.name for e in stages if not within(e, tolerance)), None)
    return DrillDown(name, stages, first)


def drill_into_first_failure(layers: list[LayerError], tolerance: float, reference: ReferenceSide, watch: Stopwatch,
                             inputs: dict[str, np.ndarray], ours: Callable[[int], dict[str, np.ndarray]],
                             theirs: Callable[[int], dict[str, np.ndarray]]) -> dict[str, Any]:
    """The report fields of the drill-down of the first decoder layer (`layer_i`) out of tolerance: `ours(i)` and
    `theirs(i)` record layer i's sub-stages from `inputs` (whose `mask` [B, T] marks the tokens compared). A golden
    file holds no sub-stages: then a note says so."""
    failing = next((e.name for e in layers if e.name.startswith("layer_") and not within(e, tolerance)), None)
    if failing is None:
        return {}
    if reference.model is None:
        return {"notes": [f"{failing} is out of tolerance; its drill-down needs transformers (a golden file holds "
                          "the layer outputs only)"]}
    index = int(failing.removeprefix("layer_"))
    with watch("drill_down"):
        ref = reference.run(f"drill_down_{failing}", inputs, lambda: theirs(index))
        return {"drill_down": drill_down(failing, ours(index), ref, inputs["mask"], tolerance)}


def compare(loaded: Loaded, reference: ReferenceSide, watch: Stopwatch, tolerance: float, *,
            seq_len: int | None = None, greedy_tokens: int = 32, greedy_rows: int = 4) -> dict[str, Any]:
    """Every stage and the greedy ids of both sides (see the module docstring): the `ParityReport` fields."""
    cfg = loaded.config
    # Longer than any sliding window, so windowed layers really drop keys.
    seq_len = seq_len or max(32, (cfg.sliding_window or 0) + 16)
    tokens, mask = parity_batch(cfg.vocab_size, seq_len)
    inputs = {"tokens": tokens, "mask": mask}
    with watch("forward_reference"):
        ref = reference.run("forward", inputs, lambda: _reference_forward(reference.model, tokens, mask))
    with watch("forward_truth"):
        truth = reference.run_truth("forward", inputs, lambda model: _reference_forward(model, tokens, mask))
    with watch("forward_ours"):
        ours = _our_forward(loaded, tokens, mask)
    names = ["embeddings", *[f"layer_{i}" for i in range(cfg.depth)], "final_norm", "logits"]
    layers, truth_errors = compare_stages(names, ours, ref, truth, mask)
    del ref, ours, truth
    fields = {"model_type": cfg.family, "layers": layers, "truth": truth_errors}
    fields |= drill_into_first_failure(
        layers, tolerance, reference, watch, inputs,
        lambda i: our_substages(loaded, i, tokens, mask),
        lambda i: reference_substages(reference.model.model.layers[i],
                                      lambda: _reference_forward(reference.model, tokens, mask)))

    texts = None
    if loaded.tokenizer is not None:
        tokenizer = loaded.tokenizer
        texts = list(GREEDY_PROMPTS[:greedy_rows])
        prompts, prompt_mask = left_pad(tokenizer.encode_batch(texts), tokenizer.pad_id or 0)
    else:
        prompts, prompt_mask = greedy_batch(cfg.vocab_size, seq_len, greedy_rows)
    with watch("greedy_reference"):
        greedy_ref = reference.run("greedy", {"prompts": prompts, "mask": prompt_mask},
                                   lambda: torch_side.greedy(reference.model, prompts, prompt_mask, greedy_tokens))
    with watch("greedy_ours"):
        greedy_ours = our_greedy(loaded.module.clone(return_hidden=False), loaded.params, prompts, prompt_mask,
                                 greedy_tokens)
    return fields | greedy_fields(greedy_ours, greedy_ref) | {"greedy_prompts": texts}
