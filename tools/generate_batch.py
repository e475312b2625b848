#!/usr/bin/env python
"""Generate for a JSONL file of prompts: `minillama generate-batch`, as a script for `accelerate launch`.

Prompts are split across processes and gathered back in input order; greedy output is the same
for any number of processes.

    python tools/generate_batch.py --prompts prompts.jsonl --out completions.jsonl -n 64
    accelerate launch --config_file configs/accelerate/ddp-cpu.yaml tools/generate_batch.py \\
        --prompts prompts.jsonl --out completions.jsonl -n 64
"""

import sys

from minillama.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate-batch", *sys.argv[1:]]))
