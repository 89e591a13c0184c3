"""Fault injection: every command given bad values and broken files, and training runs hit by kills, corrupt and
unreadable checkpoints, a full disk and NaN. Each bad input must end in exit status 2 (1 for a check that ran and
failed) with one line naming the option or file at fault and no traceback; each fault must leave every checkpoint
that was complete and every metrics line on disk. The tally is printed at the end of the run:
`bad inputs tried: N, tracebacks: 0, files lost: 0`.

Tests run as root, so permission faults are made with a directory or a FIFO where a file is expected, and I/O
errors and a full disk are injected (monkeypatched) where the code reads or writes.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image
from test_train import ToyTask, _params, toy_config

from big_vision_lite.checkpoints.run import CHECKPOINT_DIR, CheckpointReadError, load_params
from big_vision_lite.cli import main
from big_vision_lite.train.checkpoint import CORRUPT_DIR
from big_vision_lite.train.loop import NonFiniteLossError, train
from big_vision_lite.train.metrics import METRICS_FILE, SUPERSEDED_FILE, read_metrics
from big_vision_lite.train.tasks import TASKS
from big_vision_lite.utils import atomic
from big_vision_lite.utils.locks import FolderInUseError, folder_lock

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def toy_task(monkeypatch):
    monkeypatch.setitem(TASKS, "toy", ToyTask)


def _leftovers(root: Path) -> list[Path]:
    """Temporary files a writer left behind: what a half-done write looks like."""
    return [p for p in root.rglob("*") if ".tmp" in p.name or p.name.startswith(".bvl-write-check-")]


@pytest.fixture
def refused(capsys, tmp_path, fault_tally):
    """`refused(argv, *named, status=2)`: runs `bvl argv` in-process and checks the answer to a bad input."""
    def check(argv: list[str], *named: str, status: int = 2) -> str:
        fault_tally["bad inputs tried"] += 1
        rc = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        if "Traceback" in out + err:
            fault_tally["tracebacks"] += 1
        assert "Traceback" not in out + err, err
        assert rc == status, (argv, rc, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1, f"{argv}: expected one line, got {err!r}"
        for name in named:
            assert name in lines[0], f"{argv}: {name!r} not named in {lines[0]!r}"
        assert not _leftovers(tmp_path), _leftovers(tmp_path)
        return lines[0]
    return check


@pytest.fixture
def files(tmp_path):
    """Broken files of every kind a user may hand over."""
    f = {"dir": tmp_path / "a_dir", "missing": tmp_path / "missing.txt", "fifo": tmp_path / "a_fifo",
         "latin1": tmp_path / "latin1.txt", "empty": tmp_path / "empty.txt", "file": tmp_path / "a_file"}
    f["dir"].mkdir()
    os.mkfifo(f["fifo"])
    f["latin1"].write_bytes("first line\ncaf\xe9 au lait\n".encode("latin-1"))
    f["empty"].write_text("\n\n")
    f["file"].write_text("not a folder")
    return f


# -------------------------------------------------------------------------------------------- generate


def test_generate_refuses_bad_values_before_loading(refused, files):
    model = files["missing"]  # never loaded: every value is checked first
    for argv, named in [
        (["--max-new-tokens", "-5"], "--max-new-tokens"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--max-new-tokens", "ten"], "--max-new-tokens"),
        (["--temperature", "-1"], "--temperature"),
        (["--temperature", "nan"], "--temperature"),
        (["--top-k", "0", "--temperature", "1"], "--top-k"),
        (["--top-p", "1.5", "--temperature", "1"], "--top-p"),
        (["--top-p", "0", "--temperature", "1"], "--top-p"),
        (["--top-k", "5"], "top_k"),  # temperature 0 is greedy: refused, never ignored
        (["--top-p", "0.9"], "top_p"),
        (["--dtype", "float16"], "--dtype"),
        (["--seed", "x"], "--seed"),
        (["--seed", "1" + "0" * 30], "--seed"),
        (["--temperature", "inf"], "--temperature"),
    ]:
        refused(["generate", model, "--prompt", "hi", *argv], named)
    refused(["generate", model], "--prompt")
    refused(["generate", model, "--prompt-file", files["dir"]], "--prompt-file", "is a directory")
    refused(["generate", model, "--prompt-file", files["missing"]], "--prompt-file", "does not exist")
    refused(["generate", model, "--prompt-file", files["latin1"]], "--prompt-file", "line 2 is not UTF-8")
    refused(["generate", model, "--prompt-file", files["empty"]], "--prompt-file", "holds no prompt")
    refused(["generate", model, "--prompt-file", files["fifo"]], "--prompt-file", "not a regular file")


def test_generate_refuses_bad_models_and_images(refused, files, tmp_path, tiny_with_tokenizer):
    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{not json")
    latin1_json = tmp_path / "latin1_json"
    latin1_json.mkdir()
    (latin1_json / "config.json").write_bytes(b'{"model_type": "gemma\xe9"}')
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for f in tiny_with_tokenizer.iterdir():
        (truncated / f.name).write_bytes(f.read_bytes()[:100] if f.suffix == ".safetensors" else f.read_bytes())
    refused(["generate", bad_json, "--prompt", "hi"], str(bad_json / "config.json"), "invalid JSON")
    refused(["generate", latin1_json, "--prompt", "hi"], str(latin1_json / "config.json"), "not UTF-8")
    refused(["generate", truncated, "--prompt", "hi"], str(truncated))
    refused(["generate", files["missing"], "--prompt", "hi"], str(files["missing"]))
    refused(["generate", files["file"], "--prompt", "hi"], str(files["file"]))
    # Prompt + new tokens past the model's context (the tiny model's max_position_embeddings is 256).
    refused(["generate", tiny_with_tokenizer, "--prompt", "to be", "--max-new-tokens", "300"],
            "maximum context of 256", "--max-new-tokens")
    # Images: a decompression bomb (header of 400 M pixels, a few KB on disk), a folder, a missing file, text.
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20_000, 20_000)).save(bomb)
    for image in (bomb, files["dir"], files["fifo"], files["missing"], files["latin1"]):
        refused(["generate", tiny_with_tokenizer, "--image", image, "--prompt", "caption"], f"image {image}")


def test_generate_refuses_broken_weight_files(refused, tmp_path, tiny_with_tokenizer):
    """Empty, foreign-format and wrong-shaped safetensors: each refused naming the file (and the tensor)."""
    from safetensors.numpy import load_file, save_file

    weights = next(tiny_with_tokenizer.glob("*.safetensors"))

    def broken(name: str, write) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        for f in tiny_with_tokenizer.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        write(folder / weights.name)
        return folder

    empty = broken("empty", lambda path: path.write_bytes(b""))
    png = broken("png", lambda path: Image.new("RGB", (4, 4)).save(path, format="PNG"))
    tensors = load_file(weights)
    name = "model.embed_tokens.weight"
    assert name in tensors, sorted(tensors)
    shapes = broken("shapes", lambda path: save_file({**tensors, name: tensors[name][:, :-1].copy()}, path))
    for folder in (empty, png):
        refused(["generate", folder, "--prompt", "hi"], str(folder / weights.name))
    refused(["generate", shapes, "--prompt", "hi"], name)


def test_unreadable_files_are_named(refused, files, monkeypatch):
    """A permission fault (injected: the suite runs as root) on a prompt file and on a config file."""
    real_read_bytes = Path.read_bytes

    def denied(self):
        if self.name.startswith("secret"):
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    secret = files["dir"] / "secret.txt"
    secret.write_text("a prompt\n")
    refused(["generate", files["missing"], "--prompt-file", secret], "Permission denied", str(secret))


def test_demo_and_kv_eviction_refuse_bad_values(refused, files, tiny_with_tokenizer):
    refused(["demo", "--siglip", "huge"], "--siglip")
    refused(["demo", "--model", files["missing"]], str(files["missing"]))
    refused(["bench", "kv-eviction", tiny_with_tokenizer, "--policies", "lru"], "--policies", "lru")
    refused(["bench", "kv-eviction", tiny_with_tokenizer, "--text-file", files["latin1"]], "--text-file",
            "line 2 is not UTF-8")
    refused(["bench", "kv-eviction", tiny_with_tokenizer, "--text-file", files["dir"]], "--text-file",
            "is a directory")


def test_generate_refuses_a_tokenizer_that_cannot_pad(refused, tmp_path, tiny_with_tokenizer):
    folder = tmp_path / "no_pad"
    folder.mkdir()
    for f in tiny_with_tokenizer.iterdir():
        if f.name != "generation_config.json":  # it lists an eos id
            (folder / f.name).write_bytes(f.read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>"}))
    config = json.loads((folder / "config.json").read_text())
    config.update(pad_token_id=None, eos_token_id=None)
    (folder / "config.json").write_text(json.dumps(config))
    refused(["generate", folder, "--prompt", "to be"], "neither a pad nor an eos token")


# -------------------------------------------------------------------------------------------- parity, inspect


def test_parity_and_inspect_refuse_bad_values_and_output_paths(refused, files, tmp_path, tiny_checkpoints):
    model = tiny_checkpoints["gemma3"]
    for argv, named in [(["--seq-len", "0"], "--seq-len"), (["--tolerance", "-1"], "--tolerance"),
                        (["--tolerance", "nan"], "--tolerance"), (["--json", files["dir"]], "--json"),
                        (["--json", files["file"] / "out.json"], "is a file, not a folder"),
                        (["--json", files["fifo"]], "--json")]:
        refused(["parity", model, *argv], named)
    refused(["parity", files["missing"]], str(files["missing"]))
    for argv, named in [(["--p", "0"], "--p"), (["--p", "1.5"], "--p"), (["--look-back", "0"], "--look-back"),
                        (["--num-sinks", "0"], "--num-sinks"), (["--similarity", "2"], "--similarity"),
                        (["--layers", "-1"], "--layers"), (["--max-new-tokens", "-5"], "--max-new-tokens"),
                        (["--out", files["file"]], "--out"), (["--out", files["file"] / "sub"], "--out")]:
        refused(["inspect", model, "--prompt", "hi", "--out", tmp_path / "out", *argv], named)
    refused(["inspect", model, "--out", tmp_path / "out"], "--prompt")
    assert files["file"].read_text() == "not a folder"  # nothing was written over it


def test_convert_refuses_bad_destinations_and_sources(refused, files, tmp_path, tiny_checkpoints):
    model = tiny_checkpoints["gemma3"]
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    refused(["convert", model, existing], f"destination {existing} exists", "--overwrite")
    refused(["convert", model, model, "--overwrite"], "is the source itself")
    refused(["convert", model, tmp_path / "x.npz", "--to", "npz"], "is a decoder model", "--to hf")
    refused(["convert", model, files["file"] / "out"], "destination", "is a file, not a folder")
    refused(["convert", model, tmp_path / "out", "--to", "onnx"], "--to")
    refused(["convert", model, tmp_path / "out", "--json", files["dir"]], "--json")
    refused(["convert", files["missing"], tmp_path / "out"], str(files["missing"]))
    refused(["convert", files["latin1"], tmp_path / "out"], str(files["latin1"]))
    refused(["convert", model, tmp_path / "out", "--lora", "adapter"], "no LoRA adapters")
    refused(["convert", model, tmp_path / "out.npz", "--to", "npz", "--lora", "adapter"], "no place for adapters")
    refused(["convert", model, tmp_path / "out", "--config", files["file"]], "--config")
    assert (existing / "keep.txt").read_text() == "mine" and not (tmp_path / "out").exists()


def test_parity_refuses_goldens_it_cannot_use(refused, tmp_path, tiny_checkpoints):
    model = tiny_checkpoints["gemma3"]
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((model / "model.safetensors").read_bytes()[:100])
    refused(["parity", model, "--against", truncated], str(truncated), "not a readable golden")
    refused(["parity", model, "--against", model / "model.safetensors"], "not a golden written by")
    refused(["parity", model, "--against", tmp_path / "none.safetensors"], "no such golden file")
    refused(["parity", model, "--record", tmp_path], "--record")


# -------------------------------------------------------------------------------------------- train, bench


def test_train_refuses_bad_configs_overrides_and_workdirs(refused, files, tmp_path):
    workdir = tmp_path / "run"
    smoke = ["train", "siglip_shapes:smoke", "--workdir", workdir]
    for override, named in [("accum_steps=0", "accum_steps"), ("accum_steps=5", "accum_steps"),
                            ("total_steps=True", "total_steps"), ("total_steps=0", "total_steps"),
                            ("batch_size=-16", "batch_size"), ("optimizer.lr=fast", "optimizer.lr"),
                            ("optimizer.lrr=1", "optimizer.lrr"), ("total_steps", "expected key=value"),
                            ("data.name='nope'", "data.name"), ("seed=9223372036854775808", "config.seed"),
                            ("total_steps=99999999999999999999", "config.total_steps"),
                            ("batch_size={[1]: 2}", "batch_size")]:
        refused([*smoke, "--set", override], named)
    refused(["train", "siglip_shapes:smoke", "--workdir", files["file"]], "--workdir", "is a file")
    refused(["train", "siglip_shapes:smoke", "--workdir", files["file"] / "sub"], "--workdir")
    refused(["train", "no_such_config", "--workdir", workdir], "unknown config 'no_such_config'")
    refused(["train", "siglip_shapes:smok", "--workdir", workdir], "got :smok")
    refused(["train", "paligemma_shapes_caption:full", "--workdir", workdir], "got :full")
    refused(["train", tmp_path / "missing.py", "--workdir", workdir], "missing.py does not exist")
    refused(["train", files["dir"], "--workdir", workdir], str(files["dir"]), "is a directory")
    refused(["train", files["fifo"], "--workdir", workdir], str(files["fifo"]), "FIFO")
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(arg=None):\n    return {\n")
    refused(["train", broken, "--workdir", workdir], f"{broken}:2", "not valid Python")
    latin1 = tmp_path / "latin1.py"
    latin1.write_bytes(b"# caf\xe9\ndef get_config(arg=None):\n    return None\n")
    refused(["train", latin1, "--workdir", workdir], str(latin1))
    raising = tmp_path / "raising.py"
    raising.write_text("def get_config(arg=None):\n    raise KeyError('oops')\n")
    refused(["train", raising, "--workdir", workdir], str(raising), "KeyError")
    # Captions that are not UTF-8: the file and the line are named.
    captions = tmp_path / "captions.jsonl"
    captions.write_bytes(b'{"image": "a.png", "caption": "ok"}\n{"image": "b.png", "caption": "caf\xe9"}\n')
    refused([*smoke, "--set", "data.name=folder", "--set", f"data.path={captions}", "--set",
             f"data.eval_path={captions}"], str(captions), "line 2 is not UTF-8")
    assert not (workdir / CHECKPOINT_DIR).exists()  # no refused run left a checkpoint


def _lock_holder(folder: Path, seconds: float) -> subprocess.Popen:
    """Another process holding `folder`'s lock for `seconds`; returns once it holds it (it prints "releasing" as
    it lets go)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import time
            from big_vision_lite.utils.locks import folder_lock
            with folder_lock({str(folder)!r}):
                print("locked", flush=True)
                time.sleep({seconds})
                print("releasing", flush=True)
        """)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_train_refuses_a_workdir_in_use_and_a_killed_holder_leaves_no_stale_lock(refused, tmp_path):
    workdir = tmp_path / "run"
    holder = _lock_holder(workdir, 600)
    try:
        refused(["train", "siglip_shapes:smoke", "--workdir", workdir], f"is in use by process {holder.pid}")
        with pytest.raises(FolderInUseError, match=str(holder.pid)):
            train(toy_config(), workdir, progress=False)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with folder_lock(workdir):  # the kernel released the killed holder's lock: nothing stuck
        pass


def test_a_required_run_waits_for_its_holder_then_proceeds(tmp_path):
    """Two runs that need the same shared run: the second waits for the lock instead of training it again."""
    shared = tmp_path / "shared"
    holder = _lock_holder(shared, 2)
    started = time.monotonic()
    with folder_lock(shared, what="required run", wait=True):
        waited = time.monotonic() - started
    holder.wait()
    assert waited > 1.5, waited  # the holder kept it for 2 s after saying "locked"
    assert holder.stdout.read().strip() == "releasing"


def test_a_run_that_requires_its_own_workdir_is_refused_not_deadlocked(refused, tmp_path):
    workdir = tmp_path / "run"
    refused(["train", "paligemma_shapes_caption:smoke", "--workdir", workdir, "--set",
             f"init.siglip_workdir={workdir}"], "already in use by this very run")
    with folder_lock(workdir), pytest.raises(FolderInUseError, match="this very run"), folder_lock(workdir, wait=True):
        pass


def test_bench_checks_output_paths_before_running(refused, files):
    # Refused at once: none of these benchmarks starts (each would run for minutes before writing).
    refused(["bench", "siglip-loss", "--json", files["dir"]], "--json", "is a directory")
    refused(["bench", "siglip-train", "--json", files["file"] / "x.json"], "--json")
    refused(["bench", "decode", "gemma3-270m", "--json", files["fifo"]], "--json")
    refused(["bench", "kv-eviction", "gemma3-270m", "--plot", files["dir"]], "--plot")
    refused(["bench", "kv-eviction", "gemma3-270m", "--budgets", "0"], "--budgets")
    refused(["bench", "kv-eviction", "gemma3-270m", "--max-tokens", "0"], "--max-tokens")
    refused(["bench", "forward", "gemma3-270m", "--seq-len", "-1"], "--seq-len")
    refused(["bench", "nope"], "nope")


# -------------------------------------------------------------------------------------------- training faults


def _history(workdir: Path) -> tuple[list[dict], list[int]]:
    """(every metrics record on disk, main file and superseded side file, and the complete checkpoint steps)."""
    records = read_metrics(workdir / METRICS_FILE) + read_metrics(workdir / SUPERSEDED_FILE)
    records = [{k: v for k, v in r.items() if k != "superseded_at"} for r in records]
    steps = sorted(int(p.name) for p in (workdir / CHECKPOINT_DIR).iterdir() if p.name.isdigit())
    return records, steps


def _lost(before: list[dict], after: list[dict]) -> int:
    """Records of `before` no longer on disk."""
    return sum(1 for r in before if r not in after)


def test_sigkill_during_a_checkpoint_write_resumes_from_the_last_complete_one(tmp_path, fault_tally):
    """A deterministic kill: the process SIGKILLs itself when orbax is about to commit checkpoint 8 (every file
    written, not yet renamed into place). The same command then resumes from 4 and ends as an uninterrupted run."""
    workdir = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO / "tests")!r})
        from orbax.checkpoint._src.path import atomicity
        from test_train import ToyTask, toy_config
        from big_vision_lite.train.loop import train
        from big_vision_lite.train.tasks import TASKS

        TASKS["toy"] = ToyTask
        original = atomicity.AtomicRenameTemporaryPath.finalize

        async def finalize(self, *args, **kwargs):
            if self._final_path.name == "8":
                os.kill(os.getpid(), signal.SIGKILL)
            return await original(self, *args, **kwargs)

        atomicity.AtomicRenameTemporaryPath.finalize = finalize
        train(toy_config(), {str(workdir)!r}, progress=False)
    """)
    killed = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    before, steps = _history(workdir)
    # Orbax commits a checkpoint in the background, so the killed run may have logged steps past 8.
    assert steps == [4] and [r["step"] for r in before if "loss" in r][:4] == [2, 4, 6, 8]
    resumed = train(toy_config(), workdir, progress=False)
    assert resumed.start_step == 4 and resumed.final_step == 12
    after, steps = _history(workdir)
    fault_tally["files lost"] += _lost(before, after)
    assert _lost(before, after) == 0  # steps 6 and 8 of the killed run are in the superseded file
    assert [r["superseded_at"] for r in read_metrics(workdir / SUPERSEDED_FILE)] == [4] * sum(
        r["step"] > 4 for r in before)
    assert [r["step"] for r in read_metrics(workdir / METRICS_FILE) if "loss" in r] == [2, 4, 6, 8, 10, 12]
    assert not list((workdir / CHECKPOINT_DIR).glob("*tmp*"))  # the half-written checkpoint was cleaned up
    straight = tmp_path / "straight"
    train(toy_config(), straight, progress=False)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), _params(straight),
                 _params(workdir))


def test_a_corrupt_latest_checkpoint_is_set_aside_and_no_metrics_line_is_lost(tmp_path, fault_tally):
    train(toy_config(), tmp_path, stop_at=10, progress=False)  # checkpoints 4, 8 (and 10, kept 2: 8, 10)
    for f in (tmp_path / CHECKPOINT_DIR / "10" / "state").rglob("*"):
        if f.is_file() and f.name != "commit_success.txt":
            f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])  # truncated
    before, _ = _history(tmp_path)
    with pytest.warns(UserWarning, match="cannot be restored"):
        result = train(toy_config(), tmp_path, progress=False)
    assert result.start_step == 8
    assert (tmp_path / CORRUPT_DIR / "10").is_dir()
    after, _ = _history(tmp_path)
    fault_tally["files lost"] += _lost(before, after)
    assert _lost(before, after) == 0


def test_a_read_error_moves_nothing_and_loses_nothing(tmp_path, monkeypatch, fault_tally, refused):
    train(toy_config(), tmp_path, stop_at=8, progress=False)
    before, steps_before = _history(tmp_path)
    config_before = (tmp_path / "config.json").read_bytes()

    # What a read fault looks like from orbax: an OSError, tensorstore's status errors (ValueError), XLA's OOM.
    faults = [OSError(errno.EIO, "Input/output error", str(tmp_path / CHECKPOINT_DIR / "8")),
              ValueError('PERMISSION_DENIED: Error opening "zarr" driver: [OS error 13: Permission denied]'),
              ValueError("UNAVAILABLE: Error reading local file: [OS error 5: Input/output error]"),
              RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1073741824 bytes.")]
    for fault in faults:
        def failing_restore(self, step, *args, fault=fault, **kwargs):
            raise fault

        monkeypatch.setattr(ocp.CheckpointManager, "restore", failing_restore)
        with pytest.raises(CheckpointReadError, match=r"does not prove it corrupt.*nothing was moved"):
            train(toy_config(), tmp_path, progress=False)
        with pytest.raises(CheckpointReadError, match="nothing was moved"):
            load_params(tmp_path)  # what `bvl generate RUN` and the PaliGemma warm start read
    after, steps_after = _history(tmp_path)
    fault_tally["files lost"] += _lost(before, after) + len(set(steps_before) - set(steps_after))
    assert steps_after == steps_before and after == before and not (tmp_path / CORRUPT_DIR).exists()
    assert (tmp_path / "config.json").read_bytes() == config_before


def test_load_params_falls_back_past_a_corrupt_checkpoint_without_moving_it(tmp_path):
    train(toy_config(), tmp_path, stop_at=8, progress=False)
    for f in (tmp_path / CHECKPOINT_DIR / "8" / "state").rglob("*"):
        if f.is_file() and f.name != "commit_success.txt":
            f.write_bytes(b"")
    with pytest.warns(UserWarning, match="checkpoints/8 cannot be restored.*reading the previous one"):
        step, params = load_params(tmp_path)
    assert step == 4 and params["dense"]["kernel"].shape == (8, 2)
    assert (tmp_path / CHECKPOINT_DIR / "8").is_dir()  # a reader moves nothing


def test_a_full_disk_stops_the_run_with_the_last_good_checkpoint(tmp_path, monkeypatch, fault_tally, capsys):
    """ENOSPC injected where a full disk surfaces: orbax's background commit of checkpoint 8. The run stops with
    one line; 4 stays the latest; the next run resumes from it."""
    from orbax.checkpoint._src.path import atomicity

    original = atomicity.AtomicRenameTemporaryPath.finalize

    async def full_disk(self, *args, **kwargs):
        if self._final_path.name == "8":
            raise OSError(errno.ENOSPC, "No space left on device", str(self._final_path))
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", full_disk)
    config = tmp_path / "toy.py"
    config.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO / "tests")!r})
        from test_train import toy_config

        def get_config(arg=None):
            return toy_config()
    """))
    fault_tally["bad inputs tried"] += 1
    assert main(["train", str(config), "--workdir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("bvl")]  # the rest is the progress bar
    assert "Traceback" not in err and len(errors) == 1 and "No space left on device" in errors[0], err
    before, steps = _history(tmp_path / "run")
    assert steps == [4]
    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", original)
    assert main(["train", str(config), "--workdir", str(tmp_path / "run")]) == 0
    after, steps = _history(tmp_path / "run")
    fault_tally["files lost"] += _lost(before, after)
    assert _lost(before, after) == 0 and steps == [8, 12]


def test_resuming_with_a_changed_config_is_refused_listing_the_changes(tmp_path, fault_tally):
    train(toy_config(), tmp_path, stop_at=4, progress=False)
    before, _ = _history(tmp_path)
    fault_tally["bad inputs tried"] += 1
    with pytest.raises(ValueError, match=r"batch_size: 8 -> 16; optimizer.lr: 0.2 -> 0.1\. .*--allow-config-change"):
        train(toy_config(batch_size=16, optimizer=dict(toy_config().optimizer, lr=0.1)), tmp_path, progress=False)
    # How often a run logs or checkpoints is not a change of the run.
    result = train(toy_config(log_every=4, keep_ckpts=3), tmp_path, stop_at=8, progress=False)
    assert result.start_step == 4 and not list(tmp_path.glob("config.until-step-*"))
    after, _ = _history(tmp_path)
    assert _lost(before, after) == 0
    # Allowed explicitly: the old config is kept beside the new one once a checkpoint of the new one exists.
    old_config = (tmp_path / "config.json").read_text()
    changed = toy_config(optimizer=dict(toy_config().optimizer, lr=0.1))
    with pytest.warns(UserWarning, match=r"changed config \(optimizer.lr: 0.2 -> 0.1\)"):
        train(changed, tmp_path, stop_at=12, progress=False, allow_config_change=True)
    assert (tmp_path / "config.until-step-8.json").read_text() == old_config
    assert json.loads((tmp_path / "config.json").read_text())["optimizer"]["lr"] == 0.1
    assert train(changed, tmp_path, progress=False).start_step == 12  # the new config is the run's now


def test_nan_stops_with_the_last_good_state_and_every_metrics_line(tmp_path, fault_tally):
    train(toy_config(), tmp_path, stop_at=4, progress=False)
    before, _ = _history(tmp_path)
    config = toy_config()
    config.optimizer.lr = 1e38
    with pytest.raises(NonFiniteLossError, match=r"loss is (nan|inf)"):
        train(config, tmp_path, progress=False, allow_config_change=True)
    after, steps = _history(tmp_path)
    fault_tally["files lost"] += _lost(before, after)
    assert _lost(before, after) == 0 and steps == [4]
    # No checkpoint of the changed config was saved, so the workdir still describes checkpoint 4's config.
    assert json.loads((tmp_path / "config.json").read_text())["optimizer"]["lr"] == 0.2
    assert not list(tmp_path.glob("config.until-step-*"))
    assert train(toy_config(), tmp_path, progress=False).final_step == 12  # the original command resumes


def test_when_every_checkpoint_is_corrupt_the_run_says_so_then_restarts_keeping_history(tmp_path, fault_tally):
    train(toy_config(), tmp_path, stop_at=8, progress=False)
    before, _ = _history(tmp_path)
    for f in (tmp_path / CHECKPOINT_DIR).rglob("manifest.ocdbt"):
        f.write_bytes(b"")
    with pytest.warns(UserWarning, match="cannot be restored"), pytest.raises(
            ValueError, match=r"every checkpoint .* \(steps \[4, 8\]\) proved corrupt.*run again to start"):
        train(toy_config(), tmp_path, progress=False)
    assert sorted(p.name for p in (tmp_path / CORRUPT_DIR).iterdir()) == ["4", "8"]
    assert train(toy_config(), tmp_path, progress=False).start_step == 0
    after, _ = _history(tmp_path)
    fault_tally["files lost"] += _lost(before, after)
    assert _lost(before, after) == 0


# -------------------------------------------------------------------------------------------- atomic writes


def test_atomic_writes_use_a_temporary_per_writer_and_sync_before_the_rename(tmp_path, monkeypatch):
    target = tmp_path / "result.json"
    payloads = [json.dumps({"writer": i, "data": "x" * 100_000}) for i in range(8)]
    failures = []

    def write(payload: str) -> None:
        try:
            for _ in range(10):
                atomic.write_text_atomic(target, payload)
        except Exception as error:  # a thread's exception would otherwise only be printed
            failures.append(error)

    threads = [threading.Thread(target=write, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    assert target.read_text() in payloads  # one writer's whole file, never a mix
    assert not _leftovers(tmp_path)

    events = []
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: events.append("fsync"))
    real_replace = os.replace
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b)))
    atomic.write_text_atomic(target, "new")
    assert events[:2] == ["fsync", "replace"] and events[2:] == ["fsync"]  # data, rename, then the folder


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "result.json"
    target.write_text("old")

    def full_disk(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(OSError, match="No space"):
        atomic.write_text_atomic(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old" and not _leftovers(tmp_path)
