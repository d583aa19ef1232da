"""Every library name outside ``jaxtal.__all__`` that the tests reach, in one place.

Test files import these from here, never from the library's private names directly, so that a rename
in the library (issue 21: ``segment._mask_sum`` -> ``segment.mask_sum``, ...) is one edit in this file.
Public submodules the tests use whole (``jaxtal.kernels``, ``jaxtal.segment``) are imported by the test
files themselves.
"""

from __future__ import annotations

from jaxtal import _parallel, pose, segment
from jaxtal.head import xywhr_to_ltrb  # noqa: F401  (moves to jaxtal.boxes)
from jaxtal.obb import obb_targets  # noqa: F401  (returns (head, boxes, targets); becomes jaxtal.obb_targets -> (head, targets))

# jaxtal.segment's mask-term pieces (become segment.mask_sum, entry_boxes, resize_prototypes, chunk_size).
mask_sum = segment._mask_sum
entry_boxes = segment._entry_boxes
resize_prototypes = segment._resize_prototypes
chunk_size = segment._chunk_size

# jaxtal.pose's COCO keypoint sigmas (becomes pose.COCO_SIGMAS).
COCO_SIGMAS = pose._COCO_SIGMAS

# jaxtal._parallel's custom-VJP cross-device sum (a private module: stays private).
global_sum = _parallel.global_sum
