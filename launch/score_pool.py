"""Score every example of a pool with one model, without training: ``evotune score`` as a
script, for the DeepSpeed launcher.

    python launch/score_pool.py --config configs/quickstart.yaml --out runs/scores
    deepspeed --num_gpus 2 launch/score_pool.py --config CFG --out OUT

The options and the code are evotune.trainer.cli.score_pool's (trainer/cli/score_pool.py).
"""

import sys

from evotune.trainer.cli.score_pool import main

if __name__ == "__main__":
    sys.exit(main())
