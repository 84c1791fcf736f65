"""vlbridge.build and the composed model: tiny presets build offline, caption / answer / generate,
retrieval and features, checkpoints round-trip, lying specs are caught, LAVIS import."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
from PIL import Image

import vlbridge
from vlbridge import ConnectorSpec, TokenShape, VLBridgeError, WeightsError
from vlbridge.plugins.connectors.projectors import LinearOptions
from vlbridge.plugintest.check import registry_with
from tests.test_qformer_convert import _lavis_name

RED, BLUE = Image.new("RGB", (64, 48), (220, 20, 20)), Image.new("RGB", (40, 40), (20, 20, 220))


@pytest.fixture(scope="module")
def qformer_opt():
    torch.manual_seed(0)
    return vlbridge.build("tiny-qformer-opt")


@pytest.mark.parametrize("preset", ["tiny-qformer-opt", "tiny-qformer-flan-t5", "tiny-linear-opt", "tiny-mlp-opt"])
def test_tiny_presets_build_and_caption(preset):
    torch.manual_seed(0)
    model = vlbridge.build(preset)
    assert not model.training
    plan = model.plan
    assert model.num_parameters(trainable=True) == plan.trainable_params[2]
    assert sum(p.numel() for p in model.encoder.parameters()) == plan.encoder.params
    assert all(not p.requires_grad for p in [*model.encoder.parameters(), *model.llm.parameters()])
    captions = model.caption([RED, BLUE], num_beams=2, max_new_tokens=4)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)


def test_stage_one_build_has_no_llm():
    model = vlbridge.build("tiny-qformer-opt", stage=1)
    assert model.llm is None
    assert model.num_parameters(trainable=True) == model.plan.trainable_params[1]
    with pytest.raises(VLBridgeError, match="no LLM"):
        model.caption(RED)
    with pytest.raises(VLBridgeError, match="supports stages \\[2\\]"):
        vlbridge.build("tiny-linear-opt", stage=1)


def test_generation_settings(qformer_opt):
    two = qformer_opt.caption(RED, num_beams=3, num_return_sequences=2, max_new_tokens=3)
    assert len(two) == 2
    greedy = qformer_opt.generate([RED, BLUE], prompt=["a photo of", "a"], max_new_tokens=3)
    assert greedy == qformer_opt.generate([RED, BLUE], prompt=["a photo of", "a"], max_new_tokens=3)
    sampled = qformer_opt.generate(RED, do_sample=True, top_p=0.9, max_new_tokens=3)
    assert len(sampled) == 1
    with pytest.raises(VLBridgeError, match="bad generation settings"):
        qformer_opt.caption(RED, beams=3)
    with pytest.raises(VLBridgeError, match="2 prompts for 1 images"):
        qformer_opt.generate(RED, prompt=["a", "b"])
    with pytest.raises(VLBridgeError, match=r"temperature shape sampling, and this call searches .* add do_sample=True"):
        qformer_opt.generate(RED, num_beams=1, temperature=0.3)  # was greedy, the temperature ignored
    with pytest.raises(VLBridgeError, match=r"length_penalty 2.0 scales beam scores .* num_beams is 1 .* give num_beams > 1"):
        qformer_opt.answer(RED, "what colour?", num_beams=1, length_penalty=2.0)  # was dropped without a word
    assert len(qformer_opt.answer(RED, "what colour?", num_beams=1, max_new_tokens=2)) == 1  # the VQA default stays quiet
    with pytest.raises(VLBridgeError, match=r"temperature: Input should be greater than 0 \(got -1\)$"):
        qformer_opt.generate(RED, do_sample=True, temperature=-1)  # no --temperature flag to name
    with pytest.raises(VLBridgeError, match=r"num_beams \(--num-beams\): Input should be greater than or equal to 1"):
        qformer_opt.caption(RED, num_beams=0)
    with pytest.raises(VLBridgeError, match="prompts must be strings, got a NoneType"):
        qformer_opt.generate([RED], prompt=[None])  # was read as the text 'None'


def test_batched_captions_equal_one_by_one(qformer_opt):
    together = qformer_opt.caption([RED, BLUE, RED], num_beams=2, max_new_tokens=5, batch_size=2)
    alone = [qformer_opt.caption(image, num_beams=2, max_new_tokens=5)[0] for image in (RED, BLUE, RED)]
    assert together == alone


def test_answer_formats_questions(qformer_opt):
    answers = qformer_opt.answer([RED, BLUE], ["what colour is it?", "what shape?"], max_new_tokens=3)
    assert len(answers) == 2
    with pytest.raises(VLBridgeError, match="must hold .{}. exactly once"):
        qformer_opt.answer(RED, "what?", prompt="no placeholder")


def test_features_and_retrieval(qformer_opt):
    image = qformer_opt.features(images=[RED, BLUE], mode="image")
    assert image.image_embeds.shape == (2, 8, 64) and image.image_embeds_proj.shape == (2, 8, 256)
    torch.testing.assert_close(image.image_embeds_proj.norm(dim=-1), torch.ones(2, 8))
    text = qformer_opt.features(texts=["a red square", "blue"], mode="text")
    assert text.text_embeds_proj.shape[0] == 2 and text.text_embeds_proj.shape[-1] == 256
    joint = qformer_opt.features(images=[RED, BLUE], texts=["a red square", "blue"], mode="multimodal")
    assert joint.multimodal_embeds.shape == (2, 8, 64)
    texts = ["a red square", "a blue square", "a cat", "two dogs"]
    result = qformer_opt.retrieve([RED, BLUE], texts, k=2)
    assert result.itc.shape == (2, 4) and result.i2t.shape == (2, 4) and result.t2i.shape == (4, 2)
    assert ((result.i2t > -100).sum(dim=1) == 2).all()  # only the top-k are re-ranked
    expected_itc = torch.einsum("iqe,te->iqt", image.image_embeds_proj, qformer_opt.features(texts=texts, mode="text").text_embeds_proj[:, 0]).max(1).values
    torch.testing.assert_close(result.itc, expected_itc)
    with pytest.raises(VLBridgeError, match="need a Q-Former connector"):
        vlbridge.build("tiny-linear-opt").features(images=RED)


def test_checkpoint_round_trip(tmp_path, qformer_opt):
    with torch.no_grad():
        qformer_opt.connector.proj.weight.add_(0.5)  # something a fresh build would not have
    out = qformer_opt.save(tmp_path / "ckpt")
    meta = json.loads((out / "checkpoint.json").read_text())
    assert meta["stage"] == 2 and (out / "connector.safetensors").is_file() and (out / "assembly.yaml").is_file()
    again = vlbridge.load(out)
    torch.testing.assert_close(again.connector.proj.weight, qformer_opt.connector.proj.weight)
    pixels = again.pixel_values([RED])
    torch.testing.assert_close(again.visual_tokens(pixels), qformer_opt.visual_tokens(pixels))
    assert not (out / "llm").exists()  # frozen parts are re-assembled from their sources, not copied


def test_bad_weights_are_clear_errors(tmp_path, qformer_opt):
    with pytest.raises(WeightsError, match="not found"):
        vlbridge.build("tiny-qformer-opt", weights=tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    state = {n: p.detach().clone() for n, p in qformer_opt.connector.named_parameters() if p.requires_grad}
    state["proj.weight"] = torch.zeros(3, 3)
    save_file(state, str(tmp_path / "shape.safetensors"))
    with pytest.raises(WeightsError, match=r"'proj.weight' has shape \(3, 3\) in the file but \(64, 64\)"):
        vlbridge.build("tiny-qformer-opt", weights=tmp_path / "shape.safetensors")
    del state["proj.weight"]
    state["surprise"] = torch.zeros(1)
    save_file(state, str(tmp_path / "keys.safetensors"))
    with pytest.raises(WeightsError, match="1 missing: proj.weight; 1 unexpected: surprise"):
        vlbridge.build("tiny-qformer-opt", weights=tmp_path / "keys.safetensors")


def test_a_lying_spec_is_caught_at_build_time():
    def output(opts, encoder_out, llm_width):
        return TokenShape(5, llm_width)  # but the factory below makes 8

    @vlbridge.hookimpl
    def vlbridge_register_connectors():
        return [ConnectorSpec(name="liar", factory="vlbridge.plugins.connectors.projectors_model:build_linear",
                              options=LinearOptions, output=output)]

    plugin = types.ModuleType("liar")
    plugin.vlbridge_register_connectors = vlbridge_register_connectors
    assembly = vlbridge.load_assembly({"name": "liar", "encoder": {"use": "eva-vit-g", "options": {"variant": "tiny"}},
                                       "connector": {"use": "liar"}, "llm": {"use": "opt", "options": {"variant": "tiny"}}},
                                      registry=registry_with({"vlbridge-liar": plugin}))
    with pytest.raises(VLBridgeError, match=r"connector 'liar' \(plugin vlbridge-liar\) declared 5 tokens x 64 but produces 17 tokens x 64"):
        vlbridge.build(assembly)


def test_lavis_stage1_checkpoint_imports(tmp_path):
    torch.manual_seed(1)
    source = vlbridge.build("tiny-qformer-opt", stage=1)
    ours = {n: p.detach().clone() for n, p in source.connector.named_parameters() if p.requires_grad}
    lavis = {_lavis_name(k): v for k, v in ours.items()}
    lavis["Qformer.cls.predictions.decoder.weight"] = ours["embeddings.word.weight"]  # tied, as LAVIS saves it
    torch.save({"model": lavis}, tmp_path / "blip2_pretrained.pth")
    out = vlbridge.import_lavis(tmp_path / "blip2_pretrained.pth", "tiny-qformer-opt", tmp_path / "imported")
    model = vlbridge.load(out)
    assert model.stage == 1 and model.llm is None  # the checkpoint's stage: its projection into an LLM never trained
    with pytest.raises(VLBridgeError, match="a stage-1 checkpoint never trained its projection into the LLM"):
        model.caption(RED)
    assert vlbridge.load(out, stage=2).stage == 2  # asked for: a stage-2 run starts so
    pixels = model.pixel_values([RED])
    torch.testing.assert_close(model.connector.query_outputs(model.encode_images(pixels)),
                               source.connector.query_outputs(source.encode_images(pixels)))
    with pytest.raises(VLBridgeError, match="holds a Q-Former"):
        vlbridge.import_lavis(tmp_path / "blip2_pretrained.pth", "tiny-mlp-opt", tmp_path / "x")


def test_a_lavis_projection_into_the_other_llm_family_is_refused(tmp_path):
    """A Blip2OPT file's opt_proj has the width of the tiny FlanT5 too, but was trained into an OPT."""
    source = vlbridge.build("tiny-qformer-opt")
    lavis = {_lavis_name(k): v for k, v in source.connector.state_dict().items() if not k.startswith("lm_head.")}
    torch.save({"model": lavis}, tmp_path / "blip2_opt.pth")
    with pytest.raises(VLBridgeError, match="opt_proj comes from a LAVIS Blip2OPT, trained into a decoder-only LLM .* bridges to 'flan-t5'"):
        vlbridge.import_lavis(tmp_path / "blip2_opt.pth", "tiny-qformer-flan-t5", tmp_path / "x")
    assert vlbridge.load(vlbridge.import_lavis(tmp_path / "blip2_opt.pth", "tiny-qformer-opt", tmp_path / "y")).stage == 2


def test_a_save_interrupted_over_a_checkpoint_leaves_no_checkpoint(tmp_path, monkeypatch):
    """Saving a stage-2 model over a stage-1 checkpoint, killed before checkpoint.json: the old
    metadata used to describe the new weights (it loaded 'as stage 1' with stage-2 tensors)."""
    from vlbridge.files import checkpoint

    vlbridge.build("tiny-qformer-opt", stage=1).save(tmp_path / "ckpt")
    real = checkpoint.atomic_write_text

    def crash_on_meta(path, text):
        if Path(path).name == "checkpoint.json":
            raise KeyboardInterrupt
        return real(path, text)

    monkeypatch.setattr(checkpoint, "atomic_write_text", crash_on_meta)
    with pytest.raises(KeyboardInterrupt):
        vlbridge.build("tiny-qformer-opt", stage=2).save(tmp_path / "ckpt")
    monkeypatch.undo()
    with pytest.raises(WeightsError, match="not a vlbridge checkpoint"):
        vlbridge.load(tmp_path / "ckpt")


def test_one_text_is_one_text_and_bad_batches_or_empty_lists_are_named():
    """features(texts="a red circle") was twelve one-character texts; batch_size=-1 captioned
    nothing and returned []; empty text lists fell over inside torch."""
    model = vlbridge.build("tiny-qformer-opt", stage=2)
    one = model.features(texts="a red circle", mode="text").text_embeds
    listed = model.features(texts=["a red circle"], mode="text").text_embeds
    assert one.shape[0] == 1 and torch.equal(one, listed)
    assert model.retrieve([RED, BLUE], "a red circle", k=1).itc.shape == (2, 1)
    for call, message in ((lambda: model.features(texts=[], mode="text"), "no texts given"),
                          (lambda: model.retrieve([RED], []), "no texts given"),
                          (lambda: model.retrieve([], ["a"]), "no images given"),
                          (lambda: model.features(texts=[3], mode="text"), "texts must be strings, got a int"),
                          (lambda: model.caption([RED], batch_size=-1), "batch_size must be a whole number of at least 1, got -1"),
                          (lambda: model.answer([RED], "q?", batch_size=0), "got 0"),
                          (lambda: model.retrieve([RED], ["a"], batch_size=1.5), "got 1.5"),
                          (lambda: model.features(texts=["a", None], mode="text"), "texts must be strings, got a NoneType"),
                          (lambda: model.retrieve([RED], None), "texts must be a string or a list of strings, got a NoneType"),
                          (lambda: model.retrieve([RED], {"a", "b"}), "a set has no order"),
                          (lambda: model.retrieve([RED], ["a"], k=1.5), "k .* must be a whole number of at least 1, got 1.5"),
                          (lambda: model.answer([RED], None), "answer needs questions"),
                          (lambda: model.answer([RED], ""), "question 1 is empty"),
                          (lambda: model.answer([RED], "what?", prompt=None), "the VQA prompt must be a string"),
                          (lambda: model.caption([RED], 5), "prompts must be a string or a list of strings")):
        with pytest.raises(VLBridgeError, match=message):
            call()


def test_rankings_put_the_shortlist_first_then_the_rest_by_itc():
    """Outside the top-k shortlist every pair scores LAVIS's -100: those tied in arbitrary order."""
    from vlbridge.modeling.retrieval import RetrievalResult

    itc = torch.tensor([[0.1, 0.9, 0.5, 0.7]])
    i2t = torch.tensor([[-100.0, 2.0, -100.0, 3.0]])  # k = 2: texts 1 and 3 re-ranked, 3 above 1
    result = RetrievalResult(itc=itc, i2t=i2t, t2i=i2t.t().clone())
    assert result.texts_for_image(0, top=4) == [3, 1, 2, 0] and result.texts_for_image(0, top=2) == [3, 1]
    assert result.images_for_text(1, top=5) == [0]


@pytest.mark.parametrize("mode", ["image", "text", "multimodal"])
def test_features_of_a_model_in_train_mode_are_deterministic_and_the_mode_is_restored(mode):
    """features ran the Q-Former with its dropout on when the model was in train mode: a different
    embedding on every call."""
    model = vlbridge.build("tiny-qformer-opt")
    inputs = {"image": dict(images=[RED, BLUE]), "text": dict(texts=["a red", "a blue"]),
              "multimodal": dict(images=[RED, BLUE], texts=["a red", "a blue"])}[mode]
    expected = model.features(mode=mode, **inputs)
    model.train()
    got = model.features(mode=mode, **inputs)
    assert model.training and model.connector.training
    for name in ("image_embeds_proj", "text_embeds_proj", "multimodal_embeds"):
        if getattr(expected, name) is not None:
            torch.testing.assert_close(getattr(got, name), getattr(expected, name), rtol=0, atol=0)


def test_answer_takes_images_from_a_generator(qformer_opt):
    """answer counted a generator of images (using it up), then had none left to answer about."""
    expected = qformer_opt.answer([RED, BLUE], "what colour?", max_new_tokens=3)
    assert qformer_opt.answer((image for image in (RED, BLUE)), "what colour?", max_new_tokens=3) == expected
