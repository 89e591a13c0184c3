"""Gemma 3 with vision inputs: images to pixel values and prompts to the token layout of transformers'
`Gemma3Processor` (with its PIL image processor), one image per prompt.

    proc = Gemma3Processor(tokenizer, image_size=896, tokens_per_image=256)
    batch = proc(images, [proc.chat_prompt("Describe this image.")])    # left-padded, for `generate`
    text = proc.decode(generated_ids)

A prompt marks its image with "<start_of_image>"; it expands to "\\n\\n<start_of_image>" + "<image_soft_token>" *
N + "<end_of_image>\\n\\n", and the tokenizer adds BOS in front. `chat_prompt` renders one user turn of Gemma 3's
instruction-tuned chat template, `<start_of_turn>user\\n<start_of_image>{text}<end_of_turn>\\n<start_of_turn>model\\n`
(the template's BOS is the tokenizer's); generation stops at `<end_of_turn>` (`end_ids`). Images become RGB,
resized to R x R with PIL bilinear and scaled to [-1, 1] (mean and std 0.5): `pixel_values` float32 [B, R, R, 3].
Pan-and-scan (extra crops of wide images) is left out.

The batch, all [B, T], left-padded: `input_ids` int32, `input_mask` bool, `token_type_ids` int32 (1 on image
tokens, as transformers returns them), `mask_ar` int32 (`models.paligemma.gemma3_mask_ar`: each image one
bidirectional block). A tokenizer without "<image_soft_token>" (a text-only Gemma 3's) gets it as the next id after
its vocabulary, where the multimodal Gemma 3 tokenizer has it (262144).

Axis letters: B batch, T tokens, R image side.
"""

from collections.abc import Sequence

import numpy as np
from PIL import Image

from big_vision_lite.checkpoints.tokenizer import Tokenizer
from big_vision_lite.data.processor import ImageLike, normalize_pixels, resize_rgb
from big_vision_lite.decoding.engine import left_pad
from big_vision_lite.models.paligemma import gemma3_mask_ar

BOI, EOI, IMAGE_SOFT_TOKEN = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
END_OF_TURN = "<end_of_turn>"


class Gemma3Processor:
    """Turns (image, prompt) pairs into Gemma 3 batches, and generated ids back into text (module docstring)."""

    def __init__(self, tokenizer: Tokenizer, *, image_size: int, tokens_per_image: int) -> None:
        self.tokenizer = tokenizer
        missing = [t for t in (BOI, EOI, END_OF_TURN) if tokenizer.token_to_id(t) is None]
        if missing or tokenizer.bos_id is None:
            raise ValueError(f"{tokenizer!r} is not a Gemma 3 tokenizer: it lacks {missing or 'a BOS token'}")
        known = tokenizer.token_to_id(IMAGE_SOFT_TOKEN)
        self.image_token_id = tokenizer.vocab_size if known is None else known
        self.image_size, self.tokens_per_image = image_size, tokens_per_image
        self.end_ids = (*tokenizer.eos_ids, tokenizer.token_to_id(END_OF_TURN))

    @staticmethod
    def chat_prompt(text: str) -> str:
        """One user turn with its image first, ready for the model's answer (Gemma 3's chat template)."""
        return f"<start_of_turn>user\n{BOI}{text.strip()}{END_OF_TURN}\n<start_of_turn>model\n"

    def encode(self, prompt: str, index: int = 0) -> list[int]:
        """BOS + the prompt's ids, its one "<start_of_image>" expanded to the image's tokens."""
        if prompt.count(BOI) != 1:
            raise ValueError(f"prompt {index} holds {prompt.count(BOI)} {BOI!r} markers; each prompt needs exactly "
                             f"one, where its image goes (chat_prompt puts it there)")
        before, after = prompt.split(BOI)
        # The markers are special tokens, so the tokenizer splits the text at them as transformers' does.
        return (self.tokenizer.encode(f"{before}\n\n{BOI}") + [self.image_token_id] * self.tokens_per_image
                + self.tokenizer.encode(f"{EOI}\n\n{after}", add_bos=False))

    def __call__(self, images: Sequence[ImageLike], prompts: Sequence[str]) -> dict[str, np.ndarray]:
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images for {len(prompts)} prompts; give one image per prompt")
        pad = self.tokenizer.pad_id or 0
        tokens, mask = left_pad([self.encode(p, i) for i, p in enumerate(prompts)], pad)
        rgb = np.stack([resize_rgb(image, self.image_size, index=i, resample=Image.Resampling.BILINEAR)
                        for i, image in enumerate(images)])
        return {"input_ids": tokens, "input_mask": mask,
                "token_type_ids": (tokens == self.image_token_id).astype(np.int32),
                "mask_ar": gemma3_mask_ar(tokens, self.image_token_id), "pixel_values": normalize_pixels(rgb)}

    def decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids, without special tokens (the end of turn included)."""
        return self.tokenizer.decode([i for i in ids if i != self.image_token_id])
