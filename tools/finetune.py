#!/usr/bin/env python
"""Fine-tune from a YAML recipe: `minillama finetune`, as a script for `accelerate launch`.

    python tools/finetune.py --config configs/finetune/tiny.yaml --out runs/tiny
    accelerate launch --config_file configs/accelerate/ddp-cpu.yaml tools/finetune.py \\
        --config configs/finetune/tiny.yaml --out runs/tiny-ddp
    python tools/finetune.py --config configs/finetune/tiny.yaml --out runs/tiny --resume
"""

import sys

from minillama.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
