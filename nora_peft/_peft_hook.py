"""Run code right after a module has executed, the first time it is really imported (standard library only).

Two users:

- ``import nora_peft`` (which does not import peft, so that ``nora --help`` stays fast) registers NoRA with peft
  through :func:`after_import` once peft is imported.
- The opt-in ``nora_peft-autoregister.pth`` line (``python -m nora_peft.autoregister pth``) executes this file by
  path at interpreter start; it then only puts a finder on ``sys.meta_path``, and ``import nora_peft`` runs once
  peft's own ``__init__`` has finished, so tools that call ``PeftModel.from_pretrained`` themselves (lm-eval,
  transformers' ``pipeline``, ...) load NoRA adapters.

The finder survives probes: ``importlib.util.find_spec("peft")`` (transformers' ``is_peft_available()``) gets a spec
whose loader is wrapped, and so does every later lookup, until one of them has really executed the module.

Fail-safe: peft's import never fails because of the ``.pth`` line. Any error while importing nora_peft becomes one
``RuntimeWarning`` and peft works as without nora-peft. ``NORA_PEFT_AUTOREGISTER=0`` turns the line off for a
process; removing the ``.pth`` file turns it off for good.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable

#: the ``__name__`` under which the ``.pth`` line executes this file (see ``autoregister.pth_line``)
PTH_NAME = "nora_peft_autoregister_hook"
#: marks a wrapped ``exec_module``; holds the finders to notify (duck-typed across the two copies of this file)
_MARK = "_nora_after_import"


class AfterImportFinder:
    """A ``sys.meta_path`` finder that finds nothing itself: it wraps the loader of every spec the other finders
    return for one module name, and once that module has executed, removes itself and runs its callbacks (once).

    Duck-typed, not an ``importlib.abc.MetaPathFinder``: importing ``importlib.abc`` at every interpreter start would
    cost more than this whole file.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.callbacks: list[Callable[[], None]] = []
        self._looking = False  # our own lookup below must not find us again

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name or self._looking:
            return None
        self._looking = True
        try:
            spec = _find_spec_elsewhere(self, fullname, path, target)
        finally:
            self._looking = False
        loader = getattr(spec, "loader", None)
        if loader is not None and hasattr(loader, "exec_module"):
            _wrap_exec_module(loader, self)
        return spec

    def fire(self) -> None:
        """The module has executed: leave ``sys.meta_path`` and run the callbacks (each at most once)."""
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        callbacks, self.callbacks = self.callbacks, []
        for callback in callbacks:
            callback()


def _find_spec_elsewhere(finder, fullname, path, target):
    # what importlib does with the remaining finders (importlib.util at every interpreter start would cost more)
    for other in list(sys.meta_path):
        find_spec = getattr(other, "find_spec", None)
        if other is finder or find_spec is None:
            continue
        try:
            spec = find_spec(fullname, path, target)
        except Exception:
            return None  # let the normal import machinery report it
        if spec is not None:
            return spec
    return None


def _wrap_exec_module(loader, finder) -> None:
    current = loader.exec_module
    waiting = getattr(current, _MARK, None)
    if waiting is not None:  # already wrapped (a cached loader, or the other copy of this file): join it
        if finder not in waiting:
            waiting.append(finder)
        return

    def exec_module(module):
        current(module)  # the module's own errors propagate untouched, and the finders keep waiting
        for waiter in list(waiting):
            if waiter.name == module.__name__:  # one loader may serve many modules (zipimport: a whole archive)
                waiter.fire()

    waiting = [finder]
    setattr(exec_module, _MARK, waiting)
    loader.exec_module = exec_module


def after_import(name: str, callback: Callable[[], None]) -> None:
    """Run ``callback()`` once module ``name`` has executed for the first time (now if it already has; a module that
    is half-executed right now counts as not imported, so its callbacks wait for a later import of it)."""
    module = sys.modules.get(name)
    if module is not None and not getattr(getattr(module, "__spec__", None), "_initializing", False):
        callback()
        return
    for finder in sys.meta_path:
        if isinstance(finder, AfterImportFinder) and finder.name == name:
            finder.callbacks.append(callback)
            return
    finder = AfterImportFinder(name)
    finder.callbacks.append(callback)
    sys.meta_path.insert(0, finder)


def _import_nora_peft() -> None:
    try:
        import nora_peft  # noqa: F401  (registers the "NORA" peft type, peft being imported)
    except Exception as err:  # a broken nora-peft must not break peft
        warnings.warn(
            f"nora-peft auto-registration failed ({type(err).__name__}: {err}); peft works, without NoRA. "
            "Turn it off with NORA_PEFT_AUTOREGISTER=0, or for good by deleting the .pth file: "
            'rm "$(python -m nora_peft.autoregister site-dir)/nora_peft-autoregister.pth"',
            RuntimeWarning,
            stacklevel=2,
        )


def install() -> bool:
    """The ``.pth`` line's work: import nora_peft once peft is imported; ``False`` when turned off."""
    if os.environ.get("NORA_PEFT_AUTOREGISTER", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    after_import("peft", _import_nora_peft)
    return True


if __name__ == PTH_NAME:
    install()
