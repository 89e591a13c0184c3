"""Decoder parity (Gemma 1/2/3, Llama, Qwen3): the batch and the forward passes of both sides.

Both sides get the same weights and the same batch: B >= 2 rows, the second left-padded, longer than any
sliding window. Compared on real (non-pad) tokens: the embeddings, every layer's output, the final norm and the
logits. Then both sides greedy-decode a batch of 4 left-padded prompts of different lengths (ours: the decoding
engine's jitted loop; theirs: transformers' `generate`): real models continue `GREEDY_PROMPTS` through their own
tokenizer, tiny random ones random ids.

Axis letters: B batch, T tokens, V vocab.
"""

from typing import Any

import jax.numpy as jnp
import numpy as np

from big_vision_lite.checkpoints import Loaded
from big_vision_lite.decoding.engine import generate, jitted_prefill, left_pad
from big_vision_lite.models.masks import positions_from_mask
from big_vision_lite.parity import torch_side
from big_vision_lite.parity.golden import ReferenceSide
from big_vision_lite.parity.report import LayerError, compare_stage
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


def compare(loaded: Loaded, reference: ReferenceSide, watch: Stopwatch, *, seq_len: int | None = None,
            greedy_tokens: int = 32, greedy_rows: int = 4) -> dict[str, Any]:
    """Every stage and the greedy ids of both sides (see the module docstring): the `ParityReport` fields."""
    cfg = loaded.config
    # Longer than any sliding window, so windowed layers really drop keys.
    seq_len = seq_len or max(32, (cfg.sliding_window or 0) + 16)
    tokens, mask = parity_batch(cfg.vocab_size, seq_len)
    with watch("forward_reference"):
        ref = reference.run("forward", {"tokens": tokens, "mask": mask},
                            lambda: _reference_forward(reference.model, tokens, mask))
    with watch("forward_ours"):
        ours = _our_forward(loaded, tokens, mask)
    names = ["embeddings", *[f"layer_{i}" for i in range(cfg.depth)], "final_norm", "logits"]
    layers: list[LayerError] = [compare_stage(n, ours[n], ref[n], mask) for n in names]
    del ref, ours

    texts = None
    if loaded.tokenizer is not None:
        tokenizer = loaded.tokenizer
        texts = list(GREEDY_PROMPTS[:greedy_rows])
        prompts, prompt_mask = left_pad(tokenizer.encode_batch(texts), tokenizer.pad_id or 0)
    else:
        prompts, prompt_mask = greedy_batch(cfg.vocab_size, seq_len, greedy_rows)
    with watch("greedy_reference"):
        greedy_ref = reference.run("greedy", {"prompts": prompts, "mask": prompt_mask}, lambda: {
            "ids": torch_side.greedy(reference.model, prompts, prompt_mask, greedy_tokens)})["ids"]
    with watch("greedy_ours"):
        greedy_ours = generate(loaded.module.clone(return_hidden=False), loaded.params, prompts, prompt_mask,
                               greedy_tokens).tokens
    return {"model_type": cfg.family, "layers": layers, "greedy_ours": greedy_ours.tolist(),
            "greedy_ref": greedy_ref.tolist(), "greedy_prompts": texts}
