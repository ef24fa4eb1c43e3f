r"""Accuracy of methods across noise settings and seeds, run one after another on one Ray cluster.

Prints a markdown table, one row per (noise, method, variant): mean ± std over seeds of the test accuracy
of the best-validation epoch's model and of the last epoch's model, the CE baseline measured in the same
grid, and the method's label quality; writes every run's outputs under ``--output`` and the table to
``--output``/table.md.

    python benchmarks/accuracy.py --dataset fashion-mnist --data-root ../shared/data/fashion-mnist \
        --methods ce,glc --noise flip:0.4 --seeds 0,1,2 --epochs 5 --output runs/bench-glc

Variants: ``--variant NAME:KEY=VALUE [KEY=VALUE ...]`` (repeatable; repeating a NAME adds overrides to it)
defines a named group of config overrides. Each variant is a row of its own, labelled with its NAME in the
table's ``variant`` column. A ``--methods`` entry ``METHOD@NAME`` runs METHOD with variant NAME only;
``METHOD@`` runs it with no variant; a plain ``METHOD`` runs it once per defined variant, or once with no
variant when none is defined. ``--set KEY=VALUE`` applies to every row; a variant's overrides come after
it (the variant wins). E.g. MLC as preset and with its Clothing1M settings, against a plain CE baseline:

    python benchmarks/accuracy.py --data-root ../shared/data/fashion-mnist --methods ce@,mlc \
        --variant "plain:" --variant "skip:method.params.skip=true method.params.meta_lr=3e-3" \
        --noise flip:0.4 --seeds 0,1,2 --epochs 5 --set scaling.cpus_per_worker=1 --output runs/bench-mlc

Caching: each run's directory is ``METHOD-NOISE-seedSEED-HASH``, HASH a digest of the run's whole resolved
config (``Config.to_dict()``, method params as named) less the fields that do not change results
(``raynoisy.tune.plan``'s ``IGNORED_FIELDS``, shared with ``raynoisy sweep``: output paths, run name,
logging, checkpoint retention, the CPUs a worker reserves). A run is reused only when its ``metrics.json``
exists and the ``config.json`` the driver wrote next to it equals the config this command would run, up to
those fields and with every method param's default filled in (``result_config``: the driver records them,
so a run trained before a default changed or a param was added is not taken for one under this code's
defaults); otherwise it is
trained again (a mismatched ``metrics.json`` is first moved aside to metrics.stale.json).
All configs are built and validated before the first run starts.

``--in-process``: train each run with ``raynoisy.train.in_process.train_in_process`` instead of through Ray
Train. It runs the same method classes with the same config, label plan (catalog, noise, trusted / val /
test splits, subset) and best-validation model selection, in this process: no Ray start (a minute or more
per run) and no Ray Data pipeline decoding images beside the training step (about half of an epoch on two
cores). Fashion-MNIST, 8,000 training images, 20 epochs of ce on two cores: 3 minutes instead of 7; two
grids side by side (one torch thread each) run at about 90% of that pace each.
What differs: one worker on the CPU, the whole training set reshuffled each epoch instead of Ray Data's
file, block and buffer shuffles; that module's docstring lists the rest. Its run
directories end in ``-inproc``, so that a cached Ray run and an in-process run of the same config are never
taken for one another. With ``--diagnose`` each epoch's history also scores the method's view of the
training labels against the true ones (``diag_*``: corrected-label accuracy and its agreement with the
main model's predictions, or MW-Net's mean weight of clean and mislabelled samples).

``--part I/N``: train only runs I, I+N, I+2N, ... of the grid (0-based) and print no table, so that N
processes share a grid (one per core); the same command without ``--part`` then reuses every cached run
and prints the table.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from raynoisy.config import Config, parse_set_override
from raynoisy.errors import ConfigError
from raynoisy.methods.meta_common import FROM_MODEL
from raynoisy.train.driver import train
from raynoisy.train.in_process import check_in_process, train_in_process
from raynoisy.train.preflight import resolve_config
from raynoisy.tune.plan import config_hash, result_config

NO_VARIANT = ""
IN_PROCESS_SUFFIX = "-inproc"
_VARIANT_NAME = re.compile(r"[^\s,@:]+")


def parse_noise(text: str) -> tuple[str, float]:
    kind, _, rate = text.rpartition(":")
    return kind, float(rate)


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``NAME:KEY=VALUE [KEY=VALUE ...]`` -> (NAME, ["KEY=VALUE", ...]); the overrides are shell-split."""
    name, _, rest = text.partition(":")
    name = name.strip()
    if not _VARIANT_NAME.fullmatch(name):
        raise argparse.ArgumentTypeError(
            f"{text!r}: a variant is NAME:KEY=VALUE [KEY=VALUE ...], NAME without spaces, ',', '@' or ':'"
        )
    try:
        overrides = shlex.split(rest)
        for item in overrides:
            parse_set_override(item)
    except (ValueError, ConfigError) as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
    return name, overrides


def collect_variants(pairs: list[tuple[str, list[str]]]) -> dict[str, list[str]]:
    variants: dict[str, list[str]] = {}
    for name, overrides in pairs:
        variants.setdefault(name, []).extend(overrides)
    return variants


def parse_rows(methods: str, variants: dict[str, list[str]]) -> list[tuple[str, str]]:
    """The table's (method, variant) rows, in the order given; see the module docstring for the syntax."""
    rows: list[tuple[str, str]] = []
    for entry in (e.strip() for e in methods.split(",")):
        if not entry:
            continue
        method, at, name = entry.partition("@")
        if at:
            if name and name not in variants:
                raise ValueError(f"--methods {entry}: no --variant named {name!r}")
            wanted = [(method, name)]
        else:
            wanted = [(method, v) for v in variants] or [(method, NO_VARIANT)]
        rows.extend(r for r in wanted if r not in rows)
    unused = [v for v in variants if all(v != r[1] for r in rows)]
    if unused:
        raise ValueError(f"--variant {', '.join(unused)} is used by no --methods entry (write METHOD@NAME)")
    if not rows:
        raise ValueError("--methods names no method")
    return rows


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_diff(old: dict, new: dict) -> str:
    a, b = _flatten(result_config(old)), _flatten(result_config(new))
    missing = object()
    changed = [
        f"{k} {a.get(k, missing)!r} -> {b.get(k, missing)!r}".replace(repr(missing), "(absent)")
        for k in sorted(a.keys() | b.keys())
        if a.get(k, missing) != b.get(k, missing)
    ]
    return "; ".join(changed)


@dataclass
class Run:
    noise: str
    method: str
    variant: str
    seed: int
    cfg: Config

    @property
    def output(self) -> Path:
        return Path(self.cfg.run.output)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def plan_runs(args: argparse.Namespace) -> list[Run]:
    """Every run of the grid with its resolved config and output directory, validated before any trains."""
    variants = collect_variants(args.variant)
    rows = parse_rows(args.methods, variants)
    data_root = args.data_root
    if data_root is not None and "://" not in data_root:
        data_root = str(Path(data_root).expanduser().resolve())
    runs = []
    for noise in args.noise:
        kind, rate = parse_noise(noise)
        for method, variant in rows:
            for seed in (int(s) for s in args.seeds.split(",")):
                flags = {
                    "data.root": data_root,
                    "noise.type": kind,
                    "noise.rate": rate,
                    "split.clean_per_class": args.clean_per_class,
                    "optim.epochs": args.epochs,
                    "run.seed": seed,
                    "run.output": args.output,  # replaced below, once the config's hash is known
                    "scaling.workers": args.workers,
                }
                overrides = [*args.set, *variants.get(variant, [])]
                # Checked whole (data set, model, method params, ...), so that a bad row fails here.
                cfg = resolve_config(args.dataset, method, flags=flags, overrides=overrides)
                if args.in_process:
                    check_in_process(cfg)
                name = f"{_slug(method)}-{_slug(kind)}{rate}-seed{cfg.run.seed}-{config_hash(cfg.to_dict())}"
                name += IN_PROCESS_SUFFIX if args.in_process else ""
                cfg.run.output = str(Path(args.output) / name)
                runs.append(Run(noise, method, variant, seed, cfg))
    return runs


def cached_metrics(run: Run) -> dict | None:
    """The run's metrics.json if its config.json matches the run's config; None (stale moved aside) if not."""
    metrics, saved = run.output / "metrics.json", run.output / "config.json"
    if not metrics.exists():
        return None
    if saved.exists():
        old = json.loads(saved.read_text())
        if result_config(old) == result_config(run.cfg.to_dict()):
            return json.loads(metrics.read_text())
        why = config_diff(old, run.cfg.to_dict())
    else:
        why = "no config.json"
    metrics.replace(run.output / "metrics.stale.json")
    print(f"[bench] stale cached run in {run.output} ({why}): running it again", flush=True)
    return None


def run_grid(
    args: argparse.Namespace, runs: list[Run] | None = None
) -> dict[tuple[str, str, str], list[dict]]:
    """(noise, method, variant) -> the metrics of each seed, training only the runs not cached."""
    results: dict[tuple[str, str, str], list[dict]] = {}
    trainer = partial(train_in_process, diagnose=args.diagnose) if args.in_process else train
    runs = plan_runs(args) if runs is None else runs
    index, count = args.part
    for run in runs[index::count]:
        metrics = cached_metrics(run)
        reused = metrics is not None
        if metrics is None:
            metrics = trainer(run.cfg)
        results.setdefault((run.noise, run.method, run.variant), []).append(metrics)
        label = f"{run.method}@{run.variant}" if run.variant else run.method
        print(
            f"[bench] {label} {run.noise} seed {run.seed}: test {metrics['test_accuracy']:.4f} "
            f"({'reused' if reused else 'trained'} {run.output.name})",
            flush=True,
        )
    return results


def _label_quality(runs: list[dict]) -> str:
    """Corrected-label accuracy (given-label accuracy), or MW-Net's mean weight of clean / mislabelled."""
    scored = [r for r in runs if r.get("label_correction", {}).get("corrected_label_accuracy") is not None]
    lc = [r["label_correction"] for r in scored]
    if lc:
        c = statistics.mean(x["corrected_label_accuracy"] for x in lc)
        g = statistics.mean(x["given_label_accuracy"] for x in lc)
        from_model = [r for r in scored if r["label_correction"].get("source") == FROM_MODEL]
        if not from_model:
            return f"{c:.4f} ({g:.4f})"
        # The guard rejected the meta network's labels at the end of these runs: the exported ones are the
        # model's (confident learning); the meta network's own last labels in those runs, where --diagnose
        # scored them.
        own = [
            h[-1]["diag_corrected_accuracy"]
            for r in from_model
            if (h := r.get("history")) and "diag_corrected_accuracy" in h[-1]
        ]
        meta = (
            f"; the meta network's own in those runs {statistics.mean(own):.4f}"
            if len(own) == len(from_model)
            else ""
        )
        return f"{c:.4f} ({g:.4f}), from the model in {len(from_model)} of {len(lc)} runs{meta}"
    sw = [
        r["sample_weights"]
        for r in runs
        if r.get("sample_weights", {}).get("mean_weight_mislabelled") is not None
    ]
    if sw:
        clean = statistics.mean(x["mean_weight_clean"] for x in sw)
        wrong = statistics.mean(x["mean_weight_mislabelled"] for x in sw)
        return f"weights {clean:.2f} / {wrong:.2f}"
    return ""


def _mean_std(values: list[float]) -> str:
    if not values:
        return ""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {std:.4f}"


def _guard(runs: list[dict]) -> str:
    """Epochs the collapse guard fired in, per seed, and of them the epochs it undid (``guard_rollback``);
    flags a run whose corrected labels end less accurate than the given ones while the guard never fired
    (a collapse it missed)."""
    guards = [r.get("collapse_guard") for r in runs]
    if all(g is None for g in guards):
        return ""

    def seed(g: dict | None) -> str:
        if g is None or not g["enabled"]:
            return "off"
        undone = len(g.get("rolled_back_epochs", []))  # absent from runs before guard_rollback existed
        return f"{len(g['fired_epochs'])}" + (f" ({undone} undone)" if undone else "")

    text = " / ".join(seed(g) for g in guards)
    missed = sum(
        1
        for r, g in zip(runs, guards, strict=True)
        if (lc := r.get("label_correction", {})).get("corrected_label_accuracy") is not None
        and lc["corrected_label_accuracy"] < lc["given_label_accuracy"]
        and not (g and g["fired_epochs"])
    )
    return text + (f" — {missed} run(s) with worse corrected labels and a silent guard" if missed else "")


def table(results: dict[tuple[str, str, str], list[dict]]) -> str:
    """Δ vs ce: against ce of the same noise and variant, else the ce row of that noise without a variant."""
    lines = [
        "| noise | method | variant | test acc, best-val epoch (mean ± std) | per seed "
        "| test acc, last epoch (mean ± std) | Δ vs ce "
        "| corrected-label acc (given-label acc) or mean weight clean / mislabelled "
        "| collapse guard: epochs fired per seed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (noise, method, variant), runs in results.items():
        accs = [r["test_accuracy"] for r in runs]
        last = [r["final_test_accuracy"] for r in runs if r.get("final_test_accuracy") is not None]
        base = results.get((noise, "ce", variant)) or results.get((noise, "ce", NO_VARIANT))
        delta = (
            f"{statistics.mean(accs) - statistics.mean(r['test_accuracy'] for r in base):+.4f}"
            if base
            else ""
        )
        seeds = " / ".join(f"{a:.4f}" for a in accs)
        lines.append(
            f"| {noise} | {method} | {variant} | {_mean_std(accs)} | {seeds} | "
            f"{_mean_std(last) if len(last) == len(accs) else ''} | {delta} | {_label_quality(runs)} "
            f"| {_guard(runs)} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--data-root")
    parser.add_argument(
        "--methods", default="ce,glc", help="comma-separated METHOD, METHOD@VARIANT or METHOD@ (no variant)"
    )
    parser.add_argument("--noise", action="append", required=True, help="TYPE:RATE, repeatable")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--clean-per-class", type=int, default=100)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override for every row, repeatable"
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        type=parse_variant,
        metavar="NAME:KEY=VALUE [KEY=VALUE ...]",
        help="a named group of overrides, one table row per method using it; repeatable",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="train in this process without Ray (same methods, data plan and selection; see above)",
    )
    parser.add_argument(
        "--diagnose", action="store_true", help="with --in-process: per-epoch label quality in history"
    )
    parser.add_argument(
        "--part", type=parse_part, default=(0, 1), metavar="I/N", help="train every N-th run from run I only"
    )
    parser.add_argument("--output", required=True)
    return parser


def parse_part(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write I/N, e.g. 0/2") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"{text!r}: I must be in [0, N)")
    return i, n


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        runs = plan_runs(args)
    except (ValueError, ConfigError) as exc:
        parser.error(str(exc))
    if args.diagnose and not args.in_process:
        parser.error("--diagnose needs --in-process")
    results = run_grid(args, runs)
    if args.part != (0, 1):
        print(f"[bench] part {args.part[0]}/{args.part[1]} done", flush=True)
        return
    text = table(results)
    print(text)
    Path(args.output).mkdir(parents=True, exist_ok=True)
    (Path(args.output) / "table.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
