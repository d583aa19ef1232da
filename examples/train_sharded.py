"""Data-parallel training with jaxtal's loss on 8 (fake) CPU devices.

    python examples/train_sharded.py             # 5 steps, under a minute on a laptop CPU
    python examples/train_sharded.py --steps 20

The batch is split over the devices of a ``Mesh`` along its ``"data"`` axis; the model's
parameters and the optimiser state are replicated. Two equivalent ways are shown:

1. ``jax.jit`` on sharded inputs: place the images and the ``GroundTruth`` with a
   ``NamedSharding`` over the batch axis and jit the ordinary single-device step. XLA
   partitions it and inserts the reductions; the loss needs no change.
2. ``shard_map``: the step is written per device, each device sees ``b / 8`` images, and
   ``jaxtal.detection_loss(..., axis_name="data")`` reduces the loss normaliser (the sum of
   target scores) and the batch size over the devices, so every device gets the loss of the
   global batch. Without ``axis_name`` each device would divide by its own normaliser, which
   is not the global loss when images hold different numbers of boxes.

Each variant runs alongside a plain single-device run from the same initialisation, and the
script prints every step's loss and whether it matches the single-device one.

On real accelerators drop the ``XLA_FLAGS`` line: ``jax.devices()`` are then the chips.
"""

from __future__ import annotations

import os

# Must happen before JAX starts: 8 host devices stand in for 8 accelerators.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxtal

IMAGE_SIZE = 64
MAX_BOXES = 6
CONFIG = jaxtal.LossConfig(num_classes=3, strides=(8, 16, 32), reg_max=16)
NUM_CLASSES, REG_MAX = CONFIG.num_classes, CONFIG.reg_max


def make_batch(rng: np.random.Generator, batch_size: int):
  """Images of 0 to MAX_BOXES filled rectangles (class = colour) and their padded ground truth.

  Returns ``images (b, 64, 64, 3)`` float32 and a :class:`jaxtal.GroundTruth` of NumPy arrays.
  """
  colours = np.eye(3, dtype=np.float32)
  images = rng.uniform(0.0, 0.2, size=(batch_size, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
  rows = []
  for i in range(batch_size):
    for _ in range(rng.integers(0, MAX_BOXES + 1)):  # uneven box counts, empty images included
      w, h = rng.uniform(8, 40, size=2)
      x1, y1 = rng.uniform(0, IMAGE_SIZE - w), rng.uniform(0, IMAGE_SIZE - h)
      cls = int(rng.integers(NUM_CLASSES))
      images[i, int(y1) : int(y1 + h), int(x1) : int(x1 + w)] = colours[cls]
      rows.append([i, cls, (x1 + w / 2) / IMAGE_SIZE, (y1 + h / 2) / IMAGE_SIZE, w / IMAGE_SIZE, h / IMAGE_SIZE])
  rows = np.array(rows, np.float32).reshape(-1, 6)
  return images, jaxtal.pack_labels(rows, batch_size, MAX_BOXES, IMAGE_SIZE)


class TinyDetector(nnx.Module):
  """Three strided 3x3 convs per level and a 1x1 head: NHWC maps ``(b, 64/s, 64/s, 4R + nc)``."""

  def __init__(self, rngs: nnx.Rngs, width: int = 32):
    self.stem = nnx.Conv(3, width, (3, 3), strides=4, rngs=rngs)  # stride 4
    self.downs = nnx.List([nnx.Conv(width, width, (3, 3), strides=2, rngs=rngs) for _ in CONFIG.strides])
    self.heads = nnx.List([nnx.Conv(width, 4 * REG_MAX + NUM_CLASSES, (1, 1), rngs=rngs) for _ in CONFIG.strides])
    for head in self.heads:  # class logits start near "background" (sigmoid(-4) ~ 0.02), as YOLO heads do
      head.bias[...] = jnp.concatenate([jnp.ones(4 * REG_MAX), jnp.full(NUM_CLASSES, -4.0)]).astype(jnp.float32)

  def __call__(self, images: jax.Array) -> list[jax.Array]:
    x = nnx.silu(self.stem(images))
    feats = []
    for down, head in zip(self.downs, self.heads):
      x = nnx.silu(down(x))
      feats.append(head(x))
    return feats


def make_train_step(tx: optax.GradientTransformation, grad_fn):
  """``(params, opt_state, images, gt) -> (params, opt_state, loss per image, gradient norm)``."""

  @jax.jit
  def train_step(params, opt_state, images, gt):
    loss, grads = grad_fn(params, images, gt)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, optax.global_norm(grads)

  return train_step


def loss_and_grad(graphdef, axis_name=None):
  """Loss per image (``box + cls + dfl``, already averaged over the batch) and its gradient.

  ``gt`` is an argument of the differentiated function, never captured by a closure (``jit`` would
  compile a captured batch in as a constant).
  """

  def loss_of(params, images, gt):
    feats = nnx.merge(graphdef, params)(images)
    _, parts = jaxtal.detection_loss(feats, gt, CONFIG, axis_name=axis_name)  # the keyword amends the config
    return parts.box + parts.cls + parts.dfl

  return jax.value_and_grad(loss_of)


def shard_map_grad(graphdef, mesh):
  """The per-device form: each device differentiates the global loss w.r.t. the replicated parameters.

  Inside ``jax.shard_map`` (with its default ``check_vma=True``), the gradient w.r.t. an
  input replicated over ``"data"`` (``in_specs=P()``) comes back already summed over the
  devices, so no explicit ``psum`` of the gradients is needed (one would count it 8 times).
  """
  per_device = loss_and_grad(graphdef, axis_name="data")
  return jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=(P(), P()))


def max_difference(a, b) -> float:
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--batch-size", type=int, default=16, help="a multiple of the device count")
  parser.add_argument("--lr", type=float, default=1e-3)
  args = parser.parse_args(argv)
  start = time.perf_counter()

  devices = jax.devices()
  print(f"devices: {len(devices)} ({devices[0].platform})")
  if args.batch_size % len(devices):
    raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of the {len(devices)} devices")
  mesh = jax.make_mesh((len(devices),), ("data",))
  replicated = NamedSharding(mesh, P())

  def shard_batch(x):
    return jax.device_put(x, NamedSharding(mesh, P("data", *([None] * (np.ndim(x) - 1)))))

  graphdef, params = nnx.split(TinyDetector(nnx.Rngs(0)), nnx.Param)
  tx = optax.adamw(args.lr)
  single = make_train_step(tx, loss_and_grad(graphdef))
  variants = {
      "jit + NamedSharding": make_train_step(tx, loss_and_grad(graphdef)),
      "shard_map + axis_name": make_train_step(tx, shard_map_grad(graphdef, mesh)),
  }
  # Every run starts from the same parameters; the sharded ones hold them replicated.
  state = {"single": (params, tx.init(params))}
  for name in variants:
    state[name] = jax.device_put((params, tx.init(params)), replicated)

  rng = np.random.default_rng(0)
  all_match = True
  history = {name: [] for name in state}
  for step in range(1, args.steps + 1):
    if step == 1:  # the first step compiles each training step: tens of seconds without output otherwise
      print(f"compiling the single-device step and the {len(variants)} sharded ones ...", end="", flush=True)
      compile_start = time.perf_counter()
    images, gt = make_batch(rng, args.batch_size)
    p, o, loss, gnorm = single(*state["single"], jnp.asarray(images), jax.tree.map(jnp.asarray, gt))
    state["single"] = (p, o)
    history["single"].append(float(loss))
    line = [f"step {step}: single-device loss {float(loss):.5f} grad norm {float(gnorm):.4f}"]
    for name, train_step in variants.items():
      p, o, loss, g = train_step(*state[name], shard_batch(images), jax.tree.map(shard_batch, gt))
      state[name] = (p, o)
      history[name].append(float(loss))
      drift = max_difference(p, state["single"][0])
      # Adam hides a constant gradient scale, so the gradient norm is compared as well as the parameters.
      ok = (
          np.isclose(float(loss), history["single"][-1], rtol=1e-4)
          and np.isclose(float(g), float(gnorm), rtol=1e-4)
          and drift < 1e-4
      )
      all_match &= bool(ok)
      line.append(
          f"{name} {float(loss):.5f} grad norm {float(g):.4f} (params differ by {drift:.1e}{'' if ok else ', MISMATCH'})"
      )
    if step == 1:
      print(f" done in {time.perf_counter() - compile_start:.1f} s")
    print(" | ".join(line))

  verdict = "matches the single-device step" if all_match else "does NOT match the single-device step: MISMATCH"
  print(f"every sharded step {verdict}; wall time {time.perf_counter() - start:.1f} s")
  return {"history": history, "match": all_match}


if __name__ == "__main__":
  main()
