"""Progress bars: a count without a known end finishes as a full bar with its count."""

import io

from rich.console import Console

from evotune.trainer.logs import ProgressBars


def test_a_bar_without_a_total_ends_with_its_count_as_the_total():
    out = io.StringIO()
    bars = ProgressBars(True, Console(file=out, force_terminal=False, width=100))
    with bars.progress("tokenise pool", None) as advance:
        advance(256)
        advance(144)
    assert "400/400" in out.getvalue() and "/?" not in out.getvalue().splitlines()[-1]
    with ProgressBars(False, None).progress("off", None) as advance:   # other ranks: no bar
        advance(3)
