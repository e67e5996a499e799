"""FedProx: FedAvg with a proximal term in every client's local objective.

Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith 2020, "Federated Optimization in
Heterogeneous Networks" (MLSys), Algorithm 2. In round t each sampled client k
starts from the server model w^t and runs local SGD on

    h_k(w; w^t) = F_k(w) + mu/2 ||w - w^t||^2,

and the server averages the resulting models (example-weighted by default; the
paper samples clients in proportion to their size and averages uniformly, which
has the same expectation). mu = 0 is FedAvg exactly. The paper's variable local
work (gamma-inexact solutions of stragglers) is the engine's `step_budget`, drawn
by `fedavg(..., systems=SystemsConfig(stragglers="partial", straggler_fraction=s))`
as in its Sec. 5.2 (or cut by a deadline); `benchmarks/stragglers.py` reruns that
experiment.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from fedjax_sim import local
from fedjax_sim.algorithms import engine
from fedjax_sim.algorithms.base import FederatedAlgorithm
from fedjax_sim.algorithms.fedavg import local_sgd_work
from fedjax_sim.losses import cross_entropy

Params = Any


def proximal_term(mu) -> Callable[[Params, Params], jax.Array]:
  """`regularizer(params, anchor) = mu/2 ||params - anchor||^2` (mu may be traced)."""

  def regularizer(params, anchor):
    return 0.5 * mu * optax.tree.norm(optax.tree.sub(params, anchor), squared=True)

  return regularizer


def fedprox(apply: Callable[[Params, jax.Array], jax.Array], *, mu: float,
            client_optimizer: engine.OptimizerSpec,
            server_optimizer: engine.OptimizerSpec | None = None,
            loss: local.PerExampleLoss | None = None, **options) -> FederatedAlgorithm:
  """FedProx: `fedavg` whose local objective adds mu/2 ||w - w_global||^2.

  Args:
    apply: the model's pure `apply(params, x) -> logits`.
    mu: the proximal coefficient (>= 0; 0 is FedAvg), the hyperparameter `mu`.
    client_optimizer, server_optimizer, loss: as in `fedavg`.
    **options: every option of `fedavg` (clients_per_round, batch_size,
      epochs/steps, weighting, client_chunk_size, aggregator, systems...).

  Returns:
    FederatedAlgorithm(init, round, validate), with fedavg's state and metrics.
  """
  work = local_sgd_work(loss or cross_entropy(apply), client_optimizer,
                        engine.schedule_of(options), lambda hp: proximal_term(hp["mu"]))
  return engine.compose("fedprox", apply, client_work=work,
                        server_rule=engine.fedopt(server_optimizer), hparams={"mu": mu},
                        hparam_checks={"mu": engine.NONNEGATIVE}, **options)
