"""Keeping the server reachable when clients hold connections open without using them.

Every open connection costs a file descriptor; once the process runs out, accepting fails and
nothing is served, /health included. So:
- a connection waiting for a request's headers gets `headers_s` seconds (from its opening, or
  from the end of its previous response; uvicorn's own keep-alive timer restarts at every byte,
  this one does not), and a request's body `body_s` seconds after its headers; then it is
  closed (`rustchat serve --request-timeout` sets both);
- idle keep-alive connections close after KEEP_ALIVE_S (uvicorn's `timeout_keep_alive`);
- at most `max_connections` are open, below the descriptor limit (`connection_cap`); a new
  connection over the cap closes the longest-waiting idle one (no request in progress), or,
  when every connection is busy, is itself closed at once;
- "out of descriptors" accept errors, should they still happen, are logged once per
  LOG_INTERVAL_S with a count instead of once per attempt (`ThrottledLog`).
A response being streamed has no deadline: a long reply is not an idle client.
"""

from __future__ import annotations

import errno
import json
import logging
import resource
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .common import RustchatError
from .serve_request import error_body

KEEP_ALIVE_S = 5
HEADERS_S = BODY_S = 15.0
MAX_REQUEST_TIMEOUT_S = 3600.0  # a deadline beyond an hour is no deadline
FD_RESERVE = 64  # descriptors left for the listening socket, checkpoints, logs and the browser's page
LOG_INTERVAL_S = 10.0


def connection_cap(requested: int) -> int:
    """`requested`, lowered to what the process's descriptor limit leaves after FD_RESERVE."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return requested
    room = soft - FD_RESERVE
    if room < 8:
        raise RustchatError(
            f"the process may open only {soft} files (ulimit -n); the server needs at least {FD_RESERVE + 8}"
        )
    return min(requested, room)


def protocol_class(max_connections: int, *, headers_s: float = HEADERS_S, body_s: float = BODY_S) -> type:
    """uvicorn's h11 protocol with the deadlines and the connection cap above (for
    `uvicorn.Config(http=...)`)."""

    class GuardedH11(H11Protocol):
        idle: dict = {}  # connections waiting for a request's headers, longest-waiting first
        cap = max_connections
        closed_idle = 0  # connections closed by a deadline or to make room (tests read it)
        refused = 0  # new connections closed because every open one was busy

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._phase, self._timer = None, None
            if len(self.connections) > self.cap:
                victim = next(iter(self.idle), None)
                if victim is None:
                    type(self).refused += 1
                    transport.abort()  # frees the descriptor now; connection_lost follows
                    return
                victim._expire()
            self._watch()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._watch()

        def connection_lost(self, exc) -> None:
            self._set_phase(None)
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            """A request h11 cannot parse: answered in the API's JSON error shape, not plain text."""
            body = json.dumps(error_body(msg, "invalid_request_error", None, "invalid_http")).encode()
            headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
            for event in (h11.Response(status_code=400, headers=headers), h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

        def _watch(self) -> None:
            """Arm the deadline of what the connection waits for from its client."""
            if self.transport.is_closing():
                return self._set_phase(None)
            state = self.conn.their_state
            self._set_phase("headers" if state is h11.IDLE else "body" if state is h11.SEND_BODY else None)

        def _set_phase(self, phase) -> None:
            if phase == getattr(self, "_phase", None):
                return
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self.idle.pop(self, None)
            self._phase = phase
            if phase is not None:
                self._timer = self.loop.call_later(headers_s if phase == "headers" else body_s, self._expire)
                if phase == "headers":
                    self.idle[self] = None

        def _expire(self) -> None:
            type(self).closed_idle += 1
            self._set_phase(None)
            if not self.transport.is_closing():
                self.transport.abort()

    return GuardedH11


_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class ThrottledLog(logging.Filter):
    """Lets through one "out of descriptors" record per `interval` seconds, with the count of
    those held back since the last one; other records pass untouched."""

    def __init__(self, interval: float = LOG_INTERVAL_S):
        super().__init__()
        self.interval, self.held, self.last = interval, 0, float("-inf")

    @staticmethod
    def _is_out_of_resources(record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, OSError) and exc.errno in _OUT_OF_RESOURCES:
            return True
        msg = record.getMessage()
        return "out of system resource" in msg or "Too many open files" in msg

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._is_out_of_resources(record):
            return True
        now = time.monotonic()
        if now - self.last < self.interval:
            self.held += 1
            return False
        if self.held:
            record.msg = f"{record.msg} (and {self.held} more like it in the last {now - self.last:.0f} s)"
        self.held, self.last = 0, now
        return True


def throttle_accept_errors(interval: float = LOG_INTERVAL_S) -> ThrottledLog:
    """Install one ThrottledLog on the loggers that report accept errors (asyncio's and uvicorn's)."""
    f = ThrottledLog(interval)
    for name in ("asyncio", "uvicorn.error"):
        logging.getLogger(name).addFilter(f)
    return f
