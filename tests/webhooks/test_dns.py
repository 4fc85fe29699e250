from __future__ import annotations

import asyncio
import threading
import time

import pytest

from memberhub.webhooks import ssrf


async def test_lookups_of_one_name_are_shared_and_briefly_reused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    threads: list[str] = []

    def slow_lookup(host: str, port: int) -> list[str]:
        calls.append(host)
        threads.append(threading.current_thread().name)
        time.sleep(0.2)
        return ["93.184.215.14"]

    monkeypatch.setattr(ssrf, "_lookup", slow_lookup)
    monkeypatch.setattr(ssrf, "_answers", {})

    answers = await asyncio.gather(*(ssrf.resolve("shared.example", 443) for _ in range(5)))
    again = await ssrf.resolve("shared.example", 443)

    assert answers == [["93.184.215.14"]] * 5
    assert again == ["93.184.215.14"]
    assert calls == ["shared.example"]
    # Not the event loop's default executor, which the rest of the process shares.
    assert threads[0].startswith("memberhub-dns")


async def test_a_failed_lookup_is_not_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    outcomes: list[list[str] | OSError] = [OSError("no answer"), ["93.184.215.14"]]

    def flaky_lookup(host: str, port: int) -> list[str]:
        outcome = outcomes.pop(0)
        if isinstance(outcome, OSError):
            raise outcome
        return outcome

    monkeypatch.setattr(ssrf, "_lookup", flaky_lookup)
    monkeypatch.setattr(ssrf, "_answers", {})

    with pytest.raises(OSError, match="no answer"):
        await ssrf.resolve("flaky.example", 443)
    assert await ssrf.resolve("flaky.example", 443) == ["93.184.215.14"]
