"""What DIMSE statuses, association rejects and socket errors mean for dqr:
the one place where they become :class:`dqr.errors.RemoteError` with the
right ``retriable`` / ``slow_down`` / ``unreachable`` flags (the engine does
the retrying, see issue 5), and with messages a user can act on.
"""

from __future__ import annotations

import errno
import socket
import ssl

from dqr.errors import RemoteError

PENDING = frozenset({0xFF00, 0xFF01})
SUCCESS = 0x0000
CANCELLED = 0xFE00
#: Retrieve warnings: some sub-operations failed or had warnings.
SUBOPERATION_WARNINGS = frozenset({0xB000, 0xB006, 0xB007})
MOVE_DESTINATION_UNKNOWN = 0xA801

#: (source, diagnostic) of an A-ASSOCIATE-RJ -> words (PS3.8 9.3.4).
REJECT_REASONS = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised",
    (1, 7): "called AE title not recognised",
    (2, 1): "no reason given",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}
REJECT_SOURCES = {
    1: "the PACS application",
    2: "the PACS's ACSE layer",
    3: "the PACS's presentation layer",
}
#: A-ASSOCIATE-RJ diagnostics (source 3) that mean "too busy right now".
CONGESTION = frozenset({(3, 1), (3, 2)})

UNREACHABLE_ERRNOS = frozenset(
    {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EADDRNOTAVAIL, errno.ENETDOWN}
)


def describe_status(status: int) -> str:
    """A DIMSE status in words, for messages."""
    words = {
        0x0000: "success",
        0xFE00: "cancelled",
        0xA801: "move destination unknown",
        0xA900: "identifier does not match the SOP class",
        0x0122: "SOP class not supported",
        0x0124: "not authorised",
        0xB000: "some sub-operations failed",
        0xC000: "unable to process",
    }
    if status in words:
        return f"0x{status:04X} ({words[status]})"
    if 0xA700 <= status <= 0xA7FF:
        return f"0x{status:04X} (out of resources)"
    if 0xC000 <= status <= 0xCFFF:
        return f"0x{status:04X} (unable to process)"
    return f"0x{status:04X}"


def is_out_of_resources(status: int) -> bool:
    return 0xA700 <= status <= 0xA7FF


def is_refused_query(status: int) -> bool:
    """The PACS will not answer this identifier at all (level, keys, model)."""
    return status in (0xA900, 0x0122) or 0xC000 <= status <= 0xCFFF


class DimseStatusError(RemoteError):
    """A DIMSE operation ended with a failure status (kept in ``status``)."""

    def __init__(self, message: str, status: int, **flags: bool) -> None:
        super().__init__(message, **flags)
        self.status = status


class NoAcceptedContexts(RemoteError):
    """The PACS accepted the association but none of its presentation contexts."""


def status_error(operation: str, status: int, where: str, comment: str = "") -> DimseStatusError:
    """The error for a failure status that ends a C-FIND/C-GET/C-MOVE/C-ECHO."""
    detail = f"{operation} failed at {where}: {describe_status(status)}"
    if comment:
        detail += f" -- {comment}"
    if is_out_of_resources(status):
        return DimseStatusError(
            f"{detail}; the PACS is short of resources: slowing down", status, slow_down=True
        )
    if status == CANCELLED:
        return DimseStatusError(f"{detail}; the operation was cancelled", status, retriable=True)
    if is_refused_query(status):
        return DimseStatusError(
            f"{detail}; the PACS refused the request as sent (not retried)", status
        )
    return DimseStatusError(detail, status)


def move_destination_error(
    status: int, where: str, destination_aet: str, store_address: str
) -> RemoteError:
    """C-MOVE refused because the PACS cannot send to dqr (0xA801; 0xC000 on Orthanc)."""
    return DimseStatusError(
        f"C-MOVE failed at {where}: {describe_status(status)}. The PACS does not know where to send "
        f"the images: it must have dqr registered as a move destination with AE title "
        f"{destination_aet!r}, host and port {store_address} (the address of this machine as the "
        f"PACS sees it). Ask the PACS administrator to add it, or use `retrieve: c-get`.",
        status,
    )


def reject_error(
    result: int, source: int, diagnostic: int, where: str, calling_aet: str, called_aet: str
) -> RemoteError:
    """An A-ASSOCIATE-RJ in words, classified."""
    reason = REJECT_REASONS.get((source, diagnostic), f"reason {diagnostic}")
    kind = "transient" if result == 2 else "permanent"
    message = f"{where} rejected the association ({kind}, by {REJECT_SOURCES.get(source, f'source {source}')}: {reason})"
    if (source, diagnostic) == (1, 3):
        message += (
            f"; the PACS must know dqr's calling AE title {calling_aet!r} (check `calling_aet`)"
        )
    elif (source, diagnostic) == (1, 7):
        message += f"; the PACS's AE title is not {called_aet!r} (check `called_aet`)"
    if (source, diagnostic) in CONGESTION:
        return RemoteError(f"{message}: too many associations, slowing down", slow_down=True)
    return RemoteError(message, retriable=result == 2)


def connect_error(exc: BaseException | None, where: str, timeout: float) -> RemoteError:
    """Why no TCP (or TLS) connection could be made."""
    if isinstance(exc, ssl.SSLError):
        return RemoteError(f"TLS handshake with {where} failed: {tls_failure(exc)}")
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return RemoteError(
            f"no answer from {where} within {timeout:g} s (connect_timeout): a firewall may drop "
            "the packets, or the host is down",
            retriable=True,
            unreachable=True,
        )
    if isinstance(exc, OSError) and exc.errno == errno.ECONNREFUSED:
        return RemoteError(
            f"connection refused by {where}: nothing listens on that port (wrong port, or the PACS is down)",
            retriable=True,
            unreachable=True,
        )
    if isinstance(exc, OSError) and exc.errno in UNREACHABLE_ERRNOS:
        return RemoteError(
            f"no route to {where}: {exc.strerror} (check `host` and the network)",
            retriable=True,
            unreachable=True,
        )
    if isinstance(exc, socket.gaierror):
        return RemoteError(f"cannot resolve the host of {where}: {exc}", unreachable=True)
    return RemoteError(
        f"cannot connect to {where}: {exc or 'unknown error'}", retriable=True, unreachable=True
    )


def tls_failure(exc: ssl.SSLError) -> str:
    """A failed TLS handshake in words, with the ``tls:`` key to look at."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"the PACS's certificate could not be verified ({exc.verify_message}): check "
            "`tls.ca_file` (the CA that signed it) and that the certificate names `host`"
        )
    reason = exc.reason or str(exc)
    if "ALERT" in reason and ("CERTIFICATE" in reason or "UNKNOWN_CA" in reason):  # the PACS's alert
        return (
            f"{reason}: the PACS refused dqr's client certificate or wants one; check "
            "`tls.cert_file` / `tls.key_file` and that the PACS trusts their CA"
        )
    return f"{reason}; check the `tls:` files and that the PACS speaks DICOM over TLS on this port"


def lost_response_error(
    operation: str, where: str, dimse_timeout: float, aborted: bool
) -> RemoteError:
    """No (valid) response: the association was aborted or timed out. Also
    what pynetdicom's lost-response race (pydicom/pynetdicom#875) looks
    like, so it is always retriable on a fresh association."""
    why = (
        "the association was aborted or closed by the PACS"
        if aborted
        else f"no response within {dimse_timeout:g} s (dimse_timeout)"
    )
    return RemoteError(f"{operation} to {where} got no answer: {why}", retriable=True)
