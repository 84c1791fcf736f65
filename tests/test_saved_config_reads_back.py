"""The train.yaml a run writes (output_dir/train.yaml and each checkpoint's, every default filled
in) is a valid config again: `vlbridge train RUN/train.yaml --resume` is the natural way to continue
a run, and it was refused for `parallel: {shard: null, reshard_after_forward: true}`, the defaults
the dump writes out, as fsdp settings under ddp."""

from __future__ import annotations

import pytest

from tests.test_trainer_samples import config, write_caption_data, write_config
from vlbridge.train.config import TrainConfigError, check_config, dump_config, read_config


@pytest.mark.parametrize("stage, assembly", [(1, "tiny-qformer-opt"), (2, "tiny-mlp-opt")])
def test_a_dumped_config_passes_validation_again(tmp_path, stage, assembly):
    data = write_caption_data(tmp_path / "data", images=4)
    first, label = read_config(config(data, tmp_path / "out", stage=stage, assembly=assembly))
    check_config(first, label)
    saved = tmp_path / "train.yaml"
    saved.write_text(dump_config(first), encoding="utf-8")
    again, label = read_config(saved)
    check_config(again, label)
    assert again == first


def test_fsdp_settings_other_than_the_defaults_under_ddp_are_still_refused(tmp_path):
    data = write_caption_data(tmp_path / "data", images=4)
    path = write_config(tmp_path / "t.yaml", config(data, tmp_path / "out", parallel={"shard": None, "reshard_after_forward": False}))
    with pytest.raises(TrainConfigError, match="parallel.reshard_after_forward: only strategy: fsdp"):
        check_config(*read_config(path))
