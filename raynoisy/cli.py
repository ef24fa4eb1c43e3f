"""``raynoisy train | sweep | shard | noise | report``: the command line.

Bad input exits with code 2 and one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from raynoisy.errors import RaynoisyError

# CLI flag -> dotted config path.
_FLAG_FIELDS = {
    "data_root": "data.root",
    "noise": "noise.type",
    "noise_rate": "noise.rate",
    "clean_per_class": "split.clean_per_class",
    "train_subset": "split.train_subset",
    "epochs": "optim.epochs",
    "batch_size": "optim.batch_size",
    "lr": "optim.lr",
    "seed": "run.seed",
    "workers": "scaling.workers",
    "gpus_per_worker": "scaling.gpus_per_worker",
    "precision": "scaling.precision",
    "output": "run.output",
}


def add_run_arguments(
    parser: argparse.ArgumentParser, *, dataset: str | None = None, method: str | None = None
) -> None:
    """The flags of a training run; ``dataset``/``method`` fix a default (as the job scripts do)."""
    parser.add_argument("--dataset", default=dataset, required=dataset is None, help="data source name")
    parser.add_argument("--data-root", help="folder (or file) of the data set; omit for embedded data")
    parser.add_argument("--method", default=method, required=method is None, help="noisy-label method")
    parser.add_argument("--noise", help="none|uniform|symmetric|flip|pair|matrix:PATH")
    parser.add_argument("--noise-rate", type=float)
    parser.add_argument("--clean-per-class", type=int, help="trusted samples per class")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int, help="global batch size, split over workers")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--workers", type=int, help="Ray Train workers (one per GPU or CPU slot)")
    parser.add_argument("--gpus-per-worker", type=float)
    parser.add_argument("--precision", help="fp32 (default) or bf16-mixed (bfloat16 autocast)")
    parser.add_argument(
        "--train-subset", type=int, help="seeded, class-balanced subset of the noisy train set"
    )
    parser.add_argument("--output", help="run directory for metrics.json, labels.parquet, model.pt")
    parser.add_argument("--config", help="YAML file layered over the preset")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override any field"
    )


def config_from_args(args: argparse.Namespace):
    """The run's config from parsed flags, checked whole (raises ConfigError before Ray starts)."""
    from raynoisy.train.preflight import resolve_config

    flags = {path: getattr(args, name, None) for name, path in _FLAG_FIELDS.items()}
    return resolve_config(args.dataset, args.method, config_file=args.config, flags=flags, overrides=args.set)


def _train(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)  # before the driver import, which loads Ray Train (seconds): fail fast
    from raynoisy.report import report_finished_run
    from raynoisy.train.driver import train

    metrics = train(cfg)
    report_finished_run(Path(cfg.run.output).expanduser())
    print(f"test accuracy: {metrics['test_accuracy']:.4f}")
    return 0


# Sweep flag -> dotted config path: the run flags a sweep passes to every trial.
_SWEEP_FLAGS = {
    name: path for name, path in _FLAG_FIELDS.items() if name not in ("noise", "noise_rate", "seed", "output")
}


def _sweep(args: argparse.Namespace) -> int:
    # Every trial's config is checked before the runner's import, which loads Ray Tune and Train: fail fast.
    from raynoisy.tune.plan import parse_methods, plan_sweep

    plan = plan_sweep(
        dataset=args.dataset,
        methods=parse_methods(args.methods),
        noise=args.noise,
        rates=args.rates,
        seeds=args.seeds,
        output=args.output,
        flags={path: getattr(args, name, None) for name, path in _SWEEP_FLAGS.items()},
        config_file=args.config,
        overrides=args.set,
    )
    from raynoisy.report import write_sweep_report
    from raynoisy.tune.runner import run_sweep

    outcome = run_sweep(plan)
    print(f"results: {write_sweep_report(plan.output)}")
    print(
        f"trials: {len(outcome.skipped)} finished before, {len(outcome.ran)} run now, "
        f"{len(outcome.failed)} failed"
    )
    return 0


def _rates(text: str) -> list[float]:
    try:
        return [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of rates") from None


def _add_sweep_arguments(
    parser: argparse.ArgumentParser,
    *,
    dataset: str | None = None,
    methods: str | None = None,
    noise: str | None = None,
    rates: str | None = None,
    output: str | None = None,
) -> None:
    """The flags of a sweep; the keyword arguments fix a default (as jobs/sweep.py does)."""
    parser.add_argument("--dataset", default=dataset, required=dataset is None, help="data source name")
    parser.add_argument("--data-root", help="folder (or file) of the data set; omit for embedded data")
    parser.add_argument(
        "--methods",
        default=methods,
        required=methods is None,
        help="comma-separated methods, e.g. ce,glc,mlc",
    )
    parser.add_argument(
        "--noise", default=noise, required=noise is None, help="uniform|symmetric|flip|pair|matrix:PATH"
    )
    parser.add_argument(
        "--rates",
        default=rates,
        required=rates is None,
        type=_rates,
        help="comma-separated noise rates in [0, 1]",
    )
    parser.add_argument("--seeds", type=int, default=1, help="seeds per cell: 0, 1, ..., N-1")
    parser.add_argument("--clean-per-class", type=int, help="trusted samples per class")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int, help="global batch size, split over workers")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--workers", type=int, help="Ray Train workers per trial")
    parser.add_argument("--gpus-per-worker", type=float)
    parser.add_argument("--precision", help="fp32 (default) or bf16-mixed (bfloat16 autocast)")
    parser.add_argument(
        "--train-subset", type=int, help="seeded, class-balanced subset of the noisy train set"
    )
    parser.add_argument(
        "--output",
        default=output,
        required=output is None,
        help="sweep folder: results.*, runs/<trial>/, shards/",
    )
    parser.add_argument("--config", help="YAML file layered over every trial's preset")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override for every trial"
    )


def train_job(
    argv: Sequence[str] | None = None,
    *,
    description: str,
    dataset: str,
    method: str = "ce",
    output: str,
    defaults: Mapping[str, object] | None = None,
) -> int:
    """The body of a ``jobs/*.py`` script: ``raynoisy train`` with the job's data set and defaults.

    ``defaults`` gives other flags a default (e.g. ``{"noise": "flip", "noise_rate": 0.4}``); like any
    named flag they win over ``--config``, so a job's --help must name them."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_arguments(parser, dataset=dataset, method=method)
    parser.set_defaults(output=output, fn=_train, **(defaults or {}))
    return run(argv, parser)


def sweep_job(
    argv: Sequence[str] | None = None,
    *,
    description: str,
    dataset: str,
    methods: str,
    noise: str,
    rates: str,
    output: str,
) -> int:
    """The body of ``jobs/sweep.py``: ``raynoisy sweep`` with the job's grid as defaults."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _add_sweep_arguments(parser, dataset=dataset, methods=methods, noise=noise, rates=rates, output=output)
    parser.set_defaults(fn=_sweep)
    return run(argv, parser)


def _shard(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq

    from raynoisy.config import absolute_path
    from raynoisy.train.prepare import prepare

    if args.output is None:
        args.output = args.shard_root or "."
    cfg = config_from_args(args)
    if args.shard_root:
        cfg.data.shard_root = absolute_path(args.shard_root, "--shard-root")
    prepared = prepare(cfg)
    out = Path(cfg.run.output).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(prepared.labels_table(), out / "labels.parquet")
    print(
        json.dumps(
            {
                "shards": prepared.shards.uri,
                "counts": prepared.shards.manifest["counts"],
                "noise": prepared.plan.noise.to_dict(),
            },
            indent=1,
        )
    )
    return 0


def _noise(args: argparse.Namespace) -> int:
    from raynoisy.data.plan import plan_labels
    from raynoisy.data.sources import load_catalog, resolve_root

    args.output = args.output or "."
    cfg = config_from_args(args)
    catalog = load_catalog(cfg.data.dataset, resolve_root(cfg), cfg.data.options)
    report = plan_labels(catalog, cfg).noise.to_dict()
    print(json.dumps(report, indent=1))
    return 0


def _report(args: argparse.Namespace) -> int:
    from raynoisy.report import is_sweep_dir, write_run_report, write_sweep_report

    if is_sweep_dir(args.run_dir):
        print(f"results: {write_sweep_report(args.run_dir)}")
    else:
        print(f"report: {write_run_report(args.run_dir)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raynoisy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    commands: dict[str, tuple[str, Callable[[argparse.Namespace], int]]] = {
        "train": ("train a method on a data set with Ray Train", _train),
        "shard": ("write a data set (split + noise) as Parquet shards with a manifest", _shard),
        "noise": ("report the actual noise rate and transition matrix a config produces", _noise),
    }
    for name, (help_text, fn) in commands.items():
        p = sub.add_parser(name, help=help_text)
        add_run_arguments(p, method="ce" if name != "train" else None)
        if name == "shard":
            p.add_argument("--shard-root", help="local path or s3:// / gs:// URI for the shards")
        p.set_defaults(fn=fn)
    sweep = sub.add_parser(
        "sweep", help="a Ray Tune grid of methods x noise rates x seeds; results.csv/.md, accuracy plot"
    )
    _add_sweep_arguments(sweep)
    sweep.set_defaults(fn=_sweep)
    report = sub.add_parser(
        "report",
        help="write RUN_DIR/report.md (plots of curves, noise, label issues) from a finished run, or a "
        "sweep's results.csv, results.md and accuracy_vs_noise.png",
    )
    report.add_argument("run_dir", metavar="DIR", help="the --output folder of a finished run or of a sweep")
    report.set_defaults(fn=_report)
    return parser


def run(argv: Sequence[str] | None, parser: argparse.ArgumentParser | None = None) -> int:
    """Parse and run; user errors become one line on stderr and exit code 2."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except RaynoisyError as exc:
        # One line even when a value or key in the message holds a newline: control characters escaped.
        message = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(exc))
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run(argv))
