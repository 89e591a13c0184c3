"""Notebooks run top to bottom, as a Colab user would run them."""

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.mark.real
def test_parity_notebook_runs_and_plots(tmp_path):
    nb = nbformat.read(NOTEBOOKS / "parity.ipynb", as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert (tmp_path / "parity_gemma3_270m.png").stat().st_size > 10_000
    table = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "layer_17" in table and "ok: True" in table


def test_siglip_notebook_trains_and_plots(tmp_path, monkeypatch):
    monkeypatch.setenv("BVL_NOTEBOOK_STEPS", "120")
    nb = nbformat.read(NOTEBOOKS / "siglip.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert (tmp_path / "siglip_similarity.png").stat().st_size > 10_000
    assert (tmp_path / "siglip_notebook_run" / "metrics.jsonl").is_file()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    diagonal, off = map(float, re.search(r"diagonal mean ([-\d.]+), off-diagonal mean ([-\d.]+)", text).groups())
    assert diagonal > off + 0.1  # 120 steps already separate matching pairs from the rest


def test_paligemma_notebook_trains_and_captions(tmp_path, monkeypatch):
    monkeypatch.setenv("BVL_NOTEBOOK_STEPS", "30")
    monkeypatch.setenv("BVL_NOTEBOOK_SIGLIP_CONFIG", "configs/siglip_shapes.py:smoke")
    monkeypatch.setenv("BVL_NOTEBOOK_SIGLIP_WORKDIR", str(tmp_path / "siglip"))
    nb = nbformat.read(NOTEBOOKS / "paligemma.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert (tmp_path / "paligemma_captions.png").stat().st_size > 10_000
    assert (tmp_path / "siglip" / "result.json").is_file()  # the vision tower's run was trained first
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    matches = int(re.search(r"exact captions: (\d+) of 12", text).group(1))
    assert 0 <= matches <= 12 and text.count("->") == 12


@pytest.mark.real
def test_attention_notebook_reproduces_the_analysis(tmp_path, monkeypatch):
    monkeypatch.setenv("BVL_NOTEBOOK_NEW_TOKENS", "64")
    nb = nbformat.read(NOTEBOOKS / "attention.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert (tmp_path / "attention_stats.png").stat().st_size > 10_000
    assert (tmp_path / "inspect_smollm2-135m" / "top_p_membership.png").stat().st_size > 10_000
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    for name in ("smollm2-135m", "gemma3-270m"):
        size, visible = map(float, re.search(
            rf"{name}: mean top-0.95 set size ([\d.]+) keys per query \(of ([\d.]+) visible\)", text).groups())
        assert 1 <= size < visible
        forgotten, judged = map(int, re.search(rf"{name} forgotten \(look-back 20\): (\d+) of (\d+)", text).groups())
        assert 0 < forgotten < judged
        assert 0 < float(re.search(rf"{name} sink share: mean ([\d.]+)", text).group(1)) < 1
