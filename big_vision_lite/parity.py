"""Golden-value parity of our decoder against transformers (PyTorch, eager attention), layer by layer.

Both sides get the same weights and the same batch: B >= 2 rows, the second left-padded, longer than any
sliding window. Compared on real (non-pad) tokens: the embeddings, every layer's output, the final norm and the
logits, each as max |ours - ref| and ||ours - ref|| / ||ref||. Then both sides greedy-decode a batch of 4
left-padded prompts of different lengths (ours: `generate`'s jitted loop; theirs: transformers' `generate`) and
the ids are compared. `ok` means every relative error is within tolerance and (float32) the greedy ids match.
"""

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from big_vision_lite.checkpoints import load_decoder
from big_vision_lite.checkpoints.packaged import PACKAGED_MODELS, packaged_gguf_path
from big_vision_lite.generate import greedy, left_pad, make_apply
from big_vision_lite.models.gemma import positions_from_mask, prefill_mask
from big_vision_lite.tokenizer import SENTENCEPIECE_FILE, TOKENIZER_FILE, load_tokenizer

# Relative-error tolerances. float32: op-order differences only (tiny models reach ~1e-6; 18-30 real layers
# with 262k-wide logits accumulate more). bfloat16: 8 mantissa bits, ~4e-3 per rounding, compounded per layer.
TOLERANCES = {("float32", "tiny"): 1e-5, ("float32", "real"): 1e-4, ("bfloat16", "tiny"): 3e-2,
              ("bfloat16", "real"): 6e-2}
TINY_PARAMS = 10_000_000  # below this a checkpoint counts as a tiny test model
# Real models continue text of different token lengths (random ids would make near-tied logits likely).
GREEDY_PROMPTS = ("The capital of France is", "Here is a short poem about the sea:\n",
                  "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n", "1, 1, 2, 3, 5, 8,")


@dataclasses.dataclass
class LayerError:
    name: str
    max_abs_err: float
    rel_err: float


@dataclasses.dataclass
class ParityReport:
    """One parity run: the per-stage errors and, for models that decode, both sides' greedy ids.

    Encoders (SigLIP) have nothing to decode: `greedy_ours`/`greedy_ref` are None, and so are `greedy_match` and
    `greedy_agree` in the JSON, which keeps one contract for every model type. `notes` say what was not compared.
    """

    model: str
    model_type: str
    dtype: str
    tolerance: float
    layers: list[LayerError]
    greedy_ours: list[list[int]] | None
    greedy_ref: list[list[int]] | None
    seconds: dict[str, float]
    greedy_prompts: list[str] | None = None  # the texts behind the greedy ids (None: random ids)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def max_rel_err(self) -> float:
        return max(e.rel_err for e in self.layers)

    @property
    def greedy_match(self) -> bool | None:
        return None if self.greedy_ours is None else self.greedy_ours == self.greedy_ref

    @property
    def greedy_agree(self) -> list[int] | None:
        """Per row, how many leading greedy ids agree (all of them when they match)."""
        if self.greedy_ours is None or self.greedy_ref is None:
            return None
        agree = []
        for ours, ref in zip(self.greedy_ours, self.greedy_ref, strict=True):
            same = [a == b for a, b in zip(ours, ref, strict=True)] + [False]
            agree.append(same.index(False))
        return agree

    @property
    def ok(self) -> bool:
        # bfloat16 implementations round in different places, so near-tied greedy choices may differ.
        within = self.max_rel_err <= self.tolerance
        return within and (self.greedy_match is not False or self.dtype != "float32")

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "model_type": self.model_type,
            "dtype": self.dtype,
            "tolerance": self.tolerance,
            "max_rel_err": self.max_rel_err,
            "greedy_match": self.greedy_match,
            "greedy_agree": self.greedy_agree,
            "ok": self.ok,
            "layers": [dataclasses.asdict(e) for e in self.layers],
            "greedy_ours": self.greedy_ours,
            "greedy_ref": self.greedy_ref,
            "greedy_prompts": self.greedy_prompts,
            "seconds": self.seconds,
            "notes": self.notes,
        }

    def table(self) -> str:
        width = max(14, *(len(e.name) for e in self.layers))
        lines = [f"parity {self.model} ({self.model_type}, {self.dtype}) vs transformers eager",
                 f"{'stage':<{width}} {'max_abs_err':>12} {'rel_err':>12}"]
        lines += [f"{e.name:<{width}} {e.max_abs_err:>12.3e} {e.rel_err:>12.3e}" for e in self.layers]
        lines += [f"note: {n}" for n in self.notes]
        summary = f"max_rel_err {self.max_rel_err:.3e} (tolerance {self.tolerance:.0e}); "
        if self.greedy_ours is not None:
            summary += (f"greedy {len(self.greedy_ours[0])} tokens match: {self.greedy_match} "
                        f"(leading ids that agree per row: {self.greedy_agree}); ")
        lines.append(summary + f"ok: {self.ok}")
        return "\n".join(lines)


def load_reference(name_or_path: str, dtype: str, attn_implementation: str = "eager"):
    """The transformers model for the same weights: packaged models load from their GGUF file directly."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "attn_implementation": attn_implementation}
    if name_or_path in PACKAGED_MODELS:
        gguf = packaged_gguf_path(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(name_or_path), **kwargs)
    return model.eval()


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


def greedy_inputs(name_or_path: str, vocab_size: int, longest: int,
                  rows: int = 4) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """The greedy check's prompts: `GREEDY_PROMPTS` through the model's own tokenizer when it has one (packaged
    models, folders with tokenizer files), else random ids of different lengths (`greedy_batch`)."""
    folder = Path(name_or_path)
    if name_or_path in PACKAGED_MODELS or any((folder / f).is_file() for f in (TOKENIZER_FILE, SENTENCEPIECE_FILE)):
        tokenizer = load_tokenizer(name_or_path)
        texts = list(GREEDY_PROMPTS[:rows])
        return *left_pad(tokenizer.encode_batch(texts), tokenizer.pad_id or 0), texts
    return *greedy_batch(vocab_size, longest, rows), None


@contextlib.contextmanager
def capture_decoder_stages(body) -> Iterator[dict[str, Any]]:
    """While open, records into the yielded dict the input of `body.layers[0]` (`embeddings`), each layer's output
    (`layer_i`) and the final norm's (`final_norm`) of a transformers decoder body (torch tensors)."""
    captured: dict[str, Any] = {}

    def first(value):
        return value[0] if isinstance(value, tuple) else value

    def grab_input(_module, args, kwargs):
        captured["embeddings"] = args[0] if args else kwargs["hidden_states"]

    hooks = [body.layers[0].register_forward_pre_hook(grab_input, with_kwargs=True)]
    for i, layer in enumerate(body.layers):
        record = lambda _m, _a, out, i=i: captured.__setitem__(f"layer_{i}", first(out))  # noqa: E731
        hooks.append(layer.register_forward_hook(record))
    hooks.append(body.norm.register_forward_hook(lambda _m, _a, out: captured.__setitem__("final_norm", out)))
    try:
        yield captured
    finally:
        for h in hooks:
            h.remove()


def _torch_forward(model, tokens: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> dict[str, np.ndarray]:
    """Runs `model` once and records the input of layer 0, each layer's output, the final norm and the logits."""
    import torch

    with capture_decoder_stages(model.model) as captured, torch.no_grad():
        out = model(input_ids=torch.from_numpy(tokens.astype(np.int64)),
                    attention_mask=torch.from_numpy(mask.astype(np.int64)),
                    position_ids=torch.from_numpy(positions.astype(np.int64)), use_cache=False)
    captured["logits"] = out.logits
    return {k: v.float().numpy() for k, v in captured.items()}


def _torch_greedy(model, tokens: np.ndarray, mask: np.ndarray, max_new_tokens: int) -> np.ndarray:
    import torch

    # No early stop: both sides produce exactly max_new_tokens ids, EOS included.
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(input_ids=torch.from_numpy(tokens.astype(np.int64)),
                             attention_mask=torch.from_numpy(mask.astype(np.int64)),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0,
                             top_k=None, top_p=None, temperature=None)
    return out[:, tokens.shape[1]:].numpy()


def _errors(name: str, ours: np.ndarray, ref: np.ndarray, valid: np.ndarray) -> LayerError:
    if ours.shape != ref.shape:
        raise AssertionError(f"{name}: our shape {ours.shape} differs from the reference's {ref.shape}")
    diff = (ours.astype(np.float64) - ref.astype(np.float64))[valid]
    ref64 = ref.astype(np.float64)[valid]
    return LayerError(name, float(np.abs(diff).max()), float(np.linalg.norm(diff) / np.linalg.norm(ref64)))


def run_parity(
    name_or_path: str,
    dtype: str = "float32",
    *,
    seq_len: int | None = None,
    batch: int = 2,
    greedy_tokens: int = 32,
    greedy_rows: int = 4,
    tolerance: float | None = None,
) -> ParityReport:
    """Loads both sides, compares every stage and greedy ids; see the module docstring."""
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    module, params, cfg = load_decoder(name_or_path, dtype, return_hidden=True)
    seconds["load_ours"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    reference = load_reference(name_or_path, dtype)
    seconds["load_reference"] = time.perf_counter() - t0

    # Longer than any sliding window, so windowed layers really drop keys.
    seq_len = seq_len or max(32, (cfg.sliding_window or 0) + 16)
    tokens, mask = parity_batch(cfg.vocab_size, seq_len, batch)
    positions = np.asarray(positions_from_mask(jnp.asarray(mask)))

    t0 = time.perf_counter()
    ref = _torch_forward(reference, tokens, mask, positions)
    seconds["forward_reference"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    logits, _, out = make_apply(module)(params, jnp.asarray(tokens), jnp.asarray(positions),
                                        prefill_mask(jnp.asarray(mask)), None)
    ours = {"embeddings": out["embeddings"], "final_norm": out["final"], "logits": logits}
    ours |= {f"layer_{i}": h for i, h in enumerate(out["hidden"])}
    ours = {k: np.asarray(jnp.asarray(v, jnp.float32)) for k, v in ours.items()}
    seconds["forward_ours"] = time.perf_counter() - t0

    names = ["embeddings", *[f"layer_{i}" for i in range(cfg.depth)], "final_norm", "logits"]
    layers = [_errors(n, ours[n], ref[n], mask) for n in names]
    del ref, ours, logits, out

    prompts, prompt_mask, texts = greedy_inputs(name_or_path, cfg.vocab_size, seq_len, greedy_rows)
    t0 = time.perf_counter()
    greedy_ref = _torch_greedy(reference, prompts, prompt_mask, greedy_tokens)
    seconds["greedy_reference"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    greedy_ours = greedy(module.clone(return_hidden=False), params, prompts, prompt_mask, greedy_tokens)
    seconds["greedy_ours"] = time.perf_counter() - t0

    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    size = "tiny" if n_params < TINY_PARAMS else "real"
    return ParityReport(
        model=str(name_or_path) if name_or_path in PACKAGED_MODELS else Path(name_or_path).name,
        model_type=cfg.family,
        dtype=dtype,
        tolerance=tolerance if tolerance is not None else TOLERANCES[(dtype, size)],
        layers=layers,
        greedy_ours=greedy_ours.tolist(),
        greedy_ref=greedy_ref.tolist(),
        seconds={k: round(v, 3) for k, v in seconds.items()},
        greedy_prompts=texts,
    )

