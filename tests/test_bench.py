"""The benchmarks still run: breakage checks, never timing assertions."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
RATIO_LINE = re.compile(
    r"^sqlite\s+http\s+[\d.]+ creates/s\s+raw\s+[\d.]+ inserts/s\s+ratio\s+[\d.]+$", re.MULTILINE
)
LEDGER_LINES = {
    "award": re.compile(
        r"^sqlite\s+award\s+http\s+[\d.]+ awards/s\s+raw\s+[\d.]+ awards/s\s+ratio\s+[\d.]+$",
        re.MULTILINE,
    ),
    "award-one": re.compile(
        r"^sqlite\s+award-one\s+http\s+[\d.]+ awards/s\s+raw\s+[\d.]+ awards/s\s+ratio\s+[\d.]+$",
        re.MULTILINE,
    ),
    "redeem50": re.compile(
        r"^sqlite\s+redeem50\s+http p50 [\d.]+ ms p95 [\d.]+ ms\s+"
        r"raw p50 [\d.]+ ms p95 [\d.]+ ms\s+ratio\s+[\d.]+$",
        re.MULTILINE,
    ),
    "expire": re.compile(
        r"^sqlite\s+expire\s+job 20000 batches [\d.]+ s\s+plain update [\d.]+ s\s+ratio\s+[\d.]+$",
        re.MULTILINE,
    ),
}
WEBHOOK_LINES = {
    endpoints: re.compile(
        rf"^sqlite\s+{endpoints}\s+loop\s+[\d.]+ deliveries/s\s+raw\s+[\d.]+ posts/s"
        r"\s+ratio\s+[\d.]+$",
        re.MULTILINE,
    )
    for endpoints in ("1 endpoint", "10 endpoints")
}


def test_member_bench_runs_in_quick_mode() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "bench.members", "--quick", "--backend", "sqlite"],
        cwd=REPOSITORY_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert RATIO_LINE.search(completed.stdout), completed.stdout


def test_ledger_bench_runs_in_quick_mode_and_its_ledger_checks_pass() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "bench.ledger", "--quick", "--backend", "sqlite"],
        cwd=REPOSITORY_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    missing = [kind for kind, line in LEDGER_LINES.items() if not line.search(completed.stdout)]
    assert missing == [], completed.stdout


def test_webhook_bench_runs_in_quick_mode_and_every_delivery_is_recorded() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "bench.webhooks", "--quick", "--backend", "sqlite"],
        cwd=REPOSITORY_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    missing = [kind for kind, line in WEBHOOK_LINES.items() if not line.search(completed.stdout)]
    assert missing == [], completed.stdout
