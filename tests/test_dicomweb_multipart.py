"""Splitting a multipart/related body as it arrives, and reading file meta."""

from __future__ import annotations

import pytest

from dqr.plugins.dicomweb.multipart import (
    MultipartError,
    TruncatedMultipartError,
    boundary_from_content_type,
    iter_parts,
    received_instance,
)
from dqr.plugins.testpacs.memory.synthetic import encode, generate_cohort

BOUNDARY = b"b0undary"


def body(parts: list[bytes], with_length: bool) -> bytes:
    out = b"preamble to ignore\r\n"
    for part in parts:
        length = b"Content-Length: %d\r\n" % len(part) if with_length else b""
        out += b"--" + BOUNDARY + b"\r\nContent-Type: application/dicom\r\n" + length + b"\r\n" + part + b"\r\n"
    return out + b"--" + BOUNDARY + b"--\r\nepilogue"


def in_chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


PARTS = [b"first\r\n--b0undar", b"", b"x" * 5000, b"\r\n\r\nlast"]


@pytest.mark.parametrize("with_length", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 7, 4096, 100000])
def test_parts_come_out_whole_whatever_the_chunking(with_length, chunk_size):
    parts = list(iter_parts(in_chunks(body(PARTS, with_length), chunk_size), BOUNDARY))

    assert parts == [p for p in PARTS if p]


@pytest.mark.parametrize("with_length", [True, False])
def test_body_without_closing_boundary_is_truncated(with_length):
    data = body(PARTS, with_length)
    cut = data[: data.rindex(b"--" + BOUNDARY + b"--")]

    with pytest.raises(TruncatedMultipartError):
        list(iter_parts(in_chunks(cut, 100), BOUNDARY))


def test_part_with_length_is_delivered_before_the_next_boundary_arrives():
    data = body([b"A" * 10, b"B" * 10], with_length=True)
    first_part_end = data.index(b"A" * 10) + 10

    parts = []
    with pytest.raises(TruncatedMultipartError):
        for part in iter_parts([data[:first_part_end]], BOUNDARY):
            parts.append(part)

    assert parts == [b"A" * 10]


def test_part_longer_than_its_content_length_is_an_error():
    data = body([b"A" * 10], with_length=True).replace(b"Content-Length: 10", b"Content-Length: 8")

    with pytest.raises(MultipartError, match="longer than its Content-Length"):
        list(iter_parts([data], BOUNDARY))


def test_boundary_is_read_from_the_content_type():
    header = 'multipart/related; type="application/dicom"; boundary="abc-123"'

    assert boundary_from_content_type(header) == b"abc-123"
    assert boundary_from_content_type("multipart/related") is None


def test_received_instance_splits_file_meta_from_dataset():
    dataset = next(iter(generate_cohort()))
    part10 = encode(dataset)

    instance = received_instance(part10)

    assert instance.sop_instance_uid == dataset.SOPInstanceUID
    assert instance.sop_class_uid == dataset.SOPClassUID
    assert instance.transfer_syntax == dataset.file_meta.TransferSyntaxUID
    assert part10.endswith(instance.dataset) and instance.dataset[:4] == b"\x08\x00\x05\x00"


def test_part_that_is_not_part10_is_an_error():
    with pytest.raises(MultipartError, match="not a DICOM Part-10 file"):
        received_instance(b"\0" * 200)
