"""What trains, on a loaded LaMed model: LoRA on the language model, the parts trained fully, official names.

* Stage ``lora`` (official stage 2): LoRA (peft) on every ``nn.Linear`` of the language model -- the official
  ``find_all_linear_names`` rule, :func:`official_lora_targets` -- and the config's ``trainable_parts`` trained fully.
* Stage ``projector`` (official stage 1): no LoRA; the projector and the input embeddings are trained.
* Trained weights are fp32, frozen ones keep their dtype (bf16 under bf16 mixed precision); gradient checkpointing
  covers the LLM layers (transformers' own) and the 3D ViT blocks.
* :func:`official_name` maps a parameter of the training module (DDP ``module.``, PEFT ``base_model.model.``) to its
  name in the official checkpoint layout: the names the adapter's ``trainable.safetensors`` and the merge use.

torch and peft are imported inside the functions.
"""

from __future__ import annotations

from typing import Optional

from M3DAssistantLib.errors import ConfigError

from .config import NON_LLM_PARTS, TrainConfig


def official_lora_targets(model) -> list[str]:
    """Full names of every ``nn.Linear`` of the language model (the official ``find_all_linear_names``)."""
    from torch import nn

    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not any(part in name for part in NON_LLM_PARTS)
    ]


def _wrap_blocks_with_checkpointing(blocks) -> None:
    """Recompute each ViT block's activations in backward (non-reentrant torch.utils.checkpoint)."""
    from torch.utils.checkpoint import checkpoint

    for block in blocks:
        if getattr(block, "_m3d_checkpointed", False):
            continue
        plain_forward = block.forward

        def forward(x, _plain=plain_forward, _block=block):
            import torch

            if _block.training and torch.is_grad_enabled():
                return checkpoint(_plain, x, use_reentrant=False)
            return _plain(x)

        block.forward = forward
        block._m3d_checkpointed = True


def enable_gradient_checkpointing(model) -> None:
    """Gradient checkpointing for the LLM layers (transformers' own) and the 3D ViT blocks."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x spelling
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _wrap_blocks_with_checkpointing(model.model.vision_tower.vision_tower.blocks)
    if getattr(model, "seg_enabled", False):
        _wrap_blocks_with_checkpointing(model.model.seg_module.image_encoder.blocks)


def official_name(name: str) -> str:
    """A parameter name of the training module -> its name in the official checkpoint layout."""
    for prefix in ("module.", "model.base_model.model.", "model."):
        if name.startswith(prefix):
            name = name[len(prefix):]
            if prefix == "module.":
                continue
            break
    return name


def _training_module_class():
    import torch
    from torch import nn

    class LamedTrainingModule(nn.Module):
        """What accelerate wraps: ``forward(batch) -> (loss, parts)`` through the model's ``training_loss``.

        ``self.model`` is the LaMed model, or its PEFT wrapper in stage "lora". Going through ``forward`` lets
        DDP/DeepSpeed see the step.
        """

        def __init__(self, model: nn.Module):
            super().__init__()
            self.model = model

        @property
        def lamed(self) -> nn.Module:
            return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

        def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    labels: torch.Tensor, segs: Optional[torch.Tensor] = None):
            return self.lamed.training_loss(images, input_ids, attention_mask=attention_mask, labels=labels,
                                            segs=segs)

    return LamedTrainingModule


def prepare_model(config: TrainConfig, model):
    """LoRA and trainable parts as ``config`` says, on a loaded LaMed model. Returns the training module.

    The frozen weights keep their dtype (bf16 under bf16 mixed precision); trained weights are fp32.
    """
    import torch
    from torch import nn

    model.train()
    model.requires_grad_(False)
    model.config.use_cache = False
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    wrapped = model
    if config.stage == "lora":
        from peft import LoraConfig, get_peft_model

        targets = list(config.lora_target_modules or official_lora_targets(model))
        lora_config = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=targets,
            bias="none",
            task_type="CAUSAL_LM",
        )
        wrapped = get_peft_model(model, lora_config)  # freezes everything but LoRA
    module = _training_module_class()(wrapped)
    prefixes = config.trainable_prefixes
    for name, param in module.named_parameters():
        if official_name(name).startswith(prefixes):
            param.requires_grad_(True)
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    if config.disable_dropout:
        for sub in module.modules():
            if isinstance(sub, nn.Dropout):
                sub.p = 0.0
    if not any(p.requires_grad for p in module.parameters()):
        raise ConfigError("nothing to train: the stage and trainable_parts select no parameters.")
    return module


def trainable_state_dict(module) -> dict:
    """The trained non-LoRA weights under their official names."""
    return {
        official_name(n): p.detach()
        for n, p in module.named_parameters()
        if p.requires_grad and "lora_" not in n
    }
