"""q-FFL (q-FedAvg): fairness by weighting clients with their loss to the power q.

Li, Sanjabi, Beirami, Smith 2020, "Fair Resource Allocation in Federated
Learning" (ICLR), Algorithm 3 (q-FedAvg). It minimizes
f_q(w) = sum_k p_k F_k(w)^(q+1) / (q+1): q = 0 is FedAvg's objective, a larger q
puts more weight on the clients with a higher loss. In round t each sampled
client k computes its loss F_k = F_k(w^t) on its training data at the server
model, runs local SGD with learning rate eta from w^t to wbar_k, and sends

    Delta_k = F_k^q L (w^t - wbar_k),
    h_k     = q F_k^(q-1) ||L (w^t - wbar_k)||^2 + L F_k^q,

with L = 1/eta the estimate of the Lipschitz constant of the gradient (as in the
paper's experiments). The server takes

    w^(t+1) = w^t - sum_k p_k Delta_k / sum_k p_k h_k.

The paper samples clients with probability p_k and sums uniformly; here clients
are sampled uniformly and p_k are the round's weights (example counts by
default; 'uniform' is the authors' sums). F_k gets 1e-10 added before the
powers, as in the authors' code, so that q < 1 never meets 0^(q-1). With q = 0
the step is the weighted mean of the wbar_k: FedAvg.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedjax_sim import local
from fedjax_sim.algorithms import engine
from fedjax_sim.algorithms.base import FederatedAlgorithm
from fedjax_sim.algorithms.engine import ClientOutput, ClientWork, ServerRule, ServerUpdate
from fedjax_sim.losses import cross_entropy

Params = Any

LOSS_FLOOR = 1e-10


def qffl(apply: Callable[[Params, jax.Array], jax.Array], *, q: float,
         client_learning_rate: float, loss: local.PerExampleLoss | None = None,
         **options) -> FederatedAlgorithm:
  """q-FedAvg with local SGD and L = 1 / client_learning_rate.

  Args:
    apply: the model's pure `apply(params, x) -> logits`.
    q: the fairness exponent (>= 0; 0 is FedAvg; hyperparameter `q`).
    client_learning_rate: local SGD learning rate eta; L = 1/eta (`client_lr`).
    loss: per-example loss; default softmax cross-entropy.
    **options: what every algorithm shares (see `fedavg`): clients_per_round,
      batch_size, epochs / steps, weighting, client_chunk_size, aggregator,
      client_data_transform, client_sharding, systems, client_data_schedule,
      hparam_schedule, extra_hparams.

  Returns:
    FederatedAlgorithm; clients upload `{'scaled_delta', 'h'}` (Delta_k and h_k);
    metrics add `client_loss_at_server` (F_k) for the sampled clients.
  """
  loss, schedule = loss or cross_entropy(apply), engine.schedule_of(options)

  def train(inp: engine.ClientInput) -> ClientOutput:
    q, lr = inp.hp["q"], inp.hp["client_lr"]
    lipschitz = 1.0 / lr
    f_k = engine.full_batch_loss(loss, inp.params, inp)
    f = f_k + LOSS_FLOOR
    result = engine.local_train(inp, loss, optax.sgd(lr), schedule)
    scaled = optax.tree.scale(-lipschitz, result.delta)  # L (w^t - wbar_k)
    h = lipschitz * f**q + q * f ** (q - 1) * optax.tree.norm(scaled, squared=True)
    return ClientOutput({"scaled_delta": optax.tree.scale(f**q, scaled), "h": h}, None,
                        result.loss_sum, result.num_trained, result.num_steps,
                        # NaN for a client with no examples, as its train loss is.
                        {"loss_at_server": jnp.where(inp.n > 0, f_k, jnp.nan)})

  def upload_like(params):
    return {"scaled_delta": optax.tree.zeros_like(params), "h": jnp.zeros((), jnp.float32)}

  def update(state, upload, info) -> ServerUpdate:
    # w <- w - sum p_k Delta_k / sum p_k h_k: a ratio of two weighted means.
    step = optax.tree.scale(-1.0 / jnp.where(info.any_aggregated, upload["h"], 1.0),
                            upload["scaled_delta"])
    return ServerUpdate(optax.tree.add(state.params, step), (), None, step)

  rule = ServerRule(lambda params, hp: ((), None), update, weighted_ratio=True)
  return engine.compose("qffl", apply, client_work=ClientWork(train, upload_like),
                        server_rule=rule, hparams={"q": q, "client_lr": client_learning_rate},
                        hparam_checks={"q": engine.NONNEGATIVE, "client_lr": engine.POSITIVE},
                        **options)
