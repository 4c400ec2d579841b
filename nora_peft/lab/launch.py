"""A launcher that asked for several processes but started one: say so instead of training silently on one.

``accelerate launch --num_processes 2 --cpu`` runs accelerate's *simple* launcher: one process, no DDP, and nothing
in that process's environment says that two were asked for. The launcher's own command line (our parent process)
does, and so does a ``WORLD_SIZE`` that the run's process group does not match.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping, Sequence

_NUM_PROCESSES = re.compile(r"--num[_-]processes(?:=(\d+))?$")
_TORCHRUN_NPROC = re.compile(r"--nproc[_-]per[_-]node(?:=(\d+))?$")

FIX = (
    "On CPU use `accelerate launch --multi_gpu --num_processes N ...` (DDP over gloo; `--cpu` selects the "
    "single-process launcher) or `torchrun --nproc_per_node N ...`."
)


def _parent_argv() -> list[str]:
    try:
        import psutil  # accelerate's own dependency

        parent = psutil.Process().parent()
        return parent.cmdline() if parent is not None else []
    except Exception:  # no psutil, no permission, a parent that is gone: nothing to compare against
        return []


def _is_launcher(argv: Sequence[str]) -> bool:
    """accelerate's or torch's launcher (not any parent that happens to take a --num_processes option)."""
    names = [os.path.basename(a) for a in argv[:4]]
    accelerate = any(n.startswith("accelerate") for n in names) and "launch" in argv[:5]
    modules = ("accelerate.commands.launch", "torch.distributed.run", "torch.distributed.launch")
    return accelerate or any(n == "torchrun" or n in modules for n in names)


def requested_processes(argv: Sequence[str], env: Mapping[str, str]) -> tuple[int, str] | None:
    """How many processes a launcher asked for, and where that was read; ``None`` when nothing says so.

    ``argv`` is the launcher's command line (accelerate's ``--num_processes N``, torchrun's ``--nproc_per_node N``,
    ``=`` forms too); ``env`` is this process's environment (``WORLD_SIZE`` set by torchrun and accelerate's DDP).
    """
    for i, arg in enumerate(argv if _is_launcher(argv) else ()):
        for pattern, flag in ((_NUM_PROCESSES, "--num_processes"), (_TORCHRUN_NPROC, "--nproc_per_node")):
            match = pattern.match(arg)
            if match:
                value = match.group(1) or (argv[i + 1] if i + 1 < len(argv) else "")
                if value.isdigit():
                    return int(value), f"the launcher's {flag} {value}"
    world = env.get("WORLD_SIZE", "")
    return (int(world), f"WORLD_SIZE={world}") if world.isdigit() else None


def warn_if_single_process(
    world_size: int, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> str | None:
    """Warn (``RuntimeWarning``) when a launcher asked for several processes but this run's world size is 1.

    Returns the message, or ``None`` when the run matches what was asked (or nothing was asked).
    """
    asked = requested_processes(_parent_argv() if argv is None else argv, os.environ if env is None else env)
    if asked is None or asked[0] <= 1 or world_size != 1:
        return None
    message = (
        f"{asked[1]} asked for {asked[0]} processes, but this run has world size 1: it trains on one process, "
        f"without DDP. {FIX}"
    )
    warnings.warn(message, RuntimeWarning, stacklevel=2)
    return message
