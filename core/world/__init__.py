"""A small world that needs no download: rendered scenes of coloured shapes with captions and VQA
questions (`generate_world`), and the frozen "pretrained" parts trained on it (`train_parts`,
shipped under `vlbridge/plugins/world/`). Importing this package imports neither torch nor PIL.
"""

from __future__ import annotations

from typing import Any

from vlbridge.world.config import DEFAULT_HELD_OUT, SPLITS, WorldConfig

_LAZY: dict[str, str] = {
    "generate_world": "vlbridge.world.generate",
    "make_image": "vlbridge.world.generate",
    "IMAGE_PATTERN": "vlbridge.world.generate",
    "render_scene": "vlbridge.world.render",
    "Scene": "vlbridge.world.scene",
    "WorldObject": "vlbridge.world.scene",
    "part_dir": "vlbridge.world.assets",
    "read_parts_manifest": "vlbridge.world.assets",
}

__all__ = ["DEFAULT_HELD_OUT", "SPLITS", "WorldConfig", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vlbridge.world' has no attribute {name!r}")
