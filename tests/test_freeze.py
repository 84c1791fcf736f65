"""FrozenPart: frozen parts keep their gradients off and stay in eval mode until unfrozen."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from vlbridge.errors import VLBridgeError  # noqa: E402
from vlbridge.parts.freeze import FrozenPart, torch_dtype  # noqa: E402


class Part(FrozenPart):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.linear(x))


class Parent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.part = Part().freeze()
        self.head = nn.Linear(4, 2)


def test_freeze_turns_off_gradients_and_sets_eval():
    part = Part()
    assert part.training and all(p.requires_grad for p in part.parameters())
    assert part.freeze() is part
    assert part.frozen and not part.training and not part.drop.training
    assert not any(p.requires_grad for p in part.parameters())


def test_train_cannot_undo_freeze_even_through_a_parent():
    model = Parent()
    model.train()
    assert model.training and model.head.training
    assert not model.part.training and not model.part.drop.training
    x = torch.randn(3, 4)
    assert torch.equal(model.part(x), model.part(x))  # dropout stays off
    model.part.train(True)
    assert not model.part.training


def test_requires_grad_refused_while_frozen():
    part = Part().freeze()
    with pytest.raises(VLBridgeError, match="call unfreeze"):
        part.requires_grad_(True)
    part.requires_grad_(False)  # harmless
    assert not any(p.requires_grad for p in part.parameters())


def test_unfreeze_allows_training_again():
    part = Part().freeze().unfreeze()
    assert not part.frozen and all(p.requires_grad for p in part.parameters())
    assert not part.training  # the mode is left as it was
    part.train()
    assert part.training and part.drop.training
    part(torch.randn(2, 4)).sum().backward()
    assert part.linear.weight.grad is not None


def test_torch_dtype_names():
    assert torch_dtype("fp32") is torch.float32
    assert torch_dtype("fp16") is torch.float16
    assert torch_dtype("bf16") is torch.bfloat16
    with pytest.raises(VLBridgeError, match=r"unknown precision 'fp8'; use one of \['bf16', 'fp16', 'fp32'\]"):
        torch_dtype("fp8")


def test_dtype_follows_parameters():
    part = Part().to(torch.bfloat16)
    assert part.dtype is torch.bfloat16
