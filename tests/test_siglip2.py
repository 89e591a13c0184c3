"""SigLIP 2 with NaFlex (transformers' Siglip2Model) on tiny random models built here: variable-resolution images
as padded patch sequences, position grids resized per image, parity of both towers, and HF round trips."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import big_vision_lite.parity as parity
from big_vision_lite.checkpoints import CheckpointError, load
from big_vision_lite.convert import convert
from big_vision_lite.models.vit import resize_positions

from conftest import spread_siglip_weights

TEXT = dict(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=8, projection_size=32, pad_token_id=1, bos_token_id=None, eos_token_id=1)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_patches=16,
              patch_size=4)  # a 4 x 4 position grid


def build_tiny_siglip2(folder: Path, use_head: bool = True, seed: int = 0) -> Path:
    import torch
    from transformers import Siglip2Config, Siglip2Model

    config = Siglip2Config(text_config=TEXT, vision_config={**VISION, "vision_use_head": use_head})
    torch.manual_seed(seed)
    model = Siglip2Model(config).to(torch.float32)
    spread_siglip_weights(model)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("siglip2")
    return {"map": build_tiny_siglip2(root / "map"), "nohead": build_tiny_siglip2(root / "nohead", False, 1)}


@pytest.mark.parametrize("kind", ["map", "nohead"])
def test_parity_with_mixed_aspect_ratios_and_padding(tiny, kind):
    """Rows of 4x5, 2x8 and 3x5 patches in one 20-patch batch: the 4x4 position grid shrinks along one axis and
    stretches along the other, and padding patches are never attended (nor compared)."""
    report = parity.run_parity(str(tiny[kind]))
    assert report.model_type == "siglip2" and report.ok and report.max_rel_err <= 1e-5, report.table()
    names = [e.name for e in report.layers]
    assert ("logits_per_image" in names) == (kind == "map") and "txt/normalized" in names


def test_bfloat16_parity_against_the_truth(tiny):
    report = parity.run_parity(str(tiny["map"]), "bfloat16")
    assert report.ok and all(t.passes for t in report.truth), report.table()


def test_position_resize_equals_an_antialiased_image_resize():
    """Per image, our resize equals jax.image.resize (bilinear, antialiased) of the grid, laid out row-major and
    padded with the first position, for shapes that shrink, stretch and keep each axis."""
    grid = jax.random.normal(jax.random.PRNGKey(0), (6, 6, 5))
    shapes = jnp.array([[2, 9], [6, 6], [3, 4], [1, 1]])
    resized = resize_positions(grid, shapes, 40)
    for (h, w), row in zip(shapes.tolist(), resized, strict=True):
        expected = jax.image.resize(grid, (h, w, 5), "bilinear", antialias=True).reshape(h * w, 5)
        np.testing.assert_allclose(row[: h * w], expected, atol=1e-5)
        np.testing.assert_allclose(row[h * w:], np.broadcast_to(expected[0], (40 - h * w, 5)), atol=1e-5)


def test_any_image_shape_runs_in_one_compilation(tiny):
    """The patch count is the only static shape: new spatial shapes reuse the compiled function."""
    from big_vision_lite.models.vit import NaFlexImages

    loaded = load(tiny["map"])
    apply = jax.jit(lambda p, images: loaded.module.apply({"params": p}, images, None)[0])
    for shape in ([4, 5], [1, 20], [5, 3]):
        mask = jnp.arange(20)[None] < shape[0] * shape[1]
        images = NaFlexImages(jnp.ones((1, 20, 48)) * mask[..., None], jnp.array([shape]), mask)
        assert np.isfinite(np.asarray(apply(loaded.params, images))).all()
    assert apply._cache_size() == 1


def test_hf_ours_hf_is_byte_exact(tiny, tmp_path):
    for kind, folder in tiny.items():
        convert(str(folder), tmp_path / kind)
        for name in ("config.json", "model.safetensors"):
            assert (folder / name).read_bytes() == (tmp_path / kind / name).read_bytes(), (kind, name)
    loaded = load(tiny["map"])
    assert loaded.kind == "siglip" and loaded.config.image.naflex and loaded.config.image.num_patches == 16


def test_errors_name_the_field(tiny, tmp_path):
    config = json.loads((tiny["map"] / "config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**config, "vision_config": {**config["vision_config"],
                                                                             "num_patches": 15}}))
    (bad / "model.safetensors").write_bytes((tiny["map"] / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=r"vision_config\.num_patches 15 is not a square"):
        load(bad)
    with pytest.raises(ValueError, match=r"takes NaFlexImages with patches \[B, P, 48\]"):
        loaded = load(tiny["map"])
        loaded.module.apply({"params": loaded.params}, jnp.zeros((1, 16, 16, 3)), None)


# ---------------------------------------------------------------------------------------------- processor


def _images():
    from PIL import Image

    rng = np.random.default_rng(0)
    # RGB only: transformers' Siglip2 image processor converts no other mode (ours does, as for SigLIP).
    return [Image.fromarray((rng.random((20, 160, 3)) * 255).astype(np.uint8)),  # 1:8
            Image.fromarray((rng.random((160, 20, 3)) * 255).astype(np.uint8)),  # 8:1
            Image.fromarray((rng.random((7, 5, 3)) * 255).astype(np.uint8)),  # tiny
            (rng.random((64, 48, 3)) * 255).astype(np.uint8)]  # an array


def test_processor_equals_transformers(converted):
    from transformers import AutoTokenizer, Siglip2ImageProcessorPil, Siglip2Processor

    from big_vision_lite.checkpoints.tokenizer import load_tokenizer
    from big_vision_lite.data.naflex import NaFlexProcessor

    folder = converted("gemma3-270m")[1]
    theirs = Siglip2Processor(image_processor=Siglip2ImageProcessorPil(patch_size=4, max_num_patches=20),
                              tokenizer=AutoTokenizer.from_pretrained(folder))
    texts = ["a photo of a cat", "", "two dogs " * 30, "grey."]  # lowercase: this tokenizer does not lowercase
    # Siglip2Processor passes its own defaults (256 patches of 16) unless told.
    expected = theirs(images=_images(), text=texts, max_length=16, max_num_patches=20, patch_size=4,
                      return_tensors="np")
    ours = NaFlexProcessor(patch_size=4, max_num_patches=20, tokenizer=load_tokenizer(folder), max_len=16)
    batch = ours(_images(), texts)
    images = batch["images"]
    np.testing.assert_array_equal(images.patches, expected["pixel_values"])
    np.testing.assert_array_equal(images.spatial_shapes, expected["spatial_shapes"])
    np.testing.assert_array_equal(images.mask, expected["pixel_attention_mask"].astype(bool))
    np.testing.assert_array_equal(batch["input_ids"], expected["input_ids"])
    assert images.spatial_shapes.tolist() == [[2, 10], [10, 2], [5, 4], [5, 4]]
    np.testing.assert_array_equal(ours.tokenize(["GREY."]), ours.tokenize(["grey."]))  # SigLIP 2 lowercases


def test_processor_errors_name_the_image_and_the_numbers():
    from big_vision_lite.data.naflex import NaFlexProcessor

    proc = NaFlexProcessor(patch_size=4, max_num_patches=20)
    with pytest.raises(ValueError, match="image 1: empty image, size 0x5"):
        proc.process_images([_images()[0], np.zeros((5, 0, 3), np.uint8)])
    with pytest.raises(ValueError, match=r"image 0: a grid of 5 x 5 patches asked for; it must hold 1 to "
                                         r"max_num_patches 20"):
        proc.process_images(_images()[:1], grids=[(5, 5)])
    assert proc.process_images(_images()[:1], grids=[(4, 5)]).spatial_shapes.tolist() == [[4, 5]]
    with pytest.raises(ValueError, match="max_num_patches 0"):
        NaFlexProcessor(patch_size=4, max_num_patches=0)
    with pytest.raises(ValueError, match="no tokenizer"):
        proc.tokenize(["a"])


# ---------------------------------------------------------------------------------------------- training


def test_naflex_training_runs_exports_to_siglip2_and_matches_transformers(tmp_path):
    """The shared loop and sigmoid loss train a NaFlex tower unchanged; the run exports as an HF Siglip2Model
    folder that transformers computes the same on (mixed aspect ratios, padding)."""
    from big_vision_lite.train.config import load_config
    from big_vision_lite.train.loop import train

    config = load_config("siglip2_shapes:smoke")
    result = train(config, tmp_path / "run", progress=False)
    assert {"eval/i2t_top1", "eval/t2i_top1"} <= set(result.final_eval), result
    loaded = load(tmp_path / "run")
    assert loaded.kind == "siglip" and loaded.config.image.naflex and loaded.config.image.num_patches == 16
    convert(str(tmp_path / "run"), tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "siglip2"
    report = parity.run_parity(str(tmp_path / "hf"))
    assert report.model_type == "siglip2" and report.ok, report.table()


def test_grids_beyond_max_num_patches_are_refused(tmp_path):
    from big_vision_lite.train.config import apply_overrides, load_config
    from big_vision_lite.train.loop import train

    config = apply_overrides(load_config("siglip2_shapes:smoke"), ["naflex.grids=((4, 4), (5, 5))"])
    with pytest.raises(ValueError, match=r"config.naflex.grids .*must hold 1 to config.naflex.max_num_patches 16"):
        train(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()
