"""Executes the notebooks at the sizes a reader would use and writes them back with outputs.

    python notebooks/execute.py                     # every notebook here
    python notebooks/execute.py quickstart.ipynb    # some of them

So a reader on a code host sees the figures and tables without running anything. Each
notebook runs top to bottom in a fresh python3 kernel (matplotlib inline, PNG figures),
importing fedjax_sim from this checkout, from a temporary working directory (folders the
notebooks write, such as runs/, land there and are removed). Execution timestamps are
dropped, and `metadata.fedjax_sim.sources_sha256` records the code cells it ran, so
tests/test_notebooks.py can tell a committed notebook whose cells changed after it was
executed; that test also re-executes every notebook at small sizes and checks the number
of figures and that no cell fails.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
CHECKOUT = HERE.parent


def sources_sha256(nb) -> str:
  """SHA-256 of the notebook's code cells' sources, in order."""
  digest = hashlib.sha256()
  for cell in nb.cells:
    if cell.cell_type == "code":
      digest.update(cell.source.encode() + b"\0")
  return digest.hexdigest()


def _overwrite(text: str) -> str:
  """Text as a terminal shows it: a carriage return rewrites its line (progress bars)."""
  return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


def coalesce_streams(outputs: list) -> list:
  """Consecutive stdout (or stderr) outputs as one, each line as a terminal leaves it."""
  out = []
  for output in outputs:
    if (output.get("output_type") == "stream" and out
        and out[-1].get("output_type") == "stream" and out[-1]["name"] == output["name"]):
      out[-1]["text"] += output["text"]
    else:
      out.append(output)
  for output in out:
    if output.get("output_type") == "stream":
      output["text"] = _overwrite(output["text"])
  return out


def kernel_env() -> dict[str, str]:
  """The kernel's environment: Agg for any pyplot figure outside the inline backend, and
  this checkout first on the path."""
  path = os.environ.get("PYTHONPATH")
  return {**os.environ, "MPLBACKEND": "module://matplotlib_inline.backend_inline",
          "PYTHONPATH": str(CHECKOUT) + (os.pathsep + path if path else "")}


def execute(path: pathlib.Path, timeout: int = 1200) -> float:
  """Executes the notebook at `path` and writes it back with its outputs; returns seconds."""
  import nbclient
  import nbformat

  nb = nbformat.read(path, as_version=4)
  start = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix="fedjax_sim_notebook_") as cwd:
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                     resources={"metadata": {"path": cwd}})
    client.execute(env=kernel_env())
  seconds = time.perf_counter() - start
  for cell in nb.cells:
    cell.metadata.pop("execution", None)
    if cell.cell_type == "code":
      cell.outputs = coalesce_streams(cell.outputs)
  nb.metadata["fedjax_sim"] = {"sources_sha256": sources_sha256(nb)}
  nbformat.write(nb, path)
  return seconds


def main(names: list[str]) -> int:
  paths = [HERE / name for name in names] if names else sorted(HERE.glob("*.ipynb"))
  total = 0.0
  for path in paths:
    seconds = execute(path)
    total += seconds
    print(f"{path.name}: {seconds:.1f} s", flush=True)
  print(f"{len(paths)} notebook(s) in {total:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
