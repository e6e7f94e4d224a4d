"""A multi-node Ray cluster on this machine for the tests (ray.cluster_utils.Cluster: a raylet per node, each with its
own resources), driven over stdin so that a test can lose a node mid-run and add it back.

Run as a script; it prints one line "@@ " + JSON {"address": GCS address} when the cluster is up, then obeys one
command per line and answers each with one such line (Ray may print lines of its own to stdout: readers skip every
line without the "@@ " mark):
    add NAME CPUS          a worker node with CPUS CPUs and the custom resource NAME
    remove NAME            lose that node (its raylet and every process on it killed, no graceful drain); a name that
                           is not a live node answers ok false
    remove-actor SUFFIX    lose the node hosting the live actor whose name ends with SUFFIX
    nodes                  the live nodes' names
    quit                   shut the cluster down
The head holds no CPU (drivers attach to it; client actors and the server go to the workers), like a head started
with `ray start --head --num-cpus=0`. Nodes report death quickly (a health check every 0.5 s), so a lost node shows
in seconds, not Ray's default ~30 s.
"""

from __future__ import annotations

import json
import logging
import sys

import ray
import ray._private.utils
from ray._private.state import actors
from ray.cluster_utils import Cluster


MARK = "@@ "


def answer(**values) -> None:
    print(MARK + json.dumps(values), flush=True)


def main() -> None:
    # Cluster() records its address in Ray's temp dir for ray.init("auto"); other Rays on this machine may read it.
    ray._private.utils.write_ray_address = lambda *args, **kwargs: None
    temp_dir = sys.argv[1]
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "temp_dir": temp_dir, "include_dashboard": False,
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3,
                           "health_check_initial_delay_ms": 0}})
    nodes = {}
    ray.init(address=cluster.address, logging_level=logging.WARNING, log_to_driver=False)

    def add(name: str, cpus: float) -> None:
        nodes[name] = cluster.add_node(num_cpus=cpus, resources={name: 1}, temp_dir=temp_dir)
        cluster.wait_for_nodes()

    def live_names() -> list[str]:
        return sorted(name for name, node in nodes.items()
                      if any(n["Alive"] and n["NodeID"] == node.node_id for n in ray.nodes()))

    for name in ("w1", "w2", "w3"):
        add(name, 1)
    answer(address=cluster.address)
    try:
        for line in sys.stdin:
            command, *args = line.split()
            if command == "add":
                add(args[0], float(args[1]))
                answer(ok=True, nodes=live_names())
            elif command == "remove":
                node = nodes.pop(args[0], None)
                if node is not None:
                    cluster.remove_node(node, allow_graceful=False)
                answer(ok=node is not None, nodes=live_names())
            elif command == "remove-actor":
                hosts = [a["Address"]["NodeID"] for a in actors().values()
                         if a["State"] == "ALIVE" and a["Name"].endswith(args[0])]
                name = next((n for n, node in nodes.items() if hosts and node.node_id == hosts[0]), None)
                if name is not None:
                    cluster.remove_node(nodes.pop(name), allow_graceful=False)
                answer(ok=name is not None, removed=name, nodes=live_names())
            elif command == "nodes":
                answer(ok=True, nodes=live_names())
            elif command == "quit":
                break
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
