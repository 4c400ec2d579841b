"""nora-peft: NoRA (Non-linear Rank Adaptation) as a PEFT method, and the harness that tests its claims.

``import nora_peft`` registers the ``"NORA"`` peft type, after which peft's own API works with NoRA::

    import nora_peft
    from peft import get_peft_model, PeftModel
    from nora_peft import NoraConfig
    model = get_peft_model(base, NoraConfig(r=64, alpha=128, dropout=0.1, target_modules=["q_proj", "v_proj"]))

The import itself is light (no torch, no peft, so ``nora --help`` is fast): if peft is already imported, NoRA is
registered at once; otherwise as soon as peft (or any NoRA class, e.g. ``nora_peft.NoraConfig``) is imported.

Tools that load adapters themselves (lm-eval, transformers' pipeline) need that import too: use ``nora lm-eval``, or
opt in to registration in every process with ``python -m nora_peft.autoregister pth`` (docs/ecosystem.md).
"""

from __future__ import annotations

import importlib
import sys

from ._peft_hook import after_import

__version__ = "0.1.0"

#: public name -> the module that defines it (imported on first access, which imports torch and peft)
_PUBLIC = {
    "NORA_PEFT_TYPE": ".tuner.config",
    "NoraConfig": ".tuner.config",
    "NoraPeftType": ".tuner.config",
    "Linear": ".tuner.layer",
    "NoraLayer": ".tuner.layer",
    "ParallelBlock": ".tuner.layer",
    "NoraModel": ".tuner.model",
    "nora_delta": ".tuner.ops",
    "nora_delta_reference": ".tuner.ops",
    "register": ".tuner.registry",
}
__all__ = sorted(_PUBLIC)


def _importing_now() -> bool:
    """True while a module of this package (other than this file) is half-executed: importing the tuner then could
    meet a partially initialized module, so registration waits for the tuner's own import. (peft itself counts as
    initializing while the after-import callbacks run, its code all executed: it is not checked.)"""
    for name in [n for n in sys.modules if n.startswith(__name__ + ".")]:
        if getattr(getattr(sys.modules.get(name), "__spec__", None), "_initializing", False):
            return True
    return False


def _register_now() -> None:
    importlib.import_module(".tuner", __name__).register()


def _on_peft_imported() -> None:
    # peft has just executed. When one of our modules imported it, that module is still half-done: the tuner's
    # callback below registers once the tuner has finished (every NoRA class lives under the tuner).
    if not _importing_now():
        _register_now()


def _on_tuner_imported() -> None:
    sys.modules[__name__ + ".tuner"].register()


def __getattr__(name: str):
    """The public names, imported on first access (registration happens on the way, see the module docstring)."""
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value  # later accesses skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})


if "peft" in sys.modules and not _importing_now():
    _register_now()
else:
    after_import(__name__ + ".tuner", _on_tuner_imported)
    after_import("peft", _on_peft_imported)
