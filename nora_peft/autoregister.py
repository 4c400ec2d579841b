"""Opt-in: make every Python process of this environment know NoRA as soon as it imports peft.

Tools that call ``PeftModel.from_pretrained`` themselves (lm-eval's ``peft=``, transformers' ``pipeline`` and
``from_pretrained`` of an adapter folder) never ``import nora_peft``, so peft raises ``KeyError: 'NORA'``. The
supported routes are ``import nora_peft`` first, or ``nora lm-eval``. For everything else, opt in by writing one
``.pth`` line yourself (nora-peft never writes into site-packages on its own)::

    python -m nora_peft.autoregister pth > "$(python -m nora_peft.autoregister site-dir)/nora_peft-autoregister.pth"
    python -m nora_peft.autoregister status
    rm "$(python -m nora_peft.autoregister site-dir)/nora_peft-autoregister.pth"   # opt out (before uninstalling)

The ``.pth`` line runs ``nora_peft/_peft_hook.py`` at interpreter start: a finder that waits until peft's module has
really executed (a ``find_spec("peft")`` probe does not use it up) and then imports nora_peft, fail-safe (a broken
nora-peft gives a warning, peft still imports). Costs are measured in
docs/ecosystem.md. ``NORA_PEFT_AUTOREGISTER=0`` turns it off for one process.
"""

from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path

PTH_NAME = "nora_peft-autoregister.pth"
HOOK = Path(__file__).with_name("_peft_hook.py")


def pth_line(hook: Path = HOOK) -> str:
    """The one ``.pth`` line: run the hook by path if it still exists (an uninstalled nora-peft is a no-op)."""
    path = str(hook.resolve())
    return (
        f"import os; _nora_hook = {path!r}; os.path.exists(_nora_hook) and exec(compile(open(_nora_hook).read(), "
        "_nora_hook, 'exec'), {'__name__': 'nora_peft_autoregister_hook'})\n"
    )


def site_dir() -> Path:
    """This environment's site-packages (where pip put nora-peft's dependencies)."""
    return Path(sysconfig.get_paths()["purelib"])


def enable(directory: Path) -> Path:
    """Write the ``.pth`` file into ``directory`` (a site dir of your choice); returns its path. Idempotent."""
    path = directory / PTH_NAME
    path.write_text(pth_line())
    return path


def disable(directory: Path) -> bool:
    """Remove the ``.pth`` file from ``directory``; ``True`` if there was one."""
    path = directory / PTH_NAME
    if path.exists():
        path.unlink()
        return True
    return False


def status(directory: Path | None = None) -> str:
    """``enabled (<path>)`` when the ``.pth`` file is in ``directory`` (default: :func:`site_dir`), else disabled."""
    path = (directory or site_dir()) / PTH_NAME
    return f"enabled ({path})" if path.exists() else f"disabled (no {path})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nora_peft.autoregister", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["pth", "site-dir", "status"], help="print the .pth line / the site dir")
    parser.add_argument("--site-dir", type=Path, default=None, help="default: this environment's site-packages")
    args = parser.parse_args(argv)
    if args.action == "pth":
        print(pth_line(), end="")
    elif args.action == "site-dir":
        print(args.site_dir or site_dir())
    else:
        print(status(args.site_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
