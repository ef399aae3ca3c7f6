"""``sam`` segmenter: Segment Anything through ``transformers.SamModel``/``SamProcessor`` (any size: ViT-B/L/H, or a
local ``save_pretrained`` folder), prompted with the layout boxes, as the paper does.

Per image the vision encoder runs once and all its boxes go through the mask decoder in one batch; of the 3 masks
per box the one with the best predicted IoU is kept, clipped to its box, reduced to its largest connected component.
A box where nothing is left gets an empty mask (the pipeline counts it as a rejected instance).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..generate.common import (
    RANDOM_INIT,
    check_model_ref,
    hf_dtype_kwargs,
    load_pretrained,
    resolve_device,
    resolve_dtype,
    resolve_options,
)
from ..masks import clip_mask_to_box, largest_component
from ..stages import Segmenter, StageContext

logger = logging.getLogger(__name__)

SAM_DEFAULTS: dict[str, Any] = {
    "revision": None,
    "dtype": "auto",  # float16 on CUDA, float32 on CPU
    "device": None,  # default: the stage context's device
    "multimask": True,  # best of 3 masks by predicted IoU (False: SAM's single-mask output)
    "mask_threshold": 0.0,  # on the mask logits
    "clip_to_box": True,
    "largest_component": True,
    "min_area": 1,  # masks with fewer pixels (after clipping) count as empty
    "box_batch": 64,  # boxes per mask-decoder call (memory bound for images with many boxes)
    "image_batch": 4,  # images per vision-encoder call in segment_batch
    RANDOM_INIT: False,  # True: weights missing from the checkpoint only warn (tests; docs/plugins.md)
}


class SamSegmenter(Segmenter):
    """Options: ``model`` (required; hub id such as ``facebook/sam-vit-huge`` or a path), ``revision``, ``dtype``,
    ``device``, ``multimask``, ``mask_threshold``, ``clip_to_box``, ``largest_component``, ``min_area``,
    ``box_batch``, ``image_batch``. The model loads on first use."""

    DEFAULTS = SAM_DEFAULTS

    def __init__(self, ctx: StageContext, **options: Any) -> None:
        super().__init__(ctx, **options)
        o = resolve_options("segmenter sam", options, SAM_DEFAULTS, required=("model",))
        o["model"] = check_model_ref(o["model"], "segmenter sam")
        for k in ("box_batch", "image_batch", "min_area"):
            if int(o[k]) < (0 if k == "min_area" else 1):
                raise ValueError(f"segmenter sam: {k} must be >= {0 if k == 'min_area' else 1}, got {o[k]}")
        self.opts = o
        self._model: Any = None
        self._proc: Any = None

    def settings(self) -> dict[str, Any]:
        return {"name": type(self).__name__, **{k: v for k, v in self.opts.items()
                                                if k not in ("device", "box_batch", "image_batch")
                                                and not (k == RANDOM_INIT and not v)}}

    def load(self) -> None:
        if self._model is not None:
            return
        import torch
        from transformers import SamModel, SamProcessor

        o = self.opts
        self._device = resolve_device(o["device"], self.ctx.device)
        self._dtype = resolve_dtype(o["dtype"], self._device, self.ctx.dtype)
        logger.info("loading SAM %s (revision %s, %s on %s)", o["model"], o["revision"], self._dtype, self._device)
        self._proc = SamProcessor.from_pretrained(o["model"], revision=o["revision"])
        self._model = load_pretrained(SamModel, o["model"], "segmenter sam", bool(o[RANDOM_INIT]),
                                      revision=o["revision"], **hf_dtype_kwargs(self._dtype))
        self._model.to(self._device).eval()
        self._torch = torch

    def segment(self, image: np.ndarray, boxes_xyxy: np.ndarray) -> list[np.ndarray]:
        """One boolean (H, W) mask per absolute XYXY box (empty where SAM finds nothing inside the box)."""
        return self.segment_batch([image], [boxes_xyxy])[0]

    def segment_batch(self, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray]) -> list[list[np.ndarray]]:
        """``segment`` over several images (e.g. the N candidates of one layout), vision encoder batched."""
        if len(images) != len(boxes):
            raise ValueError(f"segmenter sam: {len(images)} images but {len(boxes)} box lists")
        out: list[list[np.ndarray]] = []
        step = int(self.opts["image_batch"])
        for i in range(0, len(images), step):
            out.extend(self._segment_chunk(images[i:i + step], boxes[i:i + step]))
        return out

    def _segment_chunk(self, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray]) -> list[list[np.ndarray]]:
        o = self.opts
        prepared = []
        for img, bx in zip(images, boxes):
            img = np.asarray(img)
            if img.ndim != 3 or img.shape[2] != 3:
                raise ValueError(f"segmenter sam: expected an (H, W, 3) RGB image, got shape {img.shape}")
            bx = np.asarray(bx, dtype=np.float64).reshape(-1, 4)
            h, w = img.shape[:2]
            bx = np.stack([np.clip(bx[:, 0], 0, w), np.clip(bx[:, 1], 0, h), np.clip(bx[:, 2], 0, w),
                           np.clip(bx[:, 3], 0, h)], axis=1) if len(bx) else bx
            prepared.append((img, bx))
        results: list[list[np.ndarray]] = [[np.zeros(img.shape[:2], dtype=bool) for _ in bx] for img, bx in prepared]
        todo = [k for k, (_, bx) in enumerate(prepared) if len(bx)]
        if not todo:
            return results
        self.load()
        torch, proc, model = self._torch, self._proc, self._model
        enc = proc(images=[prepared[k][0] for k in todo], return_tensors="pt")
        with torch.inference_mode():
            emb = model.get_image_embeddings(enc["pixel_values"].to(self._device, self._dtype))
        for j, k in enumerate(todo):
            img, bx = prepared[k]
            orig = enc["original_sizes"][j:j + 1]
            resized = enc["reshaped_input_sizes"][j:j + 1]
            for a in range(0, len(bx), int(o["box_batch"])):
                chunk = bx[a:a + int(o["box_batch"])]
                masks = self._decode(emb[j:j + 1], chunk, orig, resized)
                for t, (m, box) in enumerate(zip(masks, chunk)):
                    results[k][a + t] = self._postprocess(m, box)
        return results

    def _decode(self, emb: Any, boxes: np.ndarray, orig: Any, resized: Any) -> np.ndarray:
        """Best mask per box at the original image size, boolean (n, H, W)."""
        torch, proc, model, o = self._torch, self._proc, self._model, self.opts
        h, w = (int(v) for v in orig[0])
        rh, rw = (int(v) for v in resized[0])
        # boxes in the coordinates of the resized model input (what SamProcessor does with input_boxes)
        scaled = boxes.astype(np.float64) * np.array([rw / w, rh / h, rw / w, rh / h])
        input_boxes = torch.as_tensor(scaled, dtype=self._dtype, device=self._device)[None]
        with torch.inference_mode():
            out = model(image_embeddings=emb, input_boxes=input_boxes, multimask_output=bool(o["multimask"]))
        pred = out.pred_masks[0]  # (n, m, h', w')
        if pred.shape[1] > 1:
            best = out.iou_scores[0].argmax(dim=-1)
            pred = pred[torch.arange(pred.shape[0], device=pred.device), best]
        else:
            pred = pred[:, 0]
        masks = proc.post_process_masks([pred[:, None].float().cpu()], orig, resized,
                                        mask_threshold=float(o["mask_threshold"]))[0]
        return masks[:, 0].numpy().astype(bool)

    def _postprocess(self, mask: np.ndarray, box: np.ndarray) -> np.ndarray:
        o = self.opts
        if o["clip_to_box"]:
            mask = clip_mask_to_box(mask, box)
        if o["largest_component"]:
            mask = largest_component(mask)
        if int(mask.sum()) < int(o["min_area"]):
            return np.zeros_like(mask, dtype=bool)
        return mask
