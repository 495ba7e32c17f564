"""A failed rank ends the others with an error, not a hang (gloo, CPU, 2 processes).

* crash: rank 1 raises during an ep2 run (its process exits); rank 0 is in the expert all-to-all and must
  fail at once with a `CollectiveError` naming the group.
* stall: rank 1 stops talking (for 3x the timeout) during a dp2 (DDP) run; rank 0's gradient all-reduce
  must give up after ``timeout_s`` (2 s here) with a `CollectiveError`, not wait for gloo's default
  30 minutes (which is what sub-groups get unless created with an explicit timeout).
"""

from __future__ import annotations

from pathlib import Path

import pytest

import dp_ep_workers as workers

pytestmark = pytest.mark.multiproc

TIMEOUT_S = 2.0


@pytest.mark.parametrize("mode, layout, what", [
    ("crash", {"ep": 2}, "expert-parallel"),
    ("stall", {"dp": 2}, "data-parallel gradient all-reduce"),
])
def test_failed_rank_ends_the_others_with_an_error(mode: str, layout: dict, what: str, tmp_path: Path) -> None:
    codes = workers.launch(workers.failure_worker, 2, (mode, layout, TIMEOUT_S), tmp_path, deadline_s=60)
    report = tmp_path / "rank0.txt"
    assert report.exists(), f"rank 0 wrote nothing (exit codes {codes})"
    seconds, outcome = report.read_text().split("\n", 1)
    assert outcome.startswith("CollectiveError"), outcome
    assert what in outcome and "[0, 1]" in outcome, outcome
    assert float(seconds) < TIMEOUT_S + 3.0, f"rank 0 needed {seconds}s to notice"
    assert codes[0] == 1, codes  # rank 0 exited with an error
    if mode == "crash":
        assert codes[1] == 1, codes
