"""`bvl train` as several processes of one jax.distributed program (`bvl launch`, gloo on the CPU, coordinator on
127.0.0.1): the same numbers as one process on the same mesh, a PaliGemma fine-tune, `kill -9` of one process and
its resume (with the same launch and with another process count), and the group's bad inputs."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from big_vision_lite.checkpoints.run import load_params
from big_vision_lite.data import ShapesSpec, make_eval_batches, make_train_loader, shapes_source
from big_vision_lite.launch import free_port
from big_vision_lite.train.config import load_config
from big_vision_lite.train.distributed import DistributedError, process_group
from big_vision_lite.train.loop import train
from big_vision_lite.train.metrics import read_metrics
from big_vision_lite.utils.trees import path_name

# 24 steps of the SigLIP smoke model, a checkpoint every 4: long enough to kill a process between checkpoints.
RUN = ["siglip_shapes:smoke", "--set", "total_steps=24", "--set", "ckpt_every=4", "--set", "eval_every=24",
       "--set", "log_every=1", "--set", "keep_ckpts=10"]
CLI = [sys.executable, "-m", "big_vision_lite.cli"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROC"))}
    return env | {"JAX_PLATFORMS": "cpu"} | extra


def _launch(workdir: Path, processes: int, devices: int, *extra: str, timeout: float = 600
            ) -> subprocess.CompletedProcess:
    command = [*CLI, "launch", "--processes", str(processes), "--devices-per-process", str(devices), "--",
               "train", *RUN, "--workdir", str(workdir), *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_env())


def _losses(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(workdir / "metrics.jsonl") if "loss" in r}


def _assert_same_run(workdir: Path, reference: Path) -> None:
    """Loss at every step within rtol 1e-6 and final parameters within rtol 2e-4 of the reference run, but for the
    keys' biases: their true gradient is zero (softmax ignores a constant added to every logit of a row), so the
    computed one is rounding noise, which the order of a sum across processes changes, and Adam's normalised steps
    turn any noise into steps of up to the learning rate (1e-3 at most, in warm-up here). Their values are noise in
    both runs, about 1e-4 after 24 steps: checked to stay below 1e-3, not compared."""
    losses, expected = _losses(workdir), _losses(reference)
    assert sorted(losses) == list(range(1, 25)) and sorted(expected) == list(range(1, 25))
    np.testing.assert_allclose([losses[s] for s in sorted(losses)], [expected[s] for s in sorted(expected)],
                               rtol=1e-6)
    step, params = load_params(workdir)
    ref_step, ref_params = load_params(reference)
    assert step == ref_step == 24
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(ref_params),
                                 strict=True):
        name = path_name(path)
        if name.endswith("key/bias"):
            assert np.abs(got).max() < 1e-3 and np.abs(want).max() < 1e-3, name
        else:
            np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-7, err_msg=name)


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory) -> Path:
    """The reference: one process with 8 devices (the same data x fsdp mesh the two processes form)."""
    workdir = tmp_path_factory.mktemp("one") / "run"
    run = subprocess.run([*CLI, "train", *RUN, "--workdir", str(workdir)], capture_output=True, text=True,
                         timeout=600, env=_env(JAX_NUM_CPU_DEVICES="8"))
    assert run.returncode == 0, run.stderr[-3000:]
    return workdir


def test_process_rows_of_a_batch_are_the_one_process_batch():
    """Global batch k is the same examples however many processes build it: the rows of each process, side by
    side, are the one-process batch (images and tokens)."""
    source = shapes_source(ShapesSpec(), "train")
    kwargs = dict(batch_size=8, image_size=16, tokenizer=None, max_len=8, seed=3, start_step=5, num_steps=7)
    with make_train_loader(source, **kwargs) as whole:
        batches = list(whole)
    parts = []
    for rows in ((0, 4), (4, 8)):
        with make_train_loader(source, **kwargs, rows=rows) as loader:
            parts.append(list(loader))
    for k, batch in enumerate(batches):
        np.testing.assert_array_equal(np.concatenate([p[k]["image"] for p in parts]), batch["image"])
        assert [c for p in parts for c in p[k]["caption"]] == list(batch["caption"])
    with pytest.raises(ValueError, match=r"rows \(4, 9\) must be a non-empty range within the batch of 8"):
        make_train_loader(source, **{**kwargs, "rows": (4, 9)})


def test_evaluation_shares_cover_every_batch_once():
    """Each process evaluates a contiguous share of the eval batches; together, in process order, every batch once
    (also when the process count does not divide them, or exceeds them)."""
    source = shapes_source(ShapesSpec(), "test")
    kwargs = dict(batch_size=64, image_size=8, tokenizer=None, max_len=8)
    with make_eval_batches(source, **kwargs) as loader:
        whole = np.concatenate([b["index"] for b in loader])
    for count in (2, 3, len(whole) // 64 + 2):
        shares = []
        for index in range(count):
            with make_eval_batches(source, **kwargs, share=(index, count)) as loader:
                shares += [b["index"] for b in loader]
        np.testing.assert_array_equal(np.concatenate(shares), whole)
    with pytest.raises(ValueError, match=r"share \(2, 2\): index must be in \[0, 1\]"):
        make_eval_batches(source, **kwargs, share=(2, 2))


def test_two_processes_killed_resume_and_equal_one_process(one_process_run, tmp_path):
    """2 processes x 4 devices: `kill -9` of process 1 mid-run ends the launch within 60 s with a line naming it;
    the same launch resumes from the last complete checkpoint; the finished run equals one process x 8 devices
    (not bitwise: the sums across processes run in another order). A copy of the killed run resumed by one
    process also finishes with the same result: a checkpoint does not depend on the process count."""
    workdir = tmp_path / "two"
    command = [*CLI, "launch", "--processes", "2", "--devices-per-process", "4", "--", "train", *RUN,
               "--workdir", str(workdir)]
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    checkpoints = workdir / "checkpoints"
    deadline = time.monotonic() + 300
    while not (checkpoints / "8").is_dir():
        assert launcher.poll() is None, launcher.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint 8 within 300 s"
        time.sleep(0.05)
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    assert len(children) == 2
    killed_at = time.monotonic()
    os.kill(int(children[1]), signal.SIGKILL)  # the second child started is process 1
    out, err = launcher.communicate(timeout=90)
    assert time.monotonic() - killed_at < 60
    assert launcher.returncode == 1
    assert "bvl launch: process 1 was killed by signal 9 (SIGKILL)" in err and "stopped the other 1 process" in err
    assert "[0] " in out and "[1] " in out
    done = [int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()]
    assert 8 <= max(done) < 24, done  # killed mid-run, after checkpoint 8
    shutil.copytree(workdir, tmp_path / "copy")

    resumed = _launch(workdir, 2, 4)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"(resumed from step {max(done)})" in resumed.stdout
    assert resumed.stdout.count("trained 24 steps") == 1  # process 0 alone reports, writes metrics and results
    result = json.loads((workdir / "result.json").read_text())
    assert result["start_step"] == max(done)
    _assert_same_run(workdir, one_process_run)
    # Each process retrieved with its share of the held-out embeddings, gathered: the one-process figures.
    expected = json.loads((one_process_run / "result.json").read_text())["final_eval"]
    assert result["final_eval"] == pytest.approx(expected, abs=1e-3)

    copy = tmp_path / "copy"
    alone = subprocess.run([*CLI, "train", *RUN, "--workdir", str(copy)], capture_output=True, text=True,
                           timeout=600, env=_env(JAX_NUM_CPU_DEVICES="8"))
    assert alone.returncode == 0, alone.stderr[-3000:]
    _assert_same_run(copy, one_process_run)


def test_paligemma_fine_tunes_as_two_processes(tmp_path):
    siglip = tmp_path / "siglip"
    train(load_config("siglip_shapes:smoke"), siglip, progress=False)
    workdir = tmp_path / "pg"
    run = subprocess.run([*CLI, "launch", "--processes", "2", "--devices-per-process", "2", "--", "train",
                          "paligemma_shapes_caption:smoke", "--workdir", str(workdir), "--set",
                          f"init.siglip_workdir={siglip}"], capture_output=True, text=True, timeout=600, env=_env())
    assert run.returncode == 0, run.stderr[-3000:]
    assert "[0] trained 4 steps" in run.stdout and "eval/caption_exact_match" in run.stdout
    records = read_metrics(workdir / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == sorted({r["step"] for r in records if "loss" in r})
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    assert load_params(workdir)[0] == 4


def test_bad_group_inputs_are_one_line_each(tmp_path):
    port = free_port()  # nothing listens on it
    started = time.monotonic()
    run = subprocess.run([*CLI, "train", *RUN, "--workdir", str(tmp_path / "a"), "--coordinator",
                          f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "1", "--init-timeout", "3"],
                         capture_output=True, text=True, timeout=120, env=_env())
    assert run.returncode == 2
    assert f"bvl: error: coordinator 127.0.0.1:{port} could not be reached within 3 s" in run.stderr
    assert time.monotonic() - started < 60

    for flags, message in [(["--num-processes", "2", "--process-id", "2", "--coordinator", "127.0.0.1:1234"],
                            "process id 2 is outside [0, 1] for 2 processes"),
                           (["--num-processes", "2"], "--coordinator, --num-processes and --process-id go together"),
                           (["--num-processes", "2", "--process-id", "0", "--coordinator", "localhost"],
                            "coordinator 'localhost' must be HOST:PORT")]:
        run = subprocess.run([*CLI, "train", *RUN, "--workdir", str(tmp_path / "b"), *flags], capture_output=True,
                             text=True, timeout=120, env=_env())
        assert run.returncode == 2 and message in run.stderr, run.stderr[-2000:]

    for extra, message in [(["--set", "batch_size=12"], "batch_size=12 must be a multiple of the 8 devices"),
                           (["--set", "mesh.data=16"], "mesh data=16 x fsdp=1 = 16 devices, but 8 are available")]:
        run = _launch(tmp_path / "c", 2, 4, *extra, timeout=300)
        assert run.returncode == 2, run.stderr[-2000:]
        assert message in run.stdout and "bvl launch: process" in run.stderr


def test_processes_that_disagree_on_their_number_are_refused(tmp_path):
    port = free_port()
    commands = [[*CLI, "train", *RUN, "--workdir", str(tmp_path / "w"), "--coordinator", f"127.0.0.1:{port}",
                 "--num-processes", str(count), "--process-id", str(index)] for index, count in ((0, 2), (1, 3))]
    runs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
            for c in commands]
    results = [(run.wait(timeout=120), run.communicate()[1]) for run in runs]
    assert all(status == 2 for status, _ in results), results
    assert all("the processes disagree on their number: told [2, 3]" in err for _, err in results)


def test_process_group_from_the_environment():
    assert process_group(environ={}) is None
    group = process_group(environ={"JAX_COORDINATOR_ADDRESS": "10.0.0.1:8476", "JAX_NUM_PROCESSES": "4",
                                   "JAX_PROCESS_ID": "3"})
    assert (group.coordinator, group.num_processes, group.process_id) == ("10.0.0.1:8476", 4, 3)
    slurm = process_group(environ={"SLURM_NTASKS": "8"})  # JAX fills in the rest from SLURM's variables
    assert (slurm.coordinator, slurm.num_processes, slurm.process_id) == (None, None, None)
    assert process_group(environ={"SLURM_NTASKS": "1"}) is None
    flags = process_group("h:1", 2, 0, environ={"JAX_COORDINATOR_ADDRESS": "x:2"})
    assert flags.coordinator == "h:1"  # the command line wins over the environment
    with pytest.raises(DistributedError, match="JAX_NUM_PROCESSES='two' must be an integer"):
        process_group(environ={"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two"})
