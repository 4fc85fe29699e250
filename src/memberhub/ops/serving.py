"""Several API processes behind one port, each serving as many connections as the others.

When processes share one listening socket (uvicorn's own way with `workers`), whichever
process wakes first accepts every connection waiting: a client that opens its keep-alive
connections at once (a reverse proxy, a connection pool, a load test) has them all served
by one process while the others idle, and the service does no more than one process can.

Here the parent process accepts, and hands each connection to the process serving the
fewest at that moment (the connection's file descriptor, sent over a Unix socket). A process
says when it is ready to serve and reports each connection it closes. The parent runs no
application code and holds no connection once handed over: a request costs the parent
nothing, a new connection one hand-over.

A process whose startup fails stops the server (exit code 3, as uvicorn's); one that dies
otherwise (killed by a signal, or once serving) is started again, its connections lost with
it. SIGTERM or SIGINT to
the parent stops accepting, then stops every process gracefully (each finishes the requests
it has, as `uvicorn` does), and kills what is left after the graceful timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import multiprocessing
import os
import selectors
import signal
import socket
import sys
import time
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

import structlog
import uvicorn

log = structlog.get_logger("memberhub.serving")

multiprocessing.allow_connection_pickling()
_spawn = multiprocessing.get_context("spawn")

# Messages on a process's channel (one byte each; a connection travels with HANDED).
HANDED = b"h"  # parent -> process: a connection, its descriptor attached
READY = b"r"  # process -> parent: serving; send connections
CLOSED = b"c"  # process -> parent: one of its connections closed
STOPPING = b"s"  # process -> parent: shutting down; send no more
STARTUP_FAILURE = 3
# A process that died once serving is started again, but not more often than this.
RESTART_PAUSE_SECONDS = 1.0
SUPERVISE_SECONDS = 0.5
# At start, connections wait for every process to be ready, but not longer than this.
STARTUP_WAIT_SECONDS = 60.0


@dataclass
class Child:
    """The parent's view of one API process."""

    slot: int
    process: BaseProcess
    channel: socket.socket
    ready: bool = False
    serving: bool = False  # was ever ready
    connections: int = 0


def pick(children: list[Child], turn: int) -> Child | None:
    """The ready process serving the fewest connections; on a tie, the first from slot
    `turn` on, so that connections one after another go round the processes."""
    ready = [child for child in children if child.ready]
    if not ready:
        return None
    count = max(child.slot for child in children) + 1
    return min(ready, key=lambda child: (child.connections, (child.slot - turn) % count))


class Balancer:
    """The parent: accepts on the listening socket, hands connections out, supervises."""

    def __init__(self, options: dict[str, Any], processes: int) -> None:
        self.options = options
        self.processes = processes
        self.config = uvicorn.Config(**options)
        self.selector = selectors.DefaultSelector()
        self.children: list[Child] = []
        self.stopping = False
        self.failed = False
        self._listening = False
        self._restart_after: dict[int, float] = {}
        self._turn = 0
        self._starting = True
        self._starting_until = time.monotonic() + STARTUP_WAIT_SECONDS

    def run(self) -> int:
        self.listener = self.config.bind_socket()
        self.listener.listen(self.config.backlog)
        self.listener.setblocking(False)
        previous = {
            number: signal.signal(number, self._stop) for number in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            for slot in range(self.processes):
                self._start(slot)
            while not self.stopping:
                for key, _ in self.selector.select(timeout=SUPERVISE_SECONDS):
                    if key.fileobj is self.listener:
                        self._accept()
                    else:
                        self._hear(key.data)
                self._supervise()
                self._listen_while_someone_is_ready()
        finally:
            self._shutdown()
            for number, handler in previous.items():
                signal.signal(number, handler)
        return STARTUP_FAILURE if self.failed else 0

    def _stop(self, number: int, frame: FrameType | None) -> None:
        self.stopping = True

    # -- processes

    def _start(self, slot: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        process = _spawn.Process(
            target=serve_handed, args=(self.options, theirs), name=f"memberhub-api-{slot}"
        )
        process.start()
        theirs.close()
        ours.setblocking(False)
        child = Child(slot=slot, process=process, channel=ours)
        self.children.append(child)
        self.selector.register(ours, selectors.EVENT_READ, child)

    def _forget(self, child: Child) -> None:
        self.children.remove(child)
        self.selector.unregister(child.channel)
        child.channel.close()
        self._listen_while_someone_is_ready()

    def _supervise(self) -> None:
        now = time.monotonic()
        for child in list(self.children):
            if child.process.is_alive():
                continue
            child.process.join()
            self._forget(child)
            killed = (child.process.exitcode or 0) < 0
            if not child.serving and not killed:
                # Its startup failed (the database unreachable, the settings refused...):
                # starting it again would fail again.
                log.error("api_process_failed_to_start", exit_code=child.process.exitcode)
                self.failed = self.stopping = True
                return
            log.error(
                "api_process_died",
                exit_code=child.process.exitcode,
                connections_lost=child.connections,
            )
            self._restart_after[child.slot] = max(
                now, self._restart_after.get(child.slot, 0.0) + RESTART_PAUSE_SECONDS
            )
        for slot, due in list(self._restart_after.items()):
            if due <= now and not self.stopping:
                del self._restart_after[slot]
                self._start(slot)

    def _hear(self, child: Child) -> None:
        while True:
            try:
                message = child.channel.recv(16)
            except BlockingIOError:
                return
            except OSError:
                message = b""
            if not message:  # the process is exiting: no more connections for it
                child.ready = False
                self._listen_while_someone_is_ready()
                return
            if message == READY:
                child.ready = child.serving = True
            elif message == CLOSED:
                child.connections = max(0, child.connections - 1)
            elif message == STOPPING:
                child.ready = False
            self._listen_while_someone_is_ready()

    # -- connections

    def _listen_while_someone_is_ready(self) -> None:
        """Connections wait in the listening socket's queue while no process is ready, and
        at first until every process is (or STARTUP_WAIT_SECONDS have passed): keep-alive
        connections opened as soon as the port answers would all go to the first ready
        and stay there."""
        ready = [child.ready for child in self.children]
        if self._starting and (all(ready) or time.monotonic() > self._starting_until):
            self._starting = False
        wanted = not self.stopping and any(ready) and not self._starting
        if wanted and not self._listening:
            self.selector.register(self.listener, selectors.EVENT_READ)
        elif self._listening and not wanted:
            self.selector.unregister(self.listener)
        self._listening = wanted

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:  # out of descriptors, say: the next accept may do
                log.warning("accept_failed", error=str(error))
                return
            with connection:
                self._hand(connection)

    def _hand(self, connection: socket.socket) -> None:
        tried: set[int] = set()
        while child := pick([c for c in self.children if c.slot not in tried], self._turn):
            try:
                socket.send_fds(child.channel, [HANDED], [connection.fileno()])
            except OSError:  # its channel is full or closing: the next process
                tried.add(child.slot)
                continue
            child.connections += 1
            self._turn = child.slot + 1
            return
        log.warning("connection_refused_no_process_ready")

    def _shutdown(self) -> None:
        if self._listening:
            self.selector.unregister(self.listener)
            self._listening = False
        self.listener.close()
        for child in self.children:
            if child.process.is_alive() and child.process.pid is not None:
                os.kill(child.process.pid, signal.SIGTERM)
        grace = (self.config.timeout_graceful_shutdown or 30) + 5
        deadline = time.monotonic() + grace
        for child in self.children:
            child.process.join(max(0.0, deadline - time.monotonic()))
            if child.process.is_alive():
                child.process.kill()
                child.process.join()
            child.channel.close()
        self.selector.close()


class HandedServer(uvicorn.Server):
    """A uvicorn server that listens on no socket of its own: it serves the connections the
    parent hands it over `channel`, and reports when it is ready and each one closed."""

    def __init__(self, config: uvicorn.Config, channel: socket.socket) -> None:
        super().__init__(config)
        self.channel = channel
        self._pending: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=[])  # the app's startup; no listening socket
        if not self.started or self.should_exit:
            return
        self._loop = loop = asyncio.get_running_loop()
        self.channel.setblocking(False)
        loop.add_reader(self.channel.fileno(), self._receive)
        self._tell(READY)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.channel.fileno())
        self._tell(STOPPING)
        await super().shutdown(sockets=None)

    def _tell(self, message: bytes) -> None:
        # The parent gone, nothing is told: the channel's end tells the reader so.
        with contextlib.suppress(OSError):
            self.channel.send(message)

    def _receive(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                message, descriptors, _, _ = socket.recv_fds(self.channel, 16, 1)
            except BlockingIOError:
                return
            except OSError:
                message, descriptors = b"", []
            if not message:
                # The parent has gone: finish what is in hand and stop.
                loop.remove_reader(self.channel.fileno())
                self.should_exit = True
                return
            if not descriptors:
                continue
            connection = socket.socket(fileno=descriptors[0])
            connection.setblocking(False)
            task = loop.create_task(loop.connect_accepted_socket(self._protocol, connection))
            self._pending.add(task)
            task.add_done_callback(functools.partial(self._connected, connection=connection))

    def _connected(self, task: asyncio.Task[Any], *, connection: socket.socket) -> None:
        self._pending.discard(task)
        if task.cancelled() or task.exception() is not None:
            connection.close()
            self._tell(CLOSED)

    def _protocol(self) -> Any:
        protocol = self.config.http_protocol_class(  # type: ignore[call-arg]
            config=self.config,
            server_state=self.server_state,
            app_state=self.lifespan.state,
        )
        lost = protocol.connection_lost

        def connection_lost(exc: Exception | None) -> None:
            try:
                lost(exc)
            finally:
                self._tell(CLOSED)

        protocol.connection_lost = connection_lost  # type: ignore[method-assign]
        return protocol


def serve_handed(options: dict[str, Any], channel: socket.socket) -> None:
    """An API process (spawned by the parent): the app of `options`, served from `channel`."""
    config = uvicorn.Config(**options)
    server = HandedServer(config, channel)
    server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)


def serve_balanced(options: dict[str, Any], processes: int) -> int:
    """Serve `options["app"]` from `processes` processes behind one port; the exit code."""
    return Balancer({**options, "ws": "none"}, processes).run()
