"""Federated algorithms: each a factory returning FederatedAlgorithm(init, round, validate)."""

from fedjax_sim.algorithms.base import FederatedAlgorithm, ServerState, sample_clients
from fedjax_sim.algorithms.fedavg import fedavg
