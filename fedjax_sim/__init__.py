"""fedjax_sim: federated learning simulation where a whole round is one XLA program."""

from fedjax_sim import aggregators, conv, datasets, partition, systems, warm_start
# Privacy, communication and security: modules of aggregator transforms (see aggregators.chain).
from fedjax_sim import attacks, compression, memory, privacy, robust, secure_aggregation
from fedjax_sim.data import FederatedData, from_clients, split_clients
from fedjax_sim.evaluation import (make_evaluator, make_merged_personalized_evaluator,
                                  make_personalized_evaluator)
from fedjax_sim.algorithms import (FederatedAlgorithm, ServerState, fedavg, fedbuff,
                                   sample_clients)
# The round engine and its parts: write an algorithm by composing them.
from fedjax_sim.algorithms import (ClientInput, ClientOutput, ClientWork, RoundInfo, ServerRule,
                                   ServerUpdate, compose, engine, fedopt, get_hparams, set_hparams)
from fedjax_sim import keys
from fedjax_sim.algorithms import (ALGORITHMS, build_algorithm, client_state_bytes, ditto, feddyn,
                                   fednova, fedprox, mimelite, qffl, scaffold)
from fedjax_sim.algorithms import fedexp, fedrep
from fedjax_sim.local import LocalResult, epoch_order, make_local_update
from fedjax_sim.losses import IGNORE_LABEL, cross_entropy
from fedjax_sim.models import (CNN, MLP, CharRNN, LogisticRegression, Model, char_rnn, cnn,
                               from_nnx, logistic_regression, mlp, num_params)
from fedjax_sim.optimizers import client_optimizer, server_optimizer
from fedjax_sim.plots import plot_runs
from fedjax_sim import writers  # TensorBoardWriter, WandbWriter: fs.run(callbacks=...)
from fedjax_sim.reference import ReferenceFedAvg
from fedjax_sim import checkpoint
from fedjax_sim.checkpoint import restore
from fedjax_sim.run_dir import enable_compile_cache
from fedjax_sim.runner import History, Interrupted, run
from fedjax_sim.sweep import SweepResult, sweep
from fedjax_sim.synthetic import synthetic
from fedjax_sim.tasks import Task, load_task, register_task, task_names

__version__ = "0.1.0"

__all__ = [
    "CNN", "FederatedAlgorithm", "FederatedData", "History", "LocalResult", "LogisticRegression",
    "MLP", "Model", "ReferenceFedAvg", "cnn", "logistic_regression", "mlp", "ServerState", "Task", "client_optimizer", "cross_entropy",
    "epoch_order", "fedavg", "from_clients", "from_nnx", "load_task", "make_evaluator",
    "make_local_update", "num_params", "register_task", "run", "sample_clients",
    "server_optimizer", "split_clients", "synthetic", "task_names",
    "CharRNN", "IGNORE_LABEL", "char_rnn", "datasets", "partition",
    "ALGORITHMS", "build_algorithm", "client_state_bytes", "ditto", "fedbuff", "feddyn",
    "fednova",
    "fedprox", "make_personalized_evaluator", "mimelite", "qffl", "scaffold",
    "SweepResult", "sweep", "systems", "conv", "warm_start",
    "ClientInput", "ClientOutput", "ClientWork", "RoundInfo", "ServerRule", "ServerUpdate",
    "compose", "engine", "fedopt", "get_hparams", "set_hparams", "keys",
    "fedexp", "fedrep", "make_merged_personalized_evaluator",
    "plot_runs", "writers",
    "checkpoint", "restore", "Interrupted", "enable_compile_cache",
]
