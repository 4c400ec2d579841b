"""The base model's perplexity on the records an adapter is evaluated on, so that every adapter number is read next
to the number it improves on ("response 10.2 (base 38.4)").

The base is the adapter's own base with the adapter switched off (``PeftModel.disable_adapter``), at the same
precision, on the same records and token budget. It is cached under ``$NORA_CACHE/eval_base/``, keyed by the
base's fingerprint (its folder's config and weight files), the records' content, ``max_length`` and the precision,
so every later evaluation of any adapter of that base on that split reads it instead of computing it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from ...io import cache_dir, read_json, write_json_atomic
from .perplexity import perplexities

#: bump when what is cached (or how it is computed) changes, so that old entries are not read
CACHE_VERSION = 1
#: weight files whose name, size and modification time stand for a base folder's weights
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def base_fingerprint(base_name: str | None) -> str:
    """A short hash standing for the base's weights: its resolved folder's ``config.json`` and each weight file's
    name, size and modification time (a rebuilt or replaced base gets a new one); a hub id stands for itself."""
    from ...bases.named import resolve_model

    path = Path(resolve_model(base_name))
    digest = hashlib.sha256(str(path.resolve() if path.is_dir() else path).encode())
    if path.is_dir():
        if (path / "config.json").is_file():
            digest.update((path / "config.json").read_bytes())
        for f in sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES):
            stat = f.stat()
            digest.update(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def records_fingerprint(records: list[dict[str, Any]]) -> str:
    """A hash of the records' ids and text (a split whose ids stay but whose content changed is another split)."""
    digest = hashlib.sha256()
    for r in records:
        digest.update(json.dumps([r.get("id"), r.get("prompt"), r.get("response")]).encode())
    return digest.hexdigest()[:16]


def cache_path(
    base_name: str | None,
    records: list[dict[str, Any]],
    *,
    max_length: int,
    precision: str | None,
    weights_dtype: str | None = None,
) -> Path:
    """Where the base's perplexity on ``records`` is cached: keyed on the base, the records, the length, the autocast
    precision and the dtype the weights were loaded in (an fp32 run over bf16 weights is another number)."""
    key = f"v{CACHE_VERSION}-{base_fingerprint(base_name)}-{records_fingerprint(records)}-{max_length}-{precision}"
    key += f"-{weights_dtype}" if weights_dtype else ""
    return cache_dir() / "eval_base" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def base_perplexity(
    model: torch.nn.Module,
    tokenizer,
    records: list[dict[str, Any]],
    *,
    base_name: str | None,
    max_length: int,
    batch_size: int = 8,
    precision: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """``{"ppl", "ppl_full", "tokens", "base", "cached"}`` of the base under ``model`` (a ``PeftModel``) on
    ``records``, from the cache when it holds them, else computed with the adapter off and cached."""
    if not hasattr(model, "disable_adapter"):
        raise TypeError(f"base_perplexity needs a peft model (one whose adapter can be switched off), got {model!r}.")
    weights_dtype = str(next(model.parameters()).dtype)
    path = cache_path(base_name, records, max_length=max_length, precision=precision, weights_dtype=weights_dtype)
    if path.is_file():
        return {**read_json(path), "cached": True}
    with model.disable_adapter():
        both = perplexities(model, tokenizer, records, max_length=max_length, batch_size=batch_size,
                            precision=precision, progress=progress)  # fmt: skip
    entry = {
        "ppl": both["response"]["ppl"],
        "ppl_full": both["full"]["ppl"],
        "tokens": both["response"]["tokens"],
        "base": base_name or "default",
        "records": len(records),
    }
    write_json_atomic(path, entry)
    return {**entry, "cached": False}
