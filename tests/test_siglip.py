"""SigLIP two towers: parity with transformers' SiglipModel, HF conversion both ways, layouts, remat, configs.

Tiny random-init transformers models are built here (nothing is downloaded), with weights perturbed so that
norms, biases, the probe and the logit scale/bias are far from their init values.
"""

import dataclasses
import json
import shutil
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from big_vision_lite.checkpoints import CheckpointError, load
from big_vision_lite.checkpoints.hf_siglip import (
    save_siglip_hf,
    siglip_config_from_hf,
    siglip_config_to_hf,
    siglip_params_from_hf,
    siglip_params_to_hf,
)
from big_vision_lite.models.attention_core import attend
from big_vision_lite.models.text import TextConfig, text_config
from big_vision_lite.models.two_towers import TwoTowers, init_params, relayout_two_towers, two_towers_config
from big_vision_lite.models.vit import VARIANTS, MultiHeadAttention, ViT, ViTConfig, vit_config
from big_vision_lite.parity import run_parity
from big_vision_lite.parity.siglip import siglip_parity_batch

from conftest import spread_siglip_weights

# Text and vision widths differ on purpose (the text head projects 48 -> 32, the vision width).
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
                   patch_size=4)
TINY_TEXT = dict(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=8, projection_size=32, pad_token_id=None, bos_token_id=None,
                 eos_token_id=None)


def build_tiny_siglip(folder: Path, use_head: bool = True, seed: int = 0, image_size: int = 16) -> Path:
    """Saves a tiny random transformers SiglipModel into `folder`."""
    import torch
    from transformers import SiglipConfig, SiglipModel

    vision = {**TINY_VISION, "vision_use_head": use_head, "image_size": image_size}
    config = SiglipConfig(text_config=TINY_TEXT, vision_config=vision)
    torch.manual_seed(seed)
    model = SiglipModel(config).to(torch.float32)
    spread_siglip_weights(model)
    model.save_pretrained(folder)
    return folder


def _load(folder, **settings):
    """(TwoTowers, params) of an HF SiglipModel folder, through the one loader."""
    loaded = load(folder, **settings)
    assert loaded.kind == "siglip"
    return loaded.module, loaded.params


def _build(fields, **settings) -> TwoTowers:
    """The two-tower module of a model dict (as a training config's `model` holds it)."""
    return TwoTowers(two_towers_config(fields), **settings)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_siglip")
    return {"map": build_tiny_siglip(root / "map", True), "nohead": build_tiny_siglip(root / "nohead", False, 1)}


def _batch(module) -> tuple[jnp.ndarray, jnp.ndarray]:
    cfg = module.config
    images, tokens = siglip_parity_batch(cfg.image, cfg.text.vocab_size, cfg.text.max_len, batch=2)
    return jnp.asarray(images["images"]), jnp.asarray(tokens)


def _torch_outputs(folder: Path, images: np.ndarray, tokens: np.ndarray) -> dict[str, np.ndarray]:
    import torch
    from transformers import SiglipModel

    model = SiglipModel.from_pretrained(folder, attn_implementation="eager").eval()
    pixels = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    ids = torch.from_numpy(tokens.astype(np.int64))
    with torch.no_grad():
        vision = model.vision_model(pixel_values=pixels)
        text = model.text_model(input_ids=ids)
        out = {"img_tokens": vision.last_hidden_state.numpy(), "txt": text.pooler_output.numpy()}
        if model.config.vision_config.vision_use_head:
            out["logits"] = model(input_ids=ids, pixel_values=pixels).logits_per_image.numpy()
    return out


# ---------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("kind", ["map", "nohead"])
def test_parity(tiny, kind):
    report = run_parity(str(tiny[kind]))
    assert report.ok, report.table()
    assert report.tolerance == 1e-5
    data = report.to_json()
    assert {"model", "model_type", "dtype", "tolerance", "max_rel_err", "greedy_match", "ok", "layers",
            "seconds"} <= set(data)
    assert data["model_type"] == "siglip" and data["greedy_match"] is None and data["ok"] is True
    json.dumps(data)
    names = [layer["name"] for layer in data["layers"]]
    assert {"img/layer_1", "img/encoded", "txt/layer_1", "txt/pooled", "txt/normalized"} <= set(names)
    if kind == "map":
        assert {"img/pooled", "img/normalized", "logits_per_image", "loss"} <= set(names)
    else:  # SiglipModel.forward cannot run without the MAP head: towers only, and the report says why
        assert "logits_per_image" not in names and "img/pooled" not in names
        assert "vision_use_head" in report.notes[0]
    assert "max_rel_err" in report.table()


def test_parity_when_the_side_is_not_a_multiple_of_the_patch(tmp_path):
    """18 px with 4-px patches: both sides see a 4 x 4 grid and drop the last 2 pixels of each row and column (as
    SigLIP So400m/14 does at 384 px)."""
    folder = build_tiny_siglip(tmp_path / "odd", image_size=18)
    report = run_parity(str(folder))
    assert report.ok and load(folder).config.image.num_patches == 16, report.table()


def test_bvl_parity_on_a_siglip_folder(tiny, tmp_path, capsys):
    from big_vision_lite.cli import main

    out = tmp_path / "parity.json"
    assert main(["parity", str(tiny["map"]), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["model_type"] == "siglip" and data["ok"] and data["max_rel_err"] <= 1e-5
    assert "logits_per_image" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("kind", ["map", "nohead"])
def test_hf_round_trip(tiny, kind, tmp_path):
    folder = tiny[kind]
    original = load_file(str(folder / "model.safetensors"))
    for scan in (False, True):
        module, params = _load(folder, scan_layers=scan)
        out_dir = save_siglip_hf(tmp_path / f"ours_{scan}", module.config, params)
        saved = load_file(str(out_dir / "model.safetensors"))
        assert sorted(saved) == sorted(original)
        for name, tensor in original.items():
            assert saved[name].dtype == tensor.dtype and np.array_equal(saved[name], tensor), name

    # transformers loads our folder (config.json written by us) and computes exactly what the original does.
    module, _ = _load(folder)
    images, tokens = (np.asarray(a) for a in _batch(module))
    ref = _torch_outputs(folder, images, tokens)
    got = _torch_outputs(tmp_path / "ours_True", images, tokens)
    assert ref.keys() == got.keys()
    for key in ref:
        np.testing.assert_array_equal(got[key], ref[key], err_msg=key)


def test_config_round_trip(tiny):
    hf = json.loads((tiny["map"] / "config.json").read_text())
    cfg = siglip_config_from_hf(hf)
    assert cfg.image.pool_type == "map" and cfg.image.head_size is None and cfg.text.head_size == 32
    assert (cfg.image.width, cfg.image.patch_size, cfg.image.image_size, cfg.text.width, cfg.text.max_len) == (
        32, 4, 16, 48, 8)
    assert siglip_config_from_hf(siglip_config_to_hf(cfg)) == cfg
    nohead = siglip_config_from_hf(json.loads((tiny["nohead"] / "config.json").read_text()))
    assert nohead.image.pool_type == "none"
    assert siglip_config_to_hf(nohead)["vision_config"]["vision_use_head"] is False
    with pytest.raises(ValueError, match="vision linear head"):
        siglip_config_to_hf(dataclasses.replace(cfg, image=dataclasses.replace(cfg.image, head_size=32)))
    with pytest.raises(CheckpointError, match="model_type"):
        siglip_config_from_hf({**hf, "model_type": "clip"})


# ---------------------------------------------------------------------------------------------- layouts, remat


def test_scan_matches_unrolled(tiny):
    unrolled, params_u = _load(tiny["map"], scan_layers=False)
    scanned, params_s = _load(tiny["map"], scan_layers=True)
    assert "encoderblock_1" in params_u["img"]["Transformer"] and "encoderblock_0" in params_u["txt"]["Encoder_0"]
    assert params_s["img"]["Transformer"]["encoderblock"]["LayerNorm_0"]["scale"].shape == (2, 32)
    assert params_s["txt"]["Encoder_0"]["encoderblock"]["MlpBlock_0"]["Dense_0"]["kernel"].shape == (2, 48, 96)
    # Either layout converts to the other.
    back = relayout_two_towers(params_s, unrolled.config, scan_layers=False)
    assert jax.tree.all(jax.tree.map(np.array_equal, back, params_u))

    images, tokens = _batch(unrolled)
    zi_u, zt_u, _ = jax.jit(unrolled.apply)({"params": params_u}, images, tokens)
    zi_s, zt_s, _ = jax.jit(scanned.apply)({"params": params_s}, images, tokens)
    np.testing.assert_allclose(zi_s, zi_u, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(zt_s, zt_u, rtol=1e-6, atol=1e-6)


def test_remat_same_outputs_and_gradients(tiny):
    plain, params = _load(tiny["map"])
    images, tokens = _batch(plain)

    def value_and_grad(module):
        def loss(p):
            zimg, ztxt, out = module.apply({"params": p}, images, tokens)
            logits = out["t"] * zimg @ ztxt.T + out["b"]
            z = 2 * jnp.eye(len(logits)) - 1
            return -jnp.sum(jax.nn.log_sigmoid(z * logits)) / len(logits)
        return jax.jit(jax.value_and_grad(loss))

    value_p, grads_p = value_and_grad(plain)(params)
    for scan in (False, True):  # remat inside nn.scan and around unrolled blocks are different code paths
        remat, params_r = _load(tiny["map"], scan_layers=scan, remat_policy="nothing_saveable")
        assert remat.remat_policy == "nothing_saveable" and remat.scan_layers == scan
        value_r, grads_r = value_and_grad(remat)(params_r)
        np.testing.assert_allclose(value_r, value_p, rtol=1e-6)
        grads_r = relayout_two_towers(grads_r, plain.config, scan_layers=False)
        flat_p, flat_r = jax.tree.leaves_with_path(grads_p), jax.tree.leaves(grads_r)
        for (path, gp), gr in zip(flat_p, flat_r, strict=True):
            np.testing.assert_allclose(gr, gp, rtol=1e-5, atol=1e-7, err_msg=f"{scan=} {jax.tree_util.keystr(path)}")


# ---------------------------------------------------------------------------------------------- configs


def test_variants():
    so = vit_config("So400m/14", image_size=224)
    assert (so.width, so.depth, so.mlp_dim, so.num_heads, so.patch_size) == (1152, 27, 4304, 16, 14)
    assert so.num_patches == 256
    b = vit_config("B/16")
    assert (b.width, b.depth, b.mlp_dim, b.num_heads, b.patch_size) == (768, 12, 3072, 12, 16)
    assert VARIANTS["L"] == (1024, 24, 4096, 16) and VARIANTS["S"] == (384, 12, 1536, 6)
    assert VARIANTS["Ti"] == (192, 12, 768, 3) and VARIANTS["mu"] == (32, 1, 128, 2)
    assert text_config("So400m", vocab_size=10, max_len=16).width == 1152
    with pytest.raises(ValueError, match=r"unknown ViT variant 'XL/16'.*So400m"):
        vit_config("XL/16")
    with pytest.raises(ValueError, match="patch size 'x'"):
        vit_config("B/x")
    with pytest.raises(ValueError, match="bare name"):
        text_config("B/16", vocab_size=10)
    with pytest.raises(ValueError, match=r"unknown ViTConfig fields \['colour'\]"):
        vit_config("B/16", colour=3)
    with pytest.raises(ValueError, match="must be an int of at least patch_size 16"):
        vit_config("B/16", image_size=8)
    assert vit_config("So400m/14", image_size=384).num_patches == 27 * 27  # the last 6 pixels fall outside the grid


TINY_TRAIN = {  # the shape of the trainer's tiny model (image 32, patch 8), narrower to keep the test fast
    "image": {"variant": "mu/8", "image_size": 32, "width": 64, "depth": 2, "num_heads": 4},
    "text": {"vocab_size": 100, "max_len": 16, "width": 64, "depth": 2, "mlp_dim": 128, "num_heads": 4},
    "out_dim": 48,
}


def test_two_towers_from_a_model_dict():
    module = _build(TINY_TRAIN)
    cfg = module.config
    assert (cfg.image.patch_size, cfg.image.width, cfg.image.mlp_dim, cfg.image.head_size) == (8, 64, 128, 48)
    assert cfg.text.head_size == 48
    params = init_params(module, jax.random.key(0))
    assert params["img"]["embedding"]["kernel"].shape == (8, 8, 3, 64)
    assert params["img"]["MAPHead_0"]["probe"].shape == (1, 1, 64)
    assert params["txt"]["pos_embedding"].shape == (1, 16, 64)
    images = jax.random.uniform(jax.random.key(1), (3, 32, 32, 3), minval=-1, maxval=1)
    tokens = jax.random.randint(jax.random.key(2), (3, 16), 0, 100)
    zimg, ztxt, out = jax.jit(module.apply)({"params": params}, images, tokens)
    assert zimg.shape == ztxt.shape == (3, 48) and zimg.dtype == jnp.float32
    np.testing.assert_allclose(jnp.linalg.norm(zimg, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(ztxt, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(out["t"], [10.0], rtol=1e-6)
    np.testing.assert_allclose(out["b"], [-10.0])
    # One tower at a time.
    zimg_only, none, _ = jax.jit(module.apply)({"params": params}, images, None)
    assert none is None and zimg_only.shape == (3, 48)

    bf16 = _build({**TINY_TRAIN, "temperature_init": 1.0, "bias_init": 0.0}, dtype="bfloat16", scan_layers=True,
                  remat_policy="nothing_saveable")
    p16 = relayout_two_towers(params, bf16.config, scan_layers=True)  # the same float32 params, blocks stacked
    assert p16["img"]["Transformer"]["encoderblock"]["LayerNorm_0"]["scale"].shape == (2, 64)
    p16 = {**p16, "t": jnp.zeros(1), "b": jnp.zeros(1)}
    zimg, _, out = jax.jit(bf16.apply)({"params": p16}, images, tokens)
    assert zimg.dtype == jnp.float32 and out["img/encoded"].dtype == jnp.bfloat16
    shapes = jax.eval_shape(lambda rng: init_params(bf16, rng), jax.random.key(0))  # float32 under bfloat16 compute
    assert {a.dtype for a in jax.tree.leaves(shapes)} == {np.dtype("float32")}
    assert bf16.config.temperature_init == 1.0 and bf16.config.bias_init == 0.0


def test_two_towers_config_errors():
    with pytest.raises(ValueError, match=r"unknown model config keys \['img_size'\]"):
        two_towers_config({**TINY_TRAIN, "img_size": 3})
    with pytest.raises(ValueError, match=r"unknown model.text fields \['vocab'\]"):
        two_towers_config({**TINY_TRAIN, "text": {**TINY_TRAIN["text"], "vocab": 3}})
    with pytest.raises(ValueError, match="embedding widths differ"):
        two_towers_config({k: v for k, v in TINY_TRAIN.items() if k != "out_dim"} | {
            "text": {**TINY_TRAIN["text"], "head_size": 32}})
    with pytest.raises(ValueError, match="pool_type 'cls'"):
        two_towers_config({**TINY_TRAIN, "image": {**TINY_TRAIN["image"], "pool_type": "cls"}})
    # The module settings are one vocabulary: a bad dtype or remat policy names the allowed values.
    images, tokens = jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 16), jnp.int32)
    with pytest.raises(ValueError, match=r"dtype 'float16' is not one of \['bfloat16', 'float32'\]"):
        _build(TINY_TRAIN, dtype="float16").init(jax.random.key(0), images, tokens)
    with pytest.raises(ValueError, match=r"remat_policy .everything. is not a jax\.checkpoint_policies name"):
        _build(TINY_TRAIN, remat_policy="everything").init(jax.random.key(0), images, tokens)


# ---------------------------------------------------------------------------------------------- bad inputs


def test_wrong_image_size():
    cfg = ViTConfig(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8, image_size=32, pool_type="gap")
    vit = ViT(cfg)
    with pytest.raises(ValueError, match=r"expects \[B, 32, 32, 3\]"):
        vit.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    with pytest.raises(ValueError, match=r"expects \[B, 32, 32, 3\]"):
        vit.init(jax.random.key(0), jnp.zeros((1, 3, 32, 32)))  # channels first
    variables = jax.jit(vit.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    x, out = jax.jit(vit.apply)(variables, jnp.zeros((2, 32, 32, 3)))
    assert x.shape == (2, 32) and out["encoded"].shape == (2, 16, 32)


def test_wrong_token_length():
    module = _build(TINY_TRAIN)
    with pytest.raises(ValueError, match="max_len 16"):  # raised while tracing, before any computation
        module.init(jax.random.key(0), None, jnp.zeros((2, 17), jnp.int32))
    with pytest.raises(ValueError, match="integer ids"):
        module.init(jax.random.key(0), None, jnp.zeros((2, 16), jnp.float32))


def test_folder_with_wrong_tensor_shape(tiny, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny["map"], bad)
    state = load_file(str(bad / "model.safetensors"))
    name = "text_model.encoder.layers.1.mlp.fc1.weight"
    state[name] = np.zeros((95, 48), np.float32)
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'text_model\.encoder\.layers\.1\.mlp\.fc1\."
                       r"weight' has shape \(95, 48\), config\.json implies \(96, 48\)"):
        load(bad)

    del state[name]
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"'text_model\.encoder\.layers\.1\.mlp\.fc1\.weight' is missing"):
        load(bad)


def test_params_from_hf_checks_state(tiny):
    cfg = siglip_config_from_hf(json.loads((tiny["nohead"] / "config.json").read_text()))
    state = load_file(str(tiny["map"] / "model.safetensors"))  # has MAP head tensors the config does not expect
    with pytest.raises(CheckpointError, match=r"unexpected tensors.*vision_model\.head"):
        siglip_params_from_hf(state, cfg)
    state = load_file(str(tiny["nohead"] / "model.safetensors"))
    params = siglip_params_from_hf(state, cfg)
    assert "MAPHead_0" not in params["img"]
    assert siglip_params_to_hf(params, cfg).keys() == state.keys()
    # A pool_type "none" tower returns tokens; TwoTowers refuses to treat them as an embedding.
    module = _build({"image": dataclasses.asdict(cfg.image), "text": dataclasses.asdict(cfg.text)})
    images, tokens = _batch(module)
    with pytest.raises(ValueError, match="pool_type 'none' yields tokens"):
        module.apply({"params": params}, images, tokens)
    tokens_out, _ = ViT(cfg.image).apply({"params": params["img"]}, images)
    assert tokens_out.shape == (2, 16, 32)
    assert isinstance(cfg.text, TextConfig)


def _plain_attention(q, k, v, key_mask, scale):
    """The attention core as autodiff sees it: the formula `attend` must equal, values and gradients."""
    logits = jnp.einsum("BNTH,BNSH->BNTS", q, k) * scale
    if key_mask is not None:
        logits = jnp.where(key_mask[:, None, None, :], logits, -1e30)
    return jnp.einsum("BNTS,BNSH->BNTH", jax.nn.softmax(logits, axis=-1), v)


@pytest.mark.parametrize("masked", [False, True])
def test_attention_core_gradients_match_autodiff(masked):
    rng = np.random.default_rng(0)
    q, k, v, cotangent = (jnp.asarray(rng.normal(size=(3, 2, 5, 8)), jnp.float32) for _ in range(4))
    key_mask = jnp.asarray(rng.random((3, 5)) < 0.6).at[:, 0].set(True) if masked else None
    out, pullback = jax.vjp(lambda q, k, v: attend(q, k, v, key_mask, 0.35), q, k, v)
    want, want_pullback = jax.vjp(lambda q, k, v: _plain_attention(q, k, v, key_mask, 0.35), q, k, v)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    for got_grad, want_grad, name in zip(pullback(cotangent), want_pullback(cotangent), "qkv", strict=True):
        np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-6, err_msg=f"gradient of {name}")
    if masked:  # a key never attended gets no gradient, whatever its value
        dk = pullback(cotangent)[1]
        assert np.all(np.asarray(dk)[~np.asarray(key_mask)[:, None, :, None].repeat(2, 1).repeat(8, 3)] == 0)


class _DenseGeneralAttentionParams(nn.Module):
    """flax's MultiHeadDotProductAttention parameters (what the ViT's attention used to create with DenseGeneral)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> None:
        xavier = nn.initializers.xavier_uniform()
        for name in ("query", "key", "value"):
            nn.DenseGeneral((4, 4), kernel_init=xavier, name=name)(x)
        nn.DenseGeneral(16, axis=(-2, -1), kernel_init=xavier, name="out")(jnp.ones((2, 3, 4, 4)))


def test_attention_parameters_initialise_as_flax_dense_general():
    """The fused q/k/v projection keeps flax's parameter names, shapes and initial values: runs started before it
    reproduce, and big_vision checkpoints load."""
    x = jnp.ones((2, 3, 16))
    ours = MultiHeadAttention(num_heads=4).init(jax.random.key(7), x)["params"]
    want = _DenseGeneralAttentionParams().init(jax.random.key(7), x)["params"]
    assert jax.tree.structure(ours) == jax.tree.structure(want)
    for got, expected in zip(jax.tree.leaves(ours), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(got, expected)
