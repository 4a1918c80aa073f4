"""Shared fixtures. Eight CPU devices so that sharded and unsharded runs can be compared."""
import os

# XLA's CPU backend unoptimised: compiling, not running, is most of this suite's time (a tiny
# trainer's init and step compile in ~16 s and ~30 s instead of ~33 s and ~42 s; the runs that
# execute most, the demo's 200 steps and the I3D features, measured no slower).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import atexit  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402

# One persistent XLA cache for the session, set before anything compiles: the many experiments
# built from the same tiny config compile identical programs, which the later ones load.
_XLA_CACHE = tempfile.mkdtemp(prefix="videofusion_tests_xla_")
atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _XLA_CACHE)

import pytest  # noqa: E402
from tiny import tiny_config  # noqa: E402,F401 - the tests import it from here

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
  """A TFDS data dir with the demo clips built once per session."""
  return str(tmp_path_factory.mktemp("tfds"))
