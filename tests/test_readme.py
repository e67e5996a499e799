"""The README is executable: every Python block runs, in order, in one namespace (as a
reader would paste them), and every `fedjax-sim` command in its shell blocks runs, all
at small sizes, so the README cannot drift from the code."""

import json
import pathlib
import re
import shlex

import pytest

from fedjax_sim import cli

README = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
BLOCKS = [(m.group(1), m.group(2), README[:m.start()].count("\n") + 1)
          for m in re.finditer(r"```(\w+)\n(.*?)```", README, re.S)]
# Blocks and commands that cannot run here, with the reason.
NOT_RUN = {
    "jax.distributed.initialize": "needs several processes (tests/test_multihost.py runs it)",
    "--data-dir path/to": "needs LEAF data prepared on disk",
    "--resume": "continues a folder the command before wrote (tests/test_checkpoint.py does)",
}


def smaller(code: str) -> str:
  """The same code at test sizes: 2 rounds, one local epoch, one seed."""
  code = re.sub(r"\brounds=\d+", "rounds=2", code)
  code = re.sub(r"\brounds_per_chunk=\d+", "rounds_per_chunk=1", code)
  code = re.sub(r"\bepochs=\d+", "epochs=1", code)
  return code.replace("seeds=[0, 1, 2]", "seeds=[0]")


def test_every_python_block_runs_in_order(monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)
  namespace, ran = {}, 0
  for language, code, line in BLOCKS:
    if language != "python" or any(marker in code for marker in NOT_RUN):
      continue
    exec(compile(smaller(code), f"README.md:{line}", "exec"), namespace)
    ran += 1
  assert ran >= 8
  rounds, accuracy = namespace["history"].column("round")[1], namespace["accuracy"]
  assert len(rounds) == 2 and all(0.0 <= a <= 1.0 for a in accuracy)


RESULTS_COMMANDS = ("fedjax-sim plot", "fedjax-sim runs")  # they read what runs wrote


def commands():
  """Each command alone; a block with `fedjax-sim plot`/`runs` as one list, run in order
  (its runs write the folders the later commands read)."""
  for language, code, line in BLOCKS:
    if language != "bash":
      continue
    block = [c.split("#")[0].split("&&")[-1].strip() for c in code.splitlines()]
    block = [c for c in block if c.startswith("fedjax-sim")]
    if any(c.startswith(RESULTS_COMMANDS) for c in block):
      yield pytest.param(block, id=f"line{line}:{len(block)} commands in order")
    else:
      for command in block:
        yield pytest.param(command, id=f"line{line}:{command[:60]}")


@pytest.mark.parametrize("command", list(commands()))
def test_every_cli_example_runs(command, monkeypatch, tmp_path):
  reason = next((why for marker, why in NOT_RUN.items() if marker in str(command)), None)
  if reason:
    pytest.skip(reason)
  monkeypatch.chdir(tmp_path)  # examples that write files write them here
  if isinstance(command, list):  # a block: runs keep their own --output for what follows
    for line in command:
      extra = [] if line.startswith(RESULTS_COMMANDS) else ["--rounds", "2", "--no-progress"]
      assert cli.main(shlex.split(line)[1:] + extra) == 0, line
    return
  argv = shlex.split(command)[1:] + ["--rounds", "2", "--no-progress", "--output",
                                      str(tmp_path / "run")]
  assert cli.main(argv) == 0, command


def test_the_sweep_config_shown_is_the_example_file():
  shown = next(json.loads(code) for language, code, _ in BLOCKS if language == "json")
  example = pathlib.Path(__file__).parents[1] / "benchmarks" / "sweep_example.json"
  assert shown == json.loads(example.read_text())
