"""SigLIP parity (HF `SiglipModel`): the batch and the forward passes of both sides.

Axis letters: B batch, R image side, T tokens (the text max_len), P patches, D width, E embedding width.

Both sides get the same deterministic batch: images [B, R, R, 3] uniform in [-1, 1] (channels first for
PyTorch) and token ids [B, T] at the full max_len (SigLIP pads to a fixed length and pools the last position; no
attention mask). Compared:

- per tower: the embeddings (input of layer 0), every layer's output, the final-normed tokens, the pooled output
  (image: MAP head; text: last token through the head) and the L2-normalised embedding;
- `logits_per_image` [B, B] = exp(t') * zimg @ ztxt.T + b, and the sigmoid loss, each side computed from its own
  logits: `-(1/B) * sum_ij log_sigmoid(z_ij * logits_ij)`, z = +1 on the diagonal and -1 off it.

Without the MAP head (`vision_use_head: false`, PaliGemma's tower) transformers' SiglipModel.forward cannot run
(its pooler_output is None), so the image side stops at the final-normed tokens and there are no logits or loss;
the report says so in `notes`.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from big_vision_lite.checkpoints import Loaded
from big_vision_lite.models.vit import NaFlexImages, ViT, ViTConfig
from big_vision_lite.parity import torch_side
from big_vision_lite.parity.golden import ReferenceSide
from big_vision_lite.parity.report import compare_stages
from big_vision_lite.utils.timing import Stopwatch

NO_HEAD_NOTE = ("vision_use_head is false: transformers' SiglipModel.forward cannot run without the MAP head, so the "
                "image side is compared up to the final-normed tokens and there are no logits or loss")


# NaFlex batches: each row's patch grid (rows, columns), cycled over the batch; wider, taller and squarer than the
# position grid, so the resize both shrinks and stretches, and every row but the first is padded.
NAFLEX_SHAPES = ((4, 5), (2, 8), (3, 5), (1, 12))


def siglip_parity_batch(image: ViTConfig, vocab_size: int, seq_len: int, batch: int = 3,
                        seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Deterministic image inputs and token ids [B, T] int32. Images: {"images": [B, R, R, 3]} float32 in [-1, 1];
    NaFlex: {"patches": [B, P, p*p*3] (zeros on padding), "spatial_shapes": [B, 2], "mask": [B, P]} with P the
    largest grid of `NAFLEX_SHAPES` (at least the position grid's count)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab_size, size=(batch, seq_len)).astype(np.int32)
    if not image.naflex:
        r = image.image_size
        return {"images": rng.uniform(-1.0, 1.0, size=(batch, r, r, 3)).astype(np.float32)}, tokens
    shapes = np.array([NAFLEX_SHAPES[i % len(NAFLEX_SHAPES)] for i in range(batch)], np.int32)
    length = max(int(shapes.prod(1).max()), image.num_patches)
    mask = np.arange(length)[None, :] < shapes.prod(1)[:, None]
    patches = rng.uniform(-1.0, 1.0, size=(batch, length, image.patch_size ** 2 * 3)).astype(np.float32)
    return {"patches": patches * mask[..., None], "spatial_shapes": shapes, "mask": mask}, tokens


def _pixel_inputs(model: Any, images: dict[str, np.ndarray]) -> dict[str, Any]:
    """transformers' image arguments: pixel_values [B, 3, R, R], or SigLIP 2's patches, mask and shapes."""
    import torch

    if "images" in images:
        return {"pixel_values": torch_side.pixels_nchw(images["images"], model.dtype)}
    return {"pixel_values": torch.from_numpy(images["patches"]).to(model.dtype),
            "pixel_attention_mask": torch_side.long_tensor(images["mask"]),
            "spatial_shapes": torch_side.long_tensor(images["spatial_shapes"])}


def _reference_forward(model: Any, images: dict[str, np.ndarray], tokens: np.ndarray,
                       use_head: bool) -> dict[str, np.ndarray]:
    """Reference activations (float32 numpy) of both towers, and with the MAP head the logits and loss."""
    import torch

    pixels, ids = _pixel_inputs(model, images), torch_side.long_tensor(tokens)
    ref: dict[str, Any] = {}
    with torch.no_grad():
        if use_head:
            out = model(input_ids=ids, **pixels, output_hidden_states=True)
            vision, text = out.vision_model_output, out.text_model_output
        else:  # SiglipModel.forward needs a pooled image; run the towers on their own
            vision = model.vision_model(**pixels, output_hidden_states=True)
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
    return torch_side.to_numpy(ref)


def _our_forward(loaded: Loaded, image_inputs: dict[str, np.ndarray], tokens: np.ndarray) -> dict[str, np.ndarray]:
    module, params = loaded.module, loaded.params
    cfg = module.config
    use_head = cfg.image.pool_type == "map"
    images = (jnp.asarray(image_inputs["images"]) if "images" in image_inputs else
              NaFlexImages(*(jnp.asarray(image_inputs[k]) for k in ("patches", "spatial_shapes", "mask"))))
    apply = jax.jit(lambda p, i, t: module.apply({"params": p}, i, t))
    zimg, ztxt, out = apply(params, images if use_head else None, jnp.asarray(tokens))
    if not use_head:  # the tokens-only ViT on its own (TwoTowers refuses token outputs)
        vit = ViT(cfg.image, **module.tower_settings())
        _, img_out = jax.jit(lambda p, i: vit.apply({"params": p}, i))(params["img"], images)
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


def compare(loaded: Loaded, reference: ReferenceSide, watch: Stopwatch, tolerance: float, *, batch: int = 3,
            seed: int = 0) -> dict[str, Any]:
    """Every stage of both towers, the logits and the loss (see the module docstring): the `ParityReport` fields."""
    del tolerance  # every stage is reported; encoder blocks have no drill-down
    if batch < 2:
        raise ValueError(f"batch must be >= 2 (the loss needs negatives), got {batch}")
    cfg = loaded.config
    use_head = cfg.image.pool_type == "map"
    images, tokens = siglip_parity_batch(cfg.image, cfg.text.vocab_size, cfg.text.max_len, batch, seed)
    inputs = {**images, "tokens": tokens}
    with watch("forward_reference"):
        ref = reference.run("forward", inputs, lambda: _reference_forward(reference.model, images, tokens, use_head))
    with watch("forward_truth"):
        truth = reference.run_truth("forward", inputs, lambda model: _reference_forward(model, images, tokens,
                                                                                        use_head))
    with watch("forward_ours"):
        ours = _our_forward(loaded, images, tokens)
    if set(ours) != set(ref):
        raise AssertionError(f"stages differ: ours only {sorted(set(ours) - set(ref))}, "
                             f"reference only {sorted(set(ref) - set(ours))}")
    names = []  # tower by tower, input to output, then the pair-wise logits and loss
    for prefix, depth in (("img", cfg.image.depth), ("txt", cfg.text.depth)):
        stages = ["embeddings", *[f"layer_{i}" for i in range(depth)], "encoded", "pooled", "normalized"]
        names += [f"{prefix}/{s}" for s in stages if f"{prefix}/{s}" in ref]
    names += [n for n in ("logits_per_image", "loss") if n in ref]
    patches = images.get("mask")  # NaFlex: the image tokens compared are the real patches

    def valid(name: str) -> np.ndarray:
        if patches is not None and ref[name].ndim == 3 and name.startswith("img/"):
            return patches
        return np.ones(ref[name].shape[0], bool)

    per_row = [compare_stages([n], ours, ref, truth, valid(n)) for n in names]
    return {"model_type": "siglip2" if cfg.image.naflex else "siglip",
            "layers": [e for errors, _ in per_row for e in errors],
            "truth": [t for _, truth_errors in per_row for t in truth_errors], "greedy_ours": None, "greedy_ref": None,
            "notes": [] if use_head else [NO_HEAD_NOTE]}
