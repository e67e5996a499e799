"""Executes the notebooks in notebooks/ at tiny sizes, so they keep running as the API moves,
and checks that the outputs committed with them come from the current code.

Each notebook keeps its sizes in one code cell tagged `parameters` (as papermill does).
`execute_notebook` inserts a cell right after it that reassigns the overridden names,
runs the notebook in a fresh python3 kernel (matplotlib inline, this checkout's
fedjax_sim), and returns the executed notebook; any cell that raises fails the test. The
notebooks are committed executed at a reader's sizes by notebooks/execute.py: the same
execution here checks the committed copy has no errors, that its code cells are the ones
it ran (their hash), and that it shows as many figures as the current code draws. To cover
a new notebook, add it to NOTEBOOKS with overrides that make it fast (and that keep the
number of figures: a figure per value of a list parameter needs as many values).

The selected notebooks start together with the module, as many kernels at a time as
there are cores (at most 4; a kernel mostly compiles, on one core), and each test checks
its notebook once it has run.
"""

from __future__ import annotations

import ast
import concurrent.futures
import importlib.util
import os
import pathlib
import sys
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
sys.path.insert(0, str(NOTEBOOK_DIR))
import execute as notebook_execute  # noqa: E402  (notebooks/execute.py)

TMP = "<tmp>"  # an override replaced by the test's own temporary folder

# notebook file -> (overrides for its parameters cell, small enough for a 2-core CPU;
#                   strings its printed output must contain at those sizes).
NOTEBOOKS = {
    "quickstart.ipynb": (
        {"ROUNDS": 4, "EVAL_EVERY": 2, "CLIENTS_PER_ROUND": 2, "RUNS_DIR": TMP},
        ["4 rounds in", "round 4: train loss", "after round 4", "FedAvg (SGD, lr 1)",
         "FedAdam (lr 0.03)", "server_optimizer", "fedadam", "completed"]),
    "non_iid.ipynb": (
        {"ALPHAS": [100.0, 1.0, 0.1], "NUM_CLIENTS": 10, "ROUNDS": 2, "EVAL_EVERY": 2,
         "CLIENTS_PER_ROUND": 2, "LOCAL_EPOCHS": 1},
        ["alpha=100: 10 clients", "alpha=0.1: test accuracy", "after 2 rounds",
         "labels per client", "shards:", "padding efficiency"]),
    "privacy_and_attacks.ipynb": (
        {"DP_CLIENTS": 100, "DP_CLIENTS_PER_ROUND": 10, "DP_ROUNDS": 2, "NOISE_MULTIPLIERS": [2.0],
         "RDP_ORDERS": [2, 4, 8, 16, 32], "ROUNDS": 2, "COMPARE_PLAIN": False, "BITS": [],
         "ROTATED_BITS": [2], "TOP_K": [], "COMPRESSION_MODEL": "logreg",
         "MALICIOUS_FRACTIONS": [0.2], "AGGREGATORS": ["median"], "DEFENCES": ["norm_bound"]},
        ["needs noise multiplier z =", "the budget of 2.0 lasts", "z=2: epsilon",
         "client 9 dropped:", "secure aggregation, 30% dropout: test accuracy",
         "2-bit rotated: 3.25", "MB uplink",
         "median, 20% malicious: test accuracy", "defence norm_bound: test accuracy"]),
    "sweeps.ipynb": (
        {"ROUNDS": 2, "EVAL_EVERY": 2, "CLIENTS_PER_ROUND": 3, "FEDAVG_CLIENT_LRS": [0.01, 0.05],
         "FEDADAM_SERVER_LRS": [0.01, 0.1], "SEEDS": [0]},
        ["FedAvg sweep: 2 runs", "FedAdam sweep: 2 runs", "final test accuracy by learning rate",
         "2 separate fs.run calls", "faster as a sweep", "sweep vs separate: 0"]),
}


def _assigned_names(source: str) -> set[str]:
  names = set()
  for node in ast.parse(source).body:
    targets = node.targets if isinstance(node, ast.Assign) else (
        [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else [])
    for target in targets:
      for sub in ast.walk(target):
        if isinstance(sub, ast.Name):
          names.add(sub.id)
  return names


def execute_notebook(path, overrides: dict | None = None, *, timeout: int = 120,
                     kernel_name: str = "python3"):
  """Runs the notebook at `path` with its parameters overridden; returns the executed notebook.

  Args:
    path: the .ipynb file. It runs with its own folder as the working directory.
    overrides: name -> value for the cell tagged `parameters`; values are written with
      `repr`, and every name must be assigned in that cell (so a renamed parameter fails
      here instead of silently running at full size).
    timeout: seconds allowed per cell.
    kernel_name: the Jupyter kernel to run.

  Raises:
    nbclient.exceptions.CellExecutionError: a cell raised; the message shows the traceback.
    ValueError: no parameters cell, or an override the parameters cell does not assign.
  """
  path = pathlib.Path(path)
  nb = nbformat.read(path, as_version=4)
  overrides = dict(overrides or {})
  if overrides:
    index = next((i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
                  and "parameters" in cell.get("metadata", {}).get("tags", [])), None)
    if index is None:
      raise ValueError(f"{path.name}: no code cell tagged 'parameters' to override")
    unknown = set(overrides) - _assigned_names(nb.cells[index].source)
    if unknown:
      raise ValueError(f"{path.name}: the parameters cell does not assign {sorted(unknown)}")
    source = "\n".join(f"{name} = {value!r}" for name, value in overrides.items())
    injected = nbformat.v4.new_code_cell(
        "# Parameters injected by tests/test_notebooks.py\n" + source,
        metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(index + 1, injected)
  env = notebook_execute.kernel_env()  # inline figures, as committed; this checkout's code
  client = nbclient.NotebookClient(
      nb, timeout=timeout, kernel_name=kernel_name,
      resources={"metadata": {"path": str(path.parent)}})
  client.execute(env=env)
  return nb


def _outputs(nb, output_type: str) -> list:
  return [out for cell in nb.cells if cell.cell_type == "code"
          for out in cell.get("outputs", []) if out.output_type == output_type]


def _text(nb) -> str:
  """Everything the notebook printed to stdout, plus text results."""
  parts = [out.text for out in _outputs(nb, "stream") if out.name == "stdout"]
  parts += [out.data.get("text/plain", "") for out in _outputs(nb, "execute_result")]
  return "\n".join(parts)


def _figures(nb) -> int:
  return sum("image/png" in out.get("data", {}) for cell in nb.cells if cell.cell_type == "code"
             for out in cell.get("outputs", []))


@pytest.fixture(scope="module")
def executed(request, tmp_path_factory):
  """name -> future of (executed notebook, seconds) for every notebook a selected
  test_notebook_runs item runs, queued at once in test order; each in its own folder."""
  names = [item.callspec.params["name"] for item in request.session.items
           if item.module.__name__ == __name__ and item.originalname == "test_notebook_runs"]

  def run(name, tmp):
    overrides = {k: str(tmp) if v == TMP else v for k, v in NOTEBOOKS[name][0].items()}
    start = time.perf_counter()
    nb = execute_notebook(NOTEBOOK_DIR / name, overrides)
    return nb, time.perf_counter() - start

  workers = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)))
  futures = {name: workers.submit(run, name, tmp_path_factory.mktemp(name.split(".")[0]))
             for name in names}
  yield futures
  for future in futures.values():
    future.cancel()
  workers.shutdown(wait=True)


def test_notebook_list_is_current():
  missing = [name for name in NOTEBOOKS if not (NOTEBOOK_DIR / name).exists()]
  assert not missing, f"NOTEBOOKS names files that are not in notebooks/: {missing}"


@pytest.mark.skipif(importlib.util.find_spec("fedjax_sim") is None,
                    reason="fedjax_sim must be installed for the notebook kernel")
@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_runs(name, executed):
  _, expected = NOTEBOOKS[name]
  nb, seconds = executed[name].result()
  assert not _outputs(nb, "error")
  code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
  assert all(cell.get("execution_count") for cell in code_cells), "a code cell did not run"
  text = _text(nb)
  assert text.strip(), f"{name} printed nothing"
  missing = [s for s in expected if s not in text]
  assert not missing, f"{name} output lacks {missing}; it printed:\n{text}"
  # The committed copy: executed whole by notebooks/execute.py from these code cells.
  committed = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
  rerun = "run python notebooks/execute.py " + name
  assert not _outputs(committed, "error"), f"{name} is committed with an error; {rerun}"
  counts = [cell.get("execution_count") for cell in committed.cells if cell.cell_type == "code"]
  assert counts == list(range(1, len(counts) + 1)), f"{name} is not committed executed; {rerun}"
  recorded = committed.metadata.get("fedjax_sim", {}).get("sources_sha256")
  assert recorded == notebook_execute.sources_sha256(committed), (
      f"{name}'s code cells changed after its outputs were made; {rerun}")
  assert _figures(committed) == _figures(nb) > 0, (
      f"{name}: {_figures(committed)} figure(s) committed, the current code draws "
      f"{_figures(nb)}; {rerun}")
  print(f"{name}: {seconds:.1f} s")


def test_overrides_must_name_parameters(tmp_path):
  nb = nbformat.v4.new_notebook(cells=[
      nbformat.v4.new_code_cell("ROUNDS = 200", metadata={"tags": ["parameters"]})])
  path = tmp_path / "tiny.ipynb"
  nbformat.write(nb, path)
  with pytest.raises(ValueError, match="does not assign"):
    execute_notebook(path, {"ROUNDZ": 4})
