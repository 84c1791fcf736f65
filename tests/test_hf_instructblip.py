"""InstructBLIP parity on tiny random transformers models (OPT, Llama and FlanT5 language models):
the imported instruction-aware Q-Former gives transformers' logits and generated tokens for the same
image, Q-Former instruction and prompt; export round-trips; and the `instruction_aware` option
trains in stage 2 with the instruction reaching the queries."""

from __future__ import annotations

import pytest
import torch

import vlbridge
from tests import hf_tiny
from tests.test_hf_blip2 import _with_image_tokens
from vlbridge.errors import VLBridgeError, WeightsError
from vlbridge.plugins.tiny_assets import tokenizer_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")
Q = hf_tiny.NUM_QUERIES
INSTRUCTIONS = ["what is it?", "how many red circles are there on the left?"]


def make_instructblip(directory, llm: str, seed: int = 0):
    """A tiny InstructBlipForConditionalGeneration saved with its LLM tokenizer and the Q-Former's BERT
    tokenizer in qformer_tokenizer/, as InstructBlipProcessor saves them."""
    from transformers import AutoTokenizer, InstructBlipConfig, InstructBlipForConditionalGeneration

    config = InstructBlipConfig(vision_config=hf_tiny._vision(), qformer_config=hf_tiny._qformer(), text_config=hf_tiny._text(llm),
                                num_query_tokens=Q, image_token_index=hf_tiny.IMAGE_TOKEN)
    torch.manual_seed(seed)
    model = InstructBlipForConditionalGeneration(config).eval()
    hf_tiny.redraw(model, seed=seed)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(tokenizer_dir("flan-t5" if llm == "t5" else "opt")).save_pretrained(directory)
    AutoTokenizer.from_pretrained(tokenizer_dir("bert")).save_pretrained(directory / "qformer_tokenizer")
    return model


@pytest.fixture(scope="module", params=["opt", "llama", "t5"])
def imported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"instructblip-{request.param}")
    reference = make_instructblip(root / "hf", request.param)
    model = vlbridge.load(vlbridge.import_hf_instructblip(root / "hf", root / "ours")).eval()
    return request.param, reference, model, root


def _qformer_inputs(model, texts):
    encoded = model.connector.tokenizer(texts, padding=True, return_tensors="pt")
    return {"qformer_input_ids": encoded.input_ids, "qformer_attention_mask": encoded.attention_mask}


def test_import_names_the_generic_llm_where_needed(imported):
    llm, _, model, _ = imported
    assert model.plan.llm.name == {"opt": "opt", "llama": "hf-causal-lm", "t5": "flan-t5"}[llm]
    assert model.assembly.connector.options.instruction_aware


def test_import_gives_the_same_logits(imported):
    llm, reference, model, _ = imported
    pixels = hf_tiny.pixels()
    text = model.llm.tokenizer(["a red", "two blue circles on the"], padding=True, padding_side="right", return_tensors="pt")
    ids, mask = _with_image_tokens(text.input_ids, text.attention_mask)
    extra = {}
    if llm == "t5":
        labels = model.llm.tokenizer(["red circle", "blue"], padding=True, return_tensors="pt")
        extra = {"labels": labels.input_ids, "decoder_attention_mask": labels.attention_mask}
    with torch.no_grad():
        expected = reference(pixel_values=pixels, input_ids=ids, attention_mask=mask, **_qformer_inputs(model, INSTRUCTIONS), **extra).logits
        ours = model(pixels, text.input_ids, text.attention_mask, instructions=INSTRUCTIONS, **extra).logits
    assert ours.shape == expected.shape
    real = (extra["decoder_attention_mask"] if llm == "t5" else mask).bool()
    torch.testing.assert_close(ours[real], expected[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_import_generates_the_same_tokens(imported, num_beams):
    llm, reference, model, _ = imported
    pixels = hf_tiny.pixels()
    settings = {"max_new_tokens": 6, "min_new_tokens": 6, "num_beams": num_beams}
    side = "right" if llm == "t5" else "left"
    prompt = model.llm.tokenizer(INSTRUCTIONS, padding=True, padding_side=side, return_tensors="pt")
    ids, mask = _with_image_tokens(prompt.input_ids, prompt.attention_mask)
    with torch.no_grad():
        expected = reference.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, **_qformer_inputs(model, INSTRUCTIONS),
                                      **settings)[:, -6:]  # the generated tokens, without the prompt or start token
    ours = model.generate(pixels, INSTRUCTIONS, **settings)  # the prompt is the instruction, as InstructBLIP
    assert ours == model.llm.decode(expected)
    # the instruction matters: another one changes the queries' output
    with torch.no_grad():
        assert not torch.allclose(model.visual_tokens(pixels, instructions=INSTRUCTIONS),
                                  model.visual_tokens(pixels, instructions=["describe it", "describe it"]))


def test_export_round_trips_to_transformers(imported):
    from transformers import InstructBlipForConditionalGeneration

    _, reference, model, root = imported
    out = vlbridge.export_hf_instructblip(model, root / "back")
    again = InstructBlipForConditionalGeneration.from_pretrained(str(out)).eval()
    hf_tiny.assert_same_weights(reference.state_dict(), again.state_dict())
    assert (out / "qformer_tokenizer" / "tokenizer_config.json").is_file()
    pixels = hf_tiny.pixels()
    text = model.llm.tokenizer(["a red"], return_tensors="pt")
    ids, mask = _with_image_tokens(text.input_ids, text.attention_mask)
    extra = {"labels": text.input_ids} if model.llm.is_encoder_decoder else {}
    inputs = dict(pixel_values=pixels[:1], attention_mask=mask, **_qformer_inputs(model, INSTRUCTIONS[:1]), **extra)
    again_ids = ids.masked_fill(ids.eq(hf_tiny.IMAGE_TOKEN), again.config.image_token_index)  # the exported tokenizer's <image>
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=again_ids, **inputs).logits, reference(input_ids=ids, **inputs).logits, atol=1e-5, rtol=0)


def test_import_refuses_a_directory_without_the_qformer_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "instructblip"}')
    with pytest.raises(WeightsError, match="qformer_tokenizer"):
        vlbridge.import_hf_instructblip(tmp_path, tmp_path / "out")
    (tmp_path / "config.json").write_text('{"model_type": "blip-2"}')
    with pytest.raises(WeightsError, match="expected 'instructblip'"):
        vlbridge.import_hf_instructblip(tmp_path, tmp_path / "out")


def test_import_keeps_only_the_qformer_tokenizer_not_what_else_its_folder_holds(tmp_path):
    """The tokenizer is re-saved, not its folder copied: a link in it to a file outside (a secret) is
    not read into the checkpoint, which the user may share."""
    make_instructblip(tmp_path / "hf", "opt")
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET\n")
    (tmp_path / "hf" / "qformer_tokenizer" / "notes.txt").symlink_to(secret)
    out = vlbridge.import_hf_instructblip(tmp_path / "hf", tmp_path / "ours")
    copied = out / "qformer-tokenizer"
    assert not (copied / "notes.txt").exists()
    assert not any("TOP SECRET" in f.read_text(errors="replace") for f in copied.iterdir())
    model = vlbridge.load(out)
    assert model.connector.tokenizer("what is it?").input_ids == model.connector.tokenizer.__class__.from_pretrained(
        tokenizer_dir("bert"))("what is it?").input_ids


def _aware(**qformer):
    return {"name": "aware", "encoder": {"use": "eva-vit-g", "options": {"variant": "tiny"}},
            "connector": {"use": "qformer", "options": {"variant": "tiny", "num_query_tokens": 4, **qformer}},
            "llm": {"use": "opt", "options": {"variant": "tiny"}}}


def test_instruction_aware_stage2_trains_the_text_side_and_counts_it():
    from vlbridge.train.objectives import Stage2Objective

    plain, aware = vlbridge.load_assembly(_aware()), vlbridge.load_assembly(_aware(instruction_aware=True))
    assert aware.plan.trainable_params[2] > plain.plan.trainable_params[2]
    torch.manual_seed(0)
    model = vlbridge.build(_aware(instruction_aware=True), stage=2)
    assert model.num_parameters(trainable=True) == aware.plan.trainable_params[2]
    images = torch.randint(0, 255, (4, 3, 56, 56), dtype=torch.uint8)
    batch = {"text_output": ["red", "blue", "two", "yes"], "image_embeds": model.encode_images(model.pixel_values(images)),
             "text_input": ["what colour?", "what colour?", "how many?", "is there a star?"]}
    word = model.connector.embeddings.word.weight.detach().clone()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = Stage2Objective()(model, batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert not torch.equal(word, model.connector.embeddings.word.weight)  # the instruction's embeddings trained
    assert len(model.answer(images[:2], ["what colour?", "how many?"], max_new_tokens=3)) == 2


def test_an_instruction_aware_checkpoint_is_refused_by_a_plain_assembly_and_not_the_other_way(tmp_path):
    """An InstructBLIP stage-2 checkpoint fits a plain Q-Former tensor for tensor; loaded so (--weights,
    init_from) its queries silently ran without the instruction they were trained to read."""
    vlbridge.build(_aware(instruction_aware=True), stage=2).save(tmp_path / "aware")
    with pytest.raises(WeightsError, match="instruction_aware: true"):
        vlbridge.build(_aware(), stage=2, weights=tmp_path / "aware")
    vlbridge.build(_aware(), stage=1, weights=tmp_path / "aware")  # no LLM: the queries' own features (retrieval)
    vlbridge.build(_aware(), stage=2).save(tmp_path / "plain")
    assert vlbridge.build(_aware(instruction_aware=True), stage=2, weights=tmp_path / "plain").connector.instruction_aware


def test_a_string_given_as_the_instructions_is_refused_not_read_per_character():
    """list("abc") is three instructions: a string for a batch of as many images ran each character as one."""
    model = vlbridge.build(_aware(instruction_aware=True), stage=2).eval()
    embeds = torch.zeros(3, 5, model.plan.encoder_out.width)
    with pytest.raises(VLBridgeError, match="list of strings, one per image"):
        model.visual_tokens(image_embeds=embeds, instructions="abc")


def test_a_plain_qformer_refuses_instructions():
    model = vlbridge.build(_aware(), stage=2)
    with pytest.raises(VLBridgeError, match="not instruction-aware"):
        model.connector(torch.zeros(1, 5, model.plan.encoder_out.width), instructions=["x"])


def test_cli_import_ask_and_export(tmp_path, capsys):
    from vlbridge.cli.main import main

    make_instructblip(tmp_path / "hf", "opt")
    assert main(["import", "hf-instructblip", str(tmp_path / "hf"), str(tmp_path / "ckpt")]) == 0
    image = tmp_path / "image.png"
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 30, 30)).save(image)
    capsys.readouterr()
    assert main(["ask", "--checkpoint", str(tmp_path / "ckpt"), "-q", "what colour is it?", str(image)]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["export", "hf-instructblip", str(tmp_path / "ckpt"), str(tmp_path / "back")]) == 0
    assert main(["import", "hf-instructblip", str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2


def test_export_ships_a_processor_that_prepares_and_generates_like_vlbridge(imported):
    from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

    from tests.processor_check import assert_processor_matches

    _, _, model, root = imported
    out = vlbridge.export_hf_instructblip(model, root / "with-processor")
    processor = InstructBlipProcessor.from_pretrained(str(out))
    assert processor.num_query_tokens == Q and (out / "preprocessor_config.json").is_file()
    assert_processor_matches(model, processor, InstructBlipForConditionalGeneration.from_pretrained(str(out)).eval(), "what is it?")


def test_a_long_instruction_is_cut_to_the_qformers_positions(tmp_path):
    """InstructBLIP's 128-token instruction limit, on a Q-Former with 24 positions: cut to 24, as
    InstructBlipProcessor would need, not an error about vlbridge's own 128."""
    from transformers import AutoTokenizer, InstructBlipConfig, InstructBlipForConditionalGeneration

    config = InstructBlipConfig(vision_config=hf_tiny._vision(), qformer_config={**hf_tiny._qformer(), "max_position_embeddings": 24},
                                text_config=hf_tiny._text("opt"), num_query_tokens=Q, image_token_index=hf_tiny.IMAGE_TOKEN)
    torch.manual_seed(0)
    InstructBlipForConditionalGeneration(config).eval().save_pretrained(tmp_path / "hf")
    AutoTokenizer.from_pretrained(tokenizer_dir("opt")).save_pretrained(tmp_path / "hf")
    AutoTokenizer.from_pretrained(tokenizer_dir("bert")).save_pretrained(tmp_path / "hf" / "qformer_tokenizer")
    model = vlbridge.load(vlbridge.import_hf_instructblip(tmp_path / "hf", tmp_path / "ours")).eval()
    ids, mask = model.connector.tokenize_instructions(["describe " * 40])
    assert ids.shape == (1, 24) and mask.all()
    with torch.no_grad():
        assert model.visual_tokens(hf_tiny.pixels(1), instructions=["describe " * 40]).shape[:2] == (1, Q)


def test_an_imported_model_reads_an_instruction_longer_than_128_tokens_whole(tmp_path):
    """transformers' processor does not cut the Q-Former's instruction; the import kept LAVIS's 128-token
    cut, so an instruction of 129 or more tokens gave other logits than the model it came from."""
    from transformers import AutoTokenizer, InstructBlipConfig, InstructBlipForConditionalGeneration

    config = InstructBlipConfig(vision_config=hf_tiny._vision(), qformer_config={**hf_tiny._qformer(), "max_position_embeddings": 256},
                                text_config=hf_tiny._text("opt"), num_query_tokens=Q, image_token_index=hf_tiny.IMAGE_TOKEN)
    torch.manual_seed(0)
    reference = InstructBlipForConditionalGeneration(config).eval()
    hf_tiny.redraw(reference, seed=0)
    reference.save_pretrained(tmp_path / "hf")
    AutoTokenizer.from_pretrained(tokenizer_dir("opt")).save_pretrained(tmp_path / "hf")
    AutoTokenizer.from_pretrained(tokenizer_dir("bert")).save_pretrained(tmp_path / "hf" / "qformer_tokenizer")
    model = vlbridge.load(vlbridge.import_hf_instructblip(tmp_path / "hf", tmp_path / "ours")).eval()
    instruction = ["describe the red circle " * 16]  # about 160 Q-Former tokens of the tiny BERT vocabulary
    qformer = _qformer_inputs(model, instruction)
    assert 128 < qformer["qformer_input_ids"].shape[1] <= 256
    text = model.llm.tokenizer(["a red"], return_tensors="pt")
    ids, mask = _with_image_tokens(text.input_ids, text.attention_mask)
    pixels = hf_tiny.pixels(1)
    with torch.no_grad():
        expected = reference(pixel_values=pixels, input_ids=ids, attention_mask=mask, **qformer).logits
        torch.testing.assert_close(model(pixels, text.input_ids, text.attention_mask, instructions=instruction).logits,
                                   expected, atol=1e-4, rtol=0)


def _exportable_aware(**qformer):
    """A tiny instruction-aware BLIP-2 that transformers' InstructBLIP holds exactly (the tiny preset's ln_vision)."""
    from vlbridge.plugin.resources import presets

    raw = {**presets()["tiny-qformer-opt"], "name": "aware-export"}
    raw["connector"] = {"use": "qformer", "options": {**raw["connector"]["options"], "instruction_aware": True, **qformer}}
    return raw


def test_the_exported_processor_cuts_a_long_instruction_where_vlbridge_does(tmp_path):
    """vlbridge reads at most max_instruction_tokens of an instruction; the export's InstructBlipProcessor
    cut nothing, so transformers' model read the whole instruction and computed other queries. Now the
    processor cuts at the same length by default, generates vlbridge's tokens, and the export imports
    back with the same cut."""
    from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

    from tests.processor_check import assert_processor_matches

    torch.manual_seed(0)
    model = vlbridge.build(_exportable_aware(max_instruction_tokens=8), stage=2).eval()
    hf_tiny.redraw(model, seed=0)  # wider weights: the generated tokens follow the queries (and so the instruction)
    instruction = "how many red circles and blue squares are there on the left of the yellow star?"
    assert len(model.connector.tokenizer(instruction).input_ids) > 8
    out = vlbridge.export_hf_instructblip(model, tmp_path / "out")
    processor = InstructBlipProcessor.from_pretrained(str(out))
    assert processor(text=instruction)["qformer_input_ids"][0] == model.connector.tokenize_instructions([instruction])[0][0].tolist()
    assert_processor_matches(model, processor, InstructBlipForConditionalGeneration.from_pretrained(str(out)).eval(), instruction)
    long = processor(text=instruction * 4)  # the LLM's prompt is not cut: its tokenizer has no limit
    assert long["input_ids"][0] == model.llm.tokenizer(instruction * 4).input_ids and len(long["qformer_input_ids"][0]) == 8
    assert vlbridge.load(vlbridge.import_hf_instructblip(out, tmp_path / "again")).connector.instruction_limit == 8


def test_an_llm_tokenizer_with_a_length_limit_is_named_in_a_note(tmp_path):
    """Truncating by default cuts the LLM's prompt at its tokenizer's model_max_length too (FlanT5's 512)."""
    from vlbridge.interop.export_fidelity import LeftOutOfExportWarning

    model = vlbridge.build(_exportable_aware(), stage=2)
    model.llm.tokenizer.model_max_length = 40
    with pytest.warns(LeftOutOfExportWarning, match="cuts a prompt longer than the LLM tokenizer's model_max_length 40 tokens"):
        vlbridge.export_hf_instructblip(model, tmp_path / "out")


def test_a_qformer_tokenizer_larger_than_the_qformers_vocabulary_is_refused_before_anything_is_written(tmp_path):
    """It imported, and failed only when the imported model was loaded."""
    from transformers import AutoTokenizer, InstructBlipConfig, InstructBlipForConditionalGeneration

    bert = AutoTokenizer.from_pretrained(tokenizer_dir("bert"))
    config = InstructBlipConfig(vision_config=hf_tiny._vision(), qformer_config={**hf_tiny._qformer(), "vocab_size": len(bert) - 1},
                                text_config=hf_tiny._text("opt"), num_query_tokens=Q, image_token_index=hf_tiny.IMAGE_TOKEN)
    InstructBlipForConditionalGeneration(config).save_pretrained(tmp_path / "hf")
    AutoTokenizer.from_pretrained(tokenizer_dir("opt")).save_pretrained(tmp_path / "hf")
    bert.save_pretrained(tmp_path / "hf" / "qformer_tokenizer")
    with pytest.raises(WeightsError, match=rf"tokenizer has {len(bert)} tokens, but the config's qformer_config.vocab_size is {len(bert) - 1}"):
        vlbridge.import_hf_instructblip(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
