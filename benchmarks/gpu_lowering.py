"""What a GPU would be given to compile, measured on any machine: the initial state's and the train
step's programs lowered for CUDA (lowering needs no GPU), with the operations each holds once its
calls are inlined (as XLA inlines them before it fuses and emits kernels), the share of them that
is threefry's unrolled rounds, its random draws and its distinct convolutions. A proxy for the GPU
compile's work where no GPU is lent, not a compile time.

  python benchmarks/gpu_lowering.py --config=configs/ucf101.py [--programs=init,step]   # VDM*: configs/ucf101.py:vdm

One JSON line per program and threefry lowering: the project's (``init``: JAX's threefry kernel,
``experiment.init_lowering``; ``step``: JAX's default, the unrolled rounds) and the other one.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import json
import re
import sys
import time
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent))

_NAME = r'@("[^"]+"|[\w.$-]+)'  # a symbol, quoted where it holds other characters (@"<lambda>")
_FUNC = re.compile(r"^\s*func\.func (?:public |private )?" + _NAME)
_CALL = re.compile(r"\bcall " + _NAME)
_OP = re.compile(r"^\s*(?:%[^=]+=\s*)?\"?(stablehlo\.\w+)(?: @(\w+))?")


def inlined_ops(text: str) -> dict:
  """Operations of a lowered module's ``main`` with every ``func.call`` replaced by its function's body
  (recursively), as XLA inlines them: ``ops`` in all, ``by_op`` by name (a custom call with its target,
  ``stablehlo.custom_call@name``), ``threefry_round_ops`` those inside the functions JAX names
  ``threefry2x32`` (the rounds, unrolled or the kernel's call) and ``draws`` the calls of those functions."""
  bodies: dict[str, tuple[collections.Counter, list[str]]] = {}
  current = None
  for line in text.splitlines():
    m = _FUNC.match(line)
    if m:
      current = bodies.setdefault(m.group(1), (collections.Counter(), []))
      continue
    if current is None:
      continue
    op = _OP.match(line)
    if op:
      current[0][op.group(1) + (f"@{op.group(2)}" if op.group(2) else "")] += 1
    if "custom_call" not in line:
      current[1].extend(_CALL.findall(line))
  rounds = lambda name: name.split("_")[0] == "threefry2x32"  # noqa: E731 - threefry2x32, threefry2x32_0, ...

  @functools.cache
  def expand(name: str) -> tuple[collections.Counter, int, int]:
    ops, calls = bodies[name]
    total = collections.Counter(ops)
    in_rounds, draws = (sum(ops.values()), 0) if rounds(name) else (0, 0)
    for callee in calls:
      sub, sub_rounds, sub_draws = expand(callee)
      total.update(sub)
      in_rounds += sum(sub.values()) if rounds(callee) else sub_rounds
      draws += 1 if rounds(callee) else sub_draws
    return total, in_rounds, draws

  total, in_rounds, draws = expand("main")
  return {"ops": sum(total.values()), "by_op": total, "threefry_round_ops": in_rounds, "draws": draws}


def distinct_convolutions(text: str) -> int:
  """Distinct ``stablehlo.convolution`` signatures (operand and result types, dimension numbers,
  windows) in the module: what XLA's GPU autotuner times one by one."""
  return len({re.sub(r"%[\w#]+", "%", line.strip()) for line in text.splitlines() if "stablehlo.convolution" in line})


def measure(lowered_text, kernel: bool) -> dict:
  """``lowered_text()`` (a module lowered for CUDA, as text) under JAX's threefry kernel (the setting of
  ``experiment.init_lowering``) or JAX's default lowering."""
  from videofusion_jax.experiment import init_lowering
  t0 = time.perf_counter()
  with init_lowering() if kernel else contextlib.nullcontext():
    text = lowered_text()
  lower_s = time.perf_counter() - t0
  counts = inlined_ops(text)
  return {"threefry": "kernel" if kernel else "unrolled", "ops_inlined": counts["ops"],
          "threefry_round_ops": counts["threefry_round_ops"],
          "threefry_share": round(counts["threefry_round_ops"] / max(counts["ops"], 1), 3),
          "random_draws": counts["draws"],
          "threefry_kernel_calls": counts["by_op"].get("stablehlo.custom_call@cu_threefry2x32_ffi", 0),
          "convolutions": counts["by_op"].get("stablehlo.convolution", 0),
          "distinct_convolutions": distinct_convolutions(text), "lower_s": round(lower_s, 2)}


def main(argv):
  del argv
  import jax
  from memory import abstract_batch

  from videofusion_jax.config import ConfigError
  from videofusion_jax.experiment import Experiment
  from videofusion_jax.training.step import Trainer
  config, programs = flags.FLAGS.config, flags.FLAGS.programs
  config.compilation_cache_dir = ""  # nothing is compiled
  unknown = set(programs) - {"init", "step"}
  if unknown:
    raise app.UsageError(f"--programs: {sorted(unknown)} not among init, step")
  try:
    experiment = Trainer(config) if "step" in programs else Experiment(config)
  except ConfigError as e:  # one line, as the main program gives it
    raise app.UsageError(str(e)) from None
  for name in programs:
    if name == "init":
      key = jax.random.PRNGKey(0)  # the program init_state runs: its jit, out_shardings and activation rules
      text = lambda e=experiment, k=key: e._init.plain.trace(k).lower(lowering_platforms=("cuda",)).as_text()  # noqa: E731
      runs = ((True, "the project's"), (False, "JAX's default"))
    else:
      text = lambda t=experiment: t.step.plain.trace(t.abstract_state(), abstract_batch(t)).lower(  # noqa: E731
          lowering_platforms=("cuda",)).as_text()
      runs = ((False, "the project's"), (True, "JAX's kernel"))
    for kernel, whose in runs:
      print(json.dumps({"result": "gpu_lowering", "program": name, **measure(text, kernel), "lowering": whose,
                        "kind": config.model.kind, "batch_size": config.train.batch_size}), flush=True)


if __name__ == "__main__":  # flags defined here: the tests import this module beside others that define --config
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", "configs/ucf101.py", "Experiment config.")
  flags.DEFINE_list("programs", ["init", "step"], "Programs to lower: init, step.")
  app.run(main)
