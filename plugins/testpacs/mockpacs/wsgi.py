"""What the mock HTTP servers share: one werkzeug server on 127.0.0.1 in a
daemon thread, started and stopped by its owner, counting the requests it
has in flight (the limits tests read ``max_concurrent_requests``)."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

from werkzeug.serving import WSGIRequestHandler, make_server

HOST = "127.0.0.1"


class QuietHandler(WSGIRequestHandler):
    """No access log: request lines hold query strings (patient names)."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


class WsgiServer:
    """Serves ``self._wsgi`` (a subclass's) on ``port`` (0: a free one) under ``prefix``.

    Counters: ``requests`` (per kind, a subclass's names), ``current_requests``
    and ``max_concurrent_requests`` (through :meth:`_enter` / :meth:`_leave`)."""

    def __init__(self, port: int, prefix: str, name: str) -> None:
        self.requests: Counter[str] = Counter()
        self.current_requests = 0
        self.max_concurrent_requests = 0
        self._lock = threading.Lock()
        self._prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
        self._server = make_server(
            HOST, port, self._wsgi, threaded=True, request_handler=QuietHandler
        )
        self.port: int = self._server.server_port
        self.url = f"http://{HOST}:{self.port}{self._prefix}"
        # A short poll interval: stop() waits up to one interval.
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"{name}-{self.port}",
            daemon=True,
        )

    def _wsgi(self, environ: dict[str, Any], start_response: Any) -> Any:
        raise NotImplementedError

    def start(self):
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket (idempotent)."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()

    def reset_counters(self) -> None:
        with self._lock:
            self.requests.clear()
            self.max_concurrent_requests = self.current_requests

    def _enter(self, kind: str) -> None:
        with self._lock:
            self.requests[kind] += 1
            self.current_requests += 1
            self.max_concurrent_requests = max(self.max_concurrent_requests, self.current_requests)

    def _leave(self) -> None:
        with self._lock:
            self.current_requests -= 1
