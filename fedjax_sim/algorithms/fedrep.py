"""FedRep: a shared body trained federatedly, a personal head kept by every client.

Collins, Hassani, Mokhtari, Shakkottai 2021, "Exploiting Shared Representations for
Personalized Federated Learning" (ICML), Algorithm 1. The parameters split into a
body phi (the representation, shared) and a head h (personal). Client i keeps its own
head h_i, starting from the initial model's head. In round t each sampled client,
given the server's body phi^t,

  1. trains its head with the body frozen, from h_i:  h_i+ = GRD^tau_h(f_i(phi^t, .)),
     and keeps h_i+;
  2. trains the body with its new head frozen, from phi^t:
     phi_i = GRD^tau_phi(f_i(., h_i+)),

and sends phi_i - phi^t: the body only; the head never leaves the client. The server
takes phi^(t+1) = phi^t + sum_i p_i (phi_i - phi^t), with p_i the round's weights
(example counts by default; 'uniform' is the paper's 1/|S|), through any optax
optimizer on the pseudo-gradient (SGD lr 1, the default, is the paper's). Heads of
clients that are not sampled, or that `systems` drops, do not change. (FedPer,
Arivazhagan et al. 2019, trains head and body together in one phase instead.)

The head: `head` names it (a parameter is in the head when a key of its path, a dict
key, attribute name or index, is one of the names: 'out' for `models.mlp`, `cnn` and
`char_rnn`), or is a function `params -> pytree of Python bools` (True: head; as
optax.masked's mask; it sees the structure only). `state.params` is the whole model:
the shared body and a head the server never changes, the initial one every client's
head starts from. `state.client_states` holds every client's head (num_clients x the
head's size): the params pytree with None in place of the body. `personalized_evaluator`
evaluates every client with the body and its own head; it, `split` and `merge` are
imported from this module (`fedjax_sim.algorithms.fedrep`; the package's `fedrep` is the
factory).

Schedules: the body steps follow the common schedule (epochs / steps), the head steps
`head_epochs` / `head_steps` (default: the same); the authors' code trains the head for
about 10 epochs and the body for 1. The head steps draw their example order from the
engine's second training key (`keys.second_train_key`), the body steps from the
client's training key. A client's step budget under `systems` caps its body steps; its
head steps count in its simulated time (`systems.plan_round`'s unbudgeted steps), so a
client whose head steps alone pass a deadline cannot contribute.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedjax_sim import evaluation, local, systems
from fedjax_sim.algorithms import engine
from fedjax_sim.algorithms.base import FederatedAlgorithm, mean_loss
from fedjax_sim.algorithms.engine import ClientOutput, ClientWork, ServerRule, ServerUpdate
from fedjax_sim.data import FederatedData
from fedjax_sim.losses import cross_entropy

Params = Any
HeadSpec = str | Sequence[str] | Callable[[Params], Any]


def _key_name(key) -> str:
  for attribute in ("key", "name", "idx"):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def head_mask(head: HeadSpec, params: Params) -> Params:
  """The pytree of bools (True: head) that `head` (names, or a mask function) gives."""
  if callable(head):
    return head(params)
  names = {head} if isinstance(head, str) else set(head)
  return jax.tree_util.tree_map_with_path(
      lambda path, _: any(_key_name(k) in names for k in path), params)


def split(head: HeadSpec, params: Params) -> tuple[Params, Params]:
  """(body, head) of `params`: each the params pytree with None in the other's place."""
  mask = head_mask(head, params)
  flags = jax.tree_util.tree_leaves(mask)
  if not any(flags) or all(flags):
    raise ValueError(f"fedrep needs a head and a body: head={head!r} selects "
                     f"{sum(map(bool, flags))} of the model's {len(flags)} parameter arrays "
                     f"('out' is the output layer of models.mlp, cnn and char_rnn; a model "
                     f"of one layer, such as logistic regression, has no body: on the "
                     f"command line, --model mlp)")
  pick = lambda keep: jax.tree_util.tree_map(lambda m, p: p if bool(m) == keep else None,
                                             mask, params)
  return pick(False), pick(True)


def merge(params: Params, part: Params) -> Params:
  """`params` with the arrays of `part` (a body or a head, None elsewhere) in place."""
  return jax.tree_util.tree_map(lambda q, p: p if q is None else q, part, params,
                                is_leaf=lambda x: x is None)


def fedrep(apply: Callable[[Params, jax.Array], jax.Array], *, head: HeadSpec,
           client_optimizer: engine.OptimizerSpec,
           head_optimizer: engine.OptimizerSpec | None = None, head_epochs: int | None = None,
           head_steps: int | None = None, server_optimizer: engine.OptimizerSpec | None = None,
           loss: local.PerExampleLoss | None = None, **options) -> FederatedAlgorithm:
  """FedRep.

  Args:
    apply: the model's pure `apply(params, x) -> logits`.
    head: the personal part: parameter names (str or sequence of str) or a function
      `params -> pytree of bools` (see the module docstring).
    client_optimizer: optax optimizer of the body steps (or `hp -> optimizer`).
    head_optimizer: optax optimizer of the head steps; default `client_optimizer`.
    head_epochs / head_steps: the head's local schedule (at most one; default the
      body's, `epochs` / `steps`), with the same batch size.
    server_optimizer: as in `fedavg`, on the body.
    loss: per-example loss; default softmax cross-entropy.
    **options: what every algorithm shares (see `fedavg`): clients_per_round,
      batch_size, epochs / steps, weighting, client_chunk_size, aggregator,
      client_data_transform, client_sharding, systems, client_data_schedule,
      hparam_schedule, extra_hparams.

  Returns:
    FederatedAlgorithm whose `init(params, key, num_clients)` needs the number of
    clients; clients upload their body delta; metrics add `head_train_loss`.
  """
  loss, schedule = loss or cross_entropy(apply), engine.schedule_of(options)
  head_optimizer = head_optimizer or client_optimizer
  if head_epochs is not None or head_steps is not None:
    try:
      local.check_schedule(schedule.batch_size, head_epochs, head_steps)
    except ValueError as e:  # its message names epochs= / steps=, the body's arguments
      raise ValueError(f"fedrep's head_epochs / head_steps: {e}") from None
    head_schedule = schedule._replace(epochs=head_epochs, steps=head_steps)
  else:
    head_schedule = schedule

  def train(inp: engine.ClientInput) -> ClientOutput:
    body = split(head, inp.params)[0]
    # 1. The head, body frozen, from the client's own head, with no step budget, but
    # none at all for a client that is not aggregated (dropped, late): its head is
    # discarded, and its steps would count in head_train_loss.
    head_budget = None if inp.budget is None else jnp.where(
        inp.budget > 0, jnp.iinfo(jnp.int32).max, 0)
    head_loss = lambda h, x, y: loss(merge(inp.params, h), x, y)
    tuned = engine.local_train(inp._replace(budget=head_budget), head_loss,
                               engine.resolve(head_optimizer, inp.hp), head_schedule,
                               start=inp.row, key=inp.second_key)
    new_head = optax.tree.add(inp.row, tuned.delta)
    # 2. The body, the new head frozen, from the server's body.
    body_loss = lambda b, x, y: loss(merge(merge(inp.params, new_head), b), x, y)
    result = engine.local_train(inp, body_loss, engine.resolve(client_optimizer, inp.hp),
                                schedule, start=body)
    return ClientOutput(result.delta, new_head, result.loss_sum, result.num_trained,
                        result.num_steps, {"head_loss_sum": tuned.loss_sum,
                                           "head_num_trained": tuned.num_trained})

  fedopt = engine.fedopt(server_optimizer)

  def update(state, upload, info) -> ServerUpdate:
    # The server's head never moves: the body's mean delta, zeros for the head, and the
    # head put back after the optimizer (weight decay would shrink it).
    delta = merge(optax.tree.zeros_like(state.params), upload)
    m = info.client_metrics
    head_loss = mean_loss(m["head_loss_sum"], m["head_num_trained"])
    out = fedopt.update(state, delta, info)
    params = merge(out.params, split(head, state.params)[1])
    return out._replace(params=params, metrics={"head_train_loss": head_loss})

  # Clients receive and send the body alone: their heads are their own.
  work = ClientWork(train, upload_like=lambda params: optax.tree.zeros_like(split(head, params)[0]),
                    init_row=lambda params: split(head, params)[1],
                    download=lambda params: split(head, params)[0],
                    unbudgeted_steps=lambda counts: systems.full_steps(
                        counts, head_schedule.batch_size, head_schedule.epochs,
                        head_schedule.steps))
  return engine.compose("fedrep", apply, client_work=work,
                        server_rule=ServerRule(fedopt.init, update), hparams={}, **options)


def personalized_evaluator(apply: Callable, client_test: FederatedData
                           ) -> Callable[[Any], dict[str, float]]:
  """`evaluate(state)`: every client of `client_test` with the shared body of
  `state.params` and its own head from `state.client_states` (see
  `evaluation.make_personalized_evaluator` for the metrics)."""
  evaluate = evaluation.make_merged_personalized_evaluator(apply, client_test, merge)
  return lambda state: evaluate(state.params, state.client_states)
