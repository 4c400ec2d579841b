"""``nora lm-eval``: EleutherAI's lm-evaluation-harness with NoRA registered, so ``peft=<NoRA adapter>`` loads.

lm-eval's ``--model hf --model_args pretrained=BASE,peft=ADAPTER`` calls ``PeftModel.from_pretrained`` itself; peft
only knows the ``"NORA"`` peft type after ``import nora_peft`` (otherwise: ``KeyError: 'NORA'``). This command
registers NoRA and then runs lm-eval's own CLI with every argument unchanged::

    nora lm-eval run --model hf --model_args pretrained=BASE,peft=runs/x/adapter --tasks gsm8k --device cpu

The Python route is the same two steps: ``import nora_peft`` before ``lm_eval.simple_evaluate(...)``.
"""

from __future__ import annotations

import argparse
import sys

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


def run_lm_eval(lm_eval_args: list[str]) -> int:
    """Register NoRA with peft, then run lm-eval's CLI on ``lm_eval_args``; returns its exit status."""
    import nora_peft  # noqa: F401  (registers the "NORA" peft type before lm-eval loads any adapter)

    try:
        from lm_eval.__main__ import cli_evaluate
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] != "lm_eval":
            raise
        raise SystemExit(
            f"nora lm-eval needs lm-evaluation-harness (lm_eval is not installed): {INSTALL_HINT}"
        ) from err
    argv = sys.argv
    sys.argv = ["lm-eval", *lm_eval_args]  # lm-eval's CLI reads sys.argv itself
    try:
        cli_evaluate()  # its SystemExit (--help, argument errors) passes through, as from lm-eval itself
    finally:
        sys.argv = argv
    return 0


def main(args: argparse.Namespace) -> int:
    return run_lm_eval(args.lm_eval_args)
