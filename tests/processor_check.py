"""The check every export's processor must pass: `XProcessor.from_pretrained(out)` prepares an image as
vlbridge does, and processor + exported model generate what vlbridge generates for the same image and
prompt."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

SETTINGS = {"max_new_tokens": 5, "min_new_tokens": 5, "num_beams": 1, "do_sample": False}


def probe_image(seed: int = 3) -> Image.Image:
    """A non-square photo-like image, so the resize (and any crop) does real work."""
    return Image.fromarray((np.random.default_rng(seed).random((30, 41, 3)) * 255).astype("uint8"))


def assert_processor_matches(model, processor, hf, prompt: str, hf_prompt: str | None = None) -> None:
    """`hf_prompt` is what a transformers user types for vlbridge's `prompt` (LLaVA: the conversation)."""
    image = probe_image()
    inputs = processor(images=image, text=hf_prompt or prompt, return_tensors="pt")
    ours, theirs = model.pixel_values(image), inputs["pixel_values"]
    level = 1.01 / 255 / min(model.plan.preprocess.std)  # one 8-bit step after normalisation
    torch.testing.assert_close(theirs, ours, atol=level, rtol=0)  # transformers 5 resizes with torch, vlbridge with PIL:
    assert (theirs - ours).abs().gt(1e-5).float().mean() < 0.01  # a few pixels may round to the neighbouring level
    with torch.no_grad():
        generated = hf.generate(**inputs, **SETTINGS)[:, -SETTINGS["max_new_tokens"]:]  # the new tokens
        ids, mask = model.llm.tokenize([model.llm.format_prompt(prompt)], padding_side="left")
        visual = model.visual_tokens(ours, instructions=[prompt])  # an instruction-aware Q-Former reads it, others never
        tokens = model.llm.generate(visual, ids, mask, **SETTINGS)[:, -SETTINGS["max_new_tokens"]:]
    assert torch.equal(tokens, generated)
    assert len(set(tokens[0].tolist())) > 1 or tokens[0, 0] not in model.llm.tokenizer.all_special_ids  # not a stuck EOS
    expected = [text.strip() for text in processor.batch_decode(generated, skip_special_tokens=True)]
    assert model.generate(image, prompt, **SETTINGS) == expected
