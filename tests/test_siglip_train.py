"""SigLIP training end to end on the shared loop: the CLI, exact gradient accumulation, 8 simulated devices equal to
one, kill -9 and resume, real image folders with unreadable images, retrieval scoring."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from big_vision_lite.cli import main
from big_vision_lite.data.shapes import ShapesSpec, shapes_batch
from big_vision_lite.train.config import apply_overrides, load_config
from big_vision_lite.train.loop import RESULT_FILE
from big_vision_lite.train.metrics import METRICS_FILE, read_metrics
from big_vision_lite.train.sharding import make_mesh, shard_batch
from big_vision_lite.train.tasks.siglip import SiglipTask, retrieval_top1

SMOKE = "siglip_shapes:smoke"


def _bvl(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "big_vision_lite.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_cli_smoke_run_writes_everything(tmp_path, capsys):
    workdir = tmp_path / "w"
    assert main(["train", SMOKE, "--workdir", str(workdir), "--set", "total_steps=4"]) == 0
    out = capsys.readouterr().out
    assert "trained 4 steps" in out and "eval/i2t_top1" in out and "skipped images: 0" in out
    records = read_metrics(workdir / METRICS_FILE)
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [2, 4]
    for r in train_records:
        assert {"step", "loss", "lr", "examples_per_s", "logits/pos_mean", "logits/neg_max", "t", "b"} <= set(r)
        assert r["logits/pos_min"] <= r["logits/pos_mean"] <= r["logits/pos_max"]
    evals = [r for r in records if "eval/i2t_top1" in r]
    assert [r["step"] for r in evals] == [3, 4] and all(0 <= r["eval/t2i_top1"] <= 1 for r in evals)
    assert (workdir / "curves.png").stat().st_size > 1000
    assert (workdir / "tokenizer" / "tokenizer.model").is_file()
    assert json.loads((workdir / RESULT_FILE).read_text())["final_step"] == 4


def test_unknown_set_key_names_the_closest(tmp_path, capsys):
    assert main(["train", SMOKE, "--workdir", str(tmp_path), "--set", "optimizer.lrate=1"]) == 2
    assert "optimizer.lrate: unknown config key; did you mean optimizer.lr" in capsys.readouterr().err


def _task(tmp_path, *overrides) -> SiglipTask:
    config = apply_overrides(load_config(SMOKE), list(overrides))
    return SiglipTask(config, tmp_path, make_mesh())


def test_gradient_accumulation_is_exact(tmp_path):
    task = _task(tmp_path)
    params = jax.jit(task.init_params)(jax.random.PRNGKey(0))
    batch = shard_batch(next(task.batches(0)), task.mesh)
    loss_1, metrics_1, grads_1 = jax.jit(task.train_grads)(params, batch, jax.random.PRNGKey(1))
    task_4 = _task(tmp_path, "accum_steps=4")
    loss_4, metrics_4, grads_4 = jax.jit(task_4.train_grads)(params, batch, jax.random.PRNGKey(1))
    np.testing.assert_allclose(loss_4, loss_1, rtol=1e-6)
    np.testing.assert_allclose(metrics_4["logits/pos_mean"], metrics_1["logits/pos_mean"], rtol=1e-5)
    for path, g1 in jax.tree_util.tree_leaves_with_path(grads_1):
        g4 = dict(jax.tree_util.tree_leaves_with_path(grads_4))[path]
        np.testing.assert_allclose(g4, g1, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    assert float(np.abs(grads_1["t"]).max()) > 0 and float(np.abs(grads_1["b"]).max()) > 0


_DUMP_PARAMS = """
import sys, numpy as np, jax
from big_vision_lite.train.config import apply_overrides, load_config
from big_vision_lite.train.loop import train
from big_vision_lite.train.checkpoint import Checkpointer
import orbax.checkpoint as ocp
config = apply_overrides(load_config(sys.argv[1]), sys.argv[4:])
train(config, sys.argv[2], progress=False)
ckpt = Checkpointer(sys.argv[2], every=1, keep=5)
state = ckpt.manager.restore(ckpt.steps()[-1], args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
flat = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(state["params"])}
np.savez(sys.argv[3], devices=len(jax.devices()), **flat)
"""


def test_eight_devices_equal_one(tmp_path):
    """Two steps on a 4 (data) x 2 (fsdp) mesh with FSDP-sharded params and the ring loss equal two steps on one
    device with the dense loss."""
    script = tmp_path / "dump.py"
    script.write_text(_DUMP_PARAMS)
    common = ["total_steps=2", "eval_every=100", "ckpt_every=2", "optimizer.warmup_steps=0"]
    env8 = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    runs = {
        "one": (dict(os.environ, JAX_PLATFORMS="cpu"), common),
        "eight": (env8, [*common, "mesh.data=4", "mesh.fsdp=2", "loss.impl='ring'"]),
    }
    procs = {name: subprocess.Popen([sys.executable, str(script), SMOKE, str(tmp_path / name),
                                     str(tmp_path / f"{name}.npz"), *sets], env=env, stderr=subprocess.PIPE,
                                    text=True) for name, (env, sets) in runs.items()}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name}: {err[-3000:]}"
    one, eight = np.load(tmp_path / "one.npz"), np.load(tmp_path / "eight.npz")
    assert int(one["devices"]) == 1 and int(eight["devices"]) == 8
    keys = [k for k in one.files if k != "devices"]
    assert keys == [k for k in eight.files if k != "devices"]
    for key in keys:
        if key.endswith("['key']['bias']"):
            # A key bias adds the same q.b to every logit of a query and softmax ignores that: its exact gradient is
            # zero, so what it gets is rounding noise, which Adam normalises into full-size steps of random sign.
            continue
        np.testing.assert_allclose(eight[key], one[key], rtol=2e-4, atol=2e-6, err_msg=key)


def test_kill_9_then_same_command_resumes(tmp_path):
    workdir = tmp_path / "w"
    args = ["train", SMOKE, "--workdir", str(workdir), "--set", "total_steps=400", "--set", "ckpt_every=10",
            "--set", "eval_every=1000", "--set", "log_every=10"]
    proc = _bvl(*args)
    checkpoints = workdir / "checkpoints"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if checkpoints.is_dir() and any(p.name.isdigit() and int(p.name) >= 20 for p in checkpoints.iterdir()):
            break
        time.sleep(0.2)
    assert proc.poll() is None, f"finished before it could be killed: {proc.communicate()[1][-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    proc = _bvl(*args)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    result = json.loads((workdir / RESULT_FILE).read_text())
    assert result["start_step"] >= killed_at >= 20 and result["final_step"] == 400
    assert f"resumed from step {result['start_step']}" in out
    steps = [r["step"] for r in read_metrics(workdir / METRICS_FILE) if "loss" in r]
    assert steps == list(range(10, 401, 10))  # no step logged twice, none lost


def test_image_folder_with_unreadable_images(tmp_path, capsys):
    """Real data on disk (JSONL + PNG): a corrupt and a missing image are skipped and counted, never a crash."""
    spec = ShapesSpec()
    for split, count in (("train", 40), ("test", 16)):
        folder = tmp_path / split
        folder.mkdir()
        lines = []
        for i, example in enumerate(shapes_batch(spec, split, range(count))):
            Image.fromarray(example["image"]).save(folder / f"{i}.png")
            lines.append(json.dumps({"image": f"{i}.png", "caption": example["caption"]}))
        if split == "train":
            (folder / "0.png").write_bytes(b"not a png")
            (folder / "1.png").unlink()
        (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    workdir = tmp_path / "w"
    assert main(["train", SMOKE, "--workdir", str(workdir), "--set", "data.name=folder", "--set",
                 f"data.path={tmp_path / 'train' / 'captions.jsonl'}", "--set",
                 f"data.eval_path={tmp_path / 'test' / 'captions.jsonl'}", "--set", "total_steps=5"]) == 0
    out = capsys.readouterr().out
    skipped = int(out.rsplit("skipped images: ", 1)[1].split()[0])
    assert skipped >= 2  # 80 examples read over 2 epochs: each bad image counted once per read


def test_retrieval_top1_counts_duplicates_and_distractors():
    eye = np.eye(4, dtype=np.float32)
    # i2t: image 0 retrieves caption 1, whose text equals its own ("a"): correct; image 2 retrieves "c": wrong.
    # t2i: caption 1 retrieves image 0 (also "a"): correct; captions 2 and 3 retrieve images of other captions.
    result = retrieval_top1(eye[[1, 1, 3, 3]], eye, ["a", "a", "b", "c"])
    assert result == {"eval/i2t_top1": 0.75, "eval/t2i_top1": 0.5}
    # a distractor caption closer to image 0 than its own, and a distractor image closer to caption 1 than its own
    distractor = (2 * eye[[1]], eye[[0]], ["z"])
    result = retrieval_top1(eye, 0.5 * eye, ["a", "b", "c", "d"], distractors=distractor)
    assert result["eval/i2t_top1"] == 0.75 and result["eval/t2i_top1"] == 0.75


def test_truncated_captions_warn(tmp_path):
    with pytest.warns(UserWarning, match=r"captions are longer than text.max_len=4 tokens"):
        _task(tmp_path, "text.max_len=4")
