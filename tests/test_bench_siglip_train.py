"""The SigLIP train-step benchmark at tiny sizes: the JSON contract, loss agreement, the derived figures, the table
and the weight-decay mapping (never speed)."""

import json

import jax
import numpy as np
import pytest

from big_vision_lite.bench.harness import TRAIN_CHECK_LOSS_TOL, TRAIN_FIRST_LOSS_TOL
from big_vision_lite.bench.siglip_train import (
    TARGET_RATIO,
    TORCH_IMPLS,
    bench_batches,
    decay_flags,
    format_siglip_train_table,
    run_siglip_train_bench,
)
from big_vision_lite.models.two_towers import TwoTowers, init_params, two_towers_config
from big_vision_lite.train.config import load_config
from big_vision_lite.train.loop import prepare
from big_vision_lite.train.sharding import shard_batch

CONFIG = "siglip_shapes:smoke"
BATCH, STEPS, BLOCK, CHECK, SEED = 8, 4, 2, 3, 1


@pytest.fixture(scope="module")
def result() -> dict:
    return run_siglip_train_bench(CONFIG, batch_size=BATCH, steps=STEPS, block_steps=BLOCK, check_steps=CHECK,
                                  num_batches=2, seed=SEED)


def test_json_contract(result):
    for key in ("ours_examples_per_s", "torch_examples_per_s", "ratio", "target", "ok", "first_loss_ours",
                "first_loss_torch", "first_loss_rel_diff", "check_loss_rel_diff", "final_loss_ours",
                "final_loss_torch", "sizes", "batch", "steps", "compile_s", "torch_threads", "env", "background_cpu"):
        assert key in result, key
    assert result["benchmark"] == "siglip_train" and result["target"] == TARGET_RATIO
    assert result["config"] == CONFIG and isinstance(result["ok"], bool)
    assert (result["batch"], result["steps"], result["block_steps"], result["check_steps"]) == (BATCH, STEPS, BLOCK,
                                                                                                CHECK)
    assert result["sizes"]["image"]["width"] == 32 and result["sizes"]["params"] > 0  # the smoke config's model
    assert result["env"]["jax_backend"] == "cpu" and result["env"]["torch_num_threads"] == result["torch_threads"]
    assert set(result["torch_sides"]) == set(TORCH_IMPLS) and result["torch_attn_implementation"] in TORCH_IMPLS
    assert result["compile_s"] > 0
    json.dumps(result)  # the CLI writes it as JSON


def test_losses_agree(result):
    # Same weights, same batch: the first loss is the same; the same optimiser keeps the later ones together.
    assert result["first_loss_ours"] > 0
    assert result["first_loss_rel_diff"] <= TRAIN_FIRST_LOSS_TOL
    assert result["check_loss_rel_diff"] <= TRAIN_CHECK_LOSS_TOL
    assert result["losses_agree"]
    assert all(len(losses) == CHECK for losses in result["check_losses"].values())
    change = result["loss_change"]
    assert change["ours"] < 0  # it trained (the smoke warmup is 2 steps: the lr is > 0 from the second step)
    for impl, side in result["torch_sides"].items():
        assert side["first_loss_rel_diff"] <= TRAIN_FIRST_LOSS_TOL
        assert side["check_loss_rel_diff"] <= TRAIN_CHECK_LOSS_TOL
        assert change[impl] == pytest.approx(change["ours"], rel=1e-2)
        assert side["final_loss_rel_diff"] <= 1e-3
    probe_steps = BLOCK * len(result["torch_thread_probe_ms"])
    assert result["final_step"] == CHECK + probe_steps + STEPS


def test_ours_is_the_step_bvl_train_runs(result, tmp_path):
    # What `train` would do with the config (its seed moved by the bench's seed): prepare, a fresh state, one step
    # on the bench's first batch. The bench's first checked loss is that step's loss.
    config = load_config(CONFIG)
    config.batch_size, config.seed = BATCH, config.seed + SEED
    trainer = prepare(config, tmp_path)
    cfg = trainer.task.model.config
    host = bench_batches(cfg.image.image_size, cfg.text.max_len, cfg.text.vocab_size, BATCH, 1, SEED)[0]
    _, metrics = trainer.step(trainer.init_state(), shard_batch(host, trainer.mesh))
    np.testing.assert_allclose(float(metrics["loss"]), result["first_loss_ours"], rtol=1e-6)


def test_figures(result):
    times = result["times_ms"]
    assert set(times) == {"ours", *TORCH_IMPLS} and all(len(ts) == STEPS // BLOCK for ts in times.values())
    for side in ("ours", "torch"):
        assert result[f"{side}_examples_per_s"] == pytest.approx(BATCH / (result[f"{side}_step_ms"] / 1e3), rel=1e-3)
    sides = result["torch_sides"]
    best = result["torch_attn_implementation"]
    assert sides[best]["step_ms"] == min(side["step_ms"] for side in sides.values())
    assert result["torch_step_ms"] == sides[best]["step_ms"]
    assert result["ratio"] == pytest.approx(result["ours_examples_per_s"] / result["torch_examples_per_s"], rel=1e-3)
    assert result["ok"] == (result["ratio"] >= TARGET_RATIO and result["losses_agree"])
    if probe := result["torch_thread_probe_ms"]:
        assert result["torch_threads"] == int(min(probe, key=lambda n: min(probe[n].values())))


def test_table(result):
    table = format_siglip_train_table(result)
    for text in ("examples/s", "ratio (ours / torch ", "first loss", "ok:", "torch eager", "torch sdpa"):
        assert text in table, text


def test_decay_flags_follow_our_layout():
    model = TwoTowers(two_towers_config({
        "image": dict(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=8, image_size=16, pool_type="map"),
        "text": dict(width=16, depth=1, mlp_dim=32, num_heads=2, vocab_size=10, max_len=4), "out_dim": (None, 16)}))
    shapes = jax.eval_shape(lambda rng: init_params(model, rng), jax.random.PRNGKey(0))  # all the flags need
    flags = decay_flags(shapes, model.config)
    layer = "vision_model.encoder.layers.0."
    assert flags[f"{layer}self_attn.q_proj.weight"] and flags[f"{layer}mlp.fc1.weight"]
    assert flags[f"{layer}self_attn.q_proj.bias"]  # [N, H] in ours: ndim 2, so decayed
    assert not flags[f"{layer}self_attn.out_proj.bias"] and not flags[f"{layer}mlp.fc1.bias"]
    assert not flags[f"{layer}layer_norm1.weight"] and not flags["logit_scale"] and not flags["logit_bias"]
    assert flags["vision_model.head.attention.in_proj_bias"] and flags["vision_model.head.probe"]
    assert flags["text_model.embeddings.token_embedding.weight"] and not flags["text_model.head.bias"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="block_steps"):
        run_siglip_train_bench(CONFIG, steps=3, block_steps=2)
    with pytest.raises(ValueError, match="check_steps"):
        run_siglip_train_bench(CONFIG, check_steps=1)
