"""Fine-tuning recipes in the trainer: an unfrozen encoder (all of it, or its last block with layer
decay and gradient checkpointing), LoRA on the LLM, both together. Each run lowers the loss, trains
exactly what it should (every other tensor stays bit-identical), saves what `vlbridge.load` needs
to give the same logits, and resumes as an uninterrupted run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vlbridge
from tests.conftest import REPO
from tests.finetune_helpers import ENCODER_ALL, ENCODER_LAST, LORA, changed, is_lora, logits, run_trainer, stage2
from tests.test_trainer_samples import read_metrics, train_losses, write_caption_data
from vlbridge.finetune.encoder_tuning import layer_ids, unfreeze_encoder
from vlbridge.train.checkpointing import checkpoint_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_caption_data(tmp_path_factory.mktemp("data"))


def _falls(out: Path) -> None:
    losses = train_losses(out)
    assert losses[-1] < losses[0], losses


def test_unfrozen_encoder_trains_with_the_connector_and_the_llm_stays_untouched(tmp_path, data):
    trainer, before, _ = run_trainer(stage2(data, tmp_path / "out", ENCODER_ALL))
    model = trainer.model
    _falls(tmp_path / "out")
    moved = changed(model, before)
    assert not any(name.startswith("llm.") for name in moved)  # the LLM: bit-identical
    encoder = {name for name, _ in model.encoder.named_parameters()}
    assert {name.removeprefix("encoder.") for name in moved if name.startswith("encoder.")} == encoder  # every encoder tensor trained
    assert model.encoder.training and not model.llm.training  # the unfrozen encoder follows train mode, the LLM does not
    assert model.tuned.encoder_names == encoder and model.tuned.lora is None


def test_last_block_with_layer_decay_and_checkpointing(tmp_path, data):
    trainer, before, _ = run_trainer(stage2(data, tmp_path / "out", ENCODER_LAST))
    model = trainer.model
    _falls(tmp_path / "out")
    moved = {name for name in changed(model, before) if name.startswith("encoder.")}
    assert moved and all(name.startswith("encoder.blocks.1.") for name in moved)  # only the last of 2 blocks
    assert not any(p.requires_grad for n, p in model.encoder.named_parameters() if not n.startswith("blocks.1."))
    assert not model.encoder.training and model.encoder.blocks[1].training and not model.encoder.blocks[0].training
    assert "forward" in vars(model.encoder.blocks[1]) and "forward" not in vars(model.encoder.blocks[0])  # checkpointed
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    # block 1 is layer 2 of D = 2: lr x 0.5^(D + 1 - 2); its own peak is 2e-3 against optimizer.lr 1e-3
    assert groups["encoder.layer2.decay"]["lr_scale"] == pytest.approx(2.0 * 0.5)
    assert groups["decay"].get("lr_scale", 1.0) == 1.0
    metrics = read_metrics(tmp_path / "out")
    assert metrics[0]["lr"] == pytest.approx(1e-3)  # the logged lr stays the base schedule's


def test_layer_ids_follow_the_blocks():
    model = vlbridge.build("tiny-qformer-opt", stage=1)
    ids = layer_ids(model.encoder, model.encoder.finetune_blocks())
    assert ids["cls_token"] == ids["pos_embed"] == ids["patch_embed.proj.weight"] == 0
    assert ids["blocks.0.attn.qkv.weight"] == 1 and ids["blocks.1.mlp.fc2.bias"] == 2
    unfrozen = unfreeze_encoder(model.encoder, "all", who="eva-vit-g")
    assert unfrozen.lr_scale("pos_embed", 0.5) == pytest.approx(0.5 ** 3) and unfrozen.lr_scale("blocks.1.norm1.weight", 0.5) == 0.5


def test_checkpointing_gives_the_same_gradients():
    from vlbridge.finetune.encoder_tuning import disable_grad_checkpointing, enable_grad_checkpointing

    model = vlbridge.build("tiny-qformer-opt", stage=1).train()
    unfrozen = unfreeze_encoder(model.encoder, "all", who="eva-vit-g")
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))

    def grads() -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model.encode_images(pixels).pow(2).mean().backward()
        return [p.grad.clone() for p in model.encoder.parameters()]

    plain = grads()
    enable_grad_checkpointing(unfrozen.blocks)
    recomputed = grads()
    disable_grad_checkpointing(unfrozen.blocks)
    for a, b in zip(plain, recomputed):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_lora_trains_adapters_only(tmp_path, data):
    trainer, before, _ = run_trainer(stage2(data, tmp_path / "out", LORA))
    model = trainer.model
    _falls(tmp_path / "out")
    moved = changed(model, before)
    llm_moved = {name for name in moved if name.startswith("llm.")}
    assert llm_moved and all(is_lora(name) for name in llm_moved)  # base weights untouched
    assert not any(name.startswith("encoder.") for name in moved)
    assert any(name.endswith("q_proj.lora_B.default.weight") for name in llm_moved)  # OPT's defaults: q_proj, v_proj
    dropouts = [m for n, m in model.llm.model.named_modules() if n.endswith("lora_dropout.default")]
    assert dropouts and all(m.training for m in dropouts) and not model.llm.model.training
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert groups["lora.decay"]["lr_scale"] == pytest.approx(3.0)


def test_both_recipes_save_and_load_to_the_same_logits(tmp_path, data):
    out = tmp_path / "out"
    trainer, before, result = run_trainer(stage2(data, out, {**ENCODER_LAST, **LORA}))
    model = trainer.model.eval()
    _falls(out)
    step = result.checkpoint
    encoder_file, lora_file = load_file(step / "encoder.safetensors"), load_file(step / "lora.safetensors")
    assert set(encoder_file) == {n for n, p in model.encoder.named_parameters() if p.requires_grad}  # only the trained ones
    assert encoder_file and all(name.startswith("blocks.1.") for name in encoder_file)
    assert all(".lora_" in name for name in lora_file) and len(lora_file) == 8  # 2 layers x (q, v) x (A, B)
    loaded = vlbridge.load(step)
    assert loaded.tuned.lora == model.tuned.lora and loaded.tuned.encoder_names == model.tuned.encoder_names
    assert torch.equal(logits(loaded), logits(model))
    # a checkpoint folder as weights (--weights DIR) brings the fine-tuned parts, as load does; the
    # connector file alone computes otherwise: the fine-tuned parts matter
    assert torch.equal(logits(vlbridge.build("tiny-qformer-opt", stage=2, weights=step)), logits(model))
    connector_only = vlbridge.build("tiny-qformer-opt", stage=2, weights=step / "connector.safetensors")
    assert not torch.allclose(logits(connector_only), logits(model))
    # a saved model (model.save) holds the same parts
    model.save(tmp_path / "saved")
    assert torch.equal(logits(vlbridge.load(tmp_path / "saved")), logits(model))


def test_resume_continues_exactly(tmp_path, data):
    recipe = {**ENCODER_LAST, **LORA}
    flat = {"schedule": {"warmup_steps": 0, "min_lr": 1e-3}}  # a constant lr: 3 + 3 steps run the same curve as 6
    _, _, whole = run_trainer(stage2(data, tmp_path / "whole", recipe, **flat))
    run_trainer(stage2(data, tmp_path / "parts", recipe, steps=3, **flat))
    _, _, resumed = run_trainer(stage2(data, tmp_path / "parts", recipe, **flat), resume=True)
    assert resumed.step == whole.step == 6
    for name in ("connector.safetensors", "encoder.safetensors", "lora.safetensors"):
        a, b = load_file(checkpoint_dir(tmp_path / "whole", 6) / name), load_file(checkpoint_dir(tmp_path / "parts", 6) / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert train_losses(tmp_path / "whole") == train_losses(tmp_path / "parts")


def test_resume_refuses_another_recipe(tmp_path, data):
    run_trainer(stage2(data, tmp_path / "out", LORA, steps=2))
    with pytest.raises(vlbridge.VLBridgeError, match=r"other finetune settings than this config \(finetune\.lora"):
        run_trainer(stage2(data, tmp_path / "out", {"lora": {"r": 2}}, steps=4), resume=True)


def test_init_from_brings_the_fine_tuned_parts(tmp_path, data):
    """Stage 2 from a stage-1 run that trained the encoder: the trained encoder comes along (frozen
    now), and the next checkpoint still carries it."""
    _, _, first = run_trainer(stage2(data, tmp_path / "s1", ENCODER_ALL, stage=1, steps=2))
    trainer, before, second = run_trainer(stage2(data, tmp_path / "s2", {}, steps=2, init_from=str(tmp_path / "s1")))
    model = trainer.model
    trained = load_file(first.checkpoint / "encoder.safetensors")
    assert all(torch.equal(model.encoder.get_parameter(n), t) for n, t in trained.items())
    assert not model.encoder_trains and not any(n.startswith("encoder.") for n in changed(model, before))
    assert set(load_file(second.checkpoint / "encoder.safetensors")) == set(trained)


@pytest.mark.parametrize("assembly, finetune", [
    ("tiny-mlp-opt", {"encoder": {"unfreeze": 1, "layer_decay": 0.8, "grad_checkpointing": True}, **LORA}),  # a CLIP-style encoder
    ("tiny-qformer-flan-t5", LORA),  # T5: peft's defaults q, v
])
def test_other_families_round_trip(tmp_path, data, assembly, finetune):
    trainer, before, result = run_trainer(stage2(data, tmp_path / "out", finetune, assembly=assembly, steps=3))
    model = trainer.model.eval()
    moved = changed(model, before)
    assert any(is_lora(name) for name in moved) and not any(n.startswith("llm.") and not is_lora(n) for n in moved)
    if assembly == "tiny-qformer-flan-t5":
        assert any(name.endswith(".SelfAttention.q.lora_A.default.weight") for name in moved)
    else:
        blocks = model.encoder.finetune_blocks()
        trained = {n for n, p in model.encoder.named_parameters() if p.requires_grad}
        assert trained == {n for n, p in model.encoder.named_parameters() if any(p is q for q in blocks[-1].parameters())}
    assert torch.equal(logits(vlbridge.load(result.checkpoint)), logits(model))


@pytest.mark.parametrize("encoder, blocks", [
    ({"use": "eva-vit-g", "options": {"variant": "tiny"}}, 2),
    ({"use": "clip-vit-l", "options": {"variant": "tiny", "layer": -1}}, 2),
    ({"use": "hf-vision", "options": {"variant": "tiny"}}, 1),  # layer -2 of 2: one block runs
    ({"use": "open-clip", "options": {"arch": "tiny"}}, 1),
])
def test_builtin_encoders_list_their_blocks(encoder, blocks):
    """Each built-in encoder names the blocks that run; the last one alone trains, checkpointed, and gets gradients."""
    from vlbridge.finetune.encoder_tuning import enable_grad_checkpointing, encoder_blocks

    model = vlbridge.build({"name": "x", "encoder": encoder, "connector": {"use": "qformer", "options": {"variant": "tiny"}}}, stage=1)
    listed = encoder_blocks(model.encoder)
    assert len(listed) == blocks
    unfrozen = unfreeze_encoder(model.encoder, 1, who=encoder["use"], need_blocks=True)
    enable_grad_checkpointing(unfrozen.blocks)
    model.train()
    assert listed[-1].training and not model.encoder.training
    size = model.plan.preprocess.image_size
    model.encode_images(torch.randn(2, 3, size, size)).pow(2).mean().backward()
    trained = {id(p) for p in listed[-1].parameters()}
    assert all((p.grad is not None) == (id(p) in trained) for p in model.encoder.parameters())
    with pytest.raises(vlbridge.VLBridgeError, match=f"unfreeze: {blocks + 1} blocks asked for, but {encoder['use']} runs {blocks}"):
        unfreeze_encoder(model.encoder, blocks + 1, who=encoder["use"])


def test_an_encoder_without_blocks_unfreezes_whole_only():
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

    with pytest.raises(vlbridge.VLBridgeError, match=r"does not list its blocks, so unfreeze: 2 cannot be applied.*finetune_blocks\(\)") as err:
        unfreeze_encoder(Plain(), 2, who="plain")
    guide = re.search(r"\((docs/[\w.-]+\.md), '([^']+)'\)", str(err.value))  # it named vlbridge/encoder_tuning.py, which no one has
    assert guide and f"## {guide[2]}" in (REPO / guide[1]).read_text(encoding="utf-8"), str(err.value)
    with pytest.raises(vlbridge.VLBridgeError, match="layer_decay / grad_checkpointing cannot be applied"):
        unfreeze_encoder(Plain(), "all", who="plain", need_blocks=True)
    assert unfreeze_encoder(Plain(), "all", who="plain").names == ("proj.weight", "proj.bias")


def test_half_precision_parts_train_in_fp32_and_load_back(tmp_path, data):
    """A bf16 encoder is cast to fp32 when unfrozen (checkpoint.json records it); the adapters on a bf16
    LLM are fp32; `vlbridge.load` rebuilds both as trained."""
    assembly = {"name": "bf16", "encoder": {"use": "eva-vit-g", "options": {"variant": "tiny", "dtype": "bf16"}},
                "connector": {"use": "qformer", "options": {"variant": "tiny", "num_query_tokens": 8}},
                "llm": {"use": "opt", "options": {"variant": "tiny", "dtype": "bf16"}}}
    trainer, before, result = run_trainer(stage2(data, tmp_path / "out", {"encoder": {"unfreeze": 1}, "lora": {"r": 4}},
                                                 assembly=assembly, precision="bf16", steps=3))
    model = trainer.model.eval()
    assert {p.dtype for p in model.encoder.parameters()} == {torch.float32}
    lora = {n: p for n, p in model.llm.model.named_parameters() if is_lora(n)}
    assert {p.dtype for p in lora.values()} == {torch.float32}
    assert {p.dtype for n, p in model.llm.model.named_parameters() if n not in lora} == {torch.bfloat16}
    assert any(n.startswith("llm.") for n in changed(model, before))
    loaded = vlbridge.load(result.checkpoint)
    assert {p.dtype for p in loaded.encoder.parameters()} == {torch.float32}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(logits(loaded), logits(model))


def test_lora_on_the_input_embeddings_trains_and_loads(tmp_path, data):
    """peft wraps an adapted nn.Embedding in a layer without `embedding_dim`: the LLM reads its width
    from the base layer (it was an internal AttributeError at the first step)."""
    finetune = {"lora": {**LORA["lora"], "target_modules": ["embed_tokens", "q_proj"]}}
    trainer, before, result = run_trainer(stage2(data, tmp_path / "out", finetune, steps=3))
    model = trainer.model.eval()
    moved = changed(model, before)
    assert any(".embed_tokens.lora_embedding_" in name for name in moved)
    assert not any(n.startswith("llm.") and not is_lora(n) for n in moved)
    assert torch.equal(logits(vlbridge.load(result.checkpoint)), logits(model))


def test_a_plain_encoder_trains_only_its_unfrozen_blocks_in_train_mode():
    """A plugin encoder that is a plain nn.Module (not a FrozenPart) with `unfreeze: 1` was put in train
    mode whole when the model trained, so its frozen block's dropout acted on what the trained block
    reads; a FrozenPart keeps such blocks in eval mode (train_along), and so does the plain module now."""
    from tests import fake_plugins as fake
    from vlbridge import EncoderSpec, Preprocess, TokenShape
    from vlbridge.plugintest.check import using_registry

    spec = EncoderSpec(name="blocky", factory="tests.fake_plugins:build_block_encoder", output=lambda o: TokenShape(16, 8),
                       preprocess=lambda o: Preprocess(28, (0.5,) * 3, (0.5,) * 3))
    with using_registry(fake.registry(blocky=fake.plugin("blocky", encoders=[spec]))):
        model = vlbridge.build(fake.assembly(encoder="blocky", connector="linear"))
        model.train()
        assert not any(m.training for m in model.encoder.modules())  # nothing trains: all of it in eval mode
        unfreeze_encoder(model.encoder, 1, who="blocky")
        model.train()
        frozen, trained = model.encoder.blocks
        assert trained.training and trained[1].training  # the unfrozen block's dropout acts, as in training
        assert not frozen.training and not frozen[1].training and not model.encoder.patch.training
        tokens = torch.randn(1, 16, 8)
        assert torch.equal(frozen(tokens), frozen(tokens))
        model.eval()
        assert not any(m.training for m in model.encoder.modules())
        unfreeze_encoder(model.encoder, "all", who="blocky")
        model.train()
        assert all(m.training for m in model.encoder.modules())


def test_lora_dropout_acts_in_training_on_a_plain_llm_module():
    """A plain LLM module (no FrozenPart) holding LoRA adapters is mixed (frozen base, trained adapters),
    so the rule that keeps its frozen parts in eval mode left the adapters' parameterless dropout there
    too; a FrozenPart LLM has them follow the mode (train_along), and so does the plain one now."""
    from tests import fake_plugins as fake
    from vlbridge.finetune.lora import lora_dropouts
    from vlbridge.plugintest.check import using_registry
    from vlbridge.train.finetune import apply_finetune
    from vlbridge.train.finetune_config import FinetuneConfig

    spec = fake.tiny_opt_spec("build_plain_llm_with_model", "plainopt")
    with using_registry(fake.registry(plainopt=fake.plugin("plainopt", llms=[spec]))):
        model = vlbridge.build(fake.assembly(llm="plainopt", connector="linear"), stage=2)
        apply_finetune(model, FinetuneConfig(lora={"r": 2, "dropout": 0.1}), 1e-4)
        dropouts = lora_dropouts(model.llm.model)
        model.train()
        assert dropouts and all(m.training for m in dropouts)
        assert not model.llm.model.model.decoder.layers[0].self_attn.q_proj.base_layer.training
        model.eval()
        assert not any(m.training for m in dropouts)
