"""Every published size, checked without downloading or allocating it: our parameter tree built abstractly
(`jax.eval_shape`) against transformers' model built on PyTorch's meta device from the same config.json."""

import pytest

from big_vision_lite.checkpoints.hf_paligemma import LAYOUTS, expected_paligemma_shapes
from big_vision_lite.checkpoints.hf_siglip import expected_siglip_shapes
from big_vision_lite.checkpoints.presets import PRESETS, parameter_count
from big_vision_lite.cli import main


def _meta_model(preset):
    import torch
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        Siglip2Config,
        Siglip2Model,
        SiglipConfig,
        SiglipModel,
    )

    config_class, model_class = {"paligemma": (PaliGemmaConfig, PaliGemmaForConditionalGeneration),
                                 "gemma3": (Gemma3Config, Gemma3ForConditionalGeneration),
                                 "siglip": (SiglipConfig, SiglipModel),
                                 "siglip2": (Siglip2Config, Siglip2Model)}[preset.hf_config["model_type"]]
    fields = {k: v for k, v in preset.hf_config.items() if k != "model_type"}
    with torch.device("meta"):
        return model_class(config_class(**fields))


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_matches_transformers_tensor_by_tensor(name):
    preset = PRESETS[name]
    model = _meta_model(preset)
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    cfg = preset.config()
    if preset.kind == "paligemma":
        ours = expected_paligemma_shapes(cfg, LAYOUTS["model"])
        assert theirs.pop("lm_head.weight") == ours["model.language_model.embed_tokens.weight"]  # tied
    else:
        ours = expected_siglip_shapes(cfg)
    assert ours == theirs  # every name and every shape
    unique = sum(p.numel() for p in model.parameters())  # tied parameters counted once
    assert parameter_count(preset) == unique
    # Within 0.02% of the publisher's figure, whose vocabulary and rounding differ slightly (presets.py).
    assert abs(unique - preset.published) <= 2e-4 * preset.published


def test_bvl_models_lists_every_preset_with_its_size(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name, preset in PRESETS.items():
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert f"{parameter_count(preset):,}" in line and f"{preset.published:,}" in line
