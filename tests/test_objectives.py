"""vlbridge.train.objectives on tiny models: keys and finiteness, gradients on exactly the trainable
connector parameters, text and label handling, cached features, and losses that go down."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import vlbridge
from vlbridge.errors import VLBridgeError
from vlbridge.train import objectives as objectives_module
from vlbridge.train.losses import IGNORE_INDEX, prefix_lm_split
from vlbridge.train.objectives import LOSS_ITEMS, Stage1Objective, Stage2Objective, build_objective, objective_for

CAPTIONS = ["a cat sits on a red mat", "a dog runs in the green park", "two birds on a wire", "a cat sleeping on a mat"]
IMAGE_INDEX = torch.tensor([0, 1, 2, 0])  # captions 0 and 3 describe the same image


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build(name: str, stage: int) -> Any:
    return vlbridge.build(name, stage=stage).train()


def make_batch(model: Any, captions: list[str] = CAPTIONS, image_index: torch.Tensor = IMAGE_INDEX) -> dict[str, Any]:
    size = model.plan.preprocess.image_size
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(len(captions), 3, size, size, generator=gen)
    pixels[3] = pixels[0]  # the same image as caption 0
    return {"pixel_values": pixels, "text": list(captions), "image_index": image_index.clone(),
            "image_id": [str(int(i)) for i in image_index], "index": torch.arange(len(captions))}


CASES = [
    ("tiny-qformer-opt", 1, {"itc", "itm", "itg"}),
    ("tiny-qformer-opt", 2, {"lm"}),
    ("tiny-qformer-flan-t5", 2, {"lm"}),
    ("tiny-mlp-opt", 2, {"lm"}),
    ("tiny-linear-opt", 2, {"lm"}),
]


@pytest.mark.parametrize(("preset", "stage", "parts"), CASES)
def test_losses_are_finite_and_gradients_reach_exactly_the_trainable_connector(preset: str, stage: int, parts: set[str]):
    model = build(preset, stage)
    out = objective_for(model)(model, make_batch(model))
    items = out.pop(LOSS_ITEMS, None)
    assert set(out) == {"loss"} | parts
    assert (items is None) == (stage == 1) and (items is None or items.item() >= len(CAPTIONS))  # stage 2: target tokens
    assert all(math.isfinite(value.item()) for value in out.values())
    assert out["loss"].requires_grad and not any(out[p].requires_grad for p in parts)
    assert out["loss"].item() == pytest.approx(sum(out[p].item() for p in parts), rel=1e-5)
    out["loss"].backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    reached = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trainable and all(n.startswith("connector.") for n in trainable)
    assert reached == trainable  # every trainable connector tensor learns; nothing frozen gets a gradient
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


def test_stage1_refuses_models_it_cannot_train():
    batch = make_batch(build("tiny-mlp-opt", 2))
    with pytest.raises(VLBridgeError, match="'mlp' has no stage 1"):
        Stage1Objective()(build("tiny-mlp-opt", 2), batch)
    with pytest.raises(VLBridgeError, match=r"set_stage\(1\)"):
        Stage1Objective()(build("tiny-qformer-opt", 2), batch)
    with pytest.raises(VLBridgeError, match="no LLM"):
        Stage2Objective()(build("tiny-qformer-opt", 1), batch)


def test_stage1_batch_errors_are_clear():
    model = build("tiny-qformer-opt", 1)
    batch = make_batch(model)
    with pytest.raises(VLBridgeError, match="image_index"):
        Stage1Objective()(model, {k: v for k, v in batch.items() if k != "image_index"})
    with pytest.raises(VLBridgeError, match="not strings"):
        Stage1Objective()(model, {**batch, "image_index": ["a", "b", "c", "a"]})
    with pytest.raises(VLBridgeError, match="another encoder"):
        Stage1Objective()(model, {**batch, "image_embeds": torch.zeros(4, 5, 7)})
    with pytest.raises(VLBridgeError, match="empty batch"):
        Stage1Objective()(model, {**batch, "text": []})


def test_stage1_texts_itg_ids_and_itm_pairs(monkeypatch: pytest.MonkeyPatch):
    model = build("tiny-qformer-opt", 1)
    qformer, seen = model.connector, {}
    long_caption = " ".join(["word"] * 60)
    captions = CAPTIONS[:3] + [long_caption]

    def spy(name: str, function: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            seen[name] = (args, result := function(*args, **kwargs))
            return result
        return wrapper

    monkeypatch.setattr(qformer, "itg_logits_from_queries", spy("itg", qformer.itg_logits_from_queries))
    monkeypatch.setattr(qformer, "itm_logits", spy("itm", qformer.itm_logits))
    monkeypatch.setattr(objectives_module, "sample_hard_negatives", spy("neg", objectives_module.sample_hard_negatives))
    Stage1Objective(max_text_tokens=32)(model, make_batch(model, captions))
    expected = qformer.tokenizer(captions, padding="max_length", truncation=True, max_length=32, return_tensors="pt")
    (query_kv, decoder_ids, mask), _ = seen["itg"]
    assert len(query_kv) == len(qformer.layers) and query_kv[0][0].shape[2] == qformer.num_queries  # the ITC pass's K/V
    assert decoder_ids.shape == (4, 32) and (decoder_ids[:, 0] == qformer.tokenizer.bos_token_id).all()  # [DEC]
    assert torch.equal(decoder_ids[:, 1:], expected["input_ids"][:, 1:]) and torch.equal(mask, expected["attention_mask"])
    assert decoder_ids[3, -1] == qformer.tokenizer.sep_token_id  # truncated on the right, [SEP] kept
    _, negatives = seen["neg"]
    assert (IMAGE_INDEX[negatives.images] != IMAGE_INDEX).all() and (IMAGE_INDEX[negatives.texts] != IMAGE_INDEX).all()
    (pair_ids, _, pair_images), logits = seen["itm"]
    ids = expected["input_ids"]
    assert logits.shape == (12, 2)
    assert torch.equal(pair_ids, torch.cat([ids, ids, ids[negatives.texts]]))
    embeds = model.encode_images(make_batch(model, captions)["pixel_values"])
    wanted = qformer.image_context(torch.cat([embeds, embeds[negatives.images], embeds]))  # K/V of the pairs' images
    for got, want in zip(pair_images.layers, wanted.layers):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want)


def test_stage1_with_a_single_image_still_trains_itc_and_itg():
    model = build("tiny-qformer-opt", 1)
    out = Stage1Objective()(model, make_batch(model, image_index=torch.tensor([3, 3, 3, 3])))
    assert all(math.isfinite(value.item()) for value in out.values())  # ITM sees only the positive pairs


def spy_llm(monkeypatch: pytest.MonkeyPatch, llm: Any) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    forward = llm.forward

    def wrapper(visual: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> Any:
        seen.update(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return forward(visual, input_ids, attention_mask, **kwargs)

    monkeypatch.setattr(llm, "forward", wrapper)
    return seen


def test_stage2_opt_labels_skip_prompt_bos_and_padding(monkeypatch: pytest.MonkeyPatch):
    model = build("tiny-mlp-opt", 2)
    llm, seen = model.llm, spy_llm(monkeypatch, model.llm)
    Stage2Objective(prompt="a photo of")(model, make_batch(model))
    ids, mask, labels = seen["input_ids"], seen["attention_mask"], seen["labels"]
    expected_ids, _ = llm.tokenize([f"a photo of {c}\n" for c in CAPTIONS], max_length=32)
    assert torch.equal(ids, expected_ids) and (ids[:, 0] == llm.tokenizer.bos_token_id).all()
    prompt_length = len(llm.tokenizer("a photo of")["input_ids"])  # BOS included
    assert (labels[:, :prompt_length] == IGNORE_INDEX).all()
    assert torch.equal(labels[:, prompt_length:], ids[:, prompt_length:].masked_fill(mask[:, prompt_length:] == 0, IGNORE_INDEX))
    last = mask.sum(dim=1) - 1
    assert (labels[torch.arange(4), last] == llm.newline_token_id).all()  # the caption ends with "\n"
    Stage2Objective()(model, make_batch(model))  # no prompt: only BOS is skipped
    assert (seen["labels"][:, 0] == IGNORE_INDEX).all() and torch.equal(seen["labels"][:, 1], seen["input_ids"][:, 1])


@pytest.mark.parametrize("prompt", ["a photo of ", "Question: what is it? Answer: "])
def test_stage2_opt_prompt_with_a_trailing_space_keeps_the_first_caption_token(monkeypatch: pytest.MonkeyPatch, prompt: str):
    # LAVIS's caption processor writes "a photo of " with a space: alone it tokenises to a space token of its
    # own, in the text BPE merges that space into the caption's first word, which was then labelled -100
    model = build("tiny-mlp-opt", 2)
    llm, seen = model.llm, spy_llm(monkeypatch, model.llm)
    Stage2Objective(prompt=prompt)(model, make_batch(model))
    targets = [row[row != IGNORE_INDEX].tolist() for row in seen["labels"]]
    assert targets == [llm.tokenizer(f" {c}\n", add_special_tokens=False)["input_ids"] for c in CAPTIONS]
    Stage2Objective(prompt=prompt.rstrip())(model, make_batch(model))  # the same targets as without the space
    assert [row[row != IGNORE_INDEX].tolist() for row in seen["labels"]] == targets


def test_stage2_opt_explicit_pairs_learn_only_the_output(monkeypatch: pytest.MonkeyPatch):
    model = build("tiny-linear-opt", 2)
    llm, seen = model.llm, spy_llm(monkeypatch, model.llm)
    questions, answers = ["what is it?"] * 4, ["a cat", "a dog", "birds", "a cat"]
    Stage2Objective()(model, {**make_batch(model), "text_input": questions, "text_output": answers})
    input_length = len(llm.tokenizer("what is it?")["input_ids"])
    labels = seen["labels"]
    assert (labels[:, :input_length] == IGNORE_INDEX).all()
    targets = [row[row != IGNORE_INDEX].tolist() for row in labels]
    assert targets == [llm.tokenizer(f" {a}\n", add_special_tokens=False)["input_ids"] for a in answers]


def test_stage2_flan_t5_prefix_lm_and_explicit_pairs(monkeypatch: pytest.MonkeyPatch):
    model = build("tiny-qformer-flan-t5", 2)
    llm, seen = model.llm, spy_llm(monkeypatch, model.llm)
    Stage2Objective(generator=torch.Generator().manual_seed(5))(model, make_batch(model))
    split = prefix_lm_split(CAPTIONS, torch.Generator().manual_seed(5))
    assert all(1 <= len(prefix.split()) <= len(caption.split()) // 2 for (prefix, _), caption in zip(split, CAPTIONS))
    expected_ids, _ = llm.tokenize([prefix for prefix, _ in split], max_length=32)
    expected_targets, expected_mask = llm.tokenize([rest for _, rest in split], max_length=32)
    assert torch.equal(seen["input_ids"], expected_ids)
    assert torch.equal(seen["labels"], expected_targets) and torch.equal(seen["decoder_attention_mask"], expected_mask)
    last = expected_mask.sum(dim=1) - 1
    assert (expected_targets[torch.arange(4), last] == llm.tokenizer.eos_token_id).all()  # target ends with </s>
    Stage2Objective()(model, {**make_batch(model), "text_input": ["q one", "q two", "q", "q"], "text_output": ["yes", "no", "2", "red"]})
    assert torch.equal(seen["input_ids"], llm.tokenize(["q one", "q two", "q", "q"])[0])
    assert torch.equal(seen["labels"], llm.tokenize(["yes", "no", "2", "red"])[0])


@pytest.mark.parametrize("preset", ["tiny-linear-opt", "tiny-qformer-flan-t5"])
def test_stage2_loss_averaged_per_sample(preset: str):
    """loss_average=samples is the mean of each sample's own token-mean loss (what one sample alone
    gives); with equally many target tokens per sample it equals BLIP-2's token mean."""
    model = vlbridge.build(preset, stage=2).eval()  # no dropout: batch and single-sample passes agree
    batch = {**make_batch(model), "text_input": ["what is it?", "what colour?", "how many?", "caption:"],
             "text_output": ["a cat", "red", "two", "a cat sleeping on a red mat in the sun"]}
    per_sample = Stage2Objective(loss_average="samples")(model, batch)["lm"]
    alone = []
    for i in range(4):
        one = {"image_embeds": model.encode_images(batch["pixel_values"][i:i + 1]), "text_input": batch["text_input"][i:i + 1],
               "text_output": batch["text_output"][i:i + 1], "text": batch["text"][i:i + 1], "image_index": batch["image_index"][i:i + 1]}
        alone.append(Stage2Objective()(model, one)["lm"])
    assert per_sample.item() == pytest.approx(torch.stack(alone).mean().item(), rel=1e-5)
    by_token = Stage2Objective()(model, batch)["lm"]
    assert abs(by_token.item() - per_sample.item()) > 1e-3  # the long caption weighs more in the token mean
    same_length = {**batch, "text_output": ["red"] * 4}  # equally many target tokens in every sample
    assert Stage2Objective(loss_average="samples")(model, same_length)["lm"].item() == pytest.approx(
        Stage2Objective()(model, same_length)["lm"].item(), rel=1e-5)


@pytest.mark.parametrize("loss_average", ["tokens", "samples"])
@pytest.mark.parametrize("preset", ["tiny-linear-opt", "tiny-qformer-flan-t5"])
def test_stage2_reads_any_llm_output_with_loss_and_logits_attributes(monkeypatch: pytest.MonkeyPatch, loss_average: str, preset: str):
    """docs/writing-plugins.md promises that forward may return any object with `loss` and `logits`
    (and optionally `labels`), not only transformers' ModelOutput; one without logits is named (an
    encoder-decoder's was an AttributeError on `.logits`)."""
    from types import SimpleNamespace

    model = vlbridge.build(preset, stage=2).eval()
    batch = make_batch(model)
    if model.llm.is_encoder_decoder:  # given pairs, not a random prefix split: both calls see the same texts
        batch = {**batch, "text_input": ["what is it?"] * len(batch["text"]), "text_output": batch["text"]}
    objective = Stage2Objective(loss_average=loss_average)
    expected = objective(model, batch)["lm"]
    real = model.llm.forward
    monkeypatch.setattr(model.llm, "forward", lambda *a, **k: SimpleNamespace(loss=real(*a, **k).loss, logits=real(*a, **k).logits))
    assert objective(model, batch)["lm"].item() == pytest.approx(expected.item(), rel=1e-6)
    monkeypatch.setattr(model.llm, "forward", lambda *a, **k: {"loss": real(*a, **k).loss})
    with pytest.raises(VLBridgeError, match=f"llm '{model.plan.llm.name}' \\(plugin vlbridge\\): its forward returned a dict without a `logits` "
                                            "tensor attribute.*`loss` and `logits` attributes"):
        objective(model, batch)


@pytest.mark.parametrize(("preset", "stage"), [("tiny-qformer-opt", 1), ("tiny-qformer-flan-t5", 2), ("tiny-mlp-opt", 2)])
def test_cached_image_embeds_give_the_same_losses_as_pixels(preset: str, stage: int):
    model = build(preset, stage)
    batch = make_batch(model)
    cached = {k: v for k, v in batch.items() if k != "pixel_values"}
    cached["image_embeds"] = model.encode_images(batch["pixel_values"])
    objective = objective_for(model)
    torch.manual_seed(7)  # dropout, hard negatives and the prefix split draw from the global RNG
    from_pixels = objective(model, batch)
    torch.manual_seed(7)
    from_cache = objective(model, cached)
    for key, value in from_pixels.items():
        assert from_cache[key].item() == pytest.approx(value.item(), rel=1e-5), key


@pytest.mark.parametrize(("preset", "stage"), [("tiny-qformer-opt", 1), ("tiny-qformer-opt", 2),
                                             ("tiny-qformer-flan-t5", 2), ("tiny-mlp-opt", 2)])
def test_a_few_steps_on_one_batch_lower_the_loss(preset: str, stage: int):
    """Evaluated deterministically (eval mode, fixed draws), so any drop is real; the random tiny OPT
    is near-uniform over its vocabulary (loss ~ ln 1000), so the soft prompt moves it only by ~0.1."""
    torch.manual_seed(0)
    model = build(preset, stage)
    batch = make_batch(model)
    objective = objective_for(model)

    def evaluate() -> float:
        objective.generator = torch.Generator().manual_seed(0)  # the same negatives / prefix split each time
        model.eval()
        with torch.no_grad():
            loss = objective(model, batch)["loss"].item()
        model.train()
        objective.generator = None
        return loss

    before = evaluate()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(8):
        optimizer.zero_grad()
        objective(model, batch)["loss"].backward()
        optimizer.step()
    after = evaluate()
    assert before - after > 0.05, (before, after)


def test_build_objective_by_name_and_options():
    assert isinstance(build_objective("stage1", max_text_tokens=16), Stage1Objective)
    objective = build_objective("stage2", prompt="a photo of")
    assert objective.options.prompt == "a photo of" and objective.stage == 2 and objective.name == "stage2"
    with pytest.raises(VLBridgeError, match="unknown objective"):
        build_objective("stage3")
    with pytest.raises(VLBridgeError, match="bad options"):
        Stage2Objective(promt="typo")
    with pytest.raises(VLBridgeError, match="bad options"):
        Stage1Objective(max_text_tokens=1)
    assert isinstance(objective_for(build("tiny-linear-opt", 2)), Stage2Objective)


def test_stage1_caption_positives_never_draw_an_image_that_has_the_text(monkeypatch: pytest.MonkeyPatch):
    model, seen = build("tiny-qformer-opt", 1), {}
    original = objectives_module.sample_hard_negatives

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen["neg"] = result = original(*args, **kwargs)
        return result

    monkeypatch.setattr(objectives_module, "sample_hard_negatives", spy)
    captions = ["a picture of two shapes", "a red circle", "a picture of two shapes", "a blue star"]
    batch = {**make_batch(model, captions, torch.tensor([0, 1, 2, 3])),
             "image_captions": [("a picture of two shapes",), ("a red circle", "a picture of two shapes"),
                                ("a picture of two shapes", "a green cross"), ("a blue star",)]}
    for seed in range(8):
        losses = Stage1Objective(torch.Generator().manual_seed(seed), positives="caption")(model, batch)
        assert torch.isfinite(losses["loss"])
        # texts 0 and 2 are true of images 0, 1 and 2: their only negative image is 3; image 1 has texts 0-2, so text 3
        negatives = seen["neg"]
        assert negatives.images[0] == 3 and negatives.images[2] == 3 and negatives.texts[1] == 3 and negatives.texts[0] in (1, 3)
    with pytest.raises(VLBridgeError, match="needs batch\\['image_captions'\\]"):
        Stage1Objective(positives="caption")(model, make_batch(model))
    with pytest.raises(VLBridgeError, match="bad options"):
        Stage1Objective(positives="scene")
