"""jaxtal: YOLO-style task-aligned label assignment and detection loss for JAX."""

from jaxtal.anchors import make_anchors
from jaxtal.assigner import Assignment, task_aligned_assign
from jaxtal.checks import check_values, checked_detection_loss, checked_task_aligned_assign
from jaxtal.boxes import box_iou, xywh_to_xyxy, xyxy_to_xywh
from jaxtal.head import decode_boxes, flatten_head
from jaxtal.labels import GroundTruth, pack_labels
from jaxtal.loss import LossParts, detection_loss
from jaxtal.module import DetectionLoss

__version__ = "0.1.0"

__all__ = [
    "Assignment",
    "DetectionLoss",
    "GroundTruth",
    "LossParts",
    "box_iou",
    "check_values",
    "checked_detection_loss",
    "checked_task_aligned_assign",
    "decode_boxes",
    "detection_loss",
    "flatten_head",
    "make_anchors",
    "pack_labels",
    "task_aligned_assign",
    "xywh_to_xyxy",
    "xyxy_to_xywh",
]
