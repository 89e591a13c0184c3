"""SigLIP as a task of the shared training loop: the two-tower model, the sigmoid loss and zero-shot retrieval.

Axis letters: B global batch, A accumulation micro-batches, E embedding width, S image side, L text length.

* Data: `config.data` names the generated shapes dataset (`name="shapes"`, held-out attribute combinations as the
  evaluation split) or captioned images on disk (`name="folder"`: JSONL/CSV; `name="tar"`: webdataset shards),
  each with a held-out evaluation source.
* Tokenizer: `config.text.tokenizer` (a folder or file `load_tokenizer` reads) or, when None, a subword tokenizer
  trained on the captions; either way it is saved in `DIR/tokenizer` and reused on resume.
* NaFlex (SigLIP 2, `config.model.image.naflex`): every image is drawn again at one of `config.naflex.grids`
  (patch rows x columns, all within `config.naflex.max_num_patches`): training examples at a grid drawn per step,
  evaluation examples at grid `i % len(grids)`, so each aspect ratio is trained and scored.
* Loss: `config.loss.impl` = dense, blocked (one device, O(B x block) memory) or ring (shard_map over the mesh).
* Gradient accumulation (`config.accum_steps` > 1) is exact: the loss couples every pair in the batch, so the
  embeddings of all micro-batches are computed first (no gradient), the loss and its gradient w.r.t. the
  embeddings are taken on the full batch, and each micro-batch's encoders are then re-run and back-propagated
  with its slice of that gradient (GradCache). Peak activation memory is one micro-batch's.
"""

import dataclasses
import functools
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from big_vision_lite.checkpoints.run import RunInfo
from big_vision_lite.checkpoints.tokenizer import Tokenizer
from big_vision_lite.data.naflex import NaFlexProcessor
from big_vision_lite.data.pipeline import make_eval_batches, make_train_loader
from big_vision_lite.losses import sigmoid_loss
from big_vision_lite.models.two_towers import TwoTowers, init_params, two_towers_config
from big_vision_lite.models.vit import NaFlexImages
from big_vision_lite.train.distributed import gather_objects
from big_vision_lite.train.runs import Requirement
from big_vision_lite.train.sharding import BATCH_AXES, batch_sharding, constrain_batch
from big_vision_lite.train.tasks.common import caption_tokenizer, make_sources
from big_vision_lite.utils.dtypes import as_dtype, dtype_name

EVAL_KEYS = ("eval/i2t_top1", "eval/t2i_top1")
# Keys of `config.model` that are module settings (the same for both towers), not the towers' architecture.
MODULE_SETTINGS = ("dtype", "scan_layers", "remat_policy")


def siglip_loss(zimg: jax.Array, ztxt: jax.Array, t: jax.Array, b: jax.Array, loss: ml_collections.ConfigDict,
                mesh: Mesh) -> tuple[jax.Array, dict]:
    """The sigmoid loss of embeddings [B, E] kept split like the batch, by `loss.impl` (and `loss.block_size`)."""
    zimg, ztxt = constrain_batch(zimg, mesh), constrain_batch(ztxt, mesh)
    return sigmoid_loss(zimg, ztxt, t, b, impl=loss.impl, block_size=loss.block_size, mesh=mesh, axis_name=BATCH_AXES)


def siglip_grads(model: TwoTowers, params: Any, batch: dict[str, jax.Array], loss: ml_collections.ConfigDict,
                 mesh: Mesh) -> tuple[jax.Array, dict, jax.Array, jax.Array, Any]:
    """(loss, logit stats, t, b, gradients w.r.t. params) of one batch (`image`, `text`) without accumulation:
    the training step and `bvl plan` both take it."""
    def loss_fn(p):
        zimg, ztxt, out = model.apply({"params": p}, batch["image"], batch["text"])
        value, stats = siglip_loss(zimg, ztxt, out["t"][0], out["b"][0], loss, mesh)
        return value, (stats, out["t"][0], out["b"][0])
    (value, (stats, t, b)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return value, stats, t, b, grads


class SiglipTask:
    """The two-tower model trained with the sigmoid loss; evaluated by zero-shot retrieval on held-out pairs."""

    eval_keys = EVAL_KEYS

    @staticmethod
    def requires(config: ml_collections.ConfigDict) -> tuple[Requirement, ...]:
        """SigLIP trains from scratch: no other run."""
        del config
        return ()

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | Path, mesh: Mesh):
        accum = config.accum_steps
        if isinstance(accum, bool) or not isinstance(accum, int) or accum < 1 or config.batch_size % accum:
            raise ValueError(f"config.accum_steps must be an int >= 1 dividing batch_size={config.batch_size} (the "
                             f"micro-batches split the global batch), got {accum!r}")
        self.config, self.mesh = config, mesh
        self.train_source, self.eval_source, self.distractors = make_sources(config.data)
        self.tokenizer = caption_tokenizer(config, Path(workdir), self.train_source)
        model = config.model.to_dict()
        settings = {k: model.pop(k) for k in MODULE_SETTINGS if k in model}
        model["image"]["image_size"] = config.data.image_size  # one source of truth for the image side
        model["text"] |= {"vocab_size": self.tokenizer.vocab_size, "max_len": config.text.max_len}
        if "dtype" in settings:
            settings["dtype"] = as_dtype(settings["dtype"])  # one kind of value: equal modules share compilations
        self.model = TwoTowers(two_towers_config(model), **settings)
        # Training keeps the towers' activations split like the batch (an `fsdp` mesh would otherwise split some by
        # feature and hold the whole batch on every device); evaluation runs `self.model`, free of the mesh, since
        # with several processes each evaluates on its own host copy of the parameters.
        self.train_model = self.model.clone(activation_sharding=None if mesh is None else batch_sharding(mesh))
        self._run_info = RunInfo("siglip", dataclasses.asdict(self.model.config), dtype=dtype_name(self.model.dtype),
                                 param_dtype=dtype_name(self.model.param_dtype), scan_layers=self.model.scan_layers,
                                 remat_policy=self.model.remat_policy)
        _warn_if_truncated(self.tokenizer, self.train_source.captions()[:2000], config.text.max_len)
        self.naflex, self.grids = None, []
        if self.model.config.image.naflex:
            limit = config.naflex.max_num_patches
            self.naflex = NaFlexProcessor(patch_size=self.model.config.image.patch_size, max_num_patches=limit)
            self.grids = [tuple(g) for g in config.naflex.grids]
            if not self.grids or any(len(g) != 2 or min(g) < 1 or g[0] * g[1] > limit for g in self.grids):
                raise ValueError(f"config.naflex.grids {self.grids}: each (rows, columns) must hold 1 to "
                                 f"config.naflex.max_num_patches {limit} patches")
        self._loader = None
        self._embed = jax.jit(self._embed_both)

    # -- the loop's interface ---------------------------------------------------------------------------------

    def init_params(self, rng: jax.Array) -> Any:
        return init_params(self.model, rng)

    def batches(self, start_step: int, rows: tuple[int, int] | None = None) -> Iterator[dict[str, np.ndarray]]:
        data = self.config.data
        self._loader = make_train_loader(
            self.train_source, batch_size=self.config.batch_size, image_size=data.image_size,
            tokenizer=self.tokenizer, max_len=self.config.text.max_len, seed=self.config.seed,
            start_step=start_step, worker_count=data.workers, rows=rows)
        lo, hi = rows or (0, self.config.batch_size)
        for step, batch in enumerate(self._loader, start_step):
            images = batch["image"]
            if self.naflex is not None:  # drawn for the whole global batch: any process split sees the same grids
                picks = np.random.default_rng([self.config.seed, step]).integers(len(self.grids),
                                                                                 size=self.config.batch_size)
                images = self._naflex_images(images, picks[lo:hi])
            yield {"image": images, "text": batch["text"]}

    def train_grads(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array
                    ) -> tuple[jax.Array, dict[str, jax.Array], Any]:
        del rng  # no dropout: SigLIP trains deterministically
        if self.config.accum_steps == 1:
            loss, stats, t, b, grads = siglip_grads(self.train_model, params, batch, self.config.loss, self.mesh)
        else:
            loss, stats, t, b, grads = self._accumulated_grads(params, batch)
        metrics = {f"logits/{k}": v for k, v in stats.items()} | {"t": t, "b": b}
        return loss, metrics, grads

    def evaluate(self, params: Any) -> dict[str, float]:
        """Zero-shot retrieval of the held-out pairs, top-1 image -> caption and caption -> image, among the
        held-out pairs plus the distractors."""
        queries = self.embed_source(params, self.eval_source)
        extra = self.embed_source(params, self.distractors) if self.distractors is not None else None
        return retrieval_top1(*queries, distractors=extra)

    def report(self) -> dict[str, Any]:
        return {"skipped_images": self._loader.skipped if self._loader is not None else 0}

    def run_info(self) -> RunInfo:
        return self._run_info

    # -- internals --------------------------------------------------------------------------------------------

    def _naflex_images(self, images: np.ndarray, picks: np.ndarray) -> NaFlexImages:
        """The square images [B, S, S, 3] in [-1, 1], each drawn again at grid `self.grids[picks[i]]`."""
        unit = (np.asarray(images, np.float32) + 1) / 2  # [0, 1], what the processor takes
        return self.naflex.process_images(list(np.clip(unit, 0, 1)), [self.grids[i] for i in picks])

    def embed_source(self, params: Any, source: Any) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(zimg [N, E], ztxt [N, E], captions) of every readable example of `source`; with several processes, each
        embeds its share of the batches and every process gets all of them back."""
        zimg, ztxt, captions = [], [], []
        for batch in make_eval_batches(source, batch_size=self.config.batch_size,
                                       image_size=self.config.data.image_size, tokenizer=self.tokenizer,
                                       max_len=self.config.text.max_len,
                                       share=(jax.process_index(), jax.process_count())):
            images = batch["image"]
            if self.naflex is not None:  # example i at grid i mod len(grids): every grid is scored
                images = self._naflex_images(images, np.maximum(np.asarray(batch["index"]), 0) % len(self.grids))
            zi, zt = self._embed(params, images, batch["text"])
            keep = np.asarray(batch["mask"], bool)
            zimg.append(np.asarray(zi)[keep])
            ztxt.append(np.asarray(zt)[keep])
            captions += [c for c, k in zip(batch["caption"], keep, strict=True) if k]
        shares = gather_objects((zimg, ztxt, captions))  # in process order: the source's order
        return (np.concatenate([z for share in shares for z in share[0]]),
                np.concatenate([z for share in shares for z in share[1]]), [c for share in shares for c in share[2]])

    def _embed_both(self, params: Any, images: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        zimg, ztxt, _ = self.model.apply({"params": params}, images, tokens)
        return zimg, ztxt

    def _accumulated_grads(self, params: Any, batch: dict[str, jax.Array]):
        """Exact full-batch gradient with one micro-batch of activations at a time (see the module docstring)."""
        steps = self.config.accum_steps
        # Micro-batch a takes rows a, a+A, a+2A, ...: a strided split keeps every micro-batch spread over all
        # devices (a contiguous split would put each one on a few devices only).
        micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(-1, steps, *x.shape[1:]), 0, 1), batch)  # [A, B/A]

        def embed(p, mb):
            zimg, ztxt, _ = self.train_model.apply({"params": p}, mb["image"], mb["text"])
            return zimg, ztxt

        zimg, ztxt = jax.lax.map(lambda mb: embed(params, mb), micro)  # [A, B/A, E] each
        unsplit = lambda z: jnp.swapaxes(z, 0, 1).reshape(-1, z.shape[-1])  # noqa: E731  [B, E], original order
        (t, b), scalars_vjp = jax.vjp(lambda p: tuple(v[0] for v in self._scalars(p)), params)
        loss_fn = functools.partial(siglip_loss, loss=self.config.loss, mesh=self.mesh)
        (loss, stats), (g_img, g_txt, g_t, g_b) = jax.value_and_grad(
            loss_fn, argnums=(0, 1, 2, 3), has_aux=True)(unsplit(zimg), unsplit(ztxt), t, b)
        (grads,) = scalars_vjp((g_t, g_b))
        split = lambda g: jnp.swapaxes(g.reshape(-1, steps, g.shape[-1]), 0, 1)  # noqa: E731  [A, B/A, E]

        def add_micro_batch(acc, xs):
            mb, gi, gt = xs
            _, embed_vjp = jax.vjp(lambda p: embed(p, mb), params)
            (g,) = embed_vjp((gi, gt))
            return jax.tree.map(jnp.add, acc, g), None

        grads, _ = jax.lax.scan(add_micro_batch, grads, (micro, split(g_img), split(g_txt)))
        return loss, stats, t, b, grads

    def _scalars(self, params: Any) -> tuple[jax.Array, jax.Array]:
        _, _, out = self.model.apply({"params": params}, None, None)
        return out["t"], out["b"]


def _warn_if_truncated(tokenizer: Tokenizer, captions: list[str], max_len: int) -> None:
    """Warns when captions lose tokens to `text.max_len`: silently cut captions (e.g. the position words at the end
    of a shapes caption) make pairs the model cannot tell apart."""
    lengths = [len(ids) + 1 for ids in tokenizer.encode_batch(captions, add_bos=False)]  # + EOS
    cut = sum(n > max_len for n in lengths)
    if cut:
        warnings.warn(f"{cut} of {len(captions)} sampled captions are longer than text.max_len={max_len} tokens "
                      f"(longest {max(lengths)}) and get truncated; raise text.max_len or text.vocab_size",
                      stacklevel=3)


def retrieval_top1(zimg: np.ndarray, ztxt: np.ndarray, captions: list[str],
                   distractors: tuple[np.ndarray, np.ndarray, list[str]] | None = None) -> dict[str, float]:
    """Top-1 accuracy of retrieving each query image's caption and each query caption's image by cosine
    similarity, among the queries plus the `distractors` (zimg, ztxt, captions), which are candidates only.

    A retrieval counts as correct when the retrieved item carries the query's caption text, so duplicate
    captions in real data do not count as errors.
    """
    all_img, all_txt, all_captions = zimg, ztxt, list(captions)
    if distractors is not None:
        all_img, all_txt = np.concatenate([zimg, distractors[0]]), np.concatenate([ztxt, distractors[1]])
        all_captions += list(distractors[2])
    labels = np.unique(np.asarray(all_captions), return_inverse=True)[1]
    queries = labels[: len(captions)]
    i2t = labels[(zimg @ all_txt.T).argmax(axis=1)] == queries  # [Q, N] similarities, best caption per image
    t2i = labels[(ztxt @ all_img.T).argmax(axis=1)] == queries  # best image per caption
    return {"eval/i2t_top1": float(i2t.mean()), "eval/t2i_top1": float(t2i.mean())}

