"""Notebooks run top to bottom, as a Colab user would run them."""

import ast
import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NAMES = ("parity", "siglip", "paligemma", "attention")


def read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


def code_cells(nb: nbformat.NotebookNode) -> list[str]:
    return [c.source for c in nb.cells if c.cell_type == "code"]


def execute(name: str, tmp_path: Path, timeout: int) -> nbformat.NotebookNode:
    nb = read(name)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    return nb


def outputs(nb: nbformat.NotebookNode) -> list[dict]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def printed(nb: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for o in outputs(nb))


def inline_images(nb: nbformat.NotebookNode) -> int:
    """How many images the notebook showed inline (display outputs carrying a PNG)."""
    return sum("image/png" in o.get("data", {}) for o in outputs(nb))


# -- cheap checks: no kernel ---------------------------------------------------------------------------------------

def test_notebooks_are_the_four_we_test():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_force_no_backend_and_no_platform(name):
    for source in code_cells(read(name)):
        assert "matplotlib.use(" not in source, f"{name}: plots must show inline, not go to a forced backend"
        assert "JAX_PLATFORMS" not in source, f"{name}: JAX must use the runtime's accelerator"
        assert "%matplotlib" not in source


@pytest.mark.parametrize("name", NAMES)
def test_first_code_cell_installs_the_package(name, monkeypatch, tmp_path):
    """The first code cell installs big_vision_lite when it cannot be imported: inside a clone, the enclosing
    repository (editable); elsewhere from REPO_URL, and without it, an error that says to set it. torch, where it is
    installed, is pinned exactly. Run with pip replaced by a recorder."""
    source = code_cells(read(name))[0]
    assert re.search(r"^try:\n    import big_vision_lite\b.*\nexcept ImportError:", source, re.M | re.S), source
    calls: list[list[str]] = []
    monkeypatch.setattr(subprocess, "check_call", lambda args, *a, **k: calls.append(list(args)))
    monkeypatch.setattr(shutil, "which", lambda cmd, *a, **k: None)  # no GPU
    monkeypatch.setitem(sys.modules, "big_vision_lite", None)  # `import big_vision_lite` raises ImportError
    monkeypatch.setattr(sys, "path", list(sys.path))

    monkeypatch.chdir(NOTEBOOKS)  # a clone: ../pyproject.toml exists
    exec(compile(source, f"{name}:install", "exec"), {})
    installs = [c[c.index("install") + 1:] for c in calls]
    assert all(c[:3] == [sys.executable, "-m", "pip"] for c in calls)
    package = next(args for args in installs if "-e" in args)
    assert re.fullmatch(rf"{re.escape(str(ROOT))}(\[[a-z,]+\])?", package[package.index("-e") + 1])
    torch = [a for args in installs for a in args if re.match(r"torch\b", a)]
    assert all(a == "torch==2.13.0" for a in torch), torch
    assert bool(torch) == (name == "parity")  # only the parity notebook runs the PyTorch side
    assert str(ROOT) in sys.path  # importable at once, without a kernel restart

    calls.clear()
    monkeypatch.setattr(shutil, "which", lambda cmd, *a, **k: "/usr/bin/nvidia-smi")  # a GPU runtime, not a clone
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match="REPO_URL"):
        exec(compile(source, f"{name}:install", "exec"), {})
    assert calls == []
    url_source = source.replace("REPO_URL = ''", "REPO_URL = 'https://example.com/big_vision_lite.git'", 1)
    exec(compile(url_source, f"{name}:install", "exec"), {})
    installs = [c[c.index("install") + 1:] for c in calls]
    assert any(any(a.startswith("big_vision_lite") and a.endswith("@ git+https://example.com/big_vision_lite.git")
                   for a in args) and "jax[cuda12]>=0.10,<0.11" in args for args in installs), installs


@pytest.mark.parametrize("name", NAMES)
def test_notebook_imports_exist(name):
    """Every `from big_vision_lite... import name` of a notebook names a module and attribute that exist (the
    package was reorganised; a stale import would only fail when the notebook runs)."""
    for source in code_cells(read(name))[1:]:
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and node.module.startswith("big_vision_lite"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name) or importlib.util.find_spec(f"{node.module}.{alias.name}"), (
                        f"{name}: from {node.module} import {alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("big_vision_lite"):
                        importlib.import_module(alias.name)


# -- the notebooks, executed ----------------------------------------------------------------------------------------

@pytest.mark.real
def test_parity_notebook_runs_and_plots(tmp_path):
    nb = execute("parity", tmp_path, 900)
    assert (tmp_path / "parity_gemma3_270m.png").stat().st_size > 10_000
    assert inline_images(nb) >= 1
    text = printed(nb)
    assert "layer_17" in text and "ok: True" in text
    worst, tolerance = map(float, re.search(r"max_rel_err ([\d.e+-]+) \(tolerance ([\d.e+-]+)\)", text).groups())
    assert worst <= tolerance
    ours = re.findall(r"ours : (\[[\d, ]+\])", text)
    torch = re.findall(r"torch: (\[[\d, ]+\])", text)
    assert len(ours) == 4 and ours == torch and all(len(ast.literal_eval(ids)) == 8 for ids in ours)


def test_siglip_notebook_trains_and_plots(tmp_path, monkeypatch):
    monkeypatch.setenv("BVL_NOTEBOOK_STEPS", "120")
    nb = execute("siglip", tmp_path, 600)
    assert (tmp_path / "siglip_similarity.png").stat().st_size > 10_000
    assert (tmp_path / "siglip_notebook_run" / "metrics.jsonl").is_file()
    assert inline_images(nb) >= 1
    text = printed(nb)
    assert "120 steps" in text
    diagonal, off = map(float, re.search(r"diagonal mean ([-\d.]+), off-diagonal mean ([-\d.]+)", text).groups())
    assert diagonal > off + 0.1  # 120 steps already separate matching pairs from the rest


def test_paligemma_notebook_trains_and_captions(tmp_path, monkeypatch):
    from big_vision_lite.configs import siglip_shapes
    from big_vision_lite.data.shapes import all_captions
    from big_vision_lite.train.tasks.common import make_sources
    from big_vision_lite.train.tasks.paligemma import parse_shapes_caption

    monkeypatch.setenv("BVL_NOTEBOOK_STEPS", "30")
    monkeypatch.setenv("BVL_NOTEBOOK_SIGLIP_CONFIG", "siglip_shapes:smoke")
    monkeypatch.setenv("BVL_NOTEBOOK_SIGLIP_WORKDIR", str(tmp_path / "siglip"))
    nb = execute("paligemma", tmp_path, 600)
    assert (tmp_path / "paligemma_captions.png").stat().st_size > 10_000
    assert (tmp_path / "siglip" / "result.json").is_file()  # the vision tower's run was trained first
    assert inline_images(nb) >= 1
    text = printed(nb)
    assert "30 steps" in text
    matches = int(re.search(r"exact captions: (\d+) of 12", text).group(1))
    quoted = r"""('(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*")"""  # a Python repr of a str
    pairs = [tuple(map(ast.literal_eval, m)) for m in re.findall(rf"^{quoted} +-> {quoted}$", text, re.M)]
    assert len(pairs) == 12
    assert matches == sum(truth == predicted for truth, predicted in pairs)  # the count is of the printed captions
    data = siglip_shapes.get_config().data
    words = {w for caption in all_captions(make_sources(data)[1].spec) for w in caption.split()}
    for truth, predicted in pairs:
        assert all(parse_shapes_caption(truth, data).values())  # the true captions name all four attributes
        # 30 steps write no right caption yet ("a a a ..."), but words of the captions' vocabulary, decoded: no
        # empty caption, no image or special token, no id outside the tokenizer
        assert predicted and set(predicted.split()) <= words, predicted


@pytest.mark.real
def test_attention_notebook_reproduces_the_analysis(tmp_path, monkeypatch):
    monkeypatch.setenv("BVL_NOTEBOOK_NEW_TOKENS", "64")
    nb = execute("attention", tmp_path, 600)
    assert (tmp_path / "attention_stats.png").stat().st_size > 10_000
    assert (tmp_path / "inspect_smollm2-135m" / "top_p_membership.png").stat().st_size > 10_000
    assert inline_images(nb) >= 3  # the summary plot and two of the report's
    text = printed(nb)
    for name in ("smollm2-135m", "gemma3-270m"):
        size, visible = map(float, re.search(
            rf"{name}: mean top-0.95 set size ([\d.]+) keys per query \(of ([\d.]+) visible\)", text).groups())
        assert 1 <= size < visible
        forgotten, judged = map(int, re.search(rf"{name} forgotten \(look-back 20\): (\d+) of (\d+)", text).groups())
        assert 0 < forgotten < judged
        assert 0 < float(re.search(rf"{name} sink share: mean ([\d.]+)", text).group(1)) < 1
