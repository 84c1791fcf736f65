"""One device rule (vlbridge.parts.devices) for every command that takes --device and for the trainer:
a CUDA request without CUDA, or a misspelt device, is a user error (exit 2) everywhere."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from vlbridge.cli.main import main
from vlbridge.parts.devices import DeviceError, resolve_device
from vlbridge.train.config import TrainConfigError, check_config, read_config

from tests.test_trainer_samples import config, write_caption_data


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "red.png"
    Image.new("RGB", (16, 16), (200, 0, 0)).save(path)
    return str(path)


def commands(image: str, tmp: str) -> dict[str, list[str]]:
    """Every command that takes --device, with arguments that are otherwise valid."""
    data = f"{tmp}/data.yaml"
    with open(data, "w", encoding="utf-8") as handle:
        json.dump({"format": "jsonl", "paths": [f"{tmp}/none.jsonl"]}, handle)
    return {
        "caption": ["caption", "-a", "tiny-qformer-opt", image],
        "ask": ["ask", "-a", "tiny-qformer-opt", "-q", "what?", image],
        "retrieve": ["retrieve", "-a", "tiny-qformer-opt", "-t", "a cat", image],
        "eval": ["eval", "-a", "tiny-qformer-opt", "--task", "caption", "--data", f"{tmp}/captions.json"],
        "cache-features": ["cache-features", "-a", "tiny-qformer-opt", "--data", data, "--out", f"{tmp}/cache"],
    }


@pytest.mark.parametrize("command", ["caption", "ask", "retrieve", "eval", "cache-features"])
@pytest.mark.parametrize("device, expected", [("cuda", "torch sees no CUDA device"), ("gpu", "did you mean 'cuda'")])
def test_every_device_command_refuses_cuda_without_cuda(capsys, tmp_path, image, no_cuda, command, device, expected):
    code = main([*commands(image, str(tmp_path))[command], "--device", device])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "internal error" not in err and expected in err and "--device" in err


def test_a_training_config_gets_the_same_rule(tmp_path, no_cuda):
    data = write_caption_data(tmp_path, images=2)
    for device, expected in (("cuda", "device: 'cuda' asked for, but torch sees no CUDA device"), ("gpu", "did you mean 'cuda'")):
        values, label = read_config(config(data, tmp_path / "out", device=device))
        with pytest.raises(TrainConfigError, match=expected):
            check_config(values, label)


def test_resolve_device_names_what_exists(monkeypatch, no_cuda):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match=r"'GPU:1' is not a device; did you mean 'cuda:1'\?"):
        resolve_device("GPU:1")
    with pytest.raises(DeviceError, match="valid devices: auto, cpu, cuda, cuda:N or mps"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda", local_rank=0) == torch.device("cuda", 0)
    assert resolve_device("auto") == torch.device("cuda", 0)
    with pytest.raises(DeviceError, match=r"'cuda:3' asked for, but torch sees 1 CUDA device\(s\): cuda:0 to cuda:0"):
        resolve_device("cuda:3")
