"""What uvicorn does not do against slow or stalled clients, in a subclass of its h11 protocol; and the uvicorn
settings ``m3d serve`` runs with (:func:`uvicorn_config`, the one place they are chosen -- tests serve the same way).

uvicorn (0.55, h11 protocol: httptools is not installed) closes a connection that stays idle *after* a response
(``timeout_keep_alive``) and caps the size of an incomplete header block (``h11_max_incomplete_event_size``), but:

* it starts no timer before the first request: a client that connects and sends headers slowly, or nothing, keeps
  its connection for ever (slowloris);
* it never times out a request body: an upload that stalls half way keeps its part of the upload budget
  (:class:`~.volume_store.VolumeStore`) for as long as the socket stays open, so two stalled uploads can turn every
  other upload away;
* ``limit_concurrency`` answers 503 to every new request once that many connections are open -- stalled ones
  included -- so it would make a slowloris attack complete rather than stop it; it is left unset.

:class:`GuardedH11Protocol` adds, per connection:

* a **header deadline**: the request line and headers must be complete ``header_timeout_s`` after the connection
  opens (or after the first byte of a later request on a kept-alive connection), else ``408`` and close -- an absolute
  deadline, so dripping one header byte at a time does not extend it;
* a **body watchdog**: while a request body is being received, ``body_timeout_s`` without a byte, or a mean rate
  below ``min_body_bytes_per_s`` after the first ``body_timeout_s``, closes the connection. The route then sees the
  client gone (``ClientDisconnect``) and the upload's share of the budget is released at once;
* **connection limits**: more than ``max_connections`` in all, or ``max_connections_per_client`` from one address,
  get ``503`` with a JSON reason and are closed before anything is parsed.

The limits are fields of :class:`~.guard.ServerLimits` (``m3d serve --header-timeout``, ``--body-timeout``,
``--max-connections``, ``--max-connections-per-client``).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .guard import ServerLimits
from .responses import json_bytes

logger = logging.getLogger(__name__)

MAX_HEADER_BYTES = 64 * 1024
"""The largest request line + headers taken (``h11_max_incomplete_event_size``); ours are under 1 KiB."""
KEEP_ALIVE_S = 5  # uvicorn's default: an idle kept-alive connection is closed after this


def _raw_response(status: int, reason: str, detail: Optional[str] = None, error: str = "") -> bytes:
    """A whole HTTP/1.1 response with ``Connection: close``, written before h11 has seen a request."""
    body = json_bytes({"detail": detail, "error": error}) if detail else b""
    head = [f"HTTP/1.1 {status} {reason}", "connection: close", f"content-length: {len(body)}"]
    if body:
        head.append("content-type: application/json")
    if status == 503:
        head.append("retry-after: 2")
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline, a body watchdog and connection limits (module docstring).
    ``limits`` is set on the subclass :func:`guarded_protocol` makes."""

    limits: ServerLimits = ServerLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: Optional[Any] = None
        self._body_timer: Optional[Any] = None
        self._body_started = self._body_last = self._body_tick = 0.0
        self._body_bytes = 0

    # --------------------------------------------------------------------------------------------- connections
    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        host = self.client[0] if self.client else None
        same = sum(1 for c in self.connections if getattr(c, "client", None) and c.client[0] == host)
        limits = self.limits
        if len(self.connections) > limits.max_connections:
            why = f"the server has {len(self.connections) - 1} connections open (at most {limits.max_connections})"
        elif host is not None and same > limits.max_connections_per_client:
            why = (f"{host} has {same - 1} connections open to this server (at most "
                   f"{limits.max_connections_per_client} per client); close idle ones")
        else:
            self._arm_header_deadline()
            return
        logger.warning("refused a connection from %s: %s", host, why)
        self.transport.write(_raw_response(503, "Service Unavailable", f"too many connections: {why}",
                                           "ServerBusyError"))
        self.transport.close()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def _cancel_timers(self) -> None:
        for timer in (self._header_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = None

    # ------------------------------------------------------------------------------------------------- headers
    def _arm_header_deadline(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._header_deadline)

    def _header_deadline(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return  # the headers came (the timer is also cancelled then); a request is in progress
        logger.warning("closed a connection from %s: no complete request headers within %g s", self.client,
                       self.limits.header_timeout_s)
        self.transport.write(_raw_response(408, "Request Timeout"))
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:  # bytes of a (next) request's headers: the deadline runs
            self._arm_header_deadline()
        elif self._body_timer is not None:
            self._body_bytes += len(data)
            self._body_last = self.loop.time()
        super().data_received(data)

    def handle_events(self) -> None:
        waiting = self.conn.their_state is h11.IDLE
        super().handle_events()
        if waiting and self.conn.their_state is not h11.IDLE and self._header_timer is not None:
            self._header_timer.cancel()  # the request line and headers are complete
            self._header_timer = None
        if self.conn.their_state is h11.SEND_BODY and self._body_timer is None and not self.transport.is_closing():
            self._body_started = self._body_last = self._body_tick = self.loop.time()
            self._body_bytes = 0
            self._body_timer = self.loop.call_later(1.0, self._watch_body)

    # ---------------------------------------------------------------------------------------------------- body
    def _watch_body(self) -> None:
        self._body_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.SEND_BODY:
            return  # the body is complete (or the connection gone)
        now, limits = self.loop.time(), self.limits
        if self.flow.read_paused:  # the application is not reading yet: that time is not the client's delay
            self._body_started += now - self._body_tick
            self._body_last = now
        self._body_tick = now
        idle, elapsed = now - self._body_last, max(now - self._body_started, 1e-9)
        slow = elapsed > limits.body_timeout_s and self._body_bytes / elapsed < limits.min_body_bytes_per_s
        if idle > limits.body_timeout_s or slow:
            why = (f"no body bytes for {idle:.0f} s" if idle > limits.body_timeout_s else
                   f"{self._body_bytes} body bytes in {elapsed:.0f} s, under {limits.min_body_bytes_per_s} bytes/s")
            logger.warning("closed a stalled request from %s (%s %s): %s", self.client,
                           (self.scope or {}).get("method"), (self.scope or {}).get("path"), why)
            self.transport.close()  # the route sees the client gone; an upload releases its budget
            return
        self._body_timer = self.loop.call_later(1.0, self._watch_body)


def guarded_protocol(limits: ServerLimits) -> type:
    """:class:`GuardedH11Protocol` with these limits (uvicorn instantiates the class itself)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits})


def uvicorn_config(app: Any, limits: ServerLimits, **kwargs: Any) -> Any:
    """The ``uvicorn.Config`` of ``m3d serve``: the guarded protocol, the keep-alive and header-size settings
    uvicorn has, and no ``limit_concurrency`` (see the module docstring); ``kwargs`` are other Config options."""
    import uvicorn

    options: dict[str, Any] = dict(http=guarded_protocol(limits), timeout_keep_alive=KEEP_ALIVE_S,
                                   h11_max_incomplete_event_size=MAX_HEADER_BYTES, limit_concurrency=None,
                                   lifespan="off", server_header=False)
    options.update(kwargs)
    return uvicorn.Config(app, **options)


__all__ = ["GuardedH11Protocol", "guarded_protocol", "uvicorn_config"]
