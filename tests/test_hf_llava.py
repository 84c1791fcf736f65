"""LLaVA checkpoints in and out: a tiny random transformers `LlavaForConditionalGeneration` (CLIP tower,
mlp2x_gelu projector, Llama LLM) imported as hf-vision + mlp + hf-causal-lm gives transformers' logits
and generated tokens (greedy and beam search), and exports back to an equal LLaVA directory."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch

import vlbridge
from tests.hf_families import redraw
from tests.hf_tiny import assert_same_weights
from vlbridge.cli.main import main
from vlbridge.errors import VLBridgeError, WeightsError
from vlbridge.plugins.tiny_assets import tokenizer_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")
IMAGE, PATCH = 28, 14
PROMPTS = ["what is it?", "how many red things are there in the picture?"]


def make_llava(directory, layer: int | list[int] = -2, strategy: str = "default", seed: int = 0, projector_bias: bool = True,
               vision_override: dict | None = None, text_override: dict | None = None):
    """A tiny LLaVA-1.5 layout saved with its tokenizer (carrying '<image>') and image processor;
    the overrides replace settings of the CLIP tower's and the Llama's configs (a SigLIP, a Gemma-2)."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir("opt")), local_files_only=True)
    tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  image_size=IMAGE, patch_size=PATCH, hidden_act="quick_gelu")
    text = dict(model_type="llama", hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=1024, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    vision, text = {**vision, **(vision_override or {})}, {**text, **(text_override or {})}
    tokens = (IMAGE // PATCH) ** 2 + (strategy == "full")
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id, image_seq_length=tokens,
                         vision_feature_layer=layer, vision_feature_select_strategy=strategy,
                         multimodal_projector_bias=projector_bias)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    redraw(model, std=0.2, seed=seed)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE}).save_pretrained(str(directory))
    return model, tokenizer


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    hf, tokenizer = make_llava(root / "hf")
    out = vlbridge.import_hf_llava(root / "hf", root / "imported")
    return hf, tokenizer, vlbridge.load(out).eval(), root


def hf_inputs(tokenizer, hf, prompts):
    """What LLaVA's processor feeds transformers: the prompt with `image_seq_length` image ids, padded on the left."""
    image_id, count = hf.config.image_token_index, hf.config.image_seq_length
    rows = []
    for prompt in prompts:
        ids = tokenizer(f"USER: <image>\n{prompt} ASSISTANT:")["input_ids"]
        slot = ids.index(image_id)
        rows.append(ids[:slot] + [image_id] * count + ids[slot + 1:])
    width = max(map(len, rows))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def pixels(count: int, seed: int = 5) -> torch.Tensor:
    return torch.randn(count, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def test_import_writes_the_three_part_assembly(llava):
    _, _, model, _ = llava
    assert (model.plan.encoder.name, model.plan.connector.name, model.plan.llm.name) == ("hf-vision", "mlp", "hf-causal-lm")
    assert model.plan.encoder_out.num_tokens == (IMAGE // PATCH) ** 2  # "default": [CLS] dropped
    assert model.llm.format_prompt("hi") == "USER: <image>\nhi ASSISTANT:"


def test_logits_equal_transformers(llava):
    hf, tokenizer, model, _ = llava
    px = pixels(2)
    ids, mask = hf_inputs(tokenizer, hf, PROMPTS)
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=px, attention_mask=mask).logits
        prompts = [model.llm.format_prompt(p) for p in PROMPTS]
        ours_ids, ours_mask = model.llm.tokenize(prompts, padding_side="left")
        ours = model(px, ours_ids, ours_mask).logits
    assert ours.shape == expected.shape
    for row, length in enumerate(mask.sum(dim=1).tolist()):  # ours packs padding right, transformers' is left
        torch.testing.assert_close(ours[row, :length], expected[row, -length:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("beams", [1, 3])
def test_generation_equals_transformers(llava, beams):
    hf, tokenizer, model, _ = llava
    px = pixels(2, seed=beams)
    ids, mask = hf_inputs(tokenizer, hf, PROMPTS)
    settings = dict(max_new_tokens=6, num_beams=beams, do_sample=False, min_new_tokens=6)
    with torch.no_grad():
        expected = hf.generate(input_ids=ids, pixel_values=px, attention_mask=mask, pad_token_id=tokenizer.pad_token_id, **settings)
    expected_text = [t.strip() for t in tokenizer.batch_decode(expected[:, ids.shape[1]:], skip_special_tokens=True)]
    ours = model.generate(px, PROMPTS, **settings)
    assert ours == expected_text
    assert len(set(expected_text)) > 1  # the two images/prompts do not collapse to one output


def test_export_round_trip_gives_the_same_llava(llava):
    from transformers import LlavaForConditionalGeneration

    hf, tokenizer, model, root = llava
    out = vlbridge.export_hf_llava(model, root / "exported")
    again = LlavaForConditionalGeneration.from_pretrained(str(out)).eval()
    assert_same_weights(hf.state_dict(), again.state_dict())
    for name in ("image_token_index", "vision_feature_layer", "vision_feature_select_strategy", "image_seq_length"):
        assert getattr(again.config, name) == getattr(hf.config, name), name
    px, (ids, mask) = pixels(1), hf_inputs(tokenizer, hf, PROMPTS[:1])
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids, pixel_values=px, attention_mask=mask).logits,
                                   hf(input_ids=ids, pixel_values=px, attention_mask=mask).logits)


def test_a_projector_without_biases_goes_out_as_it_came(tmp_path):
    from transformers import LlavaForConditionalGeneration

    hf, tokenizer = make_llava(tmp_path / "hf", projector_bias=False, seed=2)
    model = vlbridge.load(vlbridge.import_hf_llava(tmp_path / "hf", tmp_path / "imported")).eval()
    again = LlavaForConditionalGeneration.from_pretrained(str(vlbridge.export_hf_llava(model, tmp_path / "exported"))).eval()
    assert again.config.multimodal_projector_bias is False
    assert_same_weights(hf.state_dict(), again.state_dict())  # no bias tensors appear
    px, (ids, mask) = pixels(1), hf_inputs(tokenizer, hf, PROMPTS[:1])
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids, pixel_values=px, attention_mask=mask).logits,
                                   hf(input_ids=ids, pixel_values=px, attention_mask=mask).logits)


def test_full_strategy_keeps_cls_and_the_layer_is_honoured(tmp_path):
    hf, tokenizer = make_llava(tmp_path / "hf", layer=1, strategy="full", seed=1)
    model = vlbridge.load(vlbridge.import_hf_llava(tmp_path / "hf", tmp_path / "out")).eval()
    assert model.plan.encoder_out.num_tokens == (IMAGE // PATCH) ** 2 + 1
    px = pixels(1)
    ids, mask = hf_inputs(tokenizer, hf, PROMPTS[:1])
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=px, attention_mask=mask).logits
        ours = model(px, *model.llm.tokenize([model.llm.format_prompt(PROMPTS[0])])).logits
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def test_cli_import_and_export(llava, tmp_path, capsys):
    _, _, _, root = llava
    assert main(["import", "hf-llava", str(root / "hf"), str(tmp_path / "ckpt")]) == 0
    assert main(["export", "hf-llava", str(tmp_path / "ckpt"), str(tmp_path / "back")]) == 0
    assert (tmp_path / "back" / "config.json").is_file() and (tmp_path / "back" / "chat_template.jinja").is_file()
    assert main(["import", "hf-llava", str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_import_refuses_what_it_cannot_map(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llava", "vision_feature_layer": [-2, -5]}')
    with pytest.raises(VLBridgeError, match="concatenates several layers"):
        vlbridge.import_hf_llava(tmp_path, tmp_path / "out")
    (tmp_path / "config.json").write_text('{"model_type": "blip-2"}')
    with pytest.raises(WeightsError, match="expected 'llava'"):
        vlbridge.import_hf_llava(tmp_path, tmp_path / "out")


def test_export_refuses_other_layouts():
    model = vlbridge.build("tiny-mlp-opt", stage=2)
    with pytest.raises(VLBridgeError, match="only hf-vision \\+ mlp \\+ hf-causal-lm"):
        vlbridge.export_hf_llava(model, "/nonexistent")


def test_export_ships_a_processor_that_prepares_and_generates_like_vlbridge(llava):
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    from tests.processor_check import assert_processor_matches

    _, _, model, root = llava
    out = vlbridge.export_hf_llava(model, root / "with-processor")
    processor = LlavaProcessor.from_pretrained(str(out))
    assert (out / "preprocessor_config.json").is_file()
    assert_processor_matches(model, processor, LlavaForConditionalGeneration.from_pretrained(str(out)).eval(), PROMPTS[0],
                             hf_prompt=model.llm.format_prompt(PROMPTS[0]))


def test_an_imported_llava_loads_after_a_move(llava, tmp_path):
    import shutil

    _, _, model, root = llava
    shutil.move(vlbridge.import_hf_llava(root / "hf", tmp_path / "a"), tmp_path / "b")
    again = vlbridge.load(tmp_path / "b")
    assert again.generate(pixels(1), PROMPTS[0], max_new_tokens=4) == model.generate(pixels(1), PROMPTS[0], max_new_tokens=4)



def test_a_checkpoints_assembly_file_reads_its_paths_against_the_checkpoint(llava, tmp_path, monkeypatch):
    from vlbridge.assemblies.assembly import load_assembly

    _, _, _, root = llava
    assert (root / "imported" / "assembly.yaml").read_text().count("./") >= 2  # the tower and the LLM lie inside it
    monkeypatch.chdir(tmp_path)  # anywhere but the checkpoint, as `-a CKPT/assembly.yaml` is typed
    config = load_assembly(root / "imported" / "assembly.yaml").config
    assert config.llm.options["model"] == str((root / "imported" / "llm").resolve())
    assert config.encoder.options["model"] == str((root / "imported" / "vision").resolve())


def test_a_final_norm_the_export_would_drop_is_refused_with_its_size(llava, tmp_path):
    from vlbridge.files.checkpoint import checkpoint_assembly
    from vlbridge.interop.export_fidelity import ApproximateExportError

    _, _, _, root = llava
    raw = checkpoint_assembly(root / "imported")
    raw["encoder"]["options"]["final_norm"] = True
    normed = vlbridge.build(raw, stage=2)
    with pytest.raises(ApproximateExportError, match="final_norm is dropped.*by up to"):
        vlbridge.export_hf_llava(normed, tmp_path / "out")


SIGLIP = dict(model_type="siglip_vision_model", hidden_act="gelu_pytorch_tanh")  # no [CLS]: "default" would drop a patch
GEMMA2 = dict(model_type="gemma2", head_dim=12, final_logit_softcapping=3.0, attn_logit_softcapping=None, query_pre_attn_scalar=12)


def test_a_default_selection_that_would_drop_a_patch_is_refused_before_loading(tmp_path):
    make_llava(tmp_path / "hf", vision_override=SIGLIP)
    with pytest.raises(VLBridgeError, match="'default' drops the first token .* is a patch"):
        vlbridge.import_hf_llava(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_language_model_with_a_logit_soft_cap_imports_as_llava_computes_and_exports_exactly(tmp_path):
    """LLaVA runs its bare lm_head: Gemma-2's final soft cap does not apply inside it."""
    from transformers import LlavaForConditionalGeneration

    hf, tokenizer = make_llava(tmp_path / "hf", text_override=GEMMA2, seed=3)
    model = vlbridge.load(vlbridge.import_hf_llava(tmp_path / "hf", tmp_path / "imported")).eval()
    px, (ids, mask) = pixels(1), hf_inputs(tokenizer, hf, PROMPTS[:1])
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=px, attention_mask=mask).logits
        ours = model(px, *model.llm.tokenize([model.llm.format_prompt(PROMPTS[0])])).logits
    assert expected.abs().max() > 3.0  # above the cap: a capped model could not have produced these
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
    again = LlavaForConditionalGeneration.from_pretrained(str(vlbridge.export_hf_llava(model, tmp_path / "exported"))).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids, pixel_values=px, attention_mask=mask).logits, expected)


def test_a_capped_language_model_is_refused_by_the_export(tmp_path):
    from transformers import AutoModelForCausalLM

    from tests.hf_families import make_llm_dir
    from vlbridge.interop.export_fidelity import ApproximateExportError

    make_llm_dir(tmp_path / "gemma2", "gemma")
    config = json.loads((tmp_path / "gemma2" / "config.json").read_text())
    config.update(GEMMA2, head_dim=8, query_pre_attn_scalar=8, architectures=["Gemma2ForCausalLM"])
    (tmp_path / "gemma2" / "config.json").write_text(json.dumps(config))
    # Gemma-2 adds two norms per block: saved whole, as vlbridge loads only a directory that holds every tensor
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "gemma2")).save_pretrained(str(tmp_path / "gemma2"))
    model = vlbridge.build(_llava_assembly(tmp_path / "clip", tmp_path / "gemma2"), stage=2).eval()
    with pytest.raises(ApproximateExportError, match="final_logit_softcapping \\(3.0\\) is not applied"):
        vlbridge.export_hf_llava(model, tmp_path / "out")


def _llava_assembly(tower_dir, llm_dir, **encoder):
    """hf-vision (a tiny CLIP tower saved there unless one is) + mlp + hf-causal-lm with LLaVA's prompt."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    if not (tower_dir / "config.json").is_file():
        CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                         image_size=IMAGE, patch_size=PATCH)).save_pretrained(str(tower_dir))
    return {"name": "llava-like", "encoder": {"use": "hf-vision", "options": {"model": str(tower_dir), **encoder}},
            "connector": {"use": "mlp", "options": {"depth": 2, "activation": "gelu"}},
            "llm": {"use": "hf-causal-lm", "options": {"model": str(llm_dir), "prompt_template": "USER: <image>\n{} ASSISTANT:"}}}


@pytest.mark.parametrize("tower, options, message", [
    ("dinov2-registers", {"layer": -1}, "keeps 1 of its tower's 1 class tokens and 0 of its 2 register tokens"),
    ("clip", {"image_size": 42}, "runs at 42 px .* build with image_size 28"),
])
def test_an_encoder_llava_cannot_hold_is_refused_by_name(tmp_path, tower, options, message):
    from tests.hf_families import make_llm_dir

    _save_tower(tmp_path / tower, tower)
    make_llm_dir(tmp_path / "llama", "llama")
    model = vlbridge.build(_llava_assembly(tmp_path / tower, tmp_path / "llama", **options), stage=2)
    with pytest.raises(VLBridgeError, match=message):
        vlbridge.export_hf_llava(model, tmp_path / "out")


@pytest.mark.parametrize("tower, options", [
    ("dinov2", {}),  # blocks cut at layer -2 from encoder.layer (not .layers): read back for the export
    ("dinov2-registers", {"include_cls": False, "include_registers": True}),  # all but the first: "default"
    ("siglip", {"layer": -1}),  # no [CLS], head dropped by hf-vision: "full", the head read back
])
def test_other_towers_export_exactly(tmp_path, tower, options):
    from transformers import LlavaForConditionalGeneration

    from tests.hf_families import make_llm_dir
    from vlbridge.interop.hf_llava import _probe_difference

    _save_tower(tmp_path / tower, tower)
    make_llm_dir(tmp_path / "llama", "llama")
    model = vlbridge.build(_llava_assembly(tmp_path / tower, tmp_path / "llama", **options), stage=2).eval()
    again = LlavaForConditionalGeneration.from_pretrained(str(vlbridge.export_hf_llava(model, tmp_path / "out"))).eval()
    assert again.config.image_seq_length == model.plan.encoder_out.num_tokens
    with torch.no_grad():
        assert _probe_difference(model, again) < 1e-5


def _save_tower(directory, kind: str) -> None:
    import transformers as t

    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=IMAGE, patch_size=PATCH)
    tower = {"clip": lambda: t.CLIPVisionModel(t.CLIPVisionConfig(**sizes)),
             "siglip": lambda: t.SiglipVisionModel(t.SiglipVisionConfig(**sizes)),
             "dinov2": lambda: t.Dinov2Model(t.Dinov2Config(**sizes)),
             "dinov2-registers": lambda: t.Dinov2WithRegistersModel(t.Dinov2WithRegistersConfig(**sizes, num_register_tokens=2))}[kind]()
    redraw(tower, std=0.1, seed=4)
    tower.save_pretrained(str(directory))


def test_an_image_processor_kept_only_in_processor_config_is_read(tmp_path):
    """transformers 5's LlavaProcessor.save_pretrained writes the image processor into
    processor_config.json and no preprocessor_config.json; its mean and std were lost (family defaults)."""
    from PIL import Image
    from transformers import CLIPImageProcessor, LlavaProcessor

    _, tokenizer = make_llava(tmp_path / "hf")
    (tmp_path / "hf" / "preprocessor_config.json").unlink()
    processor = CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE},
                                   image_mean=[0.5] * 3, image_std=[0.5] * 3)
    LlavaProcessor(processor, tokenizer, patch_size=PATCH, vision_feature_select_strategy="default",
                   image_token="<image>").save_pretrained(str(tmp_path / "hf"))
    if (tmp_path / "hf" / "preprocessor_config.json").is_file():
        (tmp_path / "hf" / "preprocessor_config.json").unlink()  # as transformers 5 leaves it
    assert "image_processor" in json.loads((tmp_path / "hf" / "processor_config.json").read_text())
    model = vlbridge.load(vlbridge.import_hf_llava(tmp_path / "hf", tmp_path / "ours"))
    assert model.plan.preprocess.mean == (0.5, 0.5, 0.5) and model.plan.preprocess.std == (0.5, 0.5, 0.5)
    image = Image.new("RGB", (IMAGE, IMAGE), (200, 40, 90))
    theirs = LlavaProcessor.from_pretrained(str(tmp_path / "hf"))(images=[image], text=["<image>"], return_tensors="pt").pixel_values
    torch.testing.assert_close(model.pixel_values([image]), theirs, atol=1e-5, rtol=0)


def test_a_llava_missing_a_tensor_is_refused_at_import(tmp_path):
    """transformers draws a tensor missing from the files at random: the projector would import half-random."""
    from safetensors.torch import load_file, save_file

    make_llava(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if not k.endswith("multi_modal_projector.linear_2.weight")},
              str(weights), metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=r"1 missing \(they would be drawn at random\): model.multi_modal_projector.linear_2.weight"):
        vlbridge.import_hf_llava(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_feature_layer_listed_alone_imports_as_that_layer(tmp_path):
    """vision_feature_layer [-3] concatenates one hidden state: it is layer -3, not a refusal."""
    hf, tokenizer = make_llava(tmp_path / "hf", layer=[-3], seed=6)
    model = vlbridge.load(vlbridge.import_hf_llava(tmp_path / "hf", tmp_path / "out")).eval()
    assert model.assembly.encoder.options.layer == -3
    px, (ids, mask) = pixels(1), hf_inputs(tokenizer, hf, PROMPTS[:1])
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=px, attention_mask=mask).logits
        ours = model(px, *model.llm.tokenize([model.llm.format_prompt(PROMPTS[0])])).logits
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def test_the_embedding_output_layer_exports_as_a_llava_transformers_can_run(tmp_path):
    """hf-vision's layer 0 (the embedding output) went out as vision_feature_layer 0, which transformers'
    LLaVA takes for "no hidden states" and fails on (TypeError); its negative twin -(blocks + 1) runs."""
    from transformers import LlavaForConditionalGeneration

    hf, tokenizer = make_llava(tmp_path / "hf", layer=-4, seed=3)  # the tower's 3 blocks: hidden_states[-4] is [0]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "vision_feature_layer": 0}))
    model = vlbridge.load(vlbridge.import_hf_llava(tmp_path / "hf", tmp_path / "imported")).eval()
    assert model.assembly.encoder.options.layer == 0
    again = LlavaForConditionalGeneration.from_pretrained(str(vlbridge.export_hf_llava(model, tmp_path / "exported"))).eval()
    assert again.config.vision_feature_layer == -4
    px, (ids, mask) = pixels(1), hf_inputs(tokenizer, hf, PROMPTS[:1])
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=px, attention_mask=mask).logits
        torch.testing.assert_close(model(px, *model.llm.tokenize([model.llm.format_prompt(PROMPTS[0])])).logits, expected,
                                   atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(again(input_ids=ids, pixel_values=px, attention_mask=mask).logits, expected)


def test_a_tokenizer_without_a_pad_token_imports(tmp_path):
    """hf-causal-lm pads with the end token where a tokenizer has no pad token (padding is masked); the
    import refused such a LLaVA as having 'no usable tokenizer'."""
    hf, tokenizer = make_llava(tmp_path / "hf", seed=7)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(str(tmp_path / "hf"))
    model = vlbridge.load(vlbridge.import_hf_llava(tmp_path / "hf", tmp_path / "out")).eval()
    assert model.llm.tokenizer.pad_token == tokenizer.eos_token
    ids, _ = hf_inputs(tokenizer, hf, PROMPTS[:1])  # one prompt: no padding
    px = pixels(1)
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=px, attention_mask=torch.ones_like(ids)).logits
        ours = model(px, *model.llm.tokenize([model.llm.format_prompt(PROMPTS[0])])).logits
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


PHI = dict(model_type="phi", hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)


def test_a_language_model_whose_head_has_a_bias_imports_and_exports_exactly(tmp_path):
    """LLaVA's lm_head has no bias, PhiForCausalLM's has one: the import failed with a state-dict
    traceback (zeros compute what LLaVA computes), and an export with a real bias would have crashed too."""
    from transformers import LlavaForConditionalGeneration

    from tests.hf_families import make_llm_dir
    from vlbridge.interop.export_fidelity import ApproximateExportError

    hf, tokenizer = make_llava(tmp_path / "hf", text_override=PHI, seed=8)
    model = vlbridge.load(vlbridge.import_hf_llava(tmp_path / "hf", tmp_path / "imported")).eval()
    px, (ids, mask) = pixels(1), hf_inputs(tokenizer, hf, PROMPTS[:1])
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=px, attention_mask=mask).logits
        torch.testing.assert_close(model(px, *model.llm.tokenize([model.llm.format_prompt(PROMPTS[0])])).logits, expected,
                                   atol=1e-4, rtol=1e-4)
    again = LlavaForConditionalGeneration.from_pretrained(str(vlbridge.export_hf_llava(model, tmp_path / "exported"))).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids, pixel_values=px, attention_mask=mask).logits, expected)
    make_llm_dir(tmp_path / "phi", "phi")  # its own head bias, drawn at random
    biased = vlbridge.build(_llava_assembly(tmp_path / "clip", tmp_path / "phi"), stage=2).eval()
    with pytest.raises(ApproximateExportError, match="lm_head bias is dropped"):
        vlbridge.export_hf_llava(biased, tmp_path / "out")


@pytest.mark.parametrize("family, message", [
    ("opt", "cannot hold a 'opt' language model with tied embeddings: it ties lm_head to model.embed_tokens"),
    ("gpt2", "cannot hold a 'gpt2' language model: GPT2LMHeadModel keeps its body in 'transformer'"),
])
def test_a_language_model_llava_cannot_build_is_refused_by_name(tmp_path, family, message):
    """transformers' LLaVA failed with an AttributeError from inside its weight tying."""
    from tests.hf_families import make_llm_dir

    make_llm_dir(tmp_path / family, family)
    model = vlbridge.build(_llava_assembly(tmp_path / "clip", tmp_path / family), stage=2)
    with pytest.raises(VLBridgeError, match=re.escape(message)):
        vlbridge.export_hf_llava(model, tmp_path / "out")


@pytest.mark.parametrize("part", ["text_config", "vision_config"])
def test_a_config_without_a_part_is_refused_before_anything_loads(tmp_path, monkeypatch, part):
    """Without text_config transformers builds its default 7B Llama to load the weights into."""
    from vlbridge.interop import hf_llava

    make_llava(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    del config[part]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))

    def never(src):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(hf_llava, "_load_llava", never)
    with pytest.raises(VLBridgeError, match=f"has no {part} object"):
        vlbridge.import_hf_llava(tmp_path / "hf", tmp_path / "out")


def test_a_llava_whose_image_processor_pads_to_a_square_imports_and_exports_with_its_pixels(tmp_path):
    """LlavaImageProcessor with do_pad pads a non-square image to a square before resizing (LLaVA-1.5's
    'pad'); the import refused it. Now the imported model reads transformers' pixels from wide, tall and
    square images, and its export's processor pads as it came."""
    from transformers import LlavaForConditionalGeneration, LlavaImageProcessor, LlavaProcessor

    from tests.processor_check import assert_processor_matches

    make_llava(tmp_path / "hf", seed=10)
    LlavaImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE},
                        do_pad=True).save_pretrained(str(tmp_path / "hf"))
    model = vlbridge.load(vlbridge.import_hf_llava(tmp_path / "hf", tmp_path / "imported")).eval()
    assert model.plan.preprocess.pad_to_square == (122, 116, 104)  # int(CLIP mean * 255)
    source = LlavaProcessor.from_pretrained(str(tmp_path / "hf"), patch_size=PATCH, vision_feature_select_strategy="default",
                                            num_additional_image_tokens=1)
    for seed, shape in enumerate([(30, 41), (41, 30), (30, 44), (57, 20), (20, 20)]):  # odd and even margins, a square
        image = torch.randint(0, 256, (3, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
        theirs = source(images=[image], text=["<image>"], return_tensors="pt").pixel_values  # torchvision resizes both
        torch.testing.assert_close(model.pixel_values([image]), theirs, atol=1e-5, rtol=0)
    out = vlbridge.export_hf_llava(model, tmp_path / "exported")
    processor = LlavaProcessor.from_pretrained(str(out))
    assert type(processor.image_processor).__name__ == "LlavaImageProcessor" and processor.image_processor.do_pad
    assert_processor_matches(model, processor, LlavaForConditionalGeneration.from_pretrained(str(out)).eval(), PROMPTS[0],
                             hf_prompt=model.llm.format_prompt(PROMPTS[0]))


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}{% for content in message['content'] | "
          "selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}{% for content in message['content'] | "
          "selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}{{'<|im_end|>' + '\\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")  # llava-interleave-qwen's


@pytest.mark.parametrize("template", [CHATML, "{{ bos_token }}" + CHATML.replace("'<|im_start|>'", "'{x} '")])
def test_the_import_words_prompts_by_the_processors_chat_template(tmp_path, template):
    """A LLaVA whose processor carries another conversation format (ChatML) was imported with
    LLaVA-1.5's 'USER: ... ASSISTANT:' wording: prompted in a format it was never tuned on, silently."""
    from PIL import Image
    from transformers import LlavaProcessor

    hf, tokenizer = make_llava(tmp_path / "hf", seed=9)
    LlavaProcessor.from_pretrained(str(tmp_path / "hf"), patch_size=PATCH, vision_feature_select_strategy="default",
                                   num_additional_image_tokens=1, chat_template=template).save_pretrained(str(tmp_path / "hf"))
    processor = LlavaProcessor.from_pretrained(str(tmp_path / "hf"))
    model = vlbridge.load(vlbridge.import_hf_llava(tmp_path / "hf", tmp_path / "out")).eval()
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPTS[0]}]}]
    text = processor.apply_chat_template(turn, add_generation_prompt=True)
    bos = tokenizer.bos_token
    inputs = processor(images=[Image.new("RGB", (IMAGE, IMAGE), (200, 40, 90))], text=[text], return_tensors="pt",
                       add_special_tokens=not text.startswith(bos))  # as apply_chat_template(tokenize=True) does
    ids, mask = model.llm.tokenize([model.llm.format_prompt(PROMPTS[0])])
    image_id = hf.config.image_token_index
    assert [i for i in inputs["input_ids"][0].tolist() if i != image_id] == [i for i in ids[0].tolist() if i != image_id]
    with torch.no_grad():
        expected = hf(**inputs).logits
        torch.testing.assert_close(model(inputs["pixel_values"], ids, mask).logits, expected, atol=1e-4, rtol=1e-4)


def test_a_damaged_chat_template_file_is_an_error_not_passed_over(llava, tmp_path):
    """A chat_template.json cut short was skipped, and the LLaVA imported with LLaVA-1.5's wording:
    prompted in a format it was never tuned on, silently."""
    import shutil

    from vlbridge.errors import InputFileError

    shutil.copytree(llava[3] / "hf", tmp_path / "hf")
    (tmp_path / "hf" / "chat_template.json").write_text('{"chat_template": "{% for message in mess')
    with pytest.raises(InputFileError, match="chat_template.json.*malformed JSON"):
        vlbridge.import_hf_llava(tmp_path / "hf", tmp_path / "out")


def test_a_prompt_template_without_the_image_token_is_refused(llava, tmp_path):
    """Without '<image>' the visual tokens went first, before BOS: a placement no LLaVA computes."""
    _, _, _, root = llava
    with pytest.raises(VLBridgeError, match="has no '<image>'"):
        vlbridge.import_hf_llava(root / "hf", tmp_path / "out", prompt_template="Q: {} A:")
    assert main(["import", "hf-llava", str(root / "hf"), str(tmp_path / "cli"), "--prompt-template", "Q: {} A:"]) == 2


def test_a_prompt_template_placeholder_cut_by_max_text_tokens_is_refused(llava):
    """With a long instruction, LLaVA's '<image>' stayed inside the 32 tokens; with a long system
    prompt before it, the row lost its placeholder to the cut and its visual tokens silently went first."""
    from vlbridge.train.objectives import Stage2Objective

    _, _, model, _ = llava
    model.llm.prompt_template = "SYSTEM: " + "be brief " * 20 + "USER: <image>\n{} ASSISTANT:"
    try:
        size = model.plan.preprocess.image_size
        batch = {"pixel_values": torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)),
                 "text_input": ["what is it?"] * 2, "text_output": ["red"] * 2}
        with pytest.raises(VLBridgeError, match=r"image placeholder of the prompt template lies past max_text_tokens 32 in 2 text"):
            Stage2Objective()(model, batch)
        Stage2Objective(max_text_tokens=256)(model, batch)  # room for it: trains
    finally:
        model.llm.prompt_template = "USER: <image>\n{} ASSISTANT:"


def test_processor_files_travel_as_parsed_json_through_links(llava, tmp_path):
    """A hub cache snapshot links every file to a blob: the import follows the links, and writes the
    processor's settings back as the JSON it parsed (a file of its own, not a link or a byte copy)."""
    import shutil

    shutil.copytree(llava[3] / "hf", tmp_path / "hf")
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    source = tmp_path / "hf" / "preprocessor_config.json"
    settings = json.loads(source.read_text())
    source.rename(blobs / "3f1c")
    source.symlink_to(blobs / "3f1c")
    out = vlbridge.import_hf_llava(tmp_path / "hf", tmp_path / "out")
    written = out / "vision" / "preprocessor_config.json"
    assert not written.is_symlink() and json.loads(written.read_text()) == settings


@pytest.mark.parametrize("secret", ["password: hunter2\n", '["hunter2"]'], ids=["not-json", "not-an-object"])
def test_a_processor_file_linked_to_another_file_is_refused_and_not_copied(llava, tmp_path, secret):
    """preprocessor_config.json was copied byte for byte, links followed: a link to a private file
    put that file into the checkpoint (and the next `vlbridge export` or upload)."""
    import shutil

    from vlbridge.errors import InputFileError

    shutil.copytree(llava[3] / "hf", tmp_path / "hf")
    (tmp_path / "secret").write_text(secret)
    (tmp_path / "hf" / "preprocessor_config.json").unlink()
    (tmp_path / "hf" / "preprocessor_config.json").symlink_to(tmp_path / "secret")
    with pytest.raises(InputFileError, match=r"processor's settings '.*preprocessor_config.json': (malformed JSON|expected an object)"):
        vlbridge.import_hf_llava(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _turn(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


@pytest.mark.parametrize("source", [None, "chat_template.json", "chat_template.jinja"])
def test_the_export_ships_a_chat_template_that_words_prompts_as_vlbridge(tmp_path, source):
    """The export wrote no chat template, so LlavaProcessor.apply_chat_template failed on it. It carries
    the one the LLaVA was imported with (a legacy chat_template.json too, which the tokenizer does not
    read), or, with none, one that words one image and one text as vlbridge does (LLaVA-1.5's here)."""
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    from tests.processor_check import assert_processor_matches

    make_llava(tmp_path / "hf", seed=11)
    if source is not None:
        LlavaProcessor.from_pretrained(str(tmp_path / "hf"), patch_size=PATCH, vision_feature_select_strategy="default",
                                       num_additional_image_tokens=1, chat_template=CHATML).save_pretrained(str(tmp_path / "hf"))
        if source == "chat_template.json":  # as older transformers saved it
            (tmp_path / "hf" / "chat_template.jinja").unlink()
            (tmp_path / "hf" / "chat_template.json").write_text(json.dumps({"chat_template": CHATML}))
    model = vlbridge.load(vlbridge.import_hf_llava(tmp_path / "hf", tmp_path / "imported")).eval()
    out = vlbridge.export_hf_llava(model, tmp_path / "exported")
    processor = LlavaProcessor.from_pretrained(str(out))
    text = processor.apply_chat_template(_turn(PROMPTS[0]), add_generation_prompt=True)
    assert text == model.llm.format_prompt(PROMPTS[0])
    assert text == ("USER: <image>\nwhat is it? ASSISTANT:" if source is None else
                    "<|im_start|>user\n<image>\nwhat is it?<|im_end|>\n<|im_start|>assistant\n")
    if source is not None:
        assert processor.chat_template == CHATML  # the model's own conversation format, more turns included
    assert_processor_matches(model, processor, LlavaForConditionalGeneration.from_pretrained(str(out)).eval(), PROMPTS[0],
                             hf_prompt=text)


def test_a_chat_template_that_words_prompts_otherwise_is_replaced_and_said_so(tmp_path):
    """An import with its own --prompt-template words prompts otherwise than the LLaVA's chat template:
    shipping that template would prompt the export otherwise than vlbridge does."""
    from transformers import LlavaProcessor

    from vlbridge.interop.export_fidelity import LeftOutOfExportWarning

    make_llava(tmp_path / "hf", seed=12)
    LlavaProcessor.from_pretrained(str(tmp_path / "hf"), patch_size=PATCH, vision_feature_select_strategy="default",
                                   num_additional_image_tokens=1, chat_template=CHATML).save_pretrained(str(tmp_path / "hf"))
    template = 'Q: "{{x}}" <image>\n{} A:'  # quotes and literal braces, which the made template must keep
    model = vlbridge.load(vlbridge.import_hf_llava(tmp_path / "hf", tmp_path / "imported", prompt_template=template))
    with pytest.warns(LeftOutOfExportWarning, match="the language model's chat template, which words one image and one text "
                                                    "otherwise than this model's prompts"):
        out = vlbridge.export_hf_llava(model, tmp_path / "exported")
    processor = LlavaProcessor.from_pretrained(str(out))
    assert processor.apply_chat_template(_turn("why {not}?"), add_generation_prompt=True) == 'Q: "{x}" <image>\nwhy {not}? A:'


@pytest.mark.parametrize("chat", [False, True])
def test_a_model_trained_in_vlbridge_exports_the_chat_template_of_its_prompts(tmp_path, chat):
    """A model built in vlbridge has a prompt template (or its tokenizer's text chat template), not a
    multimodal chat template: the export makes one that words one user turn as vlbridge does, and
    refuses, by name, what vlbridge's prompt has no place for (a system message, more turns)."""
    from jinja2.exceptions import TemplateError
    from transformers import LlavaProcessor

    from tests.hf_families import make_llm_dir

    make_llm_dir(tmp_path / "llama", "llama", chat=chat)
    assembly = _llava_assembly(tmp_path / "clip", tmp_path / "llama")
    if chat:
        assembly["llm"]["options"].update(prompt_format="chat", prompt_template="<image>\n{}")
    model = vlbridge.build(assembly, stage=2).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = vlbridge.export_hf_llava(model, tmp_path / "out")
    left_out = [w for w in caught if "chat template" in str(w.message)]
    assert len(left_out) == chat  # the tokenizer's own text template, which takes no image, is not shipped
    processor = LlavaProcessor.from_pretrained(str(out))
    text = processor.apply_chat_template(_turn(PROMPTS[1]), add_generation_prompt=True)
    assert text == model.llm.format_prompt(PROMPTS[1])
    assert text == ("</s>USER: <image>\nhow many red things are there in the picture?\nASSISTANT:" if chat else
                    "USER: <image>\nhow many red things are there in the picture? ASSISTANT:")
    with pytest.raises(TemplateError, match="give one user message with at most one image and its text \\(no system message"):
        processor.apply_chat_template([{"role": "system", "content": "be brief"}, *_turn(PROMPTS[0])])


def test_a_prompt_without_the_image_token_is_refused_by_the_llava_export(tmp_path):
    """A prompt template without the image token ('Question: {} Answer:') has vlbridge put the visual
    tokens before the whole text, BOS included: LLaVA places them only at its image token, so the
    export was written and its processor then failed on every image."""
    from tests.hf_families import make_llm_dir

    make_llm_dir(tmp_path / "llama", "llama")
    assembly = _llava_assembly(tmp_path / "clip", tmp_path / "llama")
    assembly["llm"]["options"]["prompt_template"] = "Question: {} Answer:"
    model = vlbridge.build(assembly, stage=2)
    with pytest.raises(VLBridgeError, match=r"prompt \('Question: \{\} Answer:'\) has none.*prompt_template holding the image token"):
        vlbridge.export_hf_llava(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_generation_stops_at_the_checkpoints_eos_token(llava, tmp_path):
    """LLaVA stops at its text config's eos_token_id; the import stopped at the tokenizer's eos_token,
    and an export wrote the config's, not the one vlbridge stops at."""
    from transformers import LlavaForConditionalGeneration

    hf, tokenizer, _, _ = llava
    px, (ids, mask) = pixels(2), hf_inputs(tokenizer, hf, PROMPTS)
    with torch.no_grad():
        first = hf.generate(input_ids=ids, pixel_values=px, attention_mask=mask, max_new_tokens=8)[0, ids.shape[1] + 1:].tolist()
    eos = next(t for t in first if (text := tokenizer.decode([t])) and tokenizer(text, add_special_tokens=False)["input_ids"] == [t])
    reference, _ = make_llava(tmp_path / "hf", text_override={"eos_token_id": eos})
    model = vlbridge.load(vlbridge.import_hf_llava(tmp_path / "hf", tmp_path / "imported")).eval()
    assert model.assembly.llm.options.eos_token == tokenizer.decode([eos])
    with torch.no_grad():
        expected = reference.generate(input_ids=ids, pixel_values=px, attention_mask=mask, max_new_tokens=8)[:, ids.shape[1]:]
    assert expected.shape[1] < 8 or (expected == eos).any()  # transformers stopped at the token
    assert model.generate(px, PROMPTS, max_new_tokens=8) == [t.strip() for t in tokenizer.batch_decode(expected, skip_special_tokens=True)]
    again = LlavaForConditionalGeneration.from_pretrained(str(vlbridge.export_hf_llava(model, tmp_path / "exported")))
    assert again.generation_config.eos_token_id == eos


@pytest.mark.parametrize("beams", [1, 3])
def test_generation_stops_at_every_eos_id_of_the_checkpoints_generation_config(llava, tmp_path, beams):
    """A LLaVA whose generation_config.json lists several eos ids (Llama-3 instruct's end-of-turn tokens)
    stops at any of them; the import stopped at the tokenizer's eos alone and ran past them."""
    import json

    from transformers import LlavaForConditionalGeneration

    hf, tokenizer, _, _ = llava
    px, (ids, mask) = pixels(2), hf_inputs(tokenizer, hf, PROMPTS)
    with torch.no_grad():
        free = hf.generate(input_ids=ids, pixel_values=px, attention_mask=mask, max_new_tokens=8, eos_token_id=[])[:, ids.shape[1]:]
    stops = list(dict.fromkeys([free[0, 2].item(), tokenizer.eos_token_id, free[1, 4].item()]))
    make_llava(tmp_path / "hf")
    settings = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps({**settings, "eos_token_id": stops, "pad_token_id": None}))
    reference = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "hf")).eval()
    model = vlbridge.load(vlbridge.import_hf_llava(tmp_path / "hf", tmp_path / "imported")).eval()
    with torch.no_grad():
        expected = reference.generate(input_ids=ids, pixel_values=px, attention_mask=mask, max_new_tokens=8, num_beams=beams,
                                      do_sample=False)[:, ids.shape[1]:]
    assert beams > 1 or expected.shape[1] < 8  # greedy: transformers stopped at listed ids that are not the tokenizer's eos
    texts = [t.strip() for t in tokenizer.batch_decode(expected, skip_special_tokens=True)]
    assert model.generate(px, PROMPTS, max_new_tokens=8, num_beams=beams) == texts
    again = LlavaForConditionalGeneration.from_pretrained(str(vlbridge.export_hf_llava(model, tmp_path / "exported")))
    assert again.generation_config.eos_token_id == stops
