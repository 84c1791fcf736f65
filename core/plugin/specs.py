"""Torch-free declarations of components: what a plugin returns from its registration hooks.

A spec says how to build a part (a lazily imported "module:attr" factory), which options it takes
(a pydantic model, unknown keys rejected, every field defaulted) and, through pure functions of the
options, the shapes it produces. Validation runs these functions; no weight and no torch is needed.
"""

from __future__ import annotations

import importlib
import numbers
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal

from pydantic import ConfigDict

from vlbridge.errors import PluginError
from vlbridge.files.config_fields import StrictNumbers

if TYPE_CHECKING:
    from vlbridge.plugin.sources import WeightSource

Kind = Literal["encoder", "llm", "connector"]
KINDS: tuple[Kind, ...] = ("encoder", "connector", "llm")
_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


class Options(StrictNumbers):
    """Base of every component's options: typos are errors, values are immutable once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


@dataclass(frozen=True)
class TokenShape:
    """A sequence of feature vectors: what flows across a joint of the assembly."""

    num_tokens: int
    width: int

    def __str__(self) -> str:
        return f"{self.num_tokens} tokens x {self.width}"


@dataclass(frozen=True)
class Preprocess:
    """How images must be prepared for an encoder; travels with the encoder's weights.

    The eval transform resizes, then centre-crops to `image_size` x `image_size`. `resize_mode`
    'squash' resizes both sides to `resize_size` whatever the aspect ratio (BLIP-2's and SigLIP's
    way); 'shortest' resizes the shorter side to `resize_size`, keeping the aspect ratio (CLIP's and
    DINOv2's). `resize_size` None means `image_size`, so the default squashes to S x S, no crop.
    `crop_offset` places an odd margin's extra pixel: 'round' as torchvision's CenterCrop (open_clip,
    LAVIS), 'floor' as transformers' image processors (top = (H - S) // 2); they differ by one pixel.
    `pad_to_square`, an RGB colour (0..255 each), first pads the shorter side to a square with it,
    the image centred (an odd margin's extra pixel after it): LLaVA-1.5's 'pad', LlavaImageProcessor's
    do_pad, so that nothing of a wide or tall image is cropped away. None: no padding.
    """

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    resize_mode: Literal["squash", "shortest"] = "squash"
    resize_size: int | None = None
    crop_offset: Literal["round", "floor"] = "round"
    pad_to_square: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        for field, allowed in (("interpolation", ("bicubic", "bilinear")), ("resize_mode", ("squash", "shortest")),
                               ("crop_offset", ("round", "floor"))):
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field} {getattr(self, field)!r} is not one of {', '.join(map(repr, allowed))}")
        for field in ("mean", "std"):
            values = getattr(self, field)
            if not (isinstance(values, (tuple, list)) and len(values) == 3
                    and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values)):  # numpy floats too
                raise ValueError(f"{field} must be three numbers (R, G, B, for pixels in [0, 1]); got {values!r}")
            object.__setattr__(self, field, tuple(float(v) for v in values))  # lists and numpy floats: plain, hashable
        fill = self.pad_to_square
        if fill is not None:
            if not (isinstance(fill, (tuple, list)) and len(fill) == 3
                    and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and 0 <= v <= 255 for v in fill)):
                raise ValueError(f"pad_to_square must be None or an RGB colour, three whole numbers from 0 to 255; got {fill!r}")
            object.__setattr__(self, "pad_to_square", tuple(int(v) for v in fill))  # numpy ints and lists: plain, hashable
        if not all(v > 0 for v in self.std):
            raise ValueError(f"std {tuple(self.std)} must be positive in each channel (it divides the pixels)")
        # Pixels are scaled to [0, 1] before normalising, so a mean or std in 8-bit levels (123.675, 58.395)
        # normalised every image to a few hundred below zero, silently, and the encoder read noise.
        for field in ("mean", "std"):
            values = getattr(self, field)
            if not all(0.0 <= v <= 1.0 for v in values):  # NaN and infinities too
                raise ValueError(f"{field} {values} must lie in [0, 1] in each channel: vlbridge scales pixels to [0, 1] "
                                 f"before normalising, so give 8-bit levels divided by 255 (e.g. 123.675 -> 0.485)")
        for field in ("image_size", "resize_size"):  # a float side (a division's result) failed at build, naming nothing
            size = getattr(self, field)
            if size is None and field == "resize_size":
                continue
            if not (isinstance(size, numbers.Integral) and not isinstance(size, bool) and size > 0):
                raise ValueError(f"{field} must be a positive whole number of pixels (an int); got {size!r}")
            object.__setattr__(self, field, int(size))  # a numpy int (a size read from an array) as a plain one
        if self.resize_size is not None and self.resize_size < self.image_size:
            raise ValueError(f"resize_size {self.resize_size} is smaller than image_size {self.image_size}: "
                             "the centre crop would have to pad")


@dataclass(frozen=True)
class LLMDims:
    """What an LLM exposes to a connector: input-embedding width, context and architecture."""

    embed_width: int
    context_length: int
    encoder_decoder: bool
    context_is_hard: bool = True  # False where positions are relative (T5): overflow is a warning
    vocab_size: int | None = None  # rows of the logits; the memory plan counts their log-probabilities (None: not counted)


@dataclass(frozen=True)
class SizeEstimate:
    """What num_params() returns when it cannot give an exact count: a generic formula's estimate
    (`count`), or no count at all (None), with `note` saying what is guessed or why it is unknown.
    validate prints '~1.3B params' or '? params', so no guess ever reads as an exact number."""

    count: int | None
    note: str = ""


@dataclass(frozen=True, kw_only=True)
class _SpecBase:
    name: str
    factory: str
    description: str = ""
    options: type[Options] = Options
    # (options, stage) -> what the part loads, checked before anything is built (vlbridge.plugin.sources);
    # None: vlbridge cannot know, so nothing is checked for this component
    weight_sources: Callable[[Any, int], list["WeightSource"]] | None = None
    plugin: str | None = None  # set by the registry: the plugin that declared this spec
    distribution: str | None = None  # set by the registry: the pip distribution it came from

    def check(self) -> None:
        """Raise PluginError if the declaration itself is malformed (not the options)."""
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise PluginError(f"component name {self.name!r} must be lowercase letters, digits, '-', '_' or '.'")
        if not isinstance(self.factory, str) or not _FACTORY_RE.match(self.factory):
            raise PluginError(f"{self.name}: factory {self.factory!r} must be a 'package.module:attr' string")
        if not (isinstance(self.options, type) and issubclass(self.options, Options)):
            raise PluginError(f"{self.name}: options must be a subclass of vlbridge.Options")
        if self.weight_sources is not None and not callable(self.weight_sources):
            raise PluginError(f"{self.name}: weight_sources must be a function (options, stage) -> list[WeightSource] "
                              f"or None, got {type(self.weight_sources).__name__}")
        required = [name for name, field in self.options.model_fields.items() if field.is_required()]
        if required:  # pydantic's own message ("Field required [type=missing, ...]") did not say what to do
            raise PluginError(f"{self.name}: every field of {self.options.__name__} needs a default (an assembly may set none "
                              f"of its options), and {', '.join(required)} {'has' if len(required) == 1 else 'have'} none: "
                              f"give {'it' if len(required) == 1 else 'each'} one, e.g. Field(DEFAULT, description=...)")
        try:
            self.options()
        except Exception as exc:  # a default that its own field or a model_validator refuses
            raise PluginError(f"{self.name}: options model must build with no arguments ({exc})") from exc

    def load_factory(self) -> Callable[..., Any]:
        """Import the factory; the only place a component's heavy modules get imported."""
        module_name, _, attr = self.factory.partition(":")
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
        return target

    def with_origin(self, plugin: str, distribution: str) -> "_SpecBase":
        return replace(self, plugin=plugin, distribution=distribution)

    @property
    def qualified_name(self) -> str:
        return f"{self.distribution}:{self.name}" if self.distribution else self.name


@dataclass(frozen=True, kw_only=True)
class EncoderSpec(_SpecBase):
    """A frozen image encoder: its output tokens x width and its preprocessing, per options."""

    output: Callable[[Any], TokenShape]
    preprocess: Callable[[Any], Preprocess]
    num_params: Callable[[Any], int | SizeEstimate | None] | None = None  # None: not known from these options

    kind: ClassVar[Kind] = "encoder"


@dataclass(frozen=True, kw_only=True)
class LLMSpec(_SpecBase):
    """A frozen language model: embedding width, context length, decoder-only or encoder-decoder."""

    dims: Callable[[Any], LLMDims]
    num_params: Callable[[Any], int | SizeEstimate | None] | None = None

    kind: ClassVar[Kind] = "llm"


@dataclass(frozen=True, kw_only=True)
class ConnectorSpec(_SpecBase):
    """A trainable bridge: given the encoder's output and the LLM's width, the visual tokens it emits.

    ``output(opts, encoder_out, llm_width)`` returns the TokenShape fed to the LLM or raises
    IncompatibleError saying why the pair cannot be joined. ``num_params(opts, encoder_out,
    llm_width)`` returns ``{stage: trainable parameter count}`` for the stages it supports.
    ``activations(opts, encoder_out, llm_width, text_tokens)`` (optional, for the memory plan)
    returns ``{stage: values one sample's forward stores for backward}``; None: not counted.
    """

    output: Callable[[Any, TokenShape, int], TokenShape]
    num_params: Callable[[Any, TokenShape, int], dict[int, int]] | None = None
    activations: Callable[[Any, TokenShape, int, int], dict[int, int]] | None = None
    stages: tuple[int, ...] = (2,)

    kind: ClassVar[Kind] = "connector"

    def check(self) -> None:
        """Also: `stages` names BLIP-2's stages only (an unknown one validated and built, then failed in training)."""
        super().check()
        stages = self.stages
        if not (isinstance(stages, (tuple, list)) and stages and len(set(stages)) == len(stages)
                and all(stage in (1, 2) and not isinstance(stage, bool) for stage in stages)):
            raise PluginError(f"{self.name}: stages {stages!r} must list the training stages it supports, each once, "
                              "from 1 (image-text pre-training) and 2 (into the LLM): (2,) for a projector, (1, 2) for a Q-Former")


Spec = EncoderSpec | LLMSpec | ConnectorSpec
SPEC_TYPES: dict[Kind, type] = {"encoder": EncoderSpec, "llm": LLMSpec, "connector": ConnectorSpec}

Precision = Literal["fp32", "fp16", "bf16"]
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
