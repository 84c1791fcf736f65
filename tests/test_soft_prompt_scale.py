"""`soft_prompt_norm: llm` (stage-2 objective option): before a fresh run's first step the connector's
output layer is scaled so the soft prompt starts at the frozen LLM's own embedding norm; a resumed
run keeps its checkpoint's weights; a connector whose output is not a Linear's is refused by name."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import vlbridge.train
from tests.test_trainer_samples import config, write_caption_data
from vlbridge.errors import VLBridgeError
from vlbridge.train.objectives import Stage2Objective
from vlbridge.train.soft_prompt_scale import output_linear

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_caption_data(tmp_path_factory.mktemp("data"))


def stage2(data: Path, out: Path, assembly: str, norm: str, **overrides):
    return config(data, out, **{"assembly": assembly, "stage": 2, "objective": {"soft_prompt_norm": norm},
                               "schedule": {"warmup_steps": 0}, **overrides})


class Probe(Stage2Objective):
    """The stage-2 objective, recording what its set-up did: the soft prompt's norm right after it on
    the same batch, and the LLM's embedding norm for that batch's text, measured here independently."""

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.seen: list[tuple[float, float]] = []

    @property
    def starts(self) -> bool:
        return True  # measure with either setting

    def start(self, model, batch):
        line = super().start(model, batch)
        with torch.no_grad():
            image_embeds, inputs, targets = self.parts(model, batch)
            visual = model.visual_tokens(image_embeds=image_embeds, instructions=inputs)
            texts = [f"{a} {b}".strip() for a, b in zip(inputs, targets)]
            ids = torch.tensor([i for t in texts for i in model.llm.tokenizer(t, add_special_tokens=False)["input_ids"]])
            self.seen.append((visual.norm(dim=-1).mean().item(), model.llm.embed_tokens(ids).norm(dim=-1).mean().item()))
        return line


@pytest.mark.parametrize("assembly", ["tiny-qformer-opt", "tiny-mlp-opt", "tiny-qformer-flan-t5"])
def test_the_soft_prompt_starts_at_the_llms_embedding_norm(tmp_path, data, assembly, capsys):
    scaled, default = Probe(soft_prompt_norm="llm"), Probe(soft_prompt_norm="init")
    vlbridge.train.run(stage2(data, tmp_path / "a", assembly, "llm", steps=1), objective=scaled)
    assert "soft prompt scaled to the LLM's embedding norm" in capsys.readouterr().err
    vlbridge.train.run(stage2(data, tmp_path / "b", assembly, "init", steps=1), objective=default)
    (after, target), (init, same_target) = scaled.seen[0], default.seen[0]
    assert after == pytest.approx(target, rel=1e-4) and target == pytest.approx(same_target, rel=1e-6)
    assert abs(init - target) > 0.05 * target  # the default init is elsewhere: the option did something


def test_vocabulary_scales_to_the_mean_over_the_llms_vocabulary(tmp_path, data):
    """`vocabulary`: the target is the mean norm of every token's embedding, read here off the table."""
    probe = Probe(soft_prompt_norm="vocabulary")
    seen: list[float] = []
    original = Probe.start

    def start(self, model, batch):
        line = original(self, model, batch)
        table = model.llm.model.get_input_embeddings().weight[: len(model.llm.tokenizer)]
        seen.append(table.float().norm(dim=-1).mean().item())
        return line

    probe.start = start.__get__(probe)
    vlbridge.train.run(stage2(data, tmp_path / "v", "tiny-mlp-opt", "vocabulary", steps=1), objective=probe)
    (after, text_target), vocabulary = probe.seen[0], seen[0]
    assert after == pytest.approx(vocabulary, rel=1e-4) and abs(vocabulary - text_target) > 1e-3


def test_a_resumed_run_is_not_scaled_again(tmp_path, data):
    """A run stopped after its step-2 checkpoint and resumed ends with the uninterrupted run's weights,
    and its set-up ran once, at the start."""
    whole = vlbridge.train.run(stage2(data, tmp_path / "whole", "tiny-mlp-opt", "llm", steps=4, save_every=2))
    out = tmp_path / "cut"
    shutil.copytree(tmp_path / "whole", out)
    shutil.rmtree(out / "checkpoints" / "step-4")
    (out / "checkpoints" / "latest").write_text("step-2\n")
    probe = Probe(soft_prompt_norm="llm")
    resumed = vlbridge.train.run(stage2(data, out, "tiny-mlp-opt", "llm", steps=4, save_every=2), resume=True, objective=probe)
    assert resumed.step == 4 and probe.seen == []
    a = load_file(str(Path(whole.checkpoint) / "connector.safetensors"))
    b = load_file(str(Path(resumed.checkpoint) / "connector.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Normed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj, self.norm = nn.Linear(4, 4), nn.LayerNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


def test_a_connector_whose_output_is_not_a_linears_is_refused():
    connector = Normed()
    with pytest.raises(VLBridgeError, match="Normed's output is not the output of one of its torch.nn.Linear"):
        output_linear(connector, lambda: connector(torch.randn(2, 4)))
    plain = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 3))
    name, layer, out = output_linear(plain, lambda: plain(torch.randn(2, 4)))
    assert name == "2" and layer is plain[2] and out.shape == (2, 3)


def test_an_unknown_setting_is_a_config_error(tmp_path, data):
    with pytest.raises(VLBridgeError, match="soft_prompt_norm"):
        vlbridge.train.run(stage2(data, tmp_path / "x", "tiny-mlp-opt", "llm-ish", steps=1))
