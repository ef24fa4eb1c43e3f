"""The grid of a sweep: one resolved, checked config per trial, each with a run directory keyed by it.

All of it happens before Ray starts, so a bad method, rate or flag fails the whole sweep with one line
before any trial is launched. A trial's run directory is ``DIR/runs/<method>-<noise><rate>-seed<S>-<hash>``,
the hash a digest of the trial's config less the fields that do not change its results (``IGNORED_FIELDS``):
the same command finds the same directories again, which is how a re-run skips the finished trials. A
trial is finished when its directory holds metrics.json and a config.json that matches the trial's config
with the method's defaults filled in (``result_config``): a run trained before a default changed or a
method param was added is trained again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raynoisy.config import Config, absolute_noise_type, absolute_path
from raynoisy.errors import ConfigError
from raynoisy.methods import complete_params
from raynoisy.report.sweep_files import METRICS, TrialKey, run_dir_of
from raynoisy.train.preflight import resolve_config
from raynoisy.train.prepare import RECORDS_EVERY_PARAM

# Config fields that do not change a trial's results: where it writes, what it is called, how it logs,
# how many checkpoints / restarts Ray Train keeps, and the CPUs a worker reserves on this cluster.
IGNORED_FIELDS = (
    "run.output",
    "run.name",
    "run.storage_path",
    "run.log_every_steps",
    "run.tensorboard",
    "run.max_failures",
    "run.keep_checkpoints",
    "data.shard_root",
    "scaling.cpus_per_worker",
)
CONFIG_FILE = "config.json"  # written by the driver at the start of every run
SHARDS = "shards"  # DIR/shards: the sweep's shards, unless data.shard_root says otherwise


@dataclass
class Trial:
    key: TrialKey
    cfg: Config

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run.output)

    def is_finished(self) -> bool:
        """Its run wrote metrics.json, with the config this trial would run."""
        metrics, saved = self.run_dir / METRICS, self.run_dir / CONFIG_FILE
        if not (metrics.is_file() and saved.is_file()):
            return False
        try:
            old = json.loads(saved.read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            return False
        return result_config(old) == result_config(self.cfg.to_dict())


@dataclass
class SweepPlan:
    output: Path
    grid: dict[str, Any]  # the command's grid, as sweep.json records it
    trials: list[Trial]


def _less_ignored(config: dict) -> dict:
    out = json.loads(json.dumps(config, default=str))
    out.pop(RECORDS_EVERY_PARAM, None)  # what the record says of itself, not of the run
    for dotted in IGNORED_FIELDS:
        section, _, name = dotted.partition(".")
        if isinstance(out.get(section), dict):
            out[section].pop(name, None)
    return out


def result_config(config: dict) -> dict:
    """What decides whether a finished run is this trial: the config less ``IGNORED_FIELDS``, with the
    method's params completed by this code's defaults unless it records every param already
    (``config_record``'s ``RECORDS_EVERY_PARAM``). So a run trained before a default changed no longer
    matches, nor one trained before a param was added (its record lacks it); config.json files written
    before the driver recorded every param match on the params they name. Params this code cannot parse (a
    param since removed) are left as they are, which matches no config of this code."""
    out = _less_ignored(config)
    if not config.get(RECORDS_EVERY_PARAM, False):
        with contextlib.suppress(ConfigError, KeyError, TypeError):
            out["method"] = json.loads(json.dumps(complete_params(out["method"]), default=str))
    return out


def config_hash(config: dict) -> str:
    """The run directory's key: a digest of the config as given (less ``IGNORED_FIELDS``), method params as
    named. Whether a run found there is this trial is ``result_config``'s comparison."""
    return hashlib.sha256(json.dumps(_less_ignored(config), sort_keys=True).encode()).hexdigest()[:12]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def parse_methods(text: str) -> list[str]:
    methods = list(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    if not methods:
        raise ConfigError("--methods", f"{text!r} names no method", "pass e.g. --methods ce,glc")
    return methods


def plan_sweep(
    *,
    dataset: str,
    methods: list[str],
    noise: str,
    rates: list[float],
    seeds: int,
    output: str,
    flags: dict[str, Any],
    config_file: str | None = None,
    overrides: list[str] | None = None,
) -> SweepPlan:
    """Every trial of methods x rates x seeds ``0..seeds-1``, its config resolved and checked whole.

    ``flags`` maps dotted config paths to the values of the command's named flags (as ``raynoisy train``).
    """
    rates = [float(r) for r in rates]
    for rate in rates:
        if not 0.0 <= rate <= 1.0:
            raise ConfigError("--rates", f"{rate:g} is outside [0, 1]", "pass noise rates in [0, 1]")
    if seeds < 1:
        raise ConfigError("--seeds", f"must be >= 1, got {seeds}", "pass the number of seeds, e.g. --seeds 3")
    # Trials run in Tune's processes, in other folders: the sweep's own paths are absolute from here on
    # (the trials' configs are made so by load_config).
    out = Path(absolute_path(output, "--output") or ".")
    noise = absolute_noise_type(noise, "--noise")
    trials: dict[str, Trial] = {}
    for method in methods:
        for rate in rates:
            for seed in range(seeds):
                layered = flags | {
                    "noise.type": noise,
                    "noise.rate": rate,
                    "run.seed": seed,
                    "run.output": str(out),  # checked writable now; the trial's own folder is set below
                }
                cfg = resolve_config(
                    dataset, method, config_file=config_file, flags=layered, overrides=overrides
                )
                name = (
                    f"{_slug(method)}-{_slug(noise.partition(':')[0])}{rate:g}-seed{cfg.run.seed}-"
                    f"{config_hash(cfg.to_dict())}"
                )
                if name in trials:
                    raise ConfigError(
                        "--set",
                        f"two trials of the grid have the same config ({name})",
                        "do not --set run.seed, noise.type or noise.rate in a sweep: the grid sets them",
                    )
                cfg.run.output = str(run_dir_of(out, name))
                cfg.run.name = name  # the Ray Train run: a re-run of an interrupted trial resumes it
                cfg.data.shard_root = cfg.data.shard_root or str(out / SHARDS)
                trials[name] = Trial(TrialKey(name, method, noise, rate, cfg.run.seed), cfg)
    grid = {
        "dataset": dataset,
        "methods": methods,
        "noise": noise,
        "rates": rates,
        "seeds": list(range(seeds)),
        "epochs": flags.get("optim.epochs"),
    }
    return SweepPlan(out, grid, list(trials.values()))
