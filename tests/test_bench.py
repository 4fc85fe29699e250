"""The benchmarks still run: breakage checks, never timing assertions."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
WRITE_PATH_LINES = {
    operation: re.compile(
        rf"^sqlite\s+{operation}\s+http\s+[\d.]+/s\s+raw\s+[\d.]+/s\s+ratio [\d.]+"
        r"\s+statements \d+$",
        re.MULTILINE,
    )
    for operation in ("award", "create")
}
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
        r"^sqlite\s+expire\s+job 20000 batches [\d.]+ s\s+plain update [\d.]+ s\s+ratio\s+[\d.]+"
        r"\s+load [\d.]+$",
        re.MULTILINE,
    ),
}
WEBHOOK_LINES = {
    endpoints: re.compile(
        rf"^sqlite\s+{endpoints}\s+loop\s+[\d.]+ deliveries/s\s+raw\s+[\d.]+ posts/s"
        r"\s+ratio\s+[\d.]+\s+load [\d.]+$",
        re.MULTILINE,
    )
    for endpoints in ("1 endpoint", "10 endpoints")
}
GATEWAY_LINES = {
    **{
        f"{case} sequential {side}": re.compile(
            rf"^{case}\s+sequential\s+{re.escape(side)}\s+p50\s+\d+ µs p95\s+\d+ µs\s+"
            r"raw p50\s+\d+ µs p95\s+\d+ µs\s+added\s+[+-]\d+ µs\s+ratio\s+[\d.]+$",
            re.MULTILINE,
        )
        for case in ("no-op", "2ms")
        for side in ("gateway", "gateway+limiter")
    },
    **{
        f"{case} concurrent {side}": re.compile(
            rf"^{case}\s+16 in flight\s+{re.escape(side)}\s+[\d.]+ calls/s\s+"
            r"raw\s+[\d.]+ calls/s\s+ratio\s+[\d.]+$",
            re.MULTILINE,
        )
        for case in ("no-op", "2ms")
        for side in ("gateway", "gateway+limiter")
    },
}

NOTIFICATION_LINE = re.compile(
    r"^sqlite\s+sender\s+[\d.]+ emails/s\s+raw\s+[\d.]+ emails/s\s+ratio [\d.]+\s+load [\d.]+$",
    re.MULTILINE,
)
ACTIVITY_LINE = re.compile(
    r"^sqlite\s+activity http\s+[\d.]+/s\s+earn http\s+[\d.]+/s\s+ratio [\d.]+"
    r"\s+rules 50 \(5 on bookings, [1-9]\d* credited\)\s+statements \d+ vs \d+$",
    re.MULTILINE,
)
CRM_LINES = {
    provider: re.compile(
        rf"^{provider} +full push: +\d+ requests / +\d+ minimum = {full}   "
        r"1% changed: +\d+ / +\d+ = 1\.00   unchanged: 0 requests   [\d,]+ records/s$",
        re.MULTILINE,
    )
    for provider, full in (
        ("hubspot", r"1\.00"),
        ("salesforce", r"1\.00"),
        ("pipedrive", r"1\.00"),
        ("custom_crm", r"1\.00"),
    )
}
SINK_LINE = re.compile(
    r"^sqlite\s+\d+ events\s+sink\s+[\d.]+ events/s \(\d+ requests\)\s+raw\s+[\d.]+ events/s"
    r" \(\d+ requests\)\s+ratio [\d.]+\s+load [\d.]+$",
    re.MULTILINE,
)
EXPORT_LINE = re.compile(
    r"^sqlite\s+parquet\s+memberhub\s+[\d,]+ rows/s\s+raw\s+[\d,]+ rows/s\s+ratio [\d.]+"
    r"\s+rows 5000\s+peak rss \d+ MB\s+load [\d.]+$",
    re.MULTILINE,
)


def run_bench(*args: str) -> str:
    """`python -m bench.<args>` from the repository root; its output, after it succeeded."""
    completed = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPOSITORY_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed.stdout


def missing_lines(lines: dict[str, re.Pattern[str]], output: str) -> list[str]:
    return [kind for kind, line in lines.items() if not line.search(output)]


def test_write_path_bench_runs_in_quick_mode() -> None:
    output = run_bench("bench.write_path", "--quick", "--backend", "sqlite")
    assert missing_lines(WRITE_PATH_LINES, output) == [], output


def test_ledger_bench_runs_in_quick_mode_and_its_ledger_checks_pass() -> None:
    output = run_bench("bench.ledger", "--quick", "--backend", "sqlite")
    assert missing_lines(LEDGER_LINES, output) == [], output


def test_webhook_bench_runs_in_quick_mode_and_every_delivery_is_recorded() -> None:
    output = run_bench("bench.webhooks", "--quick", "--backend", "sqlite")
    assert missing_lines(WEBHOOK_LINES, output) == [], output


def test_gateway_bench_runs_in_quick_mode_and_every_call_reaches_the_server_once() -> None:
    output = run_bench("bench.gateway", "--quick")
    assert missing_lines(GATEWAY_LINES, output) == [], output


def test_notifications_bench_runs_in_quick_mode_and_every_email_arrives() -> None:
    output = run_bench("bench.notifications", "--quick", "--backend", "sqlite")
    assert NOTIFICATION_LINE.search(output), output


def test_activities_bench_runs_in_quick_mode_and_its_activities_earn() -> None:
    output = run_bench("bench.activities", "--quick", "--backend", "sqlite")
    assert ACTIVITY_LINE.search(output), output


def test_crm_sync_bench_runs_in_quick_mode_with_no_wasted_request() -> None:
    output = run_bench("bench.crm_sync", "--quick")
    assert missing_lines(CRM_LINES, output) == [], output


def test_exports_bench_runs_in_quick_mode() -> None:
    output = run_bench("bench.exports", "--quick", "--backend", "sqlite")
    assert EXPORT_LINE.search(output), output


def test_export_acceptance_runs_small_and_its_checks_pass() -> None:
    output = run_bench("bench.export_acceptance", "--rows", "3000", "--backend", "sqlite")
    assert "equal to the database row for row" in output, output
    assert "second run: 0 rows, manifest rows 0, files []" in output, output


def test_sinks_bench_runs_in_quick_mode_and_segment_holds_every_call_once() -> None:
    output = run_bench("bench.sinks", "--quick")
    assert SINK_LINE.search(output), output
