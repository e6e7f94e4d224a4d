"""benchmarks/cohort.py costs: the GPU goals it reports are the ratios of the rounds' times it reads off step.csv."""

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

spec = importlib.util.spec_from_file_location("cohort_benchmark",
                                              Path(__file__).resolve().parents[1] / "benchmarks" / "cohort.py")
cohort_benchmark = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cohort_benchmark)


def step_rows(model, rates):
    return [{"model": model, "dtype": "bfloat16", "method": "ravan", "cohort": k, "client_steps_per_s": rate}
            for k, rate in rates.items()]


def test_a_cohort_round_is_k_clients_steps_at_the_cohorts_rate_against_the_same_at_cohort_ones_rate():
    # ViT: 10 client-steps/s alone, 30 in a cohort of 3 -> a third of the time; MiniLM: 32 -> 100 per s, 0.32
    steps = pd.DataFrame(step_rows("vit-b16", {1: 10.0, 3: 30.0}) + step_rows("minilm-l6", {1: 32.0, 32: 100.0}))
    table = cohort_benchmark.costs(steps).set_index("model")

    vit = table.loc["vit-b16"]
    assert vit.round_s_one_by_one == pytest.approx(3 * 50 / 10)
    assert vit.round_s_cohort == pytest.approx(3 * 50 / 30)
    assert vit.ratio == pytest.approx(1 / 3, abs=1e-3) and vit.met  # goal: at most half
    assert vit.cifar100_run_min_one_by_one == pytest.approx(50 * 15 / 60, abs=0.05)  # 50 rounds of 15 s

    minilm = table.loc["minilm-l6"]
    assert minilm.ratio == pytest.approx(0.32) and not minilm.met  # goal: at most a fifth
    assert pd.isna(minilm.cifar100_run_min_one_by_one)


def test_costs_without_the_goals_cohort_sizes_says_what_is_missing():
    with pytest.raises(SystemExit, match="vit-b16 \\(cohort 3\\)"):
        cohort_benchmark.costs(pd.DataFrame(step_rows("vit-b16", {1: 10.0, 8: 40.0})))
