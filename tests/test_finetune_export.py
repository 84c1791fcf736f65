"""Exports of fine-tuned models: transformers' BLIP-2 and LLaVA have no adapters, so the exporters
merge LoRA into the LLM's weights (on a copy; the live model keeps its adapters) and carry the
trained encoder tensors; the exported model gives the fine-tuned model's logits."""

from __future__ import annotations

import pytest
import torch

import vlbridge
from tests import hf_tiny
from tests.test_hf_blip2 import _with_image_tokens
from tests.test_hf_llava import PROMPTS, hf_inputs, make_llava, pixels
from vlbridge.finetune.lora import add_lora, has_lora, lora_parameters, merged_llm_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": None}


def as_if_trained(model, seed: int = 0, encoder: bool = True) -> None:
    """Adapters with non-zero B (fresh ones compute nothing) and (`encoder`) a moved last encoder block, as training leaves them."""
    model.tuned.lora = add_lora(model.llm, LORA)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in lora_parameters(model.llm.model).values():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
        block = model.encoder.finetune_blocks()[-1] if encoder else torch.nn.Identity()
        for param in block.parameters():
            param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.05)
    model.eval()


def test_merged_copy_leaves_the_live_model_alone():
    model = vlbridge.build("tiny-qformer-opt", stage=2)
    assert merged_llm_model(model) is model.llm.model  # no adapters: nothing to copy
    as_if_trained(model)
    live = model.llm.model
    before = {name: t.clone() for name, t in live.state_dict().items()}
    merged = merged_llm_model(model)
    assert not has_lora(merged) and has_lora(live)
    assert merged.get_input_embeddings().weight is live.get_input_embeddings().weight  # untouched tensors are shared
    q = "model.decoder.layers.0.self_attn.q_proj"
    assert not torch.equal(merged.get_submodule(q).weight, live.get_submodule(q).base_layer.weight)
    assert all(torch.equal(t, before[name]) for name, t in live.state_dict().items())
    embeds = torch.randn(1, 5, live.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(merged(inputs_embeds=embeds).logits, live(inputs_embeds=embeds).logits, atol=1e-5, rtol=1e-5)


def test_blip2_export_merges_lora_and_keeps_the_trained_encoder(tmp_path):
    from transformers import Blip2ForConditionalGeneration

    hf_tiny.make_generation_model(tmp_path / "hf", "opt")
    model = vlbridge.load(vlbridge.import_hf_blip2(tmp_path / "hf", tmp_path / "ours"))
    as_if_trained(model)
    px = hf_tiny.pixels(seed=5)
    text = model.llm.tokenizer(["a small cat", "two red"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = model(px, text.input_ids, text.attention_mask).logits
    again = Blip2ForConditionalGeneration.from_pretrained(vlbridge.export_hf_blip2(model, tmp_path / "exported")).eval()
    ids, mask = _with_image_tokens(text.input_ids, text.attention_mask, again.config.image_token_index)
    with torch.no_grad():
        exported = again(pixel_values=px, input_ids=ids, attention_mask=mask).logits
        still = model(px, text.input_ids, text.attention_mask).logits
    q = hf_tiny.NUM_QUERIES
    torch.testing.assert_close(exported[:, q:], ours[:, q:], atol=1e-4, rtol=0)  # the text positions
    assert has_lora(model.llm.model) and torch.equal(still, ours)  # the live model is as it was


def test_llava_export_merges_lora_and_keeps_the_trained_encoder(tmp_path):
    hf, tokenizer = make_llava(tmp_path / "hf")
    model = vlbridge.load(vlbridge.import_hf_llava(tmp_path / "hf", tmp_path / "imported"))
    as_if_trained(model, seed=1)  # the blocks the cut tower dropped come from its directory, the trained one from the model
    assert model.tuned.lora["target_modules"] == ["q_proj", "v_proj"]  # peft's defaults for Llama
    px, ids, mask, exported = llava_export_matches(model, tmp_path / "exported", tokenizer)
    with torch.no_grad():
        plain = hf(input_ids=ids, pixel_values=px, attention_mask=mask).logits
    assert not torch.allclose(exported, plain, atol=1e-3)  # the adapters did reach the export


def llava_export_matches(model, out, tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Export `model` as LLaVA into `out`, reload it in transformers, and assert its logits equal the
    model's on two images and PROMPTS; returns (pixels, ids, mask, the export's logits)."""
    from transformers import LlavaForConditionalGeneration

    again = LlavaForConditionalGeneration.from_pretrained(str(vlbridge.export_hf_llava(model, out))).eval()
    px = pixels(2)
    ids, mask = hf_inputs(tokenizer, again, PROMPTS)
    with torch.no_grad():
        exported = again(input_ids=ids, pixel_values=px, attention_mask=mask).logits
        ours_ids, ours_mask = model.llm.tokenize([model.llm.format_prompt(p) for p in PROMPTS], padding_side="left")
        ours = model(px, ours_ids, ours_mask).logits
    for row, length in enumerate(mask.sum(dim=1).tolist()):
        torch.testing.assert_close(ours[row, :length], exported[row, -length:], atol=1e-4, rtol=1e-4)
    return px, ids, mask, exported


def test_instructblip_export_merges_lora_and_keeps_the_trained_encoder(tmp_path):
    from transformers import InstructBlipForConditionalGeneration

    from tests.test_hf_instructblip import make_instructblip

    make_instructblip(tmp_path / "hf", "opt")
    model = vlbridge.load(vlbridge.import_hf_instructblip(tmp_path / "hf", tmp_path / "ours"))
    as_if_trained(model, seed=2)
    px = hf_tiny.pixels(seed=5)
    text = model.llm.tokenizer(["a small cat", "two red"], padding=True, return_tensors="pt")
    instructions = ["what is it?", "describe the picture"]
    with torch.no_grad():
        ours = model(px, text.input_ids, text.attention_mask, instructions=instructions).logits
    again = InstructBlipForConditionalGeneration.from_pretrained(vlbridge.export_hf_instructblip(model, tmp_path / "exported")).eval()
    ids, mask = _with_image_tokens(text.input_ids, text.attention_mask, again.config.image_token_index)
    qformer = model.connector.tokenizer(instructions, padding=True, return_tensors="pt")
    with torch.no_grad():
        exported = again(pixel_values=px, input_ids=ids, attention_mask=mask, qformer_input_ids=qformer.input_ids,
                         qformer_attention_mask=qformer.attention_mask).logits
    q = hf_tiny.NUM_QUERIES
    torch.testing.assert_close(exported[:, q:], ours[:, q:], atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["opt", "t5"])
def test_an_adapted_head_tied_to_the_embeddings_is_untied_in_the_export(tmp_path, family):
    """LoRA on lm_head, which the tiny LMs tie to their input embeddings: the merge must not change
    the embeddings, and the export must keep the merged head as a matrix of its own."""
    from transformers import Blip2ForConditionalGeneration

    hf_tiny.make_generation_model(tmp_path / "hf", family)
    model = vlbridge.load(vlbridge.import_hf_blip2(tmp_path / "hf", tmp_path / "ours"))
    live = model.llm.model
    assert live.get_output_embeddings().weight is live.get_input_embeddings().weight  # tied, as the case needs
    model.tuned.lora = add_lora(model.llm, {**LORA, "target_modules": ["q" if family == "t5" else "q_proj", "lm_head"]})
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in lora_parameters(live).values():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    model.eval()
    merged = merged_llm_model(model)
    assert torch.equal(merged.get_input_embeddings().weight, live.get_input_embeddings().weight)  # the merge left the embeddings alone
    assert not merged.config.tie_word_embeddings and live.config.tie_word_embeddings
    px = hf_tiny.pixels(seed=5)
    text = model.llm.tokenizer(["a small cat", "two red"], padding=True, return_tensors="pt")
    labels = {"labels": text.input_ids} if family == "t5" else {}
    with torch.no_grad():
        ours = model(px, text.input_ids, text.attention_mask, **labels).logits
    again = Blip2ForConditionalGeneration.from_pretrained(vlbridge.export_hf_blip2(model, tmp_path / "exported")).eval()
    ids, mask = _with_image_tokens(text.input_ids, text.attention_mask, again.config.image_token_index)
    with torch.no_grad():
        exported = again(pixel_values=px, input_ids=ids, attention_mask=mask, **labels).logits
    q = 0 if family == "t5" else hf_tiny.NUM_QUERIES  # T5's logits are the decoder's: text positions only
    torch.testing.assert_close(exported[:, q:], ours[:, q:], atol=1e-4, rtol=0)


def test_llava_export_of_an_adapted_tied_head(tmp_path):
    _, tokenizer = make_llava(tmp_path / "hf", text_override={"tie_word_embeddings": True})
    model = vlbridge.load(vlbridge.import_hf_llava(tmp_path / "hf", tmp_path / "imported"))
    live = model.llm.model
    assert live.get_output_embeddings().weight is live.get_input_embeddings().weight
    model.tuned.lora = add_lora(model.llm, {**LORA, "target_modules": ["q_proj", "lm_head"]})
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in lora_parameters(live).values():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    model.eval()
    llava_export_matches(model, tmp_path / "exported", tokenizer)
