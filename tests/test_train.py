"""The shared training loop, on a toy regression task: configs and overrides, sharding rules, resume equal to an
uninterrupted run, checkpoint fallback, NaN stop, metrics file. SigLIP on top of it is tested in test_siglip_train."""

import json
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

from big_vision_lite.checkpoints.run import CHECKPOINT_DIR
from big_vision_lite.train.checkpoint import CORRUPT_DIR, Checkpointer, StateMismatchError
from big_vision_lite.train.config import ConfigError, apply_overrides, load_config
from big_vision_lite.train.loop import NonFiniteLossError, train
from big_vision_lite.train.metrics import METRICS_FILE, read_metrics
from big_vision_lite.train.optimizer import make_schedule
from big_vision_lite.train.sharding import make_mesh, spec_for
from big_vision_lite.train.tasks import TASKS


class ToyTask:
    """Linear regression y = x @ w_true, batches a pure function of the step (as the real pipelines are)."""

    eval_keys = ("eval/mse",)

    @staticmethod
    def requires(config):
        return ()

    def __init__(self, config, workdir, mesh):
        self.batch_size = config.batch_size
        self.w_true = np.linspace(-1, 1, 8 * 2, dtype=np.float32).reshape(8, 2)

    def init_params(self, rng):
        return {"dense": {"kernel": jax.random.normal(rng, (8, 2)) * 0.1, "bias": jnp.zeros((2,))}}

    def _predict(self, params, x):
        return x @ params["dense"]["kernel"] + params["dense"]["bias"]

    def train_grads(self, params, batch, rng):
        def loss_fn(p):
            noise = 0.01 * jax.random.normal(rng, batch["y"].shape)  # uses the step RNG: resume must reproduce it
            return jnp.mean((self._predict(p, batch["x"]) - batch["y"] - noise) ** 2)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        return loss, {"w_norm": jnp.linalg.norm(params["dense"]["kernel"])}, grads

    def _batch(self, step):
        x = np.random.default_rng(step).normal(size=(self.batch_size, 8)).astype(np.float32)
        return {"x": x, "y": x @ self.w_true}

    def batches(self, start_step, rows=None):
        lo, hi = rows or (0, self.batch_size)
        step = start_step
        while True:
            yield {k: v[lo:hi] for k, v in self._batch(step).items()}
            step += 1

    def evaluate(self, params):
        batch = self._batch(10_000)
        return {"eval/mse": float(jnp.mean((self._predict(params, batch["x"]) - batch["y"]) ** 2))}

    def report(self):
        return {"skipped_images": 0}

    def run_info(self):
        return None


@pytest.fixture(autouse=True)
def toy_task(monkeypatch):
    """The toy task as a registered one: `config.task = "toy"` (a task is chosen by name, as the CLI does)."""
    monkeypatch.setitem(TASKS, "toy", ToyTask)


def toy_config(**overrides) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(dict(
        task="toy", seed=0, total_steps=12, batch_size=8, log_every=2, eval_every=6, ckpt_every=4, keep_ckpts=2,
        mesh=dict(data=-1, fsdp=1), sharding_rules=[(".*", "fsdp")],
        optimizer=dict(lr=0.2, warmup_steps=2, end_lr_fraction=0.1, weight_decay=1e-4, b1=0.9, b2=0.999,
                       clip_norm=1.0)))
    config.update(overrides)
    return config


def _params(workdir: Path) -> dict:
    """The parameters of the newest checkpoint in `workdir`, as numpy."""
    checkpointer = Checkpointer(workdir, every=1, keep=5)
    step = checkpointer.steps()[-1]
    restored = checkpointer.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    checkpointer.close()
    return jax.tree.map(np.asarray, restored["state"]["params"])


def test_fresh_run_writes_metrics_checkpoints_and_plot(tmp_path):
    result = train(toy_config(), tmp_path, progress=False)
    assert (result.start_step, result.final_step) == (0, 12)
    records = read_metrics(tmp_path / METRICS_FILE)
    train_steps = [r["step"] for r in records if "loss" in r]
    assert train_steps == [2, 4, 6, 8, 10, 12]
    for r in records:
        if "loss" in r:
            assert {"step", "loss", "lr", "examples_per_s", "grad_norm", "w_norm"} <= set(r)
    assert [r["step"] for r in records if "eval/mse" in r] == [6, 12]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0] / 5, losses  # it learns
    assert sorted(int(p.name) for p in (tmp_path / CHECKPOINT_DIR).iterdir() if p.name.isdigit()) == [8, 12]
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert json.loads((tmp_path / "config.json").read_text())["total_steps"] == 12
    # the record of step n holds the lr step n trained with: warmup 0, 0.1 (record 2), then the cosine from 0.2
    lr = {r["step"]: r["lr"] for r in records if "lr" in r}
    assert lr[2] == pytest.approx(0.1, rel=1e-6) and lr[12] < lr[6] < 0.2


def test_resume_equals_uninterrupted_run(tmp_path):
    train(toy_config(), tmp_path / "straight", progress=False)
    interrupted = tmp_path / "resumed"
    first = train(toy_config(), interrupted, stop_at=6, progress=False)
    assert first.final_step == 6
    second = train(toy_config(), interrupted, progress=False)
    assert second.start_step == 6 and second.final_step == 12
    a, b = _params(tmp_path / "straight"), _params(interrupted)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)
    steps = [r["step"] for r in read_metrics(interrupted / METRICS_FILE) if "loss" in r]
    assert steps == [2, 4, 6, 8, 10, 12]  # one run's worth of records, none twice


def test_corrupted_latest_checkpoint_falls_back_with_warning(tmp_path):
    train(toy_config(), tmp_path, stop_at=8, progress=False)  # checkpoints at 4 and 8
    latest = tmp_path / CHECKPOINT_DIR / "8" / "state"
    for f in latest.rglob("*"):
        if f.is_file() and f.name not in ("commit_success.txt",):
            f.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="cannot be restored"):
        result = train(toy_config(), tmp_path, progress=False)
    assert result.start_step == 4 and result.final_step == 12
    assert (tmp_path / CORRUPT_DIR / "8").is_dir()  # set aside, not deleted


class WiderToyTask(ToyTask):
    """The toy model with one more parameter: what a changed model config builds."""

    def init_params(self, rng):
        return {**super().init_params(rng), "extra": {"scale": jnp.ones((2,))}}


def test_a_checkpoint_of_another_config_is_refused_not_set_aside(tmp_path, monkeypatch):
    train(toy_config(), tmp_path, stop_at=8, progress=False)
    saved_config = (tmp_path / "config.json").read_text()
    monkeypatch.setitem(TASKS, "wider", WiderToyTask)
    with pytest.raises(ConfigError, match=r"holds a run \(step 8\) of another config; resuming would change task: "
                                          r"'toy' -> 'wider'.*--allow-config-change"):
        train(toy_config(task="wider"), tmp_path, progress=False)
    assert (tmp_path / "config.json").read_text() == saved_config  # refused before anything was written
    # Allowed explicitly, the config passes, but the state it builds still differs from the checkpoint's.
    with pytest.raises(StateMismatchError, match=r"checkpoints/8 holds another state .*params/extra/scale.* "
                                                 r"nothing was moved"):
        train(toy_config(task="wider"), tmp_path, progress=False, allow_config_change=True)
    assert sorted(p.name for p in (tmp_path / CHECKPOINT_DIR).iterdir() if p.name.isdigit()) == ["4", "8"]
    assert not (tmp_path / CORRUPT_DIR).exists()
    assert train(toy_config(), tmp_path, progress=False).start_step == 8  # the right config still resumes


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    config = toy_config()
    train(config, tmp_path, stop_at=4, progress=False)
    config.optimizer.lr = 1e38  # the first update overflows the weights
    kept_metrics = read_metrics(tmp_path / METRICS_FILE)
    with pytest.raises(NonFiniteLossError, match=r"loss is (nan|inf) at step \d+; stopping. Last good checkpoint: .*4"):
        train(config, tmp_path, progress=False, allow_config_change=True)
    assert read_metrics(tmp_path / METRICS_FILE)[:len(kept_metrics)] == kept_metrics  # every line kept
    assert not (tmp_path / "config.until-step-4.json").exists()  # no checkpoint of the new config: nothing recorded
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the kept checkpoint restores cleanly
        params = _params(tmp_path)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
    assert sorted(int(p.name) for p in (tmp_path / CHECKPOINT_DIR).iterdir() if p.name.isdigit())[-1] == 4


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "exp.py"
    path.write_text("import ml_collections\n"
                    "def get_config(arg=None):\n"
                    "    c = ml_collections.ConfigDict()\n"
                    "    c.total_steps = 10 if arg is None else int(arg)\n"
                    "    c.optimizer = dict(lr=1e-3, clip_norm=None)\n"
                    "    c.name = 'x'\n"
                    "    return c\n")
    assert load_config(str(path)).total_steps == 10
    config = load_config(f"{path}:7")
    assert config.total_steps == 7
    apply_overrides(config, ["total_steps=20", "optimizer.lr=1", "name=abc", "optimizer.clip_norm=0.5"])
    assert config.total_steps == 20 and config.optimizer.lr == 1.0 and isinstance(config.optimizer.lr, float)
    assert config.name == "abc" and config.optimizer.clip_norm == 0.5
    assert apply_overrides(config, ["name='quoted'"]).name == "quoted"
    with pytest.raises(ConfigError, match=r"optimizer.lrr: unknown config key; did you mean optimizer.lr"):
        apply_overrides(config, ["optimizer.lrr=1"])
    with pytest.raises(ConfigError, match=r"total_steps=abc.*expected int"):
        apply_overrides(config, ["total_steps=abc"])
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides(config, ["total_steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.py"))


def test_config_names_are_packaged_configs_and_paths_must_exist(tmp_path, monkeypatch):
    """A bare name is a packaged config from any directory; a path never falls back to one with its basename."""
    monkeypatch.chdir(tmp_path)
    assert load_config("siglip_shapes:smoke").total_steps == 6
    with pytest.raises(ConfigError, match=r"unknown config 'siglip_shape': packaged configs are "
                                          r"paligemma_shapes_caption, siglip2_shapes, siglip_shapes"):
        load_config("siglip_shape")
    with pytest.raises(ConfigError, match=r"configs/siglip_shapes\.py does not exist"):
        load_config("configs/siglip_shapes.py")  # the old repository path: not silently the packaged one
    own = tmp_path / "mine.py"
    own.write_text("import ml_collections\n\n\ndef get_config(arg=None):\n"
                   "    return ml_collections.ConfigDict({'a': arg})\n")
    assert load_config(f"{own}:x").a == "x"


def test_bad_loop_settings_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"config.batch_size must be an int in \[1, 2147483647\], got 0"):
        train(toy_config(batch_size=0), tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"optimizer.warmup_steps must be an int >= 0, got -1"):
        train(toy_config(optimizer=dict(toy_config().optimizer, warmup_steps=-1)), tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"config.task must be one of: siglip, paligemma, toy; got 'toi'"):
        train(toy_config(task="toi"), tmp_path, progress=False)
    # A warmup longer than a short run is cut to end before its last step, with a warning saying so.
    config = toy_config(total_steps=3)
    config.optimizer.warmup_steps = 50
    with pytest.warns(UserWarning, match="warmup_steps 50 >= total_steps 3: the learning rate warms up over the "
                                         "first 2 steps"):
        train(config, tmp_path / "short", progress=False)
    lr = [float(make_schedule(config.optimizer, 3)(step)) for step in range(3)]
    assert lr == pytest.approx([0.0, 0.1, 0.2])
    with pytest.raises(ValueError, match=r"mesh.fsdp=3 must be >= 1 and divide"):
        make_mesh(fsdp=3)


def test_sharding_rules():
    mesh = make_mesh()  # one CPU device: every rule resolves, fsdp degenerates to replication
    assert spec_for("img/embedding/kernel", (4, 4, 3, 64), [(".*", "fsdp")], mesh) == P()
    rules = [("pos_embedding", "replicate"), ("head/kernel", (None, "fsdp")), (".*", "fsdp")]
    assert spec_for("img/head/kernel", (64, 32), rules, mesh) == P(None, "fsdp")
    with pytest.raises(ValueError, match="has 2 axes, parameter x/head/kernel has shape"):
        spec_for("x/head/kernel", (4, 4, 4), rules, mesh)


def test_trainable_patterns_freeze_the_rest_without_optimizer_state(tmp_path):
    """Only `dense/bias` trains: the kernel keeps its initial value and has no Adam moments in the checkpoint."""
    workdir = tmp_path / "frozen"
    config = toy_config(total_steps=4, trainable=["dense/bias"])
    train(config, workdir, progress=False)
    initial = ToyTask(config, workdir, None).init_params(jax.random.split(jax.random.PRNGKey(0))[0])
    params = _params(workdir)
    # Equal up to the last bit XLA's jitted init may round differently; one update would move it by ~lr = 0.2.
    np.testing.assert_allclose(params["dense"]["kernel"], np.asarray(initial["dense"]["kernel"]), rtol=1e-6)
    assert np.abs(params["dense"]["bias"]).max() > 0  # trained from zeros

    checkpointer = Checkpointer(workdir, every=1, keep=5)
    restored = checkpointer.manager.restore(checkpointer.steps()[-1],
                                            args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    checkpointer.close()
    shapes = [np.shape(leaf) for leaf in jax.tree.leaves(restored["state"]["opt_state"])]
    assert (8, 2) not in shapes and shapes.count((2,)) == 2  # Adam's mu and nu of the bias, nothing for the kernel


@pytest.mark.parametrize(("patterns", "message"), [
    (["dense/kernal"], "'dense/kernal' matches no parameter; names look like"),
    (["dense/("], "not a valid regex"),
    ("dense/bias", "a list of regexes"),
])
def test_bad_trainable_patterns_are_refused(tmp_path, patterns, message):
    with pytest.raises(ValueError, match=message):
        train(toy_config(trainable=patterns), tmp_path / "bad", progress=False)
