"""uvicorn's h11 protocol with a deadline for the request head, against slowloris clients.

A module of its own because it patches uvicorn's internals (uvicorn has no setting for this):
the one place to look when a uvicorn upgrade breaks it.
"""

from __future__ import annotations


def header_timed_protocol(timeout_s: float):
    """uvicorn's h11 protocol with a deadline for the request head.

    uvicorn times out idle keep-alive connections only after a response; a client that opens a
    connection and sends its headers a byte at a time (slowloris) holds it for ever. This closes
    any connection that has not completed a request head within `timeout_s` of opening or of
    its last response. (It relies on uvicorn's H11Protocol keeping the current request as
    `self.cycle`, as it has since 0.13; tests/test_serve_http.py checks it against the installed one.)
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimedH11(H11Protocol):
        _deadline = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            before = self.cycle
            super().data_received(data)
            if self.cycle is not before:    # a whole request head arrived
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(timeout_s, self._too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _too_slow(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                self.transport.close()

    return HeaderTimedH11
