"""`ravan-ray report`: finds runs in run and sweep directories, averages over seeds, writes tables and plots."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml

from ravan_ray.config import ConfigError, from_dict, save_config
from ravan_ray.report import find_runs, write_report
from ravan_ray.results import summarize, write_metrics, write_summary


def write_run(run_dir, accuracies, *, seed=0, method="ravan", heads=4, distribution="homogeneous",
              kind="dirichlet", init="normal", model="tiny-bert", ranks=(8.0, 9.0)):
    """A run directory as run_federation leaves it, with chosen numbers (test accuracy per round)."""
    config = from_dict({"seed": seed, "model": {"name": model},
                        "method": {"name": method, "heads": heads, "init": init, "lora_rank": 8},
                        "compute": {"distribution": distribution}, "data": {"partition": {"kind": kind}},
                        "federation": {"rounds": len(accuracies)}})
    run_dir.mkdir(parents=True)
    save_config(config, run_dir / "config.yaml", extra={"method": {"heads": heads, "rank_per_head": {"q": 11}}})
    rows = [{"round": r + 1, "wall_s": 1.0 + r, "train_loss": 1.0 / (r + 1), "test_accuracy": acc,
             "uplink_bytes": 100, "downlink_bytes": 200, "agg_error": 0.0,
             "effective_rank": ranks[r % len(ranks)], "clients": 3, "heads_trained": heads}
            for r, acc in enumerate(accuracies)]
    write_metrics(run_dir / "metrics.csv", rows)
    write_summary(run_dir / "summary.json", summarize(config, rows, rows[-1]["wall_s"]))
    return run_dir


@pytest.fixture
def method_sweep(tmp_path):
    """2 methods x 2 budget mixes x 3 seeds, final accuracies known exactly."""
    finals = {}
    for method, base in (("ravan", 0.70), ("hetlora", 0.60)):
        for mix, shift in (("bell", 0.0), ("skewed_right", -0.10)):
            for seed in (0, 1, 2):
                final = base + shift + 0.01 * seed
                finals.setdefault((method, mix), []).append(final)
                write_run(tmp_path / "sweep" / f"{method}-{mix}-{seed}" / "run", [final - 0.2, final - 0.1, final],
                          seed=seed, method=method, distribution=mix)
    return tmp_path / "sweep", finals


def test_mean_std_and_n_over_seeds_are_those_of_the_numbers(method_sweep, tmp_path):
    sweep, finals = method_sweep
    report = write_report([sweep], tmp_path / "out")
    table = pd.read_csv(tmp_path / "out" / "report.csv")
    assert len(table) == 4
    for (method, mix), values in finals.items():
        row = table[(table["method.name"] == method) & (table["compute.distribution"] == mix)].iloc[0]
        assert row["n"] == 3
        assert row["final_test_accuracy_mean"] == pytest.approx(np.mean(values))
        assert row["final_test_accuracy_std"] == pytest.approx(np.std(values, ddof=1))
        assert row["seeds"] == "0 1 2"
    text = report.read_text()
    # ravan under bell: mean 71.00, std 1.00 over 3 seeds
    assert "71.00 ± 1.00 (3)" in text
    assert "## Final test accuracy per method" in text and "## Final test accuracy per budget mix and method" in text


def test_report_writes_tables_and_the_plots_its_groupings_allow(method_sweep, tmp_path):
    sweep, _ = method_sweep
    out = tmp_path / "out"
    report = write_report([sweep], out)
    assert report == out / "report.md"
    for name in ("report.csv", "runs.csv", "accuracy_per_round.png", "accuracy_by_budget_mix.png",
                 "effective_rank.png"):
        assert (out / name).stat().st_size > 0, name
    assert not (out / "heads_gain.png").exists()  # one head count only: skipped, with a note
    assert "Test accuracy gain vs heads plot: method.heads takes a single value" in report.read_text()
    assert len(pd.read_csv(out / "runs.csv")) == 12


def test_heads_report_marks_where_sqrt_nh_reaches_d(tmp_path):
    for heads, final in ((1, 0.50), (2, 0.55), (4, 0.56)):
        for seed in (0, 1):
            write_run(tmp_path / "runs" / f"h{heads}-s{seed}", [final - 0.1, final + 0.01 * seed], seed=seed,
                      heads=heads)
    report = write_report([tmp_path / "runs"], tmp_path / "out")
    assert (tmp_path / "out" / "heads_gain.png").stat().st_size > 0
    assert "## Final test accuracy per number of heads" in report.read_text()
    runs = pd.read_csv(tmp_path / "out" / "runs.csv")
    # tiny-bert: d = 32; lora_rank 8 -> N = 8 (32 + 32) = 512; sqrt(N h) = d at h = d^2 / N = 2
    assert set(runs["d_model"]) == {32} and set(runs["budget_per_matrix"]) == {512}


def test_runs_from_several_directories_and_a_single_seed(tmp_path):
    write_run(tmp_path / "a", [0.4, 0.5], init="normal")
    write_run(tmp_path / "b" / "nested" / "run", [0.4, 0.6], init="gram_schmidt")
    (tmp_path / "b" / "not_a_run").mkdir()
    (tmp_path / "b" / "not_a_run" / "metrics.csv").write_text("round\n1\n")
    assert len(find_runs([tmp_path / "a", tmp_path / "b"])) == 2
    report = write_report([tmp_path / "a", tmp_path / "b"], tmp_path / "out").read_text()
    assert "## Final test accuracy per initialisation" in report
    assert "60.00 (1)" in report and "±" not in report.split("## Final test accuracy per initialisation")[1].split("##")[0]


def test_report_over_a_run_written_by_run_federation(tmp_path, tiny_config, ray_session):
    from ravan_ray.federation import run_federation

    summary = run_federation(tiny_config("seed=3"), tmp_path / "runs" / "seed3")
    # the same configuration with another seed, its numbers made up: copy the real run, change seed and accuracy
    shutil.copytree(tmp_path / "runs" / "seed3", tmp_path / "runs" / "seed4")
    config = yaml.safe_load((tmp_path / "runs" / "seed4" / "config.yaml").read_text())
    config["seed"] = 4
    (tmp_path / "runs" / "seed4" / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "runs" / "seed4" / "summary.json").write_text(
        json.dumps({**summary, "final_test_accuracy": summary["final_test_accuracy"] + 0.1}))
    report = write_report([tmp_path / "runs"], None)
    assert report == tmp_path / "runs" / "report" / "report.md"
    runs = pd.read_csv(report.parent / "runs.csv")
    assert sorted(runs["seed"]) == [3, 4] and set(runs["model.name"]) == {"tiny-bert"}
    table = pd.read_csv(report.parent / "report.csv")
    assert len(table) == 1 and table["n"].iloc[0] == 2
    assert table["final_test_accuracy_mean"].iloc[0] == pytest.approx(summary["final_test_accuracy"] + 0.05)
    assert table["final_test_accuracy_std"].iloc[0] == pytest.approx(0.1 / np.sqrt(2))
    for name in ("accuracy_per_round.png", "effective_rank.png"):
        assert (report.parent / name).stat().st_size > 0


def test_no_runs_is_one_line_config_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no runs"):
        write_report([tmp_path / "empty"], None)
    with pytest.raises(ConfigError, match="no such directory"):
        write_report([tmp_path / "missing"], None)


def test_cli_report_exit_code_2_without_runs(tmp_path, capsys):
    from ravan_ray.cli import main

    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ravan-ray: error: no runs") and len(err.strip().splitlines()) == 1


def test_a_key_set_in_one_run_and_unset_in_another_is_shown_as_a_dash(tmp_path):
    write_run(tmp_path / "a", [0.4, 0.5], method="ravan")
    lr_run = write_run(tmp_path / "b", [0.3, 0.6], method="full_ft")
    config = (lr_run / "config.yaml").read_text().replace("  lr: null", "  lr: 0.0001")
    (lr_run / "config.yaml").write_text(config)
    report = write_report([tmp_path], tmp_path / "out").read_text()
    all_configurations = report.split("## All configurations")[1].split("##")[0]
    assert "| ravan | - |" in all_configurations and "| full_ft | 0.0001 |" in all_configurations
    assert "nan" not in report
    assert "lr=-" in report  # the per-method pivot's column for the run without an lr
    assert (tmp_path / "out" / "accuracy_per_round.png").exists()


def test_a_method_that_ignored_the_budget_mix_is_marked_in_every_table_with_a_footnote(tmp_path):
    from ravan_ray.report.runs import IGNORED_MIX_MARK, IGNORED_MIX_NOTE

    for method in ("ravan", "fedit"):
        for mix in ("homogeneous", "bell"):
            write_run(tmp_path / "runs" / f"{method}-{mix}", [0.3, 0.5], method=method, distribution=mix)
    text = write_report([tmp_path / "runs"], tmp_path / "out").read_text()
    table = pd.read_csv(tmp_path / "out" / "report.csv")
    marked = table[table["ignored_mix"]]
    assert list(zip(marked["method.name"], marked["compute.distribution"])) == [("fedit", "bell")]
    assert IGNORED_MIX_NOTE in text
    mix_table = text.split("## Final test accuracy per budget mix and method")[1].split("##")[0]
    bell_row = next(line for line in mix_table.splitlines() if line.startswith("| bell"))
    homogeneous_row = next(line for line in mix_table.splitlines() if line.startswith("| homogeneous"))
    assert bell_row.count(IGNORED_MIX_MARK) == 1 and IGNORED_MIX_MARK not in homogeneous_row
    assert IGNORED_MIX_NOTE in mix_table


def test_per_client_columns_are_in_the_table_and_their_distribution_in_the_fairness_plot(tmp_path):
    """Runs with federation.client_eval: the worst-off tenth beside the global accuracy, and fairness.png from each
    run's client_metrics.csv at its last evaluated round."""
    from ravan_ray.client_eval import summarize as client_summary

    for method, spread in (("ravan", 0.1), ("fedit", 0.3)):
        run_dir = tmp_path / "runs" / method
        config = from_dict({"method": {"name": method}, "federation": {"rounds": 2, "client_eval": True}})
        run_dir.mkdir(parents=True)
        save_config(config, run_dir / "config.yaml")
        per_client = pd.DataFrame({"round": 2, "client": range(10), "rows": 5,
                                   "test_accuracy": np.linspace(0.5 - spread, 0.5 + spread, 10), "test_loss": 1.0})
        per_client.to_csv(run_dir / "client_metrics.csv", index=False)
        rows = [{"round": 1, "wall_s": 1.0, "train_loss": 1.0}, {
            "round": 2, "wall_s": 2.0, "train_loss": 0.5, "test_accuracy": 0.5,
            **client_summary(per_client.to_dict("records"), "test_accuracy", "max")}]
        write_metrics(run_dir / "metrics.csv", rows)
        write_summary(run_dir / "summary.json", summarize(config, rows, 2.0))
    report = write_report([tmp_path / "runs"], tmp_path / "out").read_text()
    assert "final client test accuracy p10 %" in report and "final client test accuracy std %" in report
    table = pd.read_csv(tmp_path / "out" / "report.csv").set_index("method.name")
    assert table.loc["fedit", "final_client_test_accuracy_p10_mean"] == pytest.approx(
        np.percentile(np.linspace(0.2, 0.8, 10), 10))
    assert (tmp_path / "out" / "fairness.png").stat().st_size > 0 and "(fairness)" in report
