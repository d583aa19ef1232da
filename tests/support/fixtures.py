"""The golden parity fixtures ``tests/fixtures/*.npz``: which file holds which case, writing them with the
reference, comparing jaxtal with them, and checking that a fresh write reproduces a committed file byte
for byte. ``tests/make_fixtures.py`` is the command line.

Every file is ``save_npz(to_arrays(case, run(driver, case), driver.VERSION))`` of a case builder (NumPy
only: ``cases``, ``obb_cases``, ``pose_cases``, ``segment_cases``, ``segment26_cases``, ``pose26_cases``) and a
reference driver (``reference``, ``obb_reference``, ``pose_reference``, ``segment_reference``,
``segment26_reference``, ``pose26_reference``), run with torch on one thread (a fixed
reduction order: the same bytes on every run on one machine and torch build).
"""

from __future__ import annotations

import importlib
import os
from typing import Callable, NamedTuple

import numpy as np

from support import cases, obb_cases, parity, pose26_cases, pose_cases, runners, segment26_cases, segment_cases

KINDS = ("assign", "loss", "e2e", "obb", "pose", "segment", "segment26", "pose26")


class Job(NamedTuple):
  """One fixture file: ``kind`` (of :data:`KINDS`), case ``name``, file ``filename`` in ``tests/fixtures``,
  ``build()`` (the case), ``run(driver, case)`` (the reference's outputs), ``to_arrays`` and ``driver``
  (the name of the reference module in ``support``)."""

  kind: str
  name: str
  filename: str
  build: Callable[[], dict]
  run: Callable
  to_arrays: Callable
  driver: str


# ----------------------------------------------------------------------------- the reference's runs


def reference_assign(driver, case: dict) -> dict:
  """The reference assigner (detection or rotated) on an assignment case."""
  x = case["inputs"]
  return driver.assign(
      x["pred_scores"], x["pred_boxes"], x["anchor_points"], x["gt_labels"], x["gt_boxes"], x["gt_mask"], **case["config"]
  )


def reference_loss(driver, case: dict) -> dict:
  kwargs, _ = cases.split_loss_config(case["config"])
  return driver.loss(case["inputs"]["feats"], case["inputs"]["label_rows"], **kwargs)


def reference_e2e(driver, case: dict) -> dict:
  kwargs, _ = cases.split_loss_config(case["config"])
  return driver.e2e_loss(case["inputs"]["feats"], case["inputs"]["feats_o2o"], case["inputs"]["label_rows"], **kwargs)


def reference_obb_loss(driver, case: dict) -> dict:
  kwargs, _ = obb_cases.split_loss_config(case["config"])
  x = case["inputs"]
  return driver.loss(x["feats"], x["angles"], x["label_rows"], **kwargs)


def reference_pose_loss(driver, case: dict, *, stable: bool | None = None) -> dict:
  """The reference on a pose case; ``stable`` defaults to whether the case has top-k ties (``pose_cases.TIE_CASES``)."""
  kwargs, _ = pose_cases.split_loss_config(case["config"])
  x = case["inputs"]
  stable = case["name"] in pose_cases.TIE_CASES if stable is None else stable
  return driver.loss(x["feats"], x["kpts"], x["label_rows"], x["keypoints"], stable=stable, **kwargs)


def reference_pose26_loss(driver, case: dict) -> dict:
  """The reference's ``PoseLoss26`` on a pose26 case (native top-k: the cases have no tied zero-metric candidates)."""
  kwargs, _ = pose26_cases.split_config(case["config"])
  x = case["inputs"]
  return driver.loss(x["feats"], x["kpts"], x["kpt_sigmas"], x["label_rows"], x["keypoints"], x["flow"],
                     stable=case["name"] in pose26_cases.TIE_CASES, **kwargs)


def reference_pose26_e2e(driver, case: dict) -> dict:
  """The reference's ``E2ELoss(model, PoseLoss26)`` on a pose26 end-to-end case."""
  kwargs, _ = pose26_cases.split_config(case["config"])
  x = case["inputs"]
  many, one = (x["feats"], x["kpts"], x["kpt_sigmas"]), (x["feats_o2o"], x["kpts_o2o"], x["kpt_sigmas_o2o"])
  return driver.e2e_loss(many, one, x["label_rows"], x["keypoints"], x["flow"], **kwargs)


def reference_pose26_assign(driver, case: dict) -> dict:
  """The reference's ``PoseTaskAlignedAssigner`` on a pose26 assignment case."""
  x = case["inputs"]
  return driver.assign(
      x["pred_scores"], x["pred_boxes"], x["anchor_points"], x["anchor_strides"], x["gt_labels"], x["gt_boxes"],
      x["gt_mask"], x["pred_kpts"], x["gt_kpts"], **case["config"],
  )


def reference_segment_loss(driver, case: dict) -> dict:
  """The reference on a segmentation case with stable top-k ties (``reference.stable_ties``: jaxtal's order)."""
  return segment_cases.reference_loss(driver, case, stable=True)


def reference_segment26_loss(driver, case: dict) -> dict:
  """The reference on a YOLO26 segmentation case with stable ties, its short list included (jaxtal's order)."""
  return segment26_cases.reference_loss(driver, case, stable=True)


# ----------------------------------------------------------------------------- the files


def jobs(kinds=KINDS) -> list[Job]:
  """Every fixture file of ``kinds``, in a fixed order."""
  out = []

  def add(kind, name, filename, build, run, to_arrays, driver):
    out.append(Job(kind, name, filename, build, run, to_arrays, driver))

  for kind in kinds:
    if kind == "assign":
      for n in cases.ASSIGN_CASES:
        add(kind, n, f"assign_{n}.npz", lambda n=n: cases.assign_case(n), reference_assign, cases.to_arrays, "reference")
    elif kind == "loss":
      for n in cases.LOSS_CASES:
        add(kind, n, f"loss_{n}.npz", lambda n=n: cases.loss_case(n), reference_loss, cases.to_arrays, "reference")
    elif kind == "e2e":
      for n in cases.E2E_CASES:
        add(kind, n, f"e2e_{n}.npz", lambda n=n: cases.e2e_case(n), reference_e2e, cases.to_arrays, "reference")
    elif kind == "obb":
      for n in obb_cases.OBB_ASSIGN_CASES:
        add(kind, f"assign_{n}", f"obb_assign_{n}.npz", lambda n=n: obb_cases.assign_case(n), reference_assign,
            obb_cases.to_arrays, "obb_reference")
      for n in obb_cases.OBB_LOSS_CASES:
        add(kind, f"loss_{n}", f"obb_loss_{n}.npz", lambda n=n: obb_cases.loss_case(n), reference_obb_loss,
            obb_cases.to_arrays, "obb_reference")
      add(kind, "probiou_pairs", "obb_probiou_pairs.npz", obb_cases.probiou_case, obb_cases.reference_probiou,
          obb_cases.to_arrays, "obb_reference")
    elif kind == "pose":
      for n in pose_cases.POSE_LOSS_CASES:
        add(kind, n, f"pose_loss_{n}.npz", lambda n=n: pose_cases.loss_case(n), reference_pose_loss, pose_cases.to_arrays,
            "pose_reference")
    elif kind == "segment":
      for n in segment_cases.SEGMENT_CASES:
        add(kind, n, f"segment_{n}.npz", lambda n=n: segment_cases.loss_case(n), reference_segment_loss,
            segment_cases.to_arrays, "segment_reference")
    elif kind == "segment26":
      for n in segment26_cases.CASES:
        add(kind, n, f"segment26_{n}.npz", lambda n=n: segment26_cases.loss_case(n), reference_segment26_loss,
            segment26_cases.to_arrays, "segment26_reference")
    elif kind == "pose26":
      add(kind, "flow", "pose26_flow.npz", pose26_cases.flow_case, lambda driver, case: {}, pose26_cases.flow_to_arrays,
          "pose26_reference")
      for n in pose26_cases.POSE26_CASES:
        add(kind, n, f"pose26_{n}.npz", lambda n=n: pose26_cases.loss_case(n), reference_pose26_loss,
            pose26_cases.to_arrays, "pose26_reference")
      for n in pose26_cases.E2E_CASES:
        add(kind, f"e2e_{n}", f"pose26_e2e_{n}.npz", lambda n=n: pose26_cases.e2e_case(n), reference_pose26_e2e,
            pose26_cases.to_arrays, "pose26_reference")
      for n in pose26_cases.ASSIGN_CASES:
        add(kind, f"assign_{n}", f"pose26_assign_{n}.npz", lambda n=n: pose26_cases.assign_case(n),
            reference_pose26_assign, cases.to_arrays, "pose26_reference")
    else:
      raise KeyError(f"unknown fixture kind {kind!r}; expected one of {KINDS}")
  return out


def job(kind: str, name: str) -> Job:
  """The fixture file of ``kind`` and case ``name`` (OBB names carry their ``assign_`` / ``loss_`` prefix)."""
  (found,) = [j for j in jobs((kind,)) if j.name == name]
  return found


def write(selected, out_dir: str = cases.FIXTURES_DIR, *, verbose: bool = True) -> None:
  """Writes the fixture files of ``selected`` (:class:`Job` s) into ``out_dir``.

  Runs torch on one thread (restored afterwards), refuses a reference other than the pinned version, and
  (``verbose``) prints each file's size and the total.
  """
  import torch  # noqa: PLC0415

  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  try:
    os.makedirs(out_dir, exist_ok=True)
    total = 0
    for j in selected:
      driver = importlib.import_module(f"support.{j.driver}")
      if driver.VERSION != driver.REFERENCE_VERSION:
        raise SystemExit(f"reference is ultralytics {driver.VERSION}, fixtures must come from {driver.REFERENCE_VERSION}")
      case = j.build()
      path = os.path.join(out_dir, j.filename)
      cases.save_npz(path, j.to_arrays(case, j.run(driver, case), driver.VERSION))
      total += os.path.getsize(path)
      if verbose:
        print(f"{os.path.relpath(path)}: {os.path.getsize(path) / 1024:.1f} KiB")
    if verbose:
      print(f"total {total / 1024:.1f} KiB")
  finally:
    torch.set_num_threads(threads)


def assert_reproduces(j: Job, out_dir: str) -> None:
  """Writes ``j``'s file into ``out_dir`` and asserts it reproduces the committed file.

  On the machine and torch build that wrote the file the bytes are equal. Elsewhere torch's CPU kernels may round
  the reference's outputs differently (seen: a few ulps), so then the inputs and the config must still be equal bit
  for bit (the script builds the same case) and the reference's outputs (``ref.*``) equal to float32 rounding.
  On a difference, the message names each array that differs (and by how much).
  """
  write([j], out_dir, verbose=False)
  fresh, committed = os.path.join(out_dir, j.filename), os.path.join(cases.FIXTURES_DIR, j.filename)
  with open(fresh, "rb") as f, open(committed, "rb") as g:
    if f.read() == g.read():
      return
  diffs = []
  with np.load(fresh) as a, np.load(committed) as b:
    for key in sorted(set(a.files) | set(b.files)):
      if key not in a.files or key not in b.files:
        diffs.append(f"{key}: only in the {'committed' if key in b.files else 'fresh'} file")
        continue
      x, y = a[key], b[key]
      if x.dtype != y.dtype or x.shape != y.shape:
        diffs.append(f"{key}: {x.dtype}{x.shape} fresh, {y.dtype}{y.shape} committed")
      elif x.tobytes() != y.tobytes():
        rounding = key.startswith("ref.") and x.dtype.kind == "f" and np.allclose(
            x, y, rtol=1e-5, atol=1e-6 * max(float(np.max(np.abs(y), initial=0.0)), 1e-30))
        if not rounding:
          worst = np.max(np.abs(x.astype(np.float64) - y.astype(np.float64))) if x.dtype.kind in "fiub" else "-"
          diffs.append(f"{key}: {int(np.sum(x != y))} values differ, max |diff| {worst}")
  if diffs:
    raise AssertionError(f"tests/make_fixtures.py no longer reproduces fixtures/{j.filename}: " + "; ".join(diffs))


# ----------------------------------------------------------------------------- jaxtal against the files (``--check``)


def check(kinds=KINDS) -> None:
  """Prints jaxtal's differences from the stored fixtures of ``kinds``, file by file and the worst (no reference needed)."""
  worst: dict[str, float] = {}

  def show(label: str, errs: dict[str, float]) -> None:
    print(f"{label:28s} " + "  ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    for k, v in errs.items():
      worst[k] = max(worst.get(k, 0.0), v)

  for kind in kinds:
    for j in jobs((kind,)):
      if kind == "assign":
        case, ref, _ = cases.load_fixture("assign", j.name)
        got = runners.run_assign(case)
        show(f"assign {j.name}", {
            "target score abs": float(np.max(np.abs(got["scores"] - ref["scores"]), initial=0.0)),
            "zero-score fg differs": float(np.sum(got["fg_mask"] != ref["fg_mask"])),
        })
      elif kind == "loss":
        case, ref, _ = cases.load_fixture("loss", j.name)
        total, parts, grads = runners.run_detection_loss(case)
        show(f"loss {j.name}", dict(parity.part_errors(dict(total=total, parts=parts), ref),
                                    **{"grad ratio": parity.grad_ratio(grads, ref["grads"])}))
      elif kind == "e2e":
        case, ref, _ = cases.load_fixture("e2e", j.name)
        total, parts, g_many, g_one = runners.run_end_to_end(case)
        parts = type(parts)(*(float(p) for p in parts))
        show(f"e2e {j.name}", dict(parity.part_errors(dict(total=total, parts=parts), ref),
                                   **{"grad ratio": parity.grad_ratio(g_many + g_one, ref["grads"] + ref["grads_o2o"])}))
      elif kind == "obb" and j.name.startswith("assign_"):
        case, ref, _ = obb_cases.load_fixture("assign", j.name[len("assign_"):])
        got = runners.run_obb_assign(case)
        show(f"obb {j.name}", {"target score abs": float(np.max(np.abs(got["scores"] - ref["scores"]), initial=0.0))})
      elif kind == "obb" and j.name.startswith("loss_"):
        case, ref, _ = obb_cases.load_fixture("loss", j.name[len("loss_"):])
        show(f"obb {j.name}", parity.obb_loss_errors(runners.run_obb_loss(case), ref))
      elif kind == "pose":
        case, ref, _ = pose_cases.load_fixture(j.name)
        show(f"pose {j.name}", parity.pose_loss_errors(runners.run_pose_loss(case), ref))
      elif kind == "segment":
        case, ref, _ = segment_cases.load_fixture(j.name)
        show(f"segment {j.name}", parity.segment_loss_errors(runners.run_segment_loss(case), ref))
      elif kind == "segment26":
        case, ref, _ = segment26_cases.load_fixture(j.name)
        show(f"segment26 {j.name}", parity.segment26_loss_errors(runners.run_segment26_loss(case), ref))
      elif kind == "pose26" and j.name == "flow":
        continue
      elif kind == "pose26" and j.name.startswith("assign_"):
        case, ref, _ = pose26_cases.load_fixture("pose26_assign", j.name[len("assign_"):])
        got = runners.run_pose26_assign(case)
        show(f"pose26 {j.name}", {"target score abs": float(np.max(np.abs(got["scores"] - ref["scores"]), initial=0.0))})
      elif kind == "pose26" and j.name.startswith("e2e_"):
        case, ref, _ = pose26_cases.load_fixture("pose26_e2e", j.name[len("e2e_"):])
        show(f"pose26 {j.name}", parity.pose26_errors(runners.run_pose26_e2e(case), ref))
      elif kind == "pose26":
        case, ref, _ = pose26_cases.load_fixture("pose26", j.name)
        show(f"pose26 {j.name}", parity.pose26_errors(runners.run_pose26_loss(case), ref))
  for k, v in worst.items():
    print(f"worst {k:28s} {v:.3e}")
