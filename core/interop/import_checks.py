"""An imported checkpoint's assembly is checked before the checkpoint is written: a foreign config
with a setting no assembly accepts (num_query_tokens: -5) is refused at import, naming the source,
rather than written as a checkpoint that only fails when loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlbridge.assemblies.assembly import load_assembly
from vlbridge.errors import AssemblyError, VLBridgeError


def check_imported_assembly(assembly: dict[str, Any], src: Path, what: str) -> None:
    """Refuse `assembly` (built from the `what` directory `src`) unless it validates."""
    try:
        load_assembly(assembly)
    except AssemblyError as exc:
        raise VLBridgeError(f"{src} ({what}) holds settings no vlbridge assembly accepts, so it cannot be imported: "
                            + "; ".join(exc.problems)) from None
