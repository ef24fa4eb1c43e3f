"""Preparing a run's data before Ray Train starts: catalog -> label plan -> Parquet shards.

No Ray Train import: ``raynoisy shard`` and the driver share it, and the shard command stays quick to start.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raynoisy.config import Config, default_shard_root
from raynoisy.data.catalog import Catalog
from raynoisy.data.pipeline import InputSpec
from raynoisy.data.plan import LabelPlan, plan_labels
from raynoisy.data.shards import ShardSet, write_shards
from raynoisy.data.sources import get_source, load_catalog, resolve_root
from raynoisy.errors import ConfigError
from raynoisy.methods import complete_params, get_method_class
from raynoisy.models.text_encoder import resolve_pretrained


@dataclass
class Prepared:
    """A planned and sharded data set."""

    catalog: Catalog
    plan: LabelPlan
    shards: ShardSet
    source_root: str | None

    def labels_table(self):
        used = self.plan.used()
        return self.plan.table(used[~np.isin(used, self.shards.skipped_ids)])


def prepare(cfg: Config, log=print) -> Prepared:
    """Catalog -> label plan -> shards (reused when they exist). Runs before Ray Train starts."""
    root = resolve_root(cfg, log)
    catalog = load_catalog(cfg.data.dataset, root, cfg.data.options)
    needs_trusted = get_method_class(cfg.method.name, cfg.method.module).needs_trusted
    plan = plan_labels(catalog, cfg, needs_trusted=needs_trusted)
    counts = plan.counts()
    log(
        f"[data] {catalog.name}: {catalog.num_samples} samples, {catalog.num_classes} classes; "
        f"split {counts}; "
        f"noise {plan.noise.type} rate {plan.noise.rate} -> actual {plan.noise.actual_rate:.4f}"
    )
    shards = write_shards(
        catalog,
        plan,
        cfg.data.shard_root or default_shard_root(),
        seed=cfg.run.seed,
        source_root=root,
        options=cfg.data.options,
        rows_per_shard=cfg.data.rows_per_shard,
        max_bad_fraction=cfg.data.max_bad_fraction,
        log=log,
    )
    return Prepared(catalog, plan, shards, root)


def prepare_output(cfg: Config, log=print) -> tuple[Path, Prepared, pa.Table]:
    """The run's folder with what every backend writes first (labels.parquet, config.json), and its data."""
    output = Path(cfg.run.output).expanduser().resolve()
    output.mkdir(parents=True, exist_ok=True)
    prepared = prepare(cfg, log)
    labels = prepared.labels_table()
    pq.write_table(labels, output / "labels.parquet")
    (output / "config.json").write_text(json.dumps(config_record(cfg), indent=1))
    return output, prepared, labels


# config.json's mark that its method params are every param the code had (``config_record``): a param
# missing from such a record did not exist when the run trained, so the run is not one under its default.
RECORDS_EVERY_PARAM = "records_every_method_param"


def config_record(cfg: Config) -> dict:
    """What a run's config.json holds: the config, with every method param, defaults included
    (``complete_params``), so that a later default change does not pass for this run's setting, and the
    mark that says so (``RECORDS_EVERY_PARAM``), so that neither does a param added later."""
    config = cfg.to_dict()
    config["method"] = complete_params(config["method"])
    config[RECORDS_EVERY_PARAM] = True
    return config


def input_spec(cfg: Config) -> InputSpec:
    source = get_source(cfg.data.dataset)
    if source.transform == "text":  # the encoder's own tokenizer, from where the encoder loads
        assert cfg.model.pretrained is not None, "preflight refuses a text encoder without weights"
        tokenizer = resolve_pretrained(cfg.model.pretrained)
        return InputSpec("text", cfg.data.max_tokens, 0, tokenizer=tokenizer)
    return InputSpec(source.transform, cfg.data.image_size or source.image_size, source.channels)


def steps_per_epoch(cfg: Config, train_rows: int) -> int:
    """Steps each rank takes per epoch: equal row split, then whole local batches only."""
    local_batch = cfg.optim.batch_size // cfg.scaling.workers
    steps = (train_rows // cfg.scaling.workers) // local_batch
    if steps < 1:
        raise ConfigError(
            "optim.batch_size",
            f"{train_rows} training samples give no full batch of {local_batch} per worker",
            "lower --batch-size or --workers",
        )
    return steps
