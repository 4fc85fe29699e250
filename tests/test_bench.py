"""The member benchmark still runs: a breakage check, never a timing assertion."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "members.py"
RATIO_LINE = re.compile(
    r"^sqlite\s+http\s+[\d.]+ creates/s\s+raw\s+[\d.]+ inserts/s\s+ratio\s+[\d.]+$", re.MULTILINE
)


def test_member_bench_runs_in_quick_mode() -> None:
    completed = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--backend", "sqlite"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert RATIO_LINE.search(completed.stdout), completed.stdout
