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
from collections import deque
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

import structlog
import uvicorn

from memberhub.kit.startup import long_lived
from memberhub.worker.election import stand_down

log = structlog.get_logger("memberhub.serving")

# Set by `memberhub serve` for the processes it starts when it runs more than one: "1" when
# they are to elect the embedded worker among themselves.
SERVE_WORKER_ENV = "MEMBERHUB_SERVE_EMBEDDED_WORKER"

multiprocessing.allow_connection_pickling()
# API processes are forked from one clean process (multiprocessing's fork server, which has
# no threads and no event loop) that has imported the application once: each starts, and
# one that died starts again, without importing it again (seconds of CPU), and they share
# the imported code's memory until they write to it.
_processes = multiprocessing.get_context("forkserver")
_processes.set_forkserver_preload(["memberhub.ops.preload"])

# Messages on a process's channel (one byte each; a connection travels with HANDED).
HANDED = b"h"  # parent -> process: a connection, its descriptor attached
READY = b"r"  # process -> parent: serving; send connections
CLOSED = b"c"  # process -> parent: one of its connections closed
STOPPING = b"s"  # process -> parent: shutting down; send no more
STARTUP_FAILURE = 3
# A process that died once serving is started again, but not more often than this.
RESTART_PAUSE_SECONDS = 1.0
SUPERVISE_SECONDS = 0.5
# The most a process tells the parent in one message (a byte per thing told).
OUTBOX_MESSAGE_BYTES = 4096
# Connections accepted at a time before the processes' messages are heard again.
ACCEPT_BATCH = 64
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
    full: bool = False  # its channel took no more: waiting until it is writable again


def pick(children: list[Child], turn: int) -> Child | None:
    """The ready process serving the fewest connections; on a tie, the first from slot
    `turn` on, so that connections one after another go round the processes."""
    ready = [child for child in children if child.ready and not child.full]
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
        self._started_at: dict[int, float] = {}
        # Accepted, waiting for a process whose channel takes them (all were full).
        self._waiting: deque[socket.socket] = deque()
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
                for key, events in self.selector.select(timeout=SUPERVISE_SECONDS):
                    if key.fileobj is self.listener:
                        self._accept()
                        continue
                    if events & selectors.EVENT_READ:
                        self._hear(key.data)
                    if events & selectors.EVENT_WRITE:
                        self._writable(key.data)
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
        process = _processes.Process(
            target=serve_handed, args=(self.options, theirs), name=f"memberhub-api-{slot}"
        )
        process.start()
        theirs.close()
        ours.setblocking(False)
        child = Child(slot=slot, process=process, channel=ours)
        self._started_at[slot] = time.monotonic()
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
            self._hear(child)  # a READY it sent before dying counts
            self._forget(child)
            if self.stopping:
                continue
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
            # Not more often than every RESTART_PAUSE_SECONDS: one that keeps dying at once
            # must not be started in a tight loop.
            self._restart_after[child.slot] = max(
                now, self._started_at[child.slot] + RESTART_PAUSE_SECONDS
            )
        for slot, due in list(self._restart_after.items()):
            if due <= now and not self.stopping:
                del self._restart_after[slot]
                self._start(slot)

    def _hear(self, child: Child) -> None:
        while True:
            try:
                message = child.channel.recv(4096)
            except BlockingIOError:
                return
            except OSError:
                message = b""
            if not message:  # the process is exiting: no more connections for it
                child.ready = False
                self._listen_while_someone_is_ready()
                return
            # A process sends what it has to tell in one message: a byte per thing told.
            for told in message:
                if told == READY[0]:
                    child.ready = child.serving = True
                elif told == CLOSED[0]:
                    child.connections = max(0, child.connections - 1)
                elif told == STOPPING[0]:
                    child.ready = False
            self._hand_waiting()
            self._listen_while_someone_is_ready()

    def _writable(self, child: Child) -> None:
        """A full channel has room again."""
        child.full = False
        self.selector.modify(child.channel, selectors.EVENT_READ, child)
        self._hand_waiting()
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
        # While accepted connections wait for room in a channel, new ones wait in the
        # listening socket's queue (as they would for a server that is busy).
        wanted = not self.stopping and any(ready) and not self._starting and not self._waiting
        if wanted and not self._listening:
            self.selector.register(self.listener, selectors.EVENT_READ)
        elif self._listening and not wanted:
            self.selector.unregister(self.listener)
        self._listening = wanted

    def _accept(self) -> None:
        """Accept what is waiting, a batch at a time (the processes' messages are heard in
        between), and hand it out."""
        for _ in range(ACCEPT_BATCH):
            try:
                connection, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as error:  # out of descriptors, say: the next accept may do
                log.warning("accept_failed", error=str(error))
                break
            self._waiting.append(connection)
        self._hand_waiting()
        self._listen_while_someone_is_ready()

    def _hand_waiting(self) -> None:
        """Hand the accepted connections out, each to the ready process serving the fewest
        whose channel has room; what finds none waits for a channel to have room."""
        while self._waiting:
            child = pick(self.children, self._turn)
            if child is None:
                return
            connection = self._waiting[0]
            try:
                socket.send_fds(child.channel, [HANDED], [connection.fileno()])
            except BlockingIOError:  # its channel is full: told when it has room
                child.full = True
                events = selectors.EVENT_READ | selectors.EVENT_WRITE
                self.selector.modify(child.channel, events, child)
                continue
            except OSError:  # the process is going: its channel's end says so soon
                child.ready = False
                continue
            self._waiting.popleft().close()  # the process holds it now
            child.connections += 1
            self._turn = child.slot + 1

    def _shutdown(self) -> None:
        if self._listening:
            self.selector.unregister(self.listener)
            self._listening = False
        self.listener.close()
        while self._waiting:
            self._waiting.popleft().close()
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
        channel.setblocking(False)
        self._pending: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        # What the parent is still to be told (a byte per thing; see `Balancer._hear`).
        self._outbox = bytearray()
        self._writing = False

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=[])  # the app's startup; no listening socket
        if not self.started or self.should_exit:
            return
        self._loop = loop = asyncio.get_running_loop()
        loop.add_reader(self.channel.fileno(), self._receive)
        self._tell(READY)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Told first; a connection handed before the parent heard it is still served (and
        # closed once idle, as uvicorn's shutdown waits for every connection).
        self._tell(STOPPING)
        await super().shutdown(sockets=None)
        if self._loop is not None:
            self._loop.remove_reader(self.channel.fileno())

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Every process is told to stop at once: none takes over the worker of another.
        stand_down()
        super().handle_exit(sig, frame)

    def _tell(self, message: bytes) -> None:
        """Tell the parent, in order; what its channel has no room for waits to be sent."""
        self._outbox += message
        self._send_outbox()

    def _send_outbox(self) -> None:
        while self._outbox:
            try:
                sent = self.channel.send(self._outbox[:OUTBOX_MESSAGE_BYTES])
            except BlockingIOError:
                if not self._writing and self._loop is not None:
                    with contextlib.suppress(RuntimeError):  # the loop closed: nobody hears
                        self._loop.add_writer(self.channel.fileno(), self._send_outbox)
                        self._writing = True
                return
            except OSError:  # the parent has gone: nobody to tell
                self._outbox.clear()
                break
            del self._outbox[:sent]
        if self._writing and self._loop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.remove_writer(self.channel.fileno())
            self._writing = False

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
    """An API process (started by the parent): the app of `options`, served from
    `channel`."""
    config = uvicorn.Config(**options)
    with long_lived():
        config.load()  # imports and builds the application
    server = HandedServer(config, channel)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl+C: the server has stopped gracefully
        server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)


def serve_balanced(options: dict[str, Any], processes: int) -> int:
    """Serve `options["app"]` from `processes` processes behind one port; the exit code."""
    return Balancer({**options, "ws": "none"}, processes).run()
