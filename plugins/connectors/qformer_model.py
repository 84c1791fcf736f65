"""BLIP-2's Q-Former (torch): learned queries read the image through cross-attention.

Built by the `qformer` spec's factory. Stage 2 uses `forward` (queries -> LLM embedding space);
stage 1 trains the whole module with ITC (`image_features`, `text_features`), ITM
(`itm_logits`) and ITG (`itg_logits`), each over the self-attention mask of its task. The stage-1
objective shares their common work: `image_context` (the images' cross-attention K/V, once per
step) and `itg_logits_from_queries` (ITG's text reading the ITC query pass's K/V, as LAVIS does).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, overload

import torch
import torch.nn.functional as F
from torch import nn

from vlbridge.errors import VLBridgeError, WeightsError
from vlbridge.plugins.connectors import qformer as spec
from vlbridge.plugins.connectors.qformer import QFormerOptions
from vlbridge.plugins.connectors.qformer_bert import init_from_bert, load_tokenizer
from vlbridge.plugins.connectors.qformer_layers import KV, Embeddings, FP32LayerNorm, LMHead, NormedTokens, QFormerLayer, folding_pays
from vlbridge.plugins.connectors.qformer_masks import (bidirectional_mask, multimodal_causal_mask, text_after_queries_mask,
                                                      unimodal_mask)
from vlbridge.plugin.specs import TokenShape

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DROPOUT = 0.1  # BERT's hidden and attention dropout, active in train mode only
INIT_STD = 0.02  # BERT's initializer_range, also the query tokens' std
# Parameters that do not train in a stage (fnmatch patterns on parameter names).
FROZEN_IN_STAGE: dict[int, tuple[str, ...]] = {
    1: ("proj.*",),
    2: ("embeddings.word.*", "embeddings.position.*", "layers.*.ffn_text.*", "lm_head.*",
        "vision_proj.*", "text_proj.*", "itm_head.*", "temp"),
}
TEXT_SIDE = FROZEN_IN_STAGE[2]  # what a stage-2 checkpoint (LAVIS, transformers' generation model) lacks
# An instruction-aware Q-Former reads its instruction through the text embeddings and FFNs in stage 2.
INSTRUCTION_FROZEN_IN_STAGE2 = ("lm_head.*", "vision_proj.*", "text_proj.*", "itm_head.*", "temp")


class _TakeRows(torch.autograd.Function):
    """`source[rows]` whose backward sums the rows' gradients with index_add_: on CPU about 3x
    faster than indexing's accumulating index_put and 8x faster than index_select's scatter_add."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, source: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows)
        ctx.source_rows = source.shape[0]
        return source.index_select(0, rows)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (rows,) = ctx.saved_tensors
        summed = grad.new_zeros((ctx.source_rows, *grad.shape[1:])).index_add_(0, rows, grad.contiguous())
        return summed, None


@dataclass(frozen=True)
class ImageContext:
    """A batch of images as the cross-attention layers read them: each layer's keys and values
    (None in layers without cross-attention). Stage 1's ITC, ITM and ITG passes all read the same
    images; computing ln_vision and these K/V once per step, then indexing rows, saves the
    encoder-wide projections of four of five passes (and their backward)."""

    layers: tuple[KV | None, ...]

    @property
    def batch(self) -> int:
        return next(kv[0].shape[0] for kv in self.layers if kv is not None)

    def select(self, rows: torch.Tensor) -> "ImageContext":
        """The images at `rows` (int64 indices, repeats allowed), in that order."""
        return ImageContext(tuple(None if kv is None else (_TakeRows.apply(kv[0], rows), _TakeRows.apply(kv[1], rows))
                                  for kv in self.layers))

    @staticmethod
    def cat(parts: "list[ImageContext]") -> "ImageContext":
        """The parts' images one after another (e.g. local images and other ranks' negatives)."""
        return ImageContext(tuple(None if kvs[0] is None else (torch.cat([kv[0] for kv in kvs]), torch.cat([kv[1] for kv in kvs]))
                                  for kvs in zip(*(part.layers for part in parts))))


class QFormer(nn.Module):
    """(B, N, encoder_width) image tokens -> (B, num_query_tokens, llm_width) visual tokens."""

    def __init__(self, opts: QFormerOptions, encoder_out: TokenShape, llm_width: int):
        super().__init__()
        self.opts = opts
        width, vocab, eps = opts.size("hidden_size"), opts.size("vocab_size"), opts.layer_norm_eps
        self.num_queries = opts.num_query_tokens
        self.query_tokens = nn.Parameter(torch.zeros(1, self.num_queries, width))
        self.ln_vision = FP32LayerNorm(encoder_out.width, eps=opts.ln_vision_eps)
        self.embeddings = Embeddings(vocab, opts.size("max_text_positions"), width, eps, DROPOUT)
        self.layers = nn.ModuleList(
            QFormerLayer(width, encoder_out.width, opts.size("num_heads"), opts.size("intermediate_size"), eps, DROPOUT,
                         cross=i % opts.cross_attention_freq == 0)
            for i in range(opts.size("num_layers"))
        )
        self.proj = nn.Linear(width, llm_width) if llm_width > 0 else None  # None: no LLM (stage 1 / retrieval)
        self.vision_proj = nn.Linear(width, opts.embed_dim)
        self.text_proj = nn.Linear(width, opts.embed_dim)
        self.itm_head = nn.Linear(width, 2)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.lm_head = LMHead(width, vocab, eps)
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._init_bert_style()

    def _init_bert_style(self) -> None:
        """BERT's init (N(0, 0.02), zero bias, unit LN) inside the Q-Former; heads keep torch's."""
        if self.query_tokens.is_meta:  # nothing to fill, and meta normal_ would import torch._dynamo
            return
        nn.init.normal_(self.query_tokens, std=INIT_STD)
        for module in [self.embeddings, self.layers, self.lm_head]:
            for sub in module.modules():
                if isinstance(sub, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(sub.weight, std=INIT_STD)
                if isinstance(sub, nn.Linear):
                    nn.init.zeros_(sub.bias)
        with torch.no_grad():
            self.embeddings.word.weight[self.embeddings.word.padding_idx].zero_()

    # -- passes -------------------------------------------------------------------------------

    def _run(self, x: torch.Tensor, mask: torch.Tensor | None, num_queries: int, image: torch.Tensor | ImageContext | None,
             prefixes: list[KV] | None = None, keep: list[KV] | None = None,
             last_rows: int | None = None) -> torch.Tensor:
        """The layers over `x`; `last_rows`: the caller reads only the first positions, so the last
        layer computes only those rows (their numbers are unchanged: every row reads all keys)."""
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            layer_image = image.layers[i] if isinstance(image, ImageContext) else image
            x = layer(x, mask, num_queries, layer_image, None if prefixes is None else prefixes[i], keep,
                      rows=last_rows if i == last else None)
        return x

    def _image(self, image_embeds: torch.Tensor | ImageContext, fold: bool = False) -> torch.Tensor | ImageContext | NormedTokens:
        """What the cross-attention layers read: ln_vision'd tokens, shared K/V (stage 1), or with
        `fold` where `folding_pays` at this shape, the normalised tokens for `attend_folded`."""
        if isinstance(image_embeds, ImageContext):
            return image_embeds
        tokens = image_embeds.to(self.query_tokens.dtype)
        if not (fold and self._folding_pays(tokens.shape[1])):
            return self.ln_vision(tokens)
        return self._normed(tokens)

    def _folding_pays(self, tokens: int) -> bool:
        cross = next((layer.cross_attn for layer in self.layers if layer.cross_attn is not None), None)
        return cross is not None and folding_pays(self.num_queries, tokens, self.query_tokens.shape[-1], cross.heads)

    def _queries(self, batch: int) -> torch.Tensor:
        return self.query_tokens.expand(batch, -1, -1)  # (1, Q, W) -> (B, Q, W)

    def image_context(self, image_embeds: torch.Tensor) -> ImageContext:
        """(B, N, E) image tokens -> ln_vision once and every cross-attention layer's K/V of them,
        to be shared by several passes over the same images (stage 1). Passes given raw tokens
        compute K/V layer by layer instead, which keeps inference's peak memory low."""
        image = self._normed(image_embeds.to(self.query_tokens.dtype))
        return ImageContext(tuple(None if layer.cross_attn is None else _contiguous(layer.cross_attn.key_values(image))
                                  for layer in self.layers))

    def _normed(self, tokens: torch.Tensor) -> NormedTokens:
        """ln_vision for layers that take `NormedTokens`. Where its affine gets a gradient and the tokens
        get none (a frozen encoder), the affine is left to be folded into the K/V weights, which spares
        backward the (B, N, C) token gradient that only the affine would read; otherwise the tokens
        are normalised with it once, for every layer."""
        if torch.is_grad_enabled() and not tokens.requires_grad and any(p.requires_grad for p in self.ln_vision.parameters()):
            return self.ln_vision.normalised(tokens)
        return NormedTokens(self.ln_vision(tokens), None, None)

    @overload
    def query_outputs(self, image_embeds: torch.Tensor | ImageContext, return_layer_kv: Literal[False] = False, *,
                      fold: bool = False) -> torch.Tensor: ...

    @overload
    def query_outputs(self, image_embeds: torch.Tensor | ImageContext, return_layer_kv: Literal[True], *,
                      fold: bool = False) -> tuple[torch.Tensor, list[KV]]: ...

    def query_outputs(self, image_embeds: torch.Tensor | ImageContext,
                      return_layer_kv: bool = False, *, fold: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[KV]]:
        """(B, N, E) image tokens -> (B, Q, W) query outputs (queries see queries and the image).

        `return_layer_kv`: also each layer's self-attention K/V of the queries, which ITG's text
        reads (`itg_logits_from_queries`) instead of running the queries again, as LAVIS does.
        `fold`: raw image tokens are read through `Attention.attend_folded` where that is cheaper
        (the stage-2 connector and inference, via `forward`); stage 1 shares projected K/V instead.
        """
        batch = image_embeds.batch if isinstance(image_embeds, ImageContext) else image_embeds.shape[0]
        # Without dropout, every image's queries are the same until the first cross-attention: one set
        # runs that far (layer 0's self-attention, and its query-keys where folded) for all images.
        shared = not self.training and not return_layer_kv
        x = self.embeddings(queries=self._queries(1 if shared else batch))
        keep: list[KV] | None = [] if return_layer_kv else None
        out = self._run(x, None, self.num_queries, self._image(image_embeds, fold), keep=keep).expand(batch, -1, -1)
        return (out, keep) if return_layer_kv else out

    @property
    def instruction_aware(self) -> bool:
        """Whether the model must pass each image's instruction to `forward` (InstructBLIP)."""
        return self.opts.instruction_aware

    def forward(self, image_embeds: torch.Tensor, instructions: list[str] | None = None) -> torch.Tensor:
        """(B, N, E) -> (B, Q, llm_width): the visual tokens given to the LLM. An instruction-aware
        Q-Former reads each image's instruction next to the queries (both see each other; only the
        queries read the image) and gives the query positions' outputs, as InstructBLIP does."""
        if self.proj is None:
            raise VLBridgeError("this Q-Former was built without an LLM (stage 1 / retrieval): it has no projection to an LLM's width")
        if not self.instruction_aware:
            if instructions is not None:
                raise VLBridgeError("this Q-Former is not instruction-aware; set the qformer option instruction_aware: true "
                                    "to let it read instructions, or pass none")
            return self.proj(self.query_outputs(image_embeds, fold=True))
        if instructions is None or len(instructions) != image_embeds.shape[0]:
            raise VLBridgeError(f"this Q-Former is instruction-aware: give one instruction (the task prompt, may be '') per image; "
                                f"got {None if instructions is None else len(instructions)} for {image_embeds.shape[0]} images")
        ids, mask = self.tokenize_instructions(instructions)
        hidden = self.multimodal_outputs(ids, mask, image_embeds, fold=True)
        return self.proj(hidden[:, : self.num_queries])

    @property
    def max_text_positions(self) -> int:
        """The longest text (instruction or caption, [CLS] and [SEP] included) the embeddings place."""
        return self.embeddings.position.num_embeddings

    @property
    def instruction_limit(self) -> int:
        """The instruction's tokens at most ([CLS] and [SEP] included): InstructBLIP's 128, within the
        positions. An export's processor cuts at the same length (`vlbridge.interop.hf_instructblip`)."""
        return min(self.opts.max_instruction_tokens, self.max_text_positions)

    def tokenize_instructions(self, instructions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Instructions -> the Q-Former's (input_ids, attention_mask), [CLS] ... [SEP], right-padded."""
        self._require_text_side("reading an instruction")
        encoded = self.tokenizer(list(instructions), padding="longest", truncation=True, max_length=self.instruction_limit,
                                 return_tensors="pt")
        device = self.query_tokens.device
        return encoded["input_ids"].to(device), encoded["attention_mask"].to(device)

    def text_outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                     last_rows: int | None = None) -> torch.Tensor:
        """(B, T) ids -> (B, T, W): text alone, bidirectional over real tokens, text FFN only
        (`last_rows`: only the first positions, as in `_run`)."""
        mask = unimodal_mask(0, _text_mask(input_ids, attention_mask))
        return self._run(self.embeddings(input_ids), mask, 0, None, last_rows=last_rows)

    def multimodal_outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                           image_embeds: torch.Tensor | ImageContext, *, fold: bool = False,
                           last_rows: int | None = None) -> torch.Tensor:
        """(B, Q+T, W): queries and text see each other (ITM); queries cross-attend to the image
        (`fold` as in `query_outputs`; `last_rows`: only the first positions, as in `_run`)."""
        mask = bidirectional_mask(self.num_queries, _text_mask(input_ids, attention_mask))
        x = self.embeddings(input_ids, self._queries(input_ids.shape[0]))
        return self._run(x, mask, self.num_queries, self._image(image_embeds, fold), last_rows=last_rows)

    def itg_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   image_embeds: torch.Tensor | ImageContext) -> torch.Tensor:
        """(B, T, vocab) next-token logits; input_ids start with [DEC]. Queries see only queries,
        text sees all queries and earlier text (multimodal-causal mask). One joint pass; stage 1
        uses `itg_logits_from_queries` on its ITC pass instead (same numbers, no query pass)."""
        mask = multimodal_causal_mask(self.num_queries, _text_mask(input_ids, attention_mask))
        x = self.embeddings(input_ids, self._queries(input_ids.shape[0]))
        hidden = self._run(x, mask, self.num_queries, self._image(image_embeds))
        return self.lm_head(hidden[:, self.num_queries:], self.embeddings.word.weight)

    def itg_logits_from_queries(self, query_kv: list[KV], input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """`itg_logits` with the queries' part taken from a query pass (`query_outputs(...,
        return_layer_kv=True)`): each layer's text self-attention reads [query K/V ; text K/V]
        under the causal text mask. Queries see only queries in both, so in eval mode the logits
        are `itg_logits`'; gradients reach the query pass through its K/V (LAVIS's past_key_values)."""
        self._require_text_side("itg_logits_from_queries")
        if len(query_kv) != len(self.layers):
            raise VLBridgeError(f"itg_logits_from_queries needs the K/V of all {len(self.layers)} layers, got {len(query_kv)}")
        mask = text_after_queries_mask(self.num_queries, _text_mask(input_ids, attention_mask))
        hidden = self._run(self.embeddings(input_ids), mask, 0, None, prefixes=query_kv)
        return self.lm_head(hidden, self.embeddings.word.weight)

    # -- stage-1 heads ------------------------------------------------------------------------

    def image_features(self, image_embeds: torch.Tensor | ImageContext) -> torch.Tensor:
        """(B, Q, embed_dim) L2-normalised ITC image features, one per query."""
        return self.image_features_of(self.query_outputs(image_embeds))

    def image_features_of(self, query_outputs: torch.Tensor) -> torch.Tensor:
        """ITC image features of given query outputs (stage 1 keeps the pass's K/V for ITG)."""
        self._require_text_side("image_features")
        return F.normalize(self.vision_proj(query_outputs), dim=-1)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, embed_dim) L2-normalised ITC text features, from the first ([CLS]) token."""
        return F.normalize(self.text_proj(self.text_outputs(input_ids, attention_mask, last_rows=1)[:, 0]), dim=-1)

    def itm_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   image_embeds: torch.Tensor | ImageContext) -> torch.Tensor:
        """(B, 2) match / no-match logits, averaged over the query positions (class 1 = match)."""
        hidden = self.multimodal_outputs(input_ids, attention_mask, image_embeds, last_rows=self.num_queries)
        return self.itm_head(hidden[:, : self.num_queries]).mean(dim=1)

    # -- training and weights ---------------------------------------------------------------

    def set_stage(self, stage: int) -> None:
        """Stage 1: everything but `proj` trains. Stage 2: the query path, ln_vision and `proj` (and,
        instruction-aware, the text embeddings and FFNs that read the instruction)."""
        if stage not in FROZEN_IN_STAGE:
            raise VLBridgeError(f"the Q-Former has stages 1 and 2, not {stage!r}")
        if stage == 1:
            self._require_text_side("set_stage(1)")
        frozen = INSTRUCTION_FROZEN_IN_STAGE2 if stage == 2 and self.instruction_aware else FROZEN_IN_STAGE[stage]
        for name, param in self.named_parameters():
            param.requires_grad_(not any(fnmatch.fnmatchcase(name, p) for p in frozen))

    def drop_text_side(self) -> None:
        """Free what only stage 1 uses (word/position embeddings, text FFNs, ITC/ITM/ITG heads,
        temp; about 80M parameters for base), as LAVIS's stage-2 models do. The query path and
        its stage-2 parameter count are unchanged; stage-1 calls raise VLBridgeError afterwards."""
        self.embeddings.word = None
        self.embeddings.position = None
        for layer in self.layers:
            layer.ffn_text = None
        self.lm_head = self.vision_proj = self.text_proj = self.itm_head = None
        self.temp = None

    @property
    def has_text_side(self) -> bool:
        return self.lm_head is not None

    def _require_text_side(self, what: str) -> None:
        if not self.has_text_side:
            raise VLBridgeError(f"{what} needs the Q-Former's text side, which drop_text_side() removed; build a new Q-Former for stage 1")

    def load_weights(self, state_dict: Mapping[str, torch.Tensor], *, allow_missing: Iterable[str] = (), source: str = "state dict") -> None:
        """Strict load of tensors in our key names (see qformer_convert for foreign ones).

        `allow_missing`: fnmatch patterns of keys that may be absent and stay as they are, e.g.
        TEXT_SIDE for a stage-2 checkpoint. Errors name the tensor and both shapes.
        """
        own = self.state_dict()
        patterns = tuple(allow_missing)
        missing = sorted(k for k in own if k not in state_dict and not any(fnmatch.fnmatchcase(k, p) for p in patterns))
        unexpected = sorted(set(state_dict) - set(own))
        if missing or unexpected:
            raise WeightsError(f"{source} does not fit the Q-Former: missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
                               f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        for key, value in state_dict.items():
            if tuple(value.shape) != tuple(own[key].shape):
                raise WeightsError(f"{source}: tensor {key} has shape {tuple(value.shape)} but the Q-Former needs {tuple(own[key].shape)}")
        self.load_state_dict(dict(state_dict), strict=False)

    @property
    def tokenizer(self) -> "PreTrainedTokenizerBase":
        """BERT's tokenizer with [DEC] as bos_token, loaded on first use."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.opts)
        return self._tokenizer


def _contiguous(kv: KV) -> KV:
    """K/V in (B, H, N, Dh) memory order: read by several passes, each of whose batched matmuls
    would otherwise copy the head-transposed views."""
    return kv[0].contiguous(), kv[1].contiguous()


def _text_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    return torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()


def build(opts: QFormerOptions, encoder_out: TokenShape, llm_width: int) -> QFormer:
    """The spec's factory: random init, or stage-1 init from a local BERT when opts.bert is set."""
    spec.output(opts, encoder_out, llm_width)  # raises IncompatibleError for a pinned encoder width
    model = QFormer(opts, encoder_out, llm_width)
    if opts.bert:
        init_from_bert(model, opts.bert)
    return model
