"""Golden-value parity of our SigLIP two-tower model against transformers' SiglipModel (PyTorch, eager attention).

Axis letters: B batch, R image side, T tokens (the text max_len), P patches, D width, E embedding width.

Both sides load the same HF folder and get the same deterministic batch (seeded): images [B, R, R, 3] uniform in
[-1, 1] (channels first for PyTorch) and token ids [B, T] at the full max_len (SigLIP pads to a fixed length and
pools the last position; no attention mask). Compared, each as max |ours - ref| and ||ours - ref|| / ||ref||:

- per tower: the embeddings (input of layer 0), every layer's output, the final-normed tokens, the pooled output
  (image: MAP head; text: last token through the head) and the L2-normalised embedding;
- `logits_per_image` [B, B] = exp(t') * zimg @ ztxt.T + b, and the sigmoid loss, each side computed from its own
  logits: `-(1/B) * sum_ij log_sigmoid(z_ij * logits_ij)`, z = +1 on the diagonal and -1 off it.

Without the MAP head (`vision_use_head: false`, PaliGemma's tower) transformers' SiglipModel.forward cannot run
(its pooler_output is None), so the image side stops at the final-normed tokens and there are no logits or loss;
the report says so in `notes`. `ok` means every relative error is within tolerance.
"""

import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from big_vision_lite.checkpoints.siglip import load_siglip_hf
from big_vision_lite.models.vit import ViT, compute_dtype
from big_vision_lite.parity import TINY_PARAMS, TOLERANCES, ParityReport, _errors


def siglip_parity_batch(image_size: int, vocab_size: int, seq_len: int, batch: int = 3,
                        seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic images [B, R, R, 3] float32 in [-1, 1] and token ids [B, T] int32."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1.0, 1.0, size=(batch, image_size, image_size, 3)).astype(np.float32)
    tokens = rng.integers(0, vocab_size, size=(batch, seq_len)).astype(np.int32)
    return images, tokens


def _torch_forward(folder: str, dtype: str, images: np.ndarray, tokens: np.ndarray,
                   use_head: bool) -> tuple[dict[str, np.ndarray], float]:
    """Reference activations (float32 numpy) and the seconds spent loading the model."""
    import torch
    from transformers import SiglipModel

    t0 = time.perf_counter()
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = SiglipModel.from_pretrained(folder, dtype=torch_dtype, attn_implementation="eager").eval()
    load_seconds = time.perf_counter() - t0

    pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(torch_dtype)  # [B, 3, R, R]
    ids = torch.from_numpy(tokens.astype(np.int64))
    ref: dict[str, Any] = {}
    with torch.no_grad():
        if use_head:
            out = model(input_ids=ids, pixel_values=pixels, output_hidden_states=True)
            vision, text = out.vision_model_output, out.text_model_output
        else:  # SiglipModel.forward needs a pooled image; run the towers on their own
            vision = model.vision_model(pixel_values=pixels, output_hidden_states=True)
            text = model.text_model(input_ids=ids, output_hidden_states=True)
        for prefix, tower in (("img", vision), ("txt", text)):
            ref[f"{prefix}/embeddings"] = tower.hidden_states[0]
            ref |= {f"{prefix}/layer_{i}": h for i, h in enumerate(tower.hidden_states[1:])}
            ref[f"{prefix}/encoded"] = tower.last_hidden_state
            if tower.pooler_output is not None:
                ref[f"{prefix}/pooled"] = tower.pooler_output
        if use_head:
            ref["img/normalized"] = out.image_embeds
            ref["txt/normalized"] = out.text_embeds
            logits = out.logits_per_image  # [B images, B texts]
            z = 2 * torch.eye(len(logits), dtype=logits.dtype) - 1
            ref["logits_per_image"] = logits
            ref["loss"] = (-torch.nn.functional.logsigmoid(z * logits).sum() / len(logits)).reshape(1)
        else:
            ref["txt/normalized"] = text.pooler_output / text.pooler_output.norm(p=2, dim=-1, keepdim=True)
    return {k: v.float().numpy() for k, v in ref.items()}, load_seconds


def _our_forward(module, params, images: np.ndarray, tokens: np.ndarray) -> dict[str, np.ndarray]:
    cfg = module.config
    use_head = cfg.image.pool_type == "map"
    apply = jax.jit(lambda p, i, t: module.apply({"params": p}, i, t))
    zimg, ztxt, out = apply(params, jnp.asarray(images) if use_head else None, jnp.asarray(tokens))
    if not use_head:  # the tokens-only ViT on its own (TwoTowers refuses token outputs)
        vit = ViT(cfg.image, return_hidden=True)
        _, img_out = jax.jit(lambda p, i: vit.apply({"params": p}, i))(params["img"], jnp.asarray(images))
        out |= {f"img/{k}": v for k, v in img_out.items()}

    ours: dict[str, Any] = {}
    for prefix, depth in (("img", cfg.image.depth), ("txt", cfg.text.depth)):
        ours[f"{prefix}/embeddings"] = out[f"{prefix}/with_posemb"]
        ours |= {f"{prefix}/layer_{i}": out[f"{prefix}/blocks"][i] for i in range(depth)}
        ours[f"{prefix}/encoded"] = out[f"{prefix}/encoded"]
    ours["txt/pooled"], ours["txt/normalized"] = out["txt/logits"], ztxt
    if use_head:
        ours["img/pooled"], ours["img/normalized"] = out["img/pre_logits"], zimg
        logits = out["t"] * jnp.einsum("ie,te->it", zimg, ztxt) + out["b"]  # [B, B] float32
        z = 2 * jnp.eye(len(logits)) - 1
        ours["logits_per_image"] = logits
        ours["loss"] = (-jnp.sum(jax.nn.log_sigmoid(z * logits)) / len(logits)).reshape(1)
    return {k: np.asarray(jnp.asarray(v, jnp.float32)) for k, v in ours.items()}


def run_siglip_parity(
    folder: str,
    dtype: str = "float32",
    tolerance: float | None = None,
    *,
    batch: int = 3,
    seed: int = 0,
) -> ParityReport:
    """Loads both sides from an HF SiglipModel folder and compares every stage; see the module docstring."""
    if batch < 2:
        raise ValueError(f"batch must be >= 2 (the loss needs negatives), got {batch}")
    compute = compute_dtype(dtype)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    module, params = load_siglip_hf(folder, dtype=dtype, return_hidden=True)
    # Both sides hold the weights in `dtype` (HF loads them so), whatever the file stores.
    params = jax.tree.map(lambda a: jnp.asarray(a, compute), params)
    seconds["load_ours"] = time.perf_counter() - t0
    cfg = module.config
    use_head = cfg.image.pool_type == "map"
    images, tokens = siglip_parity_batch(cfg.image.image_size, cfg.text.vocab_size, cfg.text.max_len, batch, seed)

    t0 = time.perf_counter()
    ref, seconds["load_reference"] = _torch_forward(str(folder), dtype, images, tokens, use_head)
    seconds["forward_reference"] = time.perf_counter() - t0 - seconds["load_reference"]
    t0 = time.perf_counter()
    ours = _our_forward(module, params, images, tokens)
    seconds["forward_ours"] = time.perf_counter() - t0

    if set(ours) != set(ref):
        raise AssertionError(f"stages differ: ours only {sorted(set(ours) - set(ref))}, "
                             f"reference only {sorted(set(ref) - set(ours))}")
    names = []  # tower by tower, input to output, then the pair-wise logits and loss
    for prefix, depth in (("img", cfg.image.depth), ("txt", cfg.text.depth)):
        stages = ["embeddings", *[f"layer_{i}" for i in range(depth)], "encoded", "pooled", "normalized"]
        names += [f"{prefix}/{s}" for s in stages if f"{prefix}/{s}" in ref]
    names += [n for n in ("logits_per_image", "loss") if n in ref]
    layers = [_errors(n, ours[n], ref[n], np.ones(ref[n].shape[0], bool)) for n in names]
    notes = [] if use_head else [
        "vision_use_head is false: transformers' SiglipModel.forward cannot run without the MAP head, so the image "
        "side is compared up to the final-normed tokens and there are no logits or loss"
    ]
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    size = "tiny" if n_params < TINY_PARAMS else "real"
    return ParityReport(
        model=Path(folder).name,
        model_type="siglip",
        dtype=dtype,
        tolerance=tolerance if tolerance is not None else TOLERANCES[(dtype, size)],
        layers=layers,
        greedy_ours=None,  # an encoder: nothing to decode
        greedy_ref=None,
        seconds={k: round(v, 3) for k, v in seconds.items()},
        notes=notes,
    )
