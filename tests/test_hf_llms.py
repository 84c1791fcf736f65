"""The generic LLM plugins (`hf-causal-lm`, `hf-seq2seq`) on tiny random Llama, Qwen2/3, Mistral,
GPT-2, Gemma, OPT, Phi, T5 and BART directories: torch-free declarations equal the built models, soft-prompt generation
equals transformers' own `generate(inputs_embeds=...)`, the image placeholder and chat prompts put
the visual tokens where they belong, and a Q-Former or an MLP trains through each in stage 2. Gemma 2,
Phi-3, GPT-NeoX, Falcon, BLOOM, Starcoder2, OLMo, mBART, Pegasus, mT5 and DeepSeek-V3 are checked for
parity only; what transformers cannot generate from a soft prompt (Bamba, RWKV's beams, FSMT) is refused by name."""

from __future__ import annotations

import pytest
import torch

import vlbridge
from tests.hf_families import CAUSAL, PARITY_CAUSAL, PARITY_SEQ2SEQ, RECURRENT, SEQ2SEQ, make_llm_dir
from vlbridge.errors import VLBridgeError
from vlbridge.plugins.llms import hf_dims
from vlbridge.plugin.specs import SizeEstimate
from vlbridge.plugins.llms.hf_causal_lm import HFCausalLMOptions
from vlbridge.plugins.llms.hf_causal_lm_model import build as build_causal
from vlbridge.plugins.llms.hf_seq2seq import HFSeq2SeqOptions
from vlbridge.plugins.llms.hf_seq2seq_model import build as build_seq2seq
from vlbridge.plugins.llms.soft_prompt import IGNORE_INDEX
from vlbridge.train.objectives import Stage2Objective

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FAMILIES = [*CAUSAL, *SEQ2SEQ]


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llms")
    dirs = {}
    for family in FAMILIES:
        dirs[family] = root / family
        make_llm_dir(dirs[family], family, pad=family not in ("llama", "gpt2"))  # Llama's and GPT-2's have no pad token
    dirs["llama-chat"] = root / "llama-chat"
    make_llm_dir(dirs["llama-chat"], "llama", chat=True)
    return dirs


def options(family: str, directory, **extra):
    return (HFSeq2SeqOptions if family in SEQ2SEQ else HFCausalLMOptions)(model=str(directory), **extra)


def build_llm(family: str, directory, **extra):
    opts = options(family, directory, **extra)
    return (build_seq2seq if family in SEQ2SEQ else build_causal)(opts)


@pytest.mark.parametrize("family", FAMILIES)
def test_declared_shape_and_size_equal_the_built_model(family, family_dirs):
    opts = options(family, family_dirs[family])
    llm = build_llm(family, family_dirs[family])
    dims = hf_dims.dims(opts.config)
    assert dims.embed_width == llm.embed_width == llm.model.get_input_embeddings().embedding_dim
    assert dims.encoder_decoder == llm.is_encoder_decoder == (family in SEQ2SEQ)
    declared = hf_dims.num_params(opts.config)
    built = sum(p.numel() for p in llm.model.parameters())
    if family == "bart":  # no exact formula: the generic estimate
        assert isinstance(declared, SizeEstimate) and declared.count == pytest.approx(built, rel=0.03)
    else:
        assert declared == built
    assert all(not p.requires_grad for p in llm.parameters())


def _reference_generate(llm, visual, ids, **settings):
    """transformers' own generate on [visual; embedded text], new tokens only."""
    embeds = torch.cat([visual, llm.model.get_input_embeddings()(ids)], dim=1)
    out = llm.model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long), **settings)
    return out[:, 1:] if llm.is_encoder_decoder else out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("beams", [1, 3])
def test_soft_prompt_generation_equals_transformers(family, beams, family_dirs):
    llm = build_llm(family, family_dirs[family])
    torch.manual_seed(1)
    visual = torch.randn(1, 3, llm.embed_width)
    ids, mask = llm.tokenize(["a red ball on the left"])
    settings = dict(max_new_tokens=6, num_beams=beams, do_sample=False, pad_token_id=llm.tokenizer.pad_token_id,
                    eos_token_id=llm.tokenizer.eos_token_id)
    ours = llm.generate(visual, ids, mask, **settings)
    expected = _reference_generate(llm, visual, ids, **settings)
    assert ours.tolist() == expected.tolist()


@pytest.mark.parametrize("family", list(RECURRENT))
def test_beam_search_over_a_recurrent_state_equals_transformers(family, tmp_path):
    """No key/value cache to share between beams: transformers' own prompt-per-beam path runs."""
    make_llm_dir(tmp_path / family, family)
    llm = build_causal(HFCausalLMOptions(model=str(tmp_path / family)))
    torch.manual_seed(1)
    visual = torch.randn(1, 3, llm.embed_width)
    ids, mask = llm.tokenize(["a red ball on the left"])
    settings = dict(max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=llm.tokenizer.pad_token_id)
    assert llm.generate(visual, ids, mask, **settings).tolist() == _reference_generate(llm, visual, ids, **settings).tolist()


@pytest.mark.parametrize("family", [*PARITY_CAUSAL, *PARITY_SEQ2SEQ])
def test_more_families_equal_transformers(family, tmp_path):
    """Soft-capping and sliding windows shorter than the prompt (Gemma 2, Mistral, Starcoder2), ALiBi
    (BLOOM), parallel blocks (GPT-NeoX, Falcon), mBART, Pegasus, mT5: the soft-prompted forward equals
    transformers' own on the same inputs_embeds, and so do greedy and beam search."""
    seq2seq = family in PARITY_SEQ2SEQ
    make_llm_dir(tmp_path, family)
    llm = build_seq2seq(HFSeq2SeqOptions(model=str(tmp_path))) if seq2seq else build_causal(HFCausalLMOptions(model=str(tmp_path)))
    torch.manual_seed(1)
    visual = torch.randn(1, 3, llm.embed_width)
    ids, mask = llm.tokenize(["a red ball on the left of two blue squares"])
    embeds = torch.cat([visual, llm.embed_tokens(ids)], dim=1)
    if seq2seq:
        own = llm.model(inputs_embeds=embeds, labels=ids).logits
        torch.testing.assert_close(llm(visual, ids, mask, labels=ids, decoder_attention_mask=mask).logits, own, atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(llm(visual, ids, mask).logits, llm.model(inputs_embeds=embeds).logits, atol=1e-5, rtol=1e-5)
    for beams in (1, 3):
        settings = dict(max_new_tokens=5, num_beams=beams, do_sample=False, pad_token_id=llm.tokenizer.pad_token_id,
                        eos_token_id=llm.tokenizer.eos_token_id)
        assert llm.generate(visual, ids, mask, **settings).tolist() == _reference_generate(llm, visual, ids, **settings).tolist()


def test_beam_search_over_latent_attention_equals_transformers(tmp_path):
    """DeepSeek-V3's multi-head latent attention caches keys wider than its values: the shared-prompt
    beam cache sized both from the keys and crashed on the first beam search."""
    make_llm_dir(tmp_path / "mla", "deepseek_v3")
    llm = build_causal(HFCausalLMOptions(model=str(tmp_path / "mla")))
    torch.manual_seed(1)
    visual = torch.randn(2, 3, llm.embed_width)
    ids, mask = llm.tokenize(["a red ball on the left", "a red ball"], padding_side="left")
    settings = dict(max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=llm.tokenizer.pad_token_id)
    for row in range(2):
        one = llm.tokenize([["a red ball on the left", "a red ball"][row]])
        expected = _reference_generate(llm, visual[row:row + 1], one[0], **settings)
        assert llm.generate(visual[row:row + 1], *one, **settings).tolist() == expected.tolist()
    assert llm.generate(visual, ids, mask, **settings).shape[0] == 2


def test_what_transformers_cannot_generate_is_refused_by_name(tmp_path):
    """Bamba's generate refuses inputs_embeds (transformers asked for a pull request), RWKV's state
    cannot follow beams, FSMT's encoder needs input_ids: each is a VLBridgeError naming the model and
    the way out, and what does work (a training forward, greedy RWKV) still does."""
    for family in ("bamba", "rwkv", "fsmt"):
        make_llm_dir(tmp_path / family, family)
    visual = torch.randn(1, 3, 32)
    bamba = build_causal(HFCausalLMOptions(model=str(tmp_path / "bamba")))
    ids, mask = bamba.tokenize(["a red ball"])
    assert torch.isfinite(bamba(visual, ids, mask, labels=ids).loss)
    with pytest.raises(VLBridgeError, match=r"cannot generate from inputs_embeds with BambaForCausalLM \('bamba'\)"):
        bamba.generate(visual, ids, mask, max_new_tokens=2)
    rwkv = build_causal(HFCausalLMOptions(model=str(tmp_path / "rwkv")))
    settings = dict(max_new_tokens=3, pad_token_id=rwkv.tokenizer.pad_token_id)
    assert rwkv.generate(visual, ids, mask, **settings).tolist() == _reference_generate(rwkv, visual, ids, **settings).tolist()
    with pytest.raises(VLBridgeError, match="RwkvForCausalLM cannot beam-search.*num_beams: 1"):
        rwkv.generate(visual, ids, mask, num_beams=2, **settings)
    with pytest.raises(VLBridgeError, match="FSMTForConditionalGeneration's encoder needs input_ids"):
        build_seq2seq(HFSeq2SeqOptions(model=str(tmp_path / "fsmt")))


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_padded_generation_equals_one_prompt_at_a_time(family, family_dirs):
    """Rows padded to a common length generate what they generate alone (positions follow the mask)."""
    llm = build_llm(family, family_dirs[family])
    torch.manual_seed(2)
    visual = torch.randn(2, 3, llm.embed_width)
    texts = ["a", "two blue squares and a small red circle"]
    settings = dict(max_new_tokens=5, num_beams=2, min_new_tokens=5)
    ids, mask = llm.tokenize(texts, padding_side="left")
    batched = llm.generate(visual, ids, mask, **settings)
    for row, text in enumerate(texts):
        alone = llm.generate(visual[row:row + 1], *llm.tokenize([text]), **settings)
        assert batched[row, :alone.shape[1]].tolist() == alone[0].tolist()


@pytest.mark.parametrize("family", list(CAUSAL))
def test_training_logits_of_padded_rows_equal_unpadded(family, family_dirs):
    llm = build_llm(family, family_dirs[family])
    torch.manual_seed(3)
    visual = torch.randn(2, 3, llm.embed_width)
    texts = ["a", "two blue squares and a small red circle"]
    ids, mask = llm.tokenize(texts, padding_side="right")
    out = llm(visual, ids, mask, labels=ids)
    for row, text in enumerate(texts):
        one_ids, one_mask = llm.tokenize([text])
        alone = llm(visual[row:row + 1], one_ids, one_mask)
        length = alone.logits.shape[1]
        torch.testing.assert_close(out.logits[row, :length], alone.logits[0], atol=1e-4, rtol=1e-4)
        assert out["labels"][row, :3].eq(IGNORE_INDEX).all()  # the visual positions never count


def test_placeholder_puts_the_visual_tokens_in_place(family_dirs):
    llm = build_llm("llama", family_dirs["llama"], prompt_template="USER: <image>\n{} ASSISTANT:")
    prompt = llm.format_prompt("what is it?")
    assert prompt == "USER: <image>\nwhat is it? ASSISTANT:"
    ids, mask = llm.tokenize([prompt, llm.format_prompt("a much longer question about the picture?")])
    slots = [row.index(llm.image_token_id) for row in ids.tolist()]
    assert slots[0] == slots[1] > 0  # after BOS and "USER:"
    visual = torch.randn(2, 4, llm.embed_width)
    embeds, placed_mask, labels = llm.place_visual(visual, ids, mask, labels=ids)
    slot = slots[0]
    assert embeds.shape[1] == ids.shape[1] + 3
    torch.testing.assert_close(embeds[:, slot:slot + 4], visual)
    torch.testing.assert_close(embeds[:, :slot], llm.embed_tokens(ids[:, :slot]))
    torch.testing.assert_close(embeds[:, slot + 4:], llm.embed_tokens(ids[:, slot + 1:]))
    assert labels[:, slot:slot + 4].eq(IGNORE_INDEX).all() and placed_mask[:, slot:slot + 4].eq(1).all()
    # the forward is transformers' own forward on those embeddings
    out = llm(visual[:1], ids[:1], mask[:1])
    real = int(placed_mask[0].sum())  # row 0 is the shorter: compare its real positions
    reference = llm.model(inputs_embeds=embeds[:1, :real])
    torch.testing.assert_close(out.logits[:, :real], reference.logits, atol=1e-5, rtol=1e-5)


def test_placeholder_must_appear_once_in_every_row_or_in_none(family_dirs):
    llm = build_llm("llama", family_dirs["llama"])
    ids, mask = llm.tokenize(["<image> a", "no placeholder here"])
    with pytest.raises(VLBridgeError, match="exactly once"):
        llm.place_visual(torch.zeros(2, 2, llm.embed_width), ids, mask)


def test_chat_format_puts_the_visual_tokens_in_the_user_turn(family_dirs):
    llm = build_llm("llama", family_dirs["llama-chat"], prompt_format="chat")
    prompt = llm.format_prompt("Question: what colour? Short answer:")
    assert prompt.startswith("</s>USER: <image>\nQuestion: what colour? Short answer:") and prompt.endswith("ASSISTANT:")
    ids, _ = llm.tokenize([prompt])
    assert ids[0].tolist().count(llm.tokenizer.bos_token_id) == 1  # the template's BOS, none added twice
    assert ids[0].tolist().count(llm.image_token_id) == 1


def test_chat_format_needs_a_chat_template(family_dirs):
    with pytest.raises(VLBridgeError, match="chat template"):
        build_llm("llama", family_dirs["llama"], prompt_format="chat")


def test_option_errors_name_the_fix(family_dirs):
    with pytest.raises(ValueError, match="use the hf-seq2seq LLM"):
        HFCausalLMOptions(model=str(family_dirs["t5"]))
    with pytest.raises(ValueError, match="use the hf-causal-lm LLM"):
        HFSeq2SeqOptions(model=str(family_dirs["llama"]))
    with pytest.raises(ValueError, match="exactly once"):
        HFCausalLMOptions(prompt_template="no slot")
    with pytest.raises(ValueError, match="cannot read the config.json of 'nobody/no-such-model' offline"):
        HFCausalLMOptions(model="nobody/no-such-model").config


def test_a_tokenizer_without_pad_pads_with_its_end_token(family_dirs):
    llm = build_llm("llama", family_dirs["llama"])
    assert llm.tokenizer.pad_token == llm.tokenizer.eos_token == llm.caption_suffix


def test_known_hub_configs_validate_offline():
    opts = HFCausalLMOptions(model="Qwen/Qwen2.5-1.5B-Instruct", prompt_format="chat")
    dims = hf_dims.dims(opts.config)
    assert (dims.embed_width, dims.context_length) == (1536, 32768)
    assert hf_dims.num_params(opts.config) == pytest.approx(1.54e9, rel=0.01)  # Qwen's published 1.54B
    assert hf_dims.num_params(HFCausalLMOptions(model="lmsys/vicuna-7b-v1.5").config) == pytest.approx(6.74e9, rel=0.01)


def _assembly(family: str, directory, connector: str, **llm_options) -> dict:
    llm = "hf-seq2seq" if family in SEQ2SEQ else "hf-causal-lm"
    con = {"use": "qformer", "options": {"variant": "tiny", "num_query_tokens": 4}} if connector == "qformer" else {"use": connector}
    return {"name": f"tiny-{connector}-{family}", "encoder": {"use": "clip-vit-l", "options": {"variant": "tiny", "include_cls": False}}, "connector": con,
            "llm": {"use": llm, "options": {"model": str(directory), **llm_options}}, "max_text_tokens": 24}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("connector", ["qformer", "mlp"])
def test_stage2_trains_with_a_falling_loss_and_generates(family, connector, family_dirs):
    assembly = vlbridge.load_assembly(_assembly(family, family_dirs[family], connector))
    assert assembly.plan.llm.name == ("hf-seq2seq" if family in SEQ2SEQ else "hf-causal-lm")
    torch.manual_seed(0)
    model = vlbridge.build(assembly, stage=2)
    images = torch.randint(0, 255, (4, 3, 56, 56), dtype=torch.uint8)
    embeds = model.encode_images(model.pixel_values(images))
    batch = {"text": ["a red ball", "two blue squares", "a green star on the left", "one cube"], "image_embeds": embeds}
    objective = Stage2Objective(prompt="a photo of")
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = objective(model, batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    captions = model.caption(images[:2], max_new_tokens=4, num_beams=2)
    assert len(captions) == 2 and all(isinstance(text, str) for text in captions)
    answers = model.answer(images[:2], ["what is it?", "how many?"], max_new_tokens=3)
    assert len(answers) == 2


def test_chat_prompts_train_and_generate(family_dirs):
    model = vlbridge.build(_assembly("llama", family_dirs["llama-chat"], "mlp", prompt_format="chat"), stage=2)
    images = torch.randint(0, 255, (2, 3, 56, 56), dtype=torch.uint8)
    batch = {"text": ["a red ball", "two blue squares"], "image_embeds": model.encode_images(model.pixel_values(images))}
    losses = Stage2Objective(loss_average="samples")(model, batch)
    assert torch.isfinite(losses["loss"])
    assert len(model.answer(images, "what is it?", max_new_tokens=3)) == 2


@pytest.mark.parametrize("module, family", [("vlbridge.plugins.llms.hf_causal_lm", None), ("vlbridge.plugins.llms.hf_seq2seq", "bart")])
def test_the_generic_plugins_pass_check_plugin(module, family, family_dirs):
    from vlbridge.plugintest.check import check_plugin

    name = module.rsplit(".", 1)[1].replace("_", "-")
    given = {name.replace("seq2seq", "seq2seq"): {"model": str(family_dirs[family])}} if family else None
    assert check_plugin(module, options=given)


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_a_repetition_penalty_treats_padded_rows_as_alone(family, family_dirs):
    """transformers exempted a left-padded row's first generated tokens (as many as its pads) from
    repetition_penalty when generating from inputs_embeds: batched rows generated otherwise than alone."""
    llm = build_llm(family, family_dirs[family])
    torch.manual_seed(3)
    visual = torch.randn(2, 3, llm.embed_width)
    texts = ["two blue squares and a small red circle", "a"]
    for beams in (1, 2):
        settings = dict(max_new_tokens=8, min_new_tokens=8, num_beams=beams, repetition_penalty=3.0)
        batched = llm.generate(visual, *llm.tokenize(texts, padding_side="left"), **settings)
        for row, text in enumerate(texts):
            alone = llm.generate(visual[row:row + 1], *llm.tokenize([text]), **settings)
            assert batched[row, :alone.shape[1]].tolist() == alone[0].tolist(), (beams, row)


def test_a_model_folder_with_its_own_code_is_refused_without_asking_to_run_it(tmp_path, monkeypatch):
    """transformers asks "run the custom code? [y/N]" when a folder's config names code of its own
    (auto_map) and the caller says nothing; vlbridge says no itself, so a 'y' (typed, or piped in by
    `yes |`) never runs code from a model folder."""
    import json

    from transformers import AutoModelForCausalLM

    from vlbridge.plugins.llms.loading import load_pretrained

    directory, marker = tmp_path / "custom", tmp_path / "ran"
    make_llm_dir(directory, "llama")
    (directory / "custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                         "from transformers import LlamaConfig as CustomConfig, LlamaForCausalLM as Custom\n")
    config = json.loads((directory / "config.json").read_text())
    config.update(model_type="vlbridge-custom", auto_map={"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.Custom"})
    (directory / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr("builtins.input", lambda *args: "y")
    with pytest.raises(VLBridgeError, match="vlbridge never runs code that comes with a model"):
        load_pretrained("hf-causal-lm", AutoModelForCausalLM, str(directory), "", str(directory), torch.float32, pad_from_eos=True)
    assert not marker.exists()
