"""Flags and arguments that would do nothing are refused, naming what they need (issue 15,
item 1), in the CLI, sweep configs and the Python API; `--help` (item 7)."""

import re

import pytest

from fedjax_sim import cli, robust, sweep_config, tasks
from fedjax_sim.algorithms import build_algorithm


@pytest.mark.parametrize("flags,match", [
    (["--trim-fraction", "0.3"],
     "--trim-fraction has no effect here: it applies with --aggregator trimmed_mean"),
    (["--secagg-dropout", "0"], "--secagg-dropout has no effect here: it applies with "
     "--aggregator secure_mean"),
    (["--attack", "label_flip", "--malicious-fraction", "0.2", "--attack-scale", "5"],
     "--attack-scale has no effect here: it applies with --attack scaling or sign_flip"),
    (["--delta", "1e-5"], "--delta has no effect here: it applies with DP"),
    (["--accountant", "pld"], "--accountant has no effect here: it applies with DP"),
    (["--dropout", "0.1", "--stragglers", "partial"],
     "--stragglers has no effect here: it applies with --deadline or --straggler-fraction"),
    (["--task", "digits", "--alpha", "0.1"],
     "alpha \\(--alpha\\) has no effect with partition 'iid': it applies with partition "
     "'dirichlet'"),
    (["--task", "digits", "--partition", "dirichlet", "--sigma", "2"],
     "sigma \\(--sigma\\) has no effect with partition 'dirichlet'"),
    # Synthetic's alpha changes no label: two runs differing by it were one run.
    (["--alpha", "0.3"], "--alpha has no effect here: it applies with --partition dirichlet "
     "on a partitioned task \\(Synthetic's alpha changes no label"),
    (["--profiles-seed", "-1", "--deadline", "5"], "--profiles-seed must be an integer >= 0, "
     "got -1"),
])
def test_a_flag_without_effect_is_an_error_naming_what_it_needs(tmp_path, capsys, flags,
                                                                   match):
  out = tmp_path / "x"
  assert cli.main(["run", "--rounds", "1", "--output", str(out), "--no-progress",
                   *flags]) == 2
  assert re.search(match, capsys.readouterr().err)
  assert not out.exists()  # refused before the run started


def test_the_flags_with_their_requirement_are_accepted():
  # Checks only (nothing compiles): the same flags where they apply pass.
  from fedjax_sim import run_options
  parser = cli.build_parser()
  for flags in (["--aggregator", "trimmed_mean", "--trim-fraction", "0.3"],
                ["--clip", "1", "--noise-multiplier", "1", "--delta", "1e-5",
                 "--accountant", "pld"],
                ["--deadline", "2", "--stragglers", "partial"],
                ["--attack", "scaling", "--malicious-fraction", "0.2", "--attack-scale", "3"]):
    args = parser.parse_args(["run", *flags])
    run_options.check_flags(args)
    assert run_options.unused_flags(args) == []


def _sweep(tmp_path, **changes):
  config = {"task": "synthetic", "algorithm": "fedavg",
            "settings": {"rounds": 1, "clients_per_round": 2, "batch_size": 5, "steps": 1},
            "grid": {"client_lr": [0.1]}, "seeds": [0]}
  for key, value in changes.items():
    config[key] = {**config.get(key, {}), **value}
  parsed = sweep_config.parse_config(config, source="s.json")
  task = tasks.load_task("synthetic")
  builder = sweep_config.Builder(parsed, None, task)
  model = task.make_model("logreg", 0)
  builder.apply = model.apply
  return builder.check(model.params)


def test_sweep_settings_without_effect_are_errors_unless_some_combination_uses_them(tmp_path):
  with pytest.raises(sweep_config.ConfigError,
                     match="s.json: settings.trim_fraction has no effect: it applies with "
                           "--aggregator trimmed_mean"):
    _sweep(tmp_path, settings={"trim_fraction": 0.2})
  # One static combination uses it: accepted (the other runs without it).
  _sweep(tmp_path, settings={"trim_fraction": 0.2},
         static={"aggregator": ["mean", "trimmed_mean"]})


def test_python_api_refuses_arguments_that_do_nothing(small_mlp):
  kwargs = dict(clients_per_round=2, batch_size=4, steps=1)
  with pytest.raises(ValueError, match="fedavg does not use mu; it applies to fedprox"):
    build_algorithm("fedavg", small_mlp.apply, mu=0.5, **kwargs)
  with pytest.raises(ValueError, match="client_momentum applies with client_optimizer="
                                       "'momentum', got 'sgd'"):
    build_algorithm("fedavg", small_mlp.apply, client_momentum=0.5, **kwargs)
  with pytest.raises(ValueError, match="staleness: fedbuff's .* fedprox does not use them"):
    build_algorithm("fedprox", small_mlp.apply, staleness="constant", **kwargs)
  with pytest.raises(ValueError, match="fedrep_head: FedRep's argument; ditto does not use it"):
    build_algorithm("ditto", small_mlp.apply, fedrep_head="out", **kwargs)
  with pytest.raises(ValueError, match="give trim_fraction or num_trim, not both"):
    robust.trimmed_mean(0.2, num_trim=1)
  with pytest.raises(ValueError, match="shards_per_client .* has no effect with partition "
                                       "'dirichlet'"):
    tasks.load_task("digits", partition="dirichlet", shards_per_client=3)


def test_every_flag_has_a_help_line_that_shows_its_default_once():
  commands = cli.build_parser()._subparsers._group_actions[0].choices
  for name in ("run", "sweep"):
    parser = commands[name]
    formatter = parser._get_formatter()
    for action in parser._actions:
      if action.dest == "help":
        continue
      assert action.help, (name, action.option_strings)
      text = formatter._expand_help(action)
      count = text.lower().count("default")
      assert count <= 1, (action.option_strings, text)
      if action.default is not None:  # the formatter shows it
        assert count == 1, (action.option_strings, text)
  text = commands["run"].format_help()
  assert "(default: None)" not in text and "local epochs (default 1)" in text
