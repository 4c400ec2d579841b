"""Opt-in auto-registration: ``import nora_peft`` right after peft itself is imported, in any process.

Executed (by path, standard library only) from the ``nora_peft-autoregister.pth`` file that
``python -m nora_peft.autoregister enable`` writes into site-packages. At interpreter start it only puts a finder on
``sys.meta_path``; nothing is imported until some code imports peft. Then, once peft's own ``__init__`` has finished,
``nora_peft`` is imported (which registers the ``"NORA"`` peft type), so tools that call
``PeftModel.from_pretrained`` themselves (lm-eval, transformers' pipeline, ...) load NoRA adapters.

Fail-safe: peft's import never fails because of this file. Any error while importing nora_peft becomes one
``RuntimeWarning`` and peft works as without nora-peft. ``NORA_PEFT_AUTOREGISTER=0`` turns it off for a process.
"""

import os
import sys
import warnings


def _register_nora() -> None:
    try:
        import nora_peft  # noqa: F401  (registers the "NORA" peft type)
    except Exception as err:  # a broken nora-peft must not break peft
        warnings.warn(
            f"nora-peft auto-registration failed ({type(err).__name__}: {err}); peft works, without NoRA. "
            "Turn it off with `python -m nora_peft.autoregister disable` or NORA_PEFT_AUTOREGISTER=0.",
            RuntimeWarning,
            stacklevel=2,
        )


def _find_peft_spec(path, target):
    # what importlib does with the remaining finders (importlib.util at every interpreter start would cost more)
    for finder in sys.meta_path:
        find_spec = getattr(finder, "find_spec", None)
        try:
            spec = find_spec("peft", path, target) if find_spec is not None else None
        except Exception:
            return None  # let the normal import machinery report it
        if spec is not None:
            return spec
    return None


class NoraAfterPeftFinder:
    """A ``sys.meta_path`` finder that finds nothing itself: it wraps peft's own loader so that NoRA registers once
    peft has loaded (duck-typed: importing ``importlib.abc`` at every interpreter start would cost more)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "peft":
            return None
        sys.meta_path.remove(self)  # once per process; also keeps the lookup below from finding us again
        spec = _find_peft_spec(path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_peft = spec.loader.exec_module

        def exec_module(module):
            exec_peft(module)  # peft's own errors propagate untouched
            _register_nora()

        spec.loader.exec_module = exec_module
        return spec


def install() -> bool:
    """Put the finder on ``sys.meta_path`` (once); ``False`` when disabled or peft is already imported."""
    if os.environ.get("NORA_PEFT_AUTOREGISTER", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if any(type(f).__name__ == NoraAfterPeftFinder.__name__ for f in sys.meta_path):
        return True
    if "peft" in sys.modules:
        _register_nora()
        return True
    sys.meta_path.insert(0, NoraAfterPeftFinder())
    return True


install()
