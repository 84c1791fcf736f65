"""The Q-Former module: shapes, what each mask lets each position see, stages and parameter counts,
tokenizer, initialisation from a BERT checkpoint."""

from __future__ import annotations

import shutil

import pytest
import torch

from vlbridge.errors import IncompatibleError, VLBridgeError, WeightsError
from vlbridge.plugins.connectors.qformer import QFormerOptions, num_params
from vlbridge.plugins.connectors.qformer_bert import read_weights
from vlbridge.plugins.connectors.qformer_masks import bidirectional_mask, multimodal_causal_mask, unimodal_mask
from vlbridge.plugins.connectors.qformer_model import TEXT_SIDE, build
from vlbridge.plugins.tiny_assets import tokenizer_dir
from vlbridge.plugin.specs import TokenShape

Q, N, E, D = 4, 6, 48, 40
ENC = TokenShape(N, E)


def _opts(**kw) -> QFormerOptions:
    return QFormerOptions(variant="tiny", num_query_tokens=Q, **kw)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build(_opts(), ENC, D).eval()


def image_text_inputs(mask_rows: list[list[int]], tokens: int = N, width: int = E) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded (image tokens, text ids starting with [CLS] id 2, text mask) for one sample per mask row."""
    gen = torch.Generator().manual_seed(1)
    mask = torch.tensor(mask_rows)
    image = torch.randn(mask.shape[0], tokens, width, generator=gen)
    ids = torch.randint(5, 200, tuple(mask.shape), generator=gen)
    ids[:, 0] = 2
    return image, ids, mask


@pytest.fixture
def inputs():
    return image_text_inputs([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])


# -- masks: who sees whom ------------------------------------------------------------------

TEXT = torch.tensor([[1, 1, 1, 0]])  # three real tokens, one pad; positions Q.. are text


def _sees(mask: torch.Tensor, row: int) -> list[int]:
    return torch.nonzero(mask[0, 0, row]).flatten().tolist()


def test_unimodal_mask_separates_queries_from_text():
    mask = unimodal_mask(2, TEXT)
    assert mask.shape == (1, 1, 6, 6)
    assert _sees(mask, 0) == _sees(mask, 1) == [0, 1]  # queries: queries only
    assert _sees(mask, 2) == _sees(mask, 4) == [2, 3, 4]  # text: real text only, no queries
    assert _sees(mask, 5) == [2, 3, 4]  # a pad row still sees real text, never the pad


def test_bidirectional_mask_lets_everyone_see_every_real_token():
    mask = bidirectional_mask(2, TEXT)
    assert mask.shape == (1, 1, 6, 6)
    for row in range(6):
        assert _sees(mask, row) == [0, 1, 2, 3, 4]


def test_multimodal_causal_mask_is_queries_then_causal_text():
    mask = multimodal_causal_mask(2, TEXT)
    assert _sees(mask, 0) == _sees(mask, 1) == [0, 1]  # queries never see text
    assert _sees(mask, 2) == [0, 1, 2]  # first text token ([DEC]): all queries and itself
    assert _sees(mask, 3) == [0, 1, 2, 3]
    assert _sees(mask, 4) == [0, 1, 2, 3, 4]
    assert _sees(mask, 5) == [0, 1, 2, 3, 4]  # the pad key stays hidden


# -- passes -----------------------------------------------------------------------------

def test_output_shapes(model, inputs):
    image, ids, mask = inputs
    assert model(image).shape == (2, Q, D)
    assert model.query_outputs(image).shape == (2, Q, 64)
    assert model.text_outputs(ids, mask).shape == (2, 5, 64)
    assert model.multimodal_outputs(ids, mask, image).shape == (2, Q + 5, 64)
    assert model.itg_logits(ids, mask, image).shape == (2, 5, 1024)
    assert model.itm_logits(ids, mask, image).shape == (2, 2)
    feats = model.image_features(image)
    assert feats.shape == (2, Q, 256) and torch.allclose(feats.norm(dim=-1), torch.ones(2, Q))
    assert model.text_features(ids, mask).shape == (2, 256)


@torch.no_grad()
def test_unimodal_joint_pass_equals_the_two_separate_passes(model, inputs):
    """[queries; text] under the unimodal mask = query pass and text pass run apart."""
    image, ids, mask = inputs
    x = model.embeddings(ids, model.query_tokens.expand(2, -1, -1))
    joint_mask = unimodal_mask(Q, mask)
    image_n = model.ln_vision(image)
    for layer in model.layers:
        x = layer(x, joint_mask, Q, image_n)
    torch.testing.assert_close(x[:, :Q], model.query_outputs(image), atol=1e-5, rtol=1e-5)
    real = mask.bool()
    torch.testing.assert_close(x[:, Q:][real], model.text_outputs(ids, mask)[real], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_itg_is_causal_and_sees_the_image(model, inputs):
    image, ids, mask = inputs
    logits = model.itg_logits(ids, mask, image)
    later = ids.clone()
    later[:, 3:] = 7
    torch.testing.assert_close(model.itg_logits(later, mask, image)[:, :3], logits[:, :3])
    assert not torch.allclose(model.itg_logits(later, mask, image)[0, 3:], logits[0, 3:])
    assert not torch.allclose(model.itg_logits(ids, mask, image + 1.0), logits)


@torch.no_grad()
def test_padding_and_text_influence(model, inputs):
    image, ids, mask = inputs
    other_pads = ids.clone()
    other_pads[1, 3:] = 9
    torch.testing.assert_close(model.text_outputs(other_pads, mask)[1, :3], model.text_outputs(ids, mask)[1, :3])
    # queries see the text in the ITM pass (bidirectional), not in the query pass
    mm = model.multimodal_outputs(ids, mask, image)[:, :Q]
    assert not torch.allclose(mm, model.query_outputs(image))


def test_dropout_only_in_train_mode(inputs):
    image = inputs[0]
    m = build(_opts(), ENC, D)
    m.train()
    assert not torch.allclose(m(image), m(image))
    m.eval()
    torch.testing.assert_close(m(image), m(image))


# -- stages and parameter counts ------------------------------------------------------------

def _trainable(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


@pytest.mark.parametrize("stage", [1, 2])
def test_trainable_count_equals_spec_tiny(stage):
    m = build(_opts(), ENC, D)
    m.set_stage(stage)
    assert _trainable(m) == num_params(_opts(), ENC, D)[stage]


def test_trainable_count_equals_spec_base_on_meta():
    opts, enc = QFormerOptions(), TokenShape(257, 1408)
    with torch.device("meta"):
        m = build(opts, enc, 2560)
    for stage in (1, 2):
        m.set_stage(stage)
        assert _trainable(m) == num_params(opts, enc, 2560)[stage]
    assert num_params(opts, enc, 2560)[2] == 107_133_696


def test_stage_two_trains_only_the_query_path(inputs):
    image = inputs[0]
    m = build(_opts(), ENC, D)
    m.set_stage(2)
    m(image).sum().backward()
    grads = {n for n, p in m.named_parameters() if p.grad is not None}
    assert {"query_tokens", "ln_vision.weight", "proj.weight", "layers.0.cross_attn.key.weight"} <= grads
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert "layers.1.ffn_text.fc1.weight" in frozen and "embeddings.word.weight" in frozen and "temp" in frozen
    assert "proj.weight" not in frozen and "embeddings.norm.weight" not in frozen
    with pytest.raises(VLBridgeError, match="stages 1 and 2"):
        m.set_stage(3)


def test_pinned_encoder_width_must_match():
    with pytest.raises(IncompatibleError, match="1408"):
        build(_opts(encoder_width=1408), ENC, D)


def test_load_weights_is_strict(model):
    m = build(_opts(), ENC, D)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    del state["layers.0.ffn_text.fc1.weight"]
    with pytest.raises(WeightsError, match="missing.*layers.0.ffn_text.fc1.weight"):
        m.load_weights(state)
    m.load_weights(state, allow_missing=TEXT_SIDE)
    torch.testing.assert_close(m.query_tokens, model.query_tokens)
    state["proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(WeightsError, match=r"proj.weight has shape \(3, 3\).*\(40, 64\)"):
        m.load_weights(state, allow_missing=TEXT_SIDE)


# -- tokenizer ------------------------------------------------------------------------------

def test_tiny_tokenizer_has_dec_as_bos(model):
    tok = model.tokenizer
    assert tok.bos_token == "[DEC]" and tok.convert_tokens_to_ids("[DEC]") == tok.bos_token_id
    assert len(tok) <= 1024
    ids = tok("a red circle")["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id


def test_tokenizer_errors(monkeypatch):
    small = build(_opts(vocab_size=100), ENC, D)
    with pytest.raises(VLBridgeError, match="vocab_size to at least"):
        small.tokenizer
    import transformers

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    with torch.device("meta"):
        base = build(QFormerOptions(), TokenShape(257, 1408), 2560)
    with pytest.raises(VLBridgeError, match="bert-base-uncased.*connector.options.bert"):
        base.tokenizer


# -- initialisation from BERT ---------------------------------------------------------------

def _save_bert(path, cls_name: str = "BertForMaskedLM", **overrides) -> dict[str, torch.Tensor]:
    import transformers

    config = dict(vocab_size=1023, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=256, max_position_embeddings=64)
    config.update(overrides)
    torch.manual_seed(3)
    bert = getattr(transformers, cls_name)(transformers.BertConfig(**config))
    bert.save_pretrained(path)
    for file in tokenizer_dir("bert").iterdir():
        shutil.copy(file, path / file.name)
    return {k.removeprefix("bert."): v for k, v in bert.state_dict().items()}


def test_init_from_bert_copies_text_side_into_both_ffns(tmp_path):
    bert = _save_bert(tmp_path)
    torch.manual_seed(4)
    m = build(_opts(bert=str(tmp_path)), ENC, D)
    p = dict(m.named_parameters())
    torch.testing.assert_close(p["embeddings.word.weight"][:1023], bert["embeddings.word_embeddings.weight"])
    torch.testing.assert_close(p["embeddings.position.weight"], bert["embeddings.position_embeddings.weight"])
    torch.testing.assert_close(p["layers.1.self_attn.key.weight"], bert["encoder.layer.1.attention.self.key.weight"])
    torch.testing.assert_close(p["layers.0.ffn_text.fc2.weight"], bert["encoder.layer.0.output.dense.weight"])
    torch.testing.assert_close(p["layers.0.ffn_query.fc2.weight"], bert["encoder.layer.0.output.dense.weight"])
    torch.testing.assert_close(p["layers.1.ffn_query.norm.bias"], bert["encoder.layer.1.output.LayerNorm.bias"])
    torch.testing.assert_close(p["lm_head.dense.weight"], bert["cls.predictions.transform.dense.weight"])
    # cross-attention stays random (BERT-style init), [DEC]'s row stays as initialised
    assert 0.01 < p["layers.0.cross_attn.key.weight"].std() < 0.03
    assert p["embeddings.word.weight"][1023].abs().sum() > 0
    assert m.tokenizer.bos_token == "[DEC]"


def test_init_from_bert_model_without_head_and_from_bin(tmp_path):
    bert = _save_bert(tmp_path, "BertModel")
    weights = read_weights(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(weights, tmp_path / "pytorch_model.bin")
    m = build(_opts(bert=str(tmp_path)), ENC, D)
    torch.testing.assert_close(m.layers[0].self_attn.query.weight, bert["encoder.layer.0.attention.self.query.weight"])
    assert m.lm_head.dense.weight.std() > 0.01  # random, not from BERT


def test_init_from_bert_is_strict(tmp_path):
    """A local BERT's config.json sizes the Q-Former; sizes given explicitly that disagree with the
    weights are refused tensor by tensor, never half-loaded."""
    (tmp_path / "wide").mkdir()
    _save_bert(tmp_path / "wide", "BertModel", hidden_size=32)
    assert build(_opts(bert=str(tmp_path / "wide")), ENC, D).query_tokens.shape[-1] == 32  # the directory's own width
    with pytest.raises(WeightsError, match=r"tensor embeddings\.\S+ has shape \((1023, )?32,?\) but the Q-Former needs \((1024, )?64,?\)"):
        build(_opts(bert=str(tmp_path / "wide"), hidden_size=64), ENC, D)
    (tmp_path / "deep").mkdir()
    _save_bert(tmp_path / "deep", "BertModel", num_hidden_layers=3)
    with pytest.raises(WeightsError, match="unexpected.*layers.2"):
        build(_opts(bert=str(tmp_path / "deep"), num_layers=2), ENC, D)
    with pytest.raises(WeightsError, match="BERT weights not found"):
        build(_opts(bert=str(tmp_path / "missing")), ENC, D)


def test_drop_text_side_keeps_the_query_path(inputs):
    image, ids, mask = inputs
    m = build(_opts(), ENC, D).eval()
    before = m(image)
    m.drop_text_side()
    torch.testing.assert_close(m(image), before)
    m.set_stage(2)
    assert sum(p.numel() for p in m.parameters()) == _trainable(m) == num_params(_opts(), ENC, D)[2]
    for call in (lambda: m.text_outputs(ids, mask), lambda: m.itg_logits(ids, mask, image),
                 lambda: m.image_features(image), lambda: m.set_stage(1)):
        with pytest.raises(VLBridgeError, match="drop_text_side"):
            call()
