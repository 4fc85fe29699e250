"""Starting a long-running process (`serve`, its API processes, `worker`).

Importing the application makes some 250,000 objects (routes, models, mappers) that live as
long as the process. The cyclic garbage collector, left on, examines them again and again
while they are made (a fifth of the import time) and at every full collection afterwards.
`long_lived` pauses it while they are made, then moves them out of its sight (`gc.freeze`)
and resumes it, so it looks only at what requests and jobs make.

It then collects the youngest objects every YOUNG_COLLECTION_THRESHOLD allocations instead
of every 700: a request makes thousands of short-lived objects, and at the default the
collections took about 4% of a member create's CPU (a tenth of that now). Cycles are
still collected, in larger batches; the older generations keep their default pace
relative to the youngest.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

YOUNG_COLLECTION_THRESHOLD = 20_000


@contextmanager
def long_lived() -> Iterator[None]:
    """Build what the process keeps to its end inside this block."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        collect_less()
        if was_enabled:
            gc.enable()


def collect_less() -> None:
    """Collect the youngest objects every YOUNG_COLLECTION_THRESHOLD allocations. Every
    `memberhub` command starts with it: a short one (`audit verify`, `backup restore`)
    spends most of its time importing what it needs, and at the default pace the collector
    ran through each import's new objects over and over (a tenth of the command's CPU)."""
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, older, oldest)
