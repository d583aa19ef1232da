"""jaxtal: YOLO-style task-aligned label assignment and training losses for JAX.

The public API is exactly ``__all__``. The pipeline, in the order data flows (see ARCHITECTURE.md):
labels -> ``pack_labels``; head maps -> ``decode_head``; ``assign_targets`` (any ``Geometry``)
or ``task_aligned_assign`` (axis-aligned boxes); ``Targets`` with their foreground entry list ->
``loss_from_targets`` / ``detection_loss`` / ``DetectionLoss``. Oriented boxes (``xywhr``):
``pack_rotated_labels``, ``probiou``, ``decode_rotated_boxes``, ``rotated_task_aligned_assign``
(the ``rotated`` geometry), ``obb_loss`` / ``OBBLoss`` (:mod:`jaxtal.obb`). ``jaxtal.kernels``
holds the measured speed tricks beside their plain forms; it is not API.
"""

from jaxtal.anchors import make_anchors
from jaxtal.assigner import assign_targets, task_aligned_assign
from jaxtal.boxes import box_iou, probiou, xywh_to_xyxy, xyxy_to_xywh
from jaxtal.checks import check_values, checked_detection_loss, checked_loss_from_targets, checked_task_aligned_assign
from jaxtal.config import AssignerConfig, LossConfig
from jaxtal.end_to_end import EndToEndLoss, end_to_end_loss, end_to_end_sum_loss, one2many_weight
from jaxtal.geometry import Geometry, axis_aligned, rotated
from jaxtal.head import (
    Head,
    decode_boxes,
    decode_head,
    decode_rotated_boxes,
    dfl_expectation,
    flatten_head,
    ltrb_to_xyxy,
    xyxy_to_ltrb,
)
from jaxtal.labels import COORD_LIMIT, GroundTruth, pack_labels, pack_masks, pack_rotated_labels, valid_rows
from jaxtal.loss import LossParts, detection_loss, detection_targets, loss_from_targets
from jaxtal.module import DetectionLoss
from jaxtal.obb import OBBLoss, OBBLossConfig, OBBLossParts, obb_loss, rotated_task_aligned_assign
from jaxtal.pose import PoseLoss, PoseLossConfig, PoseLossParts, decode_keypoints, pose_loss
from jaxtal.segment import SegmentLoss, SegmentLossConfig, SegmentLossParts, segment_loss
from jaxtal.steps import AssignSteps, assign_steps
from jaxtal.targets import (
    Assignment,
    ForegroundEntries,
    Targets,
    entries_cover_foreground,
    foreground_entries,
    take_rows,
    targets_from_assignment,
    to_assignment,
)

__version__ = "0.2.0"

__all__ = [
    "COORD_LIMIT",
    "AssignSteps",
    "AssignerConfig",
    "Assignment",
    "DetectionLoss",
    "EndToEndLoss",
    "ForegroundEntries",
    "Geometry",
    "GroundTruth",
    "Head",
    "LossConfig",
    "LossParts",
    "OBBLoss",
    "OBBLossConfig",
    "OBBLossParts",
    "PoseLoss",
    "PoseLossConfig",
    "PoseLossParts",
    "SegmentLoss",
    "SegmentLossConfig",
    "SegmentLossParts",
    "Targets",
    "assign_steps",
    "assign_targets",
    "axis_aligned",
    "box_iou",
    "check_values",
    "checked_detection_loss",
    "checked_loss_from_targets",
    "checked_task_aligned_assign",
    "decode_boxes",
    "decode_head",
    "decode_keypoints",
    "decode_rotated_boxes",
    "detection_loss",
    "detection_targets",
    "dfl_expectation",
    "end_to_end_loss",
    "end_to_end_sum_loss",
    "entries_cover_foreground",
    "flatten_head",
    "foreground_entries",
    "loss_from_targets",
    "ltrb_to_xyxy",
    "make_anchors",
    "obb_loss",
    "one2many_weight",
    "pack_labels",
    "pack_masks",
    "pack_rotated_labels",
    "pose_loss",
    "probiou",
    "rotated",
    "rotated_task_aligned_assign",
    "segment_loss",
    "take_rows",
    "targets_from_assignment",
    "task_aligned_assign",
    "to_assignment",
    "valid_rows",
    "xywh_to_xyxy",
    "xyxy_to_ltrb",
    "xyxy_to_xywh",
]
