"""The README's Python example runs as written (with fewer rounds)."""

import pathlib
import re


def test_readme_python_example_runs():
  text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
  code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
  code = code.replace("rounds=200", "rounds=2").replace("evaluate=evaluate)", "evaluate=evaluate, progress=False)")
  namespace = {}
  exec(compile(code, "README.md", "exec"), namespace)
  assert len(namespace["accuracy"]) == 1 and 0.0 <= namespace["accuracy"][0] <= 1.0
