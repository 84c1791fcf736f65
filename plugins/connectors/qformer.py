"""Registration of `qformer`: BLIP-2's Querying Transformer (declarations only, no torch)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from vlbridge.plugin.hookspecs import hookimpl
from vlbridge.plugin.sources import WeightSource, local_or_hub
from vlbridge.errors import IncompatibleError
from vlbridge.files.hf_config import read_local_json
from vlbridge.plugin.specs import ConnectorSpec, Options, TokenShape

# BERT-base layout (bert-base-uncased + the [DEC] token); 'tiny' for tests and the offline demo.
ARCH: dict[str, dict[str, int]] = {
    "base": {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "intermediate_size": 3072, "vocab_size": 30523, "max_text_positions": 512},
    "tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 256, "vocab_size": 1024, "max_text_positions": 64},
}
HUB_BERT = "bert-base-uncased"  # BLIP-2's BERT: the tokenizer of a base Q-Former given no bert or tokenizer
# Our size names -> a transformers BertConfig's: a local `bert` directory states the Q-Former's shape.
# Values a Q-Former stores for backward, measured with saved-tensor hooks on the tiny one in fp32
# (tests/test_memory_plan.py): per position and layer, 11 of the width (attention inputs and heads,
# output blocks, LayerNorm inputs, dropout) and 2 of the FFN's (GELU's input and output); per query in
# a cross-attention layer, 5 of the width; per attention probability 1.5 (fp32 + an int16 dropout mask).
TOKEN_VALUES, FFN_VALUES, CROSS_VALUES, PROB_VALUES = 11, 2, 5, 1.5
BERT_FIELDS: dict[str, str] = {"hidden_size": "hidden_size", "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
                               "intermediate_size": "intermediate_size", "max_text_positions": "max_position_embeddings"}


def bert_arch(bert: str | None) -> dict[str, int] | None:
    """The sizes a local BERT directory's config.json gives the Q-Former it initialises (vocab + 1
    for [DEC], as BLIP-2's 30523 = bert-base-uncased's 30522 + 1); None for a hub id or no BERT.
    Read without torch, so an assembly validates before anything loads."""
    config = read_local_json(bert, "config.json") if bert else None
    if config is None:
        return None
    missing = [name for name in (*BERT_FIELDS.values(), "vocab_size") if not isinstance(config.get(name), int)]
    if missing:
        raise ValueError(f"{bert}/config.json is not a BERT config: it lacks {missing}")
    return {**{ours: config[theirs] for ours, theirs in BERT_FIELDS.items()}, "vocab_size": config["vocab_size"] + 1}


class QFormerOptions(Options):
    variant: Literal["base", "tiny"] = Field("base", description="size preset: BERT-base layout or a tiny one for tests; a local bert directory's config.json replaces it; the fields below override either")
    num_query_tokens: int = Field(32, ge=1, description="learned query tokens, i.e. visual tokens given to the LLM")
    hidden_size: int | None = Field(None, ge=1, description="width of the Q-Former (768 for base)")
    num_layers: int | None = Field(None, ge=1, description="transformer layers (12 for base)")
    num_heads: int | None = Field(None, ge=1, description="attention heads (12 for base)")
    intermediate_size: int | None = Field(None, ge=1, description="FFN width (3072 for base)")
    cross_attention_freq: int = Field(2, ge=1, description="a cross-attention block every this many layers, from layer 0")
    vocab_size: int | None = Field(None, ge=2, description="text vocabulary incl. [DEC] (30523 for bert-base-uncased)")
    max_text_positions: int | None = Field(None, ge=1, description="text position embeddings (512 for base)")
    embed_dim: int = Field(256, ge=1, description="width of the ITC projections")
    encoder_width: int | None = Field(None, ge=1, description="pin the encoder width the cross-attention expects (e.g. to match pretrained weights); none = the encoder's")
    layer_norm_eps: float = Field(1e-12, gt=0, description="LayerNorm epsilon inside the Q-Former (BERT's)")
    ln_vision_eps: float = Field(1e-5, gt=0, description="epsilon of the LayerNorm on the encoder features (LAVIS 1e-5; transformers' BLIP-2 1e-6)")
    tokenizer: str | None = Field(None, description="local directory of the BERT tokenizer; none = the bert directory's, the shipped tiny one, or bert-base-uncased")
    bert: str | None = Field(None, description="local BERT directory (transformers format) to initialise from; none = random init")
    instruction_aware: bool = Field(False, description="InstructBLIP: in stage 2 and at inference the task prompt (instruction) joins the queries in self-attention, so they extract what it asks about; the text side then trains in stage 2 too")
    max_instruction_tokens: int = Field(128, ge=2, description="the instruction's Q-Former tokens at most, [CLS] and [SEP] included (InstructBLIP: 128)")

    @model_validator(mode="after")
    def _check(self) -> "QFormerOptions":
        if self.size("hidden_size") % self.size("num_heads"):
            raise ValueError(f"hidden_size {self.size('hidden_size')} is not divisible by num_heads {self.size('num_heads')}")
        return self

    def size(self, key: str) -> int:
        """An architecture number: the explicit option if given, else the bert directory's, else the variant's."""
        value = getattr(self, key)
        return (bert_arch(self.bert) or ARCH[self.variant])[key] if value is None else value


def _check_encoder(opts: QFormerOptions, encoder_out: TokenShape) -> None:
    if opts.encoder_width is not None and opts.encoder_width != encoder_out.width:
        raise IncompatibleError(f"qformer expects encoder width {opts.encoder_width} (connector.options.encoder_width) but the encoder gives {encoder_out.width}")


def output(opts: QFormerOptions, encoder_out: TokenShape, llm_width: int) -> TokenShape:
    _check_encoder(opts, encoder_out)
    return TokenShape(opts.num_query_tokens, llm_width)


def num_params(opts: QFormerOptions, encoder_out: TokenShape, llm_width: int) -> dict[int, int]:
    """Trainable parameters per stage (stage 1: the whole Q-Former with its text side and heads;
    stage 2: the query path, ln_vision and the projection to the LLM, and for an instruction-aware
    Q-Former the text embeddings and FFNs that read the instruction)."""
    h, i, e = opts.size("hidden_size"), opts.size("intermediate_size"), encoder_out.width
    layers, vocab = opts.size("num_layers"), opts.size("vocab_size")
    n_cross = len(range(0, layers, opts.cross_attention_freq))
    self_attn = 4 * (h * h + h) + 2 * h
    cross_attn = 2 * (h * h + h) + 2 * (e * h + h) + 2 * h
    ffn = 2 * h * i + i + 3 * h
    core = layers * (self_attn + ffn) + n_cross * cross_attn + 2 * h + opts.num_query_tokens * h
    ln_vision = 2 * e
    text_side = layers * ffn + vocab * h + opts.size("max_text_positions") * h + (h * h + 3 * h) + vocab
    heads = 2 * (h * opts.embed_dim + opts.embed_dim) + (2 * h + 2) + 1  # ITC projections, ITM head, temperature
    instruction = layers * ffn + vocab * h + opts.size("max_text_positions") * h if opts.instruction_aware else 0
    return {
        1: core + ln_vision + text_side + heads,
        2: core + ln_vision + h * llm_width + llm_width + instruction,  # + the instruction's embeddings and text FFNs
    }


def activations(opts: QFormerOptions, encoder_out: TokenShape, llm_width: int, text_tokens: int) -> dict[int, int]:
    """Values one sample's forward stores for backward, per stage (for the memory plan). Stage 2: one
    query pass (with the instruction, if instruction-aware). Stage 1: the query pass, ITC's text pass,
    ITM's 3 pairs of [queries ; text] and ITG's text reading the queries, with ITG's fp32 log-probabilities."""
    h, ffn, heads, layers = (opts.size(k) for k in ("hidden_size", "intermediate_size", "num_heads", "num_layers"))
    n_cross = len(range(0, layers, opts.cross_attention_freq))
    q, n, t = opts.num_query_tokens, encoder_out.num_tokens, text_tokens

    def passes(length: int, keys: int) -> float:  # self-attention and FFN over `length` positions reading `keys`
        return layers * (length * (TOKEN_VALUES * h + FFN_VALUES * ffn) + PROB_VALUES * heads * length * keys)

    cross = n_cross * (CROSS_VALUES * q * h + PROB_VALUES * heads * q * n)  # the queries reading the image
    image = 2 * n * encoder_out.width + n_cross * 2 * n * h  # ln_vision's input and output, cross-attention K/V
    prompt = q + (opts.max_instruction_tokens if opts.instruction_aware else 0)
    stage1 = (passes(q, q) + cross + passes(t, t) + 3 * (passes(q + t, q + t) + cross) + passes(t, q + t)
              + t * opts.size("vocab_size"))
    return {1: round(image + stage1), 2: round(image + passes(prompt, prompt) + cross)}


def weight_sources(opts: QFormerOptions, stage: int) -> list[WeightSource]:
    """The BERT it starts from, and its tokenizer where building needs text (stage 1, instructions):
    a stage-2 caption or answer never tokenizes Q-Former text, so it is not refused for a missing one."""
    found = local_or_hub("bert", opts.bert)
    needs_text = stage == 1 or opts.instruction_aware
    if needs_text and (opts.tokenizer or (opts.variant != "tiny" and not opts.bert)):
        found += local_or_hub("tokenizer", opts.tokenizer or HUB_BERT, what="tokenizer", default=not opts.tokenizer)
    return found


@hookimpl
def vlbridge_register_connectors() -> list[ConnectorSpec]:
    return [
        ConnectorSpec(
            name="qformer",
            description="BLIP-2's Q-Former: learned queries cross-attend to the image, then a linear map into the LLM",
            factory="vlbridge.plugins.connectors.qformer_model:build",
            options=QFormerOptions,
            output=output,
            num_params=num_params,
            activations=activations,
            stages=(1, 2),
            weight_sources=weight_sources,
        )
    ]
