"""HTTP failures as :class:`dqr.errors.RemoteError`, classified once.

| failure                         | retriable | slow_down | unreachable |
|---------------------------------|-----------|-----------|-------------|
| 401, 403                        | no        |           |             |
| 404 and other 4xx               | no        |           |             |
| 429, 503 (Retry-After honoured) | yes       | yes       |             |
| other 5xx                       | yes       |           |             |
| connection refused, no route    | yes       |           | yes         |
| connect timeout                 | yes       |           | yes         |
| read timeout, connection reset  | yes       |           |             |
| TLS failure                     | no        |           |             |

Messages name the operation, the server and the config keys to check, and
never contain a query string (it may hold patient names), a response body
(it may echo one) or a credential. The engine does the retrying.
"""

from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass

import requests

from dqr.errors import RemoteError


@dataclass(frozen=True)
class Operation:
    """What was being done, for messages: ``what`` in words, ``where`` the
    server (scheme, host, port and path, no query), ``source`` the config
    name and ``credentials`` the auth keys to check."""

    what: str
    where: str
    source: str
    credentials: str
    #: The config section named in hints (default ``sources.<source>``; a
    #: destination passes ``destination``).
    section: str = ""

    @property
    def key(self) -> str:
        return self.section or f"sources.{self.source}"


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Parse a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def error_for_status(response: requests.Response, op: Operation) -> RemoteError:
    """The RemoteError for an HTTP error status."""
    code = response.status_code
    prefix = f"{op.what}: {op.where} answered HTTP {code} {response.reason or ''}".rstrip()
    if code == 401:
        return RemoteError(f"{prefix}: the server did not accept the credentials; check {op.credentials}")
    if code == 403:
        return RemoteError(
            f"{prefix}: the credentials were accepted but are not allowed to do this; "
            f"check {op.credentials} and the account's permissions on the server"
        )
    if code in (429, 503):
        after = retry_after_seconds(response.headers.get("Retry-After"))
        hint = f", asked to retry after {after:g} s" if after is not None else ""
        return RemoteError(f"{prefix}: the server is overloaded{hint}", slow_down=True, retry_after=after)
    if code >= 500:
        return RemoteError(f"{prefix}: server error", retriable=True)
    if code == 404:
        return RemoteError(
            f"{prefix}: not found (if every request fails like this, check {op.key}.url "
            "and the qido_prefix/wado_prefix keys)"
        )
    if code == 400:
        return RemoteError(f"{prefix}: the server rejected the request (e.g. a wildcard in a date or UID)")
    return RemoteError(prefix)


def error_for_exception(exc: requests.RequestException, op: Operation) -> RemoteError:
    """The RemoteError for a failure below HTTP (connection, TLS, timeout).

    ``str(exc)`` is not used: requests puts the full URL, query included,
    into its messages.
    """
    prefix = f"{op.what}: {op.where}"
    if isinstance(exc, requests.exceptions.SSLError):
        return RemoteError(
            f"{prefix}: TLS failed ({_tls_reason(exc)}); check {op.key}.ca_bundle "
            f"(a CA that signed the server's certificate) or the URL's host name"
        )
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return RemoteError(f"{prefix}: no answer while connecting (connect_timeout)", retriable=True, unreachable=True)
    if isinstance(exc, requests.exceptions.ReadTimeout):
        return RemoteError(f"{prefix}: the server stopped sending (read_timeout)", retriable=True)
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return RemoteError(f"{prefix}: the connection was cut during the answer", retriable=True)
    if isinstance(exc, requests.exceptions.ConnectionError):
        if any(type(cause).__name__ == "ReadTimeoutError" for cause in _causes(exc)):  # while streaming
            return RemoteError(f"{prefix}: the server stopped sending (read_timeout)", retriable=True)
        if _never_connected(exc):
            return RemoteError(
                f"{prefix}: cannot connect ({_connect_reason(exc)}); is the server running and "
                f"{op.key}.url right?",
                retriable=True,
                unreachable=True,
            )
        return RemoteError(f"{prefix}: the connection failed during the request", retriable=True)
    return RemoteError(f"{prefix}: {type(exc).__name__}", retriable=True)


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and everything it wraps (urllib3 hides the OS error in
    ``reason``, requests in ``args``, Python in ``__cause__``)."""
    found: list[BaseException] = []
    stack = [exc]
    while stack:
        current = stack.pop()
        if any(current is seen for seen in found):
            continue
        found.append(current)
        linked = (getattr(current, "reason", None), current.__cause__, current.__context__, *current.args)
        stack.extend(item for item in linked if isinstance(item, BaseException))
    return found


def _never_connected(exc: BaseException) -> bool:
    import urllib3.exceptions

    return any(isinstance(c, urllib3.exceptions.NewConnectionError | urllib3.exceptions.NameResolutionError)
               for c in _causes(exc))


def _connect_reason(exc: BaseException) -> str:
    for cause in _causes(exc):
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if type(cause).__name__ == "NameResolutionError":
            return "host name not found"
    return "network error"


def _tls_reason(exc: BaseException) -> str:
    import ssl

    for cause in _causes(exc):
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"certificate not trusted: {cause.verify_message}"
        if isinstance(cause, ssl.SSLError):
            return cause.reason or "handshake failed"
    return "handshake failed"
