"""VLBridgeModel: one nn.Module holding a frozen encoder, a trainable connector and a frozen LLM
(fine-tuning runs may also train the encoder and LoRA adapters on the LLM: `model.tuned`).

It knows how to run the three in a row (`visual_tokens`, `forward`) and which parameters train in
which stage. Inference (caption/answer/generate) and retrieval live in their own modules and are
exposed here as thin methods, so this file stays the map of the model.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from vlbridge.assemblies.assembly import Assembly
from vlbridge.assemblies.saved import checkpoint_config
from vlbridge.errors import VLBridgeError
from vlbridge.finetune.lora import lora_dropouts
from vlbridge.finetune.tuning import Tuned
from vlbridge.modeling import inference, retrieval
from vlbridge.modeling.connector_protocol import connector_state, set_connector_stage
from vlbridge.parts.freeze import FrozenPart, train_what_trains
from vlbridge.parts.images import to_pixel_batch
from vlbridge.plugin.contract import check_tokens, describe

DEFAULT_VQA_PROMPT = "Question: {} Short answer:"


class VLBridgeModel(nn.Module):
    """encoder (frozen) -> connector (trained) -> LLM (frozen; absent in stage 1)."""

    def __init__(self, assembly: Assembly, encoder: nn.Module, connector: nn.Module, llm: nn.Module | None, stage: int):
        super().__init__()
        self.assembly = assembly
        self.encoder = encoder
        self.connector = connector
        self.llm = llm
        self.stage = stage
        self.tuned = Tuned()  # fine-tuned encoder tensors and LoRA adapters, if any (vlbridge.finetune.tuning)
        self.trained_stages: tuple[int, ...] = ()  # what the checkpoint its connector loaded went through (vlbridge.files.checkpoint)
        self.set_stage(stage)

    # -- bookkeeping ------------------------------------------------------------------------------
    @property
    def plan(self):
        return self.assembly.plan

    @property
    def device(self) -> torch.device:
        """Where the connector lives (a parameter-free connector: wherever the rest of the model is)."""
        tensors = itertools.chain(self.connector.parameters(), self.connector.buffers(), self.parameters(), self.buffers())
        first = next(tensors, None)
        return first.device if first is not None else torch.device("cpu")

    def set_stage(self, stage: int) -> None:
        """Choose which connector parameters train (the connector's `set_stage`, or all of them in
        stage 2 for a connector without one); encoder and LLM stay frozen whatever the stage."""
        problem = self.assembly.stage_problem(stage)
        if problem:
            raise VLBridgeError(problem)
        if stage == 2 and self.llm is None:
            raise VLBridgeError("stage 2 needs the LLM; build the model with stage=2")
        set_connector_stage(self.connector, stage, describe(self.plan.connector))
        self.stage = stage

    def train(self, mode: bool = True) -> "VLBridgeModel":
        """Like `nn.Module.train`, but a frozen part stays in eval mode: a `FrozenPart` keeps itself
        there, and a plugin's plain nn.Module is put back but for the submodules that train (its
        dropout would otherwise act while the connector trains against it, or its frozen blocks'
        while its last blocks are fine-tuned)."""
        super().train(mode)
        for part in (self.encoder, self.llm):
            if part is not None and not isinstance(part, FrozenPart):
                train_what_trains(part, mode)
                if part is self.llm and self.tuned.lora is not None:  # a FrozenPart LLM has them train_along
                    for dropout in lora_dropouts(part.model):  # parameterless: the rule above leaves them in eval
                        dropout.train(mode)
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_parameters(self, trainable: bool | None = None) -> int:
        return sum(p.numel() for p in self.parameters() if trainable is None or p.requires_grad == trainable)

    # -- the forward path -------------------------------------------------------------------------
    def pixel_values(self, images: Any) -> torch.Tensor:
        """Images (PIL, paths or tensors) -> a normalised batch on the model's device, prepared as
        the encoder's spec declares (as training and the feature cache do)."""
        return to_pixel_batch(images, self.plan.preprocess, device=self.device)

    @property
    def connector_dtype(self) -> torch.dtype:
        """The dtype the connector computes in: its first floating-point parameter's (fp32 unless the
        model was converted with `.to(dtype)` / `.half()`); fp32 for a connector without one."""
        params = (p for p in itertools.chain(self.connector.parameters(), self.connector.buffers()) if p.is_floating_point())
        first = next(params, None)
        return torch.float32 if first is None else first.dtype

    @property
    def encoder_trains(self) -> bool:
        """Whether some encoder parameter trains (a fine-tuning run, vlbridge.finetune.encoder_tuning)."""
        return any(param.requires_grad for param in self.encoder.parameters())

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, N, W) encoder tokens, in fp32 for the connector. Without gradients for a
        frozen encoder; with them (where grad mode is on) when the encoder is being fine-tuned."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.encoder_trains):
            tokens = self.encoder(pixel_values)
        return check_tokens(describe(self.plan.encoder), self.plan.encoder_out, tokens, batch=pixel_values.shape[0]).float()

    def visual_tokens(self, pixel_values: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None,
                      instructions: Sequence[str] | None = None) -> torch.Tensor:
        """(B, M, D) soft visual prompt; pass cached encoder outputs as `image_embeds` to skip the encoder.
        An instruction-aware connector (InstructBLIP's Q-Former) also reads each image's instruction
        (the task prompt; none = empty); other connectors never see it."""
        if image_embeds is None:
            if pixel_values is None:
                raise VLBridgeError("visual_tokens needs pixel_values or image_embeds")
            image_embeds = self.encode_images(pixel_values)
        # fp32 tokens (encoder or cache) meet a connector that `.half()` / `.to(dtype)` converted in its
        # own dtype: a plugin's layers need not cast their input (the built-in connectors do too).
        image_embeds = image_embeds.to(self.connector_dtype)
        if isinstance(instructions, str):  # list() would make each character an image's instruction
            raise VLBridgeError(f"instructions must be a list of strings, one per image (got the string {instructions!r:.60}); "
                                "pass [text] * batch for one instruction for every image")
        if getattr(self.connector, "instruction_aware", False):
            texts = [""] * image_embeds.shape[0] if instructions is None else list(instructions)
            if len(texts) != image_embeds.shape[0]:
                raise VLBridgeError(f"{len(texts)} instructions for {image_embeds.shape[0]} images; give one per image")
            tokens = self.connector(image_embeds, instructions=texts)
        else:
            tokens = self.connector(image_embeds)
        return self._checked_visual(tokens, image_embeds.shape[0])

    def _checked_visual(self, tokens: Any, batch: int) -> torch.Tensor:
        """The connector's output as the plan declares it: the build checked one batch in eval mode, and
        a forward that answers otherwise later (a tuple, another width) failed inside the LLM, naming nothing.
        An LLM-free assembly declares no visual tokens, so there is nothing to hold them to."""
        if self.plan.connector_out is None:
            return tokens
        return check_tokens(describe(self.plan.connector), self.plan.connector_out, tokens, batch=batch)

    def forward(self, pixel_values: torch.Tensor | None, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None,
                instructions: Sequence[str] | None = None, **llm_kwargs: Any):
        """Stage-2 forward: the LLM's output (loss when labels are given) conditioned on the images
        (and, for an instruction-aware connector, on each image's instruction)."""
        if self.llm is None:
            raise VLBridgeError("this model was built for stage 1 and has no LLM; build it with stage=2")
        visual = self.visual_tokens(pixel_values, image_embeds, instructions)
        return self.llm(visual, input_ids, attention_mask, labels=labels, **llm_kwargs)

    # -- inference and retrieval (implemented in vlbridge.modeling.inference / vlbridge.modeling.retrieval) ----------
    def generate(self, images, prompt: str | Sequence[str] | None = None, **generation: Any) -> list[str]:
        return inference.generate(self, images, prompt, **generation)

    def caption(self, images, prompt: str | Sequence[str] | None = None, **generation: Any) -> list[str]:
        return inference.caption(self, images, prompt, **generation)

    def answer(self, images, questions: str | Sequence[str], prompt: str = DEFAULT_VQA_PROMPT, **generation: Any) -> list[str]:
        return inference.answer(self, images, questions, prompt, **generation)

    def features(self, images=None, texts: str | Sequence[str] | None = None, mode: str = "image"):
        return retrieval.features(self, images=images, texts=texts, mode=mode)

    def retrieve(self, images, texts: str | Sequence[str], k: int = 128, batch_size: int = 64):
        return retrieval.retrieve(self, images, texts, k=k, batch_size=batch_size)

    def merged_llm_model(self) -> nn.Module:
        """The LLM's transformers model with any LoRA adapters merged into its weights (a copy of the
        adapted layers; the live model is unchanged), for export formats without adapters."""
        from vlbridge.finetune.lora import merged_llm_model

        return merged_llm_model(self)

    # -- checkpoints ------------------------------------------------------------------------------
    def save(self, out_dir: str | Path) -> Path:
        """Write the connector's whole state (safetensors; what it lacks is listed, not written) and the
        assembly YAML, so `vlbridge.load` gives the same outputs for every method; frozen parts are not
        copied, fine-tuned ones (encoder tensors, LoRA adapters) are written beside the connector."""
        from vlbridge.files.checkpoint import save_checkpoint
        from vlbridge.finetune.tuning import tuned_parts

        return save_checkpoint(out_dir, checkpoint_config(self.assembly), connector_state(self.connector), self.stage,
                               parts=tuned_parts(self), trained_stages=self.trained_stages)
