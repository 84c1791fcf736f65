"""model.features reads the whole text, as LAVIS's extract_features does (no 35-token cut: that is
retrieval's), up to the Q-Former's text positions."""

from __future__ import annotations

import pytest
import torch

import vlbridge

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LONG = "a small red circle to the left of a large blue square above a green star " * 3  # > 35 tokens, < 64


def test_text_and_multimodal_features_are_not_cut_at_retrievals_35_tokens():
    model = vlbridge.build("tiny-qformer-opt", stage=1)
    qformer = model.connector
    encoded = qformer.tokenizer([LONG], return_tensors="pt")
    assert 35 < encoded.input_ids.shape[1] < qformer.max_text_positions
    with torch.no_grad():
        whole = qformer.text_outputs(encoded.input_ids, encoded.attention_mask)
    text = model.features(texts=LONG, mode="text")
    assert text.text_embeds.shape[1] == encoded.input_ids.shape[1]
    torch.testing.assert_close(text.text_embeds, whole, rtol=0, atol=1e-6)
    image = torch.zeros(1, 3, 56, 56)
    joint = model.features(images=image, texts=LONG, mode="multimodal")
    with torch.no_grad():
        expected = qformer.multimodal_outputs(encoded.input_ids, encoded.attention_mask, model.encode_images(model.pixel_values(image)))
    torch.testing.assert_close(joint.multimodal_embeds, expected[:, :qformer.query_tokens.shape[1]], rtol=0, atol=1e-6)


def test_a_text_longer_than_the_positions_is_cut_there():
    model = vlbridge.build("tiny-qformer-opt", stage=1)
    features = model.features(texts=LONG * 3, mode="text")
    assert features.text_embeds.shape[1] == model.connector.max_text_positions
