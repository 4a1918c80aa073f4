"""The launch scripts' dry runs: every command printed, shell-quoted, and none of them run.

Fake gcloud, scontrol, srun and sbatch come first on PATH and record each call, so a dry run that
runs anything leaves a trace (the fake scontrol may expand the node list, as SLURM's would).
"""
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TPU_SCRIPT = ROOT / "launch" / "tpu_pod.sh"
SLURM_SCRIPT = ROOT / "launch" / "slurm.sbatch"
JAX_VERSION = next(line.split("==")[1].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
                   if line.startswith("jax=="))
EXTRA = ["--config.train.num_steps=7", "--config.data.data_dir=/data/a b'c"]  # a space and a quote survive
TPU = ["gcloud", "compute", "tpus", "tpu-vm"]


@pytest.fixture
def fakes(tmp_path):
  """A bin folder of fake cluster tools, and the folder where each writes the calls it gets."""
  bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
  bin_dir.mkdir()
  calls.mkdir()
  for name in ("gcloud", "scontrol", "srun", "sbatch"):
    body = f'echo "$*" >> {calls / name}\n'
    if name == "scontrol":
      body += ('if [ "$1 $2" = "show hostnames" ]; then\n'
               '  if [ "$3" = "gpu[01-02]" ]; then printf "gpu01\\ngpu02\\n"; else echo "$3"; fi\nfi\n')
    (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
    (bin_dir / name).chmod(0o755)
  return bin_dir, calls


def launch(script, fakes, tmp_path, env, *args):
  bin_dir, _ = fakes
  # A bare environment: no SLURM_* or settings leak in from the shell running the tests.
  base = {"PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path), "TMPDIR": str(tmp_path)}
  return subprocess.run(["bash", str(script), *args], cwd=tmp_path, env={**base, **env}, capture_output=True,
                        text=True, timeout=60)


def printed_commands(stdout):
  """The '+ ' lines, split as a shell would (which also checks that they are quoted to be pasted)."""
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def flag(argv, name):
  values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
  assert len(values) == 1, (name, argv)
  return values[0]


def main_args(words):
  """The arguments after `python -m videofusion_jax.main` in a list of shell words, up to a redirection."""
  i = next(i for i in range(len(words) - 2) if words[i:i + 3] == ["python", "-m", "videofusion_jax.main"])
  rest = words[i + 3:]
  return rest[:rest.index(">")] if ">" in rest else rest


def one_error_line(r):
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), (r.returncode, r.stderr)
  return lines[0]


@pytest.mark.parametrize("spot,cleanup", [("1", "1"), ("0", "0")])
def test_tpu_dry_run(fakes, tmp_path, spot, cleanup):
  env = {"DRY_RUN": "1", "TPU_NAME": "vf-test", "ZONE": "europe-west4-b", "PROJECT": "my-proj",
         "ACCELERATOR_TYPE": "v5litepod-16", "SPOT": spot, "CLEANUP": cleanup, "CONFIG": "configs/taichi.py",
         "WORKDIR": "/mnt/shared/run"}
  r = launch(TPU_SCRIPT, fakes, tmp_path, env, *EXTRA)
  assert r.returncode == 0, r.stderr
  assert not list(fakes[1].iterdir()), "a dry run called a cluster tool"
  assert not list(tmp_path.glob("*.tar.gz")), "a dry run wrote the code tarball"
  # The existence check is printed, not run, and the dry run says what it assumes instead.
  assert "# dry run: the describe check is not run; assuming the slice does not exist" in r.stdout.splitlines()

  cmds = printed_commands(r.stdout)
  gcloud = [c for c in cmds if c[:4] == TPU]
  assert gcloud and all(c[4] == "describe" or "vf-test" in c[5] for c in gcloud)
  assert all("--zone=europe-west4-b" in c and "--project=my-proj" in c for c in gcloud)
  verbs = [c[4] for c in gcloud]
  assert verbs[:2] == ["describe", "create"]
  create = gcloud[1]
  assert "--accelerator-type=v5litepod-16" in create and flag(create, "version") == "v2-alpha-tpuv5-lite"
  assert ("--spot" in create) == (spot == "1")

  # The code: git archive of HEAD into the tarball that scp sends to every worker, then untarred on every worker.
  archive = next(c for c in cmds if c[:1] == ["git"] and "archive" in c)
  tarball = archive[archive.index("-o") + 1]
  assert archive[-1] == "HEAD" and tarball.startswith(str(tmp_path))
  scp = next(c for c in gcloud if c[4] == "scp")
  assert scp[5] == tarball and scp[6].startswith("vf-test:") and "--worker=all" in scp
  ssh = [c for c in gcloud if c[4] == "ssh"]
  remote = [flag(c, "command") for c in ssh]
  workers = [flag(c, "worker") for c in ssh]
  untar, setup, start, tail = (next(i for i, cmd in enumerate(remote) if key in cmd)
                               for key in ("tar -xzf", "pip install", "videofusion_jax.main", "tail "))
  assert workers[untar] == workers[setup] == workers[start] == "all" and workers[tail] == "0"
  assert gcloud.index(scp) < gcloud.index(ssh[untar]) < gcloud.index(ssh[setup]) < gcloud.index(ssh[start])
  assert gcloud.index(ssh[start]) < gcloud.index(ssh[tail])
  assert "source launch/setup_env.sh" in remote[setup]
  assert f"jax[tpu]=={JAX_VERSION}" in shlex.split(remote[setup])

  # One process per worker in the background, logging to a file; JAX finds the rest on a TPU VM.
  assert "nohup python -m videofusion_jax.main" in remote[start] and "> logs/main.log" in remote[start]
  args = main_args(shlex.split(remote[start]))
  assert flag(args, "config") == "configs/taichi.py" and flag(args, "workdir") == "/mnt/shared/run"
  assert flag(args, "mode") == "train" and "--multihost" in args and args[-2:] == EXTRA
  assert not [a for a in args if a.split("=")[0] in ("--coordinator_address", "--num_processes", "--process_id")]
  assert "logs/main.log" in remote[tail]

  deletes = [c for c in gcloud if c[4] == "delete"]
  if cleanup == "1":
    assert gcloud[-1] == deletes[0] and len(deletes) == 1 and "--quiet" in deletes[0]
  else:
    assert not deletes


@pytest.mark.parametrize("accelerator,workdir,message", [
    ("v5litepod-16", "", "set WORKDIR to a directory on a filesystem mounted at the same path on every worker"),
    ("v5litepod-16", "runs/ucf101", "runs/ucf101 is local to each worker, but v5litepod-16 has several"),
    ("v5litepod-16", "gs://bucket/run", "gs:// URLs are not supported yet; mount the bucket on every worker"),
    ("v4", "/mnt/shared/run", "ACCELERATOR_TYPE=v4: expected a type like v5litepod-16"),
])
def test_tpu_bad_settings(fakes, tmp_path, accelerator, workdir, message):
  env = {"DRY_RUN": "1", "ACCELERATOR_TYPE": accelerator, "WORKDIR": workdir}
  assert message in one_error_line(launch(TPU_SCRIPT, fakes, tmp_path, env))
  assert not list(fakes[1].iterdir())


def test_tpu_single_host_may_use_a_local_workdir(fakes, tmp_path):
  env = {"DRY_RUN": "1", "ACCELERATOR_TYPE": "v5litepod-8", "WORKDIR": "runs/ucf101"}
  r = launch(TPU_SCRIPT, fakes, tmp_path, env)
  assert r.returncode == 0, r.stderr
  assert "--workdir=runs/ucf101" in r.stdout


SLURM_ENV = {"DRY_RUN": "1", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_JOB_ID": "77", "WORKDIR": "/shared/run",
             "COORDINATOR_PORT": "23456", "CONFIG": "configs/taichi.py"}


def slurm_dry_run(fakes, tmp_path, **env):
  r = launch(SLURM_SCRIPT, fakes, tmp_path, {**SLURM_ENV, **env}, *EXTRA)
  assert r.returncode == 0, r.stderr
  calls = {p.name: p.read_text().splitlines() for p in fakes[1].iterdir()}
  assert set(calls) <= {"scontrol"}, f"a dry run ran {sorted(calls)}"
  assert all(c == "show hostnames gpu[01-02]" for c in calls.get("scontrol", []))
  return printed_commands(r.stdout)


def tasks(cmds):
  """Each task's main command: its JAX_LOCAL_DEVICE_IDS and its arguments, in task order."""
  return [(c[0].removeprefix("JAX_LOCAL_DEVICE_IDS="), main_args(c)) for c in cmds
          if c[0].startswith("JAX_LOCAL_DEVICE_IDS=")]


def check_tasks(per_task, n):
  assert [int(flag(args, "process_id")) for _, args in per_task] == list(range(n))
  for _, args in per_task:
    assert flag(args, "num_processes") == str(n) and flag(args, "coordinator_address") == "gpu01:23456"
    assert flag(args, "config") == "configs/taichi.py" and flag(args, "workdir") == "/shared/run"
    assert args[-2:] == EXTRA


def test_slurm_dry_run_one_process_per_gpu(fakes, tmp_path):
  cmds = slurm_dry_run(fakes, tmp_path, SLURM_NTASKS="8", SLURM_NTASKS_PER_NODE="4", SLURM_GPUS_ON_NODE="4")
  assert ["source", "launch/setup_env.sh"] in cmds
  assert ["python", "-m", "pip", "install", "-q", f"jax[cuda12]=={JAX_VERSION}"] in cmds
  sruns = [c for c in cmds if c[0] == "srun"]
  assert len(sruns) == 1 and sruns[0][1:4] == ["--kill-on-bad-exit=1", "bash", "-c"]
  # The process id is the task's own, not fixed when the job starts.
  assert "$SLURM_PROCID" in sruns[0][4] and "--process_id=" not in " ".join(sruns[0][5:])
  per_task = tasks(cmds)
  check_tasks(per_task, 8)
  assert [ids for ids, _ in per_task] == ["0", "1", "2", "3"] * 2  # each process its own GPU of its node


def test_slurm_dry_run_one_process_per_node(fakes, tmp_path):
  cmds = slurm_dry_run(fakes, tmp_path, SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1", SLURM_GPUS_ON_NODE="4",
                       SETUP_PER_NODE="1")
  setup, main = [c for c in cmds if c[0] == "srun"]
  assert "--ntasks-per-node=1" in setup and "source launch/setup_env.sh" in setup[setup.index("-c") + 1]
  assert setup[-1] == f"jax[cuda12]=={JAX_VERSION}"
  per_task = tasks(cmds)
  check_tasks(per_task, 2)
  assert [ids for ids, _ in per_task] == ["0,1,2,3"] * 2  # every GPU of the node


def test_slurm_dry_run_without_scontrol_expands_the_node_list_itself(fakes, tmp_path):
  """Off the cluster (no scontrol) the README's dry run stopped with 'scontrol not found'; a dry run now expands
  the usual node-list forms itself (a real run still needs scontrol)."""
  (fakes[0] / "scontrol").unlink()
  assert shutil.which("scontrol", path=f"{fakes[0]}:/usr/local/bin:/usr/bin:/bin") is None  # the premise
  cmds = slurm_dry_run(fakes, tmp_path, SLURM_NTASKS="8", SLURM_NTASKS_PER_NODE="4", SLURM_GPUS_ON_NODE="4")
  check_tasks(tasks(cmds), 8)  # on gpu01 and gpu02, coordinated from gpu01
  r = launch(SLURM_SCRIPT, fakes, tmp_path, {**SLURM_ENV, "SLURM_JOB_NODELIST": "gpu[08-09,10],cpu5,r[1-2]-n[1,3]",
                                              "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "1",
                                              "SLURM_GPUS_ON_NODE": "1"})
  assert r.returncode == 0, r.stderr
  assert "# 8 nodes (gpu08 gpu09 gpu10 cpu5 r1-n1 r1-n3 r2-n1 r2-n3), coordinator gpu08:23456" in r.stdout
  assert "scontrol not found: the node list expanded by this script (a dry run only)" in r.stdout
  r = launch(SLURM_SCRIPT, fakes, tmp_path, {**SLURM_ENV, "DRY_RUN": "0", "SLURM_NTASKS": "2"})
  assert "scontrol not found: it expands SLURM_JOB_NODELIST into the node names" in one_error_line(r)


def test_slurm_outside_a_job(fakes, tmp_path):
  r = launch(SLURM_SCRIPT, fakes, tmp_path, {"WORKDIR": "/shared/run"})
  assert "submit it with sbatch launch/slurm.sbatch" in one_error_line(r)
  assert not list(fakes[1].iterdir())


def test_slurm_tasks_per_node_must_match_gpus(fakes, tmp_path):
  env = {**SLURM_ENV, "SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2", "SLURM_GPUS_ON_NODE": "8"}
  assert "use --ntasks-per-node=8" in one_error_line(launch(SLURM_SCRIPT, fakes, tmp_path, env))


@pytest.mark.parametrize("version,venv_works,message", [
    ("3.10.12", True, "is Python 3.10.12; the pinned requirements need Python 3.11 or 3.12"),
    ("3.11.9", False, "-m venv' failed (above); on Debian or Ubuntu install the venv module"),
])
def test_setup_stops_on_an_old_python_or_a_missing_venv_module(tmp_path, version, venv_works, message):
  """launch/setup_env.sh with a stand-in python: one clear error, and no half-made .venv left behind
  for the next run to take as working."""
  fake = tmp_path / "python3"
  newer = "0" if tuple(map(int, version.split("."))) >= (3, 11) else "1"
  fake.write_text("#!/usr/bin/env bash\n"
                  f'if [ "$1" = "--version" ]; then echo "Python {version}"; exit 0; fi\n'
                  f'if [ "$1" = "-c" ]; then exit {newer}; fi\n'
                  f'if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin"; {"exit 0" if venv_works else "exit 1"}; fi\n')
  fake.chmod(0o755)
  venv = tmp_path / "venv"
  r = subprocess.run(["bash", "-c", f"source {ROOT / 'launch' / 'setup_env.sh'}"], capture_output=True, text=True,
                     env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHON": str(fake), "VENV": str(venv)})
  assert r.returncode == 1 and message in r.stderr, r.stderr
  assert not venv.exists()
  if not venv_works:  # a folder the user already had is not deleted
    venv.mkdir()
    (venv / "notes.txt").write_text("mine")
    r = subprocess.run(["bash", "-c", f"source {ROOT / 'launch' / 'setup_env.sh'}"], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHON": str(fake), "VENV": str(venv)})
    assert r.returncode == 1 and (venv / "notes.txt").read_text() == "mine"
  r = subprocess.run(["bash", "-c", f"source {ROOT / 'launch' / 'setup_env.sh'}"], capture_output=True, text=True,
                     env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHON": "python3.nowhere",
                          "VENV": str(tmp_path / "other")})
  assert r.returncode == 1 and r.stderr.startswith("error: python3.nowhere is not found; install Python 3.11"), r.stderr


@pytest.mark.parametrize("args,targets", [
    ([], ["tests"]),
    (["-k", "vdm", "-x"], ["tests", "-k", "vdm", "-x"]),
    (["tests/test_vdm.py"], ["tests/test_vdm.py"]),
    (["tests/test_cli.py::test_x", "-x"], ["tests/test_cli.py::test_x", "-x"]),
])
def test_test_script_runs_the_tests_it_is_given(tmp_path, args, targets):
  """launch/test.sh hands pytest the whole tests folder, or only the files and ids it was given (before,
  ``bash launch/test.sh tests/test_vdm.py`` ran the whole suite, that file twice over); options pass through.
  A stand-in venv whose python prints its arguments, with the stamp of the pinned requirements."""
  import hashlib
  venv = tmp_path / "venv"
  (venv / "bin").mkdir(parents=True)
  (venv / "bin" / "python").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
  (venv / "bin" / "python").chmod(0o755)
  (venv / "bin" / "activate").write_text(f'export PATH="{venv / "bin"}:$PATH"\n')
  want = hashlib.sha256((ROOT / "requirements.txt").read_bytes() + (ROOT / "pyproject.toml").read_bytes())
  (venv / ".requirements.sha256").write_text(want.hexdigest() + "\n")
  r = subprocess.run(["bash", str(ROOT / "launch" / "test.sh"), *args], capture_output=True, text=True, timeout=60,
                     env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "VENV": str(venv), "TEST_WORKERS": "2"})
  assert r.returncode == 0, r.stderr
  assert r.stdout.splitlines() == ["-m", "pytest", "-q", "--durations=15", "-n", "2", "--dist", "loadfile",
                                   *targets], r.stdout
