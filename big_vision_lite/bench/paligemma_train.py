"""PaliGemma fine-tuning benchmark: examples/s of our jitted train step against transformers'
`PaliGemmaForConditionalGeneration` with the same weights, in three settings, for one or more model sizes.

Axis letters: B batch, T tokens (image placeholders + bos + prompt + "\\n" + caption + eos, right-padded), R image
side, V vocabulary.

Models (`MODELS`): "caption" is the `paligemma_shapes_caption` config as it is (or the config given); "large"
changes its sizes to a 224-px tower of ViT-B/16's patch and layout at half B/16's width and depth (width 384,
depth 6, mlp 1536, 6 heads: 196 image tokens) and a decoder of width 512, depth 6, mlp 2048, 8 heads of 64, one
KV head, with `text.max_len` 212 (196 image tokens + 16 text tokens); see `LARGE`.

Settings (`SETTINGS`): "full" trains every parameter; "attention" only the decoder's attention weights
(`config.trainable`, the big_vision colab's choice: the vision tower, projector, embedding, MLPs and norms are
frozen and have no optimizer state); "lora" adds rank-`LORA_RANK` adapters to every attention and MLP einsum of the
decoder (`model.llm.lora`) and trains only them (`trainable = ["lora_"]`).

- Ours: the very step `bvl train` runs: `train.loop.prepare(config, workdir)` builds the task, the optimizer
  (global-norm clipping, then AdamW on warmup + cosine, decay on ndim >= 2 params, frozen params without state)
  and the jitted step (state donated), compiled ahead of time (`compile_s`, not timed). The task requires a
  finished SigLIP run for its vision tower: the bench trains one of the tower's sizes for one step (batch 2) in a
  temporary workdir (`siglip_tower_run`), so the tower is close to its random initialisation; speed does not
  depend on the values. The task trains its caption tokenizer in its temporary workdir; the batches are the
  task's own (`task.batches`: generated shapes, the PaliGemma text layout), `num_batches` of them cycled from
  memory.
- PyTorch: `PaliGemmaForConditionalGeneration` of `paligemma_config_to_hf(cfg)` loaded with our initial
  parameters (`paligemma_params_to_hf`, in the in-memory layout the model reports); the same loss: the mean
  cross-entropy of the tokens `loss_mask` marks (caption + eos) predicted from the token before, on logits of the
  same prefix-LM attention (`token_type_ids` = our `mask_ar`, `attention_mask` = our `input_mask`, positions
  cumsum(mask) - 1 as ours); `clip_grad_norm_` over the trained tensors, then AdamW with the same betas, eps,
  weight decay, decay mask (ndim >= 2 in OUR layout, carried through the converter) and a `LambdaLR` replaying our
  schedule (`harness.torch_adamw`). Frozen tensors have `requires_grad` False and are not in the optimizer. LoRA
  is PEFT's (`get_peft_model`), started from our adapters as `checkpoints.peft` exports them: one adapter per
  transformers module whose B is block-diagonal over the heads (our adapters are per head). A plain PEFT update
  would fill B's off-diagonal blocks, so each B's gradient is multiplied by its block mask (a hook): the PEFT
  adapters then take exactly our updates (the mask costs one elementwise product per adapter per step).
  Attention: each of `attn_implementations` (eager, sdpa), each its own model and optimizer; the faster one is
  the reference. Threads: probed at every CPU and at 1 (as `bench siglip-train`), eager mode, no
  `torch.compile`.

Per setting, all sides first take `check_steps` untimed steps (same weights, same batches; the warm-up too): the
first losses must agree within `harness.TRAIN_FIRST_LOSS_TOL` and the last within `harness.TRAIN_CHECK_LOSS_TOL`.
Then `steps` timed steps per side in blocks of `block_steps`, interleaved (`harness.train_step_timing`). Examples/s
= B / median per-step time; `ratio` = ours / the faster torch side, target >= `TARGET_RATIO`. After timing, the
frozen parameters of every side are compared with their initial values (`frozen_unchanged`). Memory: ours' XLA
figures of the compiled step (`train.plan.memory_stats`: state, batch, outputs and temporaries), each side's
optimizer state, torch's parameters + gradients + optimizer state (its activations are not counted), and the
process's peak RSS after each setting (one process holds every side, so it only grows). """

import dataclasses
import itertools
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from big_vision_lite.bench.harness import (
    JaxStepRunner,
    TorchStepRunner,
    busy_cell,
    busy_warning,
    environment,
    loadavg,
    peak_rss_gib,
    torch_adamw,
    torch_num_threads,
    torch_thread_candidates,
    train_step_summary,
    train_step_timing,
)
from big_vision_lite.checkpoints.hf_paligemma import detect_layout, paligemma_config_to_hf, paligemma_params_to_hf
from big_vision_lite.checkpoints.peft import peft_state
from big_vision_lite.models.masks import positions_from_mask
from big_vision_lite.models.paligemma import PaliGemmaConfig
from big_vision_lite.train.config import load_config
from big_vision_lite.train.loop import Trainer, prepare, reuse_freed_host_memory, train
from big_vision_lite.train.optimizer import trainable_mask
from big_vision_lite.train.plan import memory_stats
from big_vision_lite.train.sharding import shard_batch

TARGET_RATIO = 1.5  # ours must train at least this many times as many examples per second as PyTorch
DEFAULT_CONFIG = "paligemma_shapes_caption"
TORCH_IMPLS = ("eager", "sdpa")
ATTENTION_PATTERN = r"^llm/layers[^/]*/attn/"  # the decoder's attention weights (unrolled or scanned layers)
LORA_RANK, LORA_ALPHA = 8, 8.0
SETTINGS: dict[str, dict[str, Any]] = {
    "full": {"trainable": None, "lora": None},
    "attention": {"trainable": [ATTENTION_PATTERN], "lora": None},
    "lora": {"trainable": ["lora_"], "lora": {"rank": LORA_RANK, "alpha": LORA_ALPHA}},
}
# The larger model: a 224-px tower of ViT-B/16's patch at half its width and depth, a width-512 decoder.
LARGE: dict[str, Any] = {
    "image_size": 224,
    "max_len": 212,  # 196 image tokens + bos + "caption" + "\n" + the caption + eos, with room to spare
    "vision": {"width": 384, "depth": 6, "mlp_dim": 1536, "num_heads": 6, "patch_size": 16},
    "llm": {"width": 512, "depth": 6, "mlp_dim": 2048, "num_heads": 8, "num_kv_heads": 1, "head_dim": 64},
    "batch_size": 8,
}
MODELS = ("caption", "large")
DEFAULT_BATCH = {"caption": None, "large": LARGE["batch_size"]}  # None: the config's batch size


# -- configs ------------------------------------------------------------------------------------------------------


def _resolve_config(config: str | ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    if isinstance(config, ml_collections.ConfigDict):
        return ml_collections.ConfigDict(config.to_dict())  # a copy: the bench changes it
    return load_config(str(config))


def model_config(base: ml_collections.ConfigDict, model: str) -> ml_collections.ConfigDict:
    """The PaliGemma config of `model` ("caption": `base` as it is; "large": `base` at the `LARGE` sizes)."""
    if model not in MODELS:
        raise ValueError(f"model {model!r} is not one of {MODELS}")
    config = ml_collections.ConfigDict(base.to_dict())
    if model == "large":
        config.data.image_size = LARGE["image_size"]
        config.text.max_len = LARGE["max_len"]
        config.model.llm.update(LARGE["llm"])
    return config


def siglip_tower_config(config: ml_collections.ConfigDict, model: str) -> ml_collections.ConfigDict:
    """A one-step SigLIP run of the tower `config` needs: `config.init.siglip_config`'s, on `config`'s data, at the
    `LARGE` tower sizes for "large"."""
    siglip = load_config(config.init.siglip_config)
    siglip.data = ml_collections.ConfigDict(config.data.to_dict())
    if model == "large":
        siglip.model.image.update(LARGE["vision"])
        siglip.model.out_dim = (None, LARGE["vision"]["width"])  # the text head maps to the image width
    siglip.total_steps, siglip.batch_size = 1, 2
    siglip.log_every = siglip.eval_every = siglip.ckpt_every = 1
    siglip.optimizer.warmup_steps = 0
    return siglip


def siglip_tower_run(config: ml_collections.ConfigDict, model: str, workdir: Path) -> None:
    """Trains the one-step SigLIP run of `siglip_tower_config` in `workdir` (the task's required run)."""
    train(siglip_tower_config(config, model), workdir, progress=False)


def setting_config(config: ml_collections.ConfigDict, setting: str, siglip_workdir: Path, batch_size: int | None,
                   seed: int) -> ml_collections.ConfigDict:
    """`config` with the `SETTINGS[setting]` trainable patterns and LoRA, the tower run, batch size and seed."""
    if setting not in SETTINGS:
        raise ValueError(f"setting {setting!r} is not one of {tuple(SETTINGS)}")
    out = ml_collections.ConfigDict(config.to_dict())
    out.init.siglip_workdir = str(siglip_workdir)
    out.trainable = SETTINGS[setting]["trainable"]
    out.model.llm.lora = SETTINGS[setting]["lora"]
    if batch_size is not None:
        out.batch_size = batch_size
    if out.get("accum_steps", 1) != 1:
        raise ValueError("the bench times one step on the whole batch; set accum_steps=1")
    out.seed += seed
    return out


# -- our side -----------------------------------------------------------------------------------------------------


def host_copy(tree: Any) -> Any:
    """A numpy copy of `tree` that owns its memory (device buffers are donated to the step)."""
    return jax.tree.map(lambda a: np.array(a, copy=True), jax.device_get(tree))


def _build_ours(config: ml_collections.ConfigDict, num_batches: int
                ) -> tuple[JaxStepRunner, Trainer, Any, list[dict[str, np.ndarray]], float, dict[str, int]]:
    """(runner, trainer, host copy of the initial params, host batches, compile seconds, XLA memory)."""
    with tempfile.TemporaryDirectory(prefix="bvl_bench_paligemma_train_") as workdir:
        trainer = prepare(config, workdir)  # the task trains its caption tokenizer in the workdir
    host_params = host_copy(trainer.task.init_params(trainer.init_rng))
    state = trainer.new_state(host_params)
    host_batches = list(itertools.islice(trainer.task.batches(0), num_batches))
    batches = [shard_batch(b, trainer.mesh) for b in host_batches]
    t0 = time.perf_counter()
    compiled = trainer.step.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - t0
    return (JaxStepRunner(compiled, state, batches), trainer, host_params, host_batches, compile_s,
            memory_stats(compiled))


# -- the PyTorch side ---------------------------------------------------------------------------------------------


def _without_adapters(params: Any) -> Any:
    if not isinstance(params, Mapping):
        return params
    return {k: _without_adapters(v) for k, v in params.items() if not k.endswith(("lora_a", "lora_b"))}


def hf_flags(marks: Any, cfg: PaliGemmaConfig, layout: Any) -> dict[str, bool]:
    """Per HF tensor name: the flag (1.0 / 0.0 leaves of `marks`, a tree shaped like our params without adapters)
    after the converter's reshapes and transposes; a tensor that would mix both is an error."""
    flags = {}
    for name, mark in paligemma_params_to_hf(marks, cfg, layout).items():
        if mark.size and mark.min() != mark.max():
            raise ValueError(f"{name} mixes flagged and unflagged parameters of ours")
        flags[name] = bool(mark.size and mark.max() == 1.0)
    return flags


def _marks(tree: Any, flag: Callable[[Any, Any], bool], other: Any = None) -> Any:
    """A float32 tree of 1s where `flag(leaf, other_leaf)` holds and 0s elsewhere (`other`: a tree like `tree`)."""
    other = jax.tree.map(lambda _: None, tree) if other is None else other
    return jax.tree.map(lambda p, o: np.full(np.shape(p), float(flag(p, o)), np.float32), tree, other)


def _peft_model(model: Any, host_params: Any, cfg: PaliGemmaConfig, prefix: str) -> tuple[Any, dict[str, Any]]:
    """PEFT's LoRA around `model`, started from our adapters (`checkpoints.peft`), each B's gradient masked to its
    block diagonal; returns (the PEFT model, {PEFT parameter name: block mask})."""
    import torch
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    state, conf = peft_state(host_params["llm"], cfg.llm, prefix)
    ones = jax.tree.map(np.ones_like, host_params["llm"])
    masks, _ = peft_state(ones, cfg.llm, prefix)  # our adapters' layout: 1 where a per-head block lies
    lora = LoraConfig(r=conf["r"], lora_alpha=conf["lora_alpha"], target_modules=conf["target_modules"],
                      lora_dropout=0.0, bias="none")
    peft_model = get_peft_model(model, lora)
    result = set_peft_model_state_dict(peft_model, {k: torch.from_numpy(v) for k, v in state.items()})
    if result.unexpected_keys:
        raise ValueError(f"PEFT did not take the adapters {result.unexpected_keys[:3]}")
    named = dict(peft_model.named_parameters())
    block_masks = {}
    for key, mask in masks.items():
        if ".lora_B." not in key:
            continue
        name = key.replace(".lora_B.weight", ".lora_B.default.weight")
        block = torch.from_numpy(np.ascontiguousarray(mask))
        named[name].register_hook(lambda grad, block=block: grad * block)
        block_masks[name] = block
    trained = {n for n, p in named.items() if p.requires_grad}
    expected = {k.replace(".weight", ".default.weight") for k in state}
    if trained != expected:
        raise ValueError(f"PEFT trains other tensors than our adapters: {sorted(trained ^ expected)[:5]}")
    return peft_model, block_masks


def build_torch_side(host_params: Any, cfg: PaliGemmaConfig, trainable: Any, opt: ml_collections.ConfigDict,
                     schedule_values: np.ndarray, attn_implementation: str, fused_adamw: bool
                     ) -> tuple[Any, dict[str, Any]]:
    """(model, facts): the HF model (PEFT's for LoRA) with our parameters, its frozen tensors' requires_grad off;
    `facts` holds the AdamW and schedule over the `trained` tensors (`optimizer`, `scheduler`), copies of the
    frozen ones (`initial_frozen`), PEFT's B masks (`block_masks`) and tensor counts."""
    import torch
    from transformers import PaliGemmaConfig as HFPaliGemmaConfig
    from transformers import PaliGemmaForConditionalGeneration

    lora = cfg.llm.lora is not None
    base_cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, lora=None)) if lora else cfg
    hf = {k: v for k, v in paligemma_config_to_hf(base_cfg).items() if k not in ("model_type", "architectures")}
    model = PaliGemmaForConditionalGeneration(HFPaliGemmaConfig(**hf, attn_implementation=attn_implementation))
    model = model.to(torch.float32).train()
    if model.config._attn_implementation != attn_implementation:
        raise ValueError(f"transformers gave attention {model.config._attn_implementation!r}, not "
                         f"{attn_implementation!r}")
    layout = detect_layout(model.state_dict())
    base_params, base_trainable = _without_adapters(host_params), _without_adapters(trainable)
    state = {k: torch.from_numpy(np.ascontiguousarray(v))
             for k, v in paligemma_params_to_hf(base_params, base_cfg, layout).items()}
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys or set(result.missing_keys) - {"lm_head.weight"}:  # the head is tied
        raise ValueError(f"PaliGemmaForConditionalGeneration's parameters differ from the converted ones: "
                         f"{sorted(result.unexpected_keys + result.missing_keys)[:5]}")
    decay = hf_flags(_marks(base_params, lambda p, _: np.ndim(p) >= 2), base_cfg, layout)
    trains = hf_flags(_marks(base_params, lambda _, t: bool(t), base_trainable), base_cfg, layout)
    named = dict(model.named_parameters())
    if set(named) != set(decay):
        raise ValueError(f"the HF model's parameters differ from the converted ones: "
                         f"{sorted(set(named) ^ set(decay))[:5]}")
    for name, p in named.items():
        p.requires_grad_(trains[name] and not lora)
    block_masks: dict[str, Any] = {}
    if lora:
        model, block_masks = _peft_model(model, host_params, cfg, layout.llm)
        trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        decayed = [p for _, p in trained]  # every adapter matrix (ours: lora_a/lora_b, all ndim >= 2)
        not_decayed: list[Any] = []
    else:
        trained = [(n, p) for n, p in named.items() if p.requires_grad]
        decayed = [p for n, p in trained if decay[n]]
        not_decayed = [p for n, p in trained if not decay[n]]
    optimizer, scheduler = torch_adamw(decayed, not_decayed, opt, schedule_values, fused_adamw)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    facts = {"optimizer": optimizer, "scheduler": scheduler, "trained": [p for _, p in trained],
             "initial_frozen": frozen, "block_masks": block_masks,
             "trained_tensors": len(trained), "decayed_tensors": len(decayed),
             "frozen_tensors": len(frozen)}
    return model, facts


def caption_loss_fn(model: Any) -> Callable[[Mapping[str, Any]], Any]:
    """The PyTorch loss of a batch: mean cross-entropy of the `loss_mask` tokens (as `tasks.paligemma.caption_loss`)."""
    import torch

    def loss_fn(batch: Mapping[str, Any]) -> Any:
        ids = batch["input_ids"]
        logits = model(input_ids=ids, pixel_values=batch["pixel_values"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], token_type_ids=batch["token_type_ids"],
                       use_cache=False).logits  # [B, T, V]
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        weights = batch["weights"]
        return (ce * weights.flatten()).sum() / weights.sum().clamp(min=1.0)
    return loss_fn


def torch_batch(batch: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """One of the task's batches as the HF model takes it (see the module docstring)."""
    import torch

    mask = np.asarray(batch["input_mask"])
    long = lambda a: torch.from_numpy(np.asarray(a).astype(np.int64))  # noqa: E731
    return {"input_ids": long(batch["input_ids"]), "attention_mask": long(mask),
            "position_ids": long(positions_from_mask(mask)), "token_type_ids": long(batch["mask_ar"]),
            "pixel_values": torch.from_numpy(np.ascontiguousarray(np.asarray(batch["image"]).transpose(0, 3, 1, 2))),
            "weights": torch.from_numpy(np.asarray(batch["loss_mask"])[:, 1:].astype(np.float32))}


def _torch_bytes(tensors: Sequence[Any]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _optimizer_state_bytes(optimizer: Any) -> int:
    return sum(_torch_bytes([v for v in s.values() if hasattr(v, "numel")]) for s in optimizer.state.values())


def _mib(n: int) -> float:
    return round(n / 2**20, 2)


# -- one setting --------------------------------------------------------------------------------------------------


def run_setting(config: ml_collections.ConfigDict, *, model: str, setting: str, steps: int, block_steps: int,
                check_steps: int, num_batches: int, impls: Sequence[str], fused_adamw: bool,
                candidates: Sequence[int]) -> dict[str, Any]:
    """One (model, setting) entry of the result (see `run_paligemma_train_bench`)."""
    import torch

    ours, trainer, host_params, host_batches, compile_s, xla = _build_ours(config, num_batches)
    cfg: PaliGemmaConfig = trainer.task.model.config
    trainable = trainable_mask(host_params, config.get("trainable"))
    schedule_values = np.asarray(trainer.schedule(np.arange(config.total_steps + 1)), np.float64)
    torch_batches = [torch_batch(b) for b in host_batches]
    runners: dict[str, TorchStepRunner] = {}
    facts: dict[str, dict[str, Any]] = {}
    for impl in impls:
        hf_model, facts[impl] = build_torch_side(host_params, cfg, trainable, config.optimizer, schedule_values,
                                                    impl, fused_adamw)
        f = facts[impl]
        runners[impl] = TorchStepRunner(caption_loss_fn(hf_model), f["trained"], f["optimizer"], f["scheduler"],
                                        torch_batches, config.optimizer.clip_norm)
        f["model"] = hf_model
    timing = train_step_timing(ours, runners, steps=steps, block_steps=block_steps, check_steps=check_steps,
                               candidates=candidates)
    check, final, per_step = timing["check"], timing["final"], timing["per_step"]

    # Frozen parameters after every step taken: bit for bit their initial values on every side.
    final_params = jax.device_get(ours.state["params"])
    frozen_ours = [np.array_equal(a, b) for a, b, t in zip(jax.tree.leaves(final_params), jax.tree.leaves(host_params),
                                                          jax.tree.leaves(trainable), strict=True) if not t]
    unchanged = {"ours": all(frozen_ours)}
    frozen_counts = {"ours": len(frozen_ours)}
    off_block = {}
    for impl, f in facts.items():
        named = dict(f["model"].named_parameters())
        unchanged[impl] = all(torch.equal(named[n], v) for n, v in f["initial_frozen"].items())
        frozen_counts[impl] = len(f["initial_frozen"])
        if f["block_masks"]:  # PEFT's B outside our per-head blocks stays zero
            off_block[impl] = max(float((named[n].detach() * (1 - m)).abs().max()) for n, m in f["block_masks"].items())
    ours_opt = sum(int(np.size(a)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(ours.state["opt_state"]))

    b = config.batch_size
    summary = train_step_summary(per_step, check, final, b, impls, TARGET_RATIO)
    for impl, side in summary["torch_sides"].items():
        f = facts[impl]
        side |= {
            "trained_tensors": f["trained_tensors"],
            "frozen_tensors": f["frozen_tensors"],
            "optimizer_state_mib": _mib(_optimizer_state_bytes(f["optimizer"])),
            "params_grads_opt_mib": _mib(_torch_bytes(list(f["model"].parameters())) + _torch_bytes(f["trained"])
                                         + _optimizer_state_bytes(f["optimizer"])),
        }
    frozen_ok = all(unchanged.values()) and all(v == 0.0 for v in off_block.values())
    n_params = sum(int(np.size(a)) for a in jax.tree.leaves(host_params))
    n_trained = sum(int(np.size(a)) for a, t in zip(jax.tree.leaves(host_params), jax.tree.leaves(trainable),
                                                    strict=True) if t)
    v, llm = cfg.vision, cfg.llm
    return {
        "model": model,
        "setting": setting,
        **summary,
        "ok": bool(summary["ratio"] >= TARGET_RATIO and summary["losses_agree"] and frozen_ok),
        "compile_s": round(compile_s, 3),
        "final_step": ours.steps_done,
        "frozen_unchanged": unchanged,
        "frozen_tensors": frozen_counts,
        "lora_off_block_max": off_block,
        "frozen_ok": frozen_ok,
        "trainable": config.get("trainable"),
        "lora": config.model.llm.lora.to_dict() if config.model.llm.lora else None,
        "batch": b,
        "sizes": {
            "image_size": v.image_size, "image_tokens": v.num_patches, "text_len": config.text.max_len,
            "vision": {"width": v.width, "depth": v.depth, "mlp_dim": v.mlp_dim, "num_heads": v.num_heads,
                       "patch_size": v.patch_size},
            "llm": {"width": llm.width, "depth": llm.depth, "mlp_dim": llm.mlp_dim, "num_heads": llm.num_heads,
                    "num_kv_heads": llm.num_kv_heads, "head_dim": llm.head_dim, "vocab_size": llm.vocab_size},
            "params": n_params, "trained_params": n_trained, "dtype": str(config.model.dtype),
        },
        "memory": {"ours_xla_mib": {k.removesuffix("_bytes"): _mib(n) for k, n in xla.items()},
                   "ours_optimizer_state_mib": _mib(ours_opt),
                   "peak_rss_gib_after": peak_rss_gib()},
        "torch_threads": timing["threads"],
        "torch_thread_probe_ms": {str(n): {impl: round(t * 1e3, 3) for impl, t in by_impl.items()}
                                  for n, by_impl in timing["probe"].items()},
        "background_cpu": timing["busy"],
    }


def run_paligemma_train_bench(
    config: str | ml_collections.ConfigDict = DEFAULT_CONFIG,
    *,
    models: Sequence[str] = MODELS,
    settings: Sequence[str] = tuple(SETTINGS),
    batch_size: int | None = None,
    steps: int = 6,
    block_steps: int = 2,
    check_steps: int = 3,
    num_batches: int = 2,
    attn_implementations: Sequence[str] = TORCH_IMPLS,
    fused_adamw: bool = True,
    torch_threads: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Our PaliGemma train step against transformers', per model and setting; see the module docstring.

    `config`: a PaliGemma config spec or ConfigDict (default the packaged `paligemma_shapes_caption`); `models`:
    which of `MODELS` ("caption": the config's sizes, "large": `LARGE`); `settings`: which of `SETTINGS`.
    `batch_size`: every model's batch (default: the config's for "caption", `LARGE["batch_size"]` for "large").
    `steps` timed steps per side (a multiple of `block_steps`), after `check_steps` (>= 2) checked ones;
    `torch_threads`: None probes every CPU and 1 (as `bench siglip-train`).

    Returns a JSON-serialisable dict: `entries` (one per model and setting, in order: `model`, `setting`,
    `ours_examples_per_s`, `torch_examples_per_s`, `torch_attn_implementation`, `ratio`, `target`, `ok`, the
    losses and their agreement, `frozen_unchanged` per side, `sizes`, `memory`, `torch_sides`, ...), `ok` (every
    entry's), `ratios` ("model/setting": ratio), the run's parameters and `env`.
    """
    if steps < 1 or block_steps < 1 or steps % block_steps or check_steps < 2 or num_batches < 1:
        raise ValueError(f"need steps >= 1 a multiple of block_steps >= 1, check_steps >= 2 and num_batches >= 1; "
                         f"got steps={steps}, block_steps={block_steps}, check_steps={check_steps}, "
                         f"num_batches={num_batches}")
    if torch_threads is not None and torch_threads < 1:
        raise ValueError(f"torch_threads must be >= 1 or None, got {torch_threads}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for name, chosen, allowed in (("model", models, MODELS), ("setting", settings, tuple(SETTINGS))):
        if not chosen or any(c not in allowed for c in chosen):
            raise ValueError(f"{name}s must be some of {allowed}, got {list(chosen)!r}")
    impls = list(dict.fromkeys(attn_implementations))
    if not impls or "ours" in impls:
        raise ValueError(f"attn_implementations must name transformers attentions, got {attn_implementations!r}")
    spec = config if isinstance(config, str) else "ConfigDict"
    base = _resolve_config(config)
    reuse_freed_host_memory()  # as `prepare` does, but before torch starts its threads (same process)
    loadavg_start = loadavg()
    candidates = torch_thread_candidates(torch_threads)
    entries = []
    with torch_num_threads(candidates[0]), tempfile.TemporaryDirectory(prefix="bvl_bench_pg_tower_") as towers:
        for model in models:
            model_cfg = model_config(base, model)
            tower = Path(towers) / model
            siglip_tower_run(model_cfg, model, tower)
            for setting in settings:
                batch = batch_size if batch_size is not None else DEFAULT_BATCH[model]
                cfg = setting_config(model_cfg, setting, tower, batch, seed)
                entries.append(run_setting(cfg, model=model, setting=setting, steps=steps, block_steps=block_steps,
                                           check_steps=check_steps, num_batches=num_batches, impls=impls,
                                           fused_adamw=fused_adamw, candidates=candidates))
        env = environment(loadavg_start=loadavg_start, torch_threads=entries[-1]["torch_threads"])
    return {
        "benchmark": "paligemma_train",
        "config": spec,
        "ok": all(e["ok"] for e in entries),
        "ratios": {f"{e['model']}/{e['setting']}": e["ratio"] for e in entries},
        "target": TARGET_RATIO,
        "entries": entries,
        "steps": steps,
        "block_steps": block_steps,
        "check_steps": check_steps,
        "num_batches": num_batches,
        "optimizer": base.optimizer.to_dict() | {"total_steps": base.total_steps},
        "ours": {"jit": "train.loop.prepare(...).step (jax.jit, state donated, config shardings) + lower().compile()"},
        "torch": {"fused_adamw": fused_adamw, "attn_implementations": impls, "mode": "eager mode, no torch.compile",
                  "lora": "PEFT get_peft_model, our adapters as block-diagonal PEFT adapters, B's gradient masked"},
        "env": env,
        "peak_rss_gib": peak_rss_gib(),
    }


def format_paligemma_train_table(result: dict[str, Any]) -> str:
    """A readable summary of `run_paligemma_train_bench`'s result: one row per model and setting."""
    env = result["env"]
    lines = [
        f"paligemma train-step bench ({result['config']}): {result['steps']} timed steps per side in blocks of "
        f"{result['block_steps']} (interleaved), after {result['check_steps']} checked steps; jax {env['jax']}, "
        f"torch {env['torch']} transformers {env['transformers']} (eager mode), {env['cpu_count']} CPUs",
    ]
    for model in dict.fromkeys(e["model"] for e in result["entries"]):
        s = next(e for e in result["entries"] if e["model"] == model)["sizes"]
        v, llm = s["vision"], s["llm"]
        lines.append(f"model {model}: image {s['image_size']}px/{v['patch_size']} ({s['image_tokens']} tokens) "
                     f"w{v['width']} d{v['depth']} mlp{v['mlp_dim']} h{v['num_heads']}; decoder T{s['text_len']} "
                     f"V{llm['vocab_size']} w{llm['width']} d{llm['depth']} mlp{llm['mlp_dim']} h{llm['num_heads']}"
                     f"/kv{llm['num_kv_heads']}x{llm['head_dim']}; {s['params']:,} params, {s['dtype']}")
    lines.append(f"{'model/setting':>18} {'batch':>5} {'ours ex/s':>9} {'eager':>7} {'sdpa':>7} {'ratio':>6} "
                 f"{'1st loss diff':>13} {'frozen ok':>9} {'ours MiB':>8} {'torch MiB':>9} {'busy':>5}")
    for e in result["entries"]:
        sides = e["torch_sides"]
        eager, sdpa = (f"{sides[impl]['examples_per_s']:.1f}" if impl in sides else "-" for impl in TORCH_IMPLS)
        mem = e["memory"]["ours_xla_mib"]["peak"]
        torch_mem = sides[e["torch_attn_implementation"]]["params_grads_opt_mib"]
        lines.append(f"{e['model'] + '/' + e['setting']:>18} {e['batch']:>5} {e['ours_examples_per_s']:>9.1f} "
                     f"{eager:>7} {sdpa:>7} {e['ratio']:>6.2f} {e['first_loss_rel_diff']:>13.1e} "
                     f"{e['frozen_ok']!s:>9} {mem:>8.0f} {torch_mem:>9.0f} {busy_cell(e['background_cpu']):>5}")
    missed = [f"{e['model']}/{e['setting']}" for e in result["entries"] if e["ratio"] < e["target"]]
    lines += [
        "ours MiB: XLA's peak of the compiled step (state, batch, temporaries); torch MiB: parameters + gradients + "
        "optimizer state of the faster side (activations not counted)",
        f"target ratio >= {result['target']} (ours / the faster torch side): "
        f"{'met everywhere' if not missed else 'NOT met for ' + ', '.join(missed)}; losses agree: "
        f"{all(e['losses_agree'] for e in result['entries'])}; ok: {result['ok']}; peak RSS "
        f"{result['peak_rss_gib']} GiB",
    ]
    if warning := busy_warning([e["background_cpu"] for e in result["entries"]], "every side ran slower than on a "
                               "quiet machine, and not necessarily alike, so the ratios are not fair ones"):
        lines.append(warning)
    return "\n".join(lines)
