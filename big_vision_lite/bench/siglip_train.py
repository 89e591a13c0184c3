"""SigLIP train-step benchmark: examples/s of our jitted train step against the same step in PyTorch, same weights.

Axis letters: B batch (image-text pairs), R image side, L text length.

What is timed: one optimisation step on a batch of B random images [B, R, R, 3] in [-1, 1] and B random token ids
[B, L] (vocabulary: the task's caption tokenizer), cycled from a fixed set of `num_batches` batches already in
memory (no data loading in the timed loop). The sizes, batch size and optimizer are those of a training config
(default: the packaged `siglip_shapes`).

- Ours: the very step `bvl train` runs: `train.loop.prepare(config, workdir)` (in a temporary workdir: the
  `SiglipTask` trains its caption tokenizer there) builds the mesh, the task (the model and the gradients), the
  optimizer (global-norm clipping, then AdamW on warmup + cosine, decay on ndim >= 2 params) and `trainer.step`,
  the train step over the state {step, params, opt_state, rng}, jitted with the state and batch shardings of the
  config's mesh and rules and the state donated. It is compiled ahead of time (`compile_s`, lowering +
  compilation, is reported apart) and starts from `trainer.new_state` of the task's initial parameters. The
  process's malloc is set up as `train` sets it (`reuse_freed_host_memory`; torch runs in the same process under
  it).
- PyTorch: transformers' `SiglipModel` of the same sizes (`siglip_config_to_hf`), loaded strictly with our initial
  parameters (`siglip_params_to_hf`); the loss -sum(log_sigmoid(z * logits_per_image)) / B, z = 2 * eye - 1 (HF's
  logits are exp(logit_scale) * img @ txt.T + logit_bias, ours' too); `clip_grad_norm_`, then `torch.optim.AdamW`
  with the same betas, eps, weight decay and a `LambdaLR` replaying our schedule's values, in two parameter groups
  that decay exactly the tensors ours decays (the ndim >= 2 rule is applied to OUR layout and carried over by the
  converter: attention biases are [N, H] in ours, so decayed, while HF stores them as [N * H]); eager mode, no
  `torch.compile`. Threads: by default torch is probed at every CPU and at 1 thread and timed at the faster (on a
  busy machine torch's OpenMP threads can run many times slower at 2 threads than at 1; see `torch_threads`).

The PyTorch step is timed with each of transformers' attention implementations in `attn_implementations` (default
eager and sdpa: two models, each with its own optimizer, from the same weights); the faster one is the reference.

All sides first run `check_steps` untimed steps from the same weights on the same batches (this is their warm-up
too); their losses are compared: the first one must agree (same weights, same batch), and the later ones show that
the optimisers make the same updates. Then `steps` timed steps per side run in blocks of `block_steps`, the
sides alternating block by block (the order rotating each round) so background load hits all alike; a block's
time (ours: until its outputs are ready, `block_until_ready`) divided by its steps is one per-step sample.
Examples/s = B / median per-step time; `ratio` = ours / the faster torch side's examples/s, target >=
`TARGET_RATIO`. The losses of the last timed step (all sides took the same steps on the same batches) are
reported as well. The share of the CPUs other processes took while timing is recorded: only a quiet machine gives
a fair ratio.
"""

import tempfile
import time
from collections.abc import Callable, Sequence
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
from big_vision_lite.checkpoints.hf_siglip import siglip_config_to_hf, siglip_params_to_hf
from big_vision_lite.train.config import load_config
from big_vision_lite.train.loop import Trainer, prepare, reuse_freed_host_memory
from big_vision_lite.train.sharding import shard_batch

TARGET_RATIO = 1.6  # ours must train at least this many times as many examples per second as PyTorch (issue 19)
DEFAULT_CONFIG = "siglip_shapes"  # a packaged config
# transformers' attention implementations timed on the PyTorch side; the faster one is the reference. On the 2-core
# AVX-512 CPU at the shapes config's sizes, eager ran ~15% faster than sdpa (130 against 150 ms per step).
TORCH_IMPLS = ("eager", "sdpa")


def _resolve_config(config: str | ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    if isinstance(config, ml_collections.ConfigDict):
        return ml_collections.ConfigDict(config.to_dict())  # a copy: the bench may change its batch size and seed
    return load_config(str(config))  # a packaged name ("siglip_shapes:smoke") or a config file


def bench_batches(image_size: int, max_len: int, vocab_size: int, batch: int, count: int,
                  seed: int = 0) -> list[dict[str, np.ndarray]]:
    """`count` deterministic batches: images [B, R, R, 3] float32 in [-1, 1], text [B, L] int32 in [0, V)."""
    rng = np.random.default_rng(seed)
    return [{"image": rng.uniform(-1.0, 1.0, size=(batch, image_size, image_size, 3)).astype(np.float32),
             "text": rng.integers(0, vocab_size, size=(batch, max_len), dtype=np.int32)} for _ in range(count)]


def decay_flags(params: Any, cfg: Any) -> dict[str, bool]:
    """Per HF tensor name: whether our optimizer decays it (ndim >= 2 in OUR layout, see the module docstring).

    The converter is applied to a tree of 1s (decayed) and 0s, so every reshape, transpose and concatenation it
    does is followed exactly; a tensor that would mix both is an error.
    """
    marks = jax.tree.map(lambda p: np.full(np.shape(p), float(np.ndim(p) >= 2), np.float32), params)
    flags = {}
    for name, mark in siglip_params_to_hf(marks, cfg).items():
        if mark.size and mark.min() != mark.max():
            raise ValueError(f"{name} holds parameters our optimizer decays and ones it does not")
        flags[name] = bool(mark.size and mark.max() == 1.0)
    return flags


def build_torch_side(host_params: Any, cfg: Any, opt: ml_collections.ConfigDict, schedule_values: np.ndarray,
                     attn_implementation: str, fused_adamw: bool) -> tuple[Any, Any, Any, dict[str, Any]]:
    """(SiglipModel with our params, AdamW, LambdaLR, facts) mirroring our optimizer (see the module docstring)."""
    import torch
    from transformers import SiglipConfig, SiglipModel

    # Not SiglipConfig.from_dict: it builds a default config on the way and warns about its token ids.
    hf = {k: v for k, v in siglip_config_to_hf(cfg).items() if k != "model_type"}
    hf_config = SiglipConfig(**hf, attn_implementation=attn_implementation)
    model = SiglipModel(hf_config).to(torch.float32).train()
    if model.config._attn_implementation != attn_implementation:
        raise ValueError(f"transformers gave attention {model.config._attn_implementation!r}, not "
                         f"{attn_implementation!r}")
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in siglip_params_to_hf(host_params, cfg).items()}
    model.load_state_dict(state, strict=True)
    flags = decay_flags(host_params, cfg)
    named = dict(model.named_parameters())
    if set(named) != set(flags):
        raise ValueError(f"SiglipModel's parameters differ from the converted ones: "
                         f"{sorted(set(named) ^ set(flags))[:5]}")
    optimizer, scheduler = torch_adamw([p for n, p in named.items() if flags[n]],
                                       [p for n, p in named.items() if not flags[n]], opt, schedule_values,
                                       fused_adamw)
    facts = {"decayed_tensors": sum(flags.values()), "tensors": len(flags)}
    return model, optimizer, scheduler, facts


def _sizes(config: ml_collections.ConfigDict, cfg: Any, n_params: int) -> dict[str, Any]:
    img, txt = cfg.image, cfg.text
    return {
        "image": {"image_size": img.image_size, "patch_size": img.patch_size, "width": img.width, "depth": img.depth,
                  "mlp_dim": img.mlp_dim, "num_heads": img.num_heads, "pool_type": img.pool_type},
        "text": {"vocab_size": txt.vocab_size, "max_len": txt.max_len, "width": txt.width, "depth": txt.depth,
                 "mlp_dim": txt.mlp_dim, "num_heads": txt.num_heads, "head_size": txt.head_size},
        "params": n_params,
        "dtype": str(config.model.get("dtype", "float32")),
    }


def sigmoid_loss_fn(model: Any, batch_size: int) -> Callable[[tuple[Any, Any]], Any]:
    """The PyTorch loss of a batch (pixels, ids): -sum(log_sigmoid(z * logits_per_image)) / B."""
    import torch

    signs = 2 * torch.eye(batch_size) - 1  # z: +1 on the matching pairs, -1 elsewhere

    def loss_fn(batch: tuple[Any, Any]) -> Any:
        pixels, ids = batch
        logits = model(input_ids=ids, pixel_values=pixels).logits_per_image  # [B images, B texts]
        return -torch.nn.functional.logsigmoid(signs * logits).sum() / logits.shape[0]
    return loss_fn


def _build_ours(config: ml_collections.ConfigDict, seed: int, num_batches: int
                ) -> tuple[JaxStepRunner, Trainer, Any, list[dict[str, np.ndarray]], float]:
    """(runner, trainer, host copy of the initial params, host batches, compile seconds): `train.loop.prepare`'s
    jitted step (what `bvl train` runs), compiled ahead of time, over a fresh state from the task's parameters."""
    with tempfile.TemporaryDirectory(prefix="bvl_bench_siglip_train_") as workdir:
        trainer = prepare(config, workdir)  # the task trains its caption tokenizer in the workdir
    cfg = trainer.task.model.config
    # A host copy owned by numpy: the device state is donated to the step, and torch starts from these values.
    host_params = jax.tree.map(lambda a: np.array(a, copy=True),
                               jax.device_get(trainer.task.init_params(trainer.init_rng)))
    state = trainer.new_state(host_params)
    host_batches = bench_batches(cfg.image.image_size, cfg.text.max_len, cfg.text.vocab_size, config.batch_size,
                                 num_batches, seed)
    batches = [shard_batch(b, trainer.mesh) for b in host_batches]
    t0 = time.perf_counter()
    compiled = trainer.step.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - t0
    return JaxStepRunner(compiled, state, batches), trainer, host_params, host_batches, compile_s


def run_siglip_train_bench(
    config: str | ml_collections.ConfigDict = DEFAULT_CONFIG,
    *,
    batch_size: int | None = None,
    steps: int = 40,
    block_steps: int = 5,
    check_steps: int = 5,
    num_batches: int = 4,
    attn_implementations: Sequence[str] = TORCH_IMPLS,
    fused_adamw: bool = True,
    torch_threads: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Our SigLIP train step against PyTorch's, examples/s; see the module docstring.

    `config`: a config spec (a packaged name or a `path.py`, optionally `:arg`, e.g. `siglip_shapes:smoke`) or a
    ConfigDict; its model, batch size (unless `batch_size` is given), optimizer, loss, mesh and sharding rules are
    used; `seed` is added to its seed. `steps` timed steps per side (a multiple of `block_steps`, the steps per
    timed block), after `check_steps` (>= 2) untimed ones. `attn_implementations`: the transformers attentions
    timed (the faster is the reference). `fused_adamw`: torch's fused CPU AdamW kernel (else its default for-loop
    one).

    `torch_threads`: None probes torch at every CPU this process may use and at 1 thread (one block of steps each,
    untimed; ours takes as many untimed steps so all sides stay at the same step) and times at the count whose
    fastest side was fastest: on a busy machine torch's OpenMP threads can run many times slower at 2 threads than
    at 1, and the bench must not win by that. An int fixes the count. torch's previous setting is restored.

    Returns a JSON-serialisable dict: `ours_examples_per_s`, `torch_examples_per_s` (the faster torch side),
    `torch_attn_implementation` (which one that is), `ratio` (ours / torch), `target`, `ok` (ratio >= target and
    the losses agree), `ours_step_ms`, `torch_step_ms` (medians), `times_ms` (every per-step sample per side),
    `torch_sides` (per attention: `step_ms`, `examples_per_s`, `first_loss`, `first_loss_rel_diff`,
    `check_loss_rel_diff`, `final_loss`, `final_loss_rel_diff`), `compile_s` (ours), `first_loss_ours`,
    `first_loss_torch`, `first_loss_rel_diff`, `check_losses` (the `check_steps` losses per side),
    `check_loss_rel_diff` (the last of them), `loss_change` (per side: last check loss - first), `final_loss_ours`,
    `final_loss_torch`, `final_loss_rel_diff` (the losses of the last timed step, `final_step`), `losses_agree`
    (every torch side, within `loss_tolerances`), `sizes`, `batch`, `steps`, `block_steps`, `check_steps`,
    `optimizer`, `torch` (fused AdamW, decayed tensors), `torch_threads`, `torch_thread_probe_ms`,
    `background_cpu`, `env`, `peak_rss_gib`.
    """
    import torch

    if steps < 1 or block_steps < 1 or steps % block_steps or check_steps < 2 or num_batches < 1:
        raise ValueError(f"need steps >= 1 a multiple of block_steps >= 1, check_steps >= 2 and num_batches >= 1; "
                         f"got steps={steps}, block_steps={block_steps}, check_steps={check_steps}, "
                         f"num_batches={num_batches}")
    if torch_threads is not None and torch_threads < 1:
        raise ValueError(f"torch_threads must be >= 1 or None, got {torch_threads}")
    impls = list(dict.fromkeys(attn_implementations))
    if not impls or "ours" in impls:
        raise ValueError(f"attn_implementations must name transformers attentions, got {attn_implementations!r}")
    spec = config if isinstance(config, str) else "ConfigDict"
    config = _resolve_config(config)
    if batch_size is not None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        config.batch_size = batch_size
    if config.get("accum_steps", 1) != 1:
        raise ValueError("the bench times one step on the whole batch; set accum_steps=1")
    config.seed += seed  # `prepare` derives the initial parameters and the step's rng from config.seed
    reuse_freed_host_memory()  # as `prepare` does, but before torch starts its threads (same process)
    loadavg_start = loadavg()
    candidates = torch_thread_candidates(torch_threads)
    with torch_num_threads(candidates[0]):
        ours, trainer, host_params, host_batches, compile_s = _build_ours(config, seed, num_batches)
        cfg = trainer.task.model.config
        schedule_values = np.asarray(trainer.schedule(np.arange(config.total_steps + 1)), np.float64)
        torch_batches = [(torch.from_numpy(b["image"].transpose(0, 3, 1, 2).copy()),  # [B, 3, R, R]
                          torch.from_numpy(b["text"].astype(np.int64))) for b in host_batches]
        runners: dict[str, TorchStepRunner] = {}
        for impl in impls:
            model, torch_opt, scheduler, torch_facts = build_torch_side(
                host_params, cfg, config.optimizer, schedule_values, impl, fused_adamw)
            runners[impl] = TorchStepRunner(sigmoid_loss_fn(model, config.batch_size),
                                            [p for p in model.parameters() if p.requires_grad], torch_opt, scheduler,
                                            torch_batches, config.optimizer.clip_norm)
        timing = train_step_timing(ours, runners, steps=steps, block_steps=block_steps, check_steps=check_steps,
                                   candidates=candidates)
        check, probe, threads, final = timing["check"], timing["probe"], timing["threads"], timing["final"]
        busy, per_step = timing["busy"], timing["per_step"]
        env = environment(loadavg_start=loadavg_start, torch_threads=threads)

    summary = train_step_summary(per_step, check, final, config.batch_size, impls, TARGET_RATIO)
    n_params = sum(int(np.size(a)) for a in jax.tree.leaves(host_params))
    sizes = _sizes(config, cfg, n_params)
    return {
        "benchmark": "siglip_train",
        "config": spec,
        **summary,
        "ok": bool(summary["ratio"] >= TARGET_RATIO and summary["losses_agree"]),
        "compile_s": round(compile_s, 3),
        "final_step": ours.steps_done,
        "sizes": sizes,
        "batch": config.batch_size,
        "steps": steps,
        "block_steps": block_steps,
        "check_steps": check_steps,
        "num_batches": num_batches,
        "optimizer": config.optimizer.to_dict() | {"total_steps": config.total_steps},
        "ours": {"jit": "train.loop.prepare(...).step (jax.jit, state donated, config shardings) + lower().compile()",
                 "loss_impl": config.loss.impl, "model_dtype": sizes["dtype"]},
        "torch": torch_facts | {"fused_adamw": fused_adamw, "attn_implementations": impls,
                                "mode": "eager mode, no torch.compile"},
        "torch_threads": threads,
        "torch_thread_probe_ms": {str(n): {impl: round(t * 1e3, 3) for impl, t in by_impl.items()}
                                  for n, by_impl in probe.items()},
        "background_cpu": busy,
        "env": env,
        "peak_rss_gib": peak_rss_gib(),
    }


def format_siglip_train_table(result: dict[str, Any]) -> str:
    """A readable summary of `run_siglip_train_bench`'s result."""
    env, sizes, torch_facts = result["env"], result["sizes"], result["torch"]
    img, txt = sizes["image"], sizes["text"]
    probe = result.get("torch_thread_probe_ms") or {}
    probe_text = ("; thread probe ms/step: " + ", ".join(
        f"{n} threads " + " ".join(f"{impl} {ms:.0f}" for impl, ms in by_impl.items()) for n, by_impl in probe.items())
        if probe else "")
    lines = [
        f"siglip train-step bench ({result['config']}): batch {result['batch']}, {result['steps']} timed steps per "
        f"side in blocks of {result['block_steps']} (interleaved), after {result['check_steps']} checked steps",
        f"model: image {img['image_size']}px/{img['patch_size']} w{img['width']} d{img['depth']} mlp{img['mlp_dim']} "
        f"h{img['num_heads']} {img['pool_type']}; text L{txt['max_len']} V{txt['vocab_size']} w{txt['width']} "
        f"d{txt['depth']} mlp{txt['mlp_dim']} h{txt['num_heads']}; {sizes['params']:,} params, {sizes['dtype']}",
        f"ours: jax {env['jax']} {env['jax_backend']}, compile {result['compile_s']:.2f} s (not timed); torch "
        f"{env['torch']} transformers {env['transformers']}, {torch_facts['mode']}, fused AdamW "
        f"{torch_facts['fused_adamw']}, {result['torch_threads']} threads of {env['cpu_count']} CPUs{probe_text}",
        f"{'side':>12} {'ms/step':>9} {'examples/s':>11} {'first loss':>11} {'rel diff':>9} {'after checks':>12}",
        f"{'ours':>12} {result['ours_step_ms']:>9.1f} {result['ours_examples_per_s']:>11.1f} "
        f"{result['first_loss_ours']:>11.6f}",
    ]
    for impl, side in result["torch_sides"].items():
        mark = " *" if impl == result["torch_attn_implementation"] else ""
        lines.append(f"{'torch ' + impl:>12} {side['step_ms']:>9.1f} {side['examples_per_s']:>11.1f} "
                     f"{side['first_loss']:>11.6f} {side['first_loss_rel_diff']:>9.1e} "
                     f"{side['check_loss_rel_diff']:>12.1e}{mark}")
    lines += [
        f"ratio (ours / torch {result['torch_attn_implementation']} examples/s, the faster torch side *) "
        f"{result['ratio']:.3f}, target >= {result['target']}: "
        f"{'met' if result['ratio'] >= result['target'] else 'NOT met'}",
        f"loss change over the {result['check_steps']} checked steps: ours {result['loss_change']['ours']:+.4f}, "
        f"torch {result['loss_change'][result['torch_attn_implementation']]:+.4f}; at step {result['final_step']} "
        f"ours {result['final_loss_ours']:.6f} torch {result['final_loss_torch']:.6f} (rel diff "
        f"{result['final_loss_rel_diff']:.1e}); losses agree: {result['losses_agree']}",
        f"ok: {result['ok']}; busy (CPU share other processes took while timing): "
        f"{busy_cell(result.get('background_cpu'))}",
    ]
    if warning := busy_warning([result.get("background_cpu")], "every side ran slower than on a quiet machine, and "
                               "not necessarily alike, so the ratio is not a fair one"):
        lines.append(warning)
    return "\n".join(lines)
