"""PaliGemma fine-tuning as a task of the shared training loop: next-token cross-entropy on the suffix only.

Axis letters: B batch, T tokens (image placeholders + BOS + prefix + suffix), V vocab, R image side.

* Vision tower: the image tower of a SigLIP run (`config.init.siglip_config` in `config.init.siglip_workdir`),
  without its MAP head; its sizes come from that run's config, so the two cannot disagree. The task `requires`
  that run: the training loop trains it first when it has not finished. The projector (`img/head`) and the
  decoder start fresh.
* Text: the PaliGemma layout of `data/processor.py` — `"<image>" * P + bos + prompt + "\\n" + caption + eos`,
  right-padded to `text.max_len`; the loss covers the caption and eos (`loss_mask`), never image or prompt.
* Tokenizer: `text.tokenizer` or one trained on the captions, saved in `DIR/tokenizer` (as SigLIP's).
* Freezing and LoRA: `config.trainable` (regexes, see `train/optimizer.py`) and `model.llm.lora`
  (`{rank, alpha}`: adapters on every attention and MLP einsum of the decoder).
* Evaluation: greedy captions of held-out images (`generate` with the image, prefix-LM prompt):
  `eval/caption_exact_match`, and for the generated shapes data the accuracy of each attribute
  (`eval/colour_acc`, `eval/shape_acc`, `eval/size_acc`, `eval/position_acc`) read back from the caption.
  The shapes data is scored on two splits (see `caption_eval_sources`): new images of the trained
  (colour, shape) pairs under `eval/`, and the pairs never trained on under `eval/novel_pairs/`.
"""

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from big_vision_lite.checkpoints.run import RunInfo, load_params, read_saved_config
from big_vision_lite.data.pipeline import make_eval_batches, make_train_loader
from big_vision_lite.data.processor import PaliGemmaProcessor
from big_vision_lite.data.shapes import POSITIONS, SIZES
from big_vision_lite.decoding.engine import generate
from big_vision_lite.models.gemma import DecoderConfig
from big_vision_lite.models.lora import LoRAConfig
from big_vision_lite.models.masks import positions_from_mask, prefix_lm_mask
from big_vision_lite.models.paligemma import (
    PaliGemma,
    PaliGemmaConfig,
    init_params,
    paligemma_config_to_dict,
)
from big_vision_lite.models.vit import ViTConfig, make_config, relayout_vit
from big_vision_lite.train.distributed import gather_objects
from big_vision_lite.train.runs import Requirement, default_workdir
from big_vision_lite.train.sharding import batch_sharding
from big_vision_lite.train.tasks.common import caption_tokenizer, make_sources
from big_vision_lite.utils.dtypes import as_dtype, dtype_name

ATTRIBUTES = ("colour", "shape", "size", "position")
NOVEL_PAIRS = "eval/novel_pairs/"  # metric prefix of the shapes' compositional split
EVAL_KEYS = ("eval/caption_exact_match", *(f"eval/{a}_acc" for a in ATTRIBUTES), f"{NOVEL_PAIRS}caption_exact_match",
             f"{NOVEL_PAIRS}shape_acc")
# ViT fields a SigLIP image tower's config carries over to PaliGemma (pooling and head are PaliGemma's own).
VISION_FIELDS = ("width", "depth", "mlp_dim", "num_heads", "patch_size", "norm_eps")


def siglip_requirement(init: ml_collections.ConfigDict) -> Requirement:
    """The SigLIP run the vision tower starts from: `init.siglip_config` in `init.siglip_workdir` (default: the
    cache directory's shared run of that config)."""
    workdir = Path(init.siglip_workdir) if init.siglip_workdir else default_workdir(init.siglip_config)
    return Requirement(init.siglip_config, workdir, "the PaliGemma vision tower starts from this SigLIP run")


def siglip_vision_init(init: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """(the config the SigLIP run trained with, its image tower params); the run must have finished (the task
    requires it)."""
    requirement = siglip_requirement(init)
    if not requirement.finished():
        raise ValueError(f"the SigLIP run in {requirement.workdir} has not finished: train it first with "
                         f"`bvl train {init.siglip_config} --workdir {requirement.workdir}`")
    step, params = load_params(requirement.workdir)
    saved = read_saved_config(requirement.workdir)  # what the tower was trained with, whatever the file says now
    assert saved is not None, "a finished run has its config.json (Requirement.finished reads it)"
    if step != saved.total_steps:  # load_params fell back past a corrupt final checkpoint
        raise ValueError(f"the SigLIP run in {requirement.workdir}: its final checkpoint (step {saved.total_steps}) "
                         f"cannot be read, only step {step}; a vision tower must start from the finished run")
    return saved, params["img"]


def vision_config(siglip: ml_collections.ConfigDict, llm_width: int) -> ViTConfig:
    image = siglip.model.image.to_dict()
    fields = {k: image[k] for k in VISION_FIELDS if k in image}
    return ViTConfig(**fields, image_size=siglip.data.image_size, pool_type="none", head_size=llm_width)


# Data fields a PaliGemma run must share with its SigLIP run: the image size the tower was trained at, and for the
# shapes data everything that decides the held-out pairs, or the tower would have trained on the novel pairs.
SHARED_DATA_FIELDS = {"shapes": ("image_size", "seed", "holdout_fraction", "colours", "shapes")}


def check_same_data(data: ml_collections.ConfigDict, siglip_data: ml_collections.ConfigDict, siglip_config: str
                    ) -> None:
    """Refuses a SigLIP vision tower trained on other data than `data` describes (see SHARED_DATA_FIELDS)."""
    def comparable(value: Any) -> Any:
        return list(value) if isinstance(value, list | tuple) else value  # a --set list equals the config's tuple

    for field in ("name", *SHARED_DATA_FIELDS.get(data.name, ("image_size",))):
        ours, theirs = data.get(field), siglip_data.get(field)
        if comparable(ours) != comparable(theirs):
            raise ValueError(f"data.{field} {ours!r} differs from the SigLIP run's {theirs!r} (init.siglip_config "
                             f"{siglip_config}); the vision tower must start from a run on the same data")


def decoder_config(llm: dict[str, Any], vocab_size: int) -> DecoderConfig:
    llm = dict(llm)
    if llm.get("lora"):
        llm["lora"] = make_config(LoRAConfig, "model.llm.lora", llm["lora"])
    return make_config(DecoderConfig, "model.llm", {**llm, "vocab_size": vocab_size})


def caption_eval_sources(data: ml_collections.ConfigDict) -> dict[str, Any]:
    """The sources a captioner is scored on, by metric prefix.

    Shapes data: `eval/` is the gallery split, a fresh rendering (a random stream training never reads) of every
    combination of the trained (colour, shape) pairs: captioning images never seen. `eval/novel_pairs/` is the
    test split, whose (colour, shape) pairs never occur in training (SigLIP's retrieval split): composition. A
    small decoder reads those pairs' colour, size and position but rarely their shape, because the vision
    tower's shape features are entangled with colour (a linear probe on them, fit on trained pairs, reads the
    shape of 0.98 of new trained-pair images but 0.63 of novel-pair ones), so it is reported, not the target.
    Folder and tar data: `eval/` is `data.eval_path`.
    """
    _, held_out, gallery = make_sources(data)
    if data.name == "shapes":
        return {"eval/": gallery, NOVEL_PAIRS: held_out}
    return {"eval/": held_out}


def caption_loss(model: PaliGemma, params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(mean cross-entropy of the suffix tokens, their greedy accuracy) of one batch: `input_ids`, `input_mask`,
    `mask_ar`, `loss_mask` [B, T] and `image` [B, R, R, 3]. The training step and `bvl plan` both take it."""
    mask = batch["input_mask"]
    logits, _, _ = model.apply({"params": params}, batch["input_ids"], positions_from_mask(mask),
                               prefix_lm_mask(mask, batch["mask_ar"]), images=batch["image"])  # [B, T, V]
    # Token t predicts token t + 1; only caption tokens (and eos) are targets. The targets move left rather than
    # the logits being cut to T - 1: slicing [B, T, V] copied it, and padded its gradient back, on every step.
    targets = jnp.roll(batch["input_ids"], -1, axis=1)  # [B, T]; the last position's target has weight 0
    weights = jnp.roll(batch["loss_mask"], -1, axis=1).at[:, -1].set(False).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # [B, T]
    loss = jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)
    # Greedy accuracy: the target has the largest logit (a tie counts as correct). Not argmax: its value-and-index
    # reduction over V took ~8% of the caption model's train step on XLA:CPU; a max is a plain reduction.
    logits = jax.lax.stop_gradient(logits)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [B, T]
    correct = (target_logit >= jnp.max(logits, axis=-1)).astype(jnp.float32)
    return loss, jnp.sum(correct * weights) / jnp.maximum(jnp.sum(weights), 1.0)


class PaliGemmaTask:
    """A PaliGemma captioner: SigLIP vision tower -> projector -> decoder, trained on (image, caption) pairs."""

    eval_keys = EVAL_KEYS

    @staticmethod
    def requires(config: ml_collections.ConfigDict) -> tuple[Requirement, ...]:
        """The SigLIP run the vision tower starts from."""
        return (siglip_requirement(config.init),)

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | Path, mesh: Mesh):
        self.config, self.mesh = config, mesh
        self.train_source = make_sources(config.data)[0]
        self.eval_sources = caption_eval_sources(config.data)
        siglip, self.vision_params = siglip_vision_init(config.init)
        check_same_data(config.data, siglip.data, config.init.siglip_config)
        tokenizer = caption_tokenizer(config, Path(workdir), self.train_source)
        model = config.model
        vision = vision_config(siglip, model.llm.width)
        self.processor = PaliGemmaProcessor(tokenizer, image_size=config.data.image_size,
                                            num_image_tokens=vision.num_patches)
        llm = decoder_config(model.llm.to_dict(), self.processor.vocab_size)
        self.model = PaliGemma(PaliGemmaConfig(vision, llm, self.processor.image_token_id),
                               dtype=as_dtype(model.dtype), scan_layers=model.scan_layers,
                               remat_policy=model.remat_policy)
        # Training keeps the activations split like the batch (an `fsdp` mesh would otherwise split some by feature
        # and hold the whole batch on every device); captioning runs `self.model`, free of the mesh, since with
        # several processes each evaluates on its own host copy of the parameters.
        self.train_model = self.model.clone(activation_sharding=None if mesh is None else batch_sharding(mesh))
        self._run_info = RunInfo("paligemma", paligemma_config_to_dict(self.model.config),
                                 dtype=dtype_name(self.model.dtype), param_dtype=dtype_name(self.model.param_dtype),
                                 scan_layers=model.scan_layers, remat_policy=model.remat_policy,
                                 prompt=config.text.prompt)
        self._loader = None
        captions = list(dict.fromkeys(c for source in self.eval_sources.values() if hasattr(source, "captions")
                                      for c in source.captions()))  # shapes splits share one caption list
        longest = max((len(ids) for ids in tokenizer.encode_batch(captions[:2000], add_bos=False)), default=0)
        self.max_new_tokens = int(config.get("eval_max_new_tokens") or longest + 2)  # + eos, + one spare

    # -- the loop's interface ---------------------------------------------------------------------------------

    def init_params(self, rng: jax.Array) -> Any:
        params = init_params(self.model, rng)
        img = dict(params["img"])
        vision = relayout_vit(self.vision_params, self.model.config.vision, self.model.scan_layers)
        for name, value in vision.items():
            if name not in img:
                continue  # the SigLIP tower's MAP head (and head): PaliGemma reads the tokens before them
            expected = jax.tree.map(np.shape, img[name])
            if jax.tree.map(np.shape, value) != expected:
                raise ValueError(f"SigLIP img/{name} has shapes {jax.tree.map(np.shape, value)}, PaliGemma's vision "
                                 f"tower expects {expected}")
            img[name] = jax.tree.map(jnp.asarray, value)
        return {**params, "img": img}

    def batches(self, start_step: int, rows: tuple[int, int] | None = None) -> Iterator[dict[str, np.ndarray]]:
        data = self.config.data
        self._loader = make_train_loader(
            self.train_source, batch_size=self.config.batch_size, image_size=data.image_size, tokenizer=None,
            max_len=self.config.text.max_len, seed=self.config.seed, start_step=start_step,
            worker_count=data.workers, rows=rows)
        lo, hi = rows or (0, self.config.batch_size)
        prompts = [self.config.text.prompt] * (hi - lo)
        for batch in self._loader:
            text = self.processor.tokenize(prompts, list(batch["caption"]), max_len=self.config.text.max_len)
            yield {"image": batch["image"], **{k: text[k] for k in ("input_ids", "input_mask", "mask_ar",
                                                                   "loss_mask")}}

    def train_grads(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array
                    ) -> tuple[jax.Array, dict[str, jax.Array], Any]:
        del rng  # no dropout
        (loss, accuracy), grads = jax.value_and_grad(lambda p: caption_loss(self.train_model, p, batch),
                                                     has_aux=True)(params)
        return loss, {"token_accuracy": accuracy}, grads

    def evaluate(self, params: Any) -> dict[str, float]:
        metrics = {}
        for prefix, source in self.eval_sources.items():
            predicted, truth = self.caption_source(params, source)
            exact = [p == t for p, t in zip(predicted, truth, strict=True)]
            metrics[f"{prefix}caption_exact_match"] = float(np.mean(exact))
            if self.config.data.name == "shapes":
                metrics |= attribute_accuracies(predicted, truth, self.config.data, prefix)
        return metrics

    def report(self) -> dict[str, Any]:
        return {"skipped_images": self._loader.skipped if self._loader is not None else 0}

    def run_info(self) -> RunInfo:
        return self._run_info

    # -- captioning -------------------------------------------------------------------------------------------

    def caption(self, params: Any, images: np.ndarray) -> list[str]:
        """Greedy captions of images [B, R, R, 3] in [-1, 1]."""
        prompt = self.processor.tokenize([self.config.text.prompt] * len(images), padding_side="left")
        out = generate(self.model, params, prompt["input_ids"], prompt["input_mask"], self.max_new_tokens,
                       images=images, mask_ar=prompt["mask_ar"], end_ids=self.processor.tokenizer.eos_ids,
                       pad_id=self.processor.pad_id)
        return [text.strip() for text in self.processor.batch_decode(out.tokens)]

    def caption_source(self, params: Any, source: Any) -> tuple[list[str], list[str]]:
        """(greedy captions, true captions) of every readable example of `source`; with several processes, each
        captions its share of the batches and every process gets all of them back."""
        predicted, truth = [], []
        for batch in make_eval_batches(source, batch_size=self.config.eval_batch_size,
                                       image_size=self.config.data.image_size, tokenizer=None,
                                       max_len=self.config.text.max_len,
                                       share=(jax.process_index(), jax.process_count())):
            keep = np.asarray(batch["mask"], bool)
            predicted += [c for c, k in zip(self.caption(params, batch["image"]), keep, strict=True) if k]
            truth += [c for c, k in zip(batch["caption"], keep, strict=True) if k]
        shares = gather_objects((predicted, truth))  # in process order: the source's order
        return [c for share in shares for c in share[0]], [c for share in shares for c in share[1]]

    def _logits(self, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
        mask = batch["input_mask"]
        logits, _, _ = self.model.apply({"params": params}, batch["input_ids"], positions_from_mask(mask),
                                        prefix_lm_mask(mask, batch["mask_ar"]), images=batch["image"])
        return logits


def parse_shapes_caption(text: str, data: ml_collections.ConfigDict) -> dict[str, str | None]:
    """The attributes a shapes caption names ("a small red circle at the top left"), None where it names none."""
    words = f" {text.strip()} "
    found: dict[str, str | None] = {}
    for attribute, names in (("colour", data.colours), ("shape", data.shapes), ("size", tuple(SIZES))):
        found[attribute] = next((n for n in names if re.search(rf"\b{n}\b", words)), None)
    # Longest phrase first: "at the top left" must not read as "at the top".
    phrases = sorted(POSITIONS, key=lambda p: len(p[1]), reverse=True)
    found["position"] = next((name for name, phrase, _, _ in phrases if f" {phrase} " in words), None)
    return found


def attribute_accuracies(predicted: list[str], truth: list[str], data: ml_collections.ConfigDict,
                         prefix: str = "eval/") -> dict[str, float]:
    """Share of captions naming each attribute (colour, shape, size, position) of the true caption."""
    pairs = [(parse_shapes_caption(p, data), parse_shapes_caption(t, data)) for p, t in zip(predicted, truth,
                                                                                          strict=True)]
    return {f"{prefix}{a}_acc": float(np.mean([p[a] == t[a] for p, t in pairs])) for a in ATTRIBUTES}
