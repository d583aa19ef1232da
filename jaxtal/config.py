"""Configuration: one frozen, hashable object per task, with Ultralytics' names and defaults.

Every shared default is written here and nowhere else (a task's own fields live in its task
module's config subclass). Functions take a config (or keyword arguments that build one through
:func:`make_config`) and the NNX modules hold one. Being frozen and hashable, a config is a
valid static argument of ``jax.jit``: changing it recompiles, changing array contents never does. Fields are validated when the config is built, so a bad
value fails where it was written, not deep inside a trace.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, TypeVar

import numpy as np

from jaxtal import _validate
from jaxtal import kernels

Layout = Literal["NHWC", "NCHW"]
Overlap = Literal["ciou", "iou"]
_LAYOUTS = ("NHWC", "NCHW")
_OVERLAPS = ("ciou", "iou")


def _set(config, name: str, value) -> None:
  object.__setattr__(config, name, value)  # frozen dataclass: only __post_init__ normalises


@dataclasses.dataclass(frozen=True, kw_only=True)
class AssignerConfig:
  """Settings of the task-aligned assigner.

  Attributes:
    topk: candidates kept per GT (step 3).
    topk2: if set and different from ``topk``, each GT keeps at most ``topk2`` positives after
      conflict resolution, those of highest metric (YOLO26's one-to-one branch: ``topk=7, topk2=1``).
    alpha: exponent of the class score in the align metric.
    beta: exponent of the overlap in the align metric.
    eps: margin of the strict in-box test and guard of the normaliser.
    min_box_side: GT sides shorter than this (pixels) are widened to it about the box centre for
      the candidate test only. ``None`` (default) is Ultralytics 8.4.190's ``strides[1]`` ("STAL"):
      a :class:`LossConfig`'s second stride (its only one for a one-level head), and ``16`` for a
      bare assigner config (the reference assigner's default strides ``(8, 16, 32)``). ``0`` is
      the original YOLOv8 (and the seed walkthrough). :attr:`side_floor` is the value in use.
    overlap: the overlap of GT and predicted box in the metric and conflict resolution:
      ``"ciou"`` (Ultralytics) or ``"iou"`` (MMYOLO, PP-YOLOE). The box loss stays CIoU.
    gt_chunk: run the pairwise steps over blocks of this many GTs (memory
      ``O(b * gt_chunk * max(A, M * topk))``); ``None`` picks one block for small ``M * A`` and
      blocks of 32 otherwise. The assignment does not depend on it.
    windows: run the pairwise steps over each GT's window of nearby anchors (:mod:`jaxtal.windows`)
      instead of every anchor: ``None`` decides by ``M`` (:func:`jaxtal.kernels.windows`), ``True``
      always, ``False`` never. Needs the anchors' grid (the losses pass it; see
      :func:`~jaxtal.assign_targets`) and a geometry with ``bounds``. The assignment does not
      depend on it.
    plain_kernels: names of :mod:`jaxtal.kernels` speed tricks (``jaxtal.kernels.KERNELS``) to
      trace as their plain twins instead: the benchmark's ablation switch, also handy when
      debugging. Results are the same to float32 rounding; speed is not.
  """

  topk: int = 10
  topk2: int | None = None
  alpha: float = 0.5
  beta: float = 6.0
  eps: float = 1e-9
  min_box_side: float | None = None
  overlap: Overlap = "ciou"
  gt_chunk: int | None = None
  windows: bool | None = None
  plain_kernels: tuple[str, ...] = ()

  def __post_init__(self):
    # Validated and stored normalised (ints as int, numbers as float), so equal settings are equal
    # configs and hash alike: one compilation.
    _set(self, "topk", _validate.whole("topk", self.topk, low=1))
    if self.topk2 is not None:
      _set(self, "topk2", _validate.whole("topk2", self.topk2, low=1))
    for name in ("alpha", "beta", "eps"):
      _set(self, name, _validate.finite_number(name, getattr(self, name), low=0.0))
    if self.min_box_side is not None:
      _set(self, "min_box_side", _validate.finite_number("min_box_side", self.min_box_side, low=0.0))
    _validate.one_of("overlap", self.overlap, _OVERLAPS)
    if self.gt_chunk is not None:
      _set(self, "gt_chunk", _validate.whole("gt_chunk", self.gt_chunk, low=1))
    if self.windows is not None and not isinstance(self.windows, bool | np.bool_):
      raise ValueError(f"windows must be None (automatic), True or False, got {self.windows!r}")
    if self.windows is not None:
      _set(self, "windows", bool(self.windows))
    _set(self, "plain_kernels", kernels.check_names(self.plain_kernels))

  @property
  def side_floor(self) -> float:
    """The GT side floor of the candidate test in pixels: ``min_box_side``, or its default."""
    return 16.0 if self.min_box_side is None else self.min_box_side


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossConfig(AssignerConfig):
  """Settings of the detection loss: the head, the gains and the assigner's (inherited).

  Attributes:
    num_classes: ``nc``.
    strides: one stride per head level (input pixels per cell), e.g. ``(8, 16, 32)``.
    reg_max: ``R`` bins per box side; ``1`` is direct ltrb regression with an L1 loss (YOLO26).
    layout: ``"NHWC"`` (Flax) or ``"NCHW"`` (PyTorch) head maps.
    box, cls, dfl: gains of the CIoU, BCE and DFL terms.
    axis_name: inside ``shard_map``/``pmap`` over the batch, the mapped axis name: the
      normaliser and the batch size are reduced over it (see :func:`~jaxtal.detection_loss`).
  """

  num_classes: int
  strides: tuple[float, ...]
  reg_max: int = 16
  layout: Layout = "NHWC"
  box: float = 7.5
  cls: float = 0.5
  dfl: float = 1.5
  axis_name: str | None = None

  def __post_init__(self):
    super().__post_init__()
    _set(self, "num_classes", _validate.whole("num_classes", self.num_classes, low=1))
    _set(self, "reg_max", _validate.whole("reg_max", self.reg_max, low=1))
    _validate.one_of("layout", self.layout, _LAYOUTS)
    # A list is not hashable: store strides as a tuple of numbers.
    _set(self, "strides", _validate.strides(self.strides))
    for name in ("box", "cls", "dfl"):
      _set(self, name, _validate.finite_number(name, getattr(self, name)))

  @property
  def side_floor(self) -> float:
    """``min_box_side``, or by default ``strides[1]`` (``strides[0]`` for a one-level head), as Ultralytics 8.4.190."""
    if self.min_box_side is not None:
      return self.min_box_side
    return float(self.strides[1] if len(self.strides) > 1 else self.strides[0])


_C = TypeVar("C", bound=AssignerConfig)


def make_config(kind: type[_C], config: _C | None, overrides: dict, caller: str) -> _C:
  """``config`` with ``overrides`` applied, or a new ``kind`` from them; one place builds every config.

  Raises TypeError naming an unknown keyword (a typo such as ``top_k=`` would otherwise be lost)
  or a config of the wrong kind.
  """
  names = {f.name for f in dataclasses.fields(kind)}
  unknown = sorted(set(overrides) - names)
  if unknown:
    raise TypeError(f"{caller}: unknown configuration keyword(s) {unknown}; {kind.__name__} takes {sorted(names)}")
  if config is None:
    return kind(**overrides)
  if not isinstance(config, kind):
    raise TypeError(f"{caller}: config must be a jaxtal.{kind.__name__}, got {type(config).__name__}")
  return dataclasses.replace(config, **overrides) if overrides else config

