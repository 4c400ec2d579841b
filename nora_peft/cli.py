"""``nora``: thin subcommands that parse arguments and call the package's rooms.

Each subcommand lives in its room as two functions, ``add_arguments(parser)`` and ``main(args) -> int | None``;
this file only lists them and imports a room when its command runs (so ``nora --help`` stays fast).
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: third-party packages each extra brings; a command whose import fails on one of them names the extra to install
EXTRA_PACKAGES: dict[str, frozenset[str]] = {
    "lab": frozenset({"accelerate", "datasets", "tokenizers", "yaml", "numpy", "matplotlib"}),
    "serve": frozenset({"fastapi", "uvicorn", "starlette", "pydantic"}),
}

#: subcommand -> (module that implements it, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "base": ("nora_peft.bases.embedded", "build (pretrain) the embedded default base model and tokenizer"),
    "train": ("nora_peft.lab.train", "fine-tune a causal LM with NoRA, LoRA, rsLoRA or DoRA"),
    "eval": ("nora_peft.lab.evaluate", "perplexity and generation accuracy of a base model or adapter"),
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


def import_room(module: str):
    """Import a command's module; a missing optional dependency becomes a message naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        missing = (err.name or "").split(".")[0]
        for extra, packages in EXTRA_PACKAGES.items():
            if missing in packages:
                raise SystemExit(
                    f"nora: this command needs the '{extra}' extra ({missing} is not installed): "
                    f"pip install 'nora-peft[{extra}]'"
                ) from err
        raise


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    room = import_room(COMMANDS[args.command][0])
    return int(room.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
