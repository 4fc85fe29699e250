"""Starting a long-running process (`serve`, its API processes, `worker`).

Importing the application makes some 250,000 objects (routes, models, mappers) that live as
long as the process. The cyclic garbage collector, left on, examines them again and again
while they are made (a fifth of the import time) and at every full collection afterwards.
`long_lived` pauses it while they are made, then moves them out of its sight (`gc.freeze`)
and resumes it, so it looks only at what requests and jobs make.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def long_lived() -> Iterator[None]:
    """Build what the process keeps to its end inside this block."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()
