"""Benchmark: the 'infer' section of `nora bench` (see nora_peft/bench.py); prints JSON to stdout.

python benchmarks/inference.py [--threads 1] [--device auto] [--json out.json] [--quick]
"""

from __future__ import annotations

import sys

from nora_peft.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--what", "infer", *sys.argv[1:]]))
