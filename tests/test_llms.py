"""The frozen LLMs (OPT, FlanT5): tiny random models, no network, checked against transformers itself."""

from __future__ import annotations

import re
import shutil
import socket
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
import torch.nn.functional as F  # noqa: E402

from vlbridge.errors import VLBridgeError  # noqa: E402
from vlbridge.parts.freeze import FrozenPart  # noqa: E402
from vlbridge.plugins.llms import flan_t5, opt  # noqa: E402
from vlbridge.plugins.llms.soft_prompt import IGNORE_INDEX, pack_padding  # noqa: E402
from vlbridge.plugins.tiny_assets import tokenizer_dir  # noqa: E402
from vlbridge.plugin.registry import get_registry  # noqa: E402

SPECS = {"opt": (opt, opt.OPTOptions), "flan-t5": (flan_t5, flan_t5.FlanT5Options)}
PROMPTS = ["a red circle", "Question: what colour is the big star on the left? Short answer:"]


def build(name: str, **options):
    """Build through the registered spec's factory string, as the composition does."""
    spec = get_registry().resolve("llm", name).spec
    opts = spec.options(**options)
    return spec.load_factory()(opts), opts


def spiced(name: str, seed: int = 0):
    """A tiny LLM whose greedy outputs vary from token to token: OPT's 0.02-std random init repeats one
    token forever, so its matrices are redrawn wider."""
    torch.manual_seed(seed)
    llm, _ = build(name, variant="tiny")
    if name == "opt":
        with torch.no_grad():
            for key, param in llm.model.named_parameters():
                if param.dim() == 2:
                    param.normal_(0.0, 0.1 if "embed_tokens" in key else 0.3)
    return llm


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_opt():
    return spiced("opt")


@pytest.fixture(scope="module")
def tiny_t5():
    return spiced("flan-t5")


@pytest.fixture(params=["opt", "flan-t5"])
def tiny_llm(request, tiny_opt, tiny_t5):
    return tiny_opt if request.param == "opt" else tiny_t5


def no_network(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a tiny LLM tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def hf_inputs(llm, visual, ids, mask):
    """What a user of transformers would feed by hand: [visual; embed(ids)] and [ones; mask]."""
    embeds = torch.cat([visual, llm.model.get_input_embeddings()(ids)], dim=1)
    return embeds, torch.cat([torch.ones(visual.shape[:2], dtype=mask.dtype), mask], dim=1)


# -- building ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["opt", "flan-t5"])
def test_tiny_builds_offline_frozen_deterministic_and_matches_the_spec(name, monkeypatch):
    no_network(monkeypatch)
    torch.manual_seed(3)
    llm, opts = build(name, variant="tiny")
    torch.manual_seed(3)
    again, _ = build(name, variant="tiny")
    module, _ = SPECS[name]
    assert isinstance(llm, FrozenPart) and llm.frozen and not llm.training
    assert not any(p.requires_grad for p in llm.parameters())
    llm.train()
    assert not llm.training and not llm.model.training
    assert llm.embed_width == module.dims(opts).embed_width == 64
    assert llm.is_encoder_decoder == module.dims(opts).encoder_decoder
    assert sum(p.numel() for p in llm.parameters()) == module.num_params(opts)
    assert len(llm.tokenizer) <= module.ARCH["tiny"]["vocab"]
    for (key, a), (_, b) in zip(llm.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), key


def test_tiny_flan_t5_has_an_untied_unscaled_head_like_flan_t5(tiny_t5):
    model = tiny_t5.model
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    assert not torch.equal(model.lm_head.weight, model.shared.weight)
    assert model.config.scale_decoder_outputs is False
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()


def test_dtype_option_and_fp16_t5_refused():
    llm, _ = build("opt", variant="tiny", dtype="bf16")
    assert llm.dtype == torch.bfloat16 and llm.model.lm_head.weight.dtype == torch.bfloat16
    ids, mask = llm.tokenize(PROMPTS)
    logits = llm(torch.randn(2, 3, 64), ids, mask).logits  # fp32 visual prompt is cast to bf16
    assert logits.dtype == torch.bfloat16 and logits.shape[:2] == (2, 3 + ids.shape[1])
    with pytest.raises(VLBridgeError, match=r"fp16.*overflows.*bf16.*fp32"):
        build("flan-t5", variant="tiny", dtype="fp16")


# -- tokenizing --------------------------------------------------------------------------------------


def test_tokenize_pads_either_side_truncates_and_decode_strips(tiny_opt, tiny_t5):
    assert tiny_opt.caption_suffix == "\n" and tiny_t5.caption_suffix == ""
    for llm in (tiny_opt, tiny_t5):
        right_ids, right_mask = llm.tokenize(PROMPTS)
        left_ids, left_mask = llm.tokenize(PROMPTS, padding_side="left")
        short = int(right_mask[0].sum())
        assert right_mask[0, :short].all() and not right_mask[0, short:].any()
        assert left_mask[0, -short:].all() and not left_mask[0, :-short].any()
        assert torch.equal(right_ids[0, :short], left_ids[0, -short:])
        cut, cut_mask = llm.tokenize(PROMPTS, max_length=4)
        assert cut.shape == cut_mask.shape == (2, 4)
        bare, _ = llm.tokenize("a red circle", add_special_tokens=False)
        assert bare.shape[1] == short - 1  # OPT's BOS </s> or T5's closing </s>
        assert llm.decode(right_ids) == llm.decode(left_ids) == PROMPTS
        assert llm.decode([[*bare[0].tolist(), llm.tokenizer.pad_token_id]]) == ["a red circle"]
    opt_ids, _ = tiny_opt.tokenize("a red circle")
    t5_ids, _ = tiny_t5.tokenize("a red circle")
    assert opt_ids[0, 0] == tiny_opt.tokenizer.bos_token_id and t5_ids[0, -1] == tiny_t5.tokenizer.eos_token_id


# -- forward -----------------------------------------------------------------------------------------


def hand_loss(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of -log p(target) over the valid positions only, written out."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    picked = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * valid).sum() / valid.sum()


def test_opt_forward_is_transformers_on_the_prefixed_embeds_and_loss_skips_visual_and_ignored(tiny_opt):
    ids, mask = tiny_opt.tokenize([p + tiny_opt.caption_suffix for p in PROMPTS])
    labels = ids.clone()
    labels[:, :2] = IGNORE_INDEX  # a prompt the caller does not train on
    visual = torch.randn(2, 5, 64)
    out = tiny_opt(visual, ids, mask, labels=labels)
    embeds, full_mask = hf_inputs(tiny_opt, visual, ids, mask)
    direct = tiny_opt.model(inputs_embeds=embeds, attention_mask=full_mask)
    torch.testing.assert_close(out.logits, direct.logits, atol=1e-5, rtol=0)
    # shifted by one: position t predicts text token t - 4 (5 visual tokens); pads and -100 do not count
    text_logits = direct.logits[:, 4:-1]
    valid = (mask == 1) & (labels != IGNORE_INDEX)
    expected = hand_loss(text_logits, ids, valid.float())
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=0)
    assert 0 < valid.sum() < mask.sum()  # some labels were really dropped


def test_t5_forward_is_transformers_with_labels_on_the_decoder(tiny_t5):
    ids, mask = tiny_t5.tokenize(PROMPTS)
    targets, target_mask = tiny_t5.tokenize(["a big blue square", "red"])
    visual = torch.randn(2, 5, 64)
    out = tiny_t5(visual, ids, mask, labels=targets, decoder_attention_mask=target_mask)
    embeds, full_mask = hf_inputs(tiny_t5, visual, ids, mask)
    start = torch.full((2, 1), tiny_t5.model.config.decoder_start_token_id)
    direct = tiny_t5.model(inputs_embeds=embeds, attention_mask=full_mask,
                           decoder_input_ids=torch.cat([start, targets[:, :-1]], 1), decoder_attention_mask=target_mask)
    torch.testing.assert_close(out.logits, direct.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, hand_loss(direct.logits, targets, target_mask.float()), atol=1e-5, rtol=0)
    assert target_mask.sum() < target_mask.numel()  # the padded target really was ignored
    with pytest.raises(VLBridgeError, match="needs labels"):
        tiny_t5(visual, ids, mask)


def test_padding_side_of_the_text_does_not_change_the_output(tiny_llm):
    visual = torch.randn(2, 4, 64)
    right = tiny_llm.tokenize(PROMPTS)
    left = tiny_llm.tokenize(PROMPTS, padding_side="left")
    if tiny_llm.is_encoder_decoder:  # same decoder targets, encoder padding on either side
        targets, target_mask = tiny_llm.tokenize(["a red circle", "yes"])
        a = tiny_llm(visual, *right, labels=targets, decoder_attention_mask=target_mask)
        b = tiny_llm(visual, *left, labels=targets, decoder_attention_mask=target_mask)
        torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    else:  # OPT's positions follow the mask: compare the logits of the real tokens
        a = tiny_llm(visual, *right).logits
        b = tiny_llm(visual, *left).logits
        length = int(right[1][0].sum())
        torch.testing.assert_close(a[0, 4:4 + length], b[0, -length:], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=1e-5)


# -- generation --------------------------------------------------------------------------------------


def hf_generate(llm, visual, ids, mask, **kwargs):
    """transformers' generate on the same inputs_embeds, reduced to the new tokens by hand."""
    embeds, full_mask = hf_inputs(llm, visual, ids, mask)
    out = llm.model.generate(inputs_embeds=embeds, attention_mask=full_mask, pad_token_id=llm.tokenizer.pad_token_id, **kwargs)
    return out[:, 1:] if llm.is_encoder_decoder else out  # T5 starts with the decoder start token


@pytest.mark.parametrize("search", [{}, {"num_beams": 3, "num_return_sequences": 2, "length_penalty": 0.0}])
def test_generate_equals_transformers_generate_on_the_same_embeds(tiny_llm, search):
    torch.manual_seed(1)
    visual = torch.randn(2, 4, 64)
    ids, mask = tiny_llm.tokenize(["a red circle"] * 2)  # no padding: the visual prompts differ
    assert mask.all()
    ours = tiny_llm.generate(visual, ids, mask, max_new_tokens=7, min_new_tokens=7, **search)
    eos = {} if tiny_llm.is_encoder_decoder else {"eos_token_id": tiny_llm.tokenizer("\n", add_special_tokens=False).input_ids[0]}
    theirs = hf_generate(tiny_llm, visual, ids, mask, max_new_tokens=7, min_new_tokens=7, **eos, **search)
    assert ours.shape == (2 * search.get("num_return_sequences", 1), 7)
    assert torch.equal(ours, theirs)
    assert len(set(ours.flatten().tolist())) > 4  # a real sequence, not one token repeated


@pytest.mark.parametrize("search", [{}, {"num_beams": 3}])
def test_batched_padded_generation_equals_one_by_one(tiny_llm, search):
    torch.manual_seed(2)
    visual = torch.randn(2, 4, 64)
    settings = {"max_new_tokens": 6, "min_new_tokens": 6, **search}
    singles = [tiny_llm.generate(visual[i:i + 1], *tiny_llm.tokenize(PROMPTS[i]), **settings) for i in range(2)]
    left = tiny_llm.generate(visual, *tiny_llm.tokenize(PROMPTS, padding_side="left"), **settings)
    right = tiny_llm.generate(visual, *tiny_llm.tokenize(PROMPTS, padding_side="right"), **settings)
    assert torch.equal(left, torch.cat(singles)) and torch.equal(right, left)


def test_generation_lengths_count_new_tokens_and_opt_stops_at_newline(tiny_opt, tiny_t5):
    visual = torch.randn(1, 4, 64)
    for llm in (tiny_opt, tiny_t5):
        ids, mask = llm.tokenize("a red circle")
        assert llm.generate(visual, ids, mask, max_length=3, min_length=3).shape == (1, 3)
        assert llm.generate(visual, ids, mask, min_new_tokens=30).shape == (1, 30)  # BLIP-2's 30 by default
        with pytest.raises(VLBridgeError, match="not both"):
            llm.generate(visual, ids, mask, max_length=3, max_new_tokens=3)
    ids, mask = tiny_opt.tokenize("a red circle")
    newline = tiny_opt.tokenizer("\n", add_special_tokens=False).input_ids[0]
    assert tiny_opt.newline_token_id == newline
    first = int(tiny_opt.generate(visual, ids, mask, max_new_tokens=3, eos_token_id=newline)[0, 0])
    assert tiny_opt.generate(visual, ids, mask, max_new_tokens=5, eos_token_id=first).shape == (1, 1)
    with torch.no_grad():  # make "\n" the likeliest next token: the default end token stops at once
        bias = torch.zeros(tiny_opt.model.config.vocab_size)
        bias[newline] = 1e4
        tiny_opt.model.lm_head.bias = torch.nn.Parameter(bias, requires_grad=False)
        try:
            assert tiny_opt.generate(visual, ids, mask, max_new_tokens=5).tolist() == [[newline]]
        finally:
            tiny_opt.model.lm_head.bias = None


def test_sampling_is_reproducible_under_a_seed(tiny_llm):
    visual = torch.randn(2, 4, 64)
    ids, mask = tiny_llm.tokenize(PROMPTS, padding_side="left")
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        runs.append(tiny_llm.generate(visual, ids, mask, do_sample=True, top_p=0.9, temperature=0.7,
                                      repetition_penalty=1.2, max_new_tokens=5, min_new_tokens=5))
    assert runs[0].shape == (2, 5) and torch.equal(runs[0], runs[1])


def test_wrong_visual_prompts_are_refused(tiny_opt):
    ids, mask = tiny_opt.tokenize(PROMPTS)
    with pytest.raises(VLBridgeError, match=r"\(batch, tokens, 64\).*\(2, 4, 32\)"):
        tiny_opt(torch.randn(2, 4, 32), ids, mask)
    with pytest.raises(VLBridgeError, match="1 visual prompts for 2 texts"):
        tiny_opt.generate(torch.randn(1, 4, 64), ids, mask)


def test_pack_padding_moves_pads_and_keeps_order():
    embeds = torch.arange(5.0).view(1, 5, 1)
    mask = torch.tensor([[1, 0, 1, 0, 1]])
    left, left_mask, _ = pack_padding(embeds, mask, "left")
    right, right_mask, moved = pack_padding(embeds, mask, "right", labels=torch.arange(5).view(1, 5))
    assert moved.tolist() == [[0, 2, 4, 1, 3]]
    assert left.flatten().tolist() == [1, 3, 0, 2, 4] and left_mask.tolist() == [[0, 0, 1, 1, 1]]
    assert right.flatten().tolist() == [0, 2, 4, 1, 3] and right_mask.tolist() == [[1, 1, 1, 0, 0]]


# -- loading from a directory ------------------------------------------------------------------------


def save_dir(tmp_path: Path, model, kind: str) -> Path:
    out = tmp_path / kind
    model.save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir(kind))).save_pretrained(out)
    return out


def test_opt_350m_like_dir_loads_with_the_visual_prompt_at_the_projection_width(tmp_path, monkeypatch):
    no_network(monkeypatch)
    torch.manual_seed(0)
    config = transformers.OPTConfig(vocab_size=600, hidden_size=48, word_embed_proj_dim=32, num_hidden_layers=2,
                                    num_attention_heads=4, ffn_dim=96, max_position_embeddings=64,
                                    do_layer_norm_before=False, pad_token_id=1, bos_token_id=2, eos_token_id=2)
    source = transformers.OPTForCausalLM(config).eval()
    llm, opts = build("opt", model=str(save_dir(tmp_path, source, "opt")))
    assert llm.embed_width == opt.dims(opts).embed_width == 32 and llm.model.config.hidden_size == 48
    assert llm.model.model.decoder.project_in is not None and llm.model.model.decoder.final_layer_norm is None
    assert sum(p.numel() for p in llm.parameters()) == opt.num_params(opts)
    visual = torch.randn(2, 3, 32)
    ids, mask = llm.tokenize(PROMPTS)
    embeds, full_mask = hf_inputs(llm, visual, ids, mask)
    torch.testing.assert_close(llm(visual, ids, mask).logits,
                               source(inputs_embeds=embeds, attention_mask=full_mask).logits, atol=1e-5, rtol=0)
    assert llm.generate(visual, *llm.tokenize(PROMPTS, padding_side="left"), max_new_tokens=3, min_new_tokens=3).shape == (2, 3)


def test_t5_dir_loads_untied_and_embed_width_follows_its_config(tmp_path, monkeypatch):
    no_network(monkeypatch)
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=300, d_model=48, d_ff=96, num_heads=4, d_kv=12, num_layers=1,
                                   feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0)
    source = transformers.T5ForConditionalGeneration(config).eval()
    source.lm_head.weight = torch.nn.Parameter(torch.randn(300, 48))  # FlanT5's head is its own matrix
    source.config.tie_word_embeddings = False
    llm, opts = build("flan-t5", model=str(save_dir(tmp_path, source, "flan-t5")))
    assert llm.embed_width == flan_t5.dims(opts).embed_width == 48
    assert sum(p.numel() for p in llm.parameters()) == flan_t5.num_params(opts)
    assert torch.equal(llm.model.lm_head.weight, source.lm_head.weight)
    assert not torch.equal(llm.model.lm_head.weight, llm.model.shared.weight)
    visual = torch.randn(2, 3, 48)
    ids, mask = llm.tokenize(PROMPTS)
    targets, target_mask = llm.tokenize(["a red circle", "yes"])
    embeds, full_mask = hf_inputs(llm, visual, ids, mask)
    expected = source(inputs_embeds=embeds, attention_mask=full_mask, labels=targets, decoder_attention_mask=target_mask)
    torch.testing.assert_close(llm(visual, ids, mask, labels=targets, decoder_attention_mask=target_mask).logits,
                               expected.logits, atol=1e-5, rtol=1e-6)  # fp32 noise on logits of size ~10


def test_load_errors_name_the_source_and_the_fix(tmp_path, tiny_opt, monkeypatch):
    no_network(monkeypatch)
    directory = save_dir(tmp_path, tiny_opt.model, "opt")
    opts = opt.OPTOptions(model=str(directory))  # validated while the directory exists
    from vlbridge.plugins.llms import opt_model

    (directory / "model.safetensors").unlink()
    with pytest.raises(VLBridgeError, match=rf"could not load OPTForCausalLM weights from '{re.escape(str(directory))}'.*save_pretrained"):
        opt_model.build(opts)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (directory / name).unlink()
    with pytest.raises(VLBridgeError, match="has no tokenizer files.*tokenizer.save_pretrained"):
        opt_model.build(opts)
    shutil.rmtree(directory)
    with pytest.raises(VLBridgeError, match=rf"model directory not found: {re.escape(str(directory))}.*save_pretrained"):
        opt_model.build(opts)
    with pytest.raises(ValueError, match="model directory not found"):  # the options refuse it up front
        opt.OPTOptions(model=str(directory))


@pytest.mark.parametrize("name", ["opt", "flan-t5"])
def test_a_directory_missing_a_tensor_or_holding_a_stray_one_is_refused(tmp_path, name, tiny_opt, tiny_t5, monkeypatch):
    """transformers draws a tensor missing from the files at random and skips one it has no place for:
    a frozen LLM loaded so would run part-random weights without a word."""
    from safetensors.torch import load_file, save_file

    no_network(monkeypatch)
    directory = save_dir(tmp_path, (tiny_opt if name == "opt" else tiny_t5).model, name)
    spec = get_registry().resolve("llm", name).spec
    opts, factory = spec.options(model=str(directory)), spec.load_factory()
    weights = directory / "model.safetensors"
    whole = load_file(weights)
    dropped = next(key for key in sorted(whole) if ".layers.1." in key or ".block.1." in key)
    save_file({k: v for k, v in whole.items() if k != dropped}, str(weights), metadata={"format": "pt"})
    with pytest.raises(VLBridgeError, match=rf"1 missing \(they would be drawn at random\): {re.escape(dropped)}"):
        factory(opts)
    save_file({**whole, "stray.weight": torch.zeros(2)}, str(weights), metadata={"format": "pt"})
    with pytest.raises(VLBridgeError, match=r"1 unexpected \(the model has no place for them\): stray.weight"):
        factory(opts)
    save_file(whole, str(weights), metadata={"format": "pt"})
    factory(opts)  # whole again: loads
