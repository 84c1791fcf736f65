"""Q-Former key conversion, checked by numbers: transformers' BLIP-2 models with random weights,
converted into ours, give the same query outputs, projections, ITM logits and ITC scores."""

from __future__ import annotations

import pytest
import torch

from vlbridge.errors import WeightsError
from vlbridge.plugins.connectors.qformer import QFormerOptions
from vlbridge.plugins.connectors.qformer_convert import from_lavis, from_transformers, to_transformers
from vlbridge.plugins.connectors.qformer_model import TEXT_SIDE, build
from vlbridge.plugin.specs import TokenShape

transformers = pytest.importorskip("transformers")

Q, W, LLM, EMBED = 8, 48, 32, 16  # queries, vision width, LLM width, ITC width
TOKENS = 5  # a 28 px image in 14 px patches: 4 patches + [CLS]
OPTS = QFormerOptions(variant="tiny", num_query_tokens=Q, embed_dim=EMBED, ln_vision_eps=1e-6)


def _blip2_config(text_input: bool):
    vision = transformers.Blip2VisionConfig(hidden_size=W, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                                            image_size=28, patch_size=14, layer_norm_eps=1e-6)
    qformer = transformers.Blip2QFormerConfig(vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                              intermediate_size=256, max_position_embeddings=64, use_qformer_text_input=text_input)
    text = transformers.OPTConfig(vocab_size=64, hidden_size=LLM, num_hidden_layers=1, ffn_dim=64, num_attention_heads=4,
                                  max_position_embeddings=64, word_embed_proj_dim=LLM)
    return transformers.Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
                                    num_query_tokens=Q, image_text_hidden_size=EMBED)


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Random values everywhere (LayerNorms and biases too), so that no mapping hides behind 0 or 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            centre = 1.0 if "norm" in name.lower() and name.endswith("weight") else 0.0
            param.copy_(torch.randn(param.shape, generator=gen) * 0.2 + centre)


def _vision_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """The vision tower's output before post_layernorm: what our ln_vision receives."""
    seen: list[torch.Tensor] = []
    handle = model.vision_model.post_layernorm.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    try:
        model.vision_model(pixel_values=pixels)
    finally:
        handle.remove()
    assert seen[0].shape == (pixels.shape[0], TOKENS, W)
    return seen[0]


@torch.no_grad()
def test_generation_model_converts_to_equal_query_outputs():
    hf = transformers.Blip2ForConditionalGeneration(_blip2_config(text_input=False)).eval()
    _randomise(hf, seed=0)
    ours = build(OPTS, TokenShape(TOKENS, W), LLM).eval()
    ours.load_weights(from_transformers(hf.state_dict()), allow_missing=TEXT_SIDE, source="Blip2ForConditionalGeneration")
    pixels = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    expected = hf.get_image_features(pixel_values=pixels)
    feats = _vision_features(hf, pixels)
    torch.testing.assert_close(ours.query_outputs(feats), expected.qformer_outputs.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours(feats), expected.pooler_output, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_retrieval_model_gets_equal_itm_logits_and_itc_scores():
    torch.manual_seed(2)
    ours = build(OPTS, TokenShape(TOKENS, W), LLM).eval()
    _randomise(ours, seed=3)
    hf = transformers.Blip2ForImageTextRetrieval(_blip2_config(text_input=True)).eval()
    result = hf.load_state_dict(to_transformers(ours.state_dict()), strict=False)
    assert set(result.unexpected_keys) == {"language_projection.weight", "language_projection.bias"}  # stage 2 only
    assert all(k.startswith("vision_model.") and "post_layernorm" not in k for k in result.missing_keys)
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(4))
    ids = torch.tensor([[2, 40, 41, 42, 3], [2, 50, 3, 0, 0]])
    mask = (ids != 0).long()
    feats = _vision_features(hf, pixels)

    itm = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
    torch.testing.assert_close(ours.itm_logits(ids, mask, feats), itm.logits_per_image, atol=1e-5, rtol=1e-5)

    itc = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=False)
    scores = torch.einsum("iqe,te->iqt", ours.image_features(feats), ours.text_features(ids, mask)).amax(dim=1)
    torch.testing.assert_close(scores, itc.logits_per_image, atol=1e-5, rtol=1e-5)

    back = build(OPTS, TokenShape(TOKENS, W), LLM).eval()  # and from the retrieval model's own keys
    back.load_weights(from_transformers(hf.state_dict()), allow_missing=("lm_head.*", "temp", "proj.*"))
    torch.testing.assert_close(back.itm_logits(ids, mask, feats), itm.logits_per_image, atol=1e-5, rtol=1e-5)


def test_transformers_round_trip_and_unknown_keys():
    ours = build(OPTS, TokenShape(TOKENS, W), LLM).state_dict()
    back = from_transformers(to_transformers(ours))
    assert set(back) == set(ours) - {"temp"} - {k for k in ours if k.startswith("lm_head.")}
    assert all(back[k] is ours[k] for k in back)
    theirs = to_transformers(ours)
    assert "qformer.encoder.layer.0.crossattention.attention.key.weight" in theirs
    assert "qformer.encoder.layer.1.attention.output.LayerNorm.bias" in theirs
    assert "qformer.encoder.layer.0.output_query.dense.weight" in theirs
    assert "vision_model.post_layernorm.weight" in theirs and "language_projection.bias" in theirs
    skipped = {**theirs, "vision_model.encoder.layers.0.mlp.fc1.weight": 0, "language_model.lm_head.weight": 0}
    assert set(from_transformers(skipped)) == set(back)  # other parts' keys are skipped
    with pytest.raises(WeightsError, match="qformer.encoder.layer.0.attention.rotary"):
        from_transformers({**theirs, "qformer.encoder.layer.0.attention.rotary.weight": 0})


def _lavis_name(key: str) -> str:
    """Our key -> LAVIS's, spelled out by hand (independent of the converter's tables)."""
    fixed = {"embeddings.word.weight": "Qformer.bert.embeddings.word_embeddings.weight",
             "embeddings.position.weight": "Qformer.bert.embeddings.position_embeddings.weight",
             "lm_head.bias": "Qformer.cls.predictions.bias"}
    if key in fixed:
        return fixed[key]
    for ours, lavis in [("embeddings.norm.", "Qformer.bert.embeddings.LayerNorm."), ("proj.", "opt_proj."),
                        ("lm_head.dense.", "Qformer.cls.predictions.transform.dense."),
                        ("lm_head.norm.", "Qformer.cls.predictions.transform.LayerNorm.")]:
        if key.startswith(ours):
            return lavis + key[len(ours):]
    if not key.startswith("layers."):
        return key  # query_tokens, ln_vision, vision_proj, text_proj, itm_head, temp
    _, index, block, rest = key.split(".", 3)
    inner = {"self_attn": "attention", "cross_attn": "crossattention"}
    if block in inner:
        name = rest.split(".")[0]
        tail = {"dense": "output.dense", "norm": "output.LayerNorm"}.get(name, f"self.{name}")
        return f"Qformer.bert.encoder.layer.{index}.{inner[block]}.{tail}.{rest.split('.')[1]}"
    suffix = "_query" if block == "ffn_query" else ""
    part, param = rest.split(".")
    sub = {"fc1": f"intermediate{suffix}.dense", "fc2": f"output{suffix}.dense", "norm": f"output{suffix}.LayerNorm"}[part]
    return f"Qformer.bert.encoder.layer.{index}.{sub}.{param}"


def test_lavis_state_dict_converts_to_ours():
    model = build(OPTS, TokenShape(TOKENS, W), LLM)
    ours = model.state_dict()
    lavis = {_lavis_name(k): v for k, v in ours.items()}
    assert "Qformer.bert.encoder.layer.0.crossattention.self.key.weight" in lavis
    assert "Qformer.bert.encoder.layer.1.output_query.LayerNorm.bias" in lavis
    lavis.update({  # what a LAVIS checkpoint also holds: tied decoder, buffers, other parts
        "Qformer.cls.predictions.decoder.weight": ours["embeddings.word.weight"],
        "Qformer.cls.predictions.decoder.bias": ours["lm_head.bias"],
        "Qformer.bert.embeddings.position_ids": torch.arange(64)[None],
        "visual_encoder.blocks.0.attn.qkv.weight": torch.zeros(1), "opt_model.lm_head.weight": torch.zeros(1),
    })
    converted = from_lavis(lavis)
    assert set(converted) == set(ours)
    fresh = build(OPTS, TokenShape(TOKENS, W), LLM)
    fresh.load_weights(converted, source="LAVIS")
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, ours[key]), key
    t5 = from_lavis({"t5_proj.weight": ours["proj.weight"], "query_tokens": ours["query_tokens"]})
    assert set(t5) == {"proj.weight", "query_tokens"}
    with pytest.raises(WeightsError, match="Qformer.bert.encoder.layer.0.adapter.weight"):
        from_lavis({"Qformer.bert.encoder.layer.0.adapter.weight": 0})
