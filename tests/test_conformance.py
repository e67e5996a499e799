"""The conformance matrix: every synchronous algorithm x every shared feature.

Each supported cell of `features.matrix()` runs 2 rounds of the tiny MLP on 16 ragged
clients (8 per round) and is checked against what that feature must do; each refused
cell must be refused for its documented reason. The README's table is generated from
the same matrix (`test_readme_table_is_generated`).

Compile time is the budget (2 shared CPU cores), so each algorithm compiles 4 round
programs, all in one XLA program (`cells`), plus `fs.sweep`'s:

- `ref`: separate runs of every configuration of its sweep grid, the defaults first
  (the reference of the sweep, chunk, attack, mixed-precision and sharded cells);
- `aggregators`: DP mean, coordinate median, secure mean and a chain of a sign-flip
  attack and 4-bit quantization, run one after another with one compiled round: its
  aggregator is each of them in turn (`in_turn`), the real ones, on the real uploads;
- `systems`: a deadline with partial work, over-selection and dropout, together;
- `mixed`: the model computing in bfloat16;
- `fs.sweep` with chunks of 1 client (so it also checks chunking against `ref`).

The 8-device cells run in one subprocess for all algorithms (started with the module,
so that it overlaps the rest) and are compared with `ref`. The per-algorithm programs
(`cells`, `sweep`) are compiled and run by worker threads, all of the selected ones
queued with the module, so that compiles (XLA releases the GIL) use every core while the
tests check the results that are ready.
"""

import concurrent.futures
import functools
import json
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_sim as fs
from fedjax_sim import aggregators, attacks, compression, models, privacy, robust
from fedjax_sim import secure_aggregation
from fedjax_sim import systems as systems_lib
from fedjax_sim.algorithms import engine, features
from conftest import max_relative_error

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(HERE, os.pardir, "README.md")

SETUP = features.default_setup()
MODEL, DATA = SETUP.model, SETUP.data
N, M, B = SETUP.num_clients, SETUP.clients_per_round, SETUP.batch_size
ROUNDS = 2
ALGORITHMS = list(features.ALGORITHMS)
FEATURES = [f.name for f in features.FEATURES]
# The documented refusal: server rules that divide weighted means (engine.ServerRule
# `weighted_ratio`) with a reducer that ignores the weights.
WEIGHTED_RATIO = {"fednova", "qffl", "fedexp"}
IGNORE_WEIGHTS = ("DP mean", "median", "secure mean")
RATIO_REASON = "server rule divides example-weighted means"
# The systems cell: with the first keys of jax.random.key(0) this drops a client in
# round 0 and leaves more responders than the server keeps in both rounds.
OVER_SELECTION, DROPOUT = 2, 0.05
NOISE_DRAWS = 64
CHAIN = "sign flip + 4-bit quantization"


def fast_compile_options():
  """XLA:CPU options that compile these small programs 2-3x faster (no backend
  optimization, no fusion emitters): the cells check equalities and bounds, not speed.
  None where this backend does not take them."""
  options = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
  if jax.default_backend() != "cpu":
    return None
  try:
    jax.jit(lambda x: x + 1, compiler_options=options)(1.0)
  except Exception:  # a jaxlib without these options
    return None
  return options


OPTIONS = fast_compile_options()
MATRIX = features.matrix(SETUP)


@pytest.fixture(scope="module", autouse=True)
def fast_compiles():
  """fs.sweep compiles with `compile.compiler_options()`: here with OPTIONS too."""
  from fedjax_sim import compile as compile_lib
  usual = compile_lib.compiler_options()
  with pytest.MonkeyPatch.context() as patch:
    if OPTIONS is not None:
      patch.setattr(compile_lib, "compiler_options", lambda: {**(usual or {}), **OPTIONS})
    yield


def supported(name, feature):
  return MATRIX[name][feature] is None


def row(tree, i):
  return jax.tree_util.tree_map(lambda a: a[i], tree)


# --- The 8-device cells: one subprocess for all algorithms, started at once ----------


@pytest.fixture(scope="module", autouse=True)
def sharded_process(request):
  """Starts tests/conformance_sharded_script.py if a sharded cell was selected."""
  wanted = any("sharded" in item.nodeid and item.module.__name__ == __name__
               for item in request.session.items)
  if not wanted:
    yield None
    return
  # This process's XLA_FLAGS (conftest.py's faster compiles) plus 8 devices.
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
  env = {**os.environ, "XLA_FLAGS": flags.strip(), "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen([sys.executable, "conformance_sharded_script.py"], cwd=HERE, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  yield proc
  if proc.poll() is None:
    proc.kill()
    proc.communicate()


@functools.cache
def sharded_results(proc):
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  return json.loads(out.strip().splitlines()[-1])


# --- Worker threads: each algorithm's programs, compiled and run once -----------------

_WORKERS = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)))
_FUTURES = {}


def computed_once(fn):
  """`fn(name)`, computed once per name by a worker thread (queued by `prefetch` or at
  the first call); the caller waits for it."""

  def queue(name):
    key = (fn.__name__, name)
    if key not in _FUTURES:
      _FUTURES[key] = _WORKERS.submit(fn, name)
    return _FUTURES[key]

  @functools.wraps(fn)
  def result(name):
    return queue(name).result()

  result.queue = queue
  return result


@pytest.fixture(scope="module", autouse=True)
def prefetch(request, fast_compiles):
  """Queues `cells` and `sweep` of every algorithm a selected test of this module uses,
  in test order, so that the workers compile ahead of the tests; at the end drops what
  has not started and waits for the rest (they run under `fast_compiles`)."""
  for item in request.session.items:
    name = getattr(item, "callspec", None) and item.callspec.params.get("name")
    if item.module.__name__ == __name__ and name:
      cells.queue(name)
      if item.originalname in ("test_sweep_rows_equal_separate_runs",
                               "test_chunks_of_one_equal_all_at_once"):
        sweep.queue(name)
  yield
  for future in _FUTURES.values():
    future.cancel()
  concurrent.futures.wait(list(_FUTURES.values()))


# --- One compiled program per algorithm with all of its cells -------------------------


def spy(reducer):
  """`reducer` that also reports what it got and what it returned (`spy_in`, the stacked
  uploads; `spy_out`)."""

  def aggregate(state, deltas, weights, ids, key):
    out, state, metrics = reducer.aggregate(state, deltas, weights, ids, key)
    return out, state, {**metrics, "spy_in": deltas, "spy_out": out}

  return reducer._replace(aggregate=aggregate)


def record_clean():
  """A per-client stage that passes the uploads on and reports them (`clean_in`)."""

  def apply(state, deltas, weights, ids, key):
    return deltas, weights, state, {"clean_in": deltas}

  return aggregators.ClientTransform(aggregators.no_state, apply)


def in_turn(choices):
  """One aggregator that is each of `choices` in turn, by `state[0]`: all of them
  aggregate the same uploads with the same key and the round keeps the chosen one's
  result and state, so a run with index i is a run with choices[i]. So the aggregator
  cells of an algorithm share one compiled round, run once per aggregator (`lax.map`
  over the index); their build-time checks ran on the real ones in `features.matrix`.
  Reports the uploads and weights (`spy_in`, `spy_weights`), the result (`spy_out`)
  and choice i's metrics as `<i>/<name>`."""

  def init(params, num_clients):
    return jnp.int32(0), tuple(c.init(params, num_clients) for c in choices)

  def aggregate(state, deltas, weights, ids, key):
    index, states = state
    results = [c.aggregate(s, deltas, weights, ids, key) for c, s in zip(choices, states)]
    pick = lambda *xs: functools.reduce(
        lambda acc, i: jnp.where(index == i, xs[i], acc), range(1, len(xs)), xs[0])
    out = jax.tree_util.tree_map(pick, *[r[0] for r in results])
    new_states = tuple(
        jax.tree_util.tree_map(lambda new, old, i=i: jnp.where(index == i, new, old), r[1], s)
        for i, (r, s) in enumerate(zip(results, states)))
    metrics = {f"{i}/{k}": v for i, r in enumerate(results) for k, v in r[2].items()}
    return out, (index, new_states), {**metrics, "spy_in": deltas, "spy_weights": weights,
                                      "spy_out": out}

  def validate(clients_per_round, num_clients=None):
    for c in choices:
      aggregators.check(c, clients_per_round, num_clients)

  return aggregators.Aggregator(init, aggregate, validate,
                                weighted=all(c.weighted for c in choices))


def malicious():
  return attacks.choose_malicious(N, count=features.MALICIOUS)


AGGREGATORS = {
    "DP mean": lambda: privacy.dp_mean(features.DP_CLIP, features.DP_NOISE),
    "median": robust.coordinate_median,
    "secure mean": secure_aggregation.secure_mean,
    # The attack and the quantization in one chain; the uploads are recorded before the
    # attack (record_clean) and after the quantization (spy).
    CHAIN: lambda: aggregators.chain(record_clean(), attacks.sign_flip(malicious()),
                                     compression.quantize(4), spy(aggregators.mean())),
}


def aggregators_of(name):
  """The aggregator cells this algorithm takes, in AGGREGATORS order."""
  names = [a for a in IGNORE_WEIGHTS if supported(name, a)]
  assert supported(name, "4-bit quantization") and supported(name, "sign-flip attack")
  return names + [CHAIN]


# Simulated time per step of a budget, in steps, and epochs of steps trained besides
# it: Ditto trains its global and its personal model the budgeted steps; FedRep trains
# its head (by default the body's schedule) before the budgeted body steps, MimeLite
# computes a full-batch gradient (an epoch of steps).
TRAININGS_PER_STEP = {"ditto": 2}
UNBUDGETED_EPOCHS = {"fedrep": SETUP.epochs, "mimelite": 1}


def deadline(name):
  """features.DEADLINE_S (slow clients 1 s a step, so one step fits), stretched where a
  step costs more (Ditto: still one step) or steps come besides the budget (FedRep,
  MimeLite: the slow clients' take 2-3 s, then a 3-step client fits one step)."""
  if name in UNBUDGETED_EPOCHS:
    return features.DEADLINE_S + 3.0 * UNBUDGETED_EPOCHS[name]
  return features.DEADLINE_S * TRAININGS_PER_STEP.get(name, 1)


def systems_config(name):
  """Deadline with partial work, over-selection and dropout in one configuration."""
  return systems_lib.SystemsConfig(features.profiles(N), deadline_s=deadline(name),
                                   stragglers="partial", over_selection=OVER_SELECTION,
                                   dropout=DROPOUT)


def cell_options(name):
  """The cells this algorithm runs, as factory options (all must be supported)."""
  for f in ("deadline, partial work", "over-selection", "dropout", "mixed precision"):
    assert supported(name, f), (f, MATRIX[name][f])
  return {
      "ref": dict(client_chunk_size=None),
      "aggregators": dict(aggregator=in_turn([AGGREGATORS[a]() for a in aggregators_of(name)])),
      "systems": dict(systems=systems_config(name)),
      "mixed": dict(client_chunk_size=None),
  }


def build_cell(name, cell, options):
  spec = features.ALGORITHMS[name]
  model = models.mixed_precision(MODEL) if cell == "mixed" else MODEL
  return spec.build(model.apply, spec.defaults(), **{**SETUP.common(), **options})


@computed_once
def cells(name):
  """Runs every cell of algorithm `name` for ROUNDS rounds, in one compiled program.

  Returns host arrays: per cell `metrics` (stacked over rounds), `before` (the
  client states before each round), `final` (the state after the last round), for
  `aggregators` with a leading axis over `aggregators_of(name)`; `runs`: (params,
  client states, train losses, uplink bytes) of separate runs of every configuration
  of the algorithm's sweep grid (`lax.map`: one after another, not vmapped), the
  defaults first; `dp_draws`: the DP mean of the DP run's last uploads under
  NOISE_DRAWS keys.
  """
  spec = features.ALGORITHMS[name]
  algs = {cell: build_cell(name, cell, o) for cell, o in cell_options(name).items()}
  key = jax.random.key(0)
  # The host-side checks of each feature ran in features.matrix; the systems
  # configuration here combines three of them.
  algs["systems"].validate(algs["systems"].init(MODEL.params, key, N), DATA)
  grid = spec.grid()
  configs = {k: jnp.asarray([c[k] for c in grid], jnp.float32) for k in spec.hparams}
  dp_clip, dp_noise = jnp.float32(features.DP_CLIP), jnp.float32(features.DP_NOISE)
  choices = aggregators_of(name)

  def two_rounds(alg, state, data, before_round=lambda s, r: s):
    def body(s, r):
      s = before_round(s, r)
      new, metrics = alg.round(s, data)
      return new, (metrics, s.client_states)
    final, (metrics, before) = jax.lax.scan(body, state, jnp.arange(ROUNDS))
    return {"final": final, "metrics": metrics, "before": before}

  def program(data, configs):
    out = {}
    ref = algs["ref"]
    start = ref.init(MODEL.params, key, N)

    def separate_run(hp):
      run = two_rounds(ref, engine.set_hparams(start, **hp), data)
      return (run["final"].params, run["final"].client_states, run["metrics"]["train_loss"],
              run["metrics"]["uplink_bytes"])

    out["runs"] = jax.lax.map(separate_run, configs)
    for cell in ("systems", "mixed"):
      out[cell] = two_rounds(algs[cell], algs[cell].init(MODEL.params, key, N), data)
    alg = algs["aggregators"]

    def no_noise_first(s, r):  # DP: round 0 without noise (the clipped mean), then noise
      index, states = s.aggregator_state
      if "DP mean" in choices:
        i = choices.index("DP mean")
        noise = jnp.where(r == 0, 0.0, dp_noise)
        states = states[:i] + (states[i]._replace(noise_multiplier=noise),) + states[i + 1:]
      return s._replace(aggregator_state=(index, states))

    def run_aggregator(index):
      start = alg.init(MODEL.params, key, N)
      start = start._replace(aggregator_state=(index, start.aggregator_state[1]))
      return two_rounds(alg, start, data, no_noise_first)

    out["aggregators"] = jax.lax.map(run_aggregator, jnp.arange(len(choices), dtype=jnp.int32))
    if "DP mean" in choices:  # the DP mean alone, on the last round's uploads, many keys
      m = row(out["aggregators"]["metrics"], choices.index("DP mean"))
      uploads = jax.tree_util.tree_map(lambda a: a[-1], m["spy_in"])
      dp = privacy.dp_mean(features.DP_CLIP, features.DP_NOISE)
      draw = lambda k: dp.aggregate(privacy.DPState(dp_clip, dp_noise), uploads,
                                    m["spy_weights"][-1], m["client_ids"][-1], k)[0]
      out["dp_draws"] = jax.vmap(draw)(jax.random.split(jax.random.key(1), NOISE_DRAWS))
    return out

  return jax.device_get(jax.jit(program, compiler_options=OPTIONS)(DATA, configs))


def aggregator_run(name, aggregator):
  """(final state, metrics) of the run of `name` with `aggregator` (a key of
  AGGREGATORS), its own metrics by their names; a skip with the refusal if refused."""
  if aggregator in IGNORE_WEIGHTS and not supported(name, aggregator):
    pytest.skip(MATRIX[name][aggregator])
  i = aggregators_of(name).index(aggregator)
  run = row(cells(name)["aggregators"], i)
  metrics = {k: v for k, v in run["metrics"].items() if not re.match(r"\d+/", k)}
  # Its own metrics replace the round's of the same name (as a lone aggregator's do).
  metrics.update({k.split("/", 1)[1]: v for k, v in run["metrics"].items()
                  if k.startswith(f"{i}/")})
  return run["final"], metrics


@computed_once
def sweep(name):
  """`fs.sweep` over every hyperparameter of the algorithm, with clients trained one at
  a time (chunks of 1); rows in the order of `AlgorithmSpec.grid`."""
  spec = features.ALGORITHMS[name]
  make = lambda hp: spec.build(MODEL.apply, hp, client_chunk_size=1, **SETUP.common())
  return fs.sweep(make, MODEL.params, DATA, grid={k: list(v) for k, v in spec.hparams.items()},
                  seeds=[0], rounds=ROUNDS, num_clients=N)


def flat_clients(tree):
  """[C, d]: each client's whole upload (or state row) as one vector."""
  leaves = jax.tree_util.tree_leaves(tree)
  return np.concatenate([np.asarray(a, np.float64).reshape(a.shape[0], -1) for a in leaves],
                        axis=1)


def flat(tree):
  return np.concatenate([np.asarray(a, np.float64).ravel()
                         for a in jax.tree_util.tree_leaves(tree)])


def clipped_mean(uploads, clip):
  """The unweighted mean of the uploads, each clipped to L2 norm `clip` as one vector."""
  u = flat_clients(uploads)
  norms = np.linalg.norm(u, axis=1)
  clipped = u * np.minimum(1.0, clip / np.maximum(norms, 1e-30))[:, None]
  return clipped.mean(axis=0), norms, clipped


def assert_close(actual, expected, rtol=1e-5, atol=1e-6, what=""):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=what)


def default_run(name):
  """(params, client states, train losses) of the separate run with the defaults."""
  params, client_states, losses, _ = cells(name)["runs"]
  return row(params, 0), (None if client_states is None else row(client_states, 0)), losses[0]


# --- The matrix itself ----------------------------------------------------------------


def test_registry_names_every_synchronous_algorithm_and_its_hyperparameters():
  registered = set(fs.algorithms.registry.ALGORITHMS)
  assert registered <= set(ALGORITHMS), registered - set(ALGORITHMS)
  for name, spec in features.ALGORITHMS.items():
    alg = features.build(name, setup=SETUP)
    assert set(alg.hparams) == set(spec.hparams), name  # the sweep covers all of them


def test_refusals_are_exactly_the_documented_ones():
  for name in ALGORITHMS:
    for feature in FEATURES:
      reason = MATRIX[name][feature]
      if name in WEIGHTED_RATIO and feature in IGNORE_WEIGHTS:
        assert reason is not None and RATIO_REASON in reason, (name, feature, reason)
        assert "weighting='uniform'" in reason  # it says what to do instead
        # ... and that works.
        alg = features.build(name, features.feature(feature), SETUP, weighting="uniform")
        assert alg.hparams
      else:
        assert reason is None, (name, feature, reason)


def test_readme_table_is_generated():
  text = open(README, encoding="utf-8").read()
  found = re.search(r"<!-- feature-matrix:start -->\n(.*?)<!-- feature-matrix:end -->", text,
                    re.S)
  assert found, "README.md lacks the <!-- feature-matrix:start/end --> block"
  assert found.group(1) == features.markdown_table(SETUP), (
      "README.md's feature matrix is out of date: replace the lines between "
      "<!-- feature-matrix:start --> and <!-- feature-matrix:end --> with the output of "
      "`python -m fedjax_sim.algorithms.features`")


# --- Per-cell expectations ------------------------------------------------------------


@pytest.mark.parametrize("name", ALGORITHMS)
def test_sweep_rows_equal_separate_runs(name):
  """fs.sweep (hyperparameters traced, vmapped, clients one at a time) equals separate
  runs of each configuration (`set_hparams` on the state, all clients at once)."""
  assert supported(name, "sweep")
  spec = features.ALGORITHMS[name]
  result, (params, client_states, losses, _) = sweep(name), cells(name)["runs"]
  grid = spec.grid()
  assert [{k: r[k] for k in spec.hparams} for r in result.rows] == grid
  for i, config in enumerate(grid):
    assert max_relative_error(result.params[i], row(params, i)) < 1e-5, config
    assert_close(result.curves["train_loss"][i], losses[i], what=str(config))
    if i:  # every hyperparameter is read: each configuration ends elsewhere
      end = lambda j: flat((row(params, j), None if client_states is None
                            else row(client_states, j)))
      assert np.abs(end(i) - end(0)).max() > 1e-5, config


@pytest.mark.parametrize("name", ALGORITHMS)
def test_chunks_of_one_equal_all_at_once(name):
  assert supported(name, "chunks of 1")
  params, _, losses = default_run(name)
  result = sweep(name)  # its rows train one client at a time
  assert max_relative_error(result.params[0], params) < 1e-5
  assert_close(result.curves["train_loss"][0], losses)
  assert np.abs(flat(params) - flat(MODEL.params)).max() > 1e-3  # it trained


@pytest.mark.parametrize("name", ALGORITHMS)
def test_dp_mean(name):
  """Round 0 without noise: the aggregate is the unweighted mean of the whole uploads,
  each clipped to norm C as one vector. Round 1 with noise z: the DP mean's noise has
  std z C / m (over many keys on the same uploads). The accountant prices it."""
  final, m = aggregator_run(name, "DP mean")
  clip, z = features.DP_CLIP, features.DP_NOISE
  expected, norms, clipped = clipped_mean(row(m["spy_in"], 0), clip)
  # The aggregator got each client's whole upload (all that uplink_bytes counts).
  assert clipped.shape[1] * 4 * M == float(cells(name)["runs"][3][0][0])
  assert (norms > clip * 1.01).any(), "no upload was clipped: the check would not bite"
  assert np.all(np.linalg.norm(clipped, axis=1) <= clip * (1 + 1e-6))
  assert_close(flat(row(m["spy_out"], 0)), expected, rtol=1e-5, atol=1e-8)
  assert float(m["clipped_fraction"][0]) == pytest.approx(np.mean(norms > clip))
  # Round 1: noise of std z C / m on every coordinate of the mean.
  assert float(m["noise_stddev"][1]) == pytest.approx(z * clip / M)
  expected, _, _ = clipped_mean(row(m["spy_in"], 1), clip)
  assert np.abs(flat(row(m["spy_out"], 1)) - expected).max() > 0.1 * z * clip / M
  noise = flat_clients(cells(name)["dp_draws"]) - expected
  assert noise.std() == pytest.approx(z * clip / M, rel=0.05)
  assert abs(noise.mean()) < 4 * z * clip / M / math.sqrt(noise.size)
  assert np.all(np.isfinite(flat(final.params)))
  accountant = privacy.DPAccountant(z, M, N, delta=1e-3)
  assert 0 < accountant.epsilon(1) < accountant.epsilon(ROUNDS) < math.inf


@pytest.mark.parametrize("name", ALGORITHMS)
def test_coordinate_median(name):
  final, m = aggregator_run(name, "median")
  for r in range(ROUNDS):
    expected = jax.tree_util.tree_map(lambda a: np.median(a, axis=0), row(m["spy_in"], r))
    assert_close(flat(row(m["spy_out"], r)), flat(expected), atol=1e-7)
  assert np.all(np.isfinite(flat(final.params)))


@pytest.mark.parametrize("name", ALGORITHMS)
def test_secure_mean(name):
  """Every client survives: the result is the unweighted mean of the updates clipped to
  [-1, 1], up to the 16-bit quantization, and of the scalars beside them (FedNova's
  gradient weight...) exactly: clipped with the update, they became 1."""
  final, m = aggregator_run(name, "secure mean")
  for r in range(ROUNDS):
    spy_in = row(m["spy_in"], r)
    scalars = np.array([a.ndim == 1 for a in jax.tree_util.tree_leaves(spy_in)
                        for _ in range(int(np.prod(a.shape[1:])))])  # per column
    sent = flat_clients(spy_in)
    u = np.where(scalars[None, :], sent, np.clip(sent, -1.0, 1.0))
    step = 2.0 / (2 ** 16 - 1)
    out = flat(row(m["spy_out"], r))
    assert_close(out, u.mean(axis=0), rtol=0, atol=step * 1.01)
    assert_close(out[scalars], sent[:, scalars].mean(axis=0), rtol=1e-6, atol=0)
    assert int(m["secagg_survivors"][r]) == M and not bool(m["secagg_aborted"][r])
  assert np.all(np.isfinite(flat(final.params)))


@pytest.mark.parametrize("name", ALGORITHMS)
def test_quantization_and_attack(name):
  """One chain: sign flip on the malicious clients, then 4-bit quantization. What the
  mean receives must be the clean updates, negated for malicious clients, within each
  client's 4-bit step of its update's range, and the scalars an algorithm sends beside
  its update (FedNova's gradient weight...) exactly as computed, neither flipped nor
  quantized; the uplink costs 4 bits a
  coordinate (plus two float32 bounds) and 32 a scalar, instead of 32 each; the attack
  changes the model."""
  final, m = aggregator_run(name, CHAIN)
  sampled_bad = 0
  for r in range(ROUNDS):
    bad = malicious()[np.asarray(m["client_ids"][r])]
    sampled_bad += bad.sum()
    assert int(m["malicious_sampled"][r]) == bad.sum()
    clean_in, spy_in = row(m["clean_in"], r), row(m["spy_in"], r)
    scalars = np.array([a.ndim == 1 for a in jax.tree_util.tree_leaves(clean_in)
                        for _ in range(int(np.prod(a.shape[1:])))])  # per column
    clean, received = flat_clients(clean_in), flat_clients(spy_in)
    sent = np.where(bad[:, None] & ~scalars[None, :], -clean, clean)
    update, s = sent[:, ~scalars], scalars.sum()
    step = (update.max(axis=1) - update.min(axis=1)) / 15
    assert np.all(np.abs(received[:, ~scalars] - update) <= step[:, None] * 1.001 + 1e-7), r
    np.testing.assert_array_equal(received[:, scalars], sent[:, scalars])
    assert np.abs(received - sent).max() > 0  # it quantized
    d = update.shape[1]
    assert float(m["uplink_bytes"][r]) == M * (4 * d + 64 + 32 * s) / 8 < M * 4 * (d + s)
    assert float(m["compression_error"][r]) > 0
  assert sampled_bad, "no malicious client was sampled: the attack check would not bite"
  params, _, _ = default_run(name)
  assert np.abs(flat(final.params) - flat(params)).max() > 1e-3
  assert np.all(np.isfinite(flat(final.params)))


def expected_steps(ids, name):
  """(full, within the deadline) local steps of the sampled clients: systems.plan_round's
  rule, with networks fast enough to ignore."""
  counts = np.asarray(DATA.counts)[ids]
  full = SETUP.epochs * -(-counts // B)
  step = B / np.asarray(features.profiles(N).examples_per_s)[ids]
  head = UNBUDGETED_EPOCHS.get(name, 0) * -(-counts // B) * step
  fits = np.floor((deadline(name) - head) / (TRAININGS_PER_STEP.get(name, 1) * step))
  return full, np.clip(fits, 0, full).astype(int)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_systems(name):
  """Deadline with partial work, over-selection and dropout in one run: the aggregated
  clients did the steps that fit the deadline, the server kept the first reports,
  dropped and unkept clients keep their per-client state, the clock advances."""
  run = cells(name)
  m, final, before = run["systems"]["metrics"], run["systems"]["final"], run["systems"]["before"]
  per_client_bytes = float(run["runs"][3][0][0]) / M
  partial = dropped = passed_over = 0
  for r in range(ROUNDS):
    ids, kept = np.asarray(m["client_ids"][r]), np.asarray(m["client_aggregated"][r])
    steps, seconds = np.asarray(m["client_steps"][r]), np.asarray(m["client_seconds"][r])
    assert ids.shape == (M + OVER_SELECTION,)
    full, fits = expected_steps(ids, name)
    np.testing.assert_array_equal(steps, np.where(kept, fits, 0))
    # The budgets reach local training: a client not kept trains no step (no loss: NaN).
    losses = np.asarray(m["client_train_loss"][r])
    assert np.all(np.isnan(losses[~kept])) and np.all(losses[kept] > 0)
    if "client_num_steps" in m:  # FedNova reports the steps each client took
      np.testing.assert_array_equal(m["client_num_steps"][r], steps)
    partial += int(np.sum(kept & (fits < full)))
    num_dropped = int(m["num_dropped"][r])
    dropped += num_dropped
    # Every responder can contribute (a step fits): the first M reports are kept.
    assert kept.sum() == int(m["num_aggregated"][r]) == min(M, ids.size - num_dropped)
    if kept.any():  # a faster client that was not kept must have dropped out
      assert np.sum(~kept & (seconds < seconds[kept].max())) <= num_dropped
    passed_over += int(ids.size - num_dropped - kept.sum())
    assert float(m["round_time_s"][r]) <= deadline(name) + 1e-6
    assert float(m["uplink_bytes"][r]) == pytest.approx(kept.sum() * per_client_bytes)
    if before is not None:  # per-client state: only the aggregated clients' rows change
      after = final.client_states if r == ROUNDS - 1 else row(before, r + 1)
      unchanged = np.all(flat_clients(row(before, r)) == flat_clients(after), axis=1)
      assert np.all(unchanged[np.setdiff1d(np.arange(N), ids[kept])]), (
          f"round {r}: a client that was not aggregated had its state changed")
      assert not np.any(unchanged[ids[kept]]), f"round {r}: an aggregated client kept its state"
  assert partial and dropped and passed_over, (
      "the scenario must have partial work, a dropout and a responder passed over",
      partial, dropped, passed_over)
  assert float(final.sim_time) == pytest.approx(float(np.sum(m["round_time_s"])))
  assert float(final.sim_time) > 0
  assert np.all(np.isfinite(flat(final.params)))


@pytest.mark.parametrize("name", ALGORITHMS)
def test_mixed_precision(name):
  run = cells(name)["mixed"]
  params, _, losses = default_run(name)
  mixed = run["final"].params
  assert all(a.dtype == np.float32 for a in jax.tree_util.tree_leaves(mixed))
  assert np.all(np.isfinite(flat(mixed)))
  error = np.linalg.norm(flat(mixed) - flat(params)) / np.linalg.norm(flat(params))
  # bfloat16 compute: close to float32, but not float32 (which agrees to ~1e-7 here).
  assert 2e-5 < error < 0.02, error
  assert_close(run["metrics"]["train_loss"], losses, rtol=0.02, atol=0.02)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_sharded_clients_equal_one_device(name, sharded_process):
  """8 simulated CPU devices split the round's 8 clients; the result equals one
  device's (the `ref` run with the default hyperparameters)."""
  assert supported(name, "sharded clients")
  out = sharded_results(sharded_process)
  assert out["devices"] == 8 and out["all_reduce"]
  cell = out["algorithms"][name]
  assert cell["split"], "the per-client results were not split over the devices"
  params, client_states, losses = default_run(name)
  assert max_relative_error(jax.tree_util.tree_unflatten(
      jax.tree_util.tree_structure(params), [np.asarray(a) for a in cell["params"]]),
      params) < 1e-5
  assert_close(cell["train_loss"], losses)
  if client_states is not None:
    assert_close(flat_clients(client_states).ravel(), np.asarray(cell["client_states"]),
                 rtol=1e-5, atol=1e-6)
