"""A resume with a changed `optimizer:` section trains with the new settings: the run reports the
change, the schedule takes the new peak lr, and weight decay, betas, eps and lr_scales follow the
config too (torch's optimizer load_state_dict alone would put the checkpoint's back, silently);
lr_scales that regroup the parameters are refused (torch pairs the groups by position)."""

from __future__ import annotations

import pytest

from tests.test_trainer_samples import config, write_caption_data
from vlbridge.errors import VLBridgeError
from vlbridge.train import trainer as trainer_module

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_resume_trains_with_the_changed_weight_decay_betas_and_eps(tmp_path, monkeypatch, capsys):
    data = write_caption_data(tmp_path / "data", images=4)
    out = tmp_path / "run"
    trainer_module.run(config(data, out, steps=3, save_every=2, optimizer={"lr": 1e-3, "weight_decay": 0.05}), quiet=True)
    seen: list[list[tuple]] = []
    step = trainer_module.Trainer.optimizer_step

    def recording(self):
        seen.append([(g["weight_decay"], tuple(g["betas"]), g["eps"]) for g in self.optimizer.param_groups])
        step(self)

    monkeypatch.setattr(trainer_module.Trainer, "optimizer_step", recording)
    changed = {"lr": 1e-3, "weight_decay": 0.3, "betas": [0.8, 0.95], "eps": 1e-6}
    trainer_module.run(config(data, out, steps=5, save_every=2, optimizer=changed), resume=True, quiet=True)
    assert "changed settings: optimizer" in capsys.readouterr().err
    assert seen == [[(0.3, (0.8, 0.95), 1e-6), (0.0, (0.8, 0.95), 1e-6)]] * 2  # steps 4 and 5, decay and no_decay groups


def test_a_resume_whose_lr_scales_regroup_the_parameters_is_refused(tmp_path):
    """text_proj and vision_proj have equal shapes: torch would hand one's Adam moments to the other, silently."""
    data = write_caption_data(tmp_path / "data", images=4)
    out = tmp_path / "run"
    trainer_module.run(config(data, out, steps=3, save_every=2, optimizer={"lr": 1e-3, "lr_scales": {"connector.text_proj": 0.5}}),
                       quiet=True)
    moved = {"lr": 1e-3, "lr_scales": {"connector.vision_proj": 0.5}}
    with pytest.raises(VLBridgeError, match=r"parameter groups .*connector\.text_proj\.decay.* differ .*connector\.vision_proj\.decay"):
        trainer_module.run(config(data, out, steps=5, save_every=2, optimizer=moved), resume=True, quiet=True)
