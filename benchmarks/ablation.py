"""Kernel ablation rows: a loss step traced with one ``jaxtal.kernels`` trick replaced by its plain twin,
and the share of the step the trick saves. A trick stays in jaxtal only while it saves at least 5%.

The switch is the config's documented static field ``plain_kernels`` (``jaxtal.kernels.KERNELS`` names):
``dataclasses.replace(cfg, plain_kernels=(name,))`` is another config, so another trace and compilation;
nothing global changes. Task kernels (``jaxtal.kernels.TASK_KERNELS``) are ablated in their task's step.
"""

from __future__ import annotations

import dataclasses

import jax

import jaxtal
from timing import median_ms, time_runs


def plain(cfg, name: str):
  """``cfg`` with the kernel trick ``name`` traced as its plain twin."""
  return dataclasses.replace(cfg, plain_kernels=(name,))


def task_kernels(task: str) -> list[str]:
  """The task kernels timed with ``task``'s loss (e.g. ``"segment_loss"``)."""
  return [k for k, t in jaxtal.kernels.TASK_KERNELS.items() if t == task]


def detection_rows(args, table, m, feats, gt, cfg, make_loss_step, assign_inputs, medians) -> None:
  """The detection loss step (``make_loss_step(config)``) with each shared kernel plain; for ``top_k`` also
  the assignment alone. ``medians`` holds the kernels' own times under ``("loss", m)`` and ``("assign", m)``."""
  for name in jaxtal.kernels.KERNELS:
    if name in jaxtal.kernels.TASK_KERNELS:  # timed with its task's loss (segment_rows)
      continue
    plain_cfg = plain(cfg, name)
    step = jax.jit(make_loss_step(plain_cfg)).lower(feats, gt).compile()
    times = time_runs(lambda: jax.block_until_ready(step(feats, gt)), args.warmup, args.repeats)  # noqa: B023
    ms = median_ms(times)
    saving = 100 * (ms - medians[("loss", m)]) / ms
    table.add(f"loss fwd+bwd, plain {name}", m, ms, "ms", len(times), f"kernel saves {saving:.0f}% of the step")
    if name == "top_k":
      assign_cfg = jaxtal.AssignerConfig(plain_kernels=(name,), min_box_side=0.0)  # the assign row's default settings otherwise
      assign = jax.jit(lambda *a, c=assign_cfg: jaxtal.task_aligned_assign(*a, c)).lower(*assign_inputs, gt).compile()
      times = time_runs(lambda: jax.block_until_ready(assign(*assign_inputs, gt)), args.warmup, args.repeats)  # noqa: B023
      ms = median_ms(times)
      saving = 100 * (ms - medians[("assign", m)]) / ms
      table.add(f"task_aligned_assign, plain {name}", m, ms, "ms", len(times), f"kernel saves {saving:.0f}% of the assignment")


def task_rows(args, table, task: str, label: str, cfg, make_step, inputs_by_m, medians) -> None:
  """A task's step (``make_step(config)``, called as ``step(*inputs_by_m[m])``) with each of its task kernels
  (``TASK_KERNELS`` entries naming ``task``) plain; ``medians[m]`` is the step's own time; rows ``"{label}
  fwd+bwd, plain <kernel>"``."""
  for name in task_kernels(task):
    for m, inputs in inputs_by_m.items():
      step = jax.jit(make_step(plain(cfg, name))).lower(*inputs).compile()
      times = time_runs(lambda: jax.block_until_ready(step(*inputs)), args.warmup, args.repeats)  # noqa: B023
      ms = median_ms(times)
      saving = 100 * (ms - medians[m]) / ms
      table.add(f"{label} fwd+bwd, plain {name}", m, ms, "ms", len(times), f"kernel saves {saving:.0f}% of the step")


def segment_rows(args, table, cfg, make_step, inputs_by_m, medians) -> None:
  """:func:`task_rows` of the v8 segmentation step."""
  task_rows(args, table, "segment_loss", "segment loss", cfg, make_step, inputs_by_m, medians)
