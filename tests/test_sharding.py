"""Data-parallel use of the loss: a batch sharded over 8 (fake CPU) devices.

JAX fixes its device count when it starts, and under pytest it usually has already started
with one CPU device, so the sharded runs happen in a subprocess started with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``. The subprocess reads the inputs from
an ``.npz`` written here and writes its results to another; the single-device expectation is
computed in this process, independently, with plain ``jax.jit``.

Checked:

* ``jax.jit`` with the batch axis of the head maps and of ``GroundTruth`` sharded by a
  ``NamedSharding``: loss, parts and gradients equal the single-device ones;
* ``shard_map`` over ``"data"``: each device sees ``b / 8`` images; with
  ``detection_loss(..., axis_name="data")`` every device's total and parts equal the
  unsharded ones and the per-device gradients w.r.t. the local head maps, gathered, equal
  the unsharded gradient; without ``axis_name`` each device computes the loss of its own
  slice (its own normaliser), which differs from the global loss because the images hold
  different numbers of boxes;
* the windowed assignment (``jaxtal.windows``: a crowded 256 px input, ``windows=True``) under
  ``jax.jit`` with a sharded batch and inside ``shard_map`` with ``axis_name``: the same loss and
  gradients as the dense pass on one device;
* ``examples/train_sharded.py`` runs a few steps.

The whole module is ``slow`` (two subprocesses with 8 devices, about a minute on CPU); the
custom-VJP reduction the loss uses under ``axis_name`` (``jaxtal._parallel.global_sum``) is also
checked in the default run, in test_kernels.py.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxtal

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEVICES = 8
BATCH = 16  # two images per device
NC = 4
REG_MAX = 16
STRIDES = (8, 16, 32)
SIZE = 64
MAX_BOXES = 8
KW = dict(num_classes=NC, strides=STRIDES, reg_max=REG_MAX)


def subprocess_env() -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}").strip()
  env["JAX_PLATFORMS"] = "cpu"
  return env


def make_crowded_inputs(seed: int = 1, size: int = 256, boxes: int = 60):
  """Head maps (NHWC) of a ``size`` px input and ``boxes`` GT slots per image of 3-70 px (some padding):
  enough anchors for the assigner's windows (``jaxtal.windows``) and boxes both in and beyond them."""
  rng = np.random.default_rng(seed)
  feats = [rng.normal(0.0, 1.0, (BATCH, size // s, size // s, 4 * REG_MAX + NC)).astype(np.float32) for s in STRIDES]
  wh = np.exp(rng.uniform(np.log(3.0), np.log(70.0), (BATCH, boxes, 2)))
  xy = rng.uniform(0, size, (BATCH, boxes, 2))
  gt = jaxtal.GroundTruth(rng.integers(0, NC, (BATCH, boxes)).astype(np.int32),
                          np.concatenate([xy - wh / 2, xy + wh / 2], -1).astype(np.float32), rng.uniform(size=(BATCH, boxes)) > 0.1)
  return feats, gt


def make_inputs(seed: int = 0):
  """Head maps (NHWC) and GT where images hold 0 to 8 boxes, so per-device normalisers differ."""
  rng = np.random.default_rng(seed)
  feats = []
  for s in STRIDES:
    h = SIZE // s
    # Side distributions peaked near 1.5 cells: boxes of the GT's size, so the targets (and the
    # normaliser, their sum) are substantial rather than clamped at 1.
    peak = 4.0 * np.exp(-0.5 * (np.arange(REG_MAX) - 1.5) ** 2)
    box_logits = rng.normal(0.0, 1.0, size=(BATCH, h, h, 4, REG_MAX)) + peak
    box_logits = box_logits.reshape(BATCH, h, h, 4 * REG_MAX)
    cls_logits = rng.normal(-3.0, 1.0, size=(BATCH, h, h, NC))  # mostly background, like a trained head
    feats.append(np.concatenate([box_logits, cls_logits], axis=-1).astype(np.float32))
  rows = []
  counts = [(5 * i) % 9 for i in range(BATCH)]  # 0, 5, 1, 6, ...: 0 to 8 boxes, every device's pair differs
  for i, n in enumerate(counts):
    for _ in range(n):
      w, h = rng.uniform(0.1, 0.6, size=2)
      cx, cy = rng.uniform(w / 2, 1 - w / 2), rng.uniform(h / 2, 1 - h / 2)
      rows.append([i, rng.integers(NC), cx, cy, w, h])
  gt = jaxtal.pack_labels(np.array(rows, np.float32).reshape(-1, 6), BATCH, MAX_BOXES, (SIZE, SIZE))
  return feats, gt


# The subprocess: 8 CPU devices, the loss under jit with sharded inputs and inside shard_map.
WORKER = textwrap.dedent(
    """
    import sys
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import jaxtal

    src, dst = sys.argv[1], sys.argv[2]
    data = np.load(src)
    levels = int(data["levels"])
    feats = [jnp.asarray(data[f"feat{i}"]) for i in range(levels)]
    gt = jaxtal.GroundTruth(jnp.asarray(data["labels"]), jnp.asarray(data["boxes"]), jnp.asarray(data["mask"]))
    kw = dict(num_classes=int(data["nc"]), strides=tuple(int(s) for s in data["strides"]), reg_max=int(data["reg_max"]))
    out = {"device_count": jax.device_count()}

    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    def shard(x):
      return jax.device_put(x, NamedSharding(mesh, P("data", *([None] * (x.ndim - 1)))))
    feats_s, gt_s = jax.tree.map(shard, feats), jax.tree.map(shard, gt)
    out["input_shards"] = len(feats_s[0].addressable_shards)

    # (a) jax.jit on batch-sharded inputs: XLA partitions the computation.
    def loss(feats, gt):
      return jaxtal.detection_loss(feats, gt, **kw)
    (total, parts), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(feats_s, gt_s)
    out["jit_total"] = total
    out["jit_parts"] = np.stack(parts)
    out["jit_grad_shards"] = len(grads[0].addressable_shards)
    for i, g in enumerate(grads):
      out[f"jit_grad{i}"] = g

    # (b) shard_map: every device differentiates the loss of its own slice.
    shard_map = getattr(jax, "shard_map", None)
    if shard_map is None:
      from jax.experimental.shard_map import shard_map
    def per_device(axis_name, check_vma=True):
      def step(feats, gt):
        def local_loss(feats):
          return jaxtal.detection_loss(feats, gt, **kw, axis_name=axis_name)
        (total, parts), grads = jax.value_and_grad(local_loss, has_aux=True)(feats)
        local_batch = jnp.full((1,), feats[0].shape[0], jnp.int32)
        local_boxes = jnp.sum(gt.mask, dtype=jnp.int32)[None]
        # One row per device, so the host sees every device's own value.
        return total[None], jnp.stack(parts)[None], grads, local_batch, local_boxes
      specs = dict(mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P("data"))
      if not check_vma:
        specs["check_vma"] = False
      return jax.jit(shard_map(step, **specs))
    runs = (("psum", "data", True), ("local", None, True), ("unchecked", "data", False))
    for tag, axis_name, check_vma in runs:
      total, parts, grads, local_batch, local_boxes = per_device(axis_name, check_vma)(feats_s, gt_s)
      out[f"{tag}_total"] = total
      out[f"{tag}_parts"] = parts
      out[f"{tag}_local_batch"] = local_batch
      out[f"{tag}_local_boxes"] = local_boxes
      for i, g in enumerate(grads):
        out[f"{tag}_grad{i}"] = g

    # pmap: the same per-device step, batch split on a leading device axis.
    def pmapped(feats, gt):
      def local_loss(feats):
        return jaxtal.detection_loss(feats, gt, **kw, axis_name="data")
      (total, parts), grads = jax.value_and_grad(local_loss, has_aux=True)(feats)
      return total, jnp.stack(parts), grads
    n = jax.device_count()
    split = lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:])
    total, parts, grads = jax.pmap(pmapped, axis_name="data")(jax.tree.map(split, feats), jax.tree.map(split, gt))
    out["pmap_total"], out["pmap_parts"] = total, parts
    for i, g in enumerate(grads):
      out[f"pmap_grad{i}"] = np.asarray(g).reshape(-1, *g.shape[2:])

    # The windowed assignment on a crowded input, batch-sharded: under jit, and per device with axis_name.
    cfg = jaxtal.LossConfig(**kw, windows=True)
    wfeats = [shard(jnp.asarray(data[f"wfeat{i}"])) for i in range(levels)]
    wgt = jax.tree.map(shard, jaxtal.GroundTruth(jnp.asarray(data["wlabels"]), jnp.asarray(data["wboxes"]), jnp.asarray(data["wmask"])))
    (total, parts), grads = jax.jit(jax.value_and_grad(lambda f, g: jaxtal.detection_loss(f, g, cfg), has_aux=True))(wfeats, wgt)
    out["win_jit_total"], out["win_jit_parts"] = total, np.stack(parts)
    for i, g in enumerate(grads):
      out[f"win_jit_grad{i}"] = g
    def win_step(feats, gt):
      local = jaxtal.LossConfig(**kw, windows=True, axis_name="data")
      (total, parts), grads = jax.value_and_grad(lambda f: jaxtal.detection_loss(f, gt, local), has_aux=True)(feats)
      return total[None], grads
    total, grads = jax.jit(shard_map(win_step, mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P("data")))(wfeats, wgt)
    out["win_psum_total"] = total
    for i, g in enumerate(grads):
      out[f"win_psum_grad{i}"] = g
    np.savez(dst, **{k: np.asarray(v) for k, v in out.items()})
    """
)


@pytest.fixture(scope="module")
def example_run():
  """``examples/train_sharded.py --steps 2``, started early so it overlaps the other subprocess."""
  proc = subprocess.Popen(
      [sys.executable, str(ROOT / "examples" / "train_sharded.py"), "--steps", "2"],
      env=subprocess_env(),
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )
  yield proc
  if proc.poll() is None:
    proc.kill()
    proc.communicate()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, example_run):
  """Starts the 8-device subprocess, computes the single-device expectation meanwhile, returns both."""
  tmp = tmp_path_factory.mktemp("sharding")
  feats, gt = make_inputs()
  wfeats, wgt = make_crowded_inputs()
  src, dst = tmp / "inputs.npz", tmp / "outputs.npz"
  np.savez(
      src,
      levels=len(feats),
      nc=NC,
      reg_max=REG_MAX,
      strides=np.array(STRIDES),
      labels=gt.labels,
      boxes=gt.boxes,
      mask=gt.mask,
      wlabels=wgt.labels,
      wboxes=wgt.boxes,
      wmask=wgt.mask,
      **{f"feat{i}": f for i, f in enumerate(feats)},
      **{f"wfeat{i}": f for i, f in enumerate(wfeats)},
  )
  proc = subprocess.Popen(
      [sys.executable, "-c", WORKER, str(src), str(dst)],
      env=subprocess_env(),
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
  )

  def loss(feats, gt):
    return jaxtal.detection_loss(feats, gt, **KW)

  gt_j = jax.tree.map(jnp.asarray, gt)
  (total, parts), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))([jnp.asarray(f) for f in feats], gt_j)
  # Each device's slice on its own, for what shard_map without axis_name must give.
  per_slice = jax.jit(loss)
  step = BATCH // DEVICES
  slices = [
      per_slice([jnp.asarray(f[d * step : (d + 1) * step]) for f in feats], jax.tree.map(lambda x: x[d * step : (d + 1) * step], gt_j))
      for d in range(DEVICES)
  ]
  # The crowded input's loss on one device through the dense pass: what the windowed, sharded runs must give.
  dense = jaxtal.LossConfig(**KW, windows=False)
  (wtotal, wparts), wgrads = jax.jit(jax.value_and_grad(lambda f, g: jaxtal.detection_loss(f, g, dense), has_aux=True))(
      [jnp.asarray(f) for f in wfeats], jax.tree.map(jnp.asarray, wgt))
  expected = dict(
      win_total=np.asarray(wtotal),
      win_parts=np.stack([np.asarray(p) for p in wparts]),
      win_grads=[np.asarray(g) for g in wgrads],
      total=np.asarray(total),
      parts=np.stack([np.asarray(p) for p in parts]),
      grads=[np.asarray(g) for g in grads],
      slice_totals=np.array([np.asarray(t) for t, _ in slices]),
      slice_parts=np.array([np.stack([np.asarray(p) for p in ps]) for _, ps in slices]),
      boxes_per_device=np.asarray(gt.mask).reshape(DEVICES, step, -1).sum(axis=(1, 2)),
  )
  try:
    log, _ = proc.communicate(timeout=600)
  except subprocess.TimeoutExpired:
    proc.kill()
    log, _ = proc.communicate()
    pytest.fail(f"8-device subprocess timed out:\n{log[-4000:]}")
  assert proc.returncode == 0, f"8-device subprocess failed (rc {proc.returncode}):\n{log[-4000:]}"
  with np.load(dst) as data:
    got = {k: data[k] for k in data.files}
  return expected, got


def grads_of(got: dict, tag: str) -> list[np.ndarray]:
  return [got[f"{tag}_grad{i}"] for i in range(len(STRIDES))]


def assert_grads_close(actual, expected, what: str) -> None:
  for level, (a, e) in enumerate(zip(actual, expected)):
    scale = float(np.max(np.abs(e)))
    np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5 * scale, err_msg=f"{what}, level {level}")


def test_subprocess_has_eight_devices(runs):
  _, got = runs
  assert int(got["device_count"]) == DEVICES
  assert int(got["input_shards"]) == DEVICES


def test_jit_with_sharded_batch_matches_single_device(runs):
  expected, got = runs
  np.testing.assert_allclose(got["jit_total"], expected["total"], rtol=1e-5)
  np.testing.assert_allclose(got["jit_parts"], expected["parts"], rtol=1e-5, atol=1e-6)
  assert_grads_close(grads_of(got, "jit"), expected["grads"], "jit on sharded inputs")
  assert int(got["jit_grad_shards"]) == DEVICES  # the gradient stays sharded like its maps


def test_shard_map_each_device_sees_a_slice(runs):
  expected, got = runs
  for tag in ("psum", "local", "unchecked"):
    np.testing.assert_array_equal(got[f"{tag}_local_batch"], np.full(DEVICES, BATCH // DEVICES))
    np.testing.assert_array_equal(got[f"{tag}_local_boxes"], expected["boxes_per_device"])
  # The data really is uneven across devices, so the normaliser must be reduced globally.
  assert len(set(expected["boxes_per_device"].tolist())) == DEVICES


def test_shard_map_with_axis_name_gives_the_global_loss_on_every_device(runs):
  expected, got = runs
  np.testing.assert_allclose(got["psum_total"], np.full(DEVICES, expected["total"]), rtol=1e-5)
  np.testing.assert_allclose(got["psum_parts"], np.tile(expected["parts"], (DEVICES, 1)), rtol=1e-5, atol=1e-6)


def test_shard_map_with_axis_name_gathered_gradient_is_the_global_gradient(runs):
  # The normaliser is a psum of stop-gradient targets, so each device's gradient of its (global)
  # total w.r.t. its own maps is exactly the global gradient's slice: gathering needs no rescaling.
  expected, got = runs
  assert_grads_close(grads_of(got, "psum"), expected["grads"], "shard_map with axis_name")


@pytest.mark.parametrize("tag", ["unchecked", "pmap"])
def test_axis_name_is_exact_without_shard_map_type_checks(runs, tag):
  # Under shard_map(check_vma=False) and pmap, psum's own transpose would count each device's
  # cotangent once per device; the loss's values and map gradients must not depend on that.
  expected, got = runs
  np.testing.assert_allclose(got[f"{tag}_total"], np.full(DEVICES, expected["total"]), rtol=1e-5)
  np.testing.assert_allclose(got[f"{tag}_parts"], np.tile(expected["parts"], (DEVICES, 1)), rtol=1e-5, atol=1e-6)
  assert_grads_close(grads_of(got, tag), expected["grads"], f"{tag} with axis_name")


def test_shard_map_without_axis_name_is_the_loss_of_each_slice(runs):
  expected, got = runs
  np.testing.assert_allclose(got["local_total"], expected["slice_totals"], rtol=1e-5)
  np.testing.assert_allclose(got["local_parts"], expected["slice_parts"], rtol=1e-5, atol=1e-6)


def test_without_axis_name_the_normaliser_changes_the_result(runs):
  expected, got = runs
  # Averaging per-device losses (the usual data-parallel recipe) is not the global loss: each
  # device divided by its own target-score sum instead of the global one.
  mean_parts = got["local_parts"].mean(axis=0)
  rel = np.abs(mean_parts - expected["parts"]) / np.abs(expected["parts"])
  assert np.all(rel > 1e-2), f"per-device-normalised parts {mean_parts} vs global {expected['parts']}"
  assert not np.allclose(got["local_total"], expected["total"], rtol=1e-3)
  # Per device the global gradient is the local one times (global b / N) / (local b / N_device):
  # a factor that differs between devices, so no single rescaling of the gathered gradient fixes it.
  local, glob = grads_of(got, "local")[0], expected["grads"][0]
  step = BATCH // DEVICES
  factors = np.array([
      np.sum(local[d * step : (d + 1) * step] * glob[d * step : (d + 1) * step])
      / np.sum(local[d * step : (d + 1) * step] ** 2)
      for d in range(DEVICES)
  ])
  assert factors.max() / factors.min() > 1.2, f"per-device gradient factors {factors} should differ"
  ratio = np.sum(local * glob) / np.sum(local * local)
  assert not np.allclose(ratio * local, glob, rtol=1e-3, atol=1e-5 * np.max(np.abs(glob)))


def test_windowed_assignment_sharded_matches_dense_single_device(runs):
  expected, got = runs
  np.testing.assert_allclose(got["win_jit_total"], expected["win_total"], rtol=1e-5)
  np.testing.assert_allclose(got["win_jit_parts"], expected["win_parts"], rtol=1e-5, atol=1e-6)
  assert_grads_close(grads_of(got, "win_jit"), expected["win_grads"], "windowed, jit on sharded inputs")
  np.testing.assert_allclose(got["win_psum_total"], np.full(DEVICES, expected["win_total"]), rtol=1e-5)
  assert_grads_close(grads_of(got, "win_psum"), expected["win_grads"], "windowed, shard_map with axis_name")


def test_train_sharded_example_runs(example_run):
  try:
    out, err = example_run.communicate(timeout=600)
  except subprocess.TimeoutExpired:
    example_run.kill()
    out, err = example_run.communicate()
  assert example_run.returncode == 0, out[-3000:] + err[-3000:]
  assert "devices: 8" in out, out
  assert out.count("step ") >= 2, out
  assert "matches the single-device step" in out, out
  assert "MISMATCH" not in out, out


# The segmentation loss with its mask term over box windows, under jit on a batch-sharded (explicitly typed)
# mesh: the windows are listed and visited per image, so every gather and scatter stays within a device's
# images (no all-gather of the prototypes), and values and gradients equal the single-device ones.
SEGMENT_WORKER = textwrap.dedent(
    """
    import re, sys
    sys.path.insert(0, "tests")
    import jax, numpy as np, jaxtal
    from jax.sharding import NamedSharding, PartitionSpec as P
    import test_segment as ts

    rows = np.concatenate([ts.ROWS + [d, 0, 0, 0, 0, 0] for d in (0, 2, 4, 6)])
    rows = rows[rows[:, 0] < 8]
    inst = ts.segment_cases.instance_masks(np.random.default_rng(0), rows, ts.IMAGE, ts.MASK_HW)
    gt = jaxtal.pack_labels(rows, 8, ts.M, ts.IMAGE)._replace(masks=jaxtal.pack_masks(inst, rows[:, 0], 8, ts.M))
    feats, coefs, proto = ts.predictions(seed=1, b=8)
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    shard = lambda x: jax.device_put(x, NamedSharding(mesh, P("data", *([None] * (np.ndim(x) - 1)))))
    out = {}
    for tag, slots in (("map", False), ("slots", True)):
      g = gt._replace(masks=ts.slot_masks_of(gt.masks, np.float32)) if slots else gt
      cfg = jaxtal.SegmentLossConfig(num_classes=ts.NC, strides=ts.STRIDES, reg_max=ts.R, mask_window=4)
      loss = lambda f, c, p, g: jaxtal.segment_loss(jaxtal.Predictions(f, mask_coefs=c, proto=p), g, cfg)[0]
      step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
      want, args = step(feats, coefs, proto, g), jax.tree.map(shard, (feats, coefs, proto, g))
      got = step(*args)
      leaves = zip(jax.tree.leaves(got), jax.tree.leaves(want))
      out[tag + "_error"] = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)) / (np.max(np.abs(b)) + 1e-30))) for a, b in leaves)
      text = step.lower(*args).compile().as_text()
      out[tag + "_gathered"] = max([int(np.prod([int(n) for n in s.split(",") if n])) for s in re.findall(r"= f32\\[([0-9,]*)\\][^ ]* all-gather", text)] or [0])
    np.savez(sys.argv[1], **out)
    """
)


def test_segment_loss_over_box_windows_under_sharded_jit(tmp_path):
  dst = tmp_path / "segment.npz"
  proc = subprocess.run(
      [sys.executable, "-c", SEGMENT_WORKER, str(dst)], env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=900
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with np.load(dst) as got:
    for tag in ("map", "slots"):
      assert float(got[tag + "_error"]) < 1e-5, tag
      # The only all-gathers are the assignment's small per-GT rows, never a prototype plane (8 x 4 x 16 x 16).
      assert int(got[tag + "_gathered"]) < 8 * 4 * 16 * 16, int(got[tag + "_gathered"])
