"""Stage 1's shared work is the same computation: ITG's text reading the ITC query pass's K/V equals
the joint multimodal-causal pass, image K/V computed once and indexed equal per-pass K/V, and the
stage-1 losses and gradients equal those of separate passes (eval mode: no dropout)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import vlbridge
from tests.test_qformer import image_text_inputs
from vlbridge.plugins.connectors.qformer import QFormerOptions
from vlbridge.plugins.connectors.qformer_model import ImageContext, build
from vlbridge.plugin.specs import TokenShape
from vlbridge.train import objectives as objectives_module
from vlbridge.train.losses import itc_loss, itg_loss, itm_loss, sample_hard_negatives
from vlbridge.train.objectives import Stage1Objective, batch_image_embeds, batch_image_ids

Q, N, E, D = 4, 6, 48, 40


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def qformer():
    torch.manual_seed(0)
    return build(QFormerOptions(variant="tiny", num_query_tokens=Q, num_layers=3), TokenShape(N, E), D).eval()


@pytest.fixture
def inputs():
    return image_text_inputs([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], N, E)


def test_itg_from_the_query_pass_equals_the_joint_pass_with_its_gradients(qformer, inputs):
    image, ids, mask = inputs
    joint = qformer.itg_logits(ids, mask, image)
    queries, query_kv = qformer.query_outputs(image, return_layer_kv=True)
    torch.testing.assert_close(queries, qformer.query_outputs(image))
    reused = qformer.itg_logits_from_queries(query_kv, ids, mask)
    torch.testing.assert_close(reused, joint, atol=1e-5, rtol=1e-5)

    def grads(logits: torch.Tensor) -> list[torch.Tensor]:  # the query side learns through the K/V too
        params = [qformer.query_tokens, qformer.layers[0].cross_attn.value.weight, qformer.ln_vision.weight]
        return torch.autograd.grad(itg_loss(logits, ids, mask, 0.1), params)

    for a, b in zip(grads(qformer.itg_logits(ids, mask, image)), grads(qformer.itg_logits_from_queries(
            qformer.query_outputs(image, return_layer_kv=True)[1], ids, mask))):
        assert a.abs().sum() > 0
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-4)


def test_shared_image_keys_values_equal_per_pass_ones(qformer, inputs):
    image, ids, mask = inputs
    context = qformer.image_context(image)
    assert [kv is None for kv in context.layers] == [layer.cross_attn is None for layer in qformer.layers]
    torch.testing.assert_close(qformer.query_outputs(context), qformer.query_outputs(image))
    rows = torch.tensor([2, 0, 0, 1, 2])
    pair_ids, pair_mask = ids[rows % 3], mask[rows % 3]
    torch.testing.assert_close(qformer.itm_logits(pair_ids, pair_mask, context.select(rows)), qformer.itm_logits(pair_ids, pair_mask, image[rows]))
    joined = ImageContext.cat([context, qformer.image_context(image[1:])])
    torch.testing.assert_close(qformer.multimodal_outputs(ids[[0, 1, 2, 1, 2]], mask[[0, 1, 2, 1, 2]], joined),
                               qformer.multimodal_outputs(ids[[0, 1, 2, 1, 2]], mask[[0, 1, 2, 1, 2]], image[[0, 1, 2, 1, 2]]))


def test_selected_rows_sum_their_gradients(qformer, inputs):
    image = inputs[0].clone().requires_grad_()
    rows = torch.tensor([1, 1, 0, 2, 1])
    weight = torch.randn(5, *qformer.image_context(image).layers[0][0].shape[1:])
    (g_select,) = torch.autograd.grad((qformer.image_context(image).select(rows).layers[0][0] * weight).sum(), image)
    (g_index,) = torch.autograd.grad((qformer.image_context(image).layers[0][0][rows] * weight).sum(), image)
    torch.testing.assert_close(g_select, g_index)


def _separate_passes(model: Any, batch: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Stage 1 as computed before the passes shared work: every pass from the raw image tokens, ITG
    as its own multimodal-causal pass."""
    qformer, objective = model.connector, Stage1Objective()
    image = batch_image_embeds(model, batch)
    image_ids = batch_image_ids(batch, len(batch["text"]), model.device)
    ids, mask, _ = objective.tokenize(qformer, batch["text"], model.device)
    itc, sim_i2t, sim_t2i = itc_loss(qformer.image_features(image), qformer.text_features(ids, mask), qformer.temp, image_ids,
                                     0.1, objective.options.temp_range)
    negatives = sample_hard_negatives(sim_i2t, sim_t2i, image_ids, image_ids, generator)
    texts = negatives.texts.clamp_min(0)
    logits = qformer.itm_logits(torch.cat([ids, ids, ids[texts]]), torch.cat([mask, mask, mask[texts]]),
                                torch.cat([image, image[negatives.images.clamp_min(0)], image]))
    itm = itm_loss(logits, len(ids), torch.cat([negatives.has_image, negatives.has_text]))
    decoder_ids = ids.clone()
    decoder_ids[:, 0] = qformer.tokenizer.bos_token_id
    itg = itg_loss(qformer.itg_logits(decoder_ids, mask, image), decoder_ids, mask, 0.1)
    return {"loss": itc + itm + itg, "itc": itc, "itm": itm, "itg": itg}


def _batch(model: Any) -> dict[str, Any]:
    size = model.plan.preprocess.image_size
    pixels = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    pixels[3] = pixels[0]
    return {"pixel_values": pixels, "text": ["a cat on a mat", "a dog in the park", "two birds", "a cat asleep"],
            "image_index": torch.tensor([0, 1, 2, 0])}


def _losses_and_grads(model: Any, compute: Any) -> tuple[dict[str, float], list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = compute()
    out["loss"].backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    return {k: float(v.detach()) for k, v in out.items()}, grads


@pytest.mark.parametrize("distributed", [False, True])
def test_stage1_losses_and_gradients_equal_separate_passes(monkeypatch: pytest.MonkeyPatch, distributed: bool):
    torch.manual_seed(0)
    model = vlbridge.build("tiny-qformer-opt", stage=1).eval()
    batch = _batch(model)
    if distributed:  # other ranks' hard-negative images get K/V of their own (here: one rank, same images)
        monkeypatch.setattr(objectives_module, "is_distributed", lambda: True)
    new, new_grads = _losses_and_grads(model, lambda: Stage1Objective(generator=torch.Generator().manual_seed(5))(model, batch))
    old, old_grads = _losses_and_grads(model, lambda: _separate_passes(model, batch, torch.Generator().manual_seed(5)))
    assert new == pytest.approx(old, rel=1e-5)
    for a, b in zip(old_grads, new_grads):
        torch.testing.assert_close(b, a, atol=1e-7, rtol=1e-4)
