"""Tokenise text payloads, batch-wise, inside Ray Data tasks.

The tokenizer is the text encoder's own (``model.pretrained``: a local Hugging Face folder or a hub name),
a fast (Rust) tokenizer, loaded once per process and kept: a Ray Data task calls the transform for every
block, and loading ``tokenizer.json`` costs more than tokenising a block of short texts.

Every row is padded to ``max_tokens`` here, because Ray Data concatenates rows from several blocks into one
training batch and needs one width; ``to_batch`` then cuts each batch to its longest row (``length``), so
the encoder only ever runs on the batch's own padding (dynamic padding), and the padded tail never leaves
the worker's host memory.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from raynoisy.data.transforms import label_columns


@functools.lru_cache(maxsize=4)
def load_tokenizer(name_or_path: str) -> Any:
    """The fast tokenizer of a Hugging Face model folder or hub name (local files first, then the hub)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path, use_fast=True)
    if not tokenizer.is_fast:
        raise ValueError(f"{name_or_path} has no fast tokenizer (tokenizer.json); raynoisy needs one")
    return tokenizer


@dataclass(frozen=True)
class TextTransform:
    """Ray Data ``map_batches`` UDF: UTF-8 payloads -> ``tokens`` int32 [N, max_tokens], ``length``, ok."""

    tokenizer: str
    max_tokens: int

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [bytes(payload).decode("utf-8", errors="replace") for payload in batch["payload"]]
        encoded = load_tokenizer(self.tokenizer)(
            texts,
            truncation=True,
            max_length=self.max_tokens,
            padding="max_length",
            return_attention_mask=True,
            return_tensors="np",
        )
        out = label_columns(batch)
        out["tokens"] = encoded["input_ids"].astype(np.int32)
        out["length"] = encoded["attention_mask"].sum(axis=1).astype(np.int32)
        out["ok"] = np.ones(len(texts), dtype=bool)  # any bytes decode (invalid UTF-8 is replaced)
        return out
