"""jaxtal: YOLO-style task-aligned label assignment and training losses for JAX.

The public API is exactly ``__all__``. The pipeline, in the order data flows (see ARCHITECTURE.md):
labels -> ``pack_labels`` (``pack_rotated_labels``, ``pack_masks``) -> ``GroundTruth``; a head's
maps -> ``Predictions`` -> ``decode_head``; ``assign_targets`` (any ``Geometry``), or
``task_aligned_assign`` / ``rotated_task_aligned_assign``; ``Targets`` with their foreground entry
list -> the task's loss terms (``jaxtal.terms``) -> ``(total, parts)``.

Five tasks, each with the same entry points (``<task>_targets``, ``<task>_loss_from_targets``,
``<task>_loss``, ``checked_<task>_loss``, the NNX module ``<Task>Loss``, ``<Task>LossConfig``,
``<Task>LossParts``): detection (YOLOv8/11, and YOLO26's ``reg_max = 1`` head), oriented boxes
(``obb``), pose (YOLOv8's ``pose`` and YOLO26's ``pose26``) and instance segmentation (``segment``); end-to-end (NMS-free, YOLOv10/YOLO26)
training is ``end_to_end_loss`` / ``EndToEndLoss`` over any of them. YOLO26's RLE keypoint
term scores residuals with a RealNVP flow: ``flow_log_prob`` over ``FlowParams`` (the NNX module
``RealNVP``; ``flow_params_from_torch`` reads an Ultralytics checkpoint's flow).
``jaxtal.kernels`` holds the measured speed tricks beside their plain forms (``plain_kernels`` in
a config picks the plain ones); it is not API.
"""

from jaxtal.anchors import make_anchors
from jaxtal.assigner import assign_targets, pose_task_aligned_assign, rotated_task_aligned_assign, task_aligned_assign
from jaxtal.boxes import box_iou, ltrb_to_xyxy, probiou, xywh_to_xyxy, xyxy_to_ltrb, xyxy_to_xywh
from jaxtal.checks import check_values, checked_task_aligned_assign
from jaxtal.config import AssignerConfig, LossConfig
from jaxtal.detect import (
    DetectionLoss,
    DetectionLossConfig,
    DetectionLossParts,
    checked_detection_loss,
    checked_loss_from_targets,
    detection_loss,
    detection_loss_from_targets,
    detection_targets,
    loss_from_targets,
)
from jaxtal.end_to_end import EndToEndLoss, end_to_end_loss, end_to_end_sum_loss, one2many_weight
from jaxtal.flow import (
    FlowParams,
    RealNVP,
    flow_log_prob,
    flow_params_from_torch,
    flow_params_to_torch,
    init_flow_params,
)
from jaxtal.geometry import Geometry, GeometryExtra, axis_aligned, keypoint_oks, rotated
from jaxtal.head import (
    Head,
    Predictions,
    decode_boxes,
    decode_head,
    decode_keypoints,
    decode_rotated_boxes,
    dfl_expectation,
    flatten_head,
)
from jaxtal.labels import COORD_LIMIT, GroundTruth, valid_rows
from jaxtal.obb import (
    OBBLoss,
    OBBLossConfig,
    OBBLossParts,
    checked_obb_loss,
    obb_loss,
    obb_loss_from_targets,
    obb_targets,
)
from jaxtal.packing import pack_labels, pack_masks, pack_rotated_labels
from jaxtal.pose import (
    RLE_WEIGHTS_COCO17,
    PoseLoss,
    PoseLossConfig,
    PoseLossParts,
    checked_pose_loss,
    pose_loss,
    pose_loss_from_targets,
    pose_targets,
)
from jaxtal.pose26 import (
    Pose26Loss,
    Pose26LossConfig,
    Pose26LossParts,
    checked_pose26_loss,
    pose26_loss,
    pose26_loss_from_targets,
    pose26_targets,
)
from jaxtal.segment import (
    SegmentLoss,
    SegmentLossConfig,
    SegmentLossParts,
    SemanticSegmentLossParts,
    checked_segment_loss,
    segment_loss,
    segment_loss_from_targets,
    segment_targets,
)
from jaxtal.segment26 import (
    MaskImage,
    Segment26Loss,
    Segment26LossConfig,
    Segment26LossParts,
    checked_segment26_loss,
    mask_iou,
    segment26_loss,
    segment26_loss_from_targets,
    segment26_targets,
)
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
from jaxtal.terms import LossParts

__version__ = "0.2.0"

__all__ = [
    "AssignSteps",
    "AssignerConfig",
    "Assignment",
    "COORD_LIMIT",
    "DetectionLoss",
    "DetectionLossConfig",
    "DetectionLossParts",
    "EndToEndLoss",
    "FlowParams",
    "ForegroundEntries",
    "Geometry",
    "GeometryExtra",
    "GroundTruth",
    "Head",
    "LossConfig",
    "LossParts",
    "MaskImage",
    "OBBLoss",
    "OBBLossConfig",
    "OBBLossParts",
    "Pose26Loss",
    "Pose26LossConfig",
    "Pose26LossParts",
    "PoseLoss",
    "PoseLossConfig",
    "PoseLossParts",
    "Predictions",
    "RLE_WEIGHTS_COCO17",
    "RealNVP",
    "Segment26Loss",
    "Segment26LossConfig",
    "Segment26LossParts",
    "SegmentLoss",
    "SegmentLossConfig",
    "SegmentLossParts",
    "SemanticSegmentLossParts",
    "Targets",
    "assign_steps",
    "assign_targets",
    "axis_aligned",
    "box_iou",
    "check_values",
    "checked_detection_loss",
    "checked_loss_from_targets",
    "checked_obb_loss",
    "checked_pose26_loss",
    "checked_pose_loss",
    "checked_segment26_loss",
    "checked_segment_loss",
    "checked_task_aligned_assign",
    "decode_boxes",
    "decode_head",
    "decode_keypoints",
    "decode_rotated_boxes",
    "detection_loss",
    "detection_loss_from_targets",
    "detection_targets",
    "dfl_expectation",
    "end_to_end_loss",
    "end_to_end_sum_loss",
    "entries_cover_foreground",
    "flatten_head",
    "flow_log_prob",
    "flow_params_from_torch",
    "flow_params_to_torch",
    "foreground_entries",
    "init_flow_params",
    "keypoint_oks",
    "loss_from_targets",
    "ltrb_to_xyxy",
    "make_anchors",
    "mask_iou",
    "obb_loss",
    "obb_loss_from_targets",
    "obb_targets",
    "one2many_weight",
    "pack_labels",
    "pack_masks",
    "pack_rotated_labels",
    "pose26_loss",
    "pose26_loss_from_targets",
    "pose26_targets",
    "pose_loss",
    "pose_loss_from_targets",
    "pose_targets",
    "pose_task_aligned_assign",
    "probiou",
    "rotated",
    "rotated_task_aligned_assign",
    "segment26_loss",
    "segment26_loss_from_targets",
    "segment26_targets",
    "segment_loss",
    "segment_loss_from_targets",
    "segment_targets",
    "take_rows",
    "targets_from_assignment",
    "task_aligned_assign",
    "to_assignment",
    "valid_rows",
    "xywh_to_xyxy",
    "xyxy_to_ltrb",
    "xyxy_to_xywh",
]
