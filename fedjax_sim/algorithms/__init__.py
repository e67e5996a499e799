"""Federated algorithms: each a factory returning FederatedAlgorithm(init, round, validate)."""

from fedjax_sim.algorithms.base import (FederatedAlgorithm, ServerState, client_state_bytes,
                                        sample_clients)
from fedjax_sim.algorithms import engine
from fedjax_sim.algorithms.ditto import ditto
from fedjax_sim.algorithms.engine import (ClientInput, ClientOutput, ClientWork, RoundInfo,
                                          ServerRule, ServerUpdate, compose, fedopt,
                                          get_hparams, set_hparams)
from fedjax_sim.algorithms.fedavg import fedavg
from fedjax_sim.algorithms.fedbuff import fedbuff
from fedjax_sim.algorithms.fedexp import fedexp
from fedjax_sim.algorithms.feddyn import feddyn
from fedjax_sim.algorithms.fednova import fednova
from fedjax_sim.algorithms.fedprox import fedprox
from fedjax_sim.algorithms.fedrep import fedrep
from fedjax_sim.algorithms.mimelite import mimelite
from fedjax_sim.algorithms.qffl import qffl
from fedjax_sim.algorithms.registry import ALGORITHMS, ASYNC, build_algorithm
from fedjax_sim.algorithms.scaffold import scaffold
