"""Data-parallel sharding: one mesh axis 'data' over all devices (of all processes).

The train state is replicated and the batch is split along 'data'; XLA inserts the gradient
all-reduce. Host-local batches become global arrays with
``jax.make_array_from_process_local_data`` so the same code runs on one CPU and on a pod.
"""
from __future__ import annotations

import logging
import os

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def maybe_initialize_distributed(config) -> bool:
  """``jax.distributed.initialize()`` when ``config.multihost`` or TOPPAX_MULTIHOST=1.

  On Cloud TPU and SLURM/Open MPI clusters jax finds the coordinator itself; elsewhere set
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (read by jax).
  """
  wanted = bool(config.get("multihost", False)) or os.environ.get("TOPPAX_MULTIHOST") == "1"
  if not wanted:
    return False
  kw = {}
  if "JAX_COORDINATOR_ADDRESS" in os.environ:
    kw = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
              num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
              process_id=int(os.environ["JAX_PROCESS_ID"]))
  jax.distributed.initialize(**kw)
  logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
  return True


def make_mesh(num_devices: int = 0, devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh ('data',) over the first ``num_devices`` devices (0: all)."""
  if devices is None:
    devices = jax.devices()
    if num_devices:
      if num_devices > len(devices):
        raise ValueError(f"asked for {num_devices} devices, only {len(devices)} present")
      devices = devices[:num_devices]
  # Auto axes: XLA propagates the batch sharding through the step (classic GSPMD data parallel);
  # jax's default Explicit axes would make every op's sharding part of its type.
  return jax.make_mesh((len(devices),), (DATA_AXIS,), (jax.sharding.AxisType.Auto,),
                       devices=devices)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch(global_batch: int, mesh, name: str = "batch size") -> None:
  """Raises unless ``global_batch`` is a positive multiple of the mesh's devices; ``name`` is the
  config field to name in the message (e.g. "config.eval_batch_size")."""
  n = mesh.devices.size
  if global_batch < 1:
    raise ValueError(f"{name} must be a positive integer, got {global_batch!r}")
  if global_batch % n:
    lo = max(n, global_batch // n * n)
    raise ValueError(f"{name}={global_batch} is not divisible by the {n} devices of the mesh: "
                     f"set {name} to a multiple of {n} (e.g. {lo} or {lo + n})")


def to_global(batch: dict, mesh) -> dict:
  """Host-local numpy batch -> global jax arrays sharded along 'data'."""
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def is_prng_key(x) -> bool:
  """A typed PRNG key array (``jax.random.key``), as in nnx RNG state."""
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def apply_model(graphdef, params, rngs, images, mesh, call=None):
  """The model's forward on a batch sharded along 'data': ``(outputs, new non-param state)``.

  ``call(model, images)`` runs the model (default ``model(images)``); its outputs, a pytree of
  arrays with the batch first, are split along 'data' like the images.

  On more than one device the forward runs per shard under ``jax.shard_map`` (params and
  state replicated, images and logits split). The Pallas scan kernels are custom calls that
  XLA's SPMD partitioner cannot split: left to GSPMD, it would all-gather their operands and
  every device would scan the whole global batch. The shard_map keeps ``check_vma=False``
  because Pallas' interpret mode (the CPU tests of the GPU kernel under it) fails on dynamic
  Ref indexing under that check. The gradients of the replicated inputs are summed over the
  mesh either way (tests/test_sharding.py).
  Each shard folds its index into the model's RNG keys (drop-path masks differ per shard); the
  state returned keeps the original keys with the advanced counters, identical on all shards.
  """
  from flax import nnx
  call = call or (lambda model, images: model(images))

  def body(params, rngs, images, shard):
    local = jax.tree.map(lambda x: jax.random.fold_in(x, shard) if is_prng_key(x) else x, rngs)
    model = nnx.merge(graphdef, params, local)
    outputs = call(model, images)
    new = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))
    new = jax.tree.map(lambda n, o: o if is_prng_key(o) else n, new, rngs)
    return outputs, new

  if mesh.devices.size == 1:
    model = nnx.merge(graphdef, params, rngs)
    return call(model, images), nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))

  def sharded(params, rngs, images):
    return body(params, rngs, images, jax.lax.axis_index(DATA_AXIS))

  return jax.shard_map(sharded, mesh=mesh, in_specs=(P(), P(), P(DATA_AXIS)),
                       out_specs=(P(DATA_AXIS), P()), check_vma=False)(params, rngs, images)
