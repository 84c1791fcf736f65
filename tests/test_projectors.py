"""LLaVA-style projectors: shapes, layer layout, stages and parameter counts equal to the spec's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlbridge.errors import IncompatibleError, VLBridgeError
from vlbridge.plugins.connectors.projectors import LinearOptions, MLPOptions, linear_params, mlp_params
from vlbridge.plugins.connectors.projectors_model import build_linear, build_mlp
from vlbridge.plugin.specs import TokenShape

ENC = TokenShape(7, 24)
D = 40


def _trainable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def test_linear_maps_each_token():
    proj = build_linear(LinearOptions(), ENC, D)
    x = torch.randn(2, 7, 24)
    out = proj(x)
    assert out.shape == (2, 7, D)
    layer = proj.layers[0]
    torch.testing.assert_close(out, x @ layer.weight.T + layer.bias)
    proj.set_stage(2)
    assert _trainable(proj) == linear_params(LinearOptions(), ENC, D)[2]


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_mlp_is_linear_then_gelu_linear_pairs(depth):
    opts = MLPOptions(depth=depth)
    proj = build_mlp(opts, ENC, D)
    kinds = [type(m).__name__ for m in proj.layers]
    assert kinds == ["Linear"] + ["GELU", "Linear"] * (depth - 1)
    x = torch.randn(3, 7, 24)
    expected = proj.layers[0](x)
    for linear in proj.layers[2::2]:
        expected = linear(F.gelu(expected))  # exact (erf) GELU, as LLaVA's nn.GELU()
    torch.testing.assert_close(proj(x), expected)
    proj.set_stage(2)
    assert _trainable(proj) == mlp_params(opts, ENC, D)[2]


def test_mlp2x_gelu_keys_are_llava_layout():
    keys = set(build_mlp(MLPOptions(), ENC, D).state_dict())
    assert keys == {"layers.0.weight", "layers.0.bias", "layers.2.weight", "layers.2.bias"}


def test_no_stage_one():
    proj = build_mlp(MLPOptions(), ENC, D)
    with pytest.raises(VLBridgeError, match="no stage 1.*stage 2 only"):
        proj.set_stage(1)


def test_pinned_encoder_width_must_match():
    with pytest.raises(IncompatibleError, match="1024"):
        build_linear(LinearOptions(encoder_width=1024), ENC, D)
