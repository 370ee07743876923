"""M3D-LaMed: a transformers causal LM (Phi-3 or Llama) that reads a 3D image and can emit a segmentation.

The language model is transformers' own ``Phi3ForCausalLM`` / ``LlamaForCausalLM``. We add, under its inner
``model`` (so that parameter names are exactly the published ones):

* ``model.vision_tower.vision_tower``: 3D ViT (:mod:`.vit3d`),
* ``model.mm_projector``: patch features -> ``N`` image tokens of LLM width (:mod:`.projector`),
* ``model.seg_projector`` and ``model.seg_module``: [SEG] hidden state -> SegVol prompt -> mask logits (:mod:`.segvol`).

Image tokens replace sequence positions ``1..N`` *by position*, exactly as the official code does; position 0 keeps
its token (BOS when the checkpoint's tokenizer adds one, else the first ``<im_patch>``, whose last image feature then
covers the first question token -- as in training). Prompts come from :func:`.tokenizer.encode_prompt`.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from transformers import LlamaForCausalLM, Phi3ForCausalLM

from ..errors import InputError
from .configuration_lamed import LamedConfig, MultimodalConfig
from .projector import build_mm_projector, build_seg_projector
from .segvol import SegVol, SegVolConfig
from .vit3d import VisionTower, ViT3DConfig


def _encoder_config(mm: MultimodalConfig, mlp_dim: int, num_layers: int, num_heads: int,
                    classification: bool) -> ViT3DConfig:
    """A 3D ViT on the model's image grid (both encoders share image size, patches and width)."""
    return ViT3DConfig(
        in_channels=mm.image_channel,
        img_size=tuple(mm.image_size),
        patch_size=tuple(mm.patch_size),
        hidden_size=mm.mm_hidden_size,
        mlp_dim=mlp_dim,
        num_layers=num_layers,
        num_heads=num_heads,
        classification=classification,
    )


def vision_tower_config(mm: MultimodalConfig) -> ViT3DConfig:
    return _encoder_config(mm, mm.vision_mlp_dim, mm.vision_num_layers, mm.vision_num_heads, classification=True)


def segvol_config(mm: MultimodalConfig) -> SegVolConfig:
    encoder = _encoder_config(mm, mm.seg_mlp_dim, mm.seg_num_layers, mm.seg_num_heads, classification=False)
    return SegVolConfig(
        image_encoder=encoder,
        transformer_mlp_dim=mm.seg_decoder_mlp_dim,
        transformer_num_heads=mm.seg_decoder_num_heads,
        iou_head_hidden_dim=mm.seg_iou_head_hidden_dim,
    )


def left_padding(attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """[B] number of leading zeros of a 2D attention mask (a left-padded batch's padding per row); None without."""
    if attention_mask is None or attention_mask.ndim != 2:
        return None
    return (attention_mask.cumsum(dim=1) == 0).sum(dim=1)


class LamedMixin:
    """The multimodal part shared by the Phi-3 and Llama variants. Mixed in before the transformers LM class."""

    multimodal: MultimodalConfig

    def _build_multimodal(self, multimodal: MultimodalConfig) -> None:
        self.multimodal = multimodal
        hidden = self.config.hidden_size
        inner = self.model
        inner.vision_tower = VisionTower(
            vision_tower_config(multimodal),
            select_layer=multimodal.vision_select_layer,
            select_feature=multimodal.vision_select_feature,
        )
        inner.mm_projector = build_mm_projector(multimodal, hidden)
        if multimodal.segmentation_module is not None:
            inner.seg_projector = build_seg_projector(hidden, multimodal.mm_hidden_size)
            inner.seg_module = SegVol(segvol_config(multimodal))

    # ----------------------------------------------------------------------------------------------- images
    @property
    def num_image_tokens(self) -> int:
        return self.multimodal.num_image_tokens

    @property
    def seg_enabled(self) -> bool:
        return hasattr(self.model, "seg_module")

    def check_images(self, images: torch.Tensor) -> None:
        expected = (self.multimodal.image_channel, *self.multimodal.image_size)
        if images.ndim != 5 or tuple(images.shape[1:]) != expected:
            raise InputError(
                f"images must have shape [B, {', '.join(map(str, expected))}], got {list(images.shape)}; "
                "use M3DAssistantLib.geometry.to_model_input to prepare a volume."
            )

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 1, D, H, W] in [0, 1] -> image token embeddings [B, N, hidden]."""
        self.check_images(images)
        param = next(self.model.mm_projector.parameters())
        features = self.model.vision_tower(images.to(param.device, param.dtype))  # [B, 2048, 768]
        return self.model.mm_projector(features)  # [B, N, hidden]

    def splice_image_features(self, input_ids: torch.Tensor, image_features: torch.Tensor,
                              image_start: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token embeddings with positions 1..N replaced by the image features (sequence length unchanged).

        ``image_start`` [B]: where each row's position 0 is (its number of left-padding tokens in a batch); the
        features then replace positions ``image_start + 1 .. image_start + N`` of that row. None: no padding."""
        n = image_features.shape[1]
        first = 0 if image_start is None else int(image_start.max())
        if input_ids.shape[1] - first < n + 1:
            raise InputError(
                f"input_ids has {input_ids.shape[1] - first} positions but the image needs 1 + {n} (position 0, then "
                "the image features); build prompts with M3DAssistantLib.model.tokenizer.encode_prompt."
            )
        embeds = self.get_input_embeddings()(input_ids)  # [B, L, hidden]
        image_features = image_features.to(embeds.dtype)
        if image_start is None or not bool(image_start.any()):
            return torch.cat((embeds[:, :1], image_features, embeds[:, n + 1 :]), dim=1)
        # left-padded batch: the image moves with each row's padding
        positions = image_start.to(embeds.device).view(-1, 1) + 1 + torch.arange(n, device=embeds.device)  # [B, N]
        return embeds.scatter(1, positions.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]), image_features)

    def _multimodal_embeds(
        self,
        input_ids: Optional[torch.Tensor],
        images: Optional[torch.Tensor],
        image_features: Optional[torch.Tensor],
        attention_mask: Optional[torch.Tensor] = None,
    ) -> Optional[torch.Tensor]:
        if input_ids is None or (images is None and image_features is None):
            return None
        if image_features is None:
            image_features = self.encode_images(images)
        return self.splice_image_features(input_ids, image_features, left_padding(attention_mask))

    # ---------------------------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        images: Optional[torch.Tensor] = None,
        image_features: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ):
        """As the LM's forward, plus ``images`` [B,1,D,H,W] (or precomputed ``image_features`` [B,N,hidden]).

        ``position_ids`` is named so that transformers' ``generate`` computes it from the attention mask (a
        left-padded row then starts at position 0, as it would alone)."""
        if inputs_embeds is None and input_ids is not None and input_ids.shape[1] > 1:
            inputs_embeds = self._multimodal_embeds(input_ids, images, image_features, attention_mask)
            if inputs_embeds is not None:
                input_ids = None
        return super().forward(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                               position_ids=position_ids, **kwargs)

    # --------------------------------------------------------------------------------------------- generate
    @torch.no_grad()
    def generate(
        self,
        images: Optional[torch.Tensor] = None,
        input_ids: Optional[torch.Tensor] = None,
        seg_enable: Union[bool, torch.Tensor] = False,
        *,
        image_features: Optional[torch.Tensor] = None,
        seg_image_embedding: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        return_seg_prompt: bool = False,
        **kwargs: Any,
    ):
        """Generate new tokens for a prompt about an image (the official Quickstart's call shape).

        Args:
            images: [B, 1, D, H, W] in [0, 1]; or pass ``image_features`` from :meth:`encode_images` to reuse them.
            input_ids: [B, L] from :func:`~M3DAssistantLib.model.tokenizer.encode_prompt` (N image tokens + text, after
                a BOS where the tokenizer adds one); a batch of prompts of different lengths is left-padded, with
                ``attention_mask`` 0 on the padding (the image tokens then move with each row's padding).
            seg_enable: also return SegVol mask logits [B, 1, D, H, W] for the [SEG] token (-inf where none). A [B]
                bool tensor asks for them for those rows only (the others get -inf); ``images`` /
                ``seg_image_embedding`` then hold just those rows.
            seg_image_embedding: SegVol's image embedding from ``model.model.seg_module.encode_image`` to reuse.
            return_seg_prompt: with ``seg_enable``, also return the SegVol prompt embedding [B, C] of the [SEG]
                tokens (zeros without one), to decode the same prompt on another view of the image (zoom-in).
            **kwargs: passed to transformers' ``generate`` (max_new_tokens, do_sample, temperature, top_p,
                streamer, stopping_criteria, logits_processor, ``cache`` holding a prefix KV cache, ...).

        Returns:
            new token ids [B, T] (the prompt is not repeated), or ``(ids, seg_logits)`` with ``seg_enable`` (a
            per-row tensor with a per-row ``seg_enable``), ``(ids, seg_logits, seg_prompts)`` with
            ``return_seg_prompt``; with ``return_dict_in_generate=True`` transformers' output object (``.sequences``,
            ``.logits``...) instead of ids.
        """
        if input_ids is None:
            raise InputError("generate needs input_ids (the tokenised prompt).")
        if images is None and image_features is None:
            raise InputError("generate needs images [B, 1, D, H, W] or precomputed image_features.")
        seg_rows = seg_enable if isinstance(seg_enable, torch.Tensor) else None
        seg_enable = bool(seg_rows.any()) if seg_rows is not None else bool(seg_enable)
        if seg_rows is not None and image_features is None:
            raise InputError("with a per-row seg_enable, pass image_features for every row (images then hold only "
                             "the rows to segment).")
        if seg_enable and not self.seg_enabled:
            raise InputError("seg_enable=True but this checkpoint has no segmentation module "
                             "(segmentation_module: null).")
        inputs_embeds = self._multimodal_embeds(input_ids, images, image_features, attention_mask)
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape, dtype=torch.long, device=input_ids.device)

        captured: list[torch.Tensor] = []
        hook = None
        if seg_enable:
            # The final-norm output at the last position of each decoding step is the hidden state that predicts
            # the token generated at that step; keep it to find the [SEG]-predicting state afterwards.
            hook = self.model.norm.register_forward_hook(lambda _m, _i, out: captured.append(out[:, -1].detach()))
        try:
            output = super().generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
        finally:
            if hook is not None:
                hook.remove()
        if not seg_enable:
            if seg_rows is None:
                return output
            output_ids = output if isinstance(output, torch.Tensor) else output.sequences
            return output, inputs_embeds.new_full((output_ids.shape[0], 1, *self.multimodal.image_size), float("-inf"))
        # with return_dict_in_generate=True transformers returns an output object; its .sequences are the ids
        output_ids = output if isinstance(output, torch.Tensor) else output.sequences
        predicting = torch.stack(captured[: output_ids.shape[1]], dim=1)  # [B, T, hidden]; entry t predicts token t
        if seg_rows is None:
            seg_logits, prompts = self.segment_from_hidden(
                predicting, output_ids, images=images, seg_image_embedding=seg_image_embedding, return_prompts=True
            )
            return (output, seg_logits, prompts) if return_seg_prompt else (output, seg_logits)
        rows = seg_rows.to(output_ids.device).nonzero().flatten()
        selected, selected_prompts = self.segment_from_hidden(
            predicting[rows], output_ids[rows], images=images, seg_image_embedding=seg_image_embedding,
            return_prompts=True,
        )  # [S, 1, D, H, W], [S, C]
        seg_logits = selected.new_full((output_ids.shape[0], *selected.shape[1:]), float("-inf"))
        seg_logits[rows] = selected
        prompts = selected_prompts.new_zeros((output_ids.shape[0], *selected_prompts.shape[1:]))
        prompts[rows] = selected_prompts
        return (output, seg_logits, prompts) if return_seg_prompt else (output, seg_logits)

    def seg_prompts_from_hidden(
        self, predicting_hidden: torch.Tensor, token_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SegVol prompts [B, C] from hidden states aligned with the tokens they predict, and a has-[SEG] mask [B].

        One [SEG] uses its hidden state, several use their mean (as official), none gives a zero prompt.
        """
        seg_mask = token_ids == self.multimodal.seg_token_id  # [B, T]
        counts = seg_mask.sum(dim=1)  # [B]
        weights = seg_mask.to(predicting_hidden.dtype).unsqueeze(-1)
        mean_hidden = (predicting_hidden * weights).sum(dim=1) / counts.clamp(min=1).unsqueeze(-1).to(weights.dtype)
        prompts = self.model.seg_projector(mean_hidden)  # [B, C]
        has_seg = counts > 0
        prompts = torch.where(has_seg.unsqueeze(-1), prompts, torch.zeros_like(prompts))
        return prompts, has_seg

    def segment_from_hidden(
        self,
        predicting_hidden: torch.Tensor,
        token_ids: torch.Tensor,
        images: Optional[torch.Tensor] = None,
        seg_image_embedding: Optional[torch.Tensor] = None,
        return_prompts: bool = False,
    ):
        """Mask logits [B, 1, D, H, W] for the [SEG] tokens in ``token_ids``; -inf for samples without [SEG].
        ``return_prompts``: ``(logits, SegVol prompts [B, C])``."""
        prompts, has_seg = self.seg_prompts_from_hidden(predicting_hidden, token_ids)
        seg_module = self.model.seg_module
        if seg_image_embedding is None:
            if images is None:
                raise InputError("segmentation needs images or a precomputed seg_image_embedding.")
            self.check_images(images)
            param = next(seg_module.parameters())
            seg_image_embedding = seg_module.encode_image(images.to(param.device, param.dtype))
        logits = seg_module.decode(seg_image_embedding, prompts.to(seg_image_embedding.dtype))
        logits = logits.masked_fill(~has_seg.view(-1, 1, 1, 1, 1), float("-inf"))
        return (logits, prompts) if return_prompts else logits

    # --------------------------------------------------------------------------------------------- training
    def training_loss(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        segs: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The official training forward (BAAI-DCAI/M3D ``LaMed/src/model/language_model/lamed_phi3.py``,
        ``forward``): LM cross-entropy + Dice + BCE (weights 1:1:1).

        The segmentation terms use only the samples whose mask is not empty (``segs[i].sum() != 0``); for those,
        the final-norm hidden state at position ``j`` is the [SEG] prompt when token ``j + 1`` is [SEG] (the
        position that predicts it; several [SEG] use their mean, none a zero prompt), exactly as at inference.
        Dice is the official soft Dice (sigmoid, smooth 1 in the denominator), via MONAI's ``DiceLoss``; BCE is
        ``BCEWithLogits``; mask values -1 count as background.

        Args:
            images: [B, 1, D, H, W] in [0, 1].
            input_ids / attention_mask / labels: [B, L]; labels are -100 where no loss is taken (prompt, padding);
                ``labels=None`` leaves out the LM term.
            segs: [B, 1, D, H, W] binary masks (all zeros = no mask), or None.

        Returns:
            ``(loss, parts)``: the scalar loss and its detached parts ``{"lm", "dice", "bce"}`` (``dice``/``bce``
            only when a sample with a mask is in the batch).
        """
        seg_rows = None
        if segs is not None and self.seg_enabled:
            seg_rows = (segs.flatten(1).sum(dim=1) != 0).nonzero().flatten()  # [S]
            if seg_rows.numel() == 0:
                seg_rows = None
        outputs = self(
            input_ids=input_ids,
            images=images,
            attention_mask=attention_mask,
            labels=labels,
            use_cache=False,
            output_hidden_states=seg_rows is not None,
        )
        loss = outputs.loss if labels is not None else outputs.logits.new_zeros((), dtype=torch.float32)
        parts = {"lm": loss.detach()}
        if seg_rows is None:
            return loss, parts

        from monai.losses import DiceLoss

        hidden = outputs.hidden_states[-1][seg_rows]  # [S, L, hidden], after the final norm
        # hidden[:, j] predicts token j + 1: align the states with the tokens they predict
        prompts, _ = self.seg_prompts_from_hidden(hidden[:, :-1], input_ids[seg_rows, 1:])  # [S, C]
        seg_module = self.model.seg_module
        param = next(seg_module.parameters())
        seg_images = images[seg_rows].to(param.device, param.dtype)
        logits = seg_module(seg_images, prompts.to(param.dtype)).float()  # [S, 1, D, H, W]
        target = segs[seg_rows].to(logits.device, torch.float32).clamp(min=0)
        dice = DiceLoss(sigmoid=True, smooth_nr=0.0, smooth_dr=1.0)(logits, target)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
        parts.update(dice=dice.detach(), bce=bce.detach())
        return loss + dice + bce, parts


class LamedPhi3ForCausalLM(LamedMixin, Phi3ForCausalLM):
    """M3D-LaMed on Phi-3 (``model_type: lamed_phi3``), e.g. GoodBaiBai88/M3D-LaMed-Phi-3-4B."""

    def __init__(self, config, multimodal: MultimodalConfig):
        Phi3ForCausalLM.__init__(self, config)
        self._build_multimodal(multimodal)


class LamedLlamaForCausalLM(LamedMixin, LlamaForCausalLM):
    """M3D-LaMed on Llama-2 (``model_type: lamed_llama``), e.g. GoodBaiBai88/M3D-LaMed-Llama-2-7B."""

    def __init__(self, config, multimodal: MultimodalConfig):
        LlamaForCausalLM.__init__(self, config)
        self._build_multimodal(multimodal)


def build_lamed_model(config: LamedConfig) -> LamedMixin:
    """An uninitialised-weights model for ``config`` (use under ``torch.device('meta')`` before loading)."""
    cls = LamedPhi3ForCausalLM if config.family == "phi3" else LamedLlamaForCausalLM
    model = cls(config.text_config, config.multimodal)
    model.lamed_config = config
    return model
