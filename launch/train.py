"""Run or resume an evotune run: ``evotune train`` as a script, for the DeepSpeed launcher.

    deepspeed launch/train.py --config configs/quickstart.yaml [section.key=value ...]
    deepspeed --num_gpus 8 launch/train.py --config configs/diverseevol.yaml
    python launch/train.py --config configs/quickstart.yaml      # one process, no launcher

Options: --resume auto|never|PATH (default auto), --overwrite, --help-config; the code is
evotune.trainer.cli.train (trainer/cli/train.py).
"""

import sys

from evotune.trainer.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
