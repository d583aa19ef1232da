"""Reductions across devices for the loss under ``shard_map`` / ``pmap`` (``axis_name``)."""

from __future__ import annotations

import functools

import jax


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def global_sum(x: jax.Array, axis_name: str) -> jax.Array:
  """``psum`` whose gradient is this device's share only (the cotangent passes through).

  The default transpose of ``psum`` depends on the mapping API (``shard_map`` with or without
  ``check_vma``, ``pmap``); fixing it here makes gradients exact in all of them.
  """
  return jax.lax.psum(x, axis_name)


def _global_sum_fwd(x, axis_name):
  return jax.lax.psum(x, axis_name), x


def _varying_axes(x) -> frozenset:
  aval = jax.typeof(x)
  mat = getattr(aval, "manual_axis_type", None)
  return frozenset(mat.varying) if mat is not None else frozenset(getattr(aval, "vma", ()))


def _global_sum_bwd(axis_name, x, ct):
  # Under shard_map's type checking the cotangent must vary over the same axes as x.
  missing = tuple(_varying_axes(x) - _varying_axes(ct))
  if missing:
    ct = jax.lax.pcast(ct, missing, to="varying")
  return (ct,)


global_sum.defvjp(_global_sum_fwd, _global_sum_bwd)
