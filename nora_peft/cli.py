"""``nora``: thin subcommands that parse arguments and call the package's rooms.

Each subcommand lives in its room as two functions, ``add_arguments(parser)`` and ``main(args) -> int | None``;
this file only lists them and imports a room when its command runs (so ``nora --help`` stays fast). Before a
command does anything, even ``nora <command> --help``, the packages of its extra are looked up (without importing
them): a missing one stops it with the ``pip install`` line that brings it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

#: import names of the third-party packages each extra brings (``yaml`` is pyyaml, ``lm_eval`` is lm-eval)
EXTRA_PACKAGES: dict[str, tuple[str, ...]] = {
    "lab": ("accelerate", "datasets", "yaml", "numpy", "matplotlib"),
    "serve": ("fastapi", "uvicorn"),
    "lm-eval": ("lm_eval",),
}

#: subcommand -> the extra it needs (absent: the core install is enough). Checked as a whole, up front: the lab's
#: modules import some of these lazily, deep into a run, where a missing one would cost the work done so far.
COMMAND_EXTRAS: dict[str, str] = {
    "train": "lab",
    "eval": "lab",
    "analyze": "lab",
    "study": "lab",
    "bench": "lab",
    "serve": "serve",
    "lm-eval": "lm-eval",
}

#: subcommand -> (module that implements it, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "base": ("nora_peft.bases.embedded", "build (pretrain) the embedded default base model and tokenizer"),
    "train": ("nora_peft.lab.train", "fine-tune a causal LM with NoRA, LoRA, rsLoRA or DoRA"),
    "eval": ("nora_peft.lab.eval", "perplexity and generation accuracy of a base model or adapter"),
    "analyze": ("nora_peft.lab.analysis", "SVD spectra, effective rank and AUC-90 of trained adapters"),
    "study": ("nora_peft.lab.study.cli", "run the paper's study (sweeps, ablations, report) from a spec or preset"),
    "bench": ("nora_peft.lab.bench", "side-by-side speed and memory benchmarks (JSON)"),
    "serve": ("nora_peft.serve.cli", "OpenAI-compatible server for many unmerged adapters on one base"),
    "lm-eval": ("nora_peft.lab.lm_eval", "lm-evaluation-harness with NoRA registered (peft=<NoRA adapter> loads)"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nora", description="NoRA: non-linear rank adaptation, as a PEFT method.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:  # only the room that runs is imported
            import_room(module).add_arguments(p)
    return parser


def missing_extra_message(extra: str, missing: list[str], command: str | None = None) -> str:
    """The one message for a missing extra: what is missing and the pip line that installs it."""
    who = f"nora {command}" if command else "this command"
    return (
        f"nora: {who} needs the '{extra}' extra ({', '.join(missing)} not installed): pip install 'nora-peft[{extra}]'"
    )


def _installed(name: str) -> bool:
    if sys.modules.get(name) is not None:  # imported already (find_spec raises on modules without a __spec__)
        return True
    return importlib.util.find_spec(name) is not None


def check_extra(command: str) -> None:
    """Stop with :func:`missing_extra_message` when a package of ``command``'s extra is not installed (looked up with
    ``importlib.util.find_spec``, nothing imported)."""
    extra = COMMAND_EXTRAS.get(command)
    if extra is None:
        return
    missing = [name for name in EXTRA_PACKAGES[extra] if not _installed(name)]
    if missing:
        raise SystemExit(missing_extra_message(extra, missing, command))


def import_room(module: str):
    """Import a command's module; a missing optional dependency becomes a message naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        missing = (err.name or "").split(".")[0]
        for extra, packages in EXTRA_PACKAGES.items():
            if missing in packages:
                raise SystemExit(missing_extra_message(extra, [missing])) from err
        raise


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in COMMANDS:
        check_extra(command)  # before the room's import and before any work: `nora train --help` included
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    room = import_room(COMMANDS[args.command][0])
    return int(room.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
