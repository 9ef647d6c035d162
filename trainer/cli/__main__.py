"""``python -m evotune.trainer.cli COMMAND ...``: the ``evotune`` command without its script on
PATH (``deepspeed --module evotune.trainer.cli train ...`` runs it on every rank)."""

import sys

from evotune.trainer.cli import main

if __name__ == "__main__":
    sys.exit(main())
