"""Exports are exact or say what they change: every BLIP-2-layout preset and example exports to
transformers exactly; a real difference is refused with the measured logit difference, naming
--allow-approximate, which exports anyway and prints it (BLIP-2 and InstructBLIP alike)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

import vlbridge
from vlbridge.cli.main import main
from vlbridge.interop.export_fidelity import ApproximateExportError, ApproximateExportWarning
from vlbridge.interop.hf_blip2 import probe_difference
from vlbridge.interop.hf_blip2_config import blip2_differences
from vlbridge.plugin.resources import presets

pytestmark = pytest.mark.usefixtures("one_torch_thread")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _blip2_layout(assembly) -> bool:
    return (assembly.plan.encoder.name, assembly.plan.connector.name) == ("eva-vit-g", "qformer")


def _example_assemblies() -> list[str]:
    found = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        found += [config["assembly"]] if "assembly" in config else [run["assembly"] for run in config.get("runs", [])]
    return found


@pytest.mark.parametrize("name", sorted(presets()) + _example_assemblies())
def test_blip2_layout_presets_and_examples_export_exactly(name):
    assembly = vlbridge.load_assembly(name)
    if _blip2_layout(assembly):
        assert blip2_differences(assembly) == []


def test_the_examples_that_export_are_checked():
    assert "tiny-qformer-opt" in _example_assemblies() and "world-qformer-opt" in _example_assemblies()


def _tiny(**connector) -> dict:
    raw = {**presets()["tiny-qformer-opt"], "name": "tiny"}
    raw["connector"] = {"use": "qformer", "options": {**raw["connector"]["options"], **connector}}
    return raw


def test_a_tiny_checkpoint_exports_with_the_cli(tmp_path, capsys):
    from transformers import Blip2ForConditionalGeneration

    model = vlbridge.build("tiny-qformer-opt", stage=2)
    model.save(tmp_path / "ck")
    assert main(["export", "hf-blip2", str(tmp_path / "ck"), str(tmp_path / "out")]) == 0
    assert "approximate" not in capsys.readouterr().out
    hf = Blip2ForConditionalGeneration.from_pretrained(str(tmp_path / "out")).eval()
    with torch.no_grad():
        assert probe_difference(model, hf, hf.config.image_token_index) < 1e-5


def test_a_real_difference_is_refused_with_its_size_and_allowed_on_request(tmp_path, capsys):
    model = vlbridge.build(_tiny(ln_vision_eps=1.0), stage=2)  # a large epsilon: a difference one can see
    with pytest.raises(ApproximateExportError, match=r"ln_vision epsilon 1 becomes 1e-06.*differ .* by up to .*--allow-approximate"):
        vlbridge.export_hf_blip2(model, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    model.save(tmp_path / "ck")
    assert main(["export", "hf-blip2", str(tmp_path / "ck"), str(tmp_path / "no")]) == 2
    assert "--allow-approximate" in capsys.readouterr().err
    assert main(["export", "hf-blip2", str(tmp_path / "ck"), str(tmp_path / "out"), "--allow-approximate"]) == 0
    printed = capsys.readouterr().out
    measured = float(re.search(r"by up to (\S+) \(max abs\)", printed).group(1))
    assert measured > 1e-3 and "wrote transformers BLIP-2 directory" in printed
    with pytest.warns(ApproximateExportWarning, match="exported anyway"):
        vlbridge.export_hf_blip2(model, tmp_path / "api", allow_approximate=True)


def test_instructblip_export_follows_the_same_rule(tmp_path):
    aware = vlbridge.build(_tiny(ln_vision_eps=1.0, instruction_aware=True), stage=2)
    with pytest.raises(ApproximateExportError, match="InstructBLIP cannot hold this model exactly"):
        vlbridge.export_hf_instructblip(aware, tmp_path / "out")
    with pytest.warns(ApproximateExportWarning):
        vlbridge.export_hf_instructblip(aware, tmp_path / "out", allow_approximate=True)
    assert (tmp_path / "out" / "config.json").is_file()


def test_an_export_names_the_stage1_parts_it_leaves_behind(tmp_path, capsys):
    """Blip2ForConditionalGeneration holds no text side and no ITC/ITM/ITG heads: a model with them
    exported without a word, and the directory could no longer retrieve. An import from such a
    directory (the parts absent) exports without the note."""
    import warnings

    from tests import hf_tiny
    from vlbridge.interop.export_fidelity import LeftOutOfExportWarning

    model = vlbridge.build("tiny-qformer-opt")
    with pytest.warns(LeftOutOfExportWarning, match=r"transformers BLIP-2 export, which has no place for them: the Q-Former's text "
                      r"side, ITC projections, ITM head, ITG head, ITC temperature; the vlbridge checkpoint keeps them"):
        vlbridge.export_hf_blip2(model, tmp_path / "blip2")
    model.save(tmp_path / "ckpt")
    assert main(["export", "hf-blip2", str(tmp_path / "ckpt"), str(tmp_path / "cli")]) == 0
    assert "note: left out of the transformers BLIP-2 export" in capsys.readouterr().out
    hf_tiny.make_generation_model(tmp_path / "hf")
    imported = vlbridge.load(vlbridge.import_hf_blip2(tmp_path / "hf", tmp_path / "ours"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", LeftOutOfExportWarning)
        vlbridge.export_hf_blip2(imported, tmp_path / "again")


def test_a_prompt_wording_the_processor_has_no_place_for_is_kept_in_a_file_and_named(tmp_path, capsys):
    """Blip2Processor holds no prompt field and drops a chat template: an LLM's prompt template
    ('Question: {} Answer:') was left behind without a word, and the export, prompted as vlbridge is,
    generated from another text. The wording goes into vlbridge_prompt.json, named in a note; worded
    by it, the processor and the exported model generate vlbridge's tokens."""
    import json

    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    from tests import hf_tiny
    from tests.processor_check import assert_processor_matches
    from vlbridge.interop.export_fidelity import PROMPT_FILE, LeftOutOfExportWarning

    template = "Question: {} Answer:"
    torch.manual_seed(0)
    model = vlbridge.build({**_tiny(), "llm": {"use": "hf-causal-lm", "options": {"prompt_template": template}}}, stage=2).eval()
    hf_tiny.redraw(model, seed=0)
    with pytest.warns(LeftOutOfExportWarning, match=r"BLIP-2 processor, which has no place for it: vlbridge gives the LLM each "
                      r"prompt worded as 'Question: \{\} Answer:'.* the wording is in vlbridge_prompt.json in the export"):
        out = vlbridge.export_hf_blip2(model, tmp_path / "out")
    wording = json.loads((out / PROMPT_FILE).read_text(encoding="utf-8"))
    assert (wording["prompt_template"], wording["chat_template"]) == (template, False)
    hf = Blip2ForConditionalGeneration.from_pretrained(str(out)).eval()
    assert_processor_matches(model, Blip2Processor.from_pretrained(str(out)), hf, "what is it?", wording["prompt_template"].format("what is it?"))
    model.save(tmp_path / "ck")
    assert main(["export", "hf-blip2", str(tmp_path / "ck"), str(tmp_path / "cli")]) == 0
    assert "note: left out of the transformers BLIP-2 processor" in capsys.readouterr().out and (tmp_path / "cli" / PROMPT_FILE).is_file()
    plain = vlbridge.export_hf_blip2(vlbridge.build("tiny-qformer-opt", stage=2), tmp_path / "plain")  # prompts as typed: no file
    assert not (plain / PROMPT_FILE).exists()


def test_importing_an_export_words_prompts_as_the_exported_model_did(tmp_path):
    """The import read no vlbridge_prompt.json: a model exported with 'Question: {} Answer:' came back
    prompting with the bare text, and generated other tokens than before its round trip."""
    import json

    from vlbridge.errors import VLBridgeError
    from vlbridge.interop.export_fidelity import PROMPT_FILE, LeftOutOfExportWarning

    template = "Question: {} Answer:"
    torch.manual_seed(0)
    model = vlbridge.build({**_tiny(), "llm": {"use": "hf-causal-lm", "options": {"prompt_template": template}}}, stage=2).eval()
    with pytest.warns(LeftOutOfExportWarning):
        out = vlbridge.export_hf_blip2(model, tmp_path / "out")
    back = vlbridge.load(vlbridge.import_hf_blip2(out, tmp_path / "back"))
    assert back.assembly.llm.options.prompt_template == template
    image = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    assert back.generate(image, "what is it?", max_new_tokens=4) == model.generate(image, "what is it?", max_new_tokens=4)
    (out / PROMPT_FILE).write_text(json.dumps({"prompt_template": template, "chat_template": True}), encoding="utf-8")
    with pytest.raises(VLBridgeError, match=r"worded prompts with its tokenizer's chat template, and the tokenizer in .* has none"):
        vlbridge.import_hf_blip2(out, tmp_path / "chat")  # the tiny tokenizer has no chat template
    assert not (tmp_path / "chat").exists()  # refused before anything is written


@pytest.mark.parametrize("options", [{"prompt_template": "USER: <image>\n{} ASSISTANT:"},
                                     {"prompt_format": "chat", "prompt_template": "<image>\n{}"}], ids=["template", "chat"])
def test_visual_tokens_placed_inside_the_prompt_are_a_difference_the_blip2_export_names(tmp_path, options):
    """An LLM whose prompt holds the image token gets the visual tokens there; transformers' BLIP-2
    processor always puts the query tokens before the whole text, so the export was exact in weights and
    not in what the model reads: it is refused (or exported approximately on request), by name."""
    from tests.hf_families import make_llm_dir

    make_llm_dir(tmp_path / "llama", "llama", chat=options.get("prompt_format") == "chat")
    model = vlbridge.build({**_tiny(), "llm": {"use": "hf-causal-lm", "options": {"model": str(tmp_path / "llama"), **options}}},
                           stage=2)
    assert blip2_differences(model.assembly) == []  # the weights alone map exactly
    with pytest.raises(ApproximateExportError, match=r"puts the visual tokens where its prompt holds the image token"):
        vlbridge.export_hf_blip2(model, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
