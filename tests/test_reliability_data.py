"""What a user or a damaged run directory can do wrong, and what the run does about it: data and models
whose meaning is wrong are refused before training, a run directory has one writer, a resumed run restores
or refuses (never continues a shorter history), and every refusal is one line naming the file, exit 2."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

from ravan_ray.cli import main
from ravan_ray.federation import run_federation
from ravan_ray.results import TIMING_COLUMNS, run_lock

from conftest import TINY_OVERRIDES


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("ravan-ray: error:")]
    assert len(lines) == 1, err
    return lines[0]


def without_timing(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=[c for c in (*TIMING_COLUMNS, "server_restarts") if c in frame.columns])


def summary_without_timing(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    summary.pop("wall_s")
    return summary


# ------------------------------------------------------------------------- damaged runs, resumed
RESUMABLE = ("federation.rounds=3", "output.checkpoint_every=1", "output.keep_checkpoints=3")


class Interrupted(RuntimeError):
    pass


def stop_after(round_index: int):
    def stop(row, checkpoint):
        if row["round"] == round_index:
            raise Interrupted
    return stop


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ray_session):
    """A clean 3-round run, and the same run interrupted after round 2 (kept pristine; tests copy it)."""
    from ravan_ray.config import load_config

    root = tmp_path_factory.mktemp("runs")
    config = load_config(None, [*TINY_OVERRIDES, *RESUMABLE])
    run_federation(config, root / "clean")
    with pytest.raises(Interrupted):
        run_federation(config, root / "interrupted", on_round=stop_after(2))
    return root


def interrupted_copy(runs: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(runs / "interrupted", run_dir)
    return run_dir


def assert_same_run(clean: Path, resumed: Path) -> None:
    pd.testing.assert_frame_equal(without_timing(pd.read_csv(clean / "metrics.csv")),
                                  without_timing(pd.read_csv(resumed / "metrics.csv")))
    assert summary_without_timing(clean) == summary_without_timing(resumed)


def cut_mid_line(path: Path) -> None:
    text = path.read_text()
    path.write_text(text[: text.rindex("\n", 0, len(text) - 1) + 7])


def drop_last_row(path: Path) -> None:
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))


@pytest.mark.parametrize("damage", [
    pytest.param(lambda p: p.unlink(), id="deleted"),
    pytest.param(lambda p: p.write_text(""), id="emptied"),
    pytest.param(cut_mid_line, id="cut-mid-line"),
    pytest.param(drop_last_row, id="last-row-lost"),
    pytest.param(lambda p: p.write_text("round,wall_s\n1,0.5\n"), id="columns-lost"),
])
def test_resume_after_metrics_csv_lost_rows_restores_them_from_the_checkpoint(runs, tmp_path, capsys, damage):
    run_dir = interrupted_copy(runs, tmp_path)
    damage(run_dir / "metrics.csv")
    assert main(["resume", str(run_dir), "--quiet"]) == 0
    assert_same_run(runs / "clean", run_dir)


def test_resume_from_an_earlier_round_ends_as_the_uninterrupted_run(runs, tmp_path):
    run_dir = interrupted_copy(runs, tmp_path)
    assert main(["resume", str(run_dir), "--from-round", "1", "--quiet"]) == 0
    assert_same_run(runs / "clean", run_dir)


def test_a_corrupt_last_checkpoint_is_refused_with_the_command_that_falls_back(runs, tmp_path, capsys):
    run_dir = interrupted_copy(runs, tmp_path)
    (run_dir / "checkpoints" / "round_00002" / "state.safetensors").write_bytes(b"not a tensor file")
    assert main(["resume", str(run_dir)]) == 2
    line = one_error_line(capsys)
    assert "round_00002" in line and f"resume {run_dir} --from-round 1" in line
    assert main(["resume", str(run_dir), "--from-round", "1", "--quiet"]) == 0
    assert_same_run(runs / "clean", run_dir)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["round_00001", "round_00002", "round_00003"]


def test_resume_from_a_round_without_a_checkpoint_lists_those_there_are(runs, tmp_path, capsys):
    run_dir = interrupted_copy(runs, tmp_path)
    assert main(["resume", str(run_dir), "--from-round", "7"]) == 2
    assert "no checkpoint of round 7; checkpoints: 1, 2" in one_error_line(capsys)


def test_a_checkpoint_without_rows_and_a_short_metrics_csv_is_refused_not_shortened(runs, tmp_path, capsys):
    run_dir = interrupted_copy(runs, tmp_path)
    meta = run_dir / "checkpoints" / "round_00002" / "meta.json"
    meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "rows"}))
    drop_last_row(run_dir / "metrics.csv")
    assert main(["resume", str(run_dir)]) == 2
    assert "metrics.csv lacks rows of rounds 1-2" in one_error_line(capsys)


def test_a_finished_run_whose_metrics_csv_was_lost_gets_its_rows_back_on_resume(runs, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(runs / "clean", run_dir)
    (run_dir / "metrics.csv").unlink()
    assert main(["resume", str(run_dir), "--quiet"]) == 0
    assert_same_run(runs / "clean", run_dir)


def test_resume_refuses_a_run_with_rounds_but_no_checkpoint_instead_of_starting_it_over(runs, tmp_path, capsys):
    run_dir = interrupted_copy(runs, tmp_path)
    shutil.rmtree(run_dir / "checkpoints")  # e.g. written on another machine by an older version
    rows_before = (run_dir / "metrics.csv").read_text()
    assert main(["resume", str(run_dir)]) == 2
    assert "no checkpoint" in one_error_line(capsys)
    assert (run_dir / "metrics.csv").read_text() == rows_before


@pytest.mark.parametrize("key", ["method.heads=8", "optimizer.lr=0.1", "seed=3", "federation.rounds=9"])
def test_resume_may_change_where_a_run_executes_but_not_what_it_computes(runs, tmp_path, capsys, key):
    run_dir = interrupted_copy(runs, tmp_path)
    assert main(["resume", str(run_dir), "--set", key]) == 2
    assert key.split("=")[0] in one_error_line(capsys)


def test_resume_with_other_resources_ends_as_the_uninterrupted_run_and_records_them(runs, tmp_path):
    from ravan_ray.config import load_config

    run_dir = interrupted_copy(runs, tmp_path)
    assert main(["resume", str(run_dir), "--set", "resources.pool_size=2", "--set", "resources.actor_mode=per_client",
                 "--set", "output.keep_checkpoints=1", "--quiet"]) == 0
    assert_same_run(runs / "clean", run_dir)
    assert load_config(run_dir / "config.yaml").resources.actor_mode == "per_client"
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["round_00003"]


# ------------------------------------------------------------------------- one writer per run directory
def test_a_second_run_on_a_directory_in_use_is_refused_before_it_writes(tmp_path, capsys):
    run_dir = tmp_path / "run"
    with run_lock(run_dir):
        assert main(["run", "--output", str(run_dir), *sum((["--set", o] for o in TINY_OVERRIDES), [])]) == 2
        assert f"{run_dir} is in use by another run (pid {os.getpid()})" in one_error_line(capsys)
        assert [p.name for p in run_dir.iterdir()] == [".lock"]  # the holder's lock alone: nothing was written


def test_a_resume_of_a_run_in_progress_is_refused_and_its_files_stay(runs, tmp_path, capsys):
    run_dir = interrupted_copy(runs, tmp_path)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    with run_lock(run_dir):
        assert main(["resume", str(run_dir)]) == 2
        assert "in use by another run" in one_error_line(capsys)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != ".lock"} == \
        {k: v for k, v in before.items() if k != ".lock"}


def test_the_lock_of_a_dead_process_does_not_block_the_next_run(tmp_path):
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    # a process that takes the lock and is killed while holding it
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from ravan_ray.results import run_lock\n"
                               f"with run_lock(Path({str(run_dir)!r})):\n    print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    with run_lock(run_dir):
        pass


# ------------------------------------------------------------------------- unreadable files, one line
def test_an_output_directory_that_cannot_be_written_is_one_line(tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"

    def refused(path, *args, **kwargs):  # what a read-only directory does (chmod does not stop root)
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Path, "mkdir", refused)
    assert main(["run", "--output", str(locked / "run"), *sum((["--set", o] for o in TINY_OVERRIDES), [])]) == 2
    assert one_error_line(capsys) == f"ravan-ray: error: {locked / 'run'}: Permission denied"


@pytest.mark.parametrize("content", ["[1, 2]", "3", '"text"'])
def test_report_on_a_summary_that_is_not_an_object_is_one_line(runs, tmp_path, capsys, content):
    run_dir = tmp_path / "run"
    shutil.copytree(runs / "clean", run_dir)
    (run_dir / "summary.json").write_text(content)
    assert main(["report", str(run_dir)]) == 2
    assert "summary.json" in one_error_line(capsys)


# ------------------------------------------------------------------------- data and models that mean the wrong thing
WORDS = ["the card was declined", "my transfer is late", "how do I reset my pin", "the app will not open"]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))  # json writes NaN as NaN, as pandas does


def text_data(folder: Path, train_labels: list, test_labels: list) -> Path:
    write_jsonl(folder / "train.jsonl", [{"text": WORDS[i % 4], "label": v} for i, v in enumerate(train_labels)])
    write_jsonl(folder / "test.jsonl", [{"text": WORDS[i % 4], "label": v} for i, v in enumerate(test_labels)])
    return folder


def run_on(tmp_path: Path, *overrides: str) -> int:
    sets = [*TINY_OVERRIDES, *overrides]
    return main(["run", *[a for s in sets for a in ("--set", s)], "--output", str(tmp_path / "run")])


@pytest.mark.parametrize("train,test,mentions", [
    pytest.param([0, 1, 2, 3.5] * 6, [0, 1, 2, 1], "not class ids (e.g. 3.5 in row 4)", id="a-fraction"),
    pytest.param([0, 1, float("nan"), 2] * 6, [0, 1, 2, 1], "not class ids (e.g. nan in row 3)", id="a-nan"),
    pytest.param([0, 1, 2, 1] * 6, ["a", "b", "a", "b"], "class ids in the train split but class names in the test",
                 id="ids-in-train-names-in-test"),
    pytest.param([0, 1, 2, -1] * 6, [0, 1, 2, 1], "negative class ids", id="negative"),
])
def test_labels_whose_types_differ_within_or_across_splits_exit_2(tmp_path, capsys, train, test, mentions):
    folder = text_data(tmp_path / "data", train, test)
    assert run_on(tmp_path, f"data.path={folder}") == 2
    line = one_error_line(capsys)
    assert mentions in line and str(folder) in line
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


def test_test_classes_missing_from_training_are_named_in_a_warning(tmp_path, capsys):
    from ravan_ray.config import load_config
    from ravan_ray.federation import prepare_data

    folder = text_data(tmp_path / "data", ["card", "transfer"] * 12, ["card", "pin", "app", "transfer"])
    prepare_data(load_config(None, [*TINY_OVERRIDES, f"data.path={folder}", "data.partition.kind=iid"]))
    err = capsys.readouterr().err
    assert "2 classes of the test split" in err and "'app', 'pin'" in err


def test_a_model_directory_without_tokenizer_files_exits_2(tiny, tmp_path, capsys):
    model = tmp_path / "bert-config-only"
    model.mkdir()
    shutil.copy(tiny / "models" / "bert" / "config.json", model)
    assert run_on(tmp_path, f"model.name={model}", f"data.path={text_data(tmp_path / 'data', [0, 1] * 12, [0, 1])}") == 2
    assert "only its 5 special tokens, no vocabulary" in one_error_line(capsys)


def test_a_tokenizer_that_reads_most_words_as_unknown_exits_2(tiny, tmp_path, capsys):
    model = tmp_path / "bert-other-vocabulary"
    model.mkdir()
    shutil.copy(tiny / "models" / "bert" / "config.json", model)
    (model / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "bonjour", "merci"]))
    folder = text_data(tmp_path / "data", [0, 1] * 12, [0, 1])
    assert run_on(tmp_path, f"model.name={model}", f"data.path={folder}") == 2
    line = one_error_line(capsys)
    assert "reads 100% of the tokens" in line and str(folder) in line


def squad_rows(tiny: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (tiny / "data" / "squad" / f"{split}.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("shift", [3, -10_000, 100_000])
def test_qa_answers_not_at_their_offsets_exit_2(tiny, tmp_path, capsys, shift):
    folder = tmp_path / "squad"
    rows = squad_rows(tiny, "train")
    rows[5]["answers"]["answer_start"] = [rows[5]["answers"]["answer_start"][0] + shift]
    write_jsonl(folder / "train.jsonl", rows)
    write_jsonl(folder / "test.jsonl", squad_rows(tiny, "test"))
    assert run_on(tmp_path, "model.task=question_answering", f"model.name={tiny / 'models' / 'bert'}",
                  f"data.path={folder}", "data.max_length=32", "data.doc_stride=8", "data.max_train_samples=1000") == 2
    line = one_error_line(capsys)
    assert "1 answers of" in line and "(train split)" in line and "row 6" in line


# ------------------------------------------------------------------------- unreadable images
@pytest.mark.parametrize("damage", [
    pytest.param(lambda p: p.write_text("not an image"), id="text-named-png"),
    pytest.param(lambda p: p.write_bytes(p.read_bytes()[:60]), id="truncated"),
    pytest.param(lambda p: p.write_bytes(b""), id="empty"),
])
def test_an_image_that_does_not_decode_is_one_line_naming_the_file(tiny, tmp_path, capsys, damage):
    folder = tmp_path / "images"
    shutil.copytree(tiny / "data" / "images", folder)
    bad = sorted((folder / "train").glob("*/*.png"))[3]
    damage(bad)
    assert run_on(tmp_path, "model.task=image_classification", f"model.name={tiny / 'models' / 'vit'}",
                  f"data.path={folder}") == 2
    assert str(bad) in one_error_line(capsys)


# ------------------------------------------------------------------------- unreadable data files, with the row
@pytest.mark.parametrize("name,content,mentions", [
    pytest.param("train.jsonl", b'{"text": "a", "label": 0}\n{"text": "b", "label": 1\n{"text": "c", "label": 0}\n',
                 "line 2 is not JSON", id="jsonl-line-cut"),
    pytest.param("train.jsonl", b'{"text": "a", "label": 0}\n\n\nnot json\n', "line 4 is not JSON", id="jsonl-text-line"),
    pytest.param("train.csv", b"text,label\nhello,0\nbye,1\n\xff\xfeoops,1\n", "line 4 (byte 25) is not UTF-8",
                 id="csv-not-utf8"),
    pytest.param("train.csv", b"text,label\nhello,0\nbye,1,2\n", "line 3 has 3 cells, the header 2", id="csv-extra-cell"),
    pytest.param("train.json", b'[{"text": "a", "label": 0},\n {"text": "b" "label": 1}]', "not JSON at line 2",
                 id="json-broken"),
    pytest.param("train.parquet", b'{"text": "a", "label": 0}\n', "not a parquet file", id="json-named-parquet"),
])
def test_an_unreadable_data_file_is_one_line_naming_the_file_and_row(tmp_path, capsys, name, content, mentions):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / name).write_bytes(content)
    assert run_on(tmp_path, f"data.path={folder}") == 2
    line = one_error_line(capsys)
    assert str(folder / name) in line and mentions in line
    assert "An error occurred while generating the dataset" not in line
