"""PaliGemma fine-tuning on the shared loop: the CLI run end to end (SigLIP tower trained first), the suffix-only
loss, freezing and LoRA, and reading attributes back from generated captions."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from big_vision_lite.checkpoints import load
from big_vision_lite.checkpoints.run import load_params, read_run_info
from big_vision_lite.convert import convert
from big_vision_lite.parity import run_parity, torch_side
from big_vision_lite.parity.paligemma import paligemma_parity_batch
from big_vision_lite.train.config import apply_overrides, load_config
from big_vision_lite.train.loop import train
from big_vision_lite.train.metrics import read_metrics
from big_vision_lite.train.tasks.paligemma import (
    PaliGemmaTask,
    attribute_accuracies,
    caption_eval_sources,
    caption_loss,
    check_same_data,
    parse_shapes_caption,
)

SMOKE = "paligemma_shapes_caption:smoke"


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    """A finished SigLIP smoke run, shared by the tests (each PaliGemma run would otherwise train one)."""
    workdir = tmp_path_factory.mktemp("siglip")
    train(load_config("siglip_shapes:smoke"), workdir, progress=False)
    return workdir


def _config(siglip_dir, *overrides: str) -> ml_collections.ConfigDict:
    return apply_overrides(load_config(SMOKE), [f"init.siglip_workdir={siglip_dir}", *overrides])


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, siglip_dir):
    workdir = tmp_path_factory.mktemp("pg") / "run"
    run = subprocess.run([sys.executable, "-m", "big_vision_lite.cli", "train", SMOKE, "--workdir", str(workdir),
                          "--set", f"init.siglip_workdir={siglip_dir}"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return workdir, run.stdout


def test_cli_trains_from_the_siglip_tower_and_evaluates_captions(cli_run, siglip_dir):
    workdir, stdout = cli_run
    assert "eval/caption_exact_match" in stdout
    records = read_metrics(workdir / "metrics.jsonl")
    evals = [r for r in records if "eval/caption_exact_match" in r]
    assert evals and set(evals[-1]) >= {"eval/colour_acc", "eval/shape_acc", "eval/size_acc", "eval/position_acc",
                                        "eval/novel_pairs/caption_exact_match", "eval/novel_pairs/shape_acc"}
    assert all(0.0 <= evals[-1][k] <= 1.0 for k in evals[-1] if k.startswith("eval/"))
    assert (workdir / "tokenizer").is_dir() and (workdir / "curves.png").is_file()

    # The vision tower started from SigLIP's (then trained): its patch embedding moved little, the projector is new.
    _, siglip = load_params(siglip_dir)
    _, params = load_params(workdir)
    assert set(params["img"]) >= {"embedding", "pos_embedding", "Transformer", "head"}
    assert "MAPHead_0" not in params["img"]
    start, end = siglip["img"]["embedding"]["kernel"], params["img"]["embedding"]["kernel"]
    assert np.abs(end - start).max() < 0.1 * np.abs(start).max()
    assert json.loads((workdir / "result.json").read_text())["final_step"] == 4


def test_loss_covers_the_suffix_only(siglip_dir, tmp_path):
    config = _config(siglip_dir)
    task = PaliGemmaTask(config, tmp_path, mesh=None)
    params = task.init_params(jax.random.key(0))
    batch = jax.tree.map(jnp.asarray, next(task.batches(0)))
    loss, metrics, _ = task.train_grads(params, batch, jax.random.key(1))

    logits = np.asarray(task._logits(params, batch), np.float64)
    ids, weights = np.asarray(batch["input_ids"]), np.asarray(batch["loss_mask"])
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    targets = np.take_along_axis(log_probs[:, :-1], ids[:, 1:, None], axis=-1)[..., 0]
    expected = -(targets * weights[:, 1:]).sum() / weights[:, 1:].sum()
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    # Every loss position is a caption token or eos; the image tokens and the prompt never are.
    image_cols = ids == task.processor.image_token_id
    assert not (weights & image_cols).any() and weights.sum(1).min() > 5
    assert 0.0 <= float(metrics["token_accuracy"]) <= 1.0


class _GivenLogits:
    """A stand-in model whose "parameters" are the logits [B, T, V] it returns."""

    def apply(self, variables, *args, **kwargs):
        return variables["params"], None, None


def test_caption_loss_and_accuracy_on_given_logits():
    """Cross-entropy of each next token and greedy accuracy, at the loss positions only, against numpy (argmax)."""
    rng = np.random.default_rng(3)
    b, t, v = 3, 7, 11
    ids = rng.integers(0, v, size=(b, t)).astype(np.int32)
    loss_mask = rng.random((b, t)) < 0.6
    logits = rng.normal(size=(b, t, v)).astype(np.float32)
    rows, cols = np.nonzero(rng.random((b, t - 1)) < 0.5)  # about half the positions predict their target
    logits[rows, cols, ids[rows, cols + 1]] = 5.0
    batch = {"input_ids": ids, "input_mask": np.ones((b, t), bool), "mask_ar": np.zeros((b, t), np.int32),
             "loss_mask": loss_mask, "image": np.zeros((b, 2, 2, 3), np.float32)}
    loss, accuracy = caption_loss(_GivenLogits(), jnp.asarray(logits), jax.tree.map(jnp.asarray, batch))

    weights = loss_mask[:, 1:].astype(np.float64)
    x = logits[:, :-1].astype(np.float64)
    log_probs = x - x.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    ce = -np.take_along_axis(log_probs, ids[:, 1:, None], axis=-1)[..., 0]
    np.testing.assert_allclose(float(loss), (ce * weights).sum() / weights.sum(), rtol=1e-6)
    want = ((x.argmax(-1) == ids[:, 1:]) * weights).sum() / weights.sum()
    assert 0.2 < want < 0.8  # the test sees both outcomes
    np.testing.assert_allclose(float(accuracy), want, rtol=1e-6)


def test_lora_with_frozen_base_trains_only_the_adapters(siglip_dir, tmp_path):
    config = _config(siglip_dir, "total_steps=2", "eval_every=2", "ckpt_every=2")
    config.model.llm.lora = {"rank": 2, "alpha": 2.0}
    config.trainable = [".*lora_"]
    train(config, tmp_path / "lora", progress=False)
    _, params = load_params(tmp_path / "lora")
    task = PaliGemmaTask(config, tmp_path / "lora", mesh=None)
    initial = jax.tree.map(np.asarray, jax.jit(task.init_params)(jax.random.split(jax.random.PRNGKey(0))[0]))
    flat_end = dict(jax.tree_util.tree_leaves_with_path(params))
    flat_start = dict(jax.tree_util.tree_leaves_with_path(initial))
    adapters = [p for p in flat_end if "lora_" in jax.tree_util.keystr(p)]
    assert any("lora_b" in jax.tree_util.keystr(p) for p in adapters)
    for path, value in flat_end.items():
        moved = np.abs(value - flat_start[path]).max()
        if path in adapters:
            continue
        assert moved == 0, f"{jax.tree_util.keystr(path)} moved by {moved} although frozen"
    assert max(np.abs(flat_end[p] - flat_start[p]).max() for p in adapters) > 0

    # Exported merged (nothing dropped), the HF folder gives transformers our logits and our greedy caption.
    report = convert(str(tmp_path / "lora"), tmp_path / "hf")
    assert report["lora_merged"] and "merged logits within" in report["verified"], report
    assert "lora" not in (tmp_path / "hf" / "config.json").read_text()
    parity = run_parity(str(tmp_path / "hf"))
    assert parity.ok and parity.greedy_match, parity.table()  # float32: ok demands the same greedy ids too
    _check_peft_export(tmp_path / "lora", tmp_path / "hf", tmp_path / "hf_adapter")


def _check_peft_export(run: Path, merged: Path, destination: Path) -> None:
    """`--lora adapter`: the base model plus PEFT adapter files, which transformers + PEFT run to the merged
    export's logits and greedy ids (the merged export equals our adapted model, above); without the adapter the
    base model computes something else."""
    import torch
    from peft import PeftModel
    from transformers import PaliGemmaForConditionalGeneration

    report = convert(str(run), destination, lora="adapter")
    assert not report["lora_merged"] and report["lora_adapter"] == str(destination / "adapter"), report
    assert "every adapter reads back from the PEFT files bit for bit" in report["verified"]
    assert "lora" not in (destination / "config.json").read_text()
    assert sorted(p.name for p in (destination / "adapter").iterdir()) == ["adapter_config.json",
                                                                            "adapter_model.safetensors"]
    # An adapter export of a model without adapters, or into an .npz, is refused before anything is written.
    with pytest.raises(ValueError, match="no LoRA adapters"):
        convert(str(merged), destination.parent / "none", lora="adapter")
    with pytest.raises(ValueError, match="no place for adapters"):
        convert(str(run), destination.parent / "x.npz", to="npz", lora="adapter")
    assert not (destination.parent / "none").exists() and not (destination.parent / "x.npz").exists()

    def torch_model(folder: Path):
        return PaliGemmaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()

    base = torch_model(destination)
    batch = paligemma_parity_batch(load(merged).config)
    long = torch_side.long_tensor
    inputs = dict(input_ids=long(batch["tokens"]), attention_mask=long(batch["mask"]),
                  token_type_ids=long(batch["mask_ar"]),
                  pixel_values=torch_side.pixels_nchw(batch["images"], torch.float32))
    with torch.no_grad():
        base_logits = base(**inputs).logits.numpy()
        adapted = PeftModel.from_pretrained(base, destination / "adapter").eval()
        peft_logits, merged_logits = adapted(**inputs).logits.numpy(), torch_model(merged)(**inputs).logits.numpy()
    relative = lambda a, b: float(np.abs(a - b).max() / np.abs(b).max())  # noqa: E731
    assert relative(peft_logits, merged_logits) <= 1e-5
    assert relative(base_logits, merged_logits) >= 100 * relative(peft_logits, merged_logits) > 0
    prompts, mask = batch["prompt_tokens"], batch["prompt_mask"]
    greedy = {name: torch_side.greedy(model, prompts, mask, 8, token_type_ids=torch_side.long_tensor(
        np.zeros_like(prompts)), pixel_values=inputs["pixel_values"])["ids"] for name, model in
        (("peft", adapted), ("merged", torch_model(merged)))}
    np.testing.assert_array_equal(greedy["peft"], greedy["merged"])


def test_attributes_are_read_back_from_captions():
    data = load_config(SMOKE).data
    assert parse_shapes_caption("a small red circle at the top left", data) == {
        "colour": "red", "shape": "circle", "size": "small", "position": "top left"}
    assert parse_shapes_caption("a large cyan cross at the top", data)["position"] == "top"
    assert parse_shapes_caption("a blob", data) == {"colour": None, "shape": None, "size": None, "position": None}
    truth = ["a small red circle at the top left", "a large blue square in the center"]
    predicted = ["a small red square at the top left", "a large blue square on the left"]
    assert attribute_accuracies(predicted, truth, data) == {
        "eval/colour_acc": 1.0, "eval/shape_acc": 0.5, "eval/size_acc": 1.0, "eval/position_acc": 0.5}


def test_shapes_are_scored_on_new_images_of_trained_pairs_and_on_novel_pairs():
    from big_vision_lite.data.shapes import held_out_pairs

    data = load_config(SMOKE).data
    sources = caption_eval_sources(data)
    assert list(sources) == ["eval/", "eval/novel_pairs/"]
    spec = sources["eval/"].spec
    novel = set(held_out_pairs(spec))

    def pairs(source):
        return {tuple(e["caption"].split()[2:4]) for e in source.__getitems__(range(len(source)))}

    assert pairs(sources["eval/"]).isdisjoint(novel) and len(sources["eval/"]) == 540  # every trained combination
    assert pairs(sources["eval/novel_pairs/"]) == novel


def test_a_siglip_tower_trained_on_other_data_is_refused(siglip_dir, tmp_path):
    data = load_config(SMOKE).data
    check_same_data(data, load_config("siglip_shapes").data, "siglip_shapes")
    other = apply_overrides(load_config("siglip_shapes"), ["data.holdout_fraction=0.3"]).data
    with pytest.raises(ValueError, match=r"data.holdout_fraction 0.25 differs from the SigLIP run's 0.3"):
        check_same_data(data, other, "x.py")
    with pytest.raises(ValueError, match=r"data.name 'shapes' differs from the SigLIP run's 'folder'"):
        check_same_data(data, apply_overrides(load_config("siglip_shapes"), ["data.name=folder"]).data, "x")
    # Through the task: the SigLIP run of siglip_dir was trained on 32-pixel images, this config asks for 48.
    with pytest.raises(ValueError, match=r"data.image_size 48 differs from the SigLIP run.s 32 \(init.siglip_config"):
        PaliGemmaTask(_config(siglip_dir, "data.image_size=48"), tmp_path, mesh=None)


def test_the_tower_is_checked_against_the_config_the_siglip_run_trained_with(siglip_dir, tmp_path):
    """The SigLIP run's own config.json decides, not its config file as it reads today (edited since)."""
    edited = tmp_path / "siglip_edited.py"
    edited.write_text("from big_vision_lite.train.config import load_config\n"
                      "def get_config(arg=None):\n"
                      "    config = load_config('siglip_shapes:smoke')\n"
                      "    config.data.image_size = 48\n"
                      "    return config\n")
    config = _config(siglip_dir, f"init.siglip_config={edited}")
    task = PaliGemmaTask(config, tmp_path / "run", mesh=None)  # the run trained at 32 pixels, as this config asks
    assert task.model.config.vision.image_size == 32


def test_cli_generates_with_images_from_a_training_run(cli_run, tmp_path):
    """`bvl generate RUN --image A --image B --prompt P --prompt P` equals the task's own greedy captions."""
    from PIL import Image

    from big_vision_lite.data.processor import PaliGemmaProcessor
    from big_vision_lite.data.shapes import ShapesSpec, shapes_batch
    from big_vision_lite.decoding.engine import generate

    workdir, _ = cli_run
    loaded = load(workdir)  # a training workdir is a checkpoint like any other
    assert loaded.kind == "paligemma" and loaded.source == workdir
    module, params, cfg = loaded.module, loaded.params, loaded.config
    processor = PaliGemmaProcessor(loaded.tokenizer, image_size=cfg.vision.image_size,
                                   num_image_tokens=cfg.num_image_tokens)
    prompt = read_run_info(workdir).prompt
    data = load_config(SMOKE).data
    spec = ShapesSpec(image_size=data.image_size, colours=tuple(data.colours), shapes=tuple(data.shapes))
    examples = shapes_batch(spec, "test", [0, 5])
    paths = []
    for i, example in enumerate(examples):
        paths.append(tmp_path / f"shape{i}.png")
        Image.fromarray(example["image"]).save(paths[-1])
    run = subprocess.run([sys.executable, "-m", "big_vision_lite.cli", "generate", str(workdir), "--image",
                          str(paths[0]), "--image", str(paths[1]), "--prompt", prompt, "--prompt", prompt,
                          "--max-new-tokens", "12", "--json"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    completions = json.loads(run.stdout)["completions"]
    assert [c["image"] for c in completions] == [str(p) for p in paths]

    batch = processor([Image.open(p) for p in paths], [prompt, prompt], padding_side="left")
    expected = generate(module, params, batch["input_ids"], batch["input_mask"], 12, images=batch["pixel_values"],
                        mask_ar=batch["mask_ar"], end_ids=processor.tokenizer.eos_ids, pad_id=processor.pad_id)
    for completion, ids, length in zip(completions, expected.tokens, expected.lengths, strict=True):
        assert completion["tokens"] == ids[:length].tolist()
        assert completion["completion"] == processor.decode(ids[:length])


def test_generate_with_images_refuses_bad_inputs(cli_run, tmp_path):
    workdir, _ = cli_run
    from big_vision_lite.generate import generate_image_text

    with pytest.raises(ValueError, match="2 images for 3 prompts"):
        generate_image_text(str(workdir), ["a.png", "b.png"], ["x", "y", "z"])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"broken\.png: cannot be read"):
        generate_image_text(str(workdir), [str(tmp_path / "broken.png")], ["caption"])
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "fine.png")
    with pytest.raises(ValueError, match=r"not a model: it holds neither config\.json .* nor model\.json"):
        generate_image_text(str(tmp_path), [str(tmp_path / "fine.png")], ["caption"])
