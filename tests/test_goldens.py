"""Goldens: `bvl parity --record` writes what transformers computed; `--against` checks our model with it and no
PyTorch (a subprocess where importing torch fails), giving the live run's report; goldens of other weights, dtype,
batch or a broken file are refused naming what differs."""

import json
import subprocess
import sys

import pytest

from big_vision_lite.cli import main
from big_vision_lite.parity import run_parity
from big_vision_lite.parity.golden import GoldenError

# A process in which torch and transformers cannot be imported, as on a machine without them (an import hook: a
# None in sys.modules would also make einops believe torch is loaded).
NO_TORCH = ("import sys\n"
            "class NoTorch:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('torch', 'transformers'):\n"
            "            raise ImportError(f'{name} is not installed here')\n"
            "sys.meta_path.insert(0, NoTorch())\n")


@pytest.fixture(scope="module")
def recorded(tiny_checkpoints, tmp_path_factory):
    golden = tmp_path_factory.mktemp("golden") / "gemma3.safetensors"
    live = run_parity(str(tiny_checkpoints["gemma3"]), record=golden, greedy_tokens=8)
    return tiny_checkpoints["gemma3"], golden, live


def _errors(report) -> list[tuple[str, float, float]]:
    return [(layer.name, layer.max_abs_err, layer.rel_err) for layer in report.layers]


def test_against_gives_the_live_report_without_torch(recorded, tmp_path):
    model, golden, live = recorded
    replayed = run_parity(str(model), against=golden, greedy_tokens=8)
    assert _errors(replayed) == _errors(live) and replayed.greedy_ref == live.greedy_ref and replayed.ok
    assert any("reference: golden gemma3.safetensors (transformers" in note for note in replayed.notes)
    # The CLI in a process where torch and transformers cannot be imported: same verdict, same JSON contract.
    out = tmp_path / "report.json"
    code = (f"{NO_TORCH}from big_vision_lite.cli import main\n"
            f"sys.exit(main(['parity', {str(model)!r}, '--against', {str(golden)!r}, '--json', {str(out)!r}]))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert run.returncode == 2 and "greedy_tokens" in run.stderr  # the CLI records with its default options
    live_cli = tmp_path / "cli.safetensors"
    assert main(["parity", str(model), "--record", str(live_cli)]) == 0
    code = code.replace(str(golden), str(live_cli))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["ok"] and report["greedy_match"] is True and "logits" in run.stdout
    check = subprocess.run([sys.executable, "-c", f"{NO_TORCH}import torch"], capture_output=True, text=True)
    assert "torch is not installed here" in check.stderr  # the hook does block torch


def test_a_bfloat16_golden_carries_its_truth(tiny_checkpoints, tmp_path):
    """A bfloat16 golden holds transformers' float32 truth too, so the replay gives the same truth verdict."""
    golden = tmp_path / "bf16.safetensors"
    live = run_parity(str(tiny_checkpoints["gemma2"]), "bfloat16", record=golden, greedy_tokens=4)
    replayed = run_parity(str(tiny_checkpoints["gemma2"]), "bfloat16", against=golden, greedy_tokens=4)
    assert live.truth and replayed.truth == live.truth and replayed.truth_dtype == "float32"
    assert replayed.ok == live.ok and _errors(replayed) == _errors(live)
    assert replayed.greedy_margins_ref == live.greedy_margins_ref


def test_goldens_of_something_else_are_refused(recorded, tiny_checkpoints, tmp_path, capsys):
    model, golden, _ = recorded
    with pytest.raises(GoldenError, match=r"recorded for something else: dtype 'float32' recorded, 'bfloat16' now"):
        run_parity(str(model), "bfloat16", against=golden, greedy_tokens=8)
    with pytest.raises(GoldenError, match=r"other weights \(config.json, model.safetensors"):
        run_parity(str(tiny_checkpoints["gemma2"]), against=golden, greedy_tokens=8)
    with pytest.raises(GoldenError, match=r"options .*'greedy_tokens': 8.* recorded, .*'seq_len': 40"):
        run_parity(str(model), against=golden, greedy_tokens=8, seq_len=40)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(golden.read_bytes()[:1000])
    assert main(["parity", str(model), "--against", str(truncated)]) == 2
    assert f"--against {truncated}: not a readable golden file" in capsys.readouterr().err
    assert main(["parity", str(model), "--against", str(model / "model.safetensors")]) == 2
    assert "without 'bvl_golden' metadata" in capsys.readouterr().err
    assert main(["parity", str(model), "--against", str(tmp_path / "none.safetensors")]) == 2
    assert "no such golden file" in capsys.readouterr().err
    assert main(["parity", str(model), "--record", str(tmp_path)]) == 2  # a folder: refused before the run
    assert "--record" in capsys.readouterr().err
