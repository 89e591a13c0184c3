"""llama.cpp GGUF checkpoints: `reader` (header, metadata), `tokenizer` (a `tokenizers` tokenizer from the
metadata) and `convert` (a GGUF file -> an HF folder).
"""
