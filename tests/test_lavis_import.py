"""`import_lavis` on LAVIS checkpoint layouts beyond the plain stage-1 / stage-2 file: a COCO
fine-tune that saved its ViT (freeze_vit: False), InstructBLIP."""

from __future__ import annotations

import fnmatch
import json
import re

import pytest
import torch

import vlbridge
from vlbridge import VLBridgeError
from vlbridge.errors import MissingWeightsError
from tests.test_qformer_convert import _lavis_name


def _lavis_stage2(model) -> dict[str, torch.Tensor]:
    """A Blip2OPT-style state dict of `model`'s Q-Former (no text side, no heads), as LAVIS saves it."""
    from vlbridge.plugins.connectors.qformer_model import TEXT_SIDE

    return {_lavis_name(k): v.detach().clone() for k, v in model.connector.state_dict().items()
            if not any(fnmatch.fnmatch(k, pattern) for pattern in TEXT_SIDE)}


def test_a_fine_tuned_vit_in_the_checkpoint_is_imported_not_dropped(tmp_path):
    """LAVIS's COCO fine-tunes train the ViT and save it as visual_encoder.*; the import skipped
    those tensors and the model ran the assembly's ViT instead, with no word."""
    torch.manual_seed(0)
    source = vlbridge.build("tiny-qformer-opt")
    lavis = _lavis_stage2(source)
    tuned = {k: v + 0.01 * torch.randn_like(v) for k, v in source.encoder.state_dict().items()}
    lavis.update({f"visual_encoder.{k}": v for k, v in tuned.items()})
    torch.save({"model": lavis}, tmp_path / "blip2_caption_coco.pth")
    model = vlbridge.load(vlbridge.import_lavis(tmp_path / "blip2_caption_coco.pth", "tiny-qformer-opt", tmp_path / "ours"))
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, tuned[key]), key
    with pytest.raises(VLBridgeError, match=r"fine-tuned ViT \(\d+ visual_encoder.\* tensors\).*uses 'clip-vit-l'"):
        assembly = {"name": "clip", "encoder": {"use": "clip-vit-l", "options": {"variant": "tiny", "include_cls": False}},
                    "connector": {"use": "qformer", "options": {"variant": "tiny", "num_query_tokens": 8}},
                    "llm": {"use": "opt", "options": {"variant": "tiny"}}}
        vlbridge.import_lavis(tmp_path / "blip2_caption_coco.pth", assembly, tmp_path / "clip")


def _instruction_aware(aware: bool) -> dict:
    return {"name": "t5", "encoder": {"use": "eva-vit-g", "options": {"variant": "tiny"}},
            "connector": {"use": "qformer", "options": {"variant": "tiny", "num_query_tokens": 8, "instruction_aware": aware}},
            "llm": {"use": "flan-t5", "options": {"variant": "tiny"}}}


def test_an_instructblip_checkpoint_needs_an_instruction_aware_assembly_and_only_it_fits_one(tmp_path):
    """LAVIS's Blip2T5Instruct keeps the Q-Former's text side in stage 2 (its queries read the
    instruction); imported into a plain Q-Former it loaded, and the model ignored the instruction."""
    torch.manual_seed(0)
    source = vlbridge.build(_instruction_aware(True))
    instructblip = {_lavis_name(k).replace("opt_proj.", "t5_proj."): v for k, v in source.connector.state_dict().items()
                    if not k.startswith(("lm_head.", "vision_proj.", "text_proj.", "itm_head.", "temp"))}
    torch.save({"model": instructblip}, tmp_path / "instruct_flant5xl.pth")
    with pytest.raises(VLBridgeError, match="LAVIS InstructBLIP .* has no instruction-aware Q-Former"):
        vlbridge.import_lavis(tmp_path / "instruct_flant5xl.pth", _instruction_aware(False), tmp_path / "plain")
    model = vlbridge.load(vlbridge.import_lavis(tmp_path / "instruct_flant5xl.pth", _instruction_aware(True), tmp_path / "aware"))
    assert model.connector.instruction_aware
    text_side = re.compile(r"^Qformer\.bert\.(embeddings\.(word|position)_embeddings|encoder\.layer\.\d+\.(intermediate|output))\.")
    blip2 = {k: v for k, v in instructblip.items() if not text_side.match(k)}
    assert len(blip2) < len(instructblip) and "Qformer.bert.encoder.layer.0.attention.output.dense.weight" in blip2
    torch.save({"model": blip2}, tmp_path / "blip2_t5.pth")
    with pytest.raises(VLBridgeError, match="LAVIS BLIP-2 stage-2 model .* instruction-aware"):
        vlbridge.import_lavis(tmp_path / "blip2_t5.pth", _instruction_aware(True), tmp_path / "x")


def test_a_checkpoint_that_does_not_fit_the_assembly_leaves_no_checkpoint_behind(tmp_path):
    """The import verified by loading after writing, and a refusal left a whole-looking checkpoint
    (checkpoint.json and all) that failed only at load and blocked a retry into the same folder."""
    torch.manual_seed(0)
    source = vlbridge.build("tiny-qformer-opt", stage=1)
    lavis = {_lavis_name(k): v for k, v in source.connector.state_dict().items() if not k.startswith("proj.")}
    torch.save({"model": lavis}, tmp_path / "blip2_pretrained.pth")
    wider = {"name": "nine-queries", "encoder": {"use": "eva-vit-g", "options": {"variant": "tiny"}},
             "connector": {"use": "qformer", "options": {"variant": "tiny", "num_query_tokens": 9}}}
    with pytest.raises(VLBridgeError, match=r"does not fit assembly 'nine-queries' .*'query_tokens' has shape \(1, 8, 64\)"):
        vlbridge.import_lavis(tmp_path / "blip2_pretrained.pth", wider, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    lavis["visual_encoder.cls_token"] = torch.zeros(1, 1, 32)  # a ViT of another width: refused, nothing left either
    torch.save({"model": lavis}, tmp_path / "with_vit.pth")
    with pytest.raises(VLBridgeError, match="does not fit assembly 'tiny-qformer-opt'"):
        vlbridge.import_lavis(tmp_path / "with_vit.pth", "tiny-qformer-opt", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert vlbridge.load(vlbridge.import_lavis(tmp_path / "blip2_pretrained.pth", "tiny-qformer-opt", tmp_path / "out")).stage == 1


def test_llm_tensors_in_the_checkpoint_must_be_the_assemblys_llm(tmp_path):
    """A whole-model dump holds opt_model.*; the import skipped them, so a tuned LLM was replaced by
    the assembly's with no word. The same tensors import; different ones are refused by name."""
    torch.manual_seed(0)
    source = vlbridge.build("tiny-qformer-opt")
    dump = {**_lavis_stage2(source), **{f"opt_model.{k}": v.clone() for k, v in source.llm.model.state_dict().items()}}
    torch.save({"model": dump}, tmp_path / "dump.pth")
    assert vlbridge.load(vlbridge.import_lavis(tmp_path / "dump.pth", "tiny-qformer-opt", tmp_path / "same")).stage == 2
    half = {k: v.half() if k.startswith("opt_model.") else v for k, v in dump.items()}  # LAVIS runs the LLM in fp16
    torch.save({"model": half}, tmp_path / "half.pth")
    assert vlbridge.load(vlbridge.import_lavis(tmp_path / "half.pth", "tiny-qformer-opt", tmp_path / "half")).stage == 2
    fp16_llm = {"name": "fp16-llm", "encoder": {"use": "eva-vit-g", "options": {"variant": "tiny"}},
                "connector": {"use": "qformer", "options": {"variant": "tiny", "num_query_tokens": 8, "ln_vision_eps": 1.0e-6}},
                "llm": {"use": "opt", "options": {"variant": "tiny", "dtype": "fp16"}}}
    out = vlbridge.import_lavis(tmp_path / "dump.pth", fp16_llm, tmp_path / "to-fp16")  # an fp32 dump, the same LLM run in fp16
    assert vlbridge.load(out).stage == 2
    bf16_llm = {**fp16_llm, "name": "bf16-llm", "llm": {"use": "opt", "options": {"variant": "tiny", "dtype": "bf16"}}}
    out = vlbridge.import_lavis(tmp_path / "half.pth", bf16_llm, tmp_path / "to-bf16")  # fp16 and bf16 roundings of one LLM
    assert vlbridge.load(out).stage == 2
    tuned_half = {**half, "opt_model.model.decoder.layers.0.fc1.weight": half["opt_model.model.decoder.layers.0.fc1.weight"] + 0.01}
    torch.save({"model": tuned_half}, tmp_path / "tuned_half.pth")
    with pytest.raises(VLBridgeError, match=r"holds its LLM, and model\.decoder\.layers\.0\.fc1\.weight differ"):
        vlbridge.import_lavis(tmp_path / "tuned_half.pth", bf16_llm, tmp_path / "tuned-bf16")
    dump["opt_model.model.decoder.layers.0.fc1.weight"] = dump["opt_model.model.decoder.layers.0.fc1.weight"] + 0.01
    torch.save({"model": dump}, tmp_path / "tuned.pth")
    with pytest.raises(VLBridgeError, match=r"holds its LLM, and model\.decoder\.layers\.0\.fc1\.weight differ"):
        vlbridge.import_lavis(tmp_path / "tuned.pth", "tiny-qformer-opt", tmp_path / "tuned")
    assert not (tmp_path / "tuned").exists()


def test_an_untied_itg_decoder_is_refused_not_skipped(tmp_path):
    """Qformer.cls.predictions.decoder.* is skipped as the word embeddings' alias; one that differed
    was dropped and the ITG head silently read the word embeddings."""
    torch.manual_seed(0)
    source = vlbridge.build("tiny-qformer-opt", stage=1)
    lavis = {_lavis_name(k): v for k, v in source.connector.state_dict().items() if not k.startswith("proj.")}
    lavis["Qformer.cls.predictions.decoder.weight"] = lavis["Qformer.bert.embeddings.word_embeddings.weight"].clone()
    torch.save({"model": lavis}, tmp_path / "tied.pth")
    assert vlbridge.load(vlbridge.import_lavis(tmp_path / "tied.pth", "tiny-qformer-opt", tmp_path / "tied")).stage == 1
    lavis["Qformer.cls.predictions.decoder.weight"] = lavis["Qformer.cls.predictions.decoder.weight"] + 0.01
    torch.save({"model": lavis}, tmp_path / "untied.pth")
    with pytest.raises(VLBridgeError, match=r"decoder.weight is not tied to Qformer.bert.embeddings.word_embeddings.weight"):
        vlbridge.import_lavis(tmp_path / "untied.pth", "tiny-qformer-opt", tmp_path / "untied")


def test_a_vicuna_instructblip_checkpoint_is_named_with_the_way_on(tmp_path):
    """LAVIS's Blip2VicunaInstruct (llm_proj.*) was 'does not look like a LAVIS BLIP-2 checkpoint'."""
    torch.manual_seed(0)
    source = vlbridge.build("tiny-qformer-opt")
    vicuna = {("llm_proj." + k.removeprefix("opt_proj.")) if k.startswith("opt_proj.") else k: v
              for k, v in _lavis_stage2(source).items()}
    torch.save({"model": vicuna}, tmp_path / "vicuna.pth")
    with pytest.raises(VLBridgeError, match=r"LAVIS InstructBLIP for Vicuna \(Blip2VicunaInstruct.*vlbridge import hf-instructblip"):
        vlbridge.import_lavis(tmp_path / "vicuna.pth", "tiny-qformer-opt", tmp_path / "out")


@pytest.mark.parametrize("export, aware", [("export_hf_blip2", False), ("export_hf_instructblip", True)])
def test_an_untrained_projection_is_refused_by_the_export_not_written(tmp_path, export, aware):
    """A LAVIS stage-1 file has no opt_proj: loaded for stage 2 (and saved, a stage-2 checkpoint listing
    proj.* absent) the export wrote its random values as the language_projection, with no word, where
    captioning refuses."""
    assembly = _instruction_aware(aware)
    assembly["connector"]["options"]["ln_vision_eps"] = 1e-6  # exact, so the export writes without running the model
    source = vlbridge.build(assembly, stage=1)
    lavis = {_lavis_name(k): v for k, v in source.connector.state_dict().items() if not k.startswith("proj.")}
    torch.save({"model": lavis}, tmp_path / "blip2_pretrained.pth")
    stage1 = vlbridge.import_lavis(tmp_path / "blip2_pretrained.pth", assembly, tmp_path / "stage1")
    assert json.loads((stage1 / "checkpoint.json").read_text())["trained_stages"] == [1]  # a stage-1 file: never through stage 2
    with pytest.warns(vlbridge.UntrainedWarning, match=r"proj\.bias, proj\.weight train only in stage 2"):
        vlbridge.load(stage1, stage=2).save(tmp_path / "stage2")
    with pytest.raises(MissingWeightsError, match=r"would hold random values for proj.bias, proj.weight: .*train them in stage 2"):
        getattr(vlbridge, export)(vlbridge.load(tmp_path / "stage2"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_another_q_former_layout_is_refused_naming_the_option(tmp_path):
    """A Q-Former trained with cross-attention in every layer (or with more layers) was refused with a
    list of dozens of unexpected layer tensors and no word of cross_attention_freq or num_layers."""
    assembly = {"name": "every-layer", "encoder": {"use": "eva-vit-g", "options": {"variant": "tiny"}},
                "connector": {"use": "qformer", "options": {"variant": "tiny", "num_query_tokens": 8, "cross_attention_freq": 1}}}
    source = vlbridge.build(assembly, stage=1)
    torch.save({"model": {_lavis_name(k): v for k, v in source.connector.state_dict().items() if not k.startswith("proj.")}},
               tmp_path / "blip2_pretrained.pth")
    with pytest.raises(VLBridgeError, match=r"cross-attends to the image in layers \[0, 1\], but .* in layers \[0\] "
                                            r"\(cross_attention_freq 2\); set the qformer option cross_attention_freq: 1"):
        vlbridge.import_lavis(tmp_path / "blip2_pretrained.pth", "tiny-qformer-opt", tmp_path / "a")
    assembly["connector"]["options"]["num_layers"] = 1
    with pytest.raises(VLBridgeError, match=r"has 2 layers, but the Q-Former of assembly 'every-layer' has 1; set the qformer option num_layers: 2"):
        vlbridge.import_lavis(tmp_path / "blip2_pretrained.pth", assembly, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_q_former_cross_attending_in_layer_0_alone_is_given_the_freq_that_builds_it(tmp_path):
    """One cross-attention layer has no step between two: the hint said no cross_attention_freq gives
    [0], where any of at least num_layers does; and a step that fits their first layers is no fix
    when it builds more of them than the file holds."""
    source = vlbridge.build("tiny-qformer-opt", stage=1)  # 2 layers, cross_attention_freq 2: layer 0 alone
    torch.save({"model": {_lavis_name(k): v for k, v in source.connector.state_dict().items() if not k.startswith("proj.")}},
               tmp_path / "blip2_pretrained.pth")
    every = {"name": "every-layer", "encoder": {"use": "eva-vit-g", "options": {"variant": "tiny"}},
             "connector": {"use": "qformer", "options": {"variant": "tiny", "num_query_tokens": 32, "cross_attention_freq": 1}}}
    with pytest.raises(VLBridgeError, match=r"in layers \[0\], but .* in layers \[0, 1\] \(cross_attention_freq 1\); "
                                            r"set the qformer option cross_attention_freq: 2$"):
        vlbridge.import_lavis(tmp_path / "blip2_pretrained.pth", every, tmp_path / "a")


def test_a_layout_no_freq_builds_is_said_so():
    from vlbridge.interop.lavis import _check_layers

    assembly = vlbridge.load_assembly({"name": "four", "encoder": {"use": "eva-vit-g", "options": {"variant": "tiny"}},
                                       "connector": {"use": "qformer", "options": {"variant": "tiny", "num_layers": 4,
                                                                                   "cross_attention_freq": 1}}})
    keys = [f"Qformer.bert.encoder.layer.{i}.attention.self.query.weight" for i in range(4)]
    cross = [f"Qformer.bert.encoder.layer.{i}.crossattention.self.query.weight" for i in (0, 2)]
    with pytest.raises(VLBridgeError, match=r"set the qformer option cross_attention_freq: 2$"):
        _check_layers(keys + cross, assembly)
    with pytest.raises(VLBridgeError, match=r"in layers \[0, 1\], .*; no cross_attention_freq gives that layout"):
        _check_layers(keys + cross[:1] + [cross[0].replace("layer.0.", "layer.1.")], assembly)
