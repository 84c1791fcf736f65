"""Parity with transformers' BLIP-2 on tiny random models saved with save_pretrained: import gives
the same logits and the same generated tokens (OPT, FlanT5, and a Llama through hf-causal-lm), the retrieval model the same ITM
and ITC scores, and export round-trips back to transformers."""

from __future__ import annotations

import json
import re

import pytest
import torch

import vlbridge
from vlbridge import WeightsError
from tests import hf_tiny

Q = hf_tiny.NUM_QUERIES


def _with_image_tokens(ids: torch.Tensor, mask: torch.Tensor, image_token: int = hf_tiny.IMAGE_TOKEN) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers 5 expects num_query_tokens <image> placeholders in front of the text."""
    batch = ids.shape[0]
    return (torch.cat([torch.full((batch, Q), image_token), ids], 1),
            torch.cat([torch.ones(batch, Q, dtype=mask.dtype), mask], 1))


@pytest.fixture(scope="module", params=["opt", "llama", "t5"])
def imported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"blip2-{request.param}")
    reference = hf_tiny.make_generation_model(root / "hf", request.param)
    model = vlbridge.load(vlbridge.import_hf_blip2(root / "hf", root / "ours"))
    return request.param, reference, model, root


def test_import_gives_the_same_logits(imported):
    llm, reference, model, _ = imported
    pixels = hf_tiny.pixels()
    text = model.llm.tokenizer(["a red", "two blue circles on the"], padding=True, return_tensors="pt")
    ids, mask = _with_image_tokens(text.input_ids, text.attention_mask)
    extra = {}
    if llm == "t5":
        labels = model.llm.tokenizer(["red circle", "blue"], padding=True, return_tensors="pt")
        extra = {"labels": labels.input_ids, "decoder_attention_mask": labels.attention_mask}
    with torch.no_grad():
        expected = reference(pixel_values=pixels, input_ids=ids, attention_mask=mask, **extra).logits
        ours = model(pixels, text.input_ids, text.attention_mask, **extra).logits
    assert ours.shape == expected.shape
    if llm != "t5":  # decoder-only: where the text is; a padded slot's logits depend on the position rule (Llama counts padding)
        ours, expected = ours[mask.bool()], expected[mask.bool()]
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_import_generates_the_same_tokens(imported, num_beams):
    llm, reference, model, _ = imported
    pixels = hf_tiny.pixels()
    settings = {"max_new_tokens": 6, "min_new_tokens": 6, "num_beams": num_beams}
    prompt = model.llm.tokenizer([""] * 2, return_tensors="pt")  # OPT: [BOS]; T5: [</s>]
    ids, mask = _with_image_tokens(prompt.input_ids, prompt.attention_mask)
    with torch.no_grad():
        expected = reference.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, **settings)
        ours = model.llm.generate(model.visual_tokens(pixels), prompt.input_ids, prompt.attention_mask, **settings)
    if llm != "t5":
        expected = expected[:, ids.shape[1]:]  # decoder-only: transformers returns the prompt too
    else:
        expected, ours = expected[:, -6:], ours[:, -6:]  # T5: compare the generated tokens, not the start token
    assert torch.equal(ours, expected)
    assert model.caption(pixels, **settings) == model.llm.decode(ours)


def test_export_round_trips_to_transformers(imported):
    from transformers import Blip2ForConditionalGeneration

    llm, reference, model, root = imported
    out = vlbridge.export_hf_blip2(model, root / "exported")
    again = Blip2ForConditionalGeneration.from_pretrained(out).eval()
    pixels = hf_tiny.pixels(seed=5)
    text = model.llm.tokenizer(["a small cat"], return_tensors="pt")
    ids, mask = _with_image_tokens(text.input_ids, text.attention_mask)
    ids_exported, _ = _with_image_tokens(text.input_ids, text.attention_mask, again.config.image_token_index)
    extra = {"labels": text.input_ids} if llm == "t5" else {}
    with torch.no_grad():
        expected = reference(pixel_values=pixels, input_ids=ids, attention_mask=mask, **extra).logits
        exported = again(pixel_values=pixels, input_ids=ids_exported, attention_mask=mask, **extra).logits
    torch.testing.assert_close(exported, expected, atol=1e-4, rtol=0)
    assert "<image>" not in model.llm.tokenizer.get_vocab()


def test_retrieval_model_import_matches_itm_and_itc(tmp_path):
    reference = hf_tiny.make_retrieval_model(tmp_path / "hf")
    model = vlbridge.load(vlbridge.import_hf_blip2(tmp_path / "hf", tmp_path / "ours"))
    assert model.llm is None and model.plan.stages == (1,)
    assert model.trained_stages == (1,)  # no language projection: nothing shows it went through stage 2
    pixels = hf_tiny.pixels()
    texts = ["a red circle", "two blue squares next to a tree"]
    text = model.connector.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        itm = reference(pixel_values=pixels, input_ids=text.input_ids, attention_mask=text.attention_mask,
                        use_image_text_matching_head=True).logits_per_image
        itc = reference(pixel_values=pixels, input_ids=text.input_ids, attention_mask=text.attention_mask,
                        use_image_text_matching_head=False).logits_per_image
    image_embeds = model.encode_images(pixels)
    ours_itm = model.connector.itm_logits(text.input_ids, text.attention_mask, image_embeds)
    torch.testing.assert_close(ours_itm, itm, atol=1e-4, rtol=0)
    result = model.retrieve(pixels, texts, k=2)
    torch.testing.assert_close(result.itc, itc, atol=1e-4, rtol=0)
    features = model.features(images=pixels, mode="image")
    assert features.image_embeds_proj.shape == (2, Q, 16)


def test_a_retrieval_model_exports_back_to_blip2_for_image_text_retrieval(tmp_path):
    """README promised `vlbridge export hf-blip2` goes back, but an imported blip2-itm-vit-g (no LLM)
    was refused: the export only knew Blip2ForConditionalGeneration."""
    from transformers import Blip2ForImageTextRetrieval, Blip2Processor

    from vlbridge.interop.export_fidelity import LeftOutOfExportWarning

    reference = hf_tiny.make_retrieval_model(tmp_path / "hf")
    model = vlbridge.load(vlbridge.import_hf_blip2(tmp_path / "hf", tmp_path / "ours"))
    vlbridge.export_hf_blip2(model, tmp_path / "back")
    exported = Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "back").eval()
    hf_tiny.assert_same_weights(reference.state_dict(), exported.state_dict())
    processor = Blip2Processor.from_pretrained(tmp_path / "back")
    text = processor(text=["a red circle", "two blue squares"], padding=True, return_tensors="pt")
    assert text.input_ids.tolist() == model.connector.tokenizer(["a red circle", "two blue squares"], padding=True).input_ids
    pixels = hf_tiny.pixels()
    with torch.no_grad():
        itm = exported(pixel_values=pixels, input_ids=text.input_ids, attention_mask=text.attention_mask,
                       use_image_text_matching_head=True).logits_per_image
        ours = model.connector.itm_logits(text.input_ids, text.attention_mask, model.encode_images(pixels))
    torch.testing.assert_close(ours, itm, atol=1e-5, rtol=0)
    again = vlbridge.load(vlbridge.import_hf_blip2(tmp_path / "back", tmp_path / "again"))
    for key, value in model.connector.state_dict().items():
        assert torch.equal(again.connector.state_dict()[key], value), key
    built = vlbridge.build({"name": "itm", "encoder": {"use": "eva-vit-g", "options": {"variant": "tiny"}},
                            "connector": {"use": "qformer", "options": {"variant": "tiny", "num_query_tokens": 8, "ln_vision_eps": 1e-6}}})
    with pytest.warns(LeftOutOfExportWarning, match=r"no place for them: ITG head, ITC temperature;"):
        vlbridge.export_hf_blip2(built, tmp_path / "built")


def test_not_a_blip2_directory(tmp_path):
    with pytest.raises(WeightsError, match="no config.json"):
        vlbridge.import_hf_blip2(tmp_path, tmp_path / "out")
    (tmp_path / "config.json").write_text('{"model_type": "opt"}')
    with pytest.raises(WeightsError, match="expected 'blip-2'"):
        vlbridge.import_hf_blip2(tmp_path, tmp_path / "out")


def test_stage2_trains_exactly_the_part_transformers_blip2_trains(imported):
    """Stage 2 trains the query path, ln_vision and the projection: in transformers' names, exactly
    the bridge tensors (query tokens, Q-Former, language projection, and the vision model's
    post-layernorm, LAVIS's ln_vision) that an LM loss reaches in Blip2ForConditionalGeneration."""
    from vlbridge.plugins.connectors.qformer_convert import to_transformers

    llm, reference, model, _ = imported
    pixels = hf_tiny.pixels()
    text = model.llm.tokenizer(["a red", "two blue circles on the"], padding=True, return_tensors="pt")
    ids, mask = _with_image_tokens(text.input_ids, text.attention_mask)
    labels = {"labels": model.llm.tokenizer(["red circle", "blue"], padding=True, return_tensors="pt").input_ids} if llm == "t5" \
        else {"labels": ids.masked_fill(mask == 0, -100)}
    reference.zero_grad(set_to_none=True)
    reference(pixel_values=pixels, input_ids=ids, attention_mask=mask, **labels).loss.backward()
    bridge = ("query_tokens", "qformer.", "language_projection.", "vision_model.post_layernorm.")
    reached = {n for n, p in reference.named_parameters() if n.startswith(bridge) and p.grad is not None and p.grad.abs().sum() > 0}
    model.set_stage(2)
    ours = {n: p for n, p in model.connector.named_parameters() if p.requires_grad}
    assert set(to_transformers(ours)) == reached
    assert all(not p.requires_grad for p in [*model.encoder.parameters(), *model.llm.parameters()])


def test_export_ships_a_processor_that_prepares_and_generates_like_vlbridge(imported):
    from transformers import AutoImageProcessor, Blip2ForConditionalGeneration, Blip2Processor

    from tests.processor_check import assert_processor_matches

    _, _, model, root = imported
    out = vlbridge.export_hf_blip2(model, root / "with-processor")
    processor = Blip2Processor.from_pretrained(str(out))
    assert processor.num_query_tokens == Q and AutoImageProcessor.from_pretrained(str(out)).size == {"height": 28, "width": 28}
    assert_processor_matches(model, processor, Blip2ForConditionalGeneration.from_pretrained(str(out)).eval(), "a photo of")


def test_an_import_with_a_language_projection_records_that_it_went_through_stage_2(imported):
    """So a stage-1 run started from it saves a checkpoint whose projection is known to be trained."""
    _, _, model, root = imported
    assert json.loads((root / "ours" / "checkpoint.json").read_text())["trained_stages"] == [2]
    assert model.trained_stages == (2,)


def test_an_imported_checkpoint_loads_after_a_move(imported, tmp_path):
    import shutil

    _, _, model, root = imported
    moved = tmp_path / "elsewhere"
    shutil.move(vlbridge.import_hf_blip2(root / "hf", tmp_path / "ours"), moved)
    assert str(tmp_path / "ours") not in (moved / "assembly.yaml").read_text()  # paths inside a checkpoint are relative to it
    again = vlbridge.load(moved)
    pixels = hf_tiny.pixels()
    with torch.no_grad():
        assert torch.equal(again.visual_tokens(pixels), model.visual_tokens(pixels))
    assert again.caption(pixels, max_new_tokens=4) == model.caption(pixels, max_new_tokens=4)


@pytest.mark.parametrize(("settings", "message"), [
    ({"vision": {"hidden_act": "quick_gelu"}}, "vision_config.hidden_act is 'quick_gelu'"),
    ({"qformer": {"hidden_act": "relu"}}, "qformer_config.hidden_act is 'relu'"),
    ({"text": {"word_embed_proj_dim": 16}}, "text_config.word_embed_proj_dim 16 differs from its hidden_size 32"),
    ({"vision": {"image_size": 30}}, "vision_config.image_size 30 is not a multiple of its patch_size 14"),
    ({"text": {"eos_token_id": hf_tiny.IMAGE_TOKEN}},
     f"generation stops at eos_token_id {hf_tiny.IMAGE_TOKEN}, which the tokenizer cannot write as a single token"),
])
def test_settings_no_assembly_reproduces_are_refused_by_name(tmp_path, settings, message):
    """Each would import and run, computing something else than transformers' model."""
    hf_tiny.make_generation_model(tmp_path / "hf", **settings)
    with pytest.raises(vlbridge.VLBridgeError, match=re.escape(message)):
        vlbridge.import_hf_blip2(tmp_path / "hf", tmp_path / "ours")
    assert not (tmp_path / "ours").exists()


def test_a_vision_tower_without_qkv_biases_imports_exactly(tmp_path):
    reference = hf_tiny.make_generation_model(tmp_path / "hf", vision={"qkv_bias": False})
    model = vlbridge.load(vlbridge.import_hf_blip2(tmp_path / "hf", tmp_path / "ours"))
    text = model.llm.tokenizer(["a red"], return_tensors="pt")
    ids, mask = _with_image_tokens(text.input_ids, text.attention_mask)
    pixels = hf_tiny.pixels(batch=1)
    with torch.no_grad():
        expected = reference(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(model(pixels, text.input_ids, text.attention_mask).logits, expected, atol=1e-4, rtol=0)


def test_a_directory_without_the_llms_tokenizer_is_refused_at_import(tmp_path):
    hf_tiny.make_generation_model(tmp_path / "hf", tokenizer=False)
    with pytest.raises(vlbridge.WeightsError, match="holds no usable tokenizer for the language model"):
        vlbridge.import_hf_blip2(tmp_path / "hf", tmp_path / "ours")


def test_a_setting_no_assembly_accepts_is_refused_at_import_not_at_load(tmp_path):
    hf_tiny.make_generation_model(tmp_path / "hf", "opt")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["num_query_tokens"] = -5
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(vlbridge.VLBridgeError, match="holds settings no vlbridge assembly accepts.*num_query_tokens"):
        vlbridge.import_hf_blip2(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out" / "checkpoint.json").exists()


def test_the_cli_writes_only_into_a_new_or_empty_folder(imported, tmp_path, capsys):
    from vlbridge.cli.main import main

    _, _, _, root = imported
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    for argv in (["import", "hf-blip2", str(root / "hf"), str(tmp_path / "kept")],
                 ["export", "hf-blip2", str(root / "ours"), str(tmp_path / "kept")]):
        assert main(argv) == 2
        assert "already holds files (notes.txt); give a new or empty folder" in capsys.readouterr().err
    assert (tmp_path / "kept" / "notes.txt").read_text() == "mine" and len(list((tmp_path / "kept").iterdir())) == 1
    (tmp_path / "empty").mkdir()
    assert main(["import", "hf-blip2", str(root / "hf"), str(tmp_path / "empty")]) == 0


@pytest.mark.parametrize("instruction_aware", [False, True])
def test_an_untied_flan_t5_head_exports_as_its_own_matrix(tmp_path, instruction_aware):
    """transformers 5 builds every T5 with its head tied to the input embeddings; FlanT5's is its own
    matrix, and loading both into one tensor kept only the last (an export with other logits)."""
    from transformers import Blip2ForConditionalGeneration, InstructBlipForConditionalGeneration

    from vlbridge.interop.hf_blip2 import probe_difference

    config = vlbridge.load_assembly("tiny-qformer-flan-t5").config.model_dump(mode="json")
    config["connector"]["options"]["instruction_aware"] = instruction_aware
    model = vlbridge.build(config).eval()
    lm = model.llm.model
    assert lm.lm_head.weight is not lm.shared.weight and not torch.equal(lm.lm_head.weight, lm.shared.weight)
    export, hf_class = ((vlbridge.export_hf_instructblip, InstructBlipForConditionalGeneration) if instruction_aware
                        else (vlbridge.export_hf_blip2, Blip2ForConditionalGeneration))
    again = hf_class.from_pretrained(str(export(model, tmp_path / "out"))).eval()
    assert torch.equal(again.language_model.lm_head.weight, lm.lm_head.weight)
    assert torch.equal(again.language_model.shared.weight, lm.shared.weight)
    with torch.no_grad():
        assert probe_difference(model, again, again.config.image_token_index) < 1e-5


def test_a_partial_blip2_class_is_refused_at_import_and_blip2model_imports(tmp_path):
    """Blip2VisionModelWithProjection holds the tower and the Q-Former, but no ITM head or text side:
    it was imported as a retrieval model that then failed to load. Blip2Model is the whole model."""
    from transformers import AutoTokenizer, Blip2Config, Blip2Model, Blip2VisionModelWithProjection

    from vlbridge.plugins.tiny_assets import tokenizer_dir

    config = Blip2Config(vision_config=hf_tiny._vision(), qformer_config=hf_tiny._qformer(text_input=True),
                         text_config=hf_tiny._text("opt"), num_query_tokens=Q, image_token_index=hf_tiny.IMAGE_TOKEN)
    Blip2VisionModelWithProjection(config).save_pretrained(tmp_path / "partial")
    AutoTokenizer.from_pretrained(tokenizer_dir("bert")).save_pretrained(tmp_path / "partial")
    with pytest.raises(vlbridge.VLBridgeError, match="holds a transformers Blip2VisionModelWithProjection, which is not a whole BLIP-2"):
        vlbridge.import_hf_blip2(tmp_path / "partial", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    torch.manual_seed(0)
    whole = Blip2Model(config).eval()
    whole.save_pretrained(tmp_path / "whole")
    AutoTokenizer.from_pretrained(tokenizer_dir("opt")).save_pretrained(tmp_path / "whole")
    model = vlbridge.load(vlbridge.import_hf_blip2(tmp_path / "whole", tmp_path / "ours"))
    assert model.plan.llm.name == "opt" and model.stage == 2


@pytest.mark.parametrize("export", ["export_hf_blip2", "export_hf_instructblip"])
def test_a_stage1_model_is_refused_by_the_export_saying_why(tmp_path, export):
    with pytest.raises(vlbridge.VLBridgeError, match="built or loaded for stage 1: it has no LLM, and its projection into one never trained"):
        getattr(vlbridge, export)(vlbridge.build("tiny-qformer-opt", stage=1), tmp_path / "out")


def test_an_instruction_aware_model_is_refused_by_the_blip2_export(tmp_path):
    """transformers' BLIP-2 has no place for the instruction: the export wrote a model whose queries
    ignored it (other visual tokens, other answers), with exit 0 and no word of it."""
    config = vlbridge.load_assembly("tiny-qformer-opt").config.model_dump(mode="json")
    config["connector"]["options"]["instruction_aware"] = True
    with pytest.raises(vlbridge.VLBridgeError, match="instruction-aware.*export hf-instructblip"):
        vlbridge.export_hf_blip2(vlbridge.build(config).eval(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_retrieval_cuts_texts_to_a_short_qformers_positions(tmp_path):
    """Retrieval cuts texts at LAVIS's 35 tokens, or at the Q-Former's positions where it has fewer."""
    hf_tiny.make_retrieval_model(tmp_path / "hf", text_positions=16)
    model = vlbridge.load(vlbridge.import_hf_blip2(tmp_path / "hf", tmp_path / "ours"))
    long = "a red circle on the left of a blue square " * 4
    with torch.no_grad():
        assert model.features(texts=[long], mode="text").text_embeds.shape[0] == 1
        ranked = model.retrieve(hf_tiny.pixels(2), [long, "a dog"], k=2)
    assert ranked.itc.shape == (2, 2) and ranked.i2t.shape == ranked.t2i.shape == (2, 2)


def test_an_interrupted_export_leaves_nothing_and_a_full_folder_is_refused(tmp_path, monkeypatch):
    """The export is staged beside OUT_DIR and renamed: a crash after the weights but before the
    processor left a folder that loaded as a model and failed as a processor."""
    from vlbridge.interop import hf_processor

    model = vlbridge.build("tiny-qformer-opt")

    def crash(processor, out):
        raise KeyboardInterrupt

    monkeypatch.setattr(hf_processor, "save_processor", crash)
    with pytest.raises(KeyboardInterrupt):
        vlbridge.export_hf_blip2(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither OUT_DIR nor its staging folder
    monkeypatch.undo()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(vlbridge.VLBridgeError, match="already holds files \\(notes.txt\\); an export goes into a new or empty folder"):
        vlbridge.export_hf_blip2(model, tmp_path / "full")
    (tmp_path / "empty").mkdir()
    assert (vlbridge.export_hf_blip2(model, tmp_path / "empty") / "processor_config.json").is_file()


def test_an_export_into_dot_or_a_link_to_an_empty_folder(tmp_path, monkeypatch):
    """'.' has no name to stage beside (an internal error), and a link to an empty folder was taken for a file."""
    model = vlbridge.build("tiny-qformer-opt")
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    vlbridge.export_hf_blip2(model, ".")
    assert (tmp_path / "here" / "config.json").is_file() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    vlbridge.export_hf_blip2(model, tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / "processor_config.json").is_file()
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(vlbridge.VLBridgeError, match="is a link to .*nowhere, which does not exist"):
        vlbridge.export_hf_blip2(model, tmp_path / "dangling")


def test_a_bart_language_model_imports_as_the_causal_lm_transformers_builds(tmp_path):
    """transformers' BLIP-2 builds BART (any type with a causal LM class) as BartForCausalLM, its decoder
    alone; the import took it for an encoder-decoder and was refused. Back out, an encoder-decoder BART
    is refused by name rather than by a list of unexpected tensors."""
    from transformers import AutoTokenizer, Blip2Config, Blip2ForConditionalGeneration

    from tests.hf_families import SEQ2SEQ, make_llm_dir
    from vlbridge.plugins.tiny_assets import tokenizer_dir

    text = {**SEQ2SEQ["bart"], "vocab_size": 1024, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 0}
    config = Blip2Config(vision_config=hf_tiny._vision(), qformer_config=hf_tiny._qformer(), text_config=text,
                         num_query_tokens=Q, image_token_index=hf_tiny.IMAGE_TOKEN)
    torch.manual_seed(0)
    reference = Blip2ForConditionalGeneration(config).eval()
    hf_tiny.redraw(reference)
    reference.save_pretrained(tmp_path / "hf")
    AutoTokenizer.from_pretrained(tokenizer_dir("flan-t5")).save_pretrained(tmp_path / "hf")
    model = vlbridge.load(vlbridge.import_hf_blip2(tmp_path / "hf", tmp_path / "ours"))
    assert model.plan.llm.name == "hf-causal-lm" and not model.llm.is_encoder_decoder
    pixels = hf_tiny.pixels()
    text = model.llm.tokenizer(["a red", "two blue circles on the"], padding=True, return_tensors="pt")
    ids, mask = _with_image_tokens(text.input_ids, text.attention_mask)
    with torch.no_grad():
        expected = reference(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits
        ours = model(pixels, text.input_ids, text.attention_mask).logits
    torch.testing.assert_close(ours[mask.bool()], expected[mask.bool()], atol=1e-4, rtol=0)
    make_llm_dir(tmp_path / "bart", "bart")
    assembly = vlbridge.load_assembly("tiny-qformer-flan-t5").config.model_dump(mode="json")
    assembly["llm"] = {"use": "hf-seq2seq", "options": {"model": str(tmp_path / "bart")}}
    with pytest.raises(vlbridge.VLBridgeError, match="builds a 'bart' language model as BartForCausalLM"):
        vlbridge.export_hf_blip2(vlbridge.build(assembly, stage=2), tmp_path / "out")


@pytest.mark.parametrize(("processor", "message"), [
    ({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}, r"image_mean \[0.5, 0.5, 0.5\] where eva-vit-g uses \[0.48145466"),
    ({"resample": 2}, "a bilinear resize where eva-vit-g's is bicubic"),
])
def test_an_image_processor_the_encoder_cannot_follow_is_refused_at_import(tmp_path, processor, message):
    """eva-vit-g normalises with CLIP's mean and std after a bicubic resize; a directory whose processor
    does otherwise was imported as if it did not, and captioned other pixels than transformers."""
    from transformers import BlipImageProcessor

    hf_tiny.make_generation_model(tmp_path / "hf", "opt")
    BlipImageProcessor(size={"height": hf_tiny.IMAGE_SIZE, "width": hf_tiny.IMAGE_SIZE}, **processor).save_pretrained(tmp_path / "hf")
    with pytest.raises(vlbridge.VLBridgeError, match=f"image processor prepares images otherwise.*{message}"):
        vlbridge.import_hf_blip2(tmp_path / "hf", tmp_path / "ours")
    assert not (tmp_path / "ours").exists()


def test_an_exported_directory_imports_again_with_its_processor(imported, tmp_path):
    _, _, model, root = imported
    out = vlbridge.export_hf_blip2(model, tmp_path / "exported")
    again = vlbridge.load(vlbridge.import_hf_blip2(out, tmp_path / "again"))
    assert json.loads((tmp_path / "again" / "checkpoint.json").read_text())["trained_stages"] == [2]
    pixels = hf_tiny.pixels()
    with torch.no_grad():
        torch.testing.assert_close(again.visual_tokens(pixels), model.visual_tokens(pixels), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda c: c.update(num_query_tokens="4"), "Field 'num_query_tokens' expected int"),
    (lambda c: c.update(text_config=[1, 2]), "Field 'text_config'"),
])
def test_a_config_transformers_cannot_read_is_refused_by_field(tmp_path, edit, message):
    """A list for a sub-config was an internal error (AttributeError); a string for a number was blamed
    on the tokenizer, which transformers fails to read for the same config."""
    hf_tiny.make_generation_model(tmp_path / "hf", "opt")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    edit(config)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=f"(?s)is not a config transformers can read for Blip2ForConditionalGeneration.*{message}"):
        vlbridge.import_hf_blip2(tmp_path / "hf", tmp_path / "out")


def _writable_generated_token(reference, tokenizer, pixels, ids, mask) -> int:
    """A token `reference` generates greedily after its first step that the tokenizer writes as itself."""
    with torch.no_grad():
        generated = reference.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, max_new_tokens=8)[0, ids.shape[1] + 1:]
    for token in generated.tolist():
        text = tokenizer.decode([token])
        if text and tokenizer(text, add_special_tokens=False)["input_ids"] == [token] and token != tokenizer.eos_token_id:
            return token
    raise AssertionError(f"no writable token among {generated.tolist()}")


@pytest.mark.parametrize("llm", ["opt", "llama"])
def test_generation_stops_at_the_checkpoints_eos_token(tmp_path, llm):
    """transformers' BLIP-2 stops at its text config's eos_token_id; the imported model stopped at its
    plugin's own end ('\\n' for opt, the tokenizer's eos_token for hf-causal-lm) and went on past it."""
    pixels = hf_tiny.pixels()
    first = hf_tiny.make_generation_model(tmp_path / "first", llm, seed=1)
    tokenizer = vlbridge.load(vlbridge.import_hf_blip2(tmp_path / "first", tmp_path / "probe")).llm.tokenizer
    prompt = tokenizer(["a photo of", "a photo of"], return_tensors="pt")
    ids, mask = _with_image_tokens(prompt.input_ids, prompt.attention_mask)
    eos = _writable_generated_token(first, tokenizer, pixels, ids, mask)
    reference = hf_tiny.make_generation_model(tmp_path / "hf", llm, seed=1, text={"eos_token_id": eos})
    model = vlbridge.load(vlbridge.import_hf_blip2(tmp_path / "hf", tmp_path / "ours")).eval()
    assert model.assembly.llm.options.eos_token == tokenizer.decode([eos])
    for beams in (1, 3):
        with torch.no_grad():
            expected = reference.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, max_new_tokens=8, num_beams=beams)
            ours = model.llm.generate(model.visual_tokens(pixels), prompt.input_ids, prompt.attention_mask, max_new_tokens=8,
                                      num_beams=beams)
        expected = expected[:, ids.shape[1]:]
        assert expected.shape[1] < 8 or (expected == eos).any()  # transformers stopped at the token
        assert tokenizer.batch_decode(ours, skip_special_tokens=True) == tokenizer.batch_decode(expected, skip_special_tokens=True)


def test_an_export_stops_where_the_vlbridge_model_stops(tmp_path):
    """vlbridge's opt ends captions at '\\n' (BLIP-2's eos_token_id 50118); the export wrote the LLM's own
    config eos ('</s>'), so transformers' BLIP-2 went on past every '\\n' vlbridge stopped at."""
    from transformers import Blip2ForConditionalGeneration

    model = vlbridge.build("tiny-qformer-opt").eval()
    newline = model.llm.tokenizer("\n", add_special_tokens=False)["input_ids"][0]
    again = Blip2ForConditionalGeneration.from_pretrained(str(vlbridge.export_hf_blip2(model, tmp_path / "out"))).eval()
    assert again.config.text_config.eos_token_id == again.generation_config.eos_token_id == newline
