"""The built-in declarations: dimensions for every variant and analytic parameter counts, checked
against the published figures and against the real transformers / open_clip modules (on 'meta')."""

from __future__ import annotations

import pytest

from vlbridge.plugins.connectors import projectors, qformer
from vlbridge.plugins.encoders import clip_vit_l, eva_vit_g
from vlbridge.plugins.llms import flan_t5, opt
from vlbridge.plugin.specs import TokenShape


@pytest.mark.parametrize("image_size, tokens", [(224, 257), (364, 677), (None, 257)])
def test_eva_vit_g_tokens(image_size, tokens):
    opts = eva_vit_g.EvaVitGOptions(image_size=image_size)
    assert eva_vit_g.output(opts) == TokenShape(tokens, 1408)
    assert eva_vit_g.preprocess(opts).image_size == (image_size or 224)


def test_eva_vit_g_rejects_sizes_off_the_patch_grid():
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        eva_vit_g.EvaVitGOptions(image_size=225)
    with pytest.raises(ValueError, match="exceeds the 40 blocks"):
        eva_vit_g.EvaVitGOptions(num_blocks=41)


def test_eva_vit_g_params_match_blip2_figure():
    assert eva_vit_g.num_params(eva_vit_g.EvaVitGOptions()) == pytest.approx(986e6, rel=0.002)


@pytest.mark.parametrize(
    "opts, shape",
    [
        ({}, TokenShape(257, 1024)),
        ({"image_size": 336}, TokenShape(577, 1024)),
        ({"image_size": 336, "include_cls": False}, TokenShape(576, 1024)),
        ({"include_cls": False}, TokenShape(256, 1024)),
        ({"variant": "tiny", "include_cls": False}, TokenShape(16, 64)),
    ],
)
def test_clip_vit_l_tokens(opts, shape):
    assert clip_vit_l.output(clip_vit_l.ClipVitLOptions(**opts)) == shape


def test_clip_vit_l_option_checks():
    with pytest.raises(ValueError, match="224, 336"):
        clip_vit_l.ClipVitLOptions(image_size=448)
    with pytest.raises(ValueError, match="out of range for 24 blocks"):
        clip_vit_l.ClipVitLOptions(layer=24)
    assert clip_vit_l.ClipVitLOptions(layer=-24).layer == -24


@pytest.mark.parametrize(
    "variant, width", [("125m", 768), ("350m", 512), ("1.3b", 2048), ("2.7b", 2560), ("6.7b", 4096), ("tiny", 64)]
)
def test_opt_embedding_widths(variant, width):
    dims = opt.dims(opt.OPTOptions(variant=variant))
    assert (dims.embed_width, dims.encoder_decoder, dims.context_is_hard) == (width, False, True)


@pytest.mark.parametrize("variant, width", [("small", 512), ("base", 768), ("large", 1024), ("xl", 2048), ("xxl", 4096)])
def test_flan_t5_widths(variant, width):
    dims = flan_t5.dims(flan_t5.FlanT5Options(variant=variant))
    assert (dims.embed_width, dims.encoder_decoder, dims.context_is_hard) == (width, True, False)


@pytest.mark.parametrize(
    "llm_width, expected", [(2560, 107_133_696), (4096, 108_314_880), (2048, 106_739_968)]
)
def test_qformer_stage2_params_match_paper(llm_width, expected):
    counts = qformer.num_params(qformer.QFormerOptions(), TokenShape(257, 1408), llm_width)
    assert counts[2] == expected


def test_qformer_stage1_params():
    counts = qformer.num_params(qformer.QFormerOptions(), TokenShape(257, 1408), 2560)
    assert counts[1] == 186_705_470  # LAVIS's stage-1 trainable set (paper: "188M")


def test_llava_mlp_params():
    counts = projectors.mlp_params(projectors.MLPOptions(), TokenShape(576, 1024), 4096)
    assert counts[2] == pytest.approx(21.0e6, rel=0.01)  # LLaVA-1.5 7B's mlp2x_gelu


# -- analytic counts against the real modules, instantiated without memory on the meta device ----
torch = pytest.importorskip("torch")


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("variant", ["125m", "350m", "1.3b", "2.7b", "6.7b", "tiny"])
def test_opt_params_equal_transformers(variant):
    from transformers import OPTConfig, OPTForCausalLM

    a = opt.ARCH[variant]
    config = OPTConfig(
        vocab_size=a["vocab"], hidden_size=a["hidden"], num_hidden_layers=a["layers"], num_attention_heads=a["heads"],
        ffn_dim=a["ffn"], word_embed_proj_dim=a["embed"], max_position_embeddings=a["positions"],
        do_layer_norm_before=bool(a["pre_norm"]),
    )
    with torch.device("meta"):
        model = OPTForCausalLM(config)
    assert _numel(model) == opt.num_params(opt.OPTOptions(variant=variant))
    assert model.get_input_embeddings().embedding_dim == opt.dims(opt.OPTOptions(variant=variant)).embed_width


@pytest.mark.parametrize("variant", ["small", "base", "large", "xl", "xxl", "tiny"])
def test_flan_t5_params_equal_transformers(variant):
    from transformers import T5Config, T5ForConditionalGeneration

    a = flan_t5.ARCH[variant]
    config = T5Config(
        vocab_size=a["vocab"], d_model=a["d_model"], d_ff=a["d_ff"], d_kv=a["d_kv"], num_heads=a["heads"],
        num_layers=a["layers"], num_decoder_layers=a["layers"], feed_forward_proj="gated-gelu",
    )
    with torch.device("meta"):
        model = T5ForConditionalGeneration(config)
    # FlanT5 checkpoints hold an untied lm_head, and encoder/decoder embed_tokens alias `shared`;
    # count every state-dict tensor, then drop the two aliases (transformers may tie lm_head in memory).
    stored = sum(t.numel() for t in model.state_dict().values()) - 2 * a["vocab"] * a["d_model"]
    assert stored == flan_t5.num_params(flan_t5.FlanT5Options(variant=variant))


@pytest.mark.parametrize("image_size", [224, 336])
def test_clip_vit_l_params_equal_open_clip(image_size):
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    a = clip_vit_l.ARCH["l"]
    opts = clip_vit_l.ClipVitLOptions(image_size=image_size)  # layer -2: 23 of 24 blocks are built
    cfg = CLIPVisionCfg(layers=clip_vit_l.kept_blocks(opts), width=a["width"], patch_size=a["patch"], image_size=image_size)
    with torch.device("meta"):
        tower = _build_vision_tower(a["embed_dim"], cfg)
    head = 2 * a["width"] + a["width"] * a["embed_dim"]  # ln_post and proj: not built, never run
    assert _numel(tower) - head == clip_vit_l.num_params(opts)
