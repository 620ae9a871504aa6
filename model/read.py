"""`READForCausalLM`: LLaVA-1.5 + SAM + SasP, the teacher-forced forward (training / validation) and inference.

Layout (state-dict names equal the released checkpoints, spec §1.3):

- ``model`` (:class:`READModel`, a transformers `LlamaModel` subclass): ``embed_tokens``, ``layers``, ``norm``,
  ``vision_tower`` (CLIP, frozen), ``mm_projector``, ``visual_model`` (SAM from `segment_anything`) and
  ``text_hidden_fcs`` (Linear H->H, ReLU, Linear H->256, Dropout 0);
- ``lm_head`` (not tied).

The SEG state is the original's (spec §2.4): the final, normed hidden state of the token *before* each ``[SEG]``,
i.e. the state whose LM-head output predicts ``[SEG]``. The checkpoints were trained on it.

Teacher-forced forward, per batch of T conversation rows over B images (``offset`` [B+1] groups rows per image):

1. CLIP + projector once per image, rows take their image's features; one LLaMA pass over the spliced rows;
2. every ``[SEG]`` of every row gives one SEG state (rows may hold several: each SEG gets its own SasP, its own
   points and its own mask, which the original mis-paired), ``text_hidden_fcs`` runs on those states only;
3. SasP on the raw states: the row's own 576 image states (located from that row's ``-200`` position, which
   is right after its ``<im_start>``) and that row's own image size;
4. SAM's image encoder runs once per image (no grad); masks are decoded per image and post-processed in float32
   to the original size;
5. CE (plain mean over the batch's answer tokens, in the logits' dtype) + weighted per-mask BCE and Dice.

Deviations from the original, all keeping its numbers where it worked: no hard-coded CUDA device (inputs follow the model's
device), CLIP runs once per image instead of once per row (same features), SasP uses each row's own image size and
pairs every SEG with its own row, ``text_hidden_fcs`` is applied to the selected states only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin
from transformers.models.llama.modeling_llama import LlamaPreTrainedModel

from .config import READConfig
from .llava import LlavaLlamaModel, MultimodalInputs
from .losses import causal_lm_ce, mask_losses, read_total_loss
from .sam import build_sam, predict_masks
from .sasp import SasPConfig, seg_image_similarity, similarity_as_points


def build_text_hidden_fcs(hidden_size: int, out_dim: int) -> nn.ModuleList:
    """The SEG projection: one Sequential Linear(H,H), ReLU, Linear(H,out_dim), Dropout(0.0)."""
    return nn.ModuleList(
        [
            nn.Sequential(
                nn.Linear(hidden_size, hidden_size),
                nn.ReLU(inplace=True),
                nn.Linear(hidden_size, out_dim),
                nn.Dropout(0.0),
            )
        ]
    )


def seg_state_mask(expanded_ids: torch.Tensor, seg_token_idx: int) -> torch.Tensor:
    """[T, L'] bool: True at every position whose *next* token is ``[SEG]`` (the token before each SEG).

    On spliced sequences this equals the original's mask (``input_ids[:, 1:] == SEG`` padded with 575 False on
    the left and 1 on the right) whenever ``[SEG]`` follows the image, which the prompt layout guarantees.
    """
    mask = torch.zeros_like(expanded_ids, dtype=torch.bool)
    mask[:, :-1] = expanded_ids[:, 1:] == seg_token_idx
    return mask


def gather_image_states(
    hidden: torch.Tensor, rows: torch.Tensor, image_start: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """[S, N, H]: for each selected row, its N image-token states starting at that row's image position."""
    cols = image_start[rows][:, None] + torch.arange(num_tokens, device=hidden.device)[None]
    return hidden[rows[:, None], cols]


class READModel(LlavaLlamaModel):
    """LLaVA-1.5 body + SAM (``visual_model``) + the SEG projection (``text_hidden_fcs``)."""

    def __init__(self, config: READConfig) -> None:
        super().__init__(config)
        self.visual_model = build_sam(config.sam_variant)
        self.text_hidden_fcs = build_text_hidden_fcs(config.hidden_size, config.out_dim)
        # SAM keeps segment-anything's own init and text_hidden_fcs PyTorch's default Linear init (what the
        # original gives a fresh projection); the generic HF init below only touches the LLaVA parts.
        for module in list(self.visual_model.modules()) + list(self.text_hidden_fcs.modules()):
            module._read_keeps_own_init = True

    def _init_weights(self, module: nn.Module) -> None:
        if getattr(module, "_read_keeps_own_init", False):
            return
        super()._init_weights(module)


class READForCausalLM(LlamaPreTrainedModel, GenerationMixin):
    """READ: see the module docstring. Built from a `READConfig`; loads released directories with
    :meth:`from_pretrained` and writes them with :meth:`save_pretrained`.

    `GenerationMixin` is only there for PEFT's ``CAUSAL_LM`` wrapper; READ's generation is :meth:`generate_masks`.
    """

    config_class = READConfig
    config: READConfig
    base_model_prefix = "model"
    _no_split_modules = ["LlamaDecoderLayer"]
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]

    def __init__(self, config: READConfig) -> None:
        super().__init__(config)
        self.model = READModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if getattr(module, "_read_keeps_own_init", False):
            return
        super()._init_weights(module)

    # ------------------------------------------------------------------ HF plumbing
    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            "READForCausalLM.generate is not READ's inference: use model.generate_masks(images_clip, images, "
            "input_ids, sam_mask_shape_list, max_new_tokens=...) (docs/interfaces.md, 'Inference API')"
        )

    @property
    def sam(self) -> nn.Module:
        return self.model.visual_model

    # ------------------------------------------------------------------ shared pieces
    @torch.no_grad()
    def encode_images_sam(self, images: torch.Tensor) -> torch.Tensor:
        """SAM image embeddings [B,256,64,64], one image at a time (memory), in SAM's dtype, no grad."""
        encoder = self.model.visual_model.image_encoder
        param = next(encoder.parameters())
        out = [encoder(img[None].to(device=param.device, dtype=param.dtype)) for img in images]
        if not out:
            raise ValueError("encode_images_sam: got an empty batch of images")
        return torch.cat(out, 0)

    def language_model_forward(
        self, mm: MultimodalInputs, past_key_values: Any = None, use_cache: bool = False
    ) -> Any:
        """The LLaMA decoder on spliced inputs; returns transformers' output (``last_hidden_state`` is post-norm)."""
        return self.model(
            inputs_embeds=mm.inputs_embeds,
            attention_mask=mm.attention_mask,
            position_ids=mm.position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
        )

    def seg_prompts(
        self,
        seg_hidden: torch.Tensor,
        image_hidden: torch.Tensor,
        image_sizes: Sequence[Sequence[int]],
        sasp_config: SasPConfig | None = None,
    ) -> dict[str, torch.Tensor]:
        """SEG embeddings and SasP points for S SEG states.

        ``seg_hidden`` [S,H] raw last-layer SEG states, ``image_hidden`` [S,576,H] the image states of each SEG's
        row, ``image_sizes`` one (H, W) per SEG. Returns ``text_embeds`` [S,256] (``text_hidden_fcs``),
        ``similarity`` [S,576], ``points`` [S,P,2] float32 and ``labels`` [S,P] int64.
        """
        cfg = sasp_config or self.config.sasp_config()
        text_embeds = self.model.text_hidden_fcs[0](seg_hidden)
        similarity = seg_image_similarity(image_hidden, seg_hidden)
        points, labels = similarity_as_points(similarity, [tuple(int(v) for v in s) for s in image_sizes], cfg)
        return {"text_embeds": text_embeds, "similarity": similarity, "points": points, "labels": labels}

    def decode_masks(
        self,
        image_embedding: torch.Tensor,
        points: torch.Tensor,
        labels: torch.Tensor,
        text_embeds: torch.Tensor,
        input_size: Sequence[int],
        original_size: Sequence[int],
    ) -> torch.Tensor:
        """SAM prompt encoder + mask decoder for one image: float32 logits [n, H, W]."""
        return predict_masks(
            self.model.visual_model,
            image_embedding,
            points,
            labels,
            text_embeds,
            tuple(int(v) for v in input_size),
            tuple(int(v) for v in original_size),
        )

    # ------------------------------------------------------------------ teacher-forced forward
    def forward(
        self,
        images: torch.Tensor | None = None,
        images_clip: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        attention_masks: torch.Tensor | None = None,
        offset: torch.Tensor | Sequence[int] | None = None,
        masks_list: Sequence[torch.Tensor] | None = None,
        sam_mask_shape_list: Sequence[Sequence[Sequence[int]]] | None = None,
        inference: bool = False,
        **ignored: Any,
    ) -> dict[str, Any]:
        """Training (``inference=False``: losses + masks) or teacher-forced validation (masks only).

        Extra keys of the collate output (``image_paths``, ``conversation_list``, ``exists``, ...) and PEFT's
        ``attention_mask``/``inputs_embeds``/``output_*`` arguments are accepted and ignored.
        """
        if images is None or images_clip is None or input_ids is None or sam_mask_shape_list is None:
            raise ValueError(
                "READForCausalLM.forward needs images, images_clip, input_ids, offset and sam_mask_shape_list "
                "(the collate output, docs/interfaces.md)"
            )
        seg_id = self.config.require_seg_token_idx()
        device = self.lm_head.weight.device
        input_ids = input_ids.to(device)
        num_images = len(sam_mask_shape_list)
        offset_t = torch.as_tensor(offset if offset is not None else [0, input_ids.shape[0]], device=device)
        counts = offset_t.diff()
        if (
            offset_t.numel() != num_images + 1
            or int(offset_t[0]) != 0
            or int(offset_t[-1]) != input_ids.shape[0]
            or bool((counts < 0).any())
            or images.shape[0] != num_images
            or images_clip.shape[0] != num_images
        ):
            raise ValueError(
                f"forward: offset {offset_t.tolist()} must run from 0 to the {input_ids.shape[0]} rows of input_ids "
                f"in {num_images} steps (one per image: images {tuple(images.shape)}, images_clip "
                f"{tuple(images_clip.shape)}, sam_mask_shape_list of {num_images})"
            )
        if not inference and (labels is None or masks_list is None):
            raise ValueError("forward: labels and masks_list are required for training (inference=False)")
        row_image = torch.repeat_interleave(torch.arange(num_images, device=device), counts)  # [T]
        gt_masks = list(masks_list) if masks_list is not None else None
        if gt_masks is not None:
            # n_i must equal image i's [SEG] count (the original asserted it); checked before any heavy work
            seg_per_image = torch.zeros(num_images, dtype=torch.long, device=device).index_add_(
                0, row_image, (input_ids == seg_id).sum(1)
            )
            if len(gt_masks) != num_images:
                raise ValueError(f"forward: masks_list has {len(gt_masks)} entries for {num_images} images")
            for i, gt in enumerate(gt_masks):
                if gt.shape[0] != int(seg_per_image[i]):
                    raise ValueError(
                        f"forward: image {i} has {int(seg_per_image[i])} [SEG] tokens but {gt.shape[0]} "
                        f"ground-truth masks in masks_list"
                    )

        image_embeddings = self.encode_images_sam(images)
        features = self.model.encode_images(images_clip)[row_image]  # [T, 576, H]
        mm = self.model.prepare_multimodal(
            input_ids,
            features,
            attention_masks.to(device) if attention_masks is not None else None,
            labels.to(device) if labels is not None and not inference else None,
        )
        hidden = self.language_model_forward(mm).last_hidden_state  # [T, L', H], post-norm

        rows, positions = seg_state_mask(mm.expanded_ids, seg_id).nonzero(as_tuple=True)  # row-major order
        seg_image = row_image[rows]
        sizes = [sam_mask_shape_list[i][1] for i in seg_image.tolist()]
        image_hidden = gather_image_states(hidden, rows, mm.image_start, self.model.vision_tower.num_patches)
        prompts = self.seg_prompts(hidden[rows, positions], image_hidden, sizes)

        per_image = torch.bincount(seg_image, minlength=num_images).tolist()
        pred_masks = []
        for i, (text_i, pts_i, lab_i) in enumerate(
            zip(
                prompts["text_embeds"].split(per_image),
                prompts["points"].split(per_image),
                prompts["labels"].split(per_image),
            )
        ):
            input_size, original_size = sam_mask_shape_list[i][0], sam_mask_shape_list[i][1]
            pred_masks.append(
                self.decode_masks(image_embeddings[i : i + 1], pts_i, lab_i, text_i, input_size, original_size)
            )

        if inference:
            return {"pred_masks": pred_masks, "gt_masks": gt_masks}
        logits = self.lm_head(hidden)
        ce = causal_lm_ce(logits, mm.labels)
        bce, dice = mask_losses(pred_masks, [g.to(p.device) for p, g in zip(pred_masks, gt_masks)])
        out: dict[str, Any] = read_total_loss(ce, bce.to(ce.device), dice.to(ce.device), self.config.loss_weights())
        out.update(pred_masks=pred_masks, gt_masks=gt_masks, logits=logits, labels=mm.labels)
        return out

    # ------------------------------------------------------------------ inference / io
    def generate_masks(self, *args: Any, **kwargs: Any) -> list:
        """Greedy generation with the KV cache + one mask per ``[SEG]`` (see `model.generation.generate_masks`)."""
        from .generation import generate_masks

        return generate_masks(self, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, *args: Any, **kwargs: Any) -> "READForCausalLM":
        """Load a released READ / SESAME / LISA (or plain LLaVA-1.5) directory; see `model.loading.load_read`."""
        import warnings

        from .loading import load_read

        if args:
            raise TypeError("READForCausalLM.from_pretrained takes the directory positionally, the rest by keyword")
        # the original's call (transformers 4.31) spelled some arguments differently or needed ones we do not
        if "torch_dtype" in kwargs:
            kwargs.setdefault("dtype", kwargs.pop("torch_dtype"))
        if "default_im_start_token_idx" in kwargs:
            kwargs.setdefault("im_start_token_idx", kwargs.pop("default_im_start_token_idx"))
        ignored = sorted(k for k in ("low_cpu_mem_usage", "device_map", "model_max_length") if k in kwargs)
        if ignored:
            warnings.warn(f"READForCausalLM.from_pretrained ignores {ignored} (loading is always on the meta device; "
                          f"pass device=...)", stacklevel=2)
            for k in ignored:
                kwargs.pop(k)
        return load_read(pretrained_model_name_or_path, **kwargs)

    def save_pretrained(self, save_directory: str, max_shard_size: int | str = "5GB", **kwargs: Any) -> None:
        """Write the released layout (see `model.loading.save_read`); CLIP is not written."""
        from .loading import save_read

        if kwargs:
            raise TypeError(f"READForCausalLM.save_pretrained: unsupported arguments {sorted(kwargs)}")
        save_read(self, save_directory, max_shard_size=max_shard_size)


__all__ = ["READForCausalLM", "READModel", "build_text_hidden_fcs", "seg_state_mask", "gather_image_states"]
