"""One device-resolution rule for every command and the trainer: `--device` and a training config's
`device:` are checked here, so a CUDA request on a machine without CUDA is the same clear user
error everywhere (not a torch RuntimeError deep inside `model.to`)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from vlbridge.errors import VLBridgeError

if TYPE_CHECKING:  # torch is imported on use: the syntax check stays torch-free
    import torch

VALID = "auto, cpu, cuda, cuda:N or mps"
_SYNTAX = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_SUGGEST = {"gpu": "cuda", "cuda0": "cuda:0", "nvidia": "cuda", "metal": "mps", "cpu0": "cpu"}


class DeviceError(VLBridgeError):
    """A device that is misspelled or that this machine does not have."""


def device_syntax_problem(setting: str) -> str | None:
    """Why `setting` is not a device name vlbridge accepts (None when it is one); no torch needed."""
    if _SYNTAX.match(setting):
        return None
    lowered = setting.strip().lower()
    hint = _SUGGEST.get(lowered) or (lowered if _SYNTAX.match(lowered) else None)
    if lowered.startswith("gpu:") and lowered[4:].isdigit():
        hint = f"cuda:{lowered[4:]}"
    advice = f"did you mean {hint!r}? " if hint else ""
    return f"{setting!r} is not a device; {advice}valid devices: {VALID}"


def resolve_device(setting: str, *, local_rank: int = 0, option: str = "--device") -> "torch.device":
    """The torch.device `setting` names, checked against this machine.

    auto -> cuda:LOCAL_RANK when CUDA is available, else cpu; cuda -> cuda:LOCAL_RANK (torchrun gives
    each process its own). `option` names where the setting came from, for the message.
    """
    problem = device_syntax_problem(setting)
    if problem:
        raise DeviceError(f"{option}: {problem}")
    import torch

    if setting == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if setting.startswith("cuda"):
        return _cuda(torch, setting, local_rank, option)
    if setting == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"{option}: 'mps' asked for, but torch sees no Apple GPU (MPS) here; use --device cpu")
    return torch.device(setting)


def _cuda(torch, setting: str, local_rank: int, option: str) -> "torch.device":
    if not torch.cuda.is_available():
        built = "built without CUDA" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}, but no GPU or driver is visible"
        raise DeviceError(f"{option}: {setting!r} asked for, but torch sees no CUDA device (torch {torch.__version__} is {built}); "
                          "use cpu (or auto, which picks CUDA when there is one)")
    index = int(setting.partition(":")[2]) if ":" in setting else local_rank
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(f"{option}: {setting!r} asked for, but torch sees {count} CUDA device(s): cuda:0 to cuda:{count - 1}")
    return torch.device("cuda", index)
