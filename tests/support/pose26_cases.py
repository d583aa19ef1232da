"""Deterministic YOLO26 pose parity cases shared by the golden fixtures and the live parity tests.

The YOLO26 counterpart of ``pose_cases.py`` (whose label and keypoint helpers it reuses). NumPy
only (plus jaxtal's host-side packer); never imports torch.

A loss case is ``dict(name, inputs, config)`` with ``inputs``: ``feats``, a list of NCHW ``(b, 4R +
nc, H, W)`` float32 head maps; ``kpts``, NCHW ``(b, K * D, H, W)`` raw keypoint maps (YOLO26's decode:
``x, y = raw + anchor`` in grid units); ``kpt_sigmas``, NCHW ``(b, 2K, H, W)`` sigma logits (channel
``k * 2 + c``); ``label_rows (n, 6)`` and ``keypoints (n, K, Dg)`` as in ``pose_cases``; and the
flow's parameters ``flow`` (a dict of the twelve stacked arrays of :class:`jaxtal.FlowParams`,
``(6, in, out)`` weights; one flow for every case, :func:`flow_arrays`). An end-to-end case adds ``feats_o2o``, ``kpts_o2o``, ``kpt_sigmas_o2o``
(the one-to-one branch). ``config``: ``num_classes, strides, kpt_shape, sigmas, reg_max, topk, topk2,
min_box_side, class_weights, max_boxes`` (end-to-end: ``epoch, epochs`` instead of ``topk, topk2``);
``min_box_side`` None means each side's default (Ultralytics: ``strides[1]``).

The flow is drawn with weights about 50 times the 0.01-gain init, so the flow's log-density
varies with the residual and the RLE term's gradient reaches every flow parameter. Keypoints lie
inside the image; anchors inside a GT box predict keypoints near that GT's (so the OKS of
candidate pairs is far from float32's denormal range: XLA on CPU flushes denormals to 0, PyTorch
keeps them, and metrics that small would order the top-k differently).

Fixtures: ``tests/fixtures/pose26_<case>.npz``, ``pose26_e2e_<case>.npz``, ``pose26_assign_<case>.npz`` and the
flow every case reads, ``pose26_flow.npz``.
"""

from __future__ import annotations

import math

import numpy as np

from support import cases, pose_cases
import jaxtal

POSE26_CASES = ("coco", "k5", "k4_d2", "invisible", "gate", "side_default", "reg_max16", "rle_clamped", "empty_images",
                "empty_batch")
E2E_CASES = ("first_epoch", "last_epoch", "empty_images")
# PoseTaskAlignedAssigner alone, on the decoded predictions of these loss cases.
ASSIGN_CASES = ("gate", "invisible", "k4_d2")
# Cases whose foreground depends on the order among tied zero-metric top-k candidates (none so far).
TIE_CASES: tuple[str, ...] = ()

_STRIDES = (8, 16, 32)
FLOW_FIELDS = ("s_w1", "s_b1", "s_w2", "s_b2", "s_w3", "s_b3", "t_w1", "t_b1", "t_w2", "t_b2", "t_w3", "t_b3")
_FLOW_SIZES = ((2, 64), (64, 64), (64, 2))
FLOW_LAYERS = 6


# ----------------------------------------------------------------------------- the flow


def flow_arrays(gain: float = 0.5) -> dict[str, np.ndarray]:
  """The cases' flow (one for every case): twelve stacked float32 arrays (``s_w1 (6, 2, 64)``, ...), weights
  uniform in ``+-gain sqrt(6 / (fan_in + fan_out))`` (Xavier, 50 times the reference's init gain), biases in
  ``+-0.5 / sqrt(fan_in)``, every value rounded to a float16 (so its file stores it exactly in half the bytes)."""
  rng = np.random.default_rng(2026)
  out = {}
  for net in ("s", "t"):
    for j, (fan_in, fan_out) in enumerate(_FLOW_SIZES, start=1):
      bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
      w = rng.uniform(-bound, bound, (FLOW_LAYERS, fan_in, fan_out))
      bias = rng.uniform(-0.5, 0.5, (FLOW_LAYERS, fan_out)) / math.sqrt(fan_in)
      out[f"{net}_w{j}"], out[f"{net}_b{j}"] = (a.astype(np.float16).astype(np.float32) for a in (w, bias))
  return out


# Flow gradients of the (6, 64, 64) hidden layers are stored in the fixtures as PROJECTIONS projections on fixed
# Gaussian directions (and the gradient's 2-norm), the other fields in full: the files stay small, and an error
# in those gradients would not be orthogonal to every direction. The live tests compare them in full.
PROJECTED = ("s_w2", "t_w2")
PROJECTIONS = 8


def flow_directions(field: str) -> np.ndarray:
  """``(PROJECTIONS, n)`` float64 standard-normal directions for the flow field ``field`` (``n`` its size)."""
  size = FLOW_LAYERS * 64 * 64
  return np.random.default_rng([7, FLOW_FIELDS.index(field)]).standard_normal((PROJECTIONS, size))


def project_flow_grads(grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The fixtures' form of flow gradients: ``PROJECTED`` fields as ``<field>_proj (PROJECTIONS,)`` and
  ``<field>_norm ()``, the others as they are (float32)."""
  out = {}
  for k, v in grads.items():
    v = np.asarray(v, np.float64)
    if k in PROJECTED:
      out[f"{k}_proj"] = (flow_directions(k) @ v.reshape(-1)).astype(np.float32)
      out[f"{k}_norm"] = np.float32(np.linalg.norm(v))
    else:
      out[k] = v.astype(np.float32)
  return out


def flow_to_torch_layout(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Stacked arrays -> the key names and shapes of Ultralytics' ``RealNVP`` state dict (``s.{i}.{0,2,4}.weight``
  ``(out, in)``, ``.bias``), written out here independently of jaxtal."""
  out = {}
  for name, value in arrays.items():
    net, kind, j = name[0], name[2], int(name[-1])
    for i in range(FLOW_LAYERS):
      key = f"{net}.{i}.{2 * (j - 1)}.{'weight' if kind == 'w' else 'bias'}"
      out[key] = np.ascontiguousarray(value[i].T if kind == "w" else value[i])
  return out


def flow_from_torch_layout(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The inverse of :func:`flow_to_torch_layout` (for gradients read from the reference)."""
  out = {}
  for net in ("s", "t"):
    for j in range(1, 4):
      for kind in ("w", "b"):
        key = lambda i: f"{net}.{i}.{2 * (j - 1)}.{'weight' if kind == 'w' else 'bias'}"  # noqa: E731
        stack = [np.asarray(state[key(i)], np.float32) for i in range(FLOW_LAYERS)]
        out[f"{net}_{kind}{j}"] = np.stack([a.T for a in stack] if kind == "w" else stack)
  return {k: out[k] for k in FLOW_FIELDS}


# ----------------------------------------------------------------------------- maps


def keypoint_maps(rng, rows, keypoints, batch, kpt_shape, image, *, min_side=0.0, jitter=0.08, sigma=(-0.5, 1.0)):
  """Per-level NCHW raw keypoint maps ``(b, K * D, H, W)`` and sigma-logit maps ``(b, 2K, H, W)``, float32.

  Noise everywhere; every anchor inside a GT box (sides widened to ``min_side``) follows the GT it
  is most central in: its raw x, y decode (``raw + anchor``, grid units) to that GT's keypoints
  jittered by ``jitter`` times the box size, its visibility logits lean towards the GT's labels.
  Sigma logits are normal with mean and deviation ``sigma`` everywhere.
  """
  k, d = kpt_shape
  boxes = cases.rows_xyxy(rows, image)
  ctr, half = (boxes[:, :2] + boxes[:, 2:]) / 2, np.maximum(boxes[:, 2:] - boxes[:, :2], min_side) / 2
  img_of = rows[:, 0].astype(int)
  kp_px = keypoints[..., :2].astype(np.float64) * image
  labelled = keypoints[..., 2] != 0 if keypoints.shape[-1] == 3 else np.ones(keypoints.shape[:2], bool)
  kmaps, smaps = [], []
  for (h, w), s in zip(cases.level_shapes(image, _STRIDES), _STRIDES):
    f = rng.normal(0.0, 0.8, (batch, h * w, k, d))
    if d == 3:
      f[..., 2] = rng.normal(0.0, 1.5, (batch, h * w, k))
    ys, xs = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    anc = np.stack([xs, ys], -1).reshape(-1, 2)  # grid units
    for img in range(batch):
      idx = np.flatnonzero(img_of == img)
      if idx.size == 0:
        continue
      reach = (np.abs(anc[:, None, :] * s - ctr[None, idx]) / half[None, idx]).max(-1)  # < 1 inside the box
      own = idx[np.argmin(reach, axis=1)]
      hit = np.flatnonzero(reach.min(axis=1) < 1)
      size = 2 * half[own[hit]] / s  # (n_hit, 2) grid units
      target = kp_px[own[hit]] / s + rng.normal(0, jitter, (hit.size, k, 2)) * size[:, None, :]
      f[img, hit, :, :2] = target - anc[hit, None, :]
      if d == 3:
        f[img, hit, :, 2] = np.where(labelled[own[hit]], 2.0, -2.0) + rng.normal(0, 1.0, (hit.size, k))
    sig = rng.normal(sigma[0], sigma[1], (batch, h * w, k * 2))
    kmaps.append(np.ascontiguousarray(f.reshape(batch, h, w, k * d).transpose(0, 3, 1, 2)).astype(np.float32))
    smaps.append(np.ascontiguousarray(sig.reshape(batch, h, w, k * 2).transpose(0, 3, 1, 2)).astype(np.float32))
  return kmaps, smaps


def _gate_rows() -> np.ndarray:
  """A 128 x 128 input's rows: a 110 px box (above 12 strides of level 0: levels 1 and 2 only), a thin
  4 x 60 px box whose only level (0) has no anchor centre inside it (the gate's fallback: its
  level-1 candidates), a 20 px box (level 0 only) and a 50 px box (levels 0 and 1)."""
  px = np.array([
      [0, 0, 64, 62, 110, 110],
      [0, 0, 24, 32, 4, 60],
      [1, 0, 40, 84, 20, 20],
      [1, 0, 90, 40, 50, 50],
  ], np.float64)
  px[:, 2:] /= 128.0
  return px.astype(np.float32)


def _case_setup(name: str) -> tuple[dict, dict]:
  """The config and the label options of case ``name``."""
  cfg = dict(
      num_classes=1, strides=_STRIDES, kpt_shape=(5, 3), sigmas=None, reg_max=1, topk=10, topk2=None,
      min_box_side=0.0, class_weights=None,
  )
  opt = dict(batch=2, counts=(3, 4), side=(16, 44), image=64, dims=3, keypoints={}, maps={}, clusters=True)
  if name == "coco":
    cfg.update(kpt_shape=(17, 3))
    opt.update(side=(28, 56), maps=dict(jitter=0.04))
  elif name == "k5":
    cfg.update(num_classes=2)
  elif name == "k4_d2":
    cfg.update(kpt_shape=(4, 2), sigmas=(0.05, 0.1, 0.2, 0.4))
    opt.update(dims=2)
  elif name == "invisible":
    opt.update(keypoints=dict(p_visible=0.4, invisible_rows=(1, 4)))
  elif name == "gate":
    opt.update(image=128, counts=(2, 2))
  elif name == "side_default":
    cfg.update(min_box_side=None, num_classes=3)
    opt.update(side=(3, 30))
  elif name == "reg_max16":
    cfg.update(reg_max=16, min_box_side=16.0)
  elif name == "rle_clamped":
    # Keypoints right on the GT and small sigmas: the RLE sum is negative, so the term is clamped to 0.
    opt.update(counts=(2, 1), clusters=False, maps=dict(jitter=0.002, sigma=(-4.0, 0.3)))
  elif name == "empty_images":
    opt.update(batch=3, counts=(0, 3, 0))
  elif name == "empty_batch":
    opt.update(counts=(0, 0))
  else:
    raise KeyError(f"unknown pose26 case {name!r}; expected one of {POSE26_CASES}")
  return cfg, opt


def _labels(rng, name, cfg, opt):
  """``(rows, keypoints)`` of a case."""
  if name == "gate":
    rows = _gate_rows()
  else:
    rows = cases.random_rows(rng, opt["counts"], cfg["num_classes"], opt["image"], opt["side"], clusters=opt["clusters"])
  keypoints = pose_cases.random_keypoints(rng, rows, cfg["kpt_shape"][0], opt["dims"], **opt["keypoints"])
  return rows, keypoints


def _branch(rng, rows, keypoints, cfg, opt) -> tuple[list, list, list]:
  side = 0.0 if cfg["min_box_side"] is None else cfg["min_box_side"]
  default_side = float(cfg["strides"][1]) if cfg["min_box_side"] is None else side
  feats = cases.head_maps(
      rng, rows, opt["batch"], cfg["num_classes"], opt["image"], cfg["strides"], cfg["reg_max"], min_side=default_side
  )
  kpts, sigmas = keypoint_maps(
      rng, rows, keypoints, opt["batch"], cfg["kpt_shape"], opt["image"], min_side=default_side, **opt["maps"]
  )
  return feats, kpts, sigmas


def loss_case(name: str) -> dict:
  """Builds the pose26 loss case ``name`` (one of :data:`POSE26_CASES`)."""
  cfg, opt = _case_setup(name)
  rng = cases.case_rng("pose26_" + name, salt=5)
  rows, keypoints = _labels(rng, name, cfg, opt)
  counts = np.bincount(rows[:, 0].astype(int), minlength=opt["batch"])
  cfg["max_boxes"] = int(max(counts.max(initial=0), 1) + 2)  # M above the largest count: padding is exercised
  feats, kpts, sigmas = _branch(rng, rows, keypoints, cfg, opt)
  inputs = dict(feats=feats, kpts=kpts, kpt_sigmas=sigmas, label_rows=np.asarray(rows, np.float32).reshape(-1, 6),
                keypoints=keypoints, flow=flow_arrays())
  return dict(name=name, inputs=inputs, config=cfg)


def e2e_case(name: str) -> dict:
  """Builds the end-to-end case ``name`` (one of :data:`E2E_CASES`): two branches' maps, one set of labels
  and one flow (the reference's two branches share the head's flow)."""
  if name not in E2E_CASES:
    raise KeyError(f"unknown pose26 end-to-end case {name!r}; expected one of {E2E_CASES}")
  cfg, opt = _case_setup("k5")
  del cfg["topk"], cfg["topk2"]
  cfg.update(epoch=0, epochs=20)
  if name == "last_epoch":
    cfg.update(epoch=19, min_box_side=None, kpt_shape=(17, 3), num_classes=1)
    opt.update(side=(28, 56), maps=dict(jitter=0.04))
  elif name == "empty_images":
    cfg.update(epoch=7)
    opt.update(batch=3, counts=(0, 3, 0))
  rng = cases.case_rng("pose26_e2e_" + name, salt=6)
  rows, keypoints = _labels(rng, name, cfg, opt)
  counts = np.bincount(rows[:, 0].astype(int), minlength=opt["batch"])
  cfg["max_boxes"] = int(max(counts.max(initial=0), 1) + 2)
  many = _branch(rng, rows, keypoints, cfg, opt)
  one = _branch(rng, rows, keypoints, cfg, opt)
  inputs = dict(
      feats=many[0], kpts=many[1], kpt_sigmas=many[2], feats_o2o=one[0], kpts_o2o=one[1], kpt_sigmas_o2o=one[2],
      label_rows=np.asarray(rows, np.float32).reshape(-1, 6), keypoints=keypoints, flow=flow_arrays(),
  )
  return dict(name=name, inputs=inputs, config=cfg)


def assign_case(name: str) -> dict:
  """The assignment case ``name`` (one of :data:`ASSIGN_CASES`): the loss case's predictions decoded in
  NumPy (scores the sigmoid of the class logits, boxes and keypoints in pixels) and its packed labels.

  ``inputs``: ``pred_scores (b, A, nc)``, ``pred_boxes (b, A, 4)``, ``pred_kpts (b, A, K, 2)``,
  ``anchor_points (A, 2)``, ``anchor_strides (A,)``, ``gt_labels``, ``gt_boxes``, ``gt_mask``,
  ``gt_kpts (b, M, K, Dg)``; ``config``: ``sigmas, topk, topk2, min_box_side``.
  """
  if name not in ASSIGN_CASES:
    raise KeyError(f"unknown pose26 assignment case {name!r}; expected one of {ASSIGN_CASES}")
  case = loss_case(name)
  cfg, x = case["config"], case["inputs"]
  image, strides, r = image_size(case), cfg["strides"], cfg["reg_max"]
  k, d = cfg["kpt_shape"]
  anchors, st = cases.anchors_px(image, strides)
  b = x["feats"][0].shape[0]
  rows = lambda maps: np.concatenate([m.reshape(b, m.shape[1], -1) for m in maps], -1).transpose(0, 2, 1).astype(np.float64)  # noqa: E731
  f = rows(x["feats"])
  if r == 1:
    ltrb = f[..., :4]
  else:
    bins = f[..., : 4 * r].reshape(b, -1, 4, r)
    p = np.exp(bins - bins.max(-1, keepdims=True))
    ltrb = (p / p.sum(-1, keepdims=True) * np.arange(r)).sum(-1)
  grid = anchors / st[:, None]
  boxes = np.concatenate([grid - ltrb[..., :2], grid + ltrb[..., 2:]], -1) * st[:, None]
  kpts = (rows(x["kpts"]).reshape(b, -1, k, d)[..., :2] + grid[:, None, :]) * st[:, None, None]
  gt = gt_of(case)
  sigmas = cfg["sigmas"] or (jaxtal.pose.COCO_SIGMAS if (k, d) == (17, 3) else (1.0 / k,) * k)
  side = float(strides[1]) if cfg["min_box_side"] is None else cfg["min_box_side"]
  f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
  inputs = dict(
      pred_scores=f32(1 / (1 + np.exp(-f[..., 4 * r :]))), pred_boxes=f32(boxes), pred_kpts=f32(kpts), anchor_points=anchors,
      anchor_strides=st, gt_labels=np.asarray(gt.labels), gt_boxes=np.asarray(gt.boxes), gt_mask=np.asarray(gt.mask),
      gt_kpts=np.asarray(gt.keypoints),
  )
  config = dict(sigmas=tuple(float(v) for v in sigmas), topk=cfg["topk"], topk2=cfg["topk2"], min_box_side=side)
  return dict(name=name, inputs=inputs, config=config)


def split_config(config: dict) -> tuple[dict, int]:
  """Case config -> (keyword arguments of the loss functions, ``max_boxes``)."""
  kwargs, m = cases.split_loss_config(config)
  kwargs["kpt_shape"] = tuple(kwargs["kpt_shape"])
  for key in ("sigmas", "class_weights"):
    if kwargs.get(key) is not None:
      kwargs[key] = tuple(kwargs[key])
  return kwargs, m


def image_size(case: dict) -> int:
  f = case["inputs"]["feats"][0]
  return int(f.shape[2] * case["config"]["strides"][0])


def gt_of(case: dict) -> jaxtal.GroundTruth:
  """The case's labels packed by :func:`jaxtal.pack_labels` (keypoints included)."""
  _, m = split_config(case["config"])
  x = case["inputs"]
  return jaxtal.pack_labels(x["label_rows"], x["feats"][0].shape[0], m, image_size(case), keypoints=x["keypoints"])


# ----------------------------------------------------------------------------- fixture files

# Per-level list names -> their numbered keys in a file (beyond ``cases``' feats/grads/feats_o2o/grads_o2o).
_LISTS = {
    "kpts": "kpt", "kpt_sigmas": "sigma", "kpts_o2o": "kpt_o2o", "kpt_sigmas_o2o": "sigma_o2o",
    "kpt_grads": "kpt_grad", "sigma_grads": "sigma_grad", "kpt_grads_o2o": "kpt_grad_o2o",
    "sigma_grads_o2o": "sigma_grad_o2o",
}


def to_arrays(case: dict, ref: dict, version: str) -> dict[str, np.ndarray]:
  """``cases.to_arrays`` with the keypoint and sigma maps (and gradients) as numbered keys, the flow's
  gradient as ``flow_grad_<field>`` (:func:`project_flow_grads`); the flow itself is not stored per case
  (every case reads ``pose26_flow.npz``)."""
  inputs, ref = dict(case["inputs"]), dict(ref)
  inputs.pop("flow", None)
  for d in (inputs, ref):
    for key, prefix in _LISTS.items():
      for i, a in enumerate(d.pop(key, ())):
        d[f"{prefix}{i}"] = np.asarray(a, np.float32)
  for field, a in project_flow_grads(ref.pop("flow_grads", {})).items():
    ref["flow_grad_" + field] = a
  return cases.to_arrays(dict(case, inputs=inputs), ref, version)


def flow_case() -> dict:
  """The flow's own fixture ``pose26_flow.npz`` (inputs only, float16: its values are float16-exact)."""
  return dict(name="flow", inputs=flow_arrays(), config={})


def flow_to_arrays(case: dict, ref: dict, version: str) -> dict[str, np.ndarray]:
  inputs = {k: np.asarray(v, np.float16) for k, v in case["inputs"].items()}
  return cases.to_arrays(dict(case, inputs=inputs), ref, version)


def load_flow() -> dict[str, np.ndarray]:
  """The flow stored in ``tests/fixtures/pose26_flow.npz``, as float32."""
  case, _, _ = cases.load_fixture("pose26", "flow")
  return {k: np.asarray(case["inputs"][k], np.float32) for k in FLOW_FIELDS}


def load_fixture(kind: str, name: str) -> tuple[dict, dict, str]:
  """Reads ``tests/fixtures/<kind>_<name>.npz`` (``kind`` ``"pose26"``, ``"pose26_e2e"`` or ``"pose26_assign"``) as
  ``(case, ref, version)``; a loss case gets the stored flow as ``inputs["flow"]``, its reference the flow's
  gradient as ``ref["flow_grads"]`` in the form of :func:`project_flow_grads`."""
  case, ref, version = cases.load_fixture(kind, name)
  for d in (case["inputs"], ref):
    for key, prefix in _LISTS.items():
      found = cases.numbered(d, prefix)
      if found:
        d[key] = found
  grads = {k[len("flow_grad_"):]: ref.pop(k) for k in list(ref) if k.startswith("flow_grad_")}
  if grads:
    ref["flow_grads"] = grads
    case["inputs"]["flow"] = load_flow()
  for key in ("pose", "kobj", "rle"):
    if key in ref:
      ref[key] = float(ref[key])
  cfg = case["config"]
  if "kpt_shape" in cfg:
    cfg["kpt_shape"] = tuple(cfg["kpt_shape"])
  if cfg.get("sigmas") is not None:
    cfg["sigmas"] = tuple(cfg["sigmas"])
  return case, ref, version


def fixture_path(kind: str, name: str) -> str:
  return cases.fixture_path(kind, name)
