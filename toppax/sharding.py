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


def check_batch(global_batch: int, mesh) -> None:
  n = mesh.devices.size
  if global_batch % n:
    raise ValueError(f"batch size {global_batch} is not divisible by the {n} devices of the "
                     f"mesh: use a multiple of {n}")


def to_global(batch: dict, mesh) -> dict:
  """Host-local numpy batch -> global jax arrays sharded along 'data'."""
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
