"""The adapter pool: adapter names -> slots in every adapted layer, least recently used evicted (vLLM's LoRA manager).

The pool owns which linear layers of the base model are wrapped, which adapter sits in which slot, and the checks an
adapter passes before it gets one. Where a slot's weights live (rank buckets) is ``serve.layers.SlotStacks``'s job.

It also owns the registry of adapters a client may name (``name -> folder``): what ``--adapters-dir`` holds at
start-up plus what ``POST /v1/load_lora_adapter`` adds. Every adapter is read through
:func:`nora_peft.checkpoint.read_checkpoint` against the base model's own linear layers (never the server's wrappers)
with the rank limit, so a bad one is refused at load (400) or skipped at start-up with a logged reason, and the
messages a client sees name the adapter, never a server path. Every file is read as a regular file (a FIFO or device
is refused, never waited on), from inside ``--adapters-dir`` (links that leave it are refused), with values that stay
finite in the model's dtype.

Reads never run on the scheduler's step loop: each runs in a reader thread with a deadline (``read_timeout_s``).
The scheduler asks :meth:`AdapterPool.ensure_loaded`, which answers ``None`` while the adapter is being read (the
request waits, the running rows go on), and adapters evicted from a slot stay in host memory (the
``max_cpu_adapters`` most recently used; vLLM's ``max_cpu_loras``), so reloading one reads no file at all.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch.nn as nn

from ..checkpoint import AdapterCheckpoint, CheckpointError, check_shapes, read_checkpoint
from .errors import AdapterError
from .layers import MultiAdapterLinear, SlotStacks

log = logging.getLogger("nora_peft.serve")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: How long a failed read answers for its adapter before a request reads the files again (seconds): a burst of
#: requests for a broken adapter fails together, and a fixed folder is read again soon after.
FAILED_READ_TTL_S = 1.0


@dataclass
class _Read:
    """One adapter read in a reader thread; ``ended`` is set once, by the reader or by the deadline."""

    started: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    adapter: AdapterCheckpoint | None = None
    error: AdapterError | None = None
    ended: float | None = None


def check_adapter_name(name: object, param: str = "lora_name") -> str:
    """Adapter names are names, not paths: letters, digits, ``.``, ``_``, ``-`` (the whole string); no ``..``."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        shown = repr(name)[:80] if isinstance(name, str) else type(name).__name__
        raise AdapterError(
            f"{param} must be an adapter name (letters, digits, '.', '_', '-'; at most 128 characters; no '/', "
            f"no '..', not a path); got {shown}. Load a folder with POST /v1/load_lora_adapter "
            '{"lora_name": NAME, "lora_path": PATH} and then use NAME.',
            param=param,
        )
    return name


class AdapterPool:
    """Adapters held in memory: name -> slot in every adapted layer, least recently used evicted.

    Args:
        model: the base model; its own ``nn.Linear`` layers (recorded here, before any wrapping) are the only
            layers an adapter may target.
        capacity: how many adapters fit at once (slots).
        adapters_dir: the folder of adapter folders; relative ``lora_path`` s resolve under it.
        allow_external_paths: accept ``lora_path`` outside ``adapters_dir`` (default: 403).
        max_rank: the largest adapter rank accepted (``None``: ``min(out, in)`` of each targeted layer).
        reserved: names no adapter may take (the base model's).
        max_cpu_adapters: how many adapters without a slot stay in host memory, read and validated (evicted ones,
            and those found at start-up beyond ``capacity``), least recently used dropped first; ``None``:
            ``capacity`` (vLLM's ``max_cpu_loras`` default); ``0``: none.
        read_timeout_s: how long one adapter read may take before its requests fail (504) and start-up skips it.
        max_parallel_reads: reader threads reading files at once.
    """

    def __init__(
        self,
        model: nn.Module,
        capacity: int,
        *,
        adapters_dir: str | None = None,
        allow_external_paths: bool = False,
        max_rank: int | None = None,
        reserved: Iterable[str] = (),
        max_cpu_adapters: int | None = None,
        read_timeout_s: float = 30.0,
        max_parallel_reads: int = 2,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"max_adapters must be >= 1; got {capacity}.")
        if (max_cpu_adapters is not None and max_cpu_adapters < 0) or read_timeout_s <= 0 or max_parallel_reads < 1:
            raise ValueError(
                "max_cpu_adapters must be >= 0, read_timeout_s > 0 and max_parallel_reads >= 1; got "
                f"{max_cpu_adapters}, {read_timeout_s}, {max_parallel_reads}."
            )
        self.model = model
        self.capacity = capacity
        self.stacks = SlotStacks(next(model.parameters()).device)
        #: ``{module: (out_features, in_features)}`` of the base model's own linear layers (never the wrappers)
        self.linear_shapes: dict[str, tuple[int, int]] = {
            name: (m.out_features, m.in_features) for name, m in model.named_modules() if isinstance(m, nn.Linear)
        }
        self.layers: dict[str, MultiAdapterLinear] = {}
        self.slots: OrderedDict[str, int] = OrderedDict()  # LRU order: oldest first
        self.adapters: dict[str, AdapterCheckpoint] = {}
        self.loads = 0
        self.evictions = 0
        self.root = Path(adapters_dir).resolve() if adapters_dir else None
        self.allow_external_paths = allow_external_paths
        self.max_rank = max_rank
        self.reserved = set(reserved)
        self.registry: dict[str, str] = {}  # every adapter a client may name -> its folder
        self.refused = 0  # loads refused (bad adapters, taken names)
        self.dtype = next(model.parameters()).dtype  # adapter values must stay finite in it
        self.max_cpu_adapters = capacity if max_cpu_adapters is None else max_cpu_adapters
        self.read_timeout_s = read_timeout_s
        self.host: OrderedDict[str, AdapterCheckpoint] = OrderedDict()  # read, validated, no slot; LRU order
        self.reads = 0  # adapter reads started (files opened)
        self.host_hits = 0  # adapters put back into a slot from host memory, no file read
        self._pending: dict[str, _Read] = {}  # reads for ensure_loaded, by name
        self._mutex = threading.Lock()  # a read's result (reader thread) against its deadline (asking thread)
        self._read_slots = threading.BoundedSemaphore(max_parallel_reads)

    def check_fits(self, adapter: AdapterCheckpoint) -> None:
        """Raise :class:`AdapterError` (400) unless every layer of ``adapter`` is a base linear layer it fits."""
        found, wanted = {}, {}
        for module, (up, down, _) in adapter.modules.items():
            found[f"{module}.up"], found[f"{module}.down"] = tuple(up.shape), tuple(down.shape)
            if module in self.linear_shapes:
                (d, k), r = self.linear_shapes[module], up.shape[0]
                wanted[f"{module}.up"], wanted[f"{module}.down"] = (r, k), (d, r)
        try:
            check_shapes(found, wanted, repr(adapter.name), require_all=False)
        except CheckpointError as e:
            raise AdapterError(str(e), param="lora_path") from None

    # -- the registry: names a client may use ----------------------------------------------------------------
    def read(self, name: str, folder: str | Path | None = None) -> AdapterCheckpoint:
        """Read and validate adapter ``name`` (from ``folder`` or its registered folder); 400 naming the problem,
        504 past ``read_timeout_s``. The files are read in a reader thread, so a hung file system cannot hang the
        caller."""
        job = self._start_read(name, Path(folder if folder is not None else self.registry[name]))
        return self._result(name, job, expired=not job.done.wait(self.read_timeout_s))

    def _read_now(self, name: str, folder: Path) -> AdapterCheckpoint:
        """The read itself (in a reader thread): the checks of :func:`read_checkpoint`, errors as AdapterError."""
        try:
            return read_checkpoint(
                folder,
                name=name,
                expected=self.linear_shapes,
                max_rank=self.max_rank,
                label=repr(name),
                within=None if self.allow_external_paths else self.root,
                dtype=self.dtype,
            )
        except CheckpointError as e:
            raise AdapterError(self._redact(str(e), folder), param="lora_path") from None
        except (OSError, RecursionError, MemoryError) as e:  # unreadable files: say what, not where
            raise AdapterError(
                f"Adapter {name!r} could not be read ({type(e).__name__}); check the folder's files and permissions.",
                param="lora_path",
            ) from None

    def _start_read(self, name: str, folder: Path) -> _Read:
        """Read ``name`` from ``folder`` in a daemon thread (at most ``max_parallel_reads`` read at once)."""
        job = _Read()
        self.reads += 1

        def run() -> None:
            adapter, error = None, None
            with self._read_slots:
                try:
                    adapter = self._read_now(name, folder)
                except AdapterError as e:
                    error = e
                except Exception as e:  # a reader thread must always answer
                    log.exception("reading adapter %s failed", name)
                    error = AdapterError(f"Adapter {name!r} could not be read ({type(e).__name__}).", status=500)
            with self._mutex:
                if job.ended is None:  # else the deadline passed and its requests were told so
                    job.adapter, job.error, job.ended = adapter, error, time.monotonic()
            job.done.set()

        threading.Thread(target=run, name="nora-adapter-read", daemon=True).start()
        return job

    def _result(self, name: str, job: _Read, expired: bool = False) -> AdapterCheckpoint | None:
        """``job``'s adapter, ``None`` while it runs; raises its error, or a 504 once past ``read_timeout_s`` (or
        ``expired``: the caller waited that long)."""
        with self._mutex:
            if job.ended is None and (expired or time.monotonic() - job.started > self.read_timeout_s):
                job.ended = time.monotonic()
                job.error = AdapterError(
                    f"Reading adapter {name!r} took over {self.read_timeout_s:g}s (a slow or hung file system?); "
                    "check its files, then retry.",
                    status=504,
                    param="lora_path",
                )
                log.error("reading adapter %s took over %.0fs; its requests fail", name, self.read_timeout_s)
        if job.error is not None:
            raise job.error
        return job.adapter

    def load_dir(self) -> None:
        """Register every valid adapter folder under ``adapters_dir``, filling the free slots first and host memory
        next; log and skip bad ones (a read that fails or passes ``read_timeout_s`` skips that adapter only)."""
        for name, folder in scan_adapters_dir(self.root).items():
            if name in self.reserved or not self._allowed(Path(folder).resolve()):
                log.error("skipping adapter %s: its name is taken or its folder leaves --adapters-dir", name)
                continue
            try:
                adapter = self.read(name, folder)
            except AdapterError as e:
                log.error("skipping adapter %s: %s", name, e)
                continue
            self.registry[name] = folder
            if len(self.slots) < self.capacity:
                self.add(adapter)
            else:
                self._keep(adapter)

    def prepare(self, name: object, path: object) -> tuple[AdapterCheckpoint, str]:
        """The checks of a load request that need no lock: name (400), free name (409), path (403), adapter (400)."""
        try:
            name = check_adapter_name(name, "lora_name")
            if name in self.reserved:
                raise AdapterError(f"lora_name {name!r} is the base model's name; choose another.", param="lora_name")
            self._check_free(name)
            folder = self.resolve_path(path)
            return self.read(name, folder), str(folder)
        except AdapterError:
            self.refused += 1
            raise

    def install(self, adapter: AdapterCheckpoint, folder: str, pinned: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        """Register ``adapter`` (read by :meth:`prepare`) and give it a slot; 409 if the name was taken meanwhile."""
        self._check_free(adapter.name)
        self._forget(adapter.name)  # nothing read for an earlier adapter of that name may come back
        self.add(adapter, pinned)
        self.registry[adapter.name] = folder

    def unload(self, name: object) -> None:
        """Forget adapter ``name`` and free its slot; 404 when it is not registered."""
        name = check_adapter_name(name, "lora_name")
        if name not in self.registry:
            raise AdapterError(
                f"Adapter {name!r} is not loaded; GET /v1/models lists them.", status=404, param="lora_name"
            )
        del self.registry[name]
        self._forget(name)
        if name in self.slots:
            self.remove(name)

    def ensure_loaded(self, name: str, pinned: set[str], *, wait: bool = False) -> int | None:
        """``name``'s slot: from host memory if it was evicted there, else read again from its folder.

        The read runs in a reader thread: the call answers ``None`` while it runs (ask again; ``wait=True`` blocks
        until it ends) and raises its AdapterError when it failed (400) or passed ``read_timeout_s`` (504); 404 when
        ``name`` is not registered. Call it with the step lock held (it writes slots); ``wait=True`` is for offline
        use and tests, never for a running server's step loop.
        """
        slot = self.slot_of(name)
        if slot is not None:
            return slot
        adapter = self.fetch(name, wait=wait)
        return None if adapter is None else self.add(adapter, pinned)

    def fetch(self, name: str, *, wait: bool = False) -> AdapterCheckpoint | None:
        """Registered adapter ``name`` read and validated: from host memory, else read in the background (``None``
        while that runs, unless ``wait``). A failed read answers with its error for :data:`FAILED_READ_TTL_S`."""
        if name not in self.registry:
            self._forget(name)
            raise AdapterError(f"The model {name!r} was unloaded.", status=404)
        if name in self.host:
            self.host.move_to_end(name)
            self.host_hits += 1
            return self.host[name]
        job = self._pending.get(name)
        if job is None or (job.error is not None and time.monotonic() - job.ended > FAILED_READ_TTL_S):
            job = self._pending[name] = self._start_read(name, Path(self.registry[name]))
        expired = wait and not job.done.wait(max(0.0, self.read_timeout_s - (time.monotonic() - job.started)))
        adapter = self._result(name, job, expired)  # raises (and keeps the failed read for the others) on error
        if adapter is None:
            return None
        del self._pending[name]
        self._keep(adapter)  # until it gets a slot (add() takes it out), should every slot be busy now
        return adapter

    def _keep(self, adapter: AdapterCheckpoint) -> None:
        """Hold ``adapter`` (no slot) in host memory, dropping the least recently used ones (``unload`` and ``install``
        drop a name's copy themselves, so every name held here is registered)."""
        if self.max_cpu_adapters == 0 or adapter.name not in self.registry:
            return
        self.host[adapter.name] = adapter
        self.host.move_to_end(adapter.name)
        while len(self.host) > self.max_cpu_adapters:
            self.host.popitem(last=False)

    def _forget(self, name: str) -> None:
        """Drop what host memory and reads in flight hold for ``name`` (unloaded, or a new adapter takes it)."""
        self.host.pop(name, None)
        self._pending.pop(name, None)

    def _check_free(self, name: str) -> None:
        if name in self.registry:
            raise AdapterError(
                f"An adapter named {name!r} is already loaded; unload it first (POST /v1/unload_lora_adapter) or "
                "choose another name.",
                status=409,
                param="lora_name",
            )

    def resolve_path(self, path: object) -> Path:
        """``path`` as a folder the server may read: relative to ``adapters_dir``, inside it unless allowed (403)."""
        if not isinstance(path, str) or not path or "\x00" in path or not path.isprintable():
            raise AdapterError(
                "lora_path must be a non-empty folder path without NUL or control characters.", param="lora_path"
            )
        p = Path(path)
        if not p.is_absolute():
            if self.root is None:
                raise AdapterError(
                    "lora_path is relative but the server has no --adapters-dir; pass an absolute path.",
                    param="lora_path",
                )
            p = self.root / p
        try:
            p = p.resolve()
        except (OSError, RuntimeError, ValueError):  # a symlink loop, a name too long
            raise AdapterError("lora_path cannot be resolved to a folder.", param="lora_path") from None
        if not self._allowed(p):
            raise AdapterError(
                "lora_path is outside --adapters-dir; put the adapter there, or start the server with "
                "--allow-external-paths.",
                status=403,
                param="lora_path",
            )
        return p

    def _allowed(self, folder: Path) -> bool:
        return self.allow_external_paths or (self.root is not None and folder.is_relative_to(self.root))

    def _redact(self, message: str, folder: Path) -> str:
        """No server paths in a client's message: the folder and the adapters root become names."""
        for path, shown in (
            (folder.resolve(), "<adapter folder>"),
            (folder, "<adapter folder>"),
            (self.root, "<adapters-dir>"),
        ):
            if path is not None:
                message = message.replace(str(path), shown)
        return message

    def slot_of(self, name: str) -> int | None:
        """``name``'s slot (marking it most recently used), or ``None`` when it is not in memory."""
        slot = self.slots.get(name)
        if slot is not None:
            self.slots.move_to_end(name)
        return slot

    def add(self, adapter: AdapterCheckpoint, pinned: set[str] = frozenset()) -> int:  # type: ignore[assignment]
        """Put ``adapter`` into a slot (replacing one of the same name), evicting the LRU unpinned adapter if full."""
        self.check_fits(adapter)
        held = self.host.pop(adapter.name, None)  # out of host memory before an eviction puts its victim there
        if adapter.name in self.slots:
            slot = self.slots[adapter.name]
        else:
            try:
                slot = self._free_slot(pinned)
            except AdapterError:
                if held is not None:
                    self._keep(held)
                raise
        for module in adapter.modules:
            if module not in self.layers:
                self._wrap(module)
        self.stacks.assign(slot, adapter.max_rank, adapter.activation)
        for module, layer in self.layers.items():
            up, down, scaling = adapter.modules.get(module, (None, None, 0.0))
            layer.set_slot(slot, up, down, scaling)
        self.slots[adapter.name] = slot
        self.slots.move_to_end(adapter.name)
        self.adapters[adapter.name] = adapter
        self.loads += 1
        return slot

    def _free_slot(self, pinned: set[str]) -> int:
        used = set(self.slots.values())
        free = [s for s in range(self.capacity) if s not in used]
        if free:
            return free[0]
        victim = next((n for n in self.slots if n not in pinned), None)
        if victim is None:
            raise AdapterError(
                f"All {self.capacity} adapter slots are in use by the running batch; raise --max-adapters.", status=503
            )
        self.evictions += 1
        return self.remove(victim)

    def remove(self, name: str) -> int:
        """Free ``name``'s slot (keeping the adapter in host memory while it is registered); returns the slot."""
        slot = self.slots.pop(name)
        adapter = self.adapters.pop(name, None)
        if adapter is not None:
            self._keep(adapter)
        self.stacks.release(slot)
        return slot

    def _wrap(self, module: str) -> None:
        parent_name, _, child = module.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        layer = self.stacks.wrap(getattr(parent, child))
        for name, slot in self.slots.items():  # adapters loaded earlier that target this module
            up, down, scaling = self.adapters[name].modules.get(module, (None, None, 0.0))
            layer.set_slot(slot, up, down, scaling)
        setattr(parent, child, layer)
        self.layers[module] = layer


def scan_adapters_dir(folder: str | Path | None) -> dict[str, str]:
    """``{name: path}`` for each sub-folder of ``folder`` holding an ``adapter_config.json`` (also ``*/adapter``).

    Any entry of that name counts (a FIFO or a dangling link too), so that reading it refuses it with a logged reason
    instead of skipping it silently; nothing is opened here."""
    found: dict[str, str] = {}
    if folder is None:
        return found
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"--adapters-dir {root} is not a directory; create it or point at the right one.")
    for sub in sorted(root.iterdir()):
        for candidate in (sub, sub / "adapter"):  # a `nora train` run dir keeps its adapter in RUN_DIR/adapter
            if os.path.lexists(candidate / "adapter_config.json"):
                if NAME_RE.fullmatch(sub.name) and ".." not in sub.name:
                    found[sub.name] = str(candidate)
                else:
                    log.error("skipping adapter folder %r: its name is not an adapter name", sub.name)
                break
    return found
