"""Shared fixtures. Eight CPU devices so that sharded and unsharded runs can be compared."""
import os

# XLA's CPU backend unoptimised, with its older elemental code generation instead of the MLIR
# fusion emitters: compiling, not running, is most of this suite's time. The tiny trainer's init
# and step compile in ~4 s and ~5 s, against ~4 s and ~7.5 s unoptimised with the emitters and
# ~12 s and ~13 s optimised (2026-12-05; after 7 steps the same gradient norm to 6 digits under
# all three; the switch alone, optimised, is slower: ~47 s and ~16 s). The suite: 807-819 s
# against 980 s with the emitters, every test passing (benchmarks/RESULTS.md, "The test suite's
# time"). Unoptimised through JAX's flag (its environment variable reaches the runs the tests
# start), not --xla_backend_optimization_level=0 in XLA_FLAGS, which no single compile could undo:
# the few tests that run long computations compile them optimised (the ``optimised`` fixture; the
# project's own CLIP trains 2.6x faster so).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_cpu_use_fusion_emitters=false").strip()
os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import atexit  # noqa: E402
import importlib.util  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402

# One persistent XLA cache for the session, set before anything compiles: the many experiments
# built from the same tiny config compile identical programs, which the later ones load. Under
# pytest-xdist (launch/test.sh) the controller makes it and its workers, which inherit the
# environment, share it; a size limit turns on the cache's file lock, so that one worker never
# reads an entry that another is still writing.
_XLA_CACHE = os.environ.get("VIDEOFUSION_TESTS_XLA_CACHE", "")
if not _XLA_CACHE:
  _XLA_CACHE = tempfile.mkdtemp(prefix="videofusion_tests_xla_")
  os.environ["VIDEOFUSION_TESTS_XLA_CACHE"] = _XLA_CACHE
  atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _XLA_CACHE)
jax.config.update("jax_compilation_cache_max_size", 16 << 30)

import pytest  # noqa: E402
from tiny import tiny_config  # noqa: E402,F401 - the tests import it from here

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))


def one_device(config):
  """A mesh of the first device alone, for a test that is not about sharding: the tiny step compiles
  and runs faster there than on the suite's eight (sharding has its own tests)."""
  from videofusion_jax.training import sharding as shd
  return shd.make_mesh(config, devices=jax.devices()[:1])


def load_benchmark(name: str):
  """The module ``benchmarks/<name>.py`` (benchmarks/ is no package)."""
  spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
  """A TFDS data dir with the demo clips built once per session."""
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture
def optimised():
  """XLA's optimisations on for this test's compiles (conftest.py turns them off for the suite):
  for tests whose time goes into running a long computation rather than compiling it. jax.jit's
  in-memory cache does not key on the setting: a function compiled before, unoptimised, stays so
  here, and one first compiled here stays optimised for the rest of the worker (the same numbers
  to rounding; the persistent cache keeps the two apart)."""
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", False)
  yield
  jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(scope="session")
def xla_out_of_memory():
  """XLA's own out-of-memory error, as a run meets it: a process allowed 6 GB more address space than it
  uses asks XLA for a 14.4 GB array (the text is XLA's; the exception, its class, made here)."""
  import subprocess
  code = ("import resource, jax, jax.numpy as jnp\n"
          "jnp.ones(3).block_until_ready()\n"
          "used = int(open('/proc/self/status').read().split('VmSize:')[1].split()[0]) * 1024\n"
          "resource.setrlimit(resource.RLIMIT_AS, (used + (6 << 30), resource.getrlimit(resource.RLIMIT_AS)[1]))\n"
          "try:\n"
          "  jax.jit(lambda x: jnp.outer(x, x))(jnp.ones(60000)).block_until_ready()\n"
          "except jax.errors.JaxRuntimeError as e:\n"
          "  print(e)\n")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
  assert r.returncode == 0 and "RESOURCE_EXHAUSTED" in r.stdout, (r.stdout, r.stderr)
  return jax.errors.JaxRuntimeError(r.stdout.strip())
