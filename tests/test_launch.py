"""The launch scripts' dry runs: every command printed, shell-quoted, and none of them run.

Fake gcloud, scontrol, srun and sbatch come first on PATH and record each call, so a dry run that
runs anything leaves a trace (the fake scontrol may expand the node list, as SLURM's would).
"""
import os
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
  """The arguments after `-m videofusion_jax.main` in a list of shell words, up to a redirection."""
  i = next(i for i in range(len(words) - 1) if words[i:i + 2] == ["-m", "videofusion_jax.main"])
  rest = words[i + 2:]
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
  (tmp_path / "videofusion-vf-test.tar.gz").write_text("another launch's")  # a dry run changes nothing
  r = launch(TPU_SCRIPT, fakes, tmp_path, env, *EXTRA)
  assert r.returncode == 0, r.stderr
  assert not list(fakes[1].iterdir()), "a dry run called a cluster tool"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "calls", "videofusion-vf-test.tar.gz"]
  # The existence check is printed, not run, and the dry run says what it assumes instead.
  assert "# dry run: the describe check is not run; assuming the slice does not exist" in r.stdout.splitlines()

  cmds = printed_commands(r.stdout)
  gcloud = [c for c in cmds if c[:4] == TPU]
  assert gcloud and all(c[6].startswith("vf-test:") if c[4] == "scp" else c[5] == "vf-test" for c in gcloud)
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
  assert """nohup bash -c 'python "$@" & echo $! > logs/main.pid; wait $!; echo $? > logs/main.rc' _ -m """ \
         "videofusion_jax.main" in remote[start] and "> logs/main.log" in remote[start]
  args = main_args(shlex.split(remote[start]))
  assert flag(args, "config") == "configs/taichi.py" and flag(args, "workdir") == "/mnt/shared/run"
  assert flag(args, "mode") == "train" and "--multihost" in args and args[-2:] == EXTRA
  assert not [a for a in args if a.split("=")[0] in ("--coordinator_address", "--num_processes", "--process_id")]
  assert "logs/main.log" in remote[tail]

  # Every worker's exit status, after the tail: the script fails where a run did.
  status = next(i for i, cmd in enumerate(remote) if "logs/main.rc" in cmd and "exit status" in cmd)
  assert workers[status] == "all" and gcloud.index(ssh[tail]) < gcloud.index(ssh[status])

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


# A TPU slice of two workers on this machine: a fake gcloud whose scp copies to, and whose ssh runs its
# --command in, a home folder per worker (w0, w1), each holding a stand-in venv whose python logs pip and plays
# the main program (prints its arguments, exits with FAKE_RC_W<worker>). FAKE_STATE: what describe prints;
# FAKE_DESCRIBE_ERR / FAKE_CREATE_ERR: their error; FAKE_SSH_FAIL: a regex of --commands whose ssh fails.
FAKE_GCLOUD = r"""#!/usr/bin/env bash
echo "$*" >> "$FAKE_ROOT/calls"
verb=$4; shift 4
case $verb in
  describe) if [ -n "${FAKE_DESCRIBE_ERR:-}" ]; then echo "$FAKE_DESCRIBE_ERR" >&2; exit 1; fi
            if [ -n "${FAKE_STATE:-}" ]; then printf '%s\n' "$FAKE_STATE"; exit 0; fi
            echo "ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource was not found" >&2; exit 1 ;;
  create) if [ -n "${FAKE_CREATE_ERR:-}" ]; then echo "$FAKE_CREATE_ERR" >&2; exit 1; fi ;;
  delete) ;;
  scp) for w in 0 1; do cp "$1" "$FAKE_ROOT/w$w/${2#*:}"; done ;;
  ssh) for a in "$@"; do
         case $a in --command=*) cmd=${a#--command=} ;; --worker=*) worker=${a#--worker=} ;; esac
       done
       if [ -n "${FAKE_SSH_FAIL:-}" ] && [[ $cmd =~ $FAKE_SSH_FAIL ]]; then
         echo "ssh: connect: timed out" >&2; exit 255
       fi
       rc=0
       for w in $( [ "$worker" = all ] && echo 0 1 || echo "$worker" ); do
         (cd "$FAKE_ROOT/w$w" && HOME="$FAKE_ROOT/w$w" WORKER=$w PATH="$FAKE_ROOT/wbin:$PATH" bash -c "$cmd") || rc=$?
       done
       exit $rc ;;
esac
"""
WORKER_PYTHON = r"""#!/usr/bin/env bash
if [ "$1 $2" = "-m pip" ]; then echo "pip $*" >> "$HOME/pip.log"; exit 0; fi
printf '<%s>\n' "$@"
sleep 0.5
rc=FAKE_RC_W$WORKER; exit "${!rc:-0}"
"""


@pytest.fixture
def pod(tmp_path):
  """(environment for launch(), the fake's root): two workers with a stand-in venv each."""
  import hashlib
  root = tmp_path / "pod"
  (root / "bin").mkdir(parents=True)
  (root / "wbin").mkdir()
  (root / "bin" / "gcloud").write_text(FAKE_GCLOUD)
  # On the workers: python3.11 is there (no apt-get), and a wait loop's sleep is short.
  (root / "wbin" / "python3.11").write_text("#!/usr/bin/env bash\n")
  (root / "wbin" / "sleep").write_text('#!/usr/bin/env bash\n/bin/sleep 0.1\n')
  want = hashlib.sha256((ROOT / "requirements.txt").read_bytes() + (ROOT / "pyproject.toml").read_bytes())
  for w in (0, 1):
    venv = root / f"w{w}" / "videofusion" / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(WORKER_PYTHON)
    (venv / "bin" / "activate").write_text(f'export PATH="{venv / "bin"}:$PATH"\n')
    (venv / ".requirements.sha256").write_text(want.hexdigest() + "\n")
  for f in (*(root / "bin").iterdir(), *(root / "wbin").iterdir(), *root.glob("w*/videofusion/.venv/bin/python")):
    f.chmod(0o755)
  env = {"PATH": f"{root / 'bin'}:/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path), "TMPDIR": str(tmp_path),
         "FAKE_ROOT": str(root), "TPU_NAME": "vf", "WORKDIR": "/mnt/shared/run", "CLEANUP": "1", "TZ": "UTC"}
  return env, root


def pod_run(tmp_path, env, *args):
  r = subprocess.run(["bash", str(TPU_SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                     timeout=120)
  calls = (Path(env["FAKE_ROOT"]) / "calls")
  verbs = [line.split()[3] for line in calls.read_text().splitlines()] if calls.exists() else []
  calls.unlink(missing_ok=True)
  return r, verbs


def test_tpu_run_reports_each_workers_exit_status_and_keeps_earlier_logs(pod, tmp_path):
  """The real flow on a fake two-worker slice: the run's arguments reach every worker intact; a worker that
  fails makes the script fail, naming it (it said exit 0: tail ends 0 whatever the run did); the slice this
  run created is deleted after every worker's process ended; a second launch keeps the first run's log."""
  env, root = pod
  r, verbs = pod_run(tmp_path, env, *EXTRA)
  assert r.returncode == 0, r.stderr
  assert verbs == ["describe", "create", "scp", "ssh", "ssh", "ssh", "ssh", "ssh", "ssh", "delete"]
  for w in (0, 1):
    log = (root / f"w{w}" / "videofusion" / "logs" / "main.log").read_text().splitlines()
    assert log[-2:] == [f"<{a}>" for a in EXTRA] and "<--multihost>" in log
    assert (root / f"w{w}" / "videofusion" / "logs" / "main.rc").read_text() == "0\n"
  assert "<--config.data.data_dir=/data/a b'c>" in r.stdout  # worker 0's log, followed
  first = root / "w1" / "videofusion" / "logs" / "main.log"
  os.utime(first, (1767323045, 1767323045))  # 2026-01-02 03:04:05 UTC
  first = first.read_text()

  r, verbs = pod_run(tmp_path, {**env, "FAKE_STATE": "READY\tv5litepod-16", "FAKE_RC_W1": "3"})
  assert r.returncode == 1 and verbs[-1] == "ssh"  # a slice it did not create stays
  assert f"error: the run on {os.uname().nodename} ended with exit status 3; its log: ~/videofusion/logs/main.log" \
      in r.stderr.splitlines(), r.stderr
  kept = list((root / "w1" / "videofusion" / "logs").glob("main.*-*.log"))  # under the date it was last written
  assert [p.name for p in kept] == ["main.20260102-030405.log"] and kept[0].read_text() == first

  r, verbs = pod_run(tmp_path, {**env, "FAKE_RC_W0": "1"})
  assert r.returncode == 1 and "ended with exit status 1" in r.stderr
  # The workers' processes were waited for before the status was read: deleted with no second wait.
  assert verbs[-4:] == ["ssh", "ssh", "ssh", "delete"] and "# waiting for every worker" not in r.stdout
  assert not list(tmp_path.glob("videofusion-launch.*"))  # this run's own files, removed


def test_tpu_run_deletes_only_a_slice_it_made_and_never_after_an_unclear_describe(pod, tmp_path):
  env, root = pod
  # gcloud cannot answer (credentials): no create, no delete, gcloud's message shown.
  auth = "ERROR: (gcloud.compute.tpus.tpu-vm.describe) There was a problem refreshing your current auth tokens"
  r, verbs = pod_run(tmp_path, {**env, "FAKE_DESCRIBE_ERR": auth})
  assert r.returncode == 1 and verbs == ["describe"] and auth in r.stderr
  assert "error: cannot tell whether TPU vf exists (gcloud's error above); nothing was created or deleted" in r.stderr
  # A slice of the name exists after all (someone else's): not deleted.
  exists = "ERROR: (gcloud.compute.tpus.tpu-vm.create) ALREADY_EXISTS: nodes/vf already exists"
  r, verbs = pod_run(tmp_path, {**env, "FAKE_CREATE_ERR": exists})
  assert r.returncode == 1 and verbs == ["describe", "create"] and exists in r.stderr
  # A create that fails otherwise may have left half a slice: deleted.
  r, verbs = pod_run(tmp_path, {**env, "FAKE_CREATE_ERR": "ERROR: RESOURCE_EXHAUSTED: no capacity"})
  assert r.returncode == 1 and verbs == ["describe", "create", "delete"]
  # Following the log fails (a preempted slice's ssh), and so does the wait for the workers: still deleted.
  r, verbs = pod_run(tmp_path, {**env, "FAKE_SSH_FAIL": r"tail -n|while \[ -f"})
  assert r.returncode == 255 and verbs[-1] == "delete", (verbs, r.stderr)
  assert "# waiting for every worker's process to end before deleting vf" in r.stdout
  # A READY slice of another type is not used; a run going on one is left as it is, code and environment.
  r, verbs = pod_run(tmp_path, {**env, "FAKE_STATE": "READY\tv4-32"})
  assert r.returncode == 1 and verbs == ["describe"] and "is a READY v4-32 slice, not ACCELERATOR_TYPE=v5litepod-16" \
      in r.stderr
  (root / "w1" / "videofusion" / "logs").mkdir(parents=True, exist_ok=True)
  (root / "w1" / "videofusion" / "README.md").unlink(missing_ok=True)  # copied by the runs above
  going = subprocess.Popen(["bash", "-c", "sleep 60; true", "-m", "videofusion_jax.main"])  # a run's arguments
  try:
    (root / "w1" / "videofusion" / "logs" / "main.pid").write_text(f"{going.pid}\n")
    r, verbs = pod_run(tmp_path, {**env, "FAKE_STATE": "READY\tv5litepod-16"})
  finally:
    going.kill()
  assert r.returncode == 1 and verbs == ["describe", "ssh"], verbs
  assert f"error: a run is already going on {os.uname().nodename} (process {going.pid})" in r.stderr
  assert not (root / "w1" / "videofusion" / "README.md").exists()  # nothing copied
  # After a reboot the recorded number may be another program's: no run of this project, so the launch goes on.
  other = subprocess.Popen(["sleep", "60"])
  try:
    (root / "w1" / "videofusion" / "logs" / "main.pid").write_text(f"{other.pid}\n")
    r, verbs = pod_run(tmp_path, {**env, "FAKE_STATE": "READY\tv5litepod-16"})
  finally:
    other.kill()
  assert r.returncode == 0 and verbs[:3] == ["describe", "ssh", "scp"], (verbs, r.stderr)


@pytest.mark.parametrize("env,message", [
    ({"DRY_RUN": "maybe"}, "DRY_RUN=maybe: use 1 or 0"),
    ({"SPOT": "sure"}, "SPOT=sure: use 1 or 0"),
    ({"PATH": "no gcloud"}, "gcloud is not found: install the Google Cloud CLI"),
    ({"CONFIG": "configs/mine.py:small"}, "CONFIG=configs/mine.py:small is not in the committed HEAD"),
])
def test_tpu_settings_refused_before_anything_runs(pod, tmp_path, env, message):
  if env.get("PATH") == "no gcloud":  # the system's tools without the gcloud this machine may have
    tools = tmp_path / "tools"
    tools.mkdir()
    for d in ("/usr/bin", "/bin"):
      for tool in Path(d).iterdir():
        if not tool.name.startswith("gcloud") and not (tools / tool.name).exists():
          (tools / tool.name).symlink_to(tool)
    env = {"PATH": str(tools)}
    assert shutil.which("gcloud", path=env["PATH"]) is None and shutil.which("git", path=env["PATH"])
  r, verbs = pod_run(tmp_path, {**pod[0], **env})
  assert message in one_error_line(r) and verbs == []


def test_tpu_dry_run_takes_true_and_yes(fakes, tmp_path):
  """DRY_RUN=true ran everything for real (only 1 counted), SPOT=yes made an on-demand slice."""
  r = launch(TPU_SCRIPT, fakes, tmp_path, {"DRY_RUN": "true", "SPOT": "yes", "CLEANUP": "On",
                                           "WORKDIR": "/mnt/shared/run"})
  assert r.returncode == 0 and not list(fakes[1].iterdir()), r.stderr
  gcloud = [c for c in printed_commands(r.stdout) if c[:4] == TPU]
  assert "--spot" in gcloud[1] and gcloud[-1][4] == "delete"


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
  assert len(sruns) == 1 and sruns[0][1:5] == ["--export=ALL", "--kill-on-bad-exit=1", "bash", "-c"]
  # The process id is the task's own, not fixed when the job starts.
  assert "$SLURM_PROCID" in sruns[0][5] and "--process_id=" not in " ".join(sruns[0][6:])
  per_task = tasks(cmds)
  check_tasks(per_task, 8)
  assert [ids for ids, _ in per_task] == ["0", "1", "2", "3"] * 2  # each process its own GPU of its node


def test_slurm_dry_run_one_process_per_node(fakes, tmp_path):
  cmds = slurm_dry_run(fakes, tmp_path, SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1", SLURM_GPUS_ON_NODE="4",
                       SETUP_PER_NODE="1")
  setup, main = [c for c in cmds if c[0] == "srun"]
  assert "--ntasks-per-node=1" in setup and "source launch/setup_env.sh" in setup[setup.index("-c") + 1]
  assert "--export=ALL" in setup and "--export=ALL" in main  # PATH to the venv even under sbatch --export=NONE
  assert setup[-1] == f"jax[cuda12]=={JAX_VERSION}"
  per_task = tasks(cmds)
  check_tasks(per_task, 2)
  assert [ids for ids, _ in per_task] == ["0,1,2,3"] * 2  # every GPU of the node


def test_slurm_coordinator_port_follows_the_job(fakes, tmp_path):
  """Two jobs whose first node is the same (nodes shared between jobs) both took port 12345: one job's
  coordinator could not start. The default port is the job's own."""
  env = {k: v for k, v in SLURM_ENV.items() if k != "COORDINATOR_PORT"}
  for job, port in (("77", 12077), ("123456", 12000 + 123456 % 8000)):
    r = launch(SLURM_SCRIPT, fakes, tmp_path, {**env, "SLURM_JOB_ID": job, "SLURM_NTASKS": "2",
                                               "SLURM_NTASKS_PER_NODE": "1", "SLURM_GPUS_ON_NODE": "1"})
    assert r.returncode == 0 and f"coordinator gpu01:{port}\n" in r.stdout, r.stderr


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
  # Fewer tasks than nodes (no --ntasks-per-node): was a division by zero in bash.
  env = {**SLURM_ENV, "SLURM_NTASKS": "1"}
  assert "1 task(s) do not spread evenly over the 2 node(s) (0 a node): submit with --ntasks-per-node" in \
      one_error_line(launch(SLURM_SCRIPT, fakes, tmp_path, env))
  r = launch(SLURM_SCRIPT, fakes, tmp_path, {**SLURM_ENV, "DRY_RUN": "yes", "SLURM_NTASKS": "2"})
  assert r.returncode == 0 and "# dry run" in r.stdout and not (fakes[1] / "srun").exists(), r.stderr


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


def stand_in_venv(tmp_path: Path) -> Path:
  """A venv whose python prints its arguments, with the stamp of the pinned requirements (no install)."""
  import hashlib
  venv = tmp_path / "venv"
  (venv / "bin").mkdir(parents=True)
  (venv / "bin" / "python").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
  (venv / "bin" / "python").chmod(0o755)
  (venv / "bin" / "activate").write_text(f'export PATH="{venv / "bin"}:$PATH"\n')
  want = hashlib.sha256((ROOT / "requirements.txt").read_bytes() + (ROOT / "pyproject.toml").read_bytes())
  (venv / ".requirements.sha256").write_text(want.hexdigest() + "\n")
  return venv


def test_demo_script_takes_a_relative_workdir_from_where_it_is_run(tmp_path):
  """WORKDIR=runs/exp1 bash launch/demo.sh, run from a project folder, trained under the repository (set-up
  moves there) and named a folder that was not where the user stood."""
  here = tmp_path / "project"
  here.mkdir()
  env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "VENV": str(stand_in_venv(tmp_path))}
  r = subprocess.run(["bash", str(ROOT / "launch" / "demo.sh")], capture_output=True, text=True, timeout=60,
                     cwd=here, env={**env, "WORKDIR": "runs/exp1"})
  assert r.returncode == 0, r.stderr
  assert f"--workdir={here}/runs/exp1" in r.stdout.splitlines()
  assert r.stdout.endswith(f"samples, checkpoints and TensorBoard events are in {here}/runs/exp1\n")
  r = subprocess.run(["bash", str(ROOT / "launch" / "demo.sh")], capture_output=True, text=True, timeout=60,
                     cwd=here, env=env)
  assert r.returncode == 0 and "--workdir=workdirs/demo" in r.stdout.splitlines()  # the default: the repository's
  r = subprocess.run(["bash", str(ROOT / "launch" / "demo.sh")], capture_output=True, text=True, timeout=60,
                     cwd=here, env={**env, "WORKDIR": "~/runs/x"})  # quoted, or from os.environ: the program expands
  assert r.returncode == 0 and "--workdir=~/runs/x" in r.stdout.splitlines()
  # A config of the user's (a variant) replaces the demo's (before: both were passed, and the program refused).
  r = subprocess.run(["bash", str(ROOT / "launch" / "demo.sh"), "--config=configs/demo.py:unconditional"],
                     capture_output=True, text=True, timeout=60, cwd=here, env=env)
  args = r.stdout.splitlines()
  assert r.returncode == 0, r.stderr
  assert [a for a in args if a.startswith("--config")] == ["--config=configs/demo.py:unconditional"], args


def test_two_set_ups_at_once_make_the_venv_once(tmp_path):
  """Two jobs started together on one shared venv both made it and ran pip into it at once (one of them could
  delete the venv the other was installing into); now the second waits for the first and finds it made. A
  stand-in python whose venv module takes half a second, and whose venv's pip a second, each recorded."""
  fake = tmp_path / "python3"
  pip = '#!/usr/bin/env bash\necho "pip start $$" >> "$LOG"; sleep 1; echo "pip end $$" >> "$LOG"\n'
  fake.write_text("#!/usr/bin/env bash\n"
                  'if [ "$1" = "-c" ]; then exit 0; fi\n'
                  'if [ "$1 $2" = "-m venv" ]; then\n'
                  '  echo "venv start $$" >> "$LOG"; sleep 0.5; mkdir -p "$3/bin" || exit 1\n'
                  f'  printf %s {shlex.quote(pip)} > "$3/bin/python"; chmod +x "$3/bin/python"; : > "$3/bin/activate"\n'
                  '  echo "venv end $$" >> "$LOG"\n'
                  'fi\n')
  fake.chmod(0o755)
  venv = tmp_path / "shared" / "venv"
  venv.parent.mkdir()
  env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "VENV": str(venv), "PYTHON": str(fake),
         "LOG": str(venv.parent / "log")}
  runs = [subprocess.Popen(["bash", "-c", f"source {ROOT / 'launch' / 'setup_env.sh'}"], env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
  outs = [r.communicate(timeout=60) for r in runs]
  assert all(r.returncode == 0 for r in runs), outs
  log = [line.split() for line in (venv.parent / "log").read_text().splitlines()]
  # One venv made, then one install (its three pip calls), each begun after the one before ended.
  assert [(what, when) for what, when, _ in log] == [("venv", "start"), ("venv", "end")] + [("pip", "start"),
                                                                                          ("pip", "end")] * 3
  assert sum("[setup] creating" in out for out, _ in outs) == 1
  assert sum("[setup] installing" in out for out, _ in outs) == 1


def test_a_failed_install_stops_the_set_up_and_writes_no_stamp(tmp_path):
  """tpu_pod.sh sources setup_env.sh after `&&`, which turns set -e off inside it: a failed `pip install -r`
  went unnoticed and the stamp was written over the broken venv, so no later run installed again."""
  venv = stand_in_venv(tmp_path)
  (venv / ".requirements.sha256").unlink()
  (venv / "bin" / "python").write_text('#!/usr/bin/env bash\n[ "$5" = "-r" ] && { echo "pip: no network" >&2; '
                                       'exit 1; }\nexit 0\n')
  r = subprocess.run(["bash", "-c", f"true && source {ROOT / 'launch' / 'setup_env.sh'} && echo after"],
                     capture_output=True, text=True, timeout=60,
                     env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "VENV": str(venv)})
  assert r.returncode == 1 and "after" not in r.stdout, (r.stdout, r.stderr)
  assert "pip: no network" in r.stderr and "error: installing the pinned requirements into" in r.stderr
  assert not (venv / ".requirements.sha256").exists()


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
  venv = stand_in_venv(tmp_path)
  r = subprocess.run(["bash", str(ROOT / "launch" / "test.sh"), *args], capture_output=True, text=True, timeout=60,
                     env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "VENV": str(venv), "TEST_WORKERS": "2"})
  assert r.returncode == 0, r.stderr
  assert r.stdout.splitlines() == ["-m", "pytest", "-q", "--durations=15", "-n", "2", "--dist", "loadfile",
                                   *targets], r.stdout
