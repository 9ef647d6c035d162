"""Inspect what an evotune run selected, round by round: ``evotune inspect`` as a script.

    python launch/inspect_rounds.py OUT                  # rounds overview + per-source composition
    python launch/inspect_rounds.py OUT --round 2        # round 2's picks with their numbers
    python launch/inspect_rounds.py OUT --html           # OUT/report.html: the whole run, one file

The options and the code are evotune.trainer.cli.inspect_rounds's
(trainer/cli/inspect_rounds.py).
"""

import sys

from evotune.trainer.cli.inspect_rounds import main

if __name__ == "__main__":
    sys.exit(main())
