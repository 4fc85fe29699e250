"""Imported by the fork server that `memberhub serve` starts its API processes from (see
memberhub.ops.serving): the application's modules, with the cyclic collector paused while
they are made and their objects then out of its sight (`long_lived`), as an API process
would import them itself. A failure here is left for the API process to meet and report:
it imports what is missing itself, and fails to start as it would have."""

import contextlib

from memberhub.kit.startup import long_lived

with contextlib.suppress(Exception), long_lived():
    import memberhub.app  # noqa: F401
