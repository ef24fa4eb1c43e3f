"""Accuracy of methods across noise settings and seeds, run one after another on one Ray cluster.

Prints a markdown table (mean ± std over seeds of the best-validation model's test accuracy, plus the
CE baseline measured in the same run) and writes every run's metrics.json under ``--output``.

    python benchmarks/accuracy.py --dataset fashion-mnist --data-root ../shared/data/fashion-mnist \
        --methods ce,glc --noise flip:0.4 --seeds 0,1,2 --epochs 5 --output runs/bench-glc
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from raynoisy.config import load_config
from raynoisy.train.driver import train


def parse_noise(text: str) -> tuple[str, float]:
    kind, _, rate = text.rpartition(":")
    return kind, float(rate)


def run_grid(args: argparse.Namespace) -> dict[tuple[str, str], list[dict]]:
    results: dict[tuple[str, str], list[dict]] = {}
    for noise in args.noise:
        kind, rate = parse_noise(noise)
        for method in args.methods.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                out = Path(args.output) / f"{method}-{kind}{rate}-seed{seed}"
                done = out / "metrics.json"
                if done.exists():
                    metrics = json.loads(done.read_text())
                else:
                    flags = {
                        "data.root": args.data_root,
                        "noise.type": kind,
                        "noise.rate": rate,
                        "split.clean_per_class": args.clean_per_class,
                        "optim.epochs": args.epochs,
                        "run.seed": seed,
                        "run.output": str(out),
                        "scaling.workers": args.workers,
                    }
                    cfg = load_config(args.dataset, method, flags=flags, overrides=args.set)
                    metrics = train(cfg)
                results.setdefault((noise, method), []).append(metrics)
                print(
                    f"[bench] {method} {noise} seed {seed}: test {metrics['test_accuracy']:.4f}", flush=True
                )
    return results


def _label_quality(runs: list[dict]) -> str:
    """Corrected-label accuracy (given-label accuracy), or MW-Net's mean weight of clean / mislabelled."""
    lc = [
        r["label_correction"]
        for r in runs
        if r.get("label_correction", {}).get("corrected_label_accuracy") is not None
    ]
    if lc:
        c = statistics.mean(x["corrected_label_accuracy"] for x in lc)
        g = statistics.mean(x["given_label_accuracy"] for x in lc)
        return f"{c:.4f} ({g:.4f})"
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


def table(results: dict[tuple[str, str], list[dict]]) -> str:
    lines = [
        "| noise | method | test acc (mean ± std) | per seed | Δ vs ce "
        "| corrected-label acc (given-label acc) or mean weight clean / mislabelled |",
        "|---|---|---|---|---|---|",
    ]
    for (noise, method), runs in results.items():
        accs = [r["test_accuracy"] for r in runs]
        mean = statistics.mean(accs)
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        base = results.get((noise, "ce"))
        delta = f"{mean - statistics.mean(r['test_accuracy'] for r in base):+.4f}" if base else ""
        seeds = " / ".join(f"{a:.4f}" for a in accs)
        lines.append(
            f"| {noise} | {method} | {mean:.4f} ± {std:.4f} | {seeds} | {delta} | {_label_quality(runs)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--data-root")
    parser.add_argument("--methods", default="ce,glc")
    parser.add_argument("--noise", action="append", required=True, help="TYPE:RATE, repeatable")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--clean-per-class", type=int, default=100)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    results = run_grid(args)
    text = table(results)
    print(text)
    (Path(args.output) / "table.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
