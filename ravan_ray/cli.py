"""``ravan-ray run | resume | sweep | report | export | tiny``.

Bad input (config, data, model, resources, checkpoints) is reported as one line on stderr with exit
code 2, never a traceback; set RAVAN_DEBUG=1 to see the traceback anyway.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from ravan_ray.config import ConfigError, load_config

EXIT_USAGE = 2


def _run_dir(config, output: Optional[str]) -> Path:
    if output:
        return Path(output)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(config.output.dir) / f"{config.name}-{config.method.name}-{stamp}"


def cmd_run(args: argparse.Namespace) -> int:
    from ravan_ray.federation import run_federation
    from ravan_ray.privacy import build_mechanism

    config = load_config(args.config, args.set or ())
    check_paths(config)
    check_installed_trackers(config)
    build_mechanism(config).check_config()  # a method's refusal of the privacy setting, before anything loads
    if args.dry_run:
        print(f"config OK (no model or data loaded): task {config.model.task}, model {config.model.name}, "
              f"data {config.data.path or config.data.name}, method {config.method.name}, "
              f"{config.federation.num_clients} clients x {config.federation.rounds} rounds")
        return 0
    run_dir = _run_dir(config, args.output)
    require_directory(run_dir, "--output")
    if (run_dir / "metrics.csv").exists():
        raise ConfigError(f"{run_dir} already holds a run; use 'ravan-ray resume {run_dir}' or another --output")
    with _quiet_progress(args.quiet or args.json), _interruptible(run_dir):
        summary = run_federation(config, run_dir)
    _draw_curves(summary, run_dir)
    _print_summary(summary, run_dir, args)
    return 0


# What `resume --set` may change: where and how a run executes and where it logs, never what it computes.
RESUMABLE_SECTIONS = ("resources.", "output.")


def cmd_resume(args: argparse.Namespace) -> int:
    from ravan_ray.checkpoints import CheckpointError
    from ravan_ray.federation import run_federation

    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no config.yaml)")
    for text in args.set or ():
        key = text.split("=", 1)[0].strip()
        if not key.startswith(RESUMABLE_SECTIONS):
            raise ConfigError(f"resume --set {key}: a resumed run may change only resources.* and output.* keys "
                              f"(where and how it runs), not what it computes; start a new run for that")
    config = load_config(run_dir / "config.yaml", args.set or ())
    check_installed_trackers(config)
    with _quiet_progress(args.quiet or args.json), _interruptible(run_dir):
        summary = run_federation(config, run_dir, resume=True, from_round=args.from_round)
    _draw_curves(summary, run_dir)
    _print_summary(summary, run_dir, args)
    return 0


def check_installed_trackers(config) -> None:
    from ravan_ray.trackers import check_installed

    check_installed(config.output.trackers)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run: carries the run directory, for the line that says how to continue it."""

    def __init__(self, run_dir: Path):
        super().__init__(str(run_dir))
        self.run_dir = run_dir


@contextlib.contextmanager
def _interruptible(run_dir: Path):
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(run_dir) from None


def interrupted_line(interrupt: KeyboardInterrupt) -> str:
    run_dir = getattr(interrupt, "run_dir", None)
    if run_dir is None:
        return "ravan-ray: interrupted"
    from ravan_ray.checkpoints import latest_checkpoint

    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        return f"ravan-ray: interrupted before a round finished; nothing of {run_dir} to resume"
    return (f"ravan-ray: interrupted; {run_dir} keeps its rounds up to {int(checkpoint.name.removeprefix('round_'))}, "
            f"and 'ravan-ray resume {run_dir}' continues it")


def cmd_sweep(args: argparse.Namespace) -> int:
    from ravan_ray.cluster import total
    from ravan_ray.sweep import load_sweep_spec, run_sweep, trial_bundles
    from ravan_ray.trackers import check_installed

    if args.dry_run:
        spec = load_sweep_spec(args.tune_config, tuple(args.set or ()), tuple(args.only or ()))  # all checked here
        for config in spec.candidates:
            check_paths(config)
        check_installed(spec.candidates[0].output.trackers)  # the sweep tracks with its base config's trackers
        widest = max(spec.candidates, key=lambda c: len(trial_bundles(c, spec.driver_cpus)))
        need = total(trial_bundles(widest, spec.driver_cpus))
        base = spec.candidates[0]
        beyond = f" (and at most {spec.most_extensions()} beyond the grid's edges)" if spec.most_extensions() else ""
        stops = f", stopped early on {spec.stopping_metric()}" if spec.asha else ""
        print(f"tune config OK (no model or data loaded): sweep '{spec.name}', {spec.trials()} trials{beyond} of "
              f"task {base.model.task} on {base.model.name}, ranked by {spec.metric}{stops}; a trial reserves "
              + ", ".join(f"{v:g} {k}" for k, v in sorted(need.items())))
        return 0
    results_dir = run_sweep(args.tune_config, address=args.address, output=args.output, overrides=tuple(args.set or ()),
                            only=tuple(args.only or ()))
    print(f"sweep results: {results_dir}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ravan_ray.report import write_report

    if args.output:
        require_directory(Path(args.output), "--output")
    out = write_report([Path(d) for d in args.dirs], Path(args.output) if args.output else None,
                       select=tuple(args.select or ()), select_on=args.select_on, rows=tuple(args.rows or ()),
                       per_seed=args.per_seed, against=args.against)
    print(f"report written to {out}")
    return 0


def check_paths(config) -> None:
    """Local paths the config names must exist (hub ids are not looked up: that needs the network)."""
    from ravan_ray.data import DataError

    if config.data.path is not None and not Path(config.data.path).exists():
        raise DataError(f"data.path {config.data.path} does not exist")
    from ravan_ray.system import check_traces

    check_traces(config)
    name = config.model.name
    if name.startswith((".", "/", "~")) and not Path(name).expanduser().exists():
        raise ConfigError(f"model.name {name} looks like a local path but does not exist")


def require_directory(path: Path, what: str) -> None:
    """A path the command writes a directory at must not be an existing file (or under one)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                raise ConfigError(f"{what} {path}: {candidate} is a file, not a directory")
            return


def cmd_export(args: argparse.Namespace) -> int:
    from ravan_ray.export import export_run

    require_directory(Path(args.output), "--output")
    out = export_run(args.run_dir, args.output, args.format, args.round)
    print(f"exported the global model of {args.run_dir} ({args.format}) to {out}")
    return 0


def cmd_tiny(args: argparse.Namespace) -> int:
    from ravan_ray.tiny import write_tiny_assets

    require_directory(Path(args.dir), "tiny")
    out = write_tiny_assets(args.dir)
    print(f"tiny models (config only) in {out / 'models'} and datasets in {out / 'data'}")
    return 0


@contextlib.contextmanager
def _quiet_progress(quiet: bool):
    """--quiet / --json: no progress bar or per-round lines (TQDM_DISABLE is what the driver reads)."""
    saved = os.environ.get("TQDM_DISABLE")
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = saved


def _draw_curves(summary: dict, run_dir: Path) -> None:
    """RUN/curves.png, the run's own curves, for a person at the end of a run (unless the run drew it already
    for its experiment trackers; sweeps' trials draw it for theirs only)."""
    if summary["rounds"]:
        from ravan_ray.trackers import draw_curves

        draw_curves(run_dir)


def _print_summary(summary: dict, run_dir: Path, args: argparse.Namespace) -> None:
    """What a person wants to read at the end of a run (--json: summary.json for a script; --quiet: the run
    directory alone)."""
    if args.json:
        print(json.dumps(summary, indent=2, default=float))
        return
    if args.quiet:
        print(run_dir)
        return
    print(format_summary(summary, run_dir))


def format_summary(summary: dict, run_dir: Path) -> str:
    from ravan_ray.privacy import summary_line

    metric = summary.get("metric", "test_accuracy")
    lines = [f"{summary['method']} on {summary.get('task', 'text_classification')}: {summary['rounds']} rounds in "
             f"{_duration(summary['wall_s'])}"]
    finals = [k.removeprefix("final_") for k in summary if k.startswith("final_")]
    for name in sorted(finals, key=lambda m: m != metric):  # the primary metric first
        final, best = summary.get(f"final_{name}"), summary.get(f"best_{name}")
        if final is None:
            continue
        percent = not name.endswith(("loss", "perplexity"))
        shown = (lambda v: f"{100 * v:.1f} %") if percent else (lambda v: f"{v:.4g}")
        lines.append(f"  {name.replace('_', ' '):<16} final {shown(final):>9}   best {shown(best)}")
    lines.append(f"  {'traffic':<16} uplink {summary['total_uplink_bytes'] / 1e6:.2f} MB, "
                 f"downlink {summary['total_downlink_bytes'] / 1e6:.2f} MB")
    privacy = summary_line(summary)
    if privacy is not None:
        lines.append(f"  {'privacy':<16} {privacy}")
    faults = {k: summary.get(k) for k in ("failed_clients", "dropped_clients", "rejected_uploads") if summary.get(k)}
    if faults:
        lines.append(f"  {'faults':<16} " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in faults.items()))
    lines.append(f"  {'run directory':<16} {run_dir}")
    if (run_dir / "curves.png").is_file():
        lines.append(f"  {'curves':<16} {run_dir / 'curves.png'}")
    lines.append(f"next: ravan-ray report {run_dir}    (tables and plots; give several run directories to compare)")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


def _output_choices(parser: argparse.ArgumentParser) -> None:
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument("--quiet", action="store_true", help="no progress; print only the run directory at the end")
    shown.add_argument("--json", action="store_true", help="no progress; print summary.json at the end (for scripts)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ravan-ray", description="Federated multi-head LoRA (Ravan) on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one federated experiment (no CONFIG: the embedded offline default)")
    run.add_argument("config", nargs="?", help="YAML config; omitted keys keep their defaults")
    run.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help="override a config key (repeatable)")
    run.add_argument("--output", help="run directory (default: output.dir/NAME-METHOD-TIMESTAMP)")
    run.add_argument("--dry-run", action="store_true", help="check the config and paths, load nothing, run nothing")
    _output_choices(run)
    run.set_defaults(func=cmd_run)

    resume = sub.add_parser("resume", help="continue an interrupted run from its last checkpoint")
    resume.add_argument("run_dir")
    resume.add_argument("--set", action="append", metavar="KEY.PATH=VALUE",
                        help="change where and how the run executes (resources.* and output.* keys only, repeatable), "
                             "e.g. resources.address=ray://HEAD:10001 or resources.pool_size=2")
    resume.add_argument("--from-round", type=int, metavar="N",
                        help="continue from round N's checkpoint instead of the last one (the later checkpoints "
                             "are discarded and their rounds played again), e.g. when the last one is damaged")
    _output_choices(resume)
    resume.set_defaults(func=cmd_resume)

    sweep = sub.add_parser("sweep", help="Ray Tune sweep over config keys (see tune_configs/)")
    sweep.add_argument("tune_config")
    sweep.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    sweep.add_argument("--output", help="sweep directory (default: from the tune config)")
    sweep.add_argument("--set", action="append", metavar="KEY.PATH=VALUE",
                       help="override a key of the tune config's base run config (repeatable), e.g. data.path=DIR")
    sweep.add_argument("--only", action="append", metavar="KEY=VALUES",
                       help="run a part of the search space: the grid of KEY cut to VALUES (one or a YAML list), "
                            "e.g. --only seed=0; parts run apart are reported together (repeatable)")
    sweep.add_argument("--dry-run", action="store_true",
                       help="check every key and search-space value offline, load no model or data, start no Ray")
    sweep.set_defaults(func=cmd_sweep)

    report = sub.add_parser("report", help="tables and plots from run and sweep directories")
    report.add_argument("dirs", nargs="+")
    report.add_argument("--output", help="report directory (default: DIR/report for one DIR, ./report otherwise)")
    report.add_argument("--select", action="append", metavar="KEY",
                        help="a config key tuned on the validation split (repeatable), e.g. optimizer.lr: per "
                             "configuration of the other keys, report the value with the best validation metric")
    report.add_argument("--select-on", choices=["final", "best"], default="final",
                        help="rank by the final round's validation metric (default), or by the best round's and "
                             "report the test metric of that round")
    report.add_argument("--per-seed", action="store_true",
                        help="with --select: choose in every seed on that seed's validation metric alone (the "
                             "protocol repeated per seed) instead of on the mean over seeds")
    report.add_argument("--rows", action="append", metavar="KEY",
                        help="with --select: the keys that form the selected table's rows (repeatable; default "
                             "method.name), e.g. --rows method.name --rows method.scoring")
    report.add_argument("--against", metavar="ROW",
                        help="with --select: pair every row with this one, labelled as in the selected table's "
                             "first column (e.g. ravan, or 'ravan / normal' with --rows method.name --rows "
                             "method.init), instead of with each column's best row")
    report.set_defaults(func=cmd_report)

    export = sub.add_parser("export", help="write a run's global model for use outside the platform: a PEFT LoRA "
                                           "directory or the model with the update merged into its weights")
    export.add_argument("run_dir")
    export.add_argument("--round", type=int, metavar="N", help="the global model after round N (a checkpoint the "
                                                                 "run kept; default: its last checkpoint)")
    # a plain option, not argparse choices: an unknown format is then the platform's one line with exit code 2
    export.add_argument("--format", required=True, metavar="peft|merged",
                        help="peft: a LoRA adapter for peft.PeftModel.from_pretrained; merged: the whole model with "
                             "the update merged, for AutoModelFor...from_pretrained")
    export.add_argument("--output", required=True, help="the directory to write (new or empty)")
    export.set_defaults(func=cmd_export)

    tiny = sub.add_parser("tiny", help="write tiny models (config only) and small datasets for every task, to try "
                                       "the tasks without hub access")
    tiny.add_argument("dir")
    tiny.set_defaults(func=cmd_tiny)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt as interrupt:
        print(interrupted_line(interrupt), file=sys.stderr)
        return 130
    except Exception as error:
        message = None if os.environ.get("RAVAN_DEBUG") else error_line(error)
        if message is None:
            raise
        print(f"ravan-ray: error: {message}", file=sys.stderr)
        return EXIT_USAGE


def error_line(error: Exception) -> Optional[str]:
    """The one line a user reads for an error: every user-facing error class derives from ValueError, and an error
    raised inside an actor or task comes back from Ray, whatever its name (the remote traceback shrinks to its
    exception's message). None: a bug here, whose traceback is worth showing."""
    ray = sys.modules.get("ray")
    if ray is not None and isinstance(error, ray.exceptions.RayError):
        from ravan_ray.cluster import remote_error_line

        return remote_error_line(error)
    if isinstance(error, OSError) and error.filename is not None:  # an unwritable --output, a vanished file
        return f"{error.filename}: {error.strerror or type(error).__name__}"
    if isinstance(error, (ValueError, OSError)):
        return " ".join(str(error).split()) or type(error).__name__
    return None


if __name__ == "__main__":
    sys.exit(main())
