"""benchmarks/cluster_drill.py's pure parts: how a run's metrics are held against the reference's, how a resume that
started over is told from one that continued, and how its section of RESULTS.md is replaced. (The drill itself
needs root and network namespaces: it is run by hand, not here.)"""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd

spec = importlib.util.spec_from_file_location("cluster_drill",
                                              Path(__file__).resolve().parents[1] / "benchmarks" / "cluster_drill.py")
drill = importlib.util.module_from_spec(spec)
sys.modules["cluster_drill"] = drill  # its dataclasses look their module up
spec.loader.exec_module(drill)


def metrics(rounds=(1, 2, 3, 4), **changes):
    frame = pd.DataFrame({"round": list(rounds), "wall_s": [1.0 * r for r in rounds],
                          "train_loss": [2.5 - 0.1 * r for r in rounds],
                          "test_accuracy": [np.nan if r % 2 else 0.1 * r for r in rounds],
                          "clients": [4] * len(rounds), "failed_clients": [0] * len(rounds)})
    for column, values in changes.items():
        frame[column] = values
    return frame


def test_metrics_equal_whatever_the_wall_clock_and_with_the_same_empty_cells():
    assert drill.compare(metrics(wall_s=[9.0, 8.0, 7.0, 6.0]), metrics()) == "yes"


def test_only_the_fault_counts_differing_is_yes_but_those_columns():
    assert drill.compare(metrics(failed_clients=[0, 1, 0, 0]), metrics()) == "yes but failed_clients"


def test_a_learned_column_differing_is_no_naming_it():
    changed = metrics(train_loss=[2.4, 2.3, 2.2, 2.0], clients=[4, 3, 4, 4])
    assert drill.compare(changed, metrics()) == "no: train_loss, clients"


def test_a_run_with_fewer_rounds_is_compared_on_those_it_has_and_says_how_many():
    assert drill.compare(metrics(rounds=(1, 2)), metrics()) == "yes (2 of 4 rounds)"
    assert drill.compare(None, metrics()) == "-"


def test_a_resume_that_wrote_the_kept_rounds_again_started_over():
    kept = metrics(rounds=(1,))
    continued = metrics()
    assert not drill.played_again(kept, continued)
    assert drill.played_again(kept, metrics(wall_s=[1.5, 2.0, 3.0, 4.0]))


def test_the_results_section_is_replaced_up_to_the_next_one_or_appended():
    text = "# Results\n\nintro\n\n## Faults survived on a real 3-node cluster\n\nold table\n\n## Later\n\nkept\n"
    replaced = drill.replace_section(text, drill.SECTION, "new table\n")
    assert replaced == "# Results\n\nintro\n\n## Faults survived on a real 3-node cluster\n\nnew table\n\n## Later\n\nkept\n"
    appended = drill.replace_section("# Results\n\nintro\n", drill.SECTION, "new table")
    assert appended == "# Results\n\nintro\n\n## Faults survived on a real 3-node cluster\n\nnew table\n"


def test_the_actors_that_failed_in_their_constructor_are_named_with_their_machines():
    for host, ip in zip(drill.HOSTS, ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5"]):
        host.ip = ip
    output = ("\x1b[36m(ClientActor pid=61, ip=10.0.0.3)\x1b[0m Exception raised in creation task: The actor died "
              "because of an error raised in its creation task, ray::x-client-2:ClientActor.__init__()\n"
              "(ClientActor pid=61, ip=10.0.0.3)   File \"actors/client.py\", line 35, in __init__\n"
              "(ParameterServer pid=62, ip=10.0.0.4) Exception raised in creation task: The actor died because of "
              "an error raised in its creation task, ray::x-server:ParameterServer.__init__()\n")
    assert drill.creation_failures(output) == "ClientActor on w1; ParameterServer on w2"
    assert drill.creation_failures("ravan on text_classification: 4 rounds in 17 s") == ""
