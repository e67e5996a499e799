"""The round engine's parts: hyperparameters in the state (set between rounds, scheduled,
checked on the host), the key table, an algorithm written from parts, FedBuff's
aggregator."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import aggregators, keys, systems
from conftest import max_relative_error, ragged_clients


@pytest.fixture(scope="module")
def setup():
  xs, ys = ragged_clients(sizes=(8, 1, 8, 4, 12, 4))
  model = fs.logistic_regression(num_features=5, num_classes=3)
  return model, fs.from_clients(xs, ys, num_classes=3)


SCHEDULE = dict(clients_per_round=4, batch_size=4, steps=2, client_chunk_size=None)


def test_set_hparams_changes_the_next_round_without_recompiling(setup, count_compiles):
  model, data = setup
  prox = fs.fedprox(model.apply, mu=0.5, client_optimizer=optax.sgd(0.3), **SCHEDULE)
  plain = fs.fedavg(model.apply, client_optimizer=optax.sgd(0.3), **SCHEDULE)
  key = jax.random.key(1)
  state = prox.init(model.params, key)
  assert prox.hparams == ("mu",) and fs.get_hparams(state) == {"mu": 0.5}
  step = jax.jit(prox.round)
  with_mu, _ = step(state, data)
  zero_mu = fs.set_hparams(state, mu=0.0)
  compiled = count_compiles()
  without_mu, _ = step(zero_mu, data)  # FedProx at mu=0 is FedAvg
  assert count_compiles() == compiled  # the new mu did not recompile
  fedavg_state, _ = jax.jit(plain.round)(plain.init(model.params, key), data)
  assert max_relative_error(without_mu.params, fedavg_state.params) < 1e-6
  assert max_relative_error(with_mu.params, fedavg_state.params) > 1e-4
  with pytest.raises(ValueError, match="unknown hyperparameters"):
    fs.set_hparams(state, lam=1.0)


def test_hparam_schedule_equals_setting_each_round_by_hand(setup):
  model, data = setup
  lr = lambda hp: optax.sgd(hp["client_lr"])
  decay = lambda t, hp: {**hp, "client_lr": 0.4 * 0.5**t}
  scheduled = fs.fedavg(model.apply, client_optimizer=lr, extra_hparams={"client_lr": 0.4},
                        hparam_schedule=decay, **SCHEDULE)
  by_hand = fs.fedavg(model.apply, client_optimizer=lr, extra_hparams={"client_lr": 0.4},
                      **SCHEDULE)
  a = scheduled.init(model.params, jax.random.key(2))
  b = by_hand.init(model.params, jax.random.key(2))
  for t in range(3):
    a, _ = jax.jit(scheduled.round)(a, data)
    b, _ = jax.jit(by_hand.round)(fs.set_hparams(b, client_lr=0.4 * 0.5**t), data)
  assert max_relative_error(a.params, b.params) < 1e-6
  assert fs.get_hparams(a) == {"client_lr": pytest.approx(0.4)}  # the schedule is not stored
  # A misspelt name was ignored (the stored lr used), a missing one a KeyError in training.
  for bad, match in ((lambda t, hp: {**hp, "clientlr": 0.0}, r"unknown \['clientlr'\], missing \[\]"),
                     (lambda t, hp: {}, r"unknown \[\], missing \['client_lr'\]")):
    wrong = fs.fedavg(model.apply, client_optimizer=lr, extra_hparams={"client_lr": 0.4},
                      hparam_schedule=bad, **SCHEDULE)
    with pytest.raises(ValueError, match=match):
      jax.jit(wrong.round)(wrong.init(model.params, jax.random.key(2)), data)


def test_hyperparameters_are_checked_on_the_host(setup):
  model, data = setup
  with pytest.raises(ValueError, match="mu must be >= 0"):
    fs.fedprox(model.apply, mu=-0.1, client_optimizer=optax.sgd(0.1), **SCHEDULE)
  with pytest.raises(ValueError, match="alpha must be positive"):
    fs.feddyn(model.apply, alpha=0.0, client_optimizer=optax.sgd(0.1), **SCHEDULE)
  with pytest.raises(ValueError, match="momentum must lie in"):
    fs.mimelite(model.apply, client_learning_rate=0.1, momentum=1.0, **SCHEDULE)
  fs.fedprox(model.apply, mu=0.0, client_optimizer=optax.sgd(0.1), **SCHEDULE)  # the edge is fine
  # A value set after building is caught by validate, before anything compiles.
  prox = fs.fedprox(model.apply, mu=0.1, client_optimizer=optax.sgd(0.1), **SCHEDULE)
  with pytest.raises(ValueError, match="mu must be >= 0"):
    prox.validate(fs.set_hparams(prox.init(model.params, jax.random.key(0)), mu=-1.0), data)
  with pytest.raises(ValueError, match="extra_hparams"):
    fs.fedprox(model.apply, mu=0.1, client_optimizer=optax.sgd(0.1), extra_hparams={"mu": 1.0},
               **SCHEDULE)


def test_no_two_consumers_share_a_key():
  next_key, sample_key, train_key = keys.round_keys(jax.random.key(0))
  ids = range(4)
  derived = {"next": next_key, "sample": sample_key, "train": train_key,
             "aggregation": keys.aggregation_key(sample_key), "systems": keys.systems_key(sample_key),
             "second": keys.second_train_key(sample_key)}
  for i in ids:
    derived[f"client{i}"] = keys.client_key(train_key, i)
    derived[f"data{i}"] = keys.client_data_key(train_key, i)
    derived[f"second{i}"] = keys.client_key(keys.second_train_key(sample_key), i)
    for epoch in range(3):  # local training folds epoch numbers into the client's key
      derived[f"client{i}epoch{epoch}"] = jax.random.fold_in(keys.client_key(train_key, i), epoch)
  data = {name: tuple(np.asarray(jax.random.key_data(k)).ravel()) for name, k in derived.items()}
  for (a, ka), (b, kb) in itertools.combinations(data.items(), 2):
    assert ka != kb, f"{a} and {b} share a key"


def folded_tags(jaxpr) -> list[int]:
  """The constants folded into keys anywhere in `jaxpr` (sub-jaxprs included)."""
  tags = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "random_fold_in" and hasattr(eqn.invars[1], "val"):
      tags.append(int(eqn.invars[1].val))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          tags += folded_tags(sub)
  return tags


def test_a_clients_second_key_is_derived_only_where_used(setup):
  """Ditto's and FedRep's second key is the table's; a round that never asks for it
  (FedAvg) traces, lowers and compiles no derivation of it."""
  sample_key = jax.random.key(3)
  inp = fs.ClientInput(params=None, message=None, row=None, x=None, y=None, n=None,
                       client_id=jnp.int32(5), key=None, sample_key=sample_key, budget=None,
                       relative_weight=None, hp={})
  np.testing.assert_array_equal(
      jax.random.key_data(inp.second_key),
      jax.random.key_data(keys.client_key(keys.second_train_key(sample_key), 5)))
  model, data = setup
  state_and_data = lambda a: (a.init(model.params, jax.random.key(0), data.num_clients), data)
  fedavg = fs.fedavg(model.apply, client_optimizer=optax.sgd(0.1), **SCHEDULE)
  ditto = fs.ditto(model.apply, client_optimizer=optax.sgd(0.1), lam=0.1, **SCHEDULE)
  assert keys.SECOND_TRAINING_TAG not in folded_tags(
      jax.make_jaxpr(fedavg.round)(*state_and_data(fedavg)).jaxpr)
  assert keys.SECOND_TRAINING_TAG in folded_tags(
      jax.make_jaxpr(ditto.round)(*state_and_data(ditto)).jaxpr)


def test_an_algorithm_from_parts(setup):
  """FedAvg written from engine parts in a few lines equals fs.fedavg."""
  model, data = setup
  loss = fs.cross_entropy(model.apply)

  def train(inp):
    result = fs.engine.local_train(inp, loss, optax.sgd(0.3), fs.engine.Schedule(4, steps=2))
    return fs.ClientOutput(result.delta, None, result.loss_sum, result.num_trained,
                           result.num_steps)

  mine = fs.compose("mine", model.apply, client_work=fs.ClientWork(train),
                    server_rule=fs.fedopt(optax.sgd(1.0)), hparams={}, **SCHEDULE)
  theirs = fs.fedavg(model.apply, client_optimizer=optax.sgd(0.3), **SCHEDULE)
  a, ma = jax.jit(mine.round)(mine.init(model.params, jax.random.key(4)), data)
  b, mb = jax.jit(theirs.round)(theirs.init(model.params, jax.random.key(4)), data)
  assert max_relative_error(a.params, b.params) < 1e-7
  np.testing.assert_array_equal(ma["client_ids"], mb["client_ids"])


def test_fedbuff_takes_an_aggregator_and_refuses_systems(setup):
  model, data = setup
  profiles = systems.sample_profiles(data.num_clients, seed=0)
  kwargs = dict(client_optimizer=optax.sgd(0.3), profiles=profiles, concurrency=4,
                buffer_size=2, batch_size=4, steps=2)
  plain = fs.fedbuff(model.apply, **kwargs)
  meaned = fs.fedbuff(model.apply, aggregator=aggregators.mean(), **kwargs)
  a = plain.init(model.params, jax.random.key(5))
  b = meaned.init(model.params, jax.random.key(5))
  for _ in range(3):  # later rounds have stale arrivals: their weights s(tau) < 1 matter
    a, ma = jax.jit(plain.round)(a, data)
    b, _ = jax.jit(meaned.round)(b, data)
  assert float(ma["staleness_max"]) > 0
  assert max_relative_error(a.params, b.params) < 1e-6
  with pytest.raises(ValueError, match="fedbuff takes no systems"):
    fs.fedbuff(model.apply, systems_config=systems.SystemsConfig(profiles, deadline_s=1.0),
               **kwargs)
