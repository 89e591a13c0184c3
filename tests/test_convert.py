"""`bvl convert`: every kind of HF folder round-trips HF -> ours -> HF byte for byte, PaliGemma also to a big_vision
.npz that reads back equal; the LoRA export of a trained run is in test_paligemma_train (it needs a run)."""

from pathlib import Path

import jax
import numpy as np
import pytest
from test_paligemma_checkpoints import build_tiny_paligemma
from test_siglip import build_tiny_siglip

from big_vision_lite.checkpoints import load
from big_vision_lite.checkpoints.npz import load_npz_params, save_npz_params
from big_vision_lite.cli import main
from big_vision_lite.convert import convert, npz_config
from big_vision_lite.models.lora import merge_lora
from big_vision_lite.models.paligemma import PaliGemma, init_params


def _same_files(source: Path, destination: Path) -> None:
    """Every file of `source` is in `destination` with the same bytes, and nothing else was added."""
    names = sorted(p.name for p in source.iterdir())
    assert sorted(p.name for p in destination.iterdir()) == names
    for name in names:
        assert (source / name).read_bytes() == (destination / name).read_bytes(), name


@pytest.mark.parametrize("family", ["gemma_mqa", "gemma2", "gemma3", "llama", "qwen3"])
def test_decoders_round_trip_byte_for_byte(tiny_checkpoints, tmp_path, family):
    report = convert(str(tiny_checkpoints[family]), tmp_path / "out")
    assert report["verified"] == "every tensor reads back bit for bit" and not report["lora_merged"]
    _same_files(tiny_checkpoints[family], tmp_path / "out")


def test_decoder_with_tokenizer_through_the_cli(tiny_with_tokenizer, tmp_path, capsys):
    assert main(["convert", str(tiny_with_tokenizer), str(tmp_path / "out"), "--json", str(tmp_path / "r.json")]) == 0
    assert "verified: every tensor reads back bit for bit" in capsys.readouterr().out
    _same_files(tiny_with_tokenizer, tmp_path / "out")  # the tokenizer files travel with the weights
    assert load(tmp_path / "out").tokenizer.encode("to be") == load(tiny_with_tokenizer).tokenizer.encode("to be")


def test_siglip_and_paligemma_round_trip_byte_for_byte(tmp_path):
    for name, folder in [("siglip", build_tiny_siglip(tmp_path / "siglip")),
                         ("paligemma", build_tiny_paligemma(tmp_path / "paligemma", "gemma2"))]:
        report = convert(str(folder), tmp_path / f"{name}_out")
        assert report["kind"] == name
        _same_files(folder, tmp_path / f"{name}_out")


def test_paligemma_to_npz_reads_back_equal(tmp_path):
    folder = build_tiny_paligemma(tmp_path / "paligemma", "gemma")
    report = convert(str(folder), tmp_path / "params.npz", to="npz")
    assert report["format"] == "npz" and report["verified"]
    loaded = load(folder)
    back = load_npz_params(tmp_path / "params.npz", loaded.config)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, loaded.params), back)


def test_npz_source_round_trips_and_exports_to_hf(tmp_path):
    """npz -> ours -> npz is byte-exact (the file, and so every array's name, dtype and bytes), and npz -> HF
    (with --config for the model an .npz does not describe) gives the original folder's tensors."""
    folder = build_tiny_paligemma(tmp_path / "paligemma", "gemma2")
    convert(str(folder), tmp_path / "a.npz", to="npz")
    config = npz_config(folder / "config.json")
    report = convert(str(tmp_path / "a.npz"), tmp_path / "b.npz", to="npz", config=config)
    assert report["verified"] == "every tensor reads back bit for bit"
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for name in a.files:
            assert a[name].dtype == b[name].dtype and a[name].tobytes() == b[name].tobytes(), name
    assert main(["convert", str(tmp_path / "a.npz"), str(tmp_path / "hf"), "--config", str(folder)]) == 0
    same = jax.tree.map(np.array_equal, jax.tree.map(np.asarray, load(folder).params),
                        jax.tree.map(np.asarray, load(tmp_path / "hf").params))
    assert all(jax.tree.leaves(same))
    # An .npz without --config, or with a config that is not a PaliGemma folder, is refused.
    assert main(["convert", str(tmp_path / "a.npz"), str(tmp_path / "c")]) == 2
    assert main(["convert", str(tmp_path / "a.npz"), str(tmp_path / "c"), "--config", str(tmp_path / "a.npz")]) == 2
    assert not (tmp_path / "c").exists()


def test_a_second_expert_has_no_place_in_an_hf_folder(tmp_path):
    """openpi's two-expert PaliGemma: its expert's tensors are named in the refusal, nothing is written; the .npz
    export keeps them all."""
    from test_paligemma import TWO

    params = jax.tree.map(np.asarray, init_params(PaliGemma(TWO), jax.random.PRNGKey(0)))
    save_npz_params(tmp_path / "two.npz", params)
    named = r"the 15 tensors of its 1 extra expert\(s\) have no place there \(llm/final_norm_1/scale, "
    with pytest.raises(ValueError, match=named):
        convert(str(tmp_path / "two.npz"), tmp_path / "hf", config=TWO)
    assert not (tmp_path / "hf").exists()
    report = convert(str(tmp_path / "two.npz"), tmp_path / "copy.npz", to="npz", config=TWO)
    assert report["verified"] == "every tensor reads back bit for bit"
    assert any("_1" in name for name in np.load(tmp_path / "copy.npz").files)


def test_merge_lora_folds_the_adapter_into_the_weight():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(2, 4, 3, 5)).astype(np.float32)  # kv "2KDH": keeps 2 and K
    a = rng.normal(size=(2, 4, 3, 2)).astype(np.float32)
    b = rng.normal(size=(2, 4, 2, 5)).astype(np.float32)
    merged = merge_lora({"attn": {"kv_einsum": {"w": w, "lora_a": a, "lora_b": b}}}, scale=0.5)
    assert set(merged["attn"]["kv_einsum"]) == {"w"}
    expected = w + 0.5 * np.einsum("skdl,sklh->skdh", a, b)
    np.testing.assert_allclose(merged["attn"]["kv_einsum"]["w"], expected, rtol=1e-6)
    mlp = merge_lora({"linear": w[0, 0], "linear_lora_a": a[0, 0], "linear_lora_b": b[0, 0, :, :]}, scale=2.0)
    np.testing.assert_allclose(mlp["linear"], w[0, 0] + 2.0 * a[0, 0] @ b[0, 0], rtol=1e-6)
