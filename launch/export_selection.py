"""Write the examples an evotune run selected, as a dataset for another trainer: ``evotune
export`` as a script.

    python launch/export_selection.py RUN                        # every round, as in the pool
    python launch/export_selection.py RUN --format sharegpt      # conversations (from/value)

The options and the code are evotune.trainer.cli.export_selection's
(trainer/cli/export_selection.py).
"""

import sys

from evotune.trainer.cli.export_selection import main

if __name__ == "__main__":
    sys.exit(main())
