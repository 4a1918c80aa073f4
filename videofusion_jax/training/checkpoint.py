"""Orbax checkpoints: async saves, keep the last N, restore onto any mesh.

Each step holds two items: ``state`` (the TrainState) and ``data`` (a small JSON dict with the
input stream's position, so that resuming continues the stream instead of restarting it).
"""
from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

ITEMS = ("state", "data")


class CheckpointError(RuntimeError):
  """No usable checkpoint where one was expected; the message says where and what to do."""


def make_manager(workdir: str | Path, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
  directory = Path(workdir).absolute() / "checkpoints"
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=async_save)
  # Named items, so that steps written before the stream position existed (one unnamed
  # item) do not lock the manager into single-item mode.
  return ocp.CheckpointManager(directory, item_names=ITEMS, options=options)


def _restore_state(manager: ocp.CheckpointManager, step: int, abstract_state=None):
  """The ``state`` item of ``step`` (as plain arrays without ``abstract_state``), whichever format wrote it."""
  args = ocp.args.StandardRestore(abstract_state)
  if (Path(manager.directory) / str(step) / "default").is_dir():  # one unnamed item: before the stream position
    with ocp.CheckpointManager(manager.directory) as legacy:
      return legacy.restore(step, args=args)
  return manager.restore(step, args=ocp.args.Composite(state=args))["state"]


def abstract_like(state, shardings):
  """ShapeDtypeStructs carrying the target shardings: restores onto this mesh, whatever
  device count wrote the checkpoint."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)


def save(manager: ocp.CheckpointManager, step: int, state, data_state: dict | None = None) -> None:
  items = {"state": ocp.args.StandardSave(state)}
  if data_state is not None:
    items["data"] = ocp.args.JsonSave(data_state)
  manager.save(step, args=ocp.args.Composite(**items))


def saved_networks(manager: ocp.CheckpointManager, step: int) -> set[str] | None:
  """The networks (top-level keys of ``params``) in checkpoint ``step``, from its metadata; None
  if they cannot be read."""
  step_dir = Path(manager.directory) / str(step)
  item = step_dir / "state" if (step_dir / "state").is_dir() else step_dir / "default"
  try:
    with ocp.StandardCheckpointer() as reader:
      meta = reader.metadata(item)
    return set(getattr(meta, "item_metadata", meta)["params"].keys())
  except Exception:  # noqa: BLE001 - only used to word an error better
    return None


def restore(manager: ocp.CheckpointManager, abstract_state, step: int | None = None):
  step = manager.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"no checkpoint in {manager.directory}: train first (--mode=train).")
  try:
    return _restore_state(manager, step, abstract_state)
  except (ValueError, KeyError, TypeError) as e:
    saved, wanted = saved_networks(manager, step), set(abstract_state.params)
    if saved is not None and saved != wanted:
      missing, extra = sorted(wanted - saved), sorted(saved - wanted)
      if "video" in saved ^ wanted:
        kind = "vdm" if "video" in saved else "videofusion"
        hint = f"it is a{' VDM*' if kind == 'vdm' else ' VideoFusion'} checkpoint: use --config.model.kind={kind}"
      elif "prior" in missing:
        hint = ("it was trained with --config.model.condition=label (no encoder, no prior): use that, or train "
                "a model with the embedding condition")
      else:
        hint = "it was trained with another config.model.condition or config.model.encoder.kind"
      raise CheckpointError(
          f"checkpoint {step} in {manager.directory} has the networks {sorted(saved)} and this config needs "
          f"{sorted(wanted)}" + (f" (missing: {', '.join(missing)})" if missing else "")
          + (f" (not used by this config: {', '.join(extra)})" if extra else "") + f"; {hint}.") from None
    raise CheckpointError(
        f"checkpoint {step} in {manager.directory} does not match this config's model "
        f"({type(e).__name__}: {str(e)[:300]}). Use the config it was trained with.") from None


def restore_data_state(manager: ocp.CheckpointManager, step: int) -> dict | None:
  """The input stream's position saved with ``step``, or None for a checkpoint without one."""
  if not (Path(manager.directory) / str(step) / "data").exists():
    return None
  return dict(manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"])


def restore_raw(workdir: str | Path):
  """The latest checkpoint of another run as plain arrays (no target tree). Read only: the
  manager neither creates folders nor keeps a maximum, so nothing of that run is touched."""
  directory = Path(workdir).absolute() / "checkpoints"
  if not directory.is_dir():
    raise CheckpointError(f"no checkpoint found under {directory}: train that run first.")
  options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
  manager = ocp.CheckpointManager(directory, item_names=ITEMS, options=options)
  step = manager.latest_step()
  if step is None:
    manager.close()
    raise CheckpointError(f"no checkpoint found under {directory}: train that run first.")
  try:
    restored = _restore_state(manager, step)
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"cannot read checkpoint {step} under {directory} "
                          f"({type(e).__name__}: {str(e)[:300]}).") from None
  finally:
    manager.close()
  return restored, step
