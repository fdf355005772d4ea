"""Incremental ``multipart/related`` parsing and Part-10 file meta reading.

A WADO-RS answer is one multipart body holding every instance of a series:
it is split here as the bytes arrive, so that at most one instance (plus one
network chunk) is held in memory however large the series.

Not dicomweb-client's decoder: it decodes every part with pydicom (the
dataset would be parsed for nothing, and pixel data copied), and at the end
of the stream it yields whatever is left as a last part, so a connection cut
after a clean part boundary would pass a truncated instance on as if whole.
Here a body that stops before its closing boundary is an error.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from dqr.model import ReceivedInstance
from dqr.part10 import is_part10, read_file_meta


class MultipartError(ValueError):
    """The body is not a well-formed multipart body."""


class TruncatedMultipartError(MultipartError):
    """The body ended before its closing boundary."""


def boundary_from_content_type(content_type: str) -> bytes | None:
    """The ``boundary`` parameter of a Content-Type header, if any."""
    for parameter in content_type.split(";")[1:]:
        name, _, value = parameter.strip().partition("=")
        if name.strip().lower() == "boundary":
            return value.strip().strip('"').encode("latin-1")
    return None


class MultipartSplitter:
    """Splits a multipart body fed in chunks into part contents.

    The body is ``preamble --B CRLF part CRLF --B CRLF part ... CRLF --B--``;
    each ``part`` is headers, an empty line and the content. A part with a
    ``Content-Length`` header (Orthanc sends one) is complete as soon as that
    many bytes are here, so a connection cut just after it loses nothing; a
    part without one ends at the next boundary.
    """

    def __init__(self, boundary: bytes) -> None:
        self._delimiter = b"\r\n--" + boundary
        # A leading CRLF lets the first boundary (which has none) be found
        # like every other one.
        self._buffer = bytearray(b"\r\n")
        self._scan_from = 0
        self._in_preamble = True
        self._in_part = False
        self.finished = False

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        """Add bytes; yield the content of every part they completed."""
        self._buffer += chunk
        while not self.finished:
            if self._in_part:
                content = self._part()
                if content is None:
                    return
                if content:
                    yield content
            elif not self._boundary():
                return

    def close(self) -> None:
        """Say the body ended; raise if it ended too early."""
        if not self.finished:
            raise TruncatedMultipartError("the multipart body ended before its closing boundary")

    def _boundary(self) -> bool:
        """Consume a boundary line; ``False`` while it is not all here.
        Only the preamble may come before the first one; every later one
        must follow its part's content at once."""
        found = self._find_boundary()
        if found is None:
            return False
        after = found + len(self._delimiter)
        if len(self._buffer) < after + 2:
            return False
        if self._buffer[after : after + 2] == b"--":
            self.finished = True
            return True
        line_end = self._buffer.find(b"\r\n", after)  # transport padding may precede CRLF
        if line_end < 0:
            return False
        del self._buffer[: line_end + 2]
        self._scan_from = 0
        self._in_preamble = False
        self._in_part = True
        return True

    def _find_boundary(self) -> int | None:
        if not self._in_preamble:
            if len(self._buffer) < len(self._delimiter):
                return None
            if not self._buffer.startswith(self._delimiter):
                raise MultipartError("a part is longer than its Content-Length")
            return 0
        found = self._buffer.find(self._delimiter, self._scan_from)
        if found < 0:
            self._scan_from = max(0, len(self._buffer) - len(self._delimiter) + 1)
            return None
        self._scan_from = found
        return found

    def _part(self) -> bytes | None:
        """Consume one part's headers and content, or ``None`` if not all here."""
        headers = self._headers()
        if headers is None:
            return None
        content_start, length = headers
        if length is not None:
            end = content_start + length
            if len(self._buffer) < end:
                return None
        else:
            end = self._buffer.find(self._delimiter, max(content_start, self._scan_from))
            if end < 0:
                self._scan_from = max(content_start, len(self._buffer) - len(self._delimiter) + 1)
                return None
        content = bytes(self._buffer[content_start:end])
        del self._buffer[:end]
        self._scan_from = 0
        self._in_part = False
        return content

    def _headers(self) -> tuple[int, int | None] | None:
        """Where the current part's content starts and its Content-Length."""
        if self._buffer.startswith(b"\r\n"):  # a part without headers
            return 2, None
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > 65536:
                raise MultipartError("a part's headers do not end")
            return None
        length = None
        for line in bytes(self._buffer[:end]).split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length" and value.strip().isdigit():
                length = int(value)
        return end + 4, length


def iter_parts(chunks: Iterable[bytes], boundary: bytes) -> Iterator[bytes]:
    """Every part of a multipart body arriving as ``chunks``, as it completes."""
    splitter = MultipartSplitter(boundary)
    for chunk in chunks:
        yield from splitter.feed(chunk)
        if splitter.finished:
            return
    splitter.close()


# -- Part-10 file meta -----------------------------------------------------------

_SOP_CLASS = 0x0002
_SOP_INSTANCE = 0x0003
_TRANSFER_SYNTAX = 0x0010


def received_instance(part10: bytes) -> ReceivedInstance:
    """A :class:`ReceivedInstance` from a Part-10 file, the dataset left encoded."""
    if not is_part10(part10):
        raise MultipartError("a part is not a DICOM Part-10 file (no 'DICM' after the preamble)")
    meta, dataset_start = read_file_meta(part10)
    missing = [name for key, name in ((_SOP_CLASS, "SOP class"), (_SOP_INSTANCE, "SOP instance"),
                                      (_TRANSFER_SYNTAX, "transfer syntax")) if not meta.get(key)]
    if missing:
        raise MultipartError(f"a part's file meta lacks the {', '.join(missing)} UID")
    return ReceivedInstance(
        sop_class_uid=meta[_SOP_CLASS],
        sop_instance_uid=meta[_SOP_INSTANCE],
        transfer_syntax=meta[_TRANSFER_SYNTAX],
        dataset=part10[dataset_start:],
    )
