r"""Every preset of the chosen methods, run through the real command line with several Ray Train workers.

For each (data set, method) that has a preset under ``raynoisy/configs/``, runs
``raynoisy train --dataset D --method M --workers W`` as a user would (a subprocess, its own Ray cluster)
with a short budget, and prints one markdown row per run: exit code, wall seconds, epochs done,
best-validation and last-epoch test accuracy, and the label-correction figures where the method has them.
Its purpose is that every preset path (source, transform, model, method, services) works distributed, not
accuracy: the budget is cut to a few epochs on a subset.

    python benchmarks/cli_runs.py --methods mixnn,mlnt --workers 2 \
        --fashion-mnist-root ../shared/data/fashion-mnist --output runs/cli-runs

Data: ``digits`` ships with scikit-learn and ``clothing1m`` runs on its generated miniature; Fashion-MNIST
needs ``--fashion-mnist-root`` (skipped without it). CIFAR-100 and ``image-list`` cannot be downloaded here,
so the script writes a small stand-in in their exact formats (the CIFAR-100 python pickle; a labels.csv of
PNG paths) whose classes are colour/position patterns: it proves the preset runs, not what it reaches.
"""

from __future__ import annotations

import argparse
import json
import pickle
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from raynoisy.config import presets_dir

# Per data set: the cut-down budget (flags and overrides) that keeps a run to a minute or two on a CPU.
BUDGET = {
    "digits": ["--epochs", "3"],
    "fashion-mnist": ["--epochs", "2", "--train-subset", "3000"],
    "clothing1m": ["--epochs", "2"],
    "cifar100": ["--epochs", "2", "--clean-per-class", "0", "--set", "model.name=small-cnn"],
    # The image-list stand-in's split column holds out validation and test: no val_per_class draw.
    "image-list": [
        "--epochs",
        "2",
        "--set",
        "data.image_size=32",
        "--set",
        "model.name=small-cnn",
        "--set",
        "split.val_per_class=null",
        "--set",
        "data.options.split_column=split",
    ],
}
# Per (data set, method): a budget in place of the data set's, where the preset's step alone would take an
# hour here. Clothing1M's MLNT preset is 3 rounds of 1 epoch at M = 10, second order (~35 s a step on the
# miniature's ResNet-18 with 2 workers on 2 cores): its epoch stays 1 (BUDGET's 2 would double every round)
# and the step is M = 2, first order; the 3 rounds, mentor hand-offs and round stages run as the preset has.
METHOD_BUDGET = {
    ("clothing1m", "mlnt"): [
        "--epochs", "1",
        "--set", "method.params.synthetic_sets=2",
        "--set", "method.params.second_order=false",
    ],
}  # fmt: skip
# Per method: the schedule knobs that make its distinctive phase start inside that budget.
PHASE = {
    "mixnn": ["--set", "method.params.warmup_epochs=1", "--set", "method.params.mixup_epochs=1"],
    "mlnt": ["--set", "method.params.start_iter=2", "--set", "method.params.mid_iter=6"],
}
CIFAR100_PER_CLASS = (30, 5)  # train, test images per class of the stand-in
IMAGE_LIST_PER_CLASS = 30
IMAGE_LIST_CLASSES = 4


@dataclass
class Row:
    dataset: str
    method: str
    rc: int
    seconds: float
    metrics: dict | None
    data: str

    def cells(self) -> list[str]:
        m = self.metrics or {}
        history = m.get("history", [])
        lc = m.get("label_correction") or {}
        corrected = (
            f"{lc['corrected_label_accuracy']:.4f} ({lc['given_label_accuracy']:.4f})"
            if "corrected_label_accuracy" in lc
            else ""
        )
        return [
            self.dataset,
            self.method,
            self.data,
            str(self.rc),
            f"{self.seconds:.0f}",
            str(len(history)),
            _fmt(m.get("test_accuracy")),
            _fmt(m.get("final_test_accuracy")),
            corrected,
        ]


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def write_cifar100_standin(root: Path, seed: int = 0) -> Path:
    """CIFAR-100's python-pickle layout (train/test/meta) with 100 colour-by-class 32x32 classes."""
    folder = root / "cifar-100-python"
    if (folder / "meta").exists():
        return root
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, size=(100, 3))
    for name, per_class in zip(("train", "test"), CIFAR100_PER_CLASS, strict=True):
        labels = np.repeat(np.arange(100), per_class)
        pixels = colours[labels][:, :, None] + rng.normal(0, 40, size=(len(labels), 3, 1024))
        data = np.clip(pixels, 0, 255).astype(np.uint8).reshape(len(labels), 3072)
        content = {b"data": data, b"fine_labels": labels.tolist(), b"coarse_labels": (labels // 5).tolist()}
        (folder / name).write_bytes(pickle.dumps(content, protocol=2))
    meta = {b"fine_label_names": [f"class{i}".encode() for i in range(100)], b"coarse_label_names": []}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


def write_image_list_standin(root: Path, seed: int = 0) -> Path:
    """A labels.csv of PNG paths: each class a bright square in its own quadrant on a noisy background; its
    ``split`` column holds out the validation and test images (they carry no trusted annotation)."""
    list_file = root / "labels.csv"
    if list_file.exists():
        return root
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = ["path,label,split"]
    for label in range(IMAGE_LIST_CLASSES):
        for i in range(IMAGE_LIST_PER_CLASS):
            image = rng.integers(0, 120, size=(32, 32, 3), dtype=np.uint8)
            top, left = 16 * (label // 2), 16 * (label % 2)
            image[top : top + 16, left : left + 16] = 230
            path = root / "images" / f"{label}-{i}.png"
            Image.fromarray(image).save(path)
            split = "train" if i < IMAGE_LIST_PER_CLASS - 10 else "val" if i % 2 else "test"
            lines.append(f"images/{path.name},class{label},{split}")
    list_file.write_text("\n".join(lines) + "\n")
    return root


def presets(methods: list[str]) -> list[tuple[str, str]]:
    """(data set, method) for every preset file of the chosen methods."""
    return sorted(
        (path.parent.name, path.stem) for m in methods for path in presets_dir().glob(f"*/{m}.yaml")
    )


def data_flags(dataset: str, args: argparse.Namespace, scratch: Path) -> tuple[list[str], str] | None:
    """The --data-root flags of a data set and what data it runs on; None when it cannot run here."""
    if dataset == "digits":
        return [], "scikit-learn digits"
    if dataset == "clothing1m":
        return [], "generated miniature (official layout)"
    if dataset == "fashion-mnist":
        if args.fashion_mnist_root is None:
            return None
        return ["--data-root", str(args.fashion_mnist_root)], "Fashion-MNIST (3,000-image subset)"
    if dataset == "cifar100":
        return ["--data-root", str(write_cifar100_standin(scratch / "cifar100"))], "generated stand-in"
    if dataset == "image-list":
        return ["--data-root", str(write_image_list_standin(scratch / "image-list"))], "generated stand-in"
    return None


def run_one(dataset: str, method: str, flags: list[str], data: str, args: argparse.Namespace) -> Row:
    output = args.output / f"{dataset}-{method}"
    command = [
        str(Path(sys.executable).parent / "raynoisy"), "train", "--dataset", dataset, "--method", method,
        "--workers", str(args.workers), "--output", str(output), "--seed", "0",
        *flags, *METHOD_BUDGET.get((dataset, method), BUDGET.get(dataset, [])), *PHASE.get(method, []),
    ]  # fmt: skip
    print(f"$ {shlex.join(command)}", flush=True)
    start = time.perf_counter()
    log = output.with_suffix(".log")
    output.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as sink:
        rc = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, check=False).returncode
    seconds = time.perf_counter() - start
    metrics_file = output / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if rc == 0 and metrics_file.exists() else None
    if rc != 0:
        tail = "\n".join(log.read_text().splitlines()[-5:])
        print(f"  exit {rc}; last lines of {log}:\n{tail}", flush=True)
    return Row(dataset, method, rc, seconds, metrics, data)


HEADER = [
    "data set", "method", "data", "exit", "wall s", "epochs", "best-val test acc", "last-epoch test acc",
    "corrected-label acc (given)",
]  # fmt: skip


def table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", default="mixnn,mlnt", help="comma-separated method names")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--fashion-mnist-root", type=Path)
    parser.add_argument("--only", help="comma-separated data sets to run (default: every preset's)")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    rows = []
    for dataset, method in presets(args.methods.split(",")):
        if only is not None and dataset not in only:
            continue
        data = data_flags(dataset, args, args.output / "data")
        if data is None:
            print(f"skip {dataset}/{method}: no data here (see --help)", flush=True)
            continue
        rows.append(run_one(dataset, method, *data, args))
    text = table(rows)
    (args.output / "table.md").write_text(text + "\n")
    print(text)
    return 0 if all(row.rc == 0 for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
