"""`bvl plan`: will a training step fit, before renting the pod. Per-device memory and analytic FLOPs of the real
training step, compiled with abstract inputs on simulated CPU devices (nothing is allocated).

Axis letters: B global batch, b per-device batch (B / devices), D x F the `data x fsdp` mesh, P image tokens per
image (ViT patches), T text tokens per example (PaliGemma: image tokens + text), E embedding width (SigLIP).

What is compiled is what `bvl train` runs: `build_train_step` of `train/loop.py` with the optimizer of
`train/optimizer.py` (frozen parameters by `config.trainable`), the state and batch placed by `tree_shardings` and
`batch_sharding` of `train/sharding.py` on a `make_mesh` mesh, jitted with the state donated, the tasks' own
losses (`siglip_grads` / `caption_loss` of `train/tasks`) and the models' activations held to the batch sharding,
as the tasks train them. Only the model is built from the config or preset
directly, since the real tasks build data sources and tokenizers first (and PaliGemma a finished SigLIP run).

Per device, for each remat policy:

* parameters, optimizer state, gradients: the bytes of each leaf's per-device shard (its sharding's shard shape),
  summed. Gradients are counted as a tree laid out like the trainable parameters (what the optimizer update takes);
  they are intermediates of the step, so XLA's temporaries already hold them: they are not added to the peak.
* XLA: `compiled.memory_analysis()` of the per-device program: arguments (state + batch shard), outputs, aliased
  (outputs written in place of the donated state), temporaries (every intermediate: activations, gradients,
  collective buffers, in the one buffer XLA's buffer assignment sizes for its schedule) and
  peak = arguments + outputs - aliased + temporaries: what the step holds at once in the worst case.
* FLOPs, analytic (XLA's cost analysis counts a scanned layer stack's body once, not once per layer): see
  `step_flops`.

Every figure is a CPU-backend estimate: a TPU or GPU compiler fuses, schedules and rematerialises differently.
"""

import contextlib
import dataclasses
import re
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding

from big_vision_lite.checkpoints.presets import PRESETS
from big_vision_lite.data.processor import EXTRA_TOKENS
from big_vision_lite.losses import IMPLS
from big_vision_lite.models.lora import LoRAConfig
from big_vision_lite.models.paligemma import PaliGemma, PaliGemmaConfig
from big_vision_lite.models.paligemma import init_params as paligemma_init
from big_vision_lite.models.two_towers import TwoTowers, two_towers_config
from big_vision_lite.models.two_towers import init_params as two_towers_init
from big_vision_lite.models.vit import make_config
from big_vision_lite.train.config import apply_overrides, load_config
from big_vision_lite.train.loop import build_train_step, new_train_state
from big_vision_lite.train.optimizer import make_optimizer, make_schedule, trainable_mask
from big_vision_lite.train.sharding import MESH_AXES, batch_sharding, make_mesh, tree_shardings
from big_vision_lite.train.tasks.paligemma import caption_loss, decoder_config, vision_config
from big_vision_lite.train.tasks.siglip import MODULE_SETTINGS, siglip_grads, siglip_loss
from big_vision_lite.utils.dtypes import as_dtype, dtype_name
from big_vision_lite.utils.trees import path_name

MAX_DEVICES = 4096
NO_REMAT = "none"  # `--remat none`: the blocks keep every activation (remat_policy None)
# Fine-tuning modes of a PaliGemma (`--finetune`), as the config keys a training config sets for them.
FINETUNE = {
    "full": [],
    "lora": ["model.llm.lora={'rank': 16, 'alpha': 16.0}", "trainable=['lora_']"],
    "attention": ["trainable=['llm/layers/attn/']"],
}
PALIGEMMA_TEXT_TOKENS = 64  # a preset's text tokens after its image tokens (prompt + answer), like big_vision's
# Leaves that no token is multiplied by (biases, norms, position tables, the MAP probe, SigLIP's t and b).
_NOT_MATMUL = ("bias", "scale", "pos_embedding", "probe", "t", "b")
# Recomputed forward work per remat policy, for the layer blocks: "all" (matmuls and attention), "attention" (the
# batched attention dots are not saved; weight matmuls are), "none". Other policies: not estimated.
_RECOMPUTE = {NO_REMAT: "none", "everything_saveable": "none", "dots_saveable": "none", "checkpoint_dots": "none",
              "nothing_saveable": "all", "dots_with_no_batch_dims_saveable": "attention",
              "checkpoint_dots_with_no_batch_dims": "attention"}


# -- devices and mesh ------------------------------------------------------------------------------------------


def parse_mesh(text: str) -> dict[str, int]:
    """`"data=2,fsdp=4"` -> {"data": 2, "fsdp": 4}; an axis left out is 1."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    for part in text.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep or name not in sizes or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"--mesh {text!r}: expected data=D,fsdp=F with axes {', '.join(MESH_AXES)} and "
                             "integers >= 1")
        sizes[name] = int(value)
    if not 1 <= sizes["data"] * sizes["fsdp"] <= MAX_DEVICES:
        raise ValueError(f"--mesh {text!r}: data x fsdp = {sizes['data'] * sizes['fsdp']} devices, allowed 1 to "
                         f"{MAX_DEVICES}")
    return sizes


def simulated_cpu_devices(count: int) -> list[jax.Device]:
    """`count` CPU devices. Before JAX's backend starts, this sets the CPU backend's device count (simulated
    devices); once it has started, the count is fixed and a larger mesh is refused."""
    with contextlib.suppress(RuntimeError):  # raised once the backend has started: its devices are all there are
        jax.config.update("jax_num_cpu_devices", count)
    devices = jax.devices("cpu")
    if len(devices) < count:
        raise ValueError(f"--mesh needs {count} devices but JAX's CPU backend already started with {len(devices)}; "
                         "the number of simulated devices can only be set before it starts (run bvl plan in a "
                         "fresh process)")
    return devices[:count]


# -- what is planned: config, model, abstract batch ------------------------------------------------------------


def preset_config(name: str) -> ml_collections.ConfigDict:
    """A training config for the preset `name`: the keys an experiment config has that a plan reads."""
    preset = PRESETS[name]
    cfg = preset.config()
    c = ml_collections.ConfigDict()
    c.task, c.preset, c.seed, c.total_steps, c.batch_size = preset.kind, name, 0, 10_000, 256
    c.model = dict(dtype="bfloat16", scan_layers=True, remat_policy=None)
    if preset.kind == "siglip":
        c.accum_steps = 1
        c.text = dict(max_len=cfg.text.max_len)
        c.loss = dict(impl="dense", block_size=1024)
    else:
        c.model.llm = dict(lora=None)
        c.text = dict(max_len=cfg.num_image_tokens + PALIGEMMA_TEXT_TOKENS)
    c.trainable = None
    c.optimizer = dict(lr=1e-4, warmup_steps=500, end_lr_fraction=0.01, weight_decay=1e-4, b1=0.9, b2=0.95,
                       clip_norm=1.0)
    c.sharding_rules = [(".*", "fsdp")]
    return c


def planning_config(spec: str, overrides: Sequence[str] = (), finetune: str = "full") -> ml_collections.ConfigDict:
    """The config of a preset name or an experiment config spec (`load_config`), with `finetune`'s keys and then
    `overrides` (`key=value`) applied."""
    if finetune not in FINETUNE:
        raise ValueError(f"--finetune must be one of {', '.join(FINETUNE)}, got {finetune!r}")
    config = preset_config(spec) if spec in PRESETS else load_config(spec)
    if "trainable" not in config:  # the loop reads it when present: let --set freeze parameters of any config
        config.trainable = None
    if finetune != "full" and config.task != "paligemma":
        raise ValueError(f"--finetune {finetune} is for PaliGemma; {spec} is a {config.task} config")
    return apply_overrides(config, [*FINETUNE[finetune], *overrides])


def build_model(config: ml_collections.ConfigDict, remat_policy: str | None,
                activation_sharding: jax.sharding.Sharding | None = None) -> nn.Module:
    """The config's model as its task builds it (a preset's from its published sizes), with `remat_policy` and
    `activation_sharding` (what the tasks train with: the mesh's `batch_sharding`)."""
    model = config.model.to_dict()
    settings = {k: model.pop(k) for k in MODULE_SETTINGS if k in model}
    settings |= {"dtype": as_dtype(settings.get("dtype", "float32")), "remat_policy": remat_policy,
                 "activation_sharding": activation_sharding}
    if config.task == "siglip":
        if "preset" in config:
            cfg = PRESETS[config.preset].config()
            cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, max_len=config.text.max_len))
        else:  # as SiglipTask builds it; the vocabulary is the size its trained tokenizer aims at
            model["image"]["image_size"] = config.data.image_size
            model["text"] |= {"vocab_size": config.text.vocab_size, "max_len": config.text.max_len}
            cfg = two_towers_config(model)
        if cfg.image.naflex:
            raise ValueError("model.image.naflex: bvl plan builds fixed-size image batches only; plan the "
                             "non-NaFlex tower of the same sizes")
        return TwoTowers(cfg, **settings)
    if "preset" in config:
        cfg = PRESETS[config.preset].config()
        lora = config.model.llm.lora
        if lora:
            lora = make_config(LoRAConfig, "model.llm.lora", dict(lora))
            cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, lora=lora))
    else:  # as PaliGemmaTask builds it, from its SigLIP config; the processor adds the image and 1152 extra tokens
        vision = vision_config(load_config(config.init.siglip_config), config.model.llm.width)
        llm = decoder_config(config.model.llm.to_dict(), config.text.vocab_size + 1 + len(EXTRA_TOKENS))
        cfg = PaliGemmaConfig(vision, llm, image_token_id=config.text.vocab_size)
    return PaliGemma(cfg, **settings)


def abstract_batch(model: nn.Module, config: ml_collections.ConfigDict, batch_size: int
                   ) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch the task's loader yields, as shapes and dtypes."""
    cfg = model.config
    side = (cfg.image if isinstance(model, TwoTowers) else cfg.vision).image_size
    image = jax.ShapeDtypeStruct((batch_size, side, side, 3), jnp.float32)
    length = config.text.max_len
    if isinstance(model, TwoTowers):
        return {"image": image, "text": jax.ShapeDtypeStruct((batch_size, length), jnp.int32)}
    if length <= cfg.num_image_tokens + 1:
        raise ValueError(f"text.max_len {length} must exceed the {cfg.num_image_tokens} image tokens + BOS")
    tokens = lambda dtype: jax.ShapeDtypeStruct((batch_size, length), dtype)  # noqa: E731
    return {"image": image, "input_ids": tokens(jnp.int32), "input_mask": tokens(bool), "mask_ar": tokens(jnp.int32),
            "loss_mask": tokens(bool)}


@dataclasses.dataclass
class _PlanTask:
    """The loop's task interface, as far as `build_train_step` uses it: the tasks' own loss and gradients."""

    model: nn.Module
    config: ml_collections.ConfigDict
    mesh: Mesh

    def train_grads(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array
                    ) -> tuple[jax.Array, dict[str, jax.Array], Any]:
        del rng
        if isinstance(self.model, TwoTowers):
            loss, stats, t, b, grads = siglip_grads(self.model, params, batch, self.config.loss, self.mesh)
            return loss, {f"logits/{k}": v for k, v in stats.items()} | {"t": t, "b": b}, grads
        (loss, accuracy), grads = jax.value_and_grad(lambda p: caption_loss(self.model, p, batch),
                                                     has_aux=True)(params)
        return loss, {"token_accuracy": accuracy}, grads


# -- bytes -----------------------------------------------------------------------------------------------------


def shard_bytes(shape: Sequence[int], dtype: Any, sharding: NamedSharding) -> int:
    """Bytes of one device's shard of an array of `shape` placed by `sharding`."""
    return int(np.prod(sharding.shard_shape(tuple(shape)), dtype=np.int64)) * np.dtype(dtype).itemsize


def tree_shard_bytes(tree: Any, shardings: Any, keep: Any | None = None) -> int:
    """Per-device bytes of `tree` (shape/dtype leaves) placed by `shardings`; only leaves `keep` marks True."""
    keep = jax.tree.map(lambda _: True, tree) if keep is None else keep
    return sum(shard_bytes(leaf.shape, leaf.dtype, sh) for leaf, sh, k in
               zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), jax.tree.leaves(keep), strict=True) if k)


def memory_stats(compiled: Any) -> dict[str, int]:
    """XLA's per-device sizes of a compiled step and the peak they imply (see the module docstring)."""
    m = compiled.memory_analysis()
    stats = {"argument_bytes": m.argument_size_in_bytes, "output_bytes": m.output_size_in_bytes,
             "alias_bytes": m.alias_size_in_bytes, "temp_bytes": m.temp_size_in_bytes}
    stats["peak_bytes"] = stats["argument_bytes"] + stats["output_bytes"] - stats["alias_bytes"] + stats["temp_bytes"]
    return stats


# -- FLOPs -----------------------------------------------------------------------------------------------------


def _component(name: str) -> str:
    return name.split("/", 1)[0]


def _tokens_per_example(name: str, model: nn.Module) -> int:
    """How many tokens of one example a parameter multiplies (0: not a matmul weight, or only looked up)."""
    last = name.rsplit("/", 1)[-1]
    if last in _NOT_MATMUL:
        return 0
    cfg = model.config
    if isinstance(model, TwoTowers):
        if name.startswith("txt/"):
            if "Embed_" in name:
                return 0  # a lookup
            return 1 if name.startswith("txt/head/") else cfg.text.max_len  # the head maps the pooled token
        patches = cfg.image.num_patches
        if "MAPHead" in name:  # one probe query; keys and values of every patch
            return patches if re.search(r"/(key|value)/", name) else 1
        return 1 if name.startswith("img/head/") and cfg.image.pool_type != "none" else patches
    if name.startswith("img/"):
        return cfg.num_image_tokens if "mm_projector" in name else cfg.vision.num_patches
    if last == "input_embedding" and not cfg.llm.tie_embeddings:
        return 0  # a lookup; the untied `output_embedding` computes the logits
    return -1  # every token of the sequence (filled in by the caller)


def step_flops(model: nn.Module, params: Any, trainable: Any, batch_size: int, text_len: int,
               remat_policy: str | None) -> dict[str, float | None]:
    """FLOPs of one training step (the whole global batch), computed analytically.

    Matmuls: a weight of n parameters applied to k tokens costs 2 n k forward, 2 n k for the gradient of its input
    and 2 n k for its own gradient; attention scores and their use cost 4 S_q S_k (heads x head_dim) per layer
    forward and twice that backward. A component (SigLIP: `img`, `txt`; PaliGemma: `img` then `llm`) is
    back-propagated only when it or a component before it has trainable parameters, and only trainable weights get
    weight gradients; for full training this is 6 x matmul parameters x tokens + 3 x attention. SigLIP's loss adds
    2 B^2 E (logits) forward and 4 B^2 E backward. `recompute` adds what the remat policy recomputes in the layer
    blocks (None for a policy not estimated). Left out: norms, softmax, activations, embedding lookups, the MAP
    head's attention scores, the optimizer update (~10 FLOPs per parameter), the ring and blocked losses'
    checkpointed recomputation of their logits (+2 B^2 E).
    """
    siglip = isinstance(model, TwoTowers)
    cfg = model.config
    mm, block_mm, weight_mm, any_trainable = {}, {}, {}, {}
    for (path, leaf), train in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(trainable),
                                   strict=True):
        name = path_name(path)
        part = _component(name)
        tokens = _tokens_per_example(name, model)
        tokens = text_len if tokens < 0 else tokens
        flops = 2.0 * int(np.prod(leaf.shape)) * tokens
        mm[part] = mm.get(part, 0.0) + flops
        if "encoderblock" in name or "/layers/" in name:
            block_mm[part] = block_mm.get(part, 0.0) + flops
        weight_mm[part] = weight_mm.get(part, 0.0) + (flops if train else 0.0)
        any_trainable[part] = any_trainable.get(part, False) or bool(train)
    if siglip:
        attention = {"img": 4.0 * cfg.image.depth * cfg.image.num_patches ** 2 * cfg.image.width,
                     "txt": 4.0 * cfg.text.depth * cfg.text.max_len ** 2 * cfg.text.width}
        order: list[list[str]] = [["img"], ["txt"]]  # independent towers
    else:
        llm = cfg.llm
        attention = {"img": 4.0 * cfg.vision.depth * cfg.vision.num_patches ** 2 * cfg.vision.width,
                     "llm": 4.0 * llm.depth * text_len ** 2 * llm.num_heads * llm.head_dim}
        order = [["img", "llm"]]  # the decoder reads the vision tower's tokens
    total = recompute = 0.0
    policy = _RECOMPUTE.get(remat_policy or NO_REMAT)
    for chain in order:
        upstream_trainable = False
        for part in chain:
            upstream_trainable = upstream_trainable or any_trainable.get(part, False)
            fwd = mm.get(part, 0.0) + attention[part]
            total += fwd + weight_mm.get(part, 0.0)
            if upstream_trainable:
                total += mm.get(part, 0.0) + 2 * attention[part]
                recompute += {"all": block_mm.get(part, 0.0) + attention[part], "attention": attention[part],
                              "none": 0.0}.get(policy, 0.0)
    total *= batch_size
    if siglip:
        total += 6.0 * batch_size ** 2 * cfg.text.out_dim
    return {"model_flops": total, "recompute_flops": None if policy is None else recompute * batch_size}


# -- the plan --------------------------------------------------------------------------------------------------


def plan_step(config: ml_collections.ConfigDict, mesh: Mesh, remat_policy: str | None) -> dict[str, Any]:
    """Compiles the config's training step on `mesh` with `remat_policy` and measures it (one column of the plan)."""
    devices = mesh.devices.size
    batch_size = config.batch_size
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1 or batch_size % devices:
        raise ValueError(f"batch_size={batch_size} must be a positive multiple of the {devices} devices of the mesh "
                         f"(data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})")
    if config.task == "siglip":
        if config.get("accum_steps", 1) != 1:
            raise ValueError(f"config.accum_steps={config.accum_steps}: bvl plan compiles the step without gradient "
                             "accumulation; --set accum_steps=1, and --batch the micro-batch to see its activations")
        if config.loss.impl not in IMPLS:
            raise ValueError(f"loss.impl must be one of {', '.join(IMPLS)}, got {config.loss.impl!r}")
    model = build_model(config, remat_policy, batch_sharding(mesh))
    init = two_towers_init if isinstance(model, TwoTowers) else paligemma_init
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    params_shape = jax.eval_shape(lambda key: init(model, key), rng)
    patterns = config.get("trainable")
    trainable = trainable_mask(params_shape, patterns)
    optimizer = make_optimizer(config.optimizer, config.total_steps, None if patterns is None else trainable)
    schedule = make_schedule(config.optimizer, config.total_steps)
    state_shape = jax.eval_shape(lambda key: new_train_state(init(model, key), optimizer, key), rng)
    shardings = tree_shardings(state_shape, mesh, [tuple(rule) for rule in config.sharding_rules])
    batch = abstract_batch(model, config, batch_size)
    task = _PlanTask(model, config, mesh)
    step = jax.jit(build_train_step(task, optimizer, schedule, None if patterns is None else trainable),
                   in_shardings=(shardings, batch_sharding(mesh)), out_shardings=(shardings, None), donate_argnums=0)
    start = time.perf_counter()
    compiled = step.lower(state_shape, batch).compile()
    compile_s = time.perf_counter() - start
    batch_shards = jax.tree.map(lambda _: batch_sharding(mesh), batch)
    flops = step_flops(model, params_shape, trainable, batch_size, config.text.max_len, remat_policy)
    return {
        "remat_policy": remat_policy or NO_REMAT,
        "params_bytes": tree_shard_bytes(state_shape["params"], shardings["params"]),
        "opt_state_bytes": tree_shard_bytes(state_shape["opt_state"], shardings["opt_state"]),
        "grads_bytes": tree_shard_bytes(state_shape["params"], shardings["params"], trainable),
        "batch_bytes": tree_shard_bytes(batch, batch_shards),
        "xla": memory_stats(compiled),
        "flops": flops | {"per_device": (flops["model_flops"] + (flops["recompute_flops"] or 0.0)) / devices},
        "compile_s": round(compile_s, 2),
        "parameters": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params_shape)),
        "trainable_parameters": sum(int(np.prod(x.shape)) for x, t in zip(jax.tree.leaves(params_shape),
                                                                         jax.tree.leaves(trainable), strict=True) if t),
        "dtype": dtype_name(model.dtype), "param_dtype": dtype_name(model.param_dtype),
    }


def plan_siglip_loss(config: ml_collections.ConfigDict, mesh: Mesh) -> dict[str, Any]:
    """The SigLIP loss alone and its gradient w.r.t. the embeddings [B, E] (float32, split like the batch) and the
    scalars, compiled on `mesh` by `loss.impl`: its per-device memory without the towers."""
    if config.task != "siglip":
        raise ValueError(f"--loss-only is for SigLIP configs; this is a {config.task} config")
    devices = mesh.devices.size
    if config.batch_size % devices:
        raise ValueError(f"batch_size={config.batch_size} must be a multiple of the {devices} devices of the mesh")
    width = build_model(config, None).config.text.out_dim
    spec = jax.ShapeDtypeStruct((config.batch_size, width), jnp.float32, sharding=batch_sharding(mesh))
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    fn = jax.jit(jax.value_and_grad(lambda x, y, t, b: siglip_loss(x, y, t, b, config.loss, mesh), argnums=(0, 1, 2, 3),
                                    has_aux=True))
    start = time.perf_counter()
    compiled = fn.lower(spec, spec, scalar, scalar).compile()
    return {"loss_impl": config.loss.impl, "embedding_width": width, "xla": memory_stats(compiled),
            "flops": {"model_flops": 6.0 * config.batch_size ** 2 * width,
                      "per_device": 6.0 * config.batch_size ** 2 * width / devices},
            "compile_s": round(time.perf_counter() - start, 2)}


def run_plan(config: ml_collections.ConfigDict, devices: Sequence[jax.Device], mesh_sizes: dict[str, int],
             remat_policies: Sequence[str] = (NO_REMAT,), loss_only: bool = False, target: str = "config"
             ) -> dict[str, Any]:
    """The plan of `config` on a `data x fsdp` mesh over `devices`: one column per remat policy (or the loss
    alone), with the settings that produced it."""
    mesh = make_mesh(mesh_sizes["data"], mesh_sizes["fsdp"], devices=devices)
    result: dict[str, Any] = {
        "target": target, "task": config.task,
        "mesh": dict(mesh.shape), "devices": mesh.devices.size, "batch_size": config.batch_size,
        "per_device_batch": config.batch_size / mesh.devices.size, "backend": "cpu (simulated devices)",
        "estimate": "CPU-backend estimate: XLA:CPU buffer assignment; a TPU/GPU compiler schedules differently",
        "trainable": list(config.trainable) if config.get("trainable") else None,
    }
    if config.task == "siglip":
        result["loss_impl"] = config.loss.impl
    if config.task == "paligemma":
        result["lora"] = config.model.llm.get("lora")
        result["lora"] = dict(result["lora"]) if result["lora"] else None
    if loss_only:
        return result | {"loss_only": plan_siglip_loss(config, mesh)}
    columns = []
    for policy in remat_policies:
        columns.append(plan_step(config, mesh, None if policy == NO_REMAT else policy))
    return result | {"columns": columns}


# -- the table -------------------------------------------------------------------------------------------------


def _gib(n: float) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1."""
    for power, unit in ((30, "GiB"), (20, "MiB"), (10, "KiB")):
        if abs(n) >= 2**power:
            return f"{n / 2**power:.2f} {unit}"
    return f"{n:.0f} B"


def _flops(n: float | None) -> str:
    return "n/a" if n is None else f"{n:.3e}"


def format_plan_table(result: dict[str, Any]) -> str:
    """The plan as a text table: one column per remat policy, or the loss-only figures."""
    mesh = result["mesh"]
    head = (f"bvl plan {result['target']} ({result['task']}): mesh data={mesh['data']} x fsdp={mesh['fsdp']} = "
            f"{result['devices']} simulated CPU devices, global batch {result['batch_size']} "
            f"({result['per_device_batch']:g} per device)")
    if "loss_impl" in result:
        head += f", loss {result['loss_impl']}"
    if result.get("lora"):
        head += f", LoRA {result['lora']}"
    if result.get("trainable"):
        head += f", trainable {result['trainable']}"
    lines = [head]
    if "loss_only" in result:
        loss = result["loss_only"]
        x = loss["xla"]
        lines.append(f"loss only (embeddings [{result['batch_size']}, {loss['embedding_width']}] float32 and their "
                     f"gradients), per device: arguments {_gib(x['argument_bytes'])}, temporaries "
                     f"{_gib(x['temp_bytes'])}, peak {_gib(x['peak_bytes'])}; FLOPs per device "
                     f"{_flops(loss['flops']['per_device'])}; compiled in {loss['compile_s']:.1f} s")
    else:
        cols = result["columns"]
        first = cols[0]
        lines.append(f"parameters {first['parameters']:,} ({first['trainable_parameters']:,} trainable), "
                     f"{first['param_dtype']} parameters, {first['dtype']} compute")
        rows = [
            ("per device", lambda c: c["remat_policy"]),
            ("parameters", lambda c: _gib(c["params_bytes"])),
            ("optimizer state", lambda c: _gib(c["opt_state_bytes"])),
            ("gradients (in temp)", lambda c: _gib(c["grads_bytes"])),
            ("batch", lambda c: _gib(c["batch_bytes"])),
            ("XLA arguments", lambda c: _gib(c["xla"]["argument_bytes"])),
            ("XLA outputs", lambda c: _gib(c["xla"]["output_bytes"])),
            ("XLA aliased (donated)", lambda c: _gib(c["xla"]["alias_bytes"])),
            ("XLA temporaries", lambda c: _gib(c["xla"]["temp_bytes"])),
            ("peak", lambda c: _gib(c["xla"]["peak_bytes"])),
            ("step FLOPs (model)", lambda c: _flops(c["flops"]["model_flops"])),
            ("  + remat recompute", lambda c: _flops(c["flops"]["recompute_flops"])),
            ("FLOPs per device", lambda c: _flops(c["flops"]["per_device"])),
            ("compile s", lambda c: f"{c['compile_s']:.1f}"),
        ]
        width = max(18, *(len(c["remat_policy"]) + 2 for c in cols))
        for label, cell in rows:
            lines.append(f"{label:<22}" + "".join(f"{cell(c):>{width}}" for c in cols))
        lines.append("peak = XLA arguments + outputs - aliased + temporaries (everything the step holds at once); "
                     "gradients are part of the temporaries")
    lines.append(result["estimate"])
    return "\n".join(lines)
