"""``ACP.DROPPED_INSTANCES: ignore`` in the model: the boxes of a synthetic image's dropped instances are neither
positives nor negatives for the RPN and the ROI heads (docs/mixing.md "Dropped instances (ACP.DROPPED_INSTANCES)").

- :class:`IgnoreInstances` is the per-image ``Instances`` the mapper builds; it carries the ignore boxes beside its
  fields (a field must have one row per instance) and keeps them through ``.to(device)``, so detectron2's
  ``GeneralizedRCNN`` hands them to the proposal generator and the ROI heads unchanged, as ``gt_instances`` /
  ``targets``. Why not extra gt rows flagged ``gt_ignore``: every stock module left in a config (and every count of
  instances) would take them for objects. Why not a meta-architecture: it would copy ``GeneralizedRCNN.forward``.
- :class:`IgnoreRPN` (``MODEL.PROPOSAL_GENERATOR.NAME``) labels -1 every anchor the matcher made a negative whose
  IoA with an ignore box (intersection / anchor area) is above ``ACP.IGNORE_IOA``, before sampling.
- :class:`IgnoreStandardROIHeads` (``MODEL.ROI_HEADS.NAME``) does the same for proposals, so they are never sampled
  for the box, mask or classification losses.

Positives stay: a kept instance's label is known wherever it is; a dropped box says only "not background here".
Without ignore boxes (real images, images with no dropped instance) both modules label exactly as the stock ones.
``load_cfg`` switches ``RPN`` / ``StandardROIHeads`` to this pair under ``ignore`` (``config.use_ignore_modules``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.proposal_generator import PROPOSAL_GENERATOR_REGISTRY, RPN
from detectron2.modeling.proposal_generator.proposal_utils import add_ground_truth_to_proposals
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.modeling.sampling import subsample_labels
from detectron2.structures import Boxes, Instances, pairwise_ioa, pairwise_iou
from detectron2.utils.events import get_event_storage
from detectron2.utils.memory import retry_if_cuda_oom

__all__ = ["IgnoreInstances", "IgnoreRPN", "IgnoreStandardROIHeads", "ignored_mask", "DEFAULT_IGNORE_IOA"]

DEFAULT_IGNORE_IOA = 0.5


class IgnoreInstances(Instances):
    """``Instances`` plus ``ignore_boxes`` (``Boxes``, any number of rows, not a field), kept by ``.to()``."""

    def __init__(self, image_size: tuple[int, int], ignore_boxes: Boxes | None = None, **kwargs: Any):
        super().__init__(image_size, **kwargs)
        self._ignore_boxes = ignore_boxes if ignore_boxes is not None else Boxes(torch.zeros((0, 4)))

    @property
    def ignore_boxes(self) -> Boxes:
        return self._ignore_boxes

    @classmethod
    def wrap(cls, instances: Instances, ignore_boxes: Boxes) -> IgnoreInstances:
        """The same fields (not copied) with ``ignore_boxes``."""
        out = cls(instances.image_size, ignore_boxes)
        for k, v in instances.get_fields().items():
            out.set(k, v)
        return out

    def to(self, *args: Any, **kwargs: Any) -> IgnoreInstances:
        return IgnoreInstances.wrap(super().to(*args, **kwargs), self._ignore_boxes.to(*args, **kwargs))

    def __str__(self) -> str:
        return f"{super().__str__()[:-1]}, ignore_boxes={len(self._ignore_boxes)})"


def ignore_boxes_of(instances: Instances) -> Boxes | None:
    boxes = getattr(instances, "_ignore_boxes", None)
    return boxes if boxes is not None and len(boxes) > 0 else None


def ignored_mask(ignore: Boxes, boxes: Boxes, threshold: float) -> torch.Tensor:
    """Bool per box of ``boxes``: its IoA with some ignore box (intersection / its own area) is above
    ``threshold``."""
    if len(ignore) == 0 or len(boxes) == 0:
        return torch.zeros(len(boxes), dtype=torch.bool, device=boxes.tensor.device)
    ioa = retry_if_cuda_oom(pairwise_ioa)(ignore.to(boxes.tensor.device), boxes)
    return (ioa > threshold).any(dim=0)


def _ignore_ioa(cfg: Any) -> float:
    return float(cfg.ACP.IGNORE_IOA) if "ACP" in cfg else DEFAULT_IGNORE_IOA


class _IgnoreIoA:
    """The ``ignore_ioa`` option (config ``ACP.IGNORE_IOA``) shared by the ignore-aware RPN and ROI heads; put it
    first among the bases so its ``__init__``/``from_config`` wrap the detectron2 module's."""

    @configurable
    def __init__(self, *, ignore_ioa: float = DEFAULT_IGNORE_IOA, **kwargs: Any):
        super().__init__(**kwargs)
        self.ignore_ioa = float(ignore_ioa)

    @classmethod
    def from_config(cls, cfg: Any, input_shape: dict[str, ShapeSpec]) -> dict[str, Any]:
        ret = super().from_config(cfg, input_shape)
        ret["ignore_ioa"] = _ignore_ioa(cfg)
        return ret


@PROPOSAL_GENERATOR_REGISTRY.register()
class IgnoreRPN(_IgnoreIoA, RPN):
    """detectron2's ``RPN``; anchors that would be negatives inside an image's ignore boxes are labelled -1."""

    @torch.jit.unused
    @torch.no_grad()
    def label_and_sample_anchors(self, anchors: list[Boxes], gt_instances: list[Instances]
                                 ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``RPN.label_and_sample_anchors`` with one step added before sampling (see the class docstring)."""
        anchors = Boxes.cat(anchors)
        gt_labels, matched_gt_boxes = [], []
        for inst in gt_instances:
            gt_boxes_i = inst.gt_boxes
            match_quality_matrix = retry_if_cuda_oom(pairwise_iou)(gt_boxes_i, anchors)
            matched_idxs, gt_labels_i = retry_if_cuda_oom(self.anchor_matcher)(match_quality_matrix)
            gt_labels_i = gt_labels_i.to(device=gt_boxes_i.device)
            del match_quality_matrix
            if self.anchor_boundary_thresh >= 0:
                gt_labels_i[~anchors.inside_box(inst.image_size, self.anchor_boundary_thresh)] = -1
            ignore = ignore_boxes_of(inst)
            if ignore is not None:
                gt_labels_i[(gt_labels_i == 0) & ignored_mask(ignore, anchors, self.ignore_ioa)] = -1
            gt_labels_i = self._subsample_labels(gt_labels_i)
            if len(gt_boxes_i) == 0:
                matched_gt_boxes_i = torch.zeros_like(anchors.tensor)
            else:
                matched_gt_boxes_i = gt_boxes_i[matched_idxs].tensor
            gt_labels.append(gt_labels_i)
            matched_gt_boxes.append(matched_gt_boxes_i)
        return gt_labels, matched_gt_boxes


@ROI_HEADS_REGISTRY.register()
class IgnoreStandardROIHeads(_IgnoreIoA, StandardROIHeads):
    """detectron2's ``StandardROIHeads``; proposals that would be background inside an image's ignore boxes are
    never sampled (no box, class or mask loss)."""

    def _sample_proposals_ignoring(self, matched_idxs: torch.Tensor, matched_labels: torch.Tensor,
                                   gt_classes: torch.Tensor, ignored: torch.Tensor | None
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """``ROIHeads._sample_proposals`` with background proposals in ``ignored`` labelled -1 before sampling."""
        if gt_classes.numel() > 0:
            gt_classes = gt_classes[matched_idxs]
            gt_classes[matched_labels == 0] = self.num_classes
            gt_classes[matched_labels == -1] = -1
        else:
            gt_classes = torch.zeros_like(matched_idxs) + self.num_classes
        if ignored is not None:
            gt_classes[ignored & (gt_classes == self.num_classes)] = -1
        fg, bg = subsample_labels(gt_classes, self.batch_size_per_image, self.positive_fraction, self.num_classes)
        sampled_idxs = torch.cat([fg, bg], dim=0)
        return sampled_idxs, gt_classes[sampled_idxs]

    @torch.no_grad()
    def label_and_sample_proposals(self, proposals: list[Instances], targets: list[Instances]) -> list[Instances]:
        """``ROIHeads.label_and_sample_proposals`` with the ignore step (see the class docstring)."""
        if self.proposal_append_gt:
            proposals = add_ground_truth_to_proposals(targets, proposals)
        proposals_with_gt, num_fg_samples, num_bg_samples = [], [], []
        for proposals_per_image, targets_per_image in zip(proposals, targets):
            has_gt = len(targets_per_image) > 0
            match_quality_matrix = pairwise_iou(targets_per_image.gt_boxes, proposals_per_image.proposal_boxes)
            matched_idxs, matched_labels = self.proposal_matcher(match_quality_matrix)
            ignore = ignore_boxes_of(targets_per_image)
            ignored = None if ignore is None else ignored_mask(ignore, proposals_per_image.proposal_boxes,
                                                               self.ignore_ioa)
            sampled_idxs, gt_classes = self._sample_proposals_ignoring(
                matched_idxs, matched_labels, targets_per_image.gt_classes, ignored)
            proposals_per_image = proposals_per_image[sampled_idxs]
            proposals_per_image.gt_classes = gt_classes
            if has_gt:
                sampled_targets = matched_idxs[sampled_idxs]
                for trg_name, trg_value in targets_per_image.get_fields().items():
                    if trg_name.startswith("gt_") and not proposals_per_image.has(trg_name):
                        proposals_per_image.set(trg_name, trg_value[sampled_targets])
            num_bg_samples.append((gt_classes == self.num_classes).sum().item())
            num_fg_samples.append(gt_classes.numel() - num_bg_samples[-1])
            proposals_with_gt.append(proposals_per_image)
        storage = get_event_storage()
        storage.put_scalar("roi_head/num_fg_samples", np.mean(num_fg_samples))
        storage.put_scalar("roi_head/num_bg_samples", np.mean(num_bg_samples))
        return proposals_with_gt
