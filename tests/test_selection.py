"""`ravan-ray report --select KEY`: per configuration of the other keys, the tuned value with the best
validation metric is chosen, and its test metric is reported over seeds, with a paired interval of the top two."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from ravan_ray.cli import main
from ravan_ray.config import from_dict, save_config
from ravan_ray.report import ReportError, write_report
from ravan_ray.results import summarize, write_metrics, write_summary


def write_run(run_dir, *, method, lr, seed, val, test, kind="dirichlet", planned=None):
    """A run directory with chosen numbers: ``val`` and ``test`` are the accuracies of rounds 1..n (of
    ``planned`` rounds configured: a run stopped early ran fewer)."""
    config = from_dict({"seed": seed, "model": {"name": "tiny-bert"}, "optimizer": {"lr": lr},
                        "method": {"name": method, "lora_rank": 8}, "data": {"validation_fraction": 0.1,
                                                                             "partition": {"kind": kind}},
                        "federation": {"rounds": planned or len(val)}})
    run_dir.mkdir(parents=True)
    save_config(config, run_dir / "config.yaml")
    rows = [{"round": r + 1, "wall_s": 1.0, "train_loss": 1.0, "test_accuracy": t, "test_loss": 1 - t,
             "val_accuracy": v, "val_loss": 1 - v, "uplink_bytes": 100, "downlink_bytes": 100}
            for r, (v, t) in enumerate(zip(val, test))]
    write_metrics(run_dir / "metrics.csv", rows, {"test_accuracy": "max", "test_loss": "min",
                                                  "val_accuracy": "max", "val_loss": "min"})
    write_summary(run_dir / "summary.json", summarize(config, rows, 1.0))


# final (val, test) per (method, lr, seed): validation and test disagree on purpose. For ravan, lr 0.01 has
# the best validation but the worst test; for fedit the best validation is at lr 0.001.
FINALS = {
    ("ravan", 0.001): [(0.50, 0.80), (0.52, 0.82), (0.54, 0.84)],
    ("ravan", 0.01): [(0.70, 0.40), (0.72, 0.44), (0.74, 0.42)],
    ("fedit", 0.001): [(0.60, 0.30), (0.62, 0.34), (0.64, 0.38)],
    ("fedit", 0.01): [(0.40, 0.90), (0.42, 0.90), (0.44, 0.90)],
}


@pytest.fixture
def tuned_sweep(tmp_path):
    for (method, lr), per_seed in FINALS.items():
        for seed, (val, test) in enumerate(per_seed):
            write_run(tmp_path / "sweep" / f"{method}-{lr}-{seed}" / "run", method=method, lr=lr, seed=seed,
                      val=[val - 0.1, val], test=[test - 0.1, test])
    return tmp_path / "sweep"


def test_selection_follows_validation_even_where_test_says_the_opposite(tuned_sweep, tmp_path):
    write_report([tuned_sweep], tmp_path / "out", select=["optimizer.lr"])
    selected = pd.read_csv(tmp_path / "out" / "selected.csv").set_index("method.name")
    # If selection looked at test it would pick ravan 0.001 (test 82) and fedit 0.01 (test 90).
    assert selected.loc["ravan", "optimizer.lr"] == 0.01
    assert selected.loc["fedit", "optimizer.lr"] == 0.001
    assert selected.loc["ravan", "test_mean"] == pytest.approx((0.40 + 0.44 + 0.42) / 3)
    assert selected.loc["fedit", "test_mean"] == pytest.approx((0.30 + 0.34 + 0.38) / 3)


def test_the_chosen_learning_rate_is_per_configuration(tmp_path):
    # the same method, two partitions: its best-validation lr differs between them
    for kind, best in (("iid", 0.001), ("dirichlet", 0.01)):
        for lr in (0.001, 0.01):
            for seed in (0, 1):
                val = 0.7 if lr == best else 0.5
                write_run(tmp_path / "runs" / f"{kind}-{lr}-{seed}", method="ravan", lr=lr, seed=seed,
                          val=[val], test=[0.6], kind=kind)
    write_report([tmp_path / "runs"], tmp_path / "out", select=["optimizer.lr"])
    selected = pd.read_csv(tmp_path / "out" / "selected.csv").set_index("data.partition.kind")
    assert selected.loc["iid", "optimizer.lr"] == 0.001 and selected.loc["dirichlet", "optimizer.lr"] == 0.01


def test_the_report_table_matches_hand_computed_means_stds_and_the_paired_interval(tuned_sweep, tmp_path):
    text = write_report([tuned_sweep], tmp_path / "out", select=["optimizer.lr"]).read_text()
    # ravan at lr 0.01: test 40, 44, 42 -> mean 42.00, std 2.00; fedit at lr 0.001: 30, 34, 38 -> 34.00 ± 4.00
    assert "| ravan | **42.00 ± 2.00 (3)** [lr 0.01] |" in text
    assert "| fedit | 34.00 ± 4.00 (3) [lr 0.001] |" in text
    # paired by seed: ravan - fedit = 10, 10, 4 points: mean 8, sd sqrt(12) = 3.4641; t(0.975, 2) = 4.302653
    # half width 4.302653 * 3.4641 / sqrt(3) = 8.6053 -> [-0.61, +16.61]: contains 0
    assert ("ravan - fedit = +8.00 points, 95% paired t-interval [-0.61, +16.61] over 3 seeds: level within noise"
            in text)
    # the unselected runs stay listed, the chosen ones marked
    candidates = pd.read_csv(tmp_path / "out" / "candidates.csv")
    assert len(candidates) == 4 and candidates["chosen"].sum() == 2
    assert "### Every candidate (the chosen ones marked)" in text
    assert "| fedit | 0.01 | 3 | 0 1 2 | 42.00 | 90.00 ± 0.00 (3) |  |" in text


def test_best_round_selection_reports_the_test_metric_of_the_best_validation_round(tmp_path):
    # lr 0.001: validation peaks in round 2 (test there 0.55); lr 0.01: validation best 0.6 in round 1
    write_run(tmp_path / "runs" / "a", method="ravan", lr=0.001, seed=0, val=[0.5, 0.8, 0.7], test=[0.5, 0.55, 0.9])
    write_run(tmp_path / "runs" / "b", method="ravan", lr=0.01, seed=0, val=[0.6, 0.5, 0.4], test=[0.95, 0.9, 0.9])
    write_report([tmp_path / "runs"], tmp_path / "out", select=["optimizer.lr"], select_on="best")
    selected = pd.read_csv(tmp_path / "out" / "selected.csv")
    assert selected["optimizer.lr"].tolist() == [0.001] and selected["test_mean"].tolist() == [pytest.approx(0.55)]
    assert math.isnan(selected["test_std"].iloc[0])  # one seed: no spread


def test_select_without_validation_metrics_or_with_an_unknown_key_is_one_line_exit_2(tmp_path, capsys):
    config = from_dict({"model": {"name": "tiny-bert"}, "federation": {"rounds": 1}})
    run = tmp_path / "runs" / "plain"
    run.mkdir(parents=True)
    save_config(config, run / "config.yaml")
    rows = [{"round": 1, "wall_s": 1.0, "train_loss": 1.0, "test_accuracy": 0.5, "test_loss": 0.5}]
    write_metrics(run / "metrics.csv", rows)
    write_summary(run / "summary.json", summarize(config, rows, 1.0))
    assert main(["report", str(tmp_path / "runs"), "--select", "optimizer.lr"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data.validation_fraction" in err
    write_run(tmp_path / "tuned" / "a", method="ravan", lr=0.001, seed=0, val=[0.5], test=[0.5])
    assert main(["report", str(tmp_path / "tuned"), "--select", "optimizer.lrr"]) == 2
    assert "--select optimizer.lrr: not a config key" in capsys.readouterr().err
    with pytest.raises(ReportError):
        write_report([tmp_path / "tuned"], tmp_path / "out", select=["optimizer.lr"], select_on="middle")


def test_a_choice_at_the_end_of_the_grid_is_flagged_as_an_edge(tmp_path):
    for method, best in (("ravan", 0.01), ("fedit", 0.003)):  # ravan's best is the largest lr tried
        for lr in (0.001, 0.003, 0.01):
            write_run(tmp_path / "runs" / f"{method}-{lr}", method=method, lr=lr, seed=0,
                      val=[0.7 if lr == best else 0.5], test=[0.6])
    text = write_report([tmp_path / "runs"], tmp_path / "out", select=["optimizer.lr"]).read_text()
    assert "[lr 0.01 (edge)]" in text and "[lr 0.003]" in text
    assert "the best may lie outside the grid" in text


def test_per_seed_selection_chooses_in_each_seed_on_that_seeds_validation_alone(tmp_path):
    # ravan: seed 0 best on validation at 0.01, seed 1 at 0.003 (mean over seeds would pick 0.01 for both);
    # fedit: best at 0.001 in both seeds (the smallest tried: an edge)
    vals = {("ravan", 0.001): (0.40, 0.40), ("ravan", 0.003): (0.50, 0.60), ("ravan", 0.01): (0.90, 0.55),
            ("fedit", 0.001): (0.60, 0.60), ("fedit", 0.003): (0.50, 0.50), ("fedit", 0.01): (0.30, 0.30)}
    tests = {("ravan", 0.01, 0): 0.70, ("ravan", 0.003, 1): 0.66, ("fedit", 0.001, 0): 0.50, ("fedit", 0.001, 1): 0.62}
    for (method, lr), per_seed in vals.items():
        for seed, val in enumerate(per_seed):
            test = tests.get((method, lr, seed), 0.1)
            write_run(tmp_path / "runs" / f"{method}-{lr}-{seed}", method=method, lr=lr, seed=seed,
                      val=[val], test=[test])
    text = write_report([tmp_path / "runs"], tmp_path / "out", select=["optimizer.lr"], per_seed=True).read_text()
    chosen = pd.read_csv(tmp_path / "out" / "chosen.csv")
    assert [(m, s, lr) for m, s, lr in zip(chosen["method.name"], chosen["seed"], chosen["optimizer.lr"])] == [
        ("fedit", 0, 0.001), ("fedit", 1, 0.001), ("ravan", 0, 0.01), ("ravan", 1, 0.003)]
    assert list(chosen["edge"]) == [True, True, True, False]
    # ravan: test 70 and 66 -> 68.00 ± 2.83; fedit: 50 and 62 -> 56.00 ± 8.49; the rates in seed order
    assert "| ravan | **68.00 ± 2.83 (2)** [lr 0.01 (edge), 0.003] |" in text
    assert "| fedit | 56.00 ± 8.49 (2) [lr 0.001 (edge), 0.001 (edge)] |" in text
    # paired per seed at each one's own choice: +20 and +4 -> mean +12, sd 11.31, t(0.975, 1) = 12.706
    assert "ravan - fedit = +12.00 points, 95% paired t-interval [-89.65, +113.65] over 2 seeds" in text
    assert "### The choice per seed and the values tried" in text and "| ravan | 1 | 0.003 | 1 |" in text
    selected = pd.read_csv(tmp_path / "out" / "selected.csv").set_index("method.name")
    assert selected.loc["ravan", "optimizer.lr"] == "0.01 0.003" and selected.loc["fedit", "edge_seeds"] == "0 1"


def test_a_run_stopped_early_loses_to_one_that_ran_the_whole_schedule(tmp_path):
    # lr 0.01 was stopped after round 1 by successive halving with validation 0.9 there; lr 0.001 ran both rounds
    write_run(tmp_path / "runs" / "stopped", method="ravan", lr=0.01, seed=0, val=[0.9], test=[0.9], planned=2)
    write_run(tmp_path / "runs" / "full", method="ravan", lr=0.001, seed=0, val=[0.3, 0.5], test=[0.3, 0.4])
    for per_seed in (False, True):
        write_report([tmp_path / "runs"], tmp_path / f"out{per_seed}", select=["optimizer.lr"], per_seed=per_seed)
        assert pd.read_csv(tmp_path / f"out{per_seed}" / "chosen.csv")["optimizer.lr"].tolist() == [0.001]


def test_per_seed_without_select_is_one_line_exit_2(tuned_sweep, capsys):
    assert main(["report", str(tuned_sweep), "--per-seed"]) == 2
    assert "--per-seed goes with --select" in capsys.readouterr().err


def test_an_option_of_another_method_is_shown_unset_not_at_its_default(tmp_path):
    from ravan_ray.report import read_runs

    write_run(tmp_path / "runs" / "fedit", method="fedit", lr=0.01, seed=0, val=[0.5], test=[0.5])
    write_run(tmp_path / "runs" / "ravan", method="ravan", lr=0.01, seed=0, val=[0.5], test=[0.5])
    runs, _ = read_runs(sorted((tmp_path / "runs").iterdir()))
    by_method = runs.set_index("method.name")
    assert by_method.loc["ravan", "method.init"] == "normal" and by_method.loc["ravan", "method.scoring"] == "random"
    assert pd.isna(by_method.loc["fedit", "method.init"]) and pd.isna(by_method.loc["fedit", "method.scoring"])
    assert by_method.loc["fedit", "method.lora_rank"] == 8  # a key every method reads stays
    # the comparison differs in the method alone: Ravan's options are not a difference between Ravan and FedIT
    text = write_report([tmp_path / "runs"], tmp_path / "out").read_text()
    assert "Configurations differ in: `method.name`." in text


def test_against_pairs_every_row_with_the_named_row_and_names_the_side_ahead(tmp_path):
    # one rate each; test per seed: ravan 40, 44, 42; fedit 30, 33, 33; ffa_lora 35, 45, 40
    finals = {"ravan": (0.40, 0.44, 0.42), "fedit": (0.30, 0.33, 0.33), "ffa_lora": (0.35, 0.45, 0.40)}
    for method, tests in finals.items():
        for seed, test in enumerate(tests):
            write_run(tmp_path / "runs" / f"{method}-{seed}", method=method, lr=0.01, seed=seed, val=[0.5],
                      test=[test])
    text = write_report([tmp_path / "runs"], tmp_path / "out", select=["optimizer.lr"], per_seed=True,
                        against="fedit").read_text()
    # fedit - ravan = -10, -11, -9: mean -10, sd 1, half width 4.302653 / sqrt(3) = 2.484 -> [-12.48, -7.52]
    assert ("fedit - ravan = -10.00 points, 95% paired t-interval [-12.48, -7.52] over 3 seeds: ravan ahead "
            "(the interval excludes 0)") in text
    # fedit - ffa_lora = -5, -12, -7: mean -8, sd 3.606, half width 8.957 -> [-16.96, +0.96]
    assert "fedit - ffa_lora = -8.00 points, 95% paired t-interval [-16.96, +0.96] over 3 seeds: level" in text
    assert "fedit (`--against`) against every other" in text and "ravan - " not in text
    # two row keys: the label as the table shows it, with or without spaces around "/"
    for seed, test in enumerate(finals["fedit"]):
        write_run(tmp_path / "runs" / f"ravan-iid-{seed}", method="ravan", lr=0.01, seed=seed, val=[0.5],
                  test=[test], kind="iid")
    text = write_report([tmp_path / "runs"], tmp_path / "out2", select=["optimizer.lr"], per_seed=True,
                        rows=["method.name", "data.partition.kind"], against="ravan/dirichlet").read_text()
    assert "ravan / dirichlet (`--against`) against every other" in text
    assert "ravan / dirichlet - ravan / iid = +10.00 points" in text


def test_against_an_unknown_row_or_without_select_is_one_line_exit_2(tuned_sweep, capsys):
    assert main(["report", str(tuned_sweep), "--select", "optimizer.lr", "--against", "ravan / normal"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--against ravan / normal: not a row" in err and "fedit, ravan" in err
    assert main(["report", str(tuned_sweep), "--against", "ravan"]) == 2
    assert "--against goes with --select" in capsys.readouterr().err


def test_the_paired_verdict_follows_the_scores_direction():
    from ravan_ray.report.selection import paired_verdict

    apart = {"n": 3, "mean": 0.2, "low": 0.1, "high": 0.3}
    assert paired_verdict(apart, ("a", "b"), higher_is_better=True) == "a ahead (the interval excludes 0)"
    assert paired_verdict(apart, ("a", "b"), higher_is_better=False) == "b ahead (the interval excludes 0)"
    behind = {"n": 3, "mean": -0.2, "low": -0.3, "high": -0.1}
    assert paired_verdict(behind, ("a", "b"), higher_is_better=False) == "a ahead (the interval excludes 0)"
    assert paired_verdict({"n": 3, "mean": 0.1, "low": -0.1, "high": 0.3}, ("a", "b"), True).startswith("level")
    assert paired_verdict({"n": 1, "mean": 0.1}, ("a", "b"), True).startswith("1 common seed(s): no interval")
