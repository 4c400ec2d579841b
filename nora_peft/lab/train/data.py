"""The data side of a run: its splits, tokenized with response-only labels, and the padding collator."""

from __future__ import annotations

from typing import Any

from .config import TrainConfig


def load_splits(cfg: TrainConfig) -> dict[str, list[dict[str, Any]]]:
    """The run's records per split: ``load_source`` -> ``make_splits`` -> cap the train split. Deterministic in
    ``data_seed``; evaluation rebuilds the same splits from ``config.json``."""
    from ..data import load_source, make_splits

    native = load_source(cfg.data, field_map=cfg.field_map, seed=cfg.data_seed, **cfg.data_options)
    splits = make_splits(native, seed=cfg.data_seed, val_size=cfg.val_size, test_size=cfg.test_size)
    if cfg.max_train_examples is not None:
        splits["train"] = splits["train"][: cfg.max_train_examples]
    if not splits["train"]:
        raise ValueError(
            f"Data {cfg.data!r} gave an empty train split (native splits: "
            f"{ {k: len(v) for k, v in native.items()} }, max_train_examples={cfg.max_train_examples}). Check the "
            "data path / field_map / filters, or lower val_size/test_size."
        )
    return splits


def tokenize_split(records: list[dict[str, Any]], tokenizer, cfg: TrainConfig):
    """``build_lm_dataset`` with response-only labels (it raises, naming the fix, when no prompt fits
    ``max_length``); the ``id`` column is dropped for the Trainer."""
    from ..data import build_lm_dataset

    dataset, stats = build_lm_dataset(records, tokenizer, max_length=cfg.max_length, response_only=True)
    return dataset.remove_columns(["id"]), stats


class PaddingCounter:
    """A collator that right-pads (``collate``) and counts real and padded token slots, for the padding fraction."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id
        self.real = 0
        self.slots = 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(features, self.pad_token_id)
        self.real += int(batch["attention_mask"].sum())
        self.slots += batch["attention_mask"].numel()
        return batch

    @property
    def padding_fraction(self) -> float | None:
        return round(1 - self.real / self.slots, 4) if self.slots else None


def collate(features: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Right-pad a batch: ``input_ids`` with the pad token, ``attention_mask`` with 0, ``labels`` with -100."""
    import torch

    width = max(len(f["input_ids"]) for f in features)
    out = {"input_ids": [], "attention_mask": [], "labels": []}
    for f in features:
        pad = width - len(f["input_ids"])
        out["input_ids"].append(list(f["input_ids"]) + [pad_token_id] * pad)
        out["attention_mask"].append(list(f["attention_mask"]) + [0] * pad)
        out["labels"].append(list(f["labels"]) + [-100] * pad)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
