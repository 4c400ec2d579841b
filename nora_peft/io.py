"""Small file helpers shared by every room: atomic JSON writes, JSONL appends, the data directory."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON so that readers see either the old file or the complete new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def append_jsonl(path: str | os.PathLike, obj: Any) -> None:
    """Append one JSON line with a single ``write`` on an ``O_APPEND`` descriptor (atomic for lines < PIPE_BUF
    on POSIX local filesystems; longer lines are still written whole by one call), then fsync."""
    line = (json.dumps(obj, sort_keys=True, default=str) + "\n").encode()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    """All complete JSON lines of ``path`` (a torn last line, from a crash mid-write, is ignored)."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def data_dir() -> Path:
    """Where real public data sets live: ``$NORA_DATA_DIR``, default ``../shared/data`` beside the checkout."""
    env = os.environ.get("NORA_DATA_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"  # nora_peft/io.py -> checkout/..


def cache_dir() -> Path:
    """Where built artefacts (the embedded base model) are cached: ``$NORA_CACHE``, default ``~/.cache/nora_peft``."""
    return Path(os.environ.get("NORA_CACHE", Path.home() / ".cache" / "nora_peft"))


def save_pretrained_atomically(out_dir: str | os.PathLike, model: Any, tokenizer: Any, info_name: str, info: Any):
    """``model`` and ``tokenizer`` (``save_pretrained``, safetensors) and ``info`` as JSON ``info_name`` into
    ``out_dir``: written beside it and moved in at once, so a half-written model is never visible under that name."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / info_name, info)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
