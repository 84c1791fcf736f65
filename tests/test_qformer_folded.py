"""Cross-attention with the key/value weights folded into the queries (`attend_folded`) is the same
computation as projecting the image tokens: outputs and gradients in eval, outputs under the same
dropout draws in training, and a Q-Former that folds still equals transformers' Blip2QFormerModel."""

from __future__ import annotations

import pytest
import torch

from vlbridge.plugins.connectors.qformer import QFormerOptions
from vlbridge.plugins.connectors.qformer_convert import to_transformers
from vlbridge.plugins.connectors.qformer_layers import Attention, FP32LayerNorm, NormedTokens, folding_pays
from vlbridge.plugins.connectors.qformer_model import build
from vlbridge.plugin.specs import TokenShape

pytestmark = pytest.mark.usefixtures("one_torch_thread")

W, C, HEADS, L, N = 32, 24, 4, 3, 20  # width, context width, heads, queries, image tokens


def _randomised_attention() -> Attention:
    torch.manual_seed(0)
    block = Attention(W, C, HEADS, 1e-12, 0.1)
    with torch.no_grad():
        for param in block.parameters():
            param.copy_(torch.randn(param.shape) * 0.3 + (1.0 if param is block.norm.weight else 0.0))
    return block


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(2, L, W, generator=gen, requires_grad=True), torch.randn(2, N, C, generator=gen, requires_grad=True)


def test_folding_pays_at_blip2_size_and_not_for_few_tokens():
    assert folding_pays(32, 257, 768, 12)  # BLIP-2: 32 queries over EVA's 257 tokens
    assert not folding_pays(8, 5, 64, 4)  # more queries than the tokens' projection costs
    assert not folding_pays(8, 17, 64, 4)  # the tiny presets: 3% fewer multiply-adds do not pay for the extra kernels
    assert folding_pays(8, 65, 128, 4)  # the world demo's 8-query Q-Former: 63% fewer
    assert folding_pays(L, N, W, HEADS)  # this file's shapes exercise the folded path


def test_folded_equals_projected_with_gradients():
    block = _randomised_attention().eval()
    x, tokens = _inputs()
    projected, folded = block(x, context=tokens), block.attend_folded(x, NormedTokens(tokens, None, None))
    torch.testing.assert_close(folded, projected, atol=1e-5, rtol=1e-5)
    params = [x, tokens, block.query.weight, block.key.weight, block.value.weight, block.value.bias]
    grads_projected = torch.autograd.grad(projected.pow(2).sum(), params)
    grads_folded = torch.autograd.grad(folded.pow(2).sum(), params)
    for name, a, b in zip(("x", "tokens", "query", "key", "value", "value bias"), grads_projected, grads_folded):
        assert a.abs().sum() > 0, name
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    # The key bias shifts each score row by a constant, which softmax ignores: a gradient of ~0 on both
    # paths, but a gradient (optimizers skip parameters whose grad is None, weight decay included).
    for out in (block(x, context=tokens), block.attend_folded(x, NormedTokens(tokens, None, None))):
        assert torch.autograd.grad(out.pow(2).sum(), block.key.bias)[0].abs().max() < 1e-4


@torch.no_grad()
def test_folded_inference_equals_projected():
    """Without autograd the folded block writes query-keys per image and drops the key bias (the
    softmax cancels it): the same outputs, for a batch of images and for one query set read by all."""
    block = _randomised_attention().eval()
    x, tokens = _inputs()
    torch.testing.assert_close(block.attend_folded(x, NormedTokens(tokens, None, None)), block(x, context=tokens),
                               atol=1e-5, rtol=1e-5)
    shared = x[:1]
    torch.testing.assert_close(block.attend_folded(shared, NormedTokens(tokens, None, None)),
                               block(shared.expand(2, -1, -1), context=tokens), atol=1e-5, rtol=1e-5)


def test_folded_equals_projected_under_the_same_dropout_draws():
    block = _randomised_attention().train()
    x, tokens = _inputs()
    torch.manual_seed(5)
    projected = block(x, context=tokens)
    torch.manual_seed(5)
    folded = block.attend_folded(x, NormedTokens(tokens, None, None))
    torch.manual_seed(6)
    other = block.attend_folded(x, NormedTokens(tokens, None, None))
    torch.testing.assert_close(folded, projected, atol=1e-5, rtol=1e-5)
    assert (other - folded).abs().max() > 1e-3  # dropout was on: other draws, other outputs


def test_ln_vision_affine_folded_into_the_weights_gives_its_gradients():
    """ln_vision's weight and bias folded into Wk and Wv: the same outputs and the same gradients for
    the norm's affine, the block and the tokens as normalising first and projecting."""
    block = _randomised_attention().eval()
    x, raw = _inputs()
    norm = FP32LayerNorm(C, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(C) + 0.5)
        norm.bias.copy_(torch.randn(C) * 0.3)
    projected = block(x, context=norm(raw))
    folded = block.attend_folded(x, norm.normalised(raw))
    torch.testing.assert_close(folded, projected, atol=1e-5, rtol=1e-5)
    params = [norm.weight, norm.bias, raw, x, block.key.weight, block.value.weight, block.value.bias]
    grads_projected = torch.autograd.grad(projected.pow(2).sum(), params)
    grads_folded = torch.autograd.grad(folded.pow(2).sum(), params)
    for name, a, b in zip(("ln weight", "ln bias", "tokens", "x", "key", "value", "value bias"), grads_projected, grads_folded):
        assert a.abs().sum() > 0, name
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_frozen_tokens_get_no_token_sized_gradient_work():
    """With frozen image tokens the folded backward never forms a (B, N, C) gradient: the products
    over the tokens only differentiate toward the queries (what makes the training step cheaper)."""
    block = _randomised_attention().train()
    x, raw = _inputs()
    raw = raw.detach()
    norm = FP32LayerNorm(C, eps=1e-6)
    shapes: list[tuple[int, ...]] = []
    from torch.utils._python_dispatch import TorchDispatchMode

    class Shapes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            if isinstance(result, torch.Tensor) and func._schema.returns[0].alias_info is None:
                shapes.append(tuple(result.shape))  # fresh results only (views of the saved tokens are free)
            return result

    def fresh_shapes(out: torch.Tensor) -> list[tuple[int, ...]]:
        shapes.clear()
        with Shapes():
            grads = torch.autograd.grad(out.pow(2).sum(), [norm.weight, norm.bias, x])
        assert all(g.abs().sum() > 0 for g in grads)
        return list(shapes)

    assert tuple(raw.shape) in fresh_shapes(block(x, context=norm(raw)))  # projecting: the norm's gradient needs it
    assert tuple(raw.shape) not in fresh_shapes(block.attend_folded(x, norm.normalised(raw)))


@torch.no_grad()
def test_a_folding_qformer_equals_transformers(monkeypatch: pytest.MonkeyPatch):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    ours = build(QFormerOptions(variant="tiny", num_query_tokens=2, ln_vision_eps=1e-6), TokenShape(64, C), 16).eval()
    for param in ours.parameters():  # biases and LayerNorms random too, so no mapping hides behind 0 or 1
        param.add_(torch.randn(param.shape) * 0.1)
    assert folding_pays(2, 64, 64, 4)
    config = transformers.Blip2QFormerConfig(vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=256, max_position_embeddings=64, encoder_hidden_size=C,
                                             use_qformer_text_input=True)
    theirs = transformers.Blip2QFormerModel(config).eval()
    converted = to_transformers({k: v for k, v in ours.state_dict().items()})
    theirs.load_state_dict({k.removeprefix("qformer."): v for k, v in converted.items() if k.startswith("qformer.")}, strict=True)
    image = torch.randn(3, 64, C, generator=torch.Generator().manual_seed(4))
    expected = theirs(query_embeds=ours.query_tokens.expand(3, -1, -1), encoder_hidden_states=ours.ln_vision(image)).last_hidden_state
    torch.testing.assert_close(ours.query_outputs(image, fold=True), expected, atol=1e-5, rtol=1e-5)
    folded_calls: list[int] = []
    original = Attention.attend_folded
    monkeypatch.setattr(Attention, "attend_folded", lambda self, *a: folded_calls.append(1) or original(self, *a))
    torch.testing.assert_close(ours(image), ours.proj(expected), atol=1e-5, rtol=1e-5)
    assert len(folded_calls) == 1  # the stage-2 forward folds its one cross-attention layer
    ours.query_outputs(image)
    assert len(folded_calls) == 1  # stage-1 passes project (their K/V are shared across passes)


@torch.no_grad()
@pytest.mark.parametrize("fold", [True, False])
def test_eval_runs_one_query_set_until_the_first_cross_attention(fold: bool):
    """Without dropout every image's queries are equal until they read the image: layer 0's
    self-attention runs once for the batch, and the outputs equal each image's own pass."""
    torch.manual_seed(5)
    model = build(QFormerOptions(variant="tiny", num_query_tokens=2), TokenShape(64, C), 16).eval()
    for param in model.parameters():
        param.add_(torch.randn(param.shape) * 0.1)
    assert folding_pays(2, 64, 64, 4)
    image = torch.randn(3, 64, C, generator=torch.Generator().manual_seed(6))
    seen: list[int] = []
    original = model.layers[0].self_attn.attend
    model.layers[0].self_attn.attend = lambda x, *a: seen.append(x.shape[0]) or original(x, *a)
    together = model.query_outputs(image, fold=fold)
    assert seen == [1] and together.shape[0] == 3
    alone = torch.cat([model.query_outputs(image[i:i + 1], fold=fold) for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)  # float rounding of other product shapes
    model.train()
    seen.clear()
    model.query_outputs(image, fold=fold)
    assert seen == [3]  # with dropout each image draws its own masks: no sharing
