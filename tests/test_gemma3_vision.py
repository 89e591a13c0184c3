"""Gemma 3 with vision (transformers' Gemma3ForConditionalGeneration) on tiny random models built here: loading,
parity of every stage and of greedy ids with an image, a sliding window shorter than the image, HF round trips,
and the errors a bad folder or prompt gets."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import big_vision_lite.parity as parity
from big_vision_lite.checkpoints import CheckpointError, load
from big_vision_lite.cli import main
from big_vision_lite.convert import convert
from big_vision_lite.decoding.engine import generate
from big_vision_lite.models.gemma import DecoderConfig
from big_vision_lite.models.paligemma import PaliGemmaConfig, gemma3_mask_ar
from big_vision_lite.models.vit import ViTConfig

IMAGE_TOKEN = 290
TEXT = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=8,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            rope_parameters={"full_attention": {"rope_type": "linear", "rope_theta": 1_000_000.0, "factor": 8.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})
# A 32-px image in 4-px patches: an 8 x 8 grid pooled 2 x 2 to 16 image tokens, twice the sliding window (8).
VISION = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=4, vision_use_head=False)


def build_tiny_gemma3(folder: Path, seed: int = 0, **overrides) -> Path:
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    config = Gemma3Config(text_config=TEXT, vision_config=VISION, mm_tokens_per_image=16,
                          image_token_index=IMAGE_TOKEN, boi_token_index=288, eoi_token_index=289, **overrides)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).to(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight") and "vision_tower" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))  # LayerNorm scales by w, Gemma's RMSNorm by 1 + w
            else:
                p.normal_(0.0, 0.05 if "embed_tokens" in name else 0.2)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_gemma3(tmp_path_factory.mktemp("gemma3") / "tiny")


def test_loads_as_gemma3_with_its_projector_and_window(tiny):
    loaded = load(tiny)
    cfg = loaded.config
    assert loaded.kind == "paligemma" and cfg.projector == "gemma3" and cfg.num_image_tokens == 16
    assert cfg.llm.family == "gemma3_text" and not cfg.llm.bidirectional_beyond_window
    assert set(loaded.params) == {"img", "llm", "mm_projector"} and "head" not in loaded.params["img"]
    assert loaded.params["mm_projector"]["mm_input_projection"].shape == (24, 32)


def test_gemma3_mask_ar_makes_each_image_one_block():
    tokens = np.array([[2, 5, IMAGE_TOKEN, IMAGE_TOKEN, IMAGE_TOKEN, 7, IMAGE_TOKEN, IMAGE_TOKEN, 9]])
    assert gemma3_mask_ar(tokens, IMAGE_TOKEN).tolist() == [[1, 1, 1, 0, 0, 1, 1, 0, 1]]


def test_parity_every_stage_and_greedy_ids_with_an_image(tiny):
    report = parity.run_parity(str(tiny), greedy_tokens=16)
    assert report.model_type == "gemma3" and report.ok and report.greedy_match, report.table()
    assert report.max_rel_err <= 1e-5 and len(report.greedy_ours) == 2
    names = [e.name for e in report.layers]
    assert names[:5] == ["img/embeddings", "img/layer_0", "img/layer_1", "img/encoded", "image_tokens"]
    assert names[-3:] == ["layer_2", "final_norm", "logits"]


def test_the_window_cuts_through_the_image_as_transformers_does(tiny, monkeypatch):
    """Keeping the image whole on sliding layers (PaliGemma 2's rule) is wrong for Gemma 3: the image's 16 tokens
    span twice the window, and the first sliding layer is the first to differ."""
    real_load = parity.load

    def whole_blocks(*args, **kwargs):
        loaded = real_load(*args, **kwargs)
        llm = dataclasses.replace(loaded.config.llm, bidirectional_beyond_window=True)
        cfg = dataclasses.replace(loaded.config, llm=llm)
        return dataclasses.replace(loaded, module=loaded.module.clone(config=cfg), config=cfg)

    monkeypatch.setattr(parity, "load", whole_blocks)
    report = parity.run_parity(str(tiny), greedy_tokens=2)
    errors = {e.name: e.rel_err for e in report.layers}
    assert not report.ok and errors["image_tokens"] <= 1e-5 and errors["layer_0"] > 1e-3, report.table()


def test_bfloat16_parity_against_the_truth(tiny):
    report = parity.run_parity(str(tiny), "bfloat16", greedy_tokens=8)
    assert report.ok and report.truth and all(t.passes for t in report.truth), report.table()


def test_hf_ours_hf_is_byte_exact_and_derived_config_loads_in_transformers(tiny, tmp_path):
    convert(str(tiny), tmp_path / "copy")
    with pytest.raises(ValueError, match=r"big_vision's \.npz layout is PaliGemma's"):
        convert(str(tiny), tmp_path / "g3.npz", to="npz")
    for name in ("config.json", "model.safetensors"):
        assert (tiny / name).read_bytes() == (tmp_path / "copy" / name).read_bytes()
    # Our own config.json (not the original's) describes the same model to transformers.
    import torch
    from transformers import Gemma3ForConditionalGeneration

    from big_vision_lite.checkpoints.hf_paligemma import save_paligemma_hf

    loaded = load(tiny)
    save_paligemma_hf(tmp_path / "derived", loaded.config, loaded.params, "model")
    model = Gemma3ForConditionalGeneration.from_pretrained(tmp_path / "derived", dtype=torch.float32)
    original = Gemma3ForConditionalGeneration.from_pretrained(tiny, dtype=torch.float32)
    for (name, a), (_, b) in zip(model.state_dict().items(), original.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert load(tmp_path / "derived").config == loaded.config


def test_errors_name_the_field_or_tensor(tiny, tmp_path, capsys):
    config = json.loads((tiny / "config.json").read_text())
    for change, named in [({"mm_tokens_per_image": 15}, "mm_tokens_per_image 15 must be a square"),
                          ({"mm_tokens_per_image": 9}, "divides the 8 x 8 patch grid"),
                          ({"vision_config": {**config["vision_config"], "vision_use_head": True}}, "vision_use_head"),
                          ({"text_config": {**config["text_config"], "model_type": "gemma2"}}, "gemma3_text")]:
        bad = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        bad.mkdir()
        (bad / "config.json").write_text(json.dumps({**config, **change}))
        (bad / "model.safetensors").write_bytes((tiny / "model.safetensors").read_bytes())
        with pytest.raises(CheckpointError, match=named):
            load(bad)
    # A projector whose weights disagree with the vision and text widths: the tensor is named with both shapes.
    state = load_file(str(tiny / "model.safetensors"))
    state["multi_modal_projector.mm_input_projection_weight"] = np.zeros((24, 30), np.float32)  # as saved
    wide = tmp_path / "wide"
    wide.mkdir()
    (wide / "config.json").write_text(json.dumps(config))
    save_file(state, str(wide / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"mm_input_projection_weight.*\(24, 30\).*\(24, 32\)"):
        load(wide)
    unsupported = tmp_path / "unsupported"
    unsupported.mkdir()
    (unsupported / "config.json").write_text(json.dumps({"model_type": "llava"}))
    assert main(["parity", str(unsupported)]) == 2
    assert "paligemma, gemma3" in capsys.readouterr().err


def test_a_prompt_without_its_image_tokens_is_refused(tiny):
    loaded = load(tiny)
    tokens = np.array([[2, 5, 6, IMAGE_TOKEN, 7]], np.int32)  # 1 placeholder, 16 needed
    with pytest.raises(ValueError, match=r"rows \[0\] hold \[1\] image tokens .* each row needs exactly 16"):
        generate(loaded.module, loaded.params, tokens, np.ones_like(tokens, bool), 2,
                 images=np.zeros((1, 32, 32, 3), np.float32), mask_ar=gemma3_mask_ar(tokens, IMAGE_TOKEN))


def test_config_rules():
    vision = ViTConfig(image_size=32, patch_size=4, width=24, depth=1, mlp_dim=48, num_heads=4, pool_type="none")
    llm = DecoderConfig(vocab_size=300, width=32, depth=1, mlp_dim=64, num_heads=4, num_kv_heads=2, head_dim=8)
    assert PaliGemmaConfig(vision, llm, IMAGE_TOKEN, projector="gemma3", mm_tokens_per_image=4).num_image_tokens == 4
    with pytest.raises(ValueError, match="projector 'mlp' is not one of"):
        PaliGemmaConfig(vision, llm, IMAGE_TOKEN, projector="mlp")
    with pytest.raises(ValueError, match="mm_tokens_per_image is for projector 'gemma3'"):
        PaliGemmaConfig(dataclasses.replace(vision, head_size=32), llm, IMAGE_TOKEN, mm_tokens_per_image=4)
    with pytest.raises(ValueError, match="has no head"):
        PaliGemmaConfig(dataclasses.replace(vision, head_size=32), llm, IMAGE_TOKEN, projector="gemma3",
                    mm_tokens_per_image=4)


# ---------------------------------------------------------------------------------- processor and generation
# With Gemma 3's own tokenizer (from the packaged Gemma 3 270M, which lacks only "<image_soft_token>": it gets id
# 262144, as in the multimodal tokenizer), a model with Gemma 3's vocabulary and special-token ids.
FULL_VOCAB = dict(vocab_size=262208)
SPECIAL = dict(image_token_index=262144, boi_token_index=255999, eoi_token_index=256000)


def _with_gemma3_tokenizer(folder: Path, tokenizer_folder: Path) -> Path:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tokenizer_folder / name).read_bytes())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    # What the multimodal Gemma 3 tokenizer declares, so transformers' Gemma3Processor finds its tokens.
    config["extra_special_tokens"] = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                      "image_token": "<image_soft_token>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def _build_full_vocab(folder: Path, tokenizer_folder: Path, edit=None) -> Path:
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    config = Gemma3Config(text_config={**TEXT, **FULL_VOCAB}, vision_config=VISION, mm_tokens_per_image=16,
                          **SPECIAL)
    torch.manual_seed(1)
    model = Gemma3ForConditionalGeneration(config).to(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.05 if "embed_tokens" in name else 0.2)
        if edit is not None:
            edit(model)
    model.save_pretrained(folder)
    return _with_gemma3_tokenizer(folder, tokenizer_folder)


@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory, converted) -> Path:
    return _build_full_vocab(tmp_path_factory.mktemp("gemma3_tok") / "model", converted("gemma3-270m")[1])


def _hf_processor(folder: Path, image_size: int = 32, tokens: int = 16):
    from transformers import AutoTokenizer, Gemma3ImageProcessorPil
    from transformers import Gemma3Processor as HFGemma3Processor

    return HFGemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size}),
                             tokenizer=AutoTokenizer.from_pretrained(folder), image_seq_length=tokens)


def _images():
    from PIL import Image

    rng = np.random.default_rng(0)
    wide = Image.fromarray((rng.random((20, 160, 3)) * 255).astype(np.uint8))  # 1:8
    tall = Image.fromarray((rng.random((160, 20, 4)) * 255).astype(np.uint8), "RGBA")  # 8:1, alpha on white
    grey = Image.fromarray((rng.random((7, 5)) * 255).astype(np.uint8), "L")  # tiny
    return [wide, tall, grey]


def test_processor_equals_transformers(with_tokenizer):
    from big_vision_lite.data.gemma3_processor import Gemma3Processor

    ours = Gemma3Processor(load(with_tokenizer).tokenizer, image_size=32, tokens_per_image=16)
    prompts = [ours.chat_prompt("Describe this image."), "A photo <start_of_image> of", ours.chat_prompt(" hi ")]
    batch = ours(_images(), prompts)
    theirs = _hf_processor(with_tokenizer)(images=[[im] for im in _images()], text=prompts, padding=True,
                                          padding_side="left", return_tensors="np")
    np.testing.assert_array_equal(batch["input_ids"], theirs["input_ids"])
    np.testing.assert_array_equal(batch["input_mask"], theirs["attention_mask"].astype(bool))
    np.testing.assert_array_equal(batch["token_type_ids"], theirs["token_type_ids"])
    np.testing.assert_array_equal(batch["pixel_values"], theirs["pixel_values"].transpose(0, 2, 3, 1))
    assert ours.image_token_id == 262144 and ours.end_ids == (1, 106)
    with pytest.raises(ValueError, match="prompt 0 holds 0 '<start_of_image>' markers"):
        ours(_images()[:1], ["no image here"])
    with pytest.raises(ValueError, match="got 1 images for 2 prompts"):
        ours(_images()[:1], prompts[:2])


def test_bvl_generate_with_an_image_equals_transformers(with_tokenizer, tmp_path, capsys):
    import torch
    from transformers import Gemma3ForConditionalGeneration

    image_path = tmp_path / "wide.png"
    _images()[0].save(image_path)
    assert main(["generate", str(with_tokenizer), "--image", str(image_path), "--prompt", "What is this?",
                 "--max-new-tokens", "6", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["completions"][0]
    from PIL import Image

    hf = _hf_processor(with_tokenizer)
    from big_vision_lite.data.gemma3_processor import Gemma3Processor

    inputs = hf(images=[[Image.open(image_path)]], text=[Gemma3Processor.chat_prompt("What is this?")],
                return_tensors="pt")
    model = Gemma3ForConditionalGeneration.from_pretrained(with_tokenizer, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=[1, 106])
    expected = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert row["tokens"] == expected[:len(row["tokens"])] and len(row["tokens"]) == len(expected)


def test_end_of_turn_stops_generation(converted, tmp_path, capsys):
    """A model built to answer `<end_of_turn>` at once: layers that add nothing (the residual stream is the token's
    own embedding), a final norm that keeps one dimension, where every embedding is positive and 106's largest."""
    import torch

    def answer_end_of_turn(model):
        text = model.model.language_model
        for layer in text.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        text.embed_tokens.weight[:, 0] = text.embed_tokens.weight[:, 0].abs() + 0.1
        text.embed_tokens.weight[106, 0] = 10.0
        text.norm.weight.fill_(-1.0)  # Gemma's norm scales by 1 + w: every dimension but 0 is zeroed
        text.norm.weight[0] = 0.0
        assert torch.is_tensor(text.norm.weight)

    folder = _build_full_vocab(tmp_path / "eot", converted("gemma3-270m")[1], answer_end_of_turn)
    image_path = tmp_path / "img.png"
    _images()[2].save(image_path)
    assert main(["generate", str(folder), "--image", str(image_path), "--prompt", "Hi", "--max-new-tokens", "8",
                 "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["completions"][0]
    assert row["tokens"] == [106] and row["stopped_at_end"] and row["completion"] == ""
