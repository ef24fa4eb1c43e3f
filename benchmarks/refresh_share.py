r"""What MixNN's once-per-epoch refresh cost in real runs, from their metrics.json histories.

``meta_step.py`` prices the refresh on a synthetic split against a timed step; this reads what training
runs logged: per epoch the loop's ``train_seconds`` (the steps) and the method's ``refresh_seconds`` (the
refresh before them, ``MixNN.on_epoch_end``). One row per MixNN run folder given (or under a grid's
``--output``):

- the refresh's source (``method.params.refresh_from`` in the run's config.json; ``pass`` when unset);
- over the neighbour epochs (those whose refresh rebuilt the kNN index): the median steps seconds, refresh
  seconds and refresh share of the epoch, refresh / (refresh + steps); and the median share of the split the
  previous epoch's steps recorded, where the refresh read them (``refresh_from = steps``);
- over the whole run (warm-up, mixup and neighbour epochs): total refresh seconds / total seconds.

    python benchmarks/refresh_share.py runs/i9-long --match mixnn
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from label_quality import run_folders

TARGET = 0.15  # issue 9: the refresh at most 15% of a MixNN epoch


def row(folder: Path) -> list[str] | None:
    """The folder's table row, or None when it is not a MixNN run."""
    config = json.loads((folder / "config.json").read_text())
    if config["method"]["name"] != "mixnn":
        return None
    source = config["method"].get("params", {}).get("refresh_from", "pass")
    history = json.loads((folder / "metrics.json").read_text())["history"]
    refresh = [float(e.get("train_refresh_seconds") or 0.0) for e in history]
    steps = [float(e["train_seconds"]) for e in history]
    neighbour = [i for i, e in enumerate(history) if e.get("train_knn_index_version") is not None]
    shares = [refresh[i] / (refresh[i] + steps[i]) for i in neighbour]
    recorded = [
        float(e["train_refresh_recorded_fraction"])
        for e in history
        if e.get("train_refresh_recorded_fraction") is not None
    ]
    share = statistics.median(shares) if shares else float("nan")
    return [
        folder.name,
        source,
        str(len(neighbour)),
        f"{statistics.median(steps[i] for i in neighbour):.1f}" if neighbour else "",
        f"{statistics.median(refresh[i] for i in neighbour):.2f}" if neighbour else "",
        f"{share:.1%}",
        f"{statistics.median(recorded):.4f}" if recorded else "",
        f"{sum(refresh) / (sum(refresh) + sum(steps)):.1%}",
        "yes" if share <= TARGET else "**no**",
    ]


HEADER = [
    "run", "refresh from", "neighbour epochs", "steps s (median)", "refresh s (median)",
    "refresh share of a neighbour epoch (median)", "recorded share of the split (median)",
    "refresh share of the whole run", f"target <= {TARGET:.0%}",
]  # fmt: skip


def table(folders: list[Path]) -> str:
    rows = [r for r in (row(f) for f in folders) if r is not None]
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("paths", nargs="+", type=Path, help="run folders, or grid folders holding them")
    parser.add_argument("--match", action="append", default=[], help="keep run folders whose name has this")
    args = parser.parse_args(argv)
    print(table(run_folders(args.paths, args.match)))


if __name__ == "__main__":
    main()
