"""``nora lm-eval``: EleutherAI's lm-evaluation-harness with NoRA registered, so ``peft=<NoRA adapter>`` loads.

lm-eval's ``--model hf --model_args pretrained=BASE,peft=ADAPTER`` calls ``PeftModel.from_pretrained`` itself; peft
only knows the ``"NORA"`` peft type after ``import nora_peft`` (otherwise: ``KeyError: 'NORA'``). This command
registers NoRA and then runs lm-eval's own CLI with every argument unchanged::

    nora lm-eval run --model hf --model_args pretrained=BASE,peft=runs/x/adapter --tasks gsm8k --device cpu

The Python route is the same two steps: ``import nora_peft`` before ``lm_eval.simple_evaluate(...)``.

A local ``peft=`` folder is checked first, so a wrong one ends in a message that says what to pass instead of a
traceback from deep inside lm-eval (a missing folder, no ``adapter_config.json``, a ``peft_type`` peft does not
know, or a base model folder passed as the adapter).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

INSTALL_HINT = "pip install 'nora-peft[lm-eval]'"


def _take_all_arguments(
    args: list[str] | None = None, namespace: argparse.Namespace | None = None
) -> tuple[argparse.Namespace, list[str]]:
    namespace = argparse.Namespace() if namespace is None else namespace
    namespace.lm_eval_args = list(args or [])
    return namespace, []


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "lm_eval_args",
        nargs=argparse.REMAINDER,
        help="arguments for lm-eval, unchanged (see `nora lm-eval --help`, which is lm-eval's own help)",
    )
    # Every argument, options and -h included, belongs to lm-eval: argparse would otherwise claim or refuse them.
    parser.parse_known_args = _take_all_arguments  # type: ignore[method-assign]


def peft_argument(lm_eval_args: list[str]) -> str | None:
    """The ``peft=`` value of lm-eval's ``--model_args k=v,k=v`` (``None`` when there is none)."""
    for flag, value in zip(lm_eval_args, lm_eval_args[1:]):
        if flag == "--model_args":
            for pair in value.split(","):
                key, _, val = pair.partition("=")
                if key.strip() == "peft" and val.strip():
                    return val.strip()
    for arg in lm_eval_args:
        if arg.startswith("--model_args="):
            return peft_argument(["--model_args", arg.split("=", 1)[1]])
    return None


def _looks_local(value: str) -> bool:
    # a hub id is "owner/name"; anything else with a slash, or starting like a path, is meant as a folder here
    return value.startswith((".", "/", "~")) or value.count("/") > 1 or Path(value).exists()


def check_adapter_folder(value: str) -> None:
    """Stop with a message that names the fix when ``peft=value`` is a local folder lm-eval cannot load as an
    adapter; hub ids are left to lm-eval. NoRA is registered before this runs."""
    from peft import mapping

    if not _looks_local(value):
        return
    folder = Path(value).expanduser()
    hint = "pass the folder that save_pretrained wrote (a run's adapter/, e.g. peft=runs/x/adapter)"
    if not folder.is_dir():
        raise SystemExit(f"nora lm-eval: peft={value}: no such folder; {hint}")
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        base = " (it looks like a base model: pass it as pretrained=)" if (folder / "config.json").is_file() else ""
        raise SystemExit(f"nora lm-eval: peft={value} has no adapter_config.json{base}; {hint}")
    try:
        peft_type = json.loads(config_file.read_text()).get("peft_type")
    except (ValueError, AttributeError, RecursionError) as err:
        raise SystemExit(f"nora lm-eval: {config_file} is not a JSON object ({err}); {hint}") from err
    if peft_type not in mapping.PEFT_TYPE_TO_CONFIG_MAPPING:
        raise SystemExit(
            f"nora lm-eval: {config_file} has peft_type {peft_type!r}, which peft does not know (NoRA adapters say "
            f"'NORA'); {hint}"
        )


def run_lm_eval(lm_eval_args: list[str]) -> int:
    """Register NoRA with peft, then run lm-eval's CLI on ``lm_eval_args``; returns its exit status."""
    import nora_peft

    try:
        from lm_eval.__main__ import cli_evaluate
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] != "lm_eval":
            raise
        raise SystemExit(
            f"nora lm-eval needs lm-evaluation-harness (lm_eval is not installed): {INSTALL_HINT}"
        ) from err
    nora_peft.register()  # the "NORA" peft type, before lm-eval loads any adapter
    adapter = peft_argument(lm_eval_args)
    if adapter is not None:
        check_adapter_folder(adapter)
    argv = sys.argv
    sys.argv = ["lm-eval", *lm_eval_args]  # lm-eval's CLI reads sys.argv itself
    try:
        cli_evaluate()  # its SystemExit (--help, argument errors) passes through, as from lm-eval itself
    finally:
        sys.argv = argv
    return 0


def main(args: argparse.Namespace) -> int:
    return run_lm_eval(args.lm_eval_args)
