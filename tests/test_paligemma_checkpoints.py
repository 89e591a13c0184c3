"""PaliGemma checkpoints: HF folders in every layout, big_vision .npz, round trips, errors, parity with transformers.

Tiny random-init transformers PaliGemmaForConditionalGeneration models are built here (nothing is downloaded): a
Gemma 1 decoder (MQA) whose embedding has padding rows past the image token (ids 80..95 of 96, as real checkpoints
pad 257152 ids to 257216 rows), and a Gemma 2 one (GQA, soft-caps, `query_pre_attn_scalar` != head_dim, a sliding
window shorter than the parity rows) whose image token id equals vocab_size, so transformers embeds id 0 there.
"""

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import big_vision_lite.parity.paligemma as pg_parity
from big_vision_lite.checkpoints import CheckpointError, load
from big_vision_lite.checkpoints.hf_paligemma import (
    LAYOUTS,
    detect_layout,
    paligemma_config_from_hf,
    paligemma_config_to_hf,
    paligemma_params_from_hf,
    paligemma_params_to_hf,
    read_paligemma_hf,
    save_paligemma_hf,
)
from big_vision_lite.checkpoints.npz import load_npz_params, save_npz_params
from big_vision_lite.cli import main
from big_vision_lite.models.paligemma import relayout_paligemma
from big_vision_lite.parity import run_parity

GREEDY_TOKENS = 16
VISION = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=16,
              patch_size=4, vision_use_head=False)  # 16 image tokens of width 24, projected to 32
TEXT = {
    "gemma": dict(model_type="gemma", vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=8),
    "gemma2": dict(model_type="gemma2", vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=16,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=8),
}  # gemma2's window (8) is shorter than the 24-token prefix: sliding layers must keep the prefix bidirectional
IMAGE_TOKEN = {"gemma": 80, "gemma2": 96}
# HF name rewrites from what transformers 5.x's save_pretrained writes to the two layouts we write.
RENAMES: dict[str, Callable[[str], str]] = {
    "legacy": lambda k: k.replace("vision_tower.", "vision_tower.vision_model.", 1),
    "model": lambda k: "model." + k.replace("language_model.model.", "language_model.", 1),
}


def build_tiny_paligemma(folder: Path, family: str, seed: int = 0) -> Path:
    """Saves a tiny random transformers PaliGemma with weights far from their init values."""
    import torch
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    config = PaliGemmaConfig(vision_config=VISION, text_config=TEXT[family], image_token_index=IMAGE_TOKEN[family],
                             projection_dim=32, hidden_size=32, vocab_size=96)
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config).to(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):  # LayerNorm scales by w, Gemma's RMSNorm by 1 + w
                p.copy_(0.3 * torch.randn_like(p) + (1.0 if "vision_tower" in name else 0.0))
            else:  # a small embedding keeps greedy continuations varied rather than one repeated id
                p.normal_(0.0, 0.05 if "embed_tokens" in name else 0.2)
    model.save_pretrained(folder)
    return folder


def write_renamed(src: Path, dst: Path, rename: Callable[[str], str], extra: dict | None = None) -> Path:
    dst.mkdir(parents=True)
    shutil.copy(src / "config.json", dst / "config.json")
    state = {rename(k): v for k, v in load_file(str(src / "model.safetensors")).items()}
    save_file(state | (extra or {}), str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """(family, layout) -> folder; layout "saved" is what transformers' save_pretrained wrote."""
    root = tmp_path_factory.mktemp("tiny_paligemma")
    out = {}
    for seed, family in enumerate(TEXT):
        saved = out[family, "saved"] = build_tiny_paligemma(root / family / "saved", family, seed)
        for layout, rename in RENAMES.items():
            out[family, layout] = write_renamed(saved, root / family / layout, rename)
    return out


def _tensors(folder: Path) -> dict[str, bytes]:
    return {k: v.tobytes() for k, v in load_file(str(folder / "model.safetensors")).items()}


def _assert_trees_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(np.asarray(x), np.asarray(y))


# ---------------------------------------------------------------------------------------------- layouts


def test_transformers_save_layout_and_detection(folders):
    # transformers 5.x writes the legacy root, but its SiglipVisionModel has no `vision_model.` level any more.
    names = _tensors(folders["gemma", "saved"]).keys()
    assert "vision_tower.embeddings.patch_embedding.weight" in names
    assert "multi_modal_projector.linear.weight" in names and "language_model.model.embed_tokens.weight" in names
    assert not any("lm_head" in n or "vision_model" in n or n.startswith("model.") for n in names)
    assert detect_layout(names).vision == "vision_tower."
    for layout in LAYOUTS:
        assert detect_layout(_tensors(folders["gemma", layout])) == LAYOUTS[layout]
    with pytest.raises(CheckpointError, match=r"no PaliGemma vision tower found.*\['language_model'\]"):
        detect_layout({"language_model.model.norm.weight": np.zeros(3)})


@pytest.mark.parametrize("family", list(TEXT))
def test_every_layout_gives_the_same_params(folders, family):
    cfg, params, _ = read_paligemma_hf(folders[family, "saved"])
    for layout in LAYOUTS:
        other_cfg, other, _ = read_paligemma_hf(folders[family, layout])
        assert other_cfg == cfg
        _assert_trees_equal(other, params)
    # Every embedding row is kept, padding rows included: logits cover them as transformers' do.
    assert params["llm"]["embedder"]["input_embedding"].shape == (96, 32) == (cfg.llm.vocab_size, cfg.llm.width)
    assert params["img"]["head"]["kernel"].shape == (24, 32) and cfg.num_image_tokens == 16


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_hf_ours_hf_round_trip_is_byte_identical(folders, tmp_path, layout):
    for family in TEXT:
        src = folders[family, layout]
        cfg, params, hf = read_paligemma_hf(src)
        out = save_paligemma_hf(tmp_path / family, cfg, params, layout=layout, hf_config=hf)
        assert _tensors(out) == _tensors(src)
        assert json.loads((out / "config.json").read_text()) == hf
        # Stacked (scanned) layers convert to the same tensors.
        stacked = relayout_paligemma(params, cfg, scan_layers=True)
        assert "layers" in stacked["llm"] and "encoderblock" in stacked["img"]["Transformer"]
        state = paligemma_params_to_hf(stacked, cfg, layout)
        assert {k: v.tobytes() for k, v in state.items()} == _tensors(src)
    # transformers' own save (flat vision tower) converts to the legacy layout's names and the same bytes.
    cfg, params, _ = read_paligemma_hf(folders["gemma", "saved"])
    state = paligemma_params_to_hf(params, cfg, "legacy")
    assert {k: v.tobytes() for k, v in state.items()} == {
        RENAMES["legacy"](k): v for k, v in _tensors(folders["gemma", "saved"]).items()}


def test_derived_config_loads_in_transformers_with_the_same_weights(folders, tmp_path):
    import torch
    from transformers import PaliGemmaForConditionalGeneration

    for family in TEXT:
        cfg, params, _ = read_paligemma_hf(folders[family, "saved"])
        derived = paligemma_config_to_hf(cfg)
        assert paligemma_config_from_hf(derived) == cfg
        assert derived["image_token_index"] == IMAGE_TOKEN[family] and derived["text_config"]["model_type"] == family
        out = save_paligemma_hf(tmp_path / family, cfg, params, layout="model")
        ours = PaliGemmaForConditionalGeneration.from_pretrained(out).state_dict()
        ref = PaliGemmaForConditionalGeneration.from_pretrained(folders[family, "saved"]).state_dict()
        assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)
    with pytest.raises(ValueError, match="layout 'hub' is not one of"):
        paligemma_params_to_hf(params, cfg, "hub")


# ---------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize(("family", "layout"), [("gemma", "legacy"), ("gemma", "model"), ("gemma2", "model")])
def test_parity_with_transformers(folders, family, layout):
    report = run_parity(str(folders[family, layout]), greedy_tokens=GREEDY_TOKENS)
    assert report.ok and report.max_rel_err <= 1e-5 and report.tolerance == 1e-5, report.table()
    assert report.greedy_match and [len(row) for row in report.greedy_ours] == [GREEDY_TOKENS] * 2, report.table()
    assert [e.name for e in report.layers] == [
        "img/embeddings", "img/layer_0", "img/layer_1", "img/encoded", "image_tokens",
        "embeddings", "layer_0", "layer_1", "final_norm", "logits"]
    assert report.to_json()["model_type"] == "paligemma"


def test_bfloat16_parity(folders):
    report = run_parity(str(folders["gemma2", "model"]), "bfloat16", greedy_tokens=GREEDY_TOKENS)
    assert report.ok and 0 < report.max_rel_err <= report.tolerance == 3e-2, report.table()
    assert len(report.greedy_agree) == 2


def test_parity_batch_layout(folders):
    cfg = paligemma_config_from_hf(json.loads((folders["gemma", "saved"] / "config.json").read_text()))
    batch = pg_parity.paligemma_parity_batch(cfg)
    tokens, mask, mask_ar = batch["tokens"], batch["mask"], batch["mask_ar"]
    assert tokens.shape == (2, 32) and mask.sum(1).tolist() == [32, 30]  # row 1 left-padded by 2
    assert ((tokens == cfg.image_token_id).sum(1) == 16).all()
    text = tokens[mask & (tokens != cfg.image_token_id)]  # ids a tokenizer makes: never a padding row
    assert (text > 0).all() and (text < cfg.image_token_id).all()
    assert mask_ar.tolist() == [[0] * 24 + [1] * 8] * 2 and (batch["prompt_tokens"] == tokens[:, :24]).all()
    assert batch["images"].shape == (2, 16, 16, 3) and np.abs(batch["images"]).max() <= 1


def test_parity_detects_a_causal_prefix(folders, monkeypatch):
    """A check that cannot fail proves nothing: make our image + prefix attend causally."""
    real = pg_parity.jitted_prefill

    def causal_prefix(module, params, tokens, mask, *, mask_ar, **kwargs):
        return real(module, params, tokens, mask, mask_ar=jnp.ones_like(mask_ar), **kwargs)

    monkeypatch.setattr(pg_parity, "jitted_prefill", causal_prefix)
    report = run_parity(str(folders["gemma", "legacy"]), greedy_tokens=GREEDY_TOKENS)
    errors = {e.name: e.rel_err for e in report.layers}
    assert not report.ok and errors["logits"] > 1e-2
    assert errors["image_tokens"] <= 1e-5 and errors["embeddings"] <= 1e-5  # the vision side does not see the mask


def test_drill_down_names_a_planted_defect_in_the_decoder(folders, monkeypatch):
    """Our decoder's MLP activation swapped (SiLU for tanh-GELU): the vision side still agrees, the first decoder
    layer fails, and its drill-down names the MLP's hidden activations."""
    import big_vision_lite.parity as parity

    real_load = parity.load

    def planted(*args, **kwargs):
        loaded = real_load(*args, **kwargs)
        cfg = dataclasses.replace(loaded.config, llm=dataclasses.replace(loaded.config.llm, activation="silu"))
        return dataclasses.replace(loaded, module=loaded.module.clone(config=cfg), config=cfg)

    monkeypatch.setattr(parity, "load", planted)
    report = run_parity(str(folders["gemma2", "model"]), greedy_tokens=2)
    errors = {e.name: e.rel_err for e in report.layers}
    assert not report.ok and errors["image_tokens"] <= 1e-5 and errors["layer_0"] > 1e-3
    assert report.drill_down.layer == "layer_0" and report.drill_down.first_broken == "mlp_hidden", report.table()


def test_cli_parity_dispatches_on_model_type(folders, tmp_path, capsys):
    out = tmp_path / "parity.json"
    assert main(["parity", str(folders["gemma2", "legacy"]), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["model_type"] == "paligemma" and report["ok"] is True and report["greedy_match"] is True
    assert report["max_rel_err"] <= 1e-5 and len(report["greedy_ours"]) == 2
    assert "image_tokens" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- npz


def test_npz_round_trip_keeps_bfloat16_bits_and_float32(tmp_path):
    rng = np.random.default_rng(0)
    bf16 = rng.normal(size=(2, 3, 4)).astype(ml_dtypes.bfloat16)
    f32 = rng.normal(size=(5,)).astype(np.float32)
    params = {"llm": {"layers_0": {"w": bf16[0]}, "layers_1": {"w": bf16[1]}, "final_norm": {"scale": f32}},
              "img": {"Transformer": {"encoderblock_0": {"b": f32[:2]}, "encoderblock_1": {"b": f32[2:4]}}}}
    path = save_npz_params(tmp_path / "ckpt.npz", params)
    with np.load(path) as raw:  # big_vision's own format: '/'-joined keys, bfloat16 as raw 2-byte void
        assert sorted(raw.files) == ["params/img/Transformer/encoderblock/b", "params/llm/final_norm/scale",
                                     "params/llm/layers/w"]
        assert raw["params/llm/layers/w"].dtype.str == "|V2" and raw["params/llm/final_norm/scale"].dtype == np.float32
    loaded = load_npz_params(path)
    assert loaded["llm"]["layers"]["w"].dtype == ml_dtypes.bfloat16
    assert loaded["llm"]["layers"]["w"].view(np.uint16).tobytes() == bf16[:2].view(np.uint16).tobytes()
    assert np.array_equal(loaded["llm"]["final_norm"]["scale"], f32)
    assert np.array_equal(loaded["img"]["Transformer"]["encoderblock"]["b"], f32[:4].reshape(2, 2))
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_hf_to_npz_to_params_and_back_to_hf(folders, tmp_path):
    cfg, params, hf = read_paligemma_hf(folders["gemma", "legacy"])
    path = save_npz_params(tmp_path / "pt.npz", params)
    with np.load(path) as raw:
        assert "params/llm/layers/attn/q_einsum/w" in raw.files and "params/llm/layers/mlp/gating_einsum" in raw.files
        assert raw["params/img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"].shape == (2, 24, 48)
        assert raw["params/img/head/kernel"].shape == (24, 32) and raw["params/img/pos_embedding"].shape == (1, 16, 24)
    _assert_trees_equal(load_npz_params(path, cfg), params)  # scan_layers False: blocks and layers unrolled
    _assert_trees_equal(load_npz_params(path, cfg, scan_layers=True), relayout_paligemma(params, cfg, True))
    out = save_paligemma_hf(tmp_path / "hf", cfg, load_npz_params(path, cfg), hf_config=hf)
    assert _tensors(out) == _tensors(folders["gemma", "legacy"])
    # The same params cast to bfloat16 come back as bfloat16 with the same bits.
    bf16 = jax.tree.map(lambda a: np.asarray(a).astype(ml_dtypes.bfloat16), params)
    _assert_trees_equal(load_npz_params(save_npz_params(tmp_path / "bf16.npz", bf16), cfg), bf16)


def test_npz_errors_name_the_array(folders, tmp_path):
    cfg, params, _ = read_paligemma_hf(folders["gemma", "legacy"])
    path = save_npz_params(tmp_path / "pt.npz", params)
    with np.load(path) as raw:
        arrays = dict(raw)
    bad = tmp_path / "bad.npz"
    np.savez(bad, **(arrays | {"params/llm/final_norm/scale": np.zeros(31, np.float32)}))
    with pytest.raises(CheckpointError, match=r"bad\.npz: array 'params/llm/final_norm/scale' has shape \(31,\), "
                                              r"the config implies \(32,\)"):
        load_npz_params(bad, cfg)
    del arrays["params/img/head/bias"]
    np.savez(bad, **arrays)
    with pytest.raises(CheckpointError, match=r"bad\.npz: array 'params/img/head/bias' is missing"):
        load_npz_params(bad, cfg)
    with pytest.raises(CheckpointError, match=r"nothing\.npz: not found"):
        load_npz_params(tmp_path / "nothing.npz")
    with open(bad, "wb") as f:
        np.save(f, np.zeros(3))
    with pytest.raises(CheckpointError, match=r"bad\.npz: holds a single array, not an npz archive"):
        load_npz_params(bad)


# ---------------------------------------------------------------------------------------------- errors


def test_missing_and_misshapen_tensors_name_key_and_file(folders, tmp_path):
    src = folders["gemma", "legacy"]
    name = "language_model.model.layers.1.mlp.up_proj.weight"
    bad = write_renamed(src, tmp_path / "shape", lambda k: k, {name: np.zeros((63, 32), np.float32)})
    with pytest.raises(CheckpointError, match=rf"shape/model\.safetensors: tensor '{name}' has shape \(63, 32\), "
                                              r"config\.json implies \(64, 32\)"):
        load(bad)
    missing = "multi_modal_projector.linear.bias"
    bad = write_renamed(src, tmp_path / "missing", lambda k: "dropped" if k == missing else k)
    with pytest.raises(CheckpointError, match=rf"missing/model\.safetensors: tensor '{missing}' is missing"):
        load(bad)


def test_lm_head_must_equal_the_tied_embedding(folders, tmp_path):
    src = folders["gemma", "model"]
    embedding = load_file(str(src / "model.safetensors"))["model.language_model.embed_tokens.weight"]
    tied = write_renamed(src, tmp_path / "tied", lambda k: k, {"lm_head.weight": embedding})
    _assert_trees_equal(read_paligemma_hf(tied)[1], read_paligemma_hf(src)[1])
    bad = write_renamed(src, tmp_path / "untied", lambda k: k, {"lm_head.weight": embedding + 1})
    with pytest.raises(CheckpointError, match=r"tensor 'lm_head\.weight' differs from "
                                              r"'model\.language_model\.embed_tokens\.weight'"):
        load(bad)
    extra = write_renamed(src, tmp_path / "extra", lambda k: k, {"model.vision_tower.head.probe": embedding[:1]})
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['model\.vision_tower\.head\.probe'\]"):
        load(extra)


# Shaped like a released PaliGemma 1 config.json: no head_dim, image_size or hidden_activation.
RELEASED_STYLE = {
    "architectures": ["PaliGemmaForConditionalGeneration"], "model_type": "paligemma", "hidden_size": 2048,
    "image_token_index": 257152, "projection_dim": 2048, "vocab_size": 257216, "bos_token_id": 2, "eos_token_id": 1,
    "pad_token_id": 0,
    "text_config": {"model_type": "gemma", "hidden_size": 2048, "intermediate_size": 16384, "num_attention_heads": 8,
                    "num_hidden_layers": 18, "num_key_value_heads": 1, "num_image_tokens": 256, "vocab_size": 257216},
    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
                      "num_attention_heads": 16, "num_hidden_layers": 27, "num_image_tokens": 256, "patch_size": 14,
                      "projection_dim": 2048, "vision_use_head": False},
}


def test_omitted_config_keys_mean_what_transformers_gives_them():
    from transformers import PaliGemmaConfig

    cfg, ref = paligemma_config_from_hf(RELEASED_STYLE), PaliGemmaConfig(**RELEASED_STYLE)
    assert cfg.llm.head_dim == ref.text_config.head_dim == 256 and cfg.llm.activation == "gelu_tanh"
    assert cfg.vision.image_size == ref.vision_config.image_size == 224 and cfg.num_image_tokens == 256
    assert (cfg.vision.width, cfg.vision.depth, cfg.vision.head_size) == (1152, 27, 2048)
    assert cfg.image_token_id == ref.image_token_id == 257152 < cfg.llm.vocab_size == 257216  # 64 padding rows


def test_config_errors(folders):
    hf = json.loads((folders["gemma", "saved"] / "config.json").read_text())
    assert paligemma_config_from_hf({**hf, "image_token_id": 7}).image_token_id == 7  # newer name wins
    cases = [
        ({**hf, "model_type": "llava"}, "model_type 'llava' is not 'paligemma'"),
        ({**hf, "vision_config": {**hf["vision_config"], "vision_use_head": True}}, "vision_use_head is true"),
        ({**hf, "projection_dim": 24}, "projection_dim 24 differs from text_config.hidden_size 32"),
        ({**hf, "text_config": {**hf["text_config"], "model_type": "gemma3_text"}}, "'gemma3_text' is not supported"),
        ({**hf, "tie_word_embeddings": False}, "tie_word_embeddings is false"),
        ({**hf, "text_config": {k: v for k, v in hf["text_config"].items() if k != "hidden_size"}},
         r"\(text_config\): required field 'hidden_size' is missing"),
    ]
    for config, message in cases:
        with pytest.raises(CheckpointError, match=message):
            paligemma_config_from_hf(config, "cfg.json")
    cfg = paligemma_config_from_hf(hf)
    with pytest.raises(ValueError, match="1 extra experts"):
        paligemma_config_to_hf(dataclasses.replace(cfg, experts=(cfg.llm,)))
    with pytest.raises(CheckpointError, match="no PaliGemma vision tower"):
        paligemma_params_from_hf({}, cfg)


def test_bvl_generate_with_images_equals_transformers_generate(tmp_path, capsys):
    """`bvl generate FOLDER --image A --image B --prompt P1 --prompt P2` (prompts of different lengths, left-padded
    as one batch) gives transformers' greedy ids for the same processor output."""
    import torch
    from PIL import Image
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PaliGemmaForConditionalGeneration

    from big_vision_lite.data.processor import PaliGemmaProcessor

    folder = build_tiny_paligemma(tmp_path / "pg", "gemma", seed=3)
    # A word-level tokenizer of 80 ids, so "<image>" becomes id 80 (the checkpoint's image token).
    words = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"w{i}" for i in range(76)]
    rust = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    rust.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    rust.add_special_tokens(["<pad>", "<eos>", "<bos>", "<unk>"])
    rust.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}))
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(20, 16), (16, 30)]):
        paths.append(tmp_path / f"image{i}.png")
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(paths[-1])
    prompts = ["w5 w9", "w7 w1 w30 w12 w4"]
    new = 12

    argv = ["generate", str(folder), "--json", "--max-new-tokens", str(new)]
    for path, prompt in zip(paths, prompts, strict=True):
        argv += ["--image", str(path), "--prompt", prompt]
    assert main(argv) == 0
    completions = json.loads(capsys.readouterr().out)["completions"]

    processor = PaliGemmaProcessor(folder, image_size=16, num_image_tokens=16)
    batch = processor([Image.open(p) for p in paths], prompts, padding_side="left")
    assert processor.image_token_id == IMAGE_TOKEN["gemma"]
    model = PaliGemmaForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = model.generate(
            input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
            attention_mask=torch.tensor(batch["input_mask"], dtype=torch.long),
            token_type_ids=torch.tensor(batch["token_type_ids"], dtype=torch.long),
            pixel_values=torch.tensor(batch["pixel_values"]).permute(0, 3, 1, 2),
            max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    theirs = theirs[:, batch["input_ids"].shape[1]:].numpy()
    for row, completion in zip(theirs, completions, strict=True):  # ours stop at eos, theirs run on
        assert completion["tokens"] == row[:len(completion["tokens"])].tolist()
    assert min(len(c["tokens"]) for c in completions) >= 3
    assert batch["input_mask"][0, 0] == 0  # the shorter prompt really was left-padded
