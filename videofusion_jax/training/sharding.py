"""The device mesh and the shardings of parameters and batches."""
from __future__ import annotations

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp")


def make_mesh(config: ml_collections.ConfigDict, devices=None) -> Mesh:
  """A ``(data, fsdp)`` mesh over all devices; ``-1`` in ``config.mesh`` takes the rest."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  data, fsdp = int(config.mesh.data), int(config.mesh.fsdp)
  if data == -1:
    data = devices.size // fsdp
  if fsdp == -1:
    fsdp = devices.size // data
  if data * fsdp != devices.size:
    raise ValueError(f"config.mesh data={config.mesh.data}, fsdp={config.mesh.fsdp} does not cover "
                     f"the {devices.size} devices; make data*fsdp equal the device count.")
  return Mesh(devices.reshape(data, fsdp), MESH_AXES)


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Drops mesh axes from dimensions they do not divide (those stay replicated)."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
    out.append(axes if names and dim % size == 0 else None)
  return P(*out)


def param_shardings(boxed_abstract, mesh: Mesh, rules) -> object:
  """NamedShardings for a tree of boxed (``nn.Partitioned``) abstract parameters."""
  specs = nn.get_partition_spec(boxed_abstract)
  mesh_specs = nn.logical_to_mesh(specs, rules)
  shapes = nn.unbox(boxed_abstract)
  return jax.tree.map(lambda s, x: NamedSharding(mesh, _fit(s, x.shape, mesh)), mesh_specs, shapes,
                      is_leaf=lambda s: isinstance(s, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every mesh axis."""
  return NamedSharding(mesh, P(MESH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local: dict, mesh: Mesh) -> dict:
  """Per-host numpy batch -> global jax.Arrays sharded over the batch axis."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}
