"""The peer benchmark's Flower side (run by benchmarks/peer.py with a Python that has flwr[simulation]).

The same workload as ravan-ray's run, on Flower's simulation engine (Ray backend, one virtual SuperNode
per client, 1 CPU per ClientApp), written as a performance-aware Flower user would: the ClientApp keeps
its model between calls in its worker process (Flower builds a ClientApp per message), the ServerApp
evaluates centrally every 2 rounds. Local training and evaluation are ravan-ray's own ``ModelHost`` (FedIT),
so the two simulators run the same compute and differ in orchestration only. Flower samples the round's
3 clients with its own random generator and weights FedAvg by the "num-examples" each reply states, set
to 1 here: the uniform mean of FedIT's factors, as ravan-ray aggregates them.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

TIMES: list[float] = []
RESULT: dict = {}
_HOST: dict = {}  # per worker process: (config, data, host)


def host():
    """The model, config and data of this process, built on first use (a ClientApp lives per message)."""
    if not _HOST:
        from ravan_ray.config import load_config
        from ravan_ray.federation import prepare_data
        from ravan_ray.training import ModelHost

        workload = json.loads(os.environ["PEER_WORKLOAD"])  # Ray's workers inherit the environment
        torch.set_num_threads(int(workload.get("resources.cpus_per_client", 1)))
        config = load_config(None, [f"{k}={v}" for k, v in workload.items()])
        data = prepare_data(config)
        _HOST.update(config=config, data=data, host=ModelHost(config, data.task_info))
    return _HOST["config"], _HOST["data"], _HOST["host"]


def build_apps():
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    from ravan_ray.methods.base import ClientTask

    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        config, data, model_host = host()
        client = int(context.node_config["partition-id"])
        state = msg.content["arrays"].to_torch_state_dict()
        local = {key: values[data.partitions[client]] for key, values in data.train.items()}
        round_index = int(msg.content["config"]["round"])
        update = model_host.train_client(ClientTask(client, round_index, 1.0, config.seed), state, None, local)
        content = RecordDict({"arrays": ArrayRecord({k: v.contiguous() for k, v in update.tensors.items()}),
                              "metrics": MetricRecord({"num-examples": 1, "train_loss": update.train_loss})})
        return Message(content=content, reply_to=msg)

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        config, data, model_host = host()
        torch.set_num_threads(os.cpu_count() or 1)  # the server evaluates alone, between rounds
        fed = config.federation
        started = time.perf_counter()

        def evaluate(server_round: int, arrays: ArrayRecord):
            if server_round == 0:
                return None
            metrics = None
            if server_round % fed.eval_every == 0 or server_round == fed.rounds:
                metrics = model_host.evaluate(arrays.to_torch_state_dict(), data.test, fed.eval_batch_size)
                RESULT["final_test_accuracy"] = metrics["test_accuracy"]
            TIMES.append(time.perf_counter() - started)
            return MetricRecord(metrics) if metrics else None

        class RoundConfig(FedAvg):
            def configure_train(self, server_round, arrays, config_record, grid):
                config_record["round"] = server_round
                return super().configure_train(server_round, arrays, config_record, grid)

        strategy = RoundConfig(fraction_train=fed.clients_per_round / fed.num_clients, fraction_evaluate=0.0,
                               min_train_nodes=fed.clients_per_round, min_available_nodes=fed.num_clients)
        initial = {k: v.contiguous() for k, v in model_host.initial_state().items()}
        strategy.start(grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=fed.rounds, evaluate_fn=evaluate)

    return server_app, client_app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--workload", required=True, help="the ravan-ray overrides, as JSON")
    args = parser.parse_args()
    os.environ["PEER_WORKLOAD"] = args.workload
    workload = json.loads(args.workload)

    import flwr
    from flwr.simulation import run_simulation

    server_app, client_app = build_apps()
    cpus = float(workload.get("resources.cpus_per_client", 1))
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=int(workload["federation.num_clients"]),
                   backend_config={"client_resources": {"num_cpus": cpus, "num_gpus": 0.0},
                                   "init_args": {"include_dashboard": False}})
    with open(args.out, "w") as handle:
        json.dump({"flwr_version": flwr.__version__, "round_end_s": TIMES, **RESULT}, handle)


if __name__ == "__main__":
    main()
