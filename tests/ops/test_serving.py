"""Which API process `memberhub serve` hands a new connection to."""

from __future__ import annotations

from typing import Any, cast

from memberhub.ops.serving import Child, pick


def child(slot: int, connections: int, *, ready: bool = True) -> Child:
    # `pick` reads only the slot, readiness and connection count.
    return Child(
        slot=slot,
        process=cast(Any, None),
        channel=cast(Any, None),
        ready=ready,
        connections=connections,
    )


def test_the_process_serving_the_fewest_connections_gets_the_next() -> None:
    processes = [child(0, 3), child(1, 1), child(2, 2)]
    assert pick(processes, turn=0) is processes[1]


def test_a_process_not_ready_gets_none() -> None:
    processes = [child(0, 5), child(1, 0, ready=False)]
    assert pick(processes, turn=1) is processes[0]
    assert pick([child(0, 0, ready=False)], turn=0) is None
    assert pick([], turn=0) is None


def test_ties_go_round_the_processes_from_the_turn() -> None:
    processes = [child(0, 1), child(1, 1), child(2, 1)]
    assert [pick(processes, turn=turn).slot for turn in range(4)] == [0, 1, 2, 0]  # type: ignore[union-attr]


def test_connections_one_after_another_go_round() -> None:
    """Each closes before the next opens: every process still gets its share."""
    processes = [child(0, 0), child(1, 0)]
    turn, served = 0, []
    for _ in range(4):
        chosen = pick(processes, turn)
        assert chosen is not None
        served.append(chosen.slot)
        turn = chosen.slot + 1
    assert served == [0, 1, 0, 1]
