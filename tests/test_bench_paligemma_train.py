"""The PaliGemma train-step benchmark at tiny sizes: the JSON contract, loss agreement, frozen parameters untouched
on every side, the derived figures and the table (never speed)."""

import json

import jax
import numpy as np
import pytest

from big_vision_lite.bench.harness import TRAIN_CHECK_LOSS_TOL, TRAIN_FIRST_LOSS_TOL
from big_vision_lite.bench.paligemma_train import (
    SETTINGS,
    TARGET_RATIO,
    TORCH_IMPLS,
    format_paligemma_train_table,
    model_config,
    run_paligemma_train_bench,
    setting_config,
    siglip_tower_run,
)
from big_vision_lite.train.config import load_config
from big_vision_lite.train.loop import prepare
from big_vision_lite.train.sharding import shard_batch

CONFIG = "paligemma_shapes_caption:smoke"
BATCH, STEPS, BLOCK, CHECK, SEED = 4, 2, 1, 3, 1


@pytest.fixture(scope="module")
def result() -> dict:
    return run_paligemma_train_bench(CONFIG, models=("caption",), batch_size=BATCH, steps=STEPS, block_steps=BLOCK,
                                     check_steps=CHECK, num_batches=2, torch_threads=1, seed=SEED)


@pytest.fixture(scope="module")
def entries(result) -> dict[str, dict]:
    return {e["setting"]: e for e in result["entries"]}


def test_json_contract(result, entries):
    assert result["benchmark"] == "paligemma_train" and result["config"] == CONFIG
    assert isinstance(result["ok"], bool) and result["ok"] == all(e["ok"] for e in entries.values())
    assert list(entries) == list(SETTINGS)  # one entry per setting, in order
    assert result["ratios"] == {f"caption/{s}": e["ratio"] for s, e in entries.items()}
    for e in entries.values():
        for key in ("ours_examples_per_s", "torch_examples_per_s", "torch_attn_implementation", "ratio", "target",
                    "first_loss_ours", "first_loss_torch", "check_losses", "frozen_unchanged", "sizes", "memory",
                    "compile_s", "torch_threads", "background_cpu"):
            assert key in e, key
        assert e["model"] == "caption" and e["batch"] == BATCH and e["target"] == TARGET_RATIO
        assert set(e["torch_sides"]) == set(TORCH_IMPLS) and e["torch_threads"] == 1
        assert e["sizes"]["llm"]["width"] == 32 and e["sizes"]["image_tokens"] == 16  # the smoke config's model
        assert e["memory"]["ours_xla_mib"]["peak"] > 0 and e["compile_s"] > 0
    assert entries["lora"]["lora"] == SETTINGS["lora"]["lora"] and entries["lora"]["trainable"] == ["lora_"]
    assert result["env"]["jax_backend"] == "cpu" and result["env"]["torch_num_threads"] == 1
    json.dumps(result)  # the CLI writes it as JSON


def test_losses_agree(entries):
    # Same weights, same batch: the same first loss; the same optimiser keeps the later ones together.
    for e in entries.values():
        assert e["first_loss_ours"] > 0 and e["losses_agree"]
        assert all(len(losses) == CHECK for losses in e["check_losses"].values())
        for impl, side in e["torch_sides"].items():
            assert side["first_loss_rel_diff"] <= TRAIN_FIRST_LOSS_TOL
            assert side["check_loss_rel_diff"] <= TRAIN_CHECK_LOSS_TOL
            assert side["final_loss_rel_diff"] <= 1e-3
            assert e["loss_change"][impl] == pytest.approx(e["loss_change"]["ours"], rel=1e-2, abs=1e-4)
        assert e["final_step"] == CHECK + STEPS  # one thread count given: no probe steps
    assert entries["full"]["loss_change"]["ours"] != 0  # it trained (the lr is > 0 from the second step)


def test_frozen_parameters_untouched(entries):
    assert entries["full"]["frozen_tensors"] == {"ours": 0, **{impl: 0 for impl in TORCH_IMPLS}}
    for setting in ("attention", "lora"):
        e = entries[setting]
        assert all(e["frozen_unchanged"].values()) and e["frozen_ok"]
        assert all(n > 0 for n in e["frozen_tensors"].values())
        assert e["sizes"]["trained_params"] < e["sizes"]["params"]
        for side in e["torch_sides"].values():  # frozen tensors hold no optimizer state
            assert side["trained_tensors"] > 0 and side["optimizer_state_mib"] < entries["full"]["torch_sides"][
                "eager"]["optimizer_state_mib"]
        assert e["memory"]["ours_optimizer_state_mib"] < entries["full"]["memory"]["ours_optimizer_state_mib"]
    # PEFT's block-diagonal B stays block-diagonal: it takes our per-head updates.
    assert entries["lora"]["lora_off_block_max"] == {impl: 0.0 for impl in TORCH_IMPLS}


def test_ours_is_the_step_bvl_train_runs(entries, tmp_path):
    # What `train` would do with the bench's config: prepare, a fresh state, one step on the task's first batch.
    config = model_config(load_config(CONFIG), "caption")
    siglip_tower_run(config, "caption", tmp_path / "tower")
    config = setting_config(config, "full", tmp_path / "tower", BATCH, SEED)
    trainer = prepare(config, tmp_path / "run")
    batch = next(trainer.task.batches(0))
    _, metrics = trainer.step(trainer.init_state(), shard_batch(batch, trainer.mesh))
    np.testing.assert_allclose(float(jax.device_get(metrics["loss"])), entries["full"]["first_loss_ours"], rtol=1e-6)


def test_figures(entries):
    for e in entries.values():
        assert set(e["times_ms"]) == {"ours", *TORCH_IMPLS}
        assert all(len(ts) == STEPS // BLOCK for ts in e["times_ms"].values())
        assert e["ours_examples_per_s"] == pytest.approx(BATCH / (e["ours_step_ms"] / 1e3), rel=1e-3)
        best = e["torch_attn_implementation"]
        assert e["torch_sides"][best]["step_ms"] == min(side["step_ms"] for side in e["torch_sides"].values())
        assert e["ratio"] == pytest.approx(e["ours_examples_per_s"] / e["torch_examples_per_s"], rel=1e-3)
        assert e["ok"] == (e["ratio"] >= TARGET_RATIO and e["losses_agree"] and e["frozen_ok"])


def test_table(result):
    table = format_paligemma_train_table(result)
    for text in ("caption/full", "caption/attention", "caption/lora", "ours ex/s", "eager", "sdpa", "ratio",
                 "ok:"):
        assert text in table, text


def test_bad_arguments():
    with pytest.raises(ValueError, match="block_steps"):
        run_paligemma_train_bench(CONFIG, steps=3, block_steps=2)
    with pytest.raises(ValueError, match="settings"):
        run_paligemma_train_bench(CONFIG, settings=("everything",))
    with pytest.raises(ValueError, match="models"):
        run_paligemma_train_bench(CONFIG, models=())
