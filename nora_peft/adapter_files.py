"""An adapter folder's files, before any config or tensor is read: their names, how they are opened (regular files
only, never blocking, optionally only inside a given folder), and whether the weights file is a complete safetensors
file. Standard library only: the tuner's ``NoraConfig.from_pretrained`` and the checkpoint reader both use it, without
importing each other."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

#: the files ``save_pretrained`` writes (peft's names); a pickle weights file is named in errors, never loaded
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"


class CheckpointError(ValueError):
    """An adapter folder that cannot be used: the message names the file or field and the fix."""


def open_adapter_file(folder: Path, name: str, label: str, within: str | os.PathLike | None = None) -> int:
    """A read-only descriptor of the regular file ``folder/name``; :class:`CheckpointError` for anything else.

    The open never blocks (``O_NONBLOCK``: a FIFO would otherwise wait for a writer forever) and the descriptor is
    checked, not the name, so a file swapped after a check is still caught. With ``within``, the file must resolve
    inside that folder, checked before the open and again on the opened file where ``/proc`` says what it is.
    Messages name the file, never where a link points or what it holds.
    """
    path = folder / name
    root = Path(within).resolve() if within is not None else None
    outside = (
        f"Adapter {label}: {name} is a link to a file outside the adapters folder; copy the file into the "
        "adapter's folder instead."
    )
    if root is not None and not _resolves_inside(path, root):
        raise CheckpointError(outside)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise CheckpointError(
            f"Adapter {label}: {name} cannot be opened ({type(e).__name__}); check the file and its permissions."
        ) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointError(
                f"Adapter {label}: {name} is not a regular file (a FIFO, device, socket or folder); an adapter's "
                "files are plain files, as `save_pretrained` writes them."
            )
        opened = descriptor_path(fd)
        if root is not None and opened is not None and not _resolves_inside(Path(os.readlink(opened)), root):
            raise CheckpointError(outside)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _resolves_inside(path: Path, root: Path) -> bool:
    try:
        return path.resolve().is_relative_to(root)
    except (OSError, RuntimeError):  # a link loop
        return False


def descriptor_path(fd: int) -> str | None:
    """A path that opens the very file behind ``fd`` (Linux's ``/proc/self/fd``), or ``None`` where there is none."""
    path = f"/proc/self/fd/{fd}"
    return path if os.path.exists(path) else None


def check_adapter_weights_file(folder: str, within: str | os.PathLike | None = None) -> None:
    """Raise :class:`CheckpointError` (a ``ValueError``) if ``folder`` lacks adapter weights, or its weights file is
    not a regular file (with ``within``: inside that folder, see :func:`open_adapter_file`) or not a complete
    safetensors file (checked on the header alone, before anything loads it)."""
    path = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.lexists(path):  # a dangling link is left to open_adapter_file, which names it
        pickled = os.path.exists(os.path.join(folder, PICKLE_NAME))
        raise CheckpointError(
            f"NoRA adapter folder {folder} has adapter_config.json but no {WEIGHTS_NAME}"
            + (
                " (an adapter_model.bin is there, but NoRA loads weights through safetensors only, never pickle)"
                if pickled
                else ": the weights are missing"
            )
            + ". Copy the whole adapter folder again, or re-save it with `model.save_pretrained(...)`."
        )
    problem = None
    with os.fdopen(open_adapter_file(Path(folder), WEIGHTS_NAME, folder, within), "rb") as f:  # no FIFO, no way out
        size = os.fstat(f.fileno()).st_size
        try:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("file shorter than the 8-byte header length")
            n = int.from_bytes(head, "little")
            if n <= 0 or 8 + n > size:
                raise ValueError(f"header claims {n} bytes but the file has {size}")
            header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if 8 + n + end != size:
                problem = f"tensor data should end at byte {8 + n + end} but the file has {size} bytes (truncated?)"
        except RecursionError:
            problem = "its header is nested too deeply to parse"
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            problem = str(e)
    if problem:
        raise CheckpointError(
            f"NoRA adapter weights file {path} is corrupt or truncated: {problem}. "
            "Re-save the adapter with `model.save_pretrained(...)` or copy the file again."
        )
