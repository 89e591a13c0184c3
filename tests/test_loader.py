"""`checkpoints.load`: one entry point and one `Loaded` for every source kind, decided in one place, with the module
settings every model takes, and one clear error for what is not a model."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_vision_lite.checkpoints import CheckpointError, detect_kind, load
from big_vision_lite.checkpoints.hf_siglip import save_siglip_hf
from big_vision_lite.checkpoints.npz import save_npz_params
from big_vision_lite.checkpoints.run import RunInfo, write_run_info
from big_vision_lite.models.paligemma import PaliGemma, PaliGemmaConfig, init_params, paligemma_config_to_dict
from big_vision_lite.models.two_towers import TwoTowers, two_towers_config
from big_vision_lite.models.two_towers import init_params as init_two_towers

from conftest import TINY_FAMILIES

TOWERS = {"image": {"width": 16, "depth": 1, "mlp_dim": 32, "num_heads": 2, "patch_size": 4, "image_size": 8},
          "text": {"vocab_size": 20, "max_len": 4, "width": 16, "depth": 1, "mlp_dim": 32, "num_heads": 2,
                   "head_size": 16}}


def _leaves(params):
    return jax.tree.leaves(params)


@pytest.mark.parametrize("family", ["gemma_mha", "gemma2", "llama"])
def test_decoder_folders(tiny_checkpoints, family):
    folder = tiny_checkpoints[family]
    assert detect_kind(folder) == "decoder"
    loaded = load(folder)
    assert loaded.kind == "decoder" and loaded.source == folder and loaded.tokenizer is None
    assert loaded.config.family == TINY_FAMILIES[family][0] and loaded.module.configs == (loaded.config,)
    assert "layers_0" in loaded.params and {a.dtype for a in _leaves(loaded.params)} == {jnp.dtype(jnp.float32)}
    # The same settings every model takes: scanned layers stack, dtype and param_dtype are names or dtypes.
    scanned = load(folder, "bfloat16", param_dtype=jnp.float32, scan_layers=True, return_probs=True)
    assert "layers" in scanned.params and scanned.module.scan_layers and scanned.module.return_probs
    assert scanned.module.dtype == jnp.bfloat16 and {a.dtype for a in _leaves(scanned.params)} == {
        jnp.dtype(jnp.float32)}
    assert {a.dtype for a in _leaves(load(folder, jnp.bfloat16).params)} == {jnp.dtype(jnp.bfloat16)}


def test_a_folder_with_a_tokenizer_brings_it(tiny_with_tokenizer):
    loaded = load(tiny_with_tokenizer)
    assert loaded.tokenizer is not None and loaded.tokenizer.bos_id == 1 and loaded.tokenizer.eos_ids[0] == 2


def test_siglip_folder_and_settings(tmp_path):
    cfg = two_towers_config(TOWERS)
    params = init_two_towers(TwoTowers(cfg), jax.random.key(0))
    folder = save_siglip_hf(tmp_path / "siglip", cfg, jax.tree.map(np.asarray, params))
    assert detect_kind(folder) == "siglip"
    loaded = load(folder, scan_layers=True, remat_policy="nothing_saveable")
    assert loaded.kind == "siglip" and isinstance(loaded.module, TwoTowers) and loaded.config == cfg
    assert loaded.module.scan_layers and loaded.module.remat_policy == "nothing_saveable"
    assert "encoderblock" in loaded.params["img"]["Transformer"] and "encoderblock" in loaded.params["txt"]["Encoder_0"]
    images, tokens = jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 4), jnp.int32)
    zimg, _, _ = loaded.module.apply({"params": loaded.params}, images, tokens)
    ref, _, _ = TwoTowers(cfg).apply({"params": params}, images, tokens)
    np.testing.assert_allclose(zimg, ref, rtol=1e-6, atol=1e-6)


def _tiny_paligemma() -> tuple[PaliGemmaConfig, dict]:
    from big_vision_lite.models.gemma import DecoderConfig
    from big_vision_lite.models.vit import ViTConfig

    llm = DecoderConfig(vocab_size=32, width=16, depth=1, mlp_dim=32, num_heads=2, num_kv_heads=1, head_dim=8)
    vision = ViTConfig(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=4, image_size=8, pool_type="none",
                       head_size=16)
    cfg = PaliGemmaConfig(vision, llm, image_token_id=31)
    return cfg, jax.tree.map(np.asarray, init_params(PaliGemma(cfg), jax.random.key(0)))


def test_npz_needs_its_config_and_nothing_else_takes_one(tmp_path, tiny_checkpoints):
    cfg, params = _tiny_paligemma()
    path = save_npz_params(tmp_path / "pg.npz", params)
    assert detect_kind(path) == "paligemma"
    with pytest.raises(ValueError, match=r"pg\.npz: a big_vision \.npz holds no config; pass config="):
        load(path)
    loaded = load(path, config=cfg, scan_layers=True)
    assert loaded.kind == "paligemma" and loaded.config == cfg and "layers" in loaded.params["llm"]
    with pytest.raises(ValueError, match=r"config= is for big_vision \.npz files"):
        load(tiny_checkpoints["gemma2"], config=cfg)


def test_a_training_workdir_loads_in_the_dtypes_it_trained_in(tmp_path):
    """A run's model.json and newest checkpoint (written here by hand, as the loop writes them) load as its kind,
    computing in its dtype with parameters in its parameter dtype (float32, as training keeps them); runs written
    before model.json named its kind (PaliGemma's, with `scan`) still load, and older ones say what to do."""
    import orbax.checkpoint as ocp

    from big_vision_lite.checkpoints.run import CHECKPOINT_DIR, MODEL_FILE, TOKENIZER_DIR
    from big_vision_lite.data.text import train_caption_tokenizer

    cfg, params = _tiny_paligemma()
    workdir = tmp_path / "run"
    with ocp.CheckpointManager(workdir / CHECKPOINT_DIR, item_names=("state", "meta")) as manager:
        manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params, "step": 3}),
                                                meta=ocp.args.JsonSave({"step": 3})))
    train_caption_tokenizer(["a red circle", "a blue square"] * 20, workdir / TOKENIZER_DIR, vocab_size=24)
    write_run_info(workdir, RunInfo("paligemma", paligemma_config_to_dict(cfg), dtype="bfloat16", prompt="caption"))
    assert detect_kind(workdir) == "paligemma"
    loaded = load(workdir)
    assert loaded.kind == "paligemma" and loaded.config == cfg and loaded.tokenizer is not None
    assert loaded.module.dtype == jnp.bfloat16 and {a.dtype for a in _leaves(loaded.params)} == {
        jnp.dtype(jnp.float32)}
    np.testing.assert_array_equal(loaded.params["llm"]["final_norm"]["scale"], params["llm"]["final_norm"]["scale"])
    assert {a.dtype for a in _leaves(load(workdir, param_dtype="bfloat16").params)} == {jnp.dtype(jnp.bfloat16)}
    # The first runs' model.json: no kind, `scan` instead of scan_layers, and legacy ViT fields.
    legacy = {"model": paligemma_config_to_dict(cfg), "dtype": "float32", "scan": False, "prompt": "caption"}
    legacy["model"]["vision"] |= {"scan": False, "remat": False, "dtype": "float32"}
    (workdir / MODEL_FILE).write_text(json.dumps(legacy))
    assert load(workdir).config == cfg and load(workdir).module.dtype == jnp.float32
    # Older still: SigLIP runs before model.json existed hold only the experiment config (config.json, with a task).
    (workdir / MODEL_FILE).unlink()
    (workdir / "config.json").write_text(json.dumps({"task": "siglip", "total_steps": 3}))
    with pytest.raises(CheckpointError, match=r"run: a training workdir written before runs recorded their model .* "
                                              r"run its `bvl train CONFIG --workdir .*` once more"):
        load(workdir)


def test_what_is_not_a_model_gets_one_line_naming_it(tmp_path):
    with pytest.raises(ValueError, match=r"'no-such-model' is not an existing path .* packaged models: gemma3-270m"):
        load("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty: not a model: it holds neither config\.json"):
        load(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match=r"notes\.txt: not a model"):
        load(tmp_path / "notes.txt")
    bad = tmp_path / "mamba"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(CheckpointError, match=r"model_type 'mamba' is not supported; supported: gemma, .*paligemma"):
        detect_kind(bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"mamba/config\.json: invalid JSON"):
        detect_kind(bad)

