"""Sweeps: one vmapped program per shape equals separate runs of each configuration."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from conftest import max_relative_error, under_xla_defaults

ROUNDS = 3


def make_fedadam(apply):
  """FedAdam with traced client and server learning rates."""
  def make(hp):
    return fs.fedavg(
        apply, client_optimizer=optax.sgd(hp["client_lr"]),
        server_optimizer=optax.chain(fs.optimizers.scale_by_reddi("adam"),
                                     optax.scale(-hp["server_lr"])),
        clients_per_round=hp["clients_per_round"], batch_size=4, steps=3)
  return make


@pytest.fixture(scope="module")
def swept(ragged, small_mlp):
  _, _, train = ragged
  evaluate = fs.make_evaluator(small_mlp.apply, test=(np.asarray(train.x[:, 0]),
                                                      np.asarray(train.y[:, 0])))
  result = fs.sweep(make_fedadam(small_mlp.apply), small_mlp.params, train,
                    grid={"client_lr": [0.05, 0.2], "server_lr": [0.05]}, seeds=[0, 1],
                    static={"clients_per_round": [3]}, rounds=ROUNDS, evaluate=evaluate)
  return result, evaluate


@pytest.mark.parametrize("index", [3])
def test_sweep_equals_separate_runs(ragged, small_mlp, swept, index):
  _, _, train = ragged
  result, evaluate = swept
  row = result.rows[index]
  algorithm = make_fedadam(small_mlp.apply)(
      {"client_lr": row["client_lr"], "server_lr": row["server_lr"], "clients_per_round": 3})
  state, history = fs.run(algorithm, algorithm.init(small_mlp.params, jax.random.key(row["seed"])),
                          train, rounds=ROUNDS, rounds_per_chunk=ROUNDS, evaluate=evaluate,
                          progress=False)
  assert max_relative_error(result.params[index], state.params) < 1e-5
  np.testing.assert_allclose(result.curves["train_loss"][index],
                             [r["train_loss"] for r in history], rtol=1e-5)
  assert row["final_test_accuracy"] == pytest.approx(history[-1]["test_accuracy"], abs=1e-6)
  assert row["final_test_loss"] == pytest.approx(history[-1]["test_loss"], rel=1e-5)
  assert max_relative_error(state.params, small_mlp.params) > 1e-2  # it trained


def test_sweep_table(swept):
  result, _ = swept
  assert [(r["client_lr"], r["seed"]) for r in result.rows] == [
      (0.05, 0), (0.05, 1), (0.2, 0), (0.2, 1)]
  assert all(r["clients_per_round"] == 3 and r["server_lr"] == 0.05 for r in result.rows)
  assert result.curves["train_loss"].shape == (4, ROUNDS)
  assert list(result.eval_rounds) == [ROUNDS]
  assert len(result.params) == 4 and len(result.seconds) == 1
  assert result.rows[0]["best_train_loss"] <= result.rows[0]["final_train_loss"]
  # Seeds differ, so rows with one configuration and two seeds differ.
  assert result.rows[0]["final_train_loss"] != result.rows[1]["final_train_loss"]


def test_sweep_rejects_bad_arguments(ragged, small_mlp):
  _, _, train = ragged
  make = make_fedadam(small_mlp.apply)
  with pytest.raises(ValueError, match="both in grid and static"):
    fs.sweep(make, small_mlp.params, train, grid={"client_lr": [0.1]},
             static={"client_lr": [0.1]}, rounds=1)
  with pytest.raises(ValueError, match="rounds"):
    fs.sweep(make, small_mlp.params, train, grid={"client_lr": [0.1]}, rounds=0)
  # -1 looped for ever; a seed of 0.7 ran as seed 0 and was reported as 0.7.
  with pytest.raises(ValueError, match="rounds_per_chunk must be a positive integer, got -1"):
    fs.sweep(make, small_mlp.params, train, grid={"client_lr": [0.1]}, rounds=2,
             rounds_per_chunk=-1)
  # A shape in the grid was refused as "not a positive integer, got VmapTracer(...)".
  shaped = lambda hp: fs.fedavg(small_mlp.apply, client_optimizer=optax.sgd(0.1),
                                clients_per_round=hp["clients_per_round"], batch_size=4, epochs=1)
  with pytest.raises(ValueError, match="it sets shapes, so a sweep takes it in static="):
    fs.sweep(shaped, small_mlp.params, train, grid={"clients_per_round": [2, 3]}, rounds=1)
  for bad in (0.7, -1, 2**32, True):
    with pytest.raises(ValueError, match=f"seeds must be integers in \\[0, 2\\^32\\), got {bad}"):
      fs.sweep(make, small_mlp.params, train, grid={"client_lr": [0.1]}, rounds=1,
               seeds=[0, bad])


def test_sweep_checks_every_row_and_the_shape_of_its_arguments(ragged, small_mlp,
                                                                count_compiles):
  _, _, train = ragged
  seen = []

  def make(hp):  # forwards **hp, as registry.build_algorithm does
    seen.append(sorted(hp))
    fs.algorithms.build_algorithm("fedprox", small_mlp.apply, clients_per_round=2,
                                  batch_size=4, steps=1, **hp)
    return fs.fedprox(small_mlp.apply, mu=hp["mu"], client_optimizer=optax.sgd(0.1),
                      clients_per_round=2, batch_size=4, steps=1)

  before = count_compiles()
  # Only the first row was checked: mu -1 in the second ran as a normal row.
  with pytest.raises(ValueError, match="mu must be >= 0, got -1.0"):
    fs.sweep(make, small_mlp.params, train, grid={"mu": [0.01, -1.0]}, rounds=1)
  # The probe got a `seed` no traced build sees: a factory forwarding **hp failed.
  assert seen == [["mu"], ["mu"]]
  cases = [(dict(static={"cpr": []}), "static\\['cpr'\\] needs at least one value"),
           (dict(static={"opt": "sgd"}), "static\\['opt'\\] must be a list of values, got 'sgd'"),
           (dict(static={"cpr": 4}), "static\\['cpr'\\] must be a list of values, got 4"),
           (dict(grid={"mu": [0.1, 0.1]}), "grid\\['mu'\\] repeats a value"),
           (dict(seeds=[3, 3]), "seeds repeat a seed: \\[3, 3\\]")]
  for kwargs, match in cases:
    with pytest.raises(ValueError, match=match):
      fs.sweep(make, small_mlp.params, train, **{"grid": {"mu": [0.1]}, "rounds": 1, **kwargs})
  assert count_compiles() == before


def test_curves_of_a_metric_some_static_groups_lack_stay_aligned(ragged, small_mlp):
  # round_time_s comes from the group with systems alone: its rows were stacked as the
  # whole curve, row 0's label on row 1's times.
  _, _, train = ragged
  profiles = fs.systems.make_profiles(train.num_clients, examples_per_s=10.0,
                                      downlink_bytes_per_s=1e9, uplink_bytes_per_s=1e9)

  def make(hp):
    return fs.fedavg(small_mlp.apply, client_optimizer=optax.sgd(hp["lr"]), clients_per_round=2,
                     batch_size=4, steps=1,
                     systems=fs.systems.SystemsConfig(profiles) if hp["systems"] else None)

  result = fs.sweep(make, small_mlp.params, train, grid={"lr": jnp.asarray([0.1])},
                    static={"systems": [False, True]}, rounds=2, seeds=np.arange(2))
  assert [(r["systems"], r["seed"]) for r in result.rows] == [
      (False, 0), (False, 1), (True, 0), (True, 1)]
  times = result.curves["round_time_s"]
  assert times.shape == (4, 2) and np.isnan(times[:2]).all() and (times[2:] > 0).all()
  assert result.curves["train_loss"].shape == (4, 2)


def test_best_of_a_curve_skips_rounds_that_went_nan():
  # As results.Run.best (fedjax-sim runs): results.csv's best_<metric> was NaN.
  from fedjax_sim.sweep import _best
  assert _best("train_loss", np.array([2.0, 1.5, np.nan, np.nan])) == 1.5
  assert _best("test_accuracy", np.array([0.2, np.inf, 0.4, np.nan])) == 0.4
  assert np.isnan(_best("train_loss", np.array([np.nan, np.nan])))


def test_sweep_plot_gives_every_seed_its_own_style(swept):
  import matplotlib
  matplotlib.use("Agg")
  from fedjax_sim.sweep import _seed_style
  # Line styles cycled every 4 seeds: seed 0 and seed 4 looked the same.
  styles = {tuple(sorted(_seed_style(i).items(), key=str)) for i in range(32)}
  assert len(styles) == 32
  ax = swept[0].plot("train_loss")
  assert [line.get_linestyle() for line in ax.get_lines()] == ["-", "--", "-", "--"]


def make_with_systems(apply, profiles):
  """FedAvg under systems with a norm-bounded mean, every numeric setting traced."""
  def make(hp):
    systems = fs.systems.SystemsConfig(
        profiles, deadline_s=hp["deadline"], dropout=hp["dropout"], stragglers="partial",
        straggler_fraction=hp["straggler_fraction"])
    aggregator = fs.aggregators.chain(fs.robust.norm_bound(hp["norm_bound"]),
                                      fs.aggregators.mean())
    return fs.fedavg(apply, client_optimizer=optax.sgd(0.1), clients_per_round=3, batch_size=4,
                     steps=3, systems=systems, aggregator=aggregator)
  return make


def test_sweep_of_systems_and_aggregator_settings_equals_runs(ragged, small_mlp):
  _, _, train = ragged
  make = make_with_systems(small_mlp.apply, fs.systems.sample_profiles(train.num_clients, seed=0))
  grid = {"deadline": [0.1, 10.0], "dropout": [0.2], "straggler_fraction": [0.5],
          "norm_bound": [0.05]}
  result = fs.sweep(make, small_mlp.params, train, grid=grid, seeds=[1], rounds=2)
  for index, row in enumerate(result.rows):
    algorithm = make({k: row[k] for k in grid})
    state, history = fs.run(algorithm, algorithm.init(small_mlp.params, jax.random.key(1)),
                            train, rounds=2, rounds_per_chunk=2, progress=False)
    assert max_relative_error(result.params[index], state.params) < 1e-5
    np.testing.assert_allclose(result.curves["round_time_s"][index],
                               [r["round_time_s"] for r in history], rtol=1e-6)
    np.testing.assert_array_equal(result.curves["num_aggregated"][index],
                                  [r["num_aggregated"] for r in history])
  # The deadline changed the rounds: a 0.1 s deadline cut them.
  assert result.curves["round_time_s"][0].max() <= 0.1 + 1e-6
  assert result.curves["round_time_s"][1].max() > 0.1


@under_xla_defaults
def test_a_shorter_final_chunk_reuses_the_one_program(ragged, small_mlp, monkeypatch):
  """3 rounds in chunks of 2: one program of gcd(2, 3) = 1 round (no second program for
  the final chunk), evaluations after rounds 2 and 3, curves equal to one chunk of 3."""
  sweep_lib = importlib.import_module("fedjax_sim.sweep")  # fs.sweep is the function
  _, _, train = ragged
  lengths = []
  real = sweep_lib.make_sweep_chunk
  monkeypatch.setattr(sweep_lib, "make_sweep_chunk",
                      lambda *a: lengths.append(a[-1]) or real(*a))
  evaluate = fs.make_evaluator(small_mlp.apply, test=(np.asarray(train.x[:, 0]),
                                                      np.asarray(train.y[:, 0])))
  kwargs = dict(grid={"client_lr": [0.05, 0.2], "server_lr": [0.05]}, seeds=[0],
                static={"clients_per_round": [3]}, rounds=ROUNDS, evaluate=evaluate)
  chunked = fs.sweep(make_fedadam(small_mlp.apply), small_mlp.params, train,
                     rounds_per_chunk=2, **kwargs)
  assert lengths == [1] and list(chunked.eval_rounds) == [2, 3]
  whole = fs.sweep(make_fedadam(small_mlp.apply), small_mlp.params, train,
                   rounds_per_chunk=ROUNDS, **kwargs)
  np.testing.assert_array_equal(chunked.curves["train_loss"], whole.curves["train_loss"])
  for a, b in zip(jax.tree_util.tree_leaves(chunked.params),
                  jax.tree_util.tree_leaves(whole.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
