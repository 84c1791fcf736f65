"""The Plan: what a validated assembly will build, in plain data (picklable, JSON-able, torch-free)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from vlbridge.plugin.specs import LLMDims, Preprocess, SizeEstimate, TokenShape


@dataclass(frozen=True)
class ComponentPlan:
    kind: str
    name: str
    use: str
    plugin: str
    distribution: str
    factory: str
    options: dict[str, Any]
    params: int | None  # None when the plugin declares no analytic count
    params_exact: bool = True  # False: `params` is a generic formula's estimate (or unknown)
    params_note: str = ""  # what the estimate guesses, or why the size is unknown

    def size_text(self) -> str:
        """'1.2M params (1,234,567)', '~1.2M params' for an estimate, or '? params' with the reason."""
        if self.params is None:
            return "? params" + (f", {self.params_note}" if self.params_note else "")
        return ("" if self.params_exact else "~") + count_text(self.params, exact=self.params_exact)


@dataclass(frozen=True)
class Plan:
    """Tokens and widths at each joint, and the parameter budget, before any weight is loaded."""

    name: str
    encoder: ComponentPlan
    connector: ComponentPlan
    llm: ComponentPlan | None  # None: an LLM-free (stage-1 / retrieval) assembly
    preprocess: Preprocess
    encoder_out: TokenShape
    connector_out: TokenShape | None  # what the LLM receives; None without an LLM
    llm_dims: LLMDims | None
    max_text_tokens: int
    stages: tuple[int, ...]
    trainable_params: dict[int, int] = field(default_factory=dict)  # stage -> connector parameters
    connector_activations: dict[int, int] = field(default_factory=dict)  # stage -> values a sample stores for backward (declared)
    warnings: tuple[str, ...] = ()

    @property
    def frozen_params_exact(self) -> bool:
        return self.encoder.params_exact and (self.llm is None or self.llm.params_exact)

    @property
    def frozen_params(self) -> int | None:
        llm_params = self.llm.params if self.llm is not None else 0
        if self.encoder.params is None or llm_params is None:
            return None
        return self.encoder.params + llm_params

    @property
    def total_tokens(self) -> int | None:
        return None if self.connector_out is None else self.connector_out.num_tokens + self.max_text_tokens

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["trainable_params"] = {str(k): v for k, v in self.trainable_params.items()}
        out["connector_activations"] = {str(k): v for k, v in self.connector_activations.items()}
        out["frozen_params"] = self.frozen_params
        out["frozen_params_exact"] = self.frozen_params_exact
        out["warnings"] = list(self.warnings)
        return out

    def describe(self) -> str:
        """A short human-readable summary of the joints and parameter counts."""
        p = self.preprocess
        lines = [
            f"assembly {self.name}",
            f"  image      {p.image_size} px{_crop(p)}, mean {p.mean}, std {p.std}, {p.interpolation}",
            f"  encoder    {self.encoder.use:<12} -> {self.encoder_out}   ({self.encoder.size_text()} frozen)",
        ]
        if self.llm is None or self.llm_dims is None or self.connector_out is None:
            lines.append(f"  connector  {self.connector.use:<12} (no LLM: stage 1, features and retrieval)")
        else:
            lines += [
                f"  connector  {self.connector.use:<12} -> {self.connector_out}",
                f"  llm        {self.llm.use:<12} embeds {self.llm_dims.embed_width} wide, "
                f"{'encoder-decoder' if self.llm_dims.encoder_decoder else 'decoder-only'}, context {self.llm_dims.context_length}"
                f"   ({self.llm.size_text()} frozen)",
                f"  tokens     {self.connector_out.num_tokens} visual + {self.max_text_tokens} text = {self.total_tokens}",
            ]
        for stage in self.stages:
            lines.append(f"  stage {stage}    {count_text(self.trainable_params.get(stage))} trainable")
        lines.extend(f"  warning    {w}" for w in self.warnings)
        return "\n".join(lines)


def _crop(p: Preprocess) -> str:
    """How the eval transform gets to S x S, when it is not a plain squash."""
    pad = "padded to a square, " if p.pad_to_square is not None else ""
    if p.resize_mode == "shortest":
        return f" ({pad}shorter side to {p.resize_size or p.image_size}, centre crop)"
    if p.resize_size not in (None, p.image_size):
        return f" ({pad}squashed to {p.resize_size}, centre crop)"
    return f" ({pad.removesuffix(', ')})" if pad else ""


def split_size(size: int | SizeEstimate | None) -> tuple[int | None, bool, str]:
    """(count, exact?, note) of what a num_params() returned."""
    if isinstance(size, SizeEstimate):
        return size.count, False, size.note
    return size, True, ""


def count_text(n: int | None, exact: bool = True) -> str:
    """A parameter count for people: '1.2M params (1,234,567)' ('?' when the size is not known);
    `exact=False` drops the digits in parentheses, for lines that already carry a byte size."""
    if n is None:
        return "? params"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit} params" + (f" ({n:,})" if exact else "")
    return f"{n} params"
