"""What a new user meets: the embedded default's data, the end of a run, and mistakes that must be one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import TINY_OVERRIDES
from ravan_ray.cli import main
from ravan_ray.config import load_config
from ravan_ray.data import DataError, partition

TINY_ARGS = [arg for o in [*TINY_OVERRIDES, "federation.rounds=2"] for arg in ("--set", o)]


def test_the_embedded_default_is_banking77_shipped_with_the_package():
    from ravan_ray.tasks.text_classification import TextClassification

    config = load_config()
    assert config.data.name == "banking77" and config.data.path is None
    data = TextClassification(config).load_texts()
    assert len(data.train_texts) == 10003 and len(data.test_texts) == 3080
    assert data.num_classes == 77 and data.label_names[0] == "card_arrival"
    assert np.bincount(data.test_labels).tolist() == [40] * 77


def test_a_local_run_ends_with_a_readable_summary_and_its_curves_without_rays_token_warning(tmp_path):
    env = {**os.environ, "RAY_ADDRESS": "", "TQDM_DISABLE": ""}
    env.pop("RAY_AUTH_MODE", None)
    done = subprocess.run([sys.executable, "-m", "ravan_ray.cli", "run", *TINY_ARGS, "--output", str(tmp_path / "run")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Token authentication" not in done.stderr
    out = done.stdout
    for expected in ("ravan on text_classification: 2 rounds in", "test accuracy", "best", "uplink",
                     f"run directory    {tmp_path / 'run'}", f"next: ravan-ray report {tmp_path / 'run'}"):
        assert expected in out, expected
    assert not out.lstrip().startswith("{")  # not raw JSON
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0


def test_json_and_quiet_print_what_a_script_reads(ray_session, tmp_path, capsys):
    assert main(["run", *TINY_ARGS, "--json", "--output", str(tmp_path / "a")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rounds"] == 2 and summary["final_test_accuracy"] is not None
    assert main(["run", *TINY_ARGS, "--quiet", "--output", str(tmp_path / "b")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "b")


MISTAKES = [
    (["--set", "method.lora_rank=100000"], "method.budget <="),
    (["--set", "method.name=fedit", "--set", "method.lora_rank=100000"], "method.lora_rank <= 32"),
    (["--set", "federation.num_clients=20", "--set", "data.partition.min_size=12"], "data.partition.min_size <="),
]


@pytest.mark.parametrize("args,mentions", MISTAKES, ids=["ravan rank", "fedit rank", "dirichlet min_size"])
def test_a_mistake_is_one_line_with_what_would_work(ray_session, tmp_path, capsys, args, mentions):
    assert main(["run", *TINY_ARGS, *args, "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and mentions in err, err


def test_output_naming_an_existing_file_is_one_line(tmp_path, capsys):
    (tmp_path / "taken").write_text("")
    for argv in (["run", *TINY_ARGS, "--output", str(tmp_path / "taken")],
                 ["run", *TINY_ARGS, "--output", str(tmp_path / "taken" / "below")],
                 ["tiny", str(tmp_path / "taken")],
                 ["run", str(tmp_path)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(tmp_path) in err


def test_an_impossible_dirichlet_split_says_what_would_work():
    labels = np.arange(11279) % 20  # 20 Newsgroups' size: 1,000 clients cannot each get 8 samples of it
    with pytest.raises(DataError) as refused:
        partition(labels, 1000, "dirichlet", 0.3, min_size=8, seed=0)
    best = int(str(refused.value).split("data.partition.min_size <= ")[1].split()[0].rstrip(","))
    assert 0 <= best < 8
    assert len(partition(labels, 1000, "dirichlet", 0.3, min_size=best, seed=0)) == 1000
    few = np.arange(200) % 2  # two classes over 20 clients at alpha 0.3: larger alphas work
    with pytest.raises(DataError) as refused:
        partition(few, 20, "dirichlet", 0.3, min_size=8, seed=0)
    alpha = float(str(refused.value).split("data.partition.alpha >= ")[1].split()[0].rstrip(","))
    assert alpha > 0.3 and any(_splits(few, alpha, seed) for seed in range(5))


def _splits(labels, alpha, seed) -> bool:
    try:
        partition(labels, 20, "dirichlet", alpha, min_size=8, seed=seed)
        return True
    except DataError:
        return False
