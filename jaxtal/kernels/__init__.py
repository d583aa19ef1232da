"""Speed tricks, each beside the plain form it is tested against and replaceable by it.

Every trick in jaxtal lives in this package. Each has a plain twin written with the well-kept library
(optax, ``jax.nn``, ``jax.lax``, autodiff) with the same numerics to float32 rounding
(``tests/test_kernels.py`` compares values and gradients, and runs
``jax.test_util.check_grads`` on every custom VJP). A trick stays only while
``benchmarks/bench.py``'s ablation rows ("plain <name>": the loss step with that one kernel
replaced by its plain twin) show it saves at least 5% of the loss step; the measured saving is
written beside each one, from ``benchmarks/README.md``. Removed after measuring: the bin maxima read
from whole head-map rows (0%). Task kernels (``TASK_KERNELS``: ``mask_bce_sum`` and
``mask_windows``, the mask term; ``flow_rows`` and ``pair_mask_counts``, the YOLO26 pose and
segmentation steps) are measured on their task's loss step instead, and ``windows`` (the
assigner's windowed pass, :mod:`jaxtal.windows`) on the crowded-scene rows. XLA fuses the plain forms well on GPU
and TPU too; the tricks were measured on XLA:CPU, the only backend CI has.

The loss and the assigner pick each kernel with :func:`select` and the config's static
``plain_kernels`` field (:class:`jaxtal.AssignerConfig`): ``LossConfig(..., plain_kernels=("top_k",))``
traces that trick's plain twin instead, a new compilation and the same results to float32
rounding. The benchmark's ablation rows and the tests use it; nothing is swapped globally.

The tricks live in four modules, one family each; every public name is re-exported here as
``jaxtal.kernels.<name>``:

- :mod:`jaxtal.kernels.loss`: the detection loss's: ``bce_sum``, the shared sigmoid pass (``sigmoid``,
  ``sqrt_sigmoid``, ``whole_map_scores``), ``softmax_stats``, ``split_channels`` and ``two_bin_logit_sum``
  (with ``two_bin_target``).
- :mod:`jaxtal.kernels.assign`: the assigner's: ``top_k`` and the windows decision ``windows`` (``WINDOW_GTS``).
- :mod:`jaxtal.kernels.masks`: the segmentation mask term's: ``mask_bce_sum`` (its twin over
  ``plain_chunk_sum``) and ``mask_windows`` with the box-window machinery (``BoxWindows``, ``box_windows``,
  ``window_items``, ``window_at``, ``gather_windows``, ``scatter_add_windows``, ``entry_groups``) and
  ``windows_cheaper``.
- :mod:`jaxtal.kernels.yolo26`: the YOLO26 pose and segmentation steps': ``flow_rows`` and ``pair_mask_counts``.

The tunables (``TILE``, ``WINDOW_GTS``, ``WINDOW_COST``, ``FLOW_CHUNK``, ``MASK_TILE``, ``MASK_TILE_CHUNK``) are
read at trace time from their own module and are not re-exported here, so that setting one sets what is read
(``jaxtal.kernels.yolo26.FLOW_CHUNK = 4096``).
"""

from __future__ import annotations

import functools

from jaxtal.kernels.assign import plain_top_k, plain_windows, top_k, windows  # noqa: F401  (re-exported)
from jaxtal.kernels.loss import (  # noqa: F401  (re-exported)
    bce_sum, plain_bce_sum, plain_sigmoid, plain_softmax_stats, plain_split_channels, plain_sqrt_sigmoid,
    plain_two_bin_logit_sum, plain_whole_map_scores, sigmoid, softmax_stats, split_channels, sqrt_sigmoid,
    two_bin_logit_sum, two_bin_target, whole_map_scores,
)  # fmt: skip
from jaxtal.kernels.masks import (  # noqa: F401  (re-exported)
    BoxWindows, box_windows, entry_groups, gather_windows, mask_bce_sum, mask_windows, plain_chunk_sum,
    plain_mask_bce_sum, plain_mask_windows, scatter_add_windows, window_at, window_items, windows_cheaper,
)  # fmt: skip
from jaxtal.kernels.yolo26 import (  # noqa: F401  (re-exported)
    flow_chunk, flow_rows, pair_mask_counts, plain_flow_rows, plain_pair_mask_counts,
)  # fmt: skip

# ------------------------------------------------------------------------------------------------

KERNELS = ("bce_sum", "flow_rows", "mask_bce_sum", "mask_windows", "pair_mask_counts", "shared_sigmoid", "softmax_stats", "split_channels", "two_bin_logit_sum", "top_k", "windows")
# Kernels measured on another workload than the detection rows' (a task's loss, or the crowded scenes):
# the detection ablation rows leave them out and bench.py times them there.
TASK_KERNELS = {"flow_rows": "pose26_loss", "mask_bce_sum": "segment_loss", "mask_windows": "segment_loss", "pair_mask_counts": "segment26_loss", "windows": "crowded"}
# The trick each kernel function belongs to, where it is not its own name.
_TRICK_OF = {"sigmoid": "shared_sigmoid", "sqrt_sigmoid": "shared_sigmoid", "whole_map_scores": "shared_sigmoid"}
# Every function select returns, by name: each kernel function and its plain twin.
_FUNCTIONS = {
    "bce_sum": bce_sum, "plain_bce_sum": plain_bce_sum,
    "flow_rows": flow_rows, "plain_flow_rows": plain_flow_rows,
    "mask_bce_sum": mask_bce_sum, "plain_mask_bce_sum": plain_mask_bce_sum,
    "mask_windows": mask_windows, "plain_mask_windows": plain_mask_windows,
    "pair_mask_counts": pair_mask_counts, "plain_pair_mask_counts": plain_pair_mask_counts,
    "sigmoid": sigmoid, "plain_sigmoid": plain_sigmoid,
    "softmax_stats": softmax_stats, "plain_softmax_stats": plain_softmax_stats,
    "split_channels": split_channels, "plain_split_channels": plain_split_channels,
    "sqrt_sigmoid": sqrt_sigmoid, "plain_sqrt_sigmoid": plain_sqrt_sigmoid,
    "top_k": top_k, "plain_top_k": plain_top_k,
    "two_bin_logit_sum": two_bin_logit_sum, "plain_two_bin_logit_sum": plain_two_bin_logit_sum,
    "whole_map_scores": whole_map_scores, "plain_whole_map_scores": plain_whole_map_scores,
    "windows": windows, "plain_windows": plain_windows,
}


def check_names(names, caller: str = "plain_kernels") -> tuple[str, ...]:
  """``names`` as a sorted tuple of known trick names (:data:`KERNELS`); ValueError naming any other."""
  if isinstance(names, str):
    names = (names,)
  try:
    out = tuple(sorted(set(names)))
  except TypeError:
    raise ValueError(f"{caller} must be a tuple of kernel names from jaxtal.kernels.KERNELS, got {names!r}") from None
  unknown = [n for n in out if n not in KERNELS]
  if unknown:
    raise ValueError(f"{caller}: unknown kernel name(s) {unknown}; known: {KERNELS}")
  return out


def select(name: str, plain_kernels: tuple[str, ...] = ()):
  """The kernel function ``name``, or its plain twin when ``plain_kernels`` names its trick.

  ``plain_kernels`` is a config's static field, so the choice is made at trace time: one
  compilation per choice. ``bce_sum`` keeps its analytic gradient under a plain
  ``shared_sigmoid`` but computes that gradient's sigmoid plainly (the trick spans both).
  """
  if _TRICK_OF.get(name, name) in plain_kernels:
    return _FUNCTIONS[f"plain_{name}"]
  if name == "bce_sum":
    return functools.partial(bce_sum, plain_sigmoid_pass="shared_sigmoid" in plain_kernels)
  return _FUNCTIONS[name]
