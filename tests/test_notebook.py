"""notebooks/colab_demo.ipynb runs end to end on the CPU (nbclient, this venv's ipykernel) with tiny overrides:
the demo trains and samples, and the notebook shows the training curve, the videos and the grid."""
import ast
import base64
import json
import math
import re
import sys
from pathlib import Path

import nbformat
import pytest
from test_faults import one_device_env

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "colab_demo.ipynb"
NUM_SAMPLES = 2
# The demo shrunk as tiny_config is, so that compiling and running it takes seconds.
SHRINK = ("--config.data.image_size=8 --config.data.num_frames=4 --config.train.batch_size=4 "
          "--config.model.base.base_channels=8 --config.model.base.head_dim=8 --config.model.residual.base_channels=8 "
          "--config.model.residual.head_dim=8 --config.model.residual.channel_mult=(1,) "
          "--config.model.encoder.base_channels=8 --config.model.encoder.channel_mult=(1,) "
          "--config.model.prior.width=32 "
          "--config.model.prior.num_layers=1 --config.train.prior_repeats=2 --config.sample.upscale=1 "
          "--config.sample.num_real_clips=12 --config.sample.prior_num_steps=4 --config.sample.spacing=trailing "
          "--config.sample.prior_spacing=trailing")


def _read():
  return nbformat.read(NOTEBOOK, as_version=4)


def _parameters_cell(nb):
  cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(cells) == 1 and cells[0].cell_type == "code", "one code cell tagged 'parameters'"
  return cells[0]


def test_notebook_is_clean_and_parameterised():
  """Stored without outputs, valid nbformat 4, every parameter the test overrides is defined."""
  nb = _read()
  nbformat.validate(nb)
  assert nb.nbformat == 4
  assert NOTEBOOK.stat().st_size < 40_000
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, f"cell {cell.id} has outputs"
  defaults = {t.id: ast.literal_eval(node.value) for node in ast.parse(_parameters_cell(nb).source).body
              for t in node.targets}
  overridden = {"REPO_URL", "TRAIN_STEPS", "LOG_EVERY", "SAMPLE_STEPS", "NUM_SAMPLES", "WORKDIR", "EXTRA_ARGS"}
  assert overridden <= set(defaults)
  assert defaults["REPO_URL"] == "" and defaults["TRAIN_STEPS"] == 1600


def _kernel_env(tmp_path):
  """The test process's environment for the kernel (and so for the notebook's training process): one CPU
  device (conftest.py asks for eight; its unoptimised XLA CPU backend is kept)."""
  env = one_device_env()
  env.update(TF_CPP_MIN_LOG_LEVEL="2", IPYTHONDIR=str(tmp_path / "ipython"))
  return env


def _execute(nb, tmp_path, monkeypatch):
  from nbclient import NotebookClient

  spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
  spec_dir.mkdir(parents=True, exist_ok=True)  # a test may execute several notebooks
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "Python 3 (test)", "language": "python"}))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))  # searched before the user's kernelspecs
  monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
  client = NotebookClient(nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(tmp_path)}})
  client.execute(env=_kernel_env(tmp_path))
  return nb


def _outputs(cell, output_type=None):
  return [o for o in cell.outputs if output_type is None or o.output_type == output_type]


def _text(cell):
  return "".join(o.get("text", "") for o in _outputs(cell, "stream"))


def test_notebook_trains_plots_and_shows_videos(tfds_dir, tmp_path, monkeypatch):
  nb = _read()
  workdir = tmp_path / "work"
  extra = f"{SHRINK} --config.data.data_dir={tfds_dir} --config.compilation_cache_dir={tmp_path / 'xla'}"
  params = _parameters_cell(nb)  # the tiny overrides follow the notebook's own values, as papermill's would
  params.source += (f"\nTRAIN_STEPS = 12\nLOG_EVERY = 4\nSAMPLE_STEPS = 4\nNUM_SAMPLES = {NUM_SAMPLES}\n"
                    f"WORKDIR = {str(workdir)!r}\nEXTRA_ARGS = {extra!r}\n")
  # Colab users rerun cells: the parameters again (as after editing the form), then the curve and the videos.
  reruns = [nbformat.v4.new_code_cell(c.source) for c in nb.cells if c.get("id") in ("parameters", "curve", "video")]
  nb.cells += reruns
  # The TensorBoard line of "Next steps", as IPython expands a magic's arguments: the run's folder, also where
  # WORKDIR is relative (the default; {WORKDIR} named a folder under the kernel's working directory instead).
  markdown = "".join(c.source for c in nb.cells if c.cell_type == "markdown")
  [magic] = re.findall(r"`%tensorboard (--logdir [^`]+)`", markdown)
  nb.cells.append(nbformat.v4.new_code_cell(
      f"print(get_ipython().var_expand({magic!r}))\nWORKDIR, kept = 'workdirs/demo', WORKDIR\n"
      f"print(get_ipython().var_expand({magic!r}))\nWORKDIR = kept"))
  nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
  # What the curve cell drew, read from its figure: each line's label and values.
  nb.cells.append(nbformat.v4.new_code_cell(
      "print(json.dumps([[line.get_label(), [float(y) for y in line.get_ydata()]] for line in ax.get_lines()]))"))
  _execute(nb, tmp_path, monkeypatch)
  cells = {c.id: c for c in nb.cells if c.cell_type == "code"}
  for cell in reruns:  # WORKDIR made a Path by the set-up cell broke every cell after a rerun of the parameters
    assert not _outputs(cell, "error"), [o.get("evalue") for o in _outputs(cell, "error")]
  assert "step 12: loss" in _text(reruns[1])
  rerun_html = "".join(o.data.get("text/html", "") for o in _outputs(reruns[2], "display_data"))
  assert f"{NUM_SAMPLES} videos sampled from checkpoint 12 (step_12):" in rerun_html

  for cell in cells.values():
    assert cell.execution_count is not None and not _outputs(cell, "error"), cell.id
  assert _text(nb.cells[-2]).strip() == sys.executable  # the kernel ran this venv's interpreter
  assert _text(nb.cells[-3]).split() == ["--logdir", str(workdir / "tensorboard"), "--logdir",
                                         str(ROOT / "workdirs" / "demo" / "tensorboard")]
  assert any((workdir / "tensorboard").iterdir())
  assert "nothing to install" in _text(cells["install"])
  assert "CpuDevice(id=0)]" in _text(cells["devices"])  # one device: the conftest's eight did not reach it
  log = _text(cells["train"])
  assert "step     12/12" in log and "wrote 2 videos" in log, log[-3000:]

  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [4, 8, 12]
  for r in rows:
    for key in ("loss", "loss_key", "loss_residual", "loss_prior"):
      assert math.isfinite(r[key]) and 0 < r[key] < 10, (key, r)
  assert (workdir / "checkpoints" / "12").is_dir()

  from PIL import Image
  curve = workdir / "training_curve.png"
  with Image.open(curve) as im:
    assert im.format == "PNG" and im.size == (800, 450)
    colours = im.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 20  # lines, labels and a legend: not a blank canvas
  # The figure holds one line per loss term the run logged, in the notebook's order, each named for its term
  # and drawn through that term's values at the logged steps.
  names = {"loss": "loss", "loss_generators": "generators", "loss_key": "key frame", "loss_residual": "other frames",
           "loss_prior": "prior"}  # each label's words before its parenthesis
  terms = [k for k in names if k in rows[-1]]
  drawn = json.loads(_text(nb.cells[-1]))
  assert len(terms) >= 4 and [label.split(" (")[0] for label, _ in drawn] == [names[k] for k in terms]
  assert [values for _, values in drawn] == [[r[k] for r in rows] for k in terms]
  shown = [o for o in _outputs(cells["curve"], "display_data") if "image/png" in o.data]
  assert len(shown) == 1 and base64.b64decode(shown[0].data["image/png"])[:8] == b"\x89PNG\r\n\x1a\n"
  assert "step 12: loss" in _text(cells["curve"])

  sample_dir = workdir / "samples" / "step_12"
  mp4s = sorted(sample_dir.glob("sample_*.mp4"))
  assert len(mp4s) == NUM_SAMPLES
  html = "".join(o.data.get("text/html", "") for o in _outputs(cells["video"], "display_data"))
  payloads = re.findall(r'<video [^>]*src="data:video/mp4;base64,([A-Za-z0-9+/=]+)"', html)
  assert [base64.b64decode(p) for p in payloads] == [p.read_bytes() for p in mp4s]
  images = [o.data["image/png"] for o in _outputs(cells["video"], "display_data") if "image/png" in o.data]
  assert [base64.b64decode(i) for i in images] == [(sample_dir / "grid.png").read_bytes()]
  assert "all_frame_accuracy" in _text(cells["video"])


def test_notebook_stops_when_the_run_fails(tmp_path, monkeypatch):
  """A run that exits non-zero fails its cell, so Run all (and this test) stops there, its message shown.
  The config is a variant (``file:variant``), which the set-up cells take as the file it names."""
  from nbclient.exceptions import CellExecutionError

  nb = _read()
  nb.cells = nb.cells[:nb.cells.index(next(c for c in nb.cells if c.get("id") == "train")) + 1]
  params = _parameters_cell(nb)
  extra = f"--config.diffusion.lam=1.5 --config.compilation_cache_dir={tmp_path / 'xla'}"  # not the user's cache
  params.source += f"\nCONFIG = 'configs/demo.py:vdm'\nWORKDIR = {str(tmp_path / 'work')!r}\nEXTRA_ARGS = {extra!r}\n"
  with pytest.raises(CellExecutionError, match="exited with code 1"):
    _execute(nb, tmp_path, monkeypatch)
  assert "config.diffusion.lam=1.5" in _text(nb.cells[-1])


def test_notebook_says_what_a_mode_without_samples_shows_and_refuses_bad_parameters(tmp_path, monkeypatch):
  """MODE = 'train' draws no videos: the video cell says so (it raised 'run the training cell first', which had
  just run). A bad EXTRA_ARGS (an unbalanced quote) or a mistyped CONFIG is one message naming it, at the
  set-up cell, before anything slow."""
  from nbclient.exceptions import CellExecutionError

  keep = ("parameters", "install", "video")
  cases = (("MODE = 'train'", None),
           ("EXTRA_ARGS = \"--config.sample.prompt='a dog runs\"", "EXTRA_ARGS=.*No closing quotation"),
           ("CONFIG = 'configs/dmeo.py'", r"CONFIG='configs/dmeo.py': no such file .*configs/demo.py"))
  for settings, message in cases:
    nb = _read()
    nb.cells = [c for c in nb.cells if c.get("id") in keep]
    _parameters_cell(nb).source += f"\nWORKDIR = {str(tmp_path / 'work')!r}\n{settings}\n"
    if message is None:
      _execute(nb, tmp_path, monkeypatch)
      assert "MODE = 'train' draws none" in _text(nb.cells[-1]) and not _outputs(nb.cells[-1], "error")
    else:
      with pytest.raises(CellExecutionError, match=message):
        _execute(nb, tmp_path, monkeypatch)
