"""The in-memory PACS over QIDO-RS/WADO-RS, with fault injection, for tests.

A threaded werkzeug server on 127.0.0.1 (``port: 0`` picks a free port)::

    GET {url}/studies[?PatientName=DOE*&limit=10&offset=0&includefield=...]
    GET {url}/studies/{study}/series              GET {url}/series
    GET {url}/studies/{study}/series/{series}/instances
    GET {url}/studies/{study}/instances           GET {url}/instances
    GET {url}/studies/{study}[/series/{series}[/instances/{sop}]]   (WADO-RS)
    GET {url}/studies/{study}/metadata            (WADO-RS metadata)

QIDO answers are DICOM JSON with the standard's default attributes of the
level, the ``includefield`` ones and the matching keys; matching is
:meth:`MemoryPacs.find`'s (wildcards, date ranges, comma lists). WADO answers
are ``multipart/related; type="application/dicom"``, streamed one instance
at a time. A study's metadata is every instance's study, series and
instance attributes as DICOM JSON (``metadata: not-found`` answers 404
instead, like a server without it; ``empty``, an empty array).

Faults (``Config.faults``, or ``server.faults`` changed while it runs):
``delay`` seconds before every answer; the next ``throttle`` requests get
429 and the next ``unavailable`` ones 503, both with ``Retry-After:
retry_after``; the next ``server_errors`` get 500; ``cut_after_parts``
closes the connection of every WADO answer after that many instances;
``on`` restricts status faults to ``qido``, ``wado`` (instances) or
``metadata`` requests; ``hostile``
serves hostile content (:mod:`dqr.plugins.testpacs.memory.hostile`). ``auth``
makes every request need basic or bearer credentials.
``decode_percent_escapes: false`` behaves like Orthanc's DICOMweb plugin,
which does not percent-decode QIDO values (except ``%2C``).

Counters: ``requests`` (per kind: ``qido-studies``, ``wado-series``,
``metadata-study``, ...),
``current_requests`` and ``max_concurrent_requests`` (a request counts until
the last byte of its answer is handed to the socket).
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from werkzeug.exceptions import HTTPException, NotFound
from werkzeug.routing import Map, Rule
from werkzeug.wrappers import Request, Response

from dqr.model import DATE_KEYWORDS, UID_KEYWORDS
from dqr.plugins.testpacs.memory.hostile import HostileFaults, deliveries, rewrite
from dqr.plugins.testpacs.memory.pacs import MemoryPacs
from dqr.plugins.testpacs.mockpacs.wsgi import WsgiServer

#: Attributes every answer of a level carries (PS3.18 table 10.6.3-3/4/5,
#: as far as the memory PACS knows them).
DEFAULT_FIELDS = {
    "STUDY": (
        "StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy", "ReferringPhysicianName",
        "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
        "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
    ),
    "SERIES": ("Modality", "SeriesInstanceUID", "SeriesNumber", "NumberOfSeriesRelatedInstances"),
    "IMAGE": ("SOPClassUID", "SOPInstanceUID", "InstanceNumber"),
}
#: Parameters that are not matching keys.
CONTROL_PARAMETERS = frozenset({"limit", "offset", "includefield", "fuzzymatching"})


class MockAuth(BaseModel):
    """Credentials the mock demands (test credentials, not secrets)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["none", "basic", "bearer"] = "none"
    username: str = ""
    password: str = ""
    token: str = ""


class Faults(BaseModel):
    """Injected faults; change them on a running server (``server.faults.x = ...``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    delay: float = Field(0.0, ge=0)
    throttle: int = Field(0, ge=0, description="next N requests answered 429")
    unavailable: int = Field(0, ge=0, description="next N requests answered 503")
    retry_after: str = Field("1", description="Retry-After of 429/503: seconds or an HTTP date")
    server_errors: int = Field(0, ge=0, description="next N requests answered 500")
    cut_after_parts: int | None = Field(None, ge=0, description="cut WADO answers after N instances")
    part_delay: float = Field(0.0, ge=0, description="seconds a WADO answer stalls before each instance after the first")
    on: Literal["any", "qido", "wado", "metadata"] = "any"
    hostile: HostileFaults = Field(default_factory=HostileFaults, description="hostile content (UID rewrites apply at start)")


class Config(BaseModel):
    """The ``dicomweb:`` section of a mock-PACS config."""

    model_config = ConfigDict(extra="forbid")

    port: int = Field(0, ge=0, le=65535)
    prefix: str = "/dicom-web"
    auth: MockAuth = MockAuth()
    faults: Faults = Faults()
    decode_percent_escapes: bool = True
    metadata: Literal["answered", "not-found", "empty"] = Field(
        "answered", description="WADO-RS study metadata: answered, 404 (a server without it), or an empty array"
    )


ROUTES = Map(
    [
        Rule("/studies", endpoint=("qido", "STUDY")),
        Rule("/series", endpoint=("qido", "SERIES")),
        Rule("/instances", endpoint=("qido", "IMAGE")),
        Rule("/studies/<study>/series", endpoint=("qido", "SERIES")),
        Rule("/studies/<study>/instances", endpoint=("qido", "IMAGE")),
        Rule("/studies/<study>/series/<series>/instances", endpoint=("qido", "IMAGE")),
        Rule("/studies/<study>", endpoint=("wado", "study")),
        Rule("/studies/<study>/metadata", endpoint=("metadata", "study")),
        Rule("/studies/<study>/series/<series>", endpoint=("wado", "series")),
        Rule("/studies/<study>/series/<series>/instances/<sop>", endpoint=("wado", "instance")),
    ]
)
QIDO_KINDS = {"STUDY": "qido-studies", "SERIES": "qido-series", "IMAGE": "qido-instances"}


class BadQuery(ValueError):
    """A QIDO query the server refuses (HTTP 400)."""


# -- QIDO ----------------------------------------------------------------------------


def _raw_parameters(query_string: str) -> list[tuple[str, str]]:
    """Orthanc-style parsing: split on & and =, decode only ``%2C``."""
    if any(ord(c) > 127 for c in query_string):
        raise BadQuery("raw non-ASCII bytes in the query")
    pairs = []
    for item in filter(None, query_string.split("&")):
        key, _, value = item.partition("=")
        pairs.append((key, value.replace("%2C", ",").replace("%2c", ",")))
    return pairs


def _keyword(name: str) -> str:
    if len(name) == 8 and all(c in "0123456789abcdefABCDEF" for c in name):
        keyword = keyword_for_tag(int(name, 16))
    else:
        keyword = name if tag_for_keyword(name) is not None else ""
    if not keyword:
        raise BadQuery(f"unknown attribute {name!r}")
    return keyword


def _match_value(keyword: str, value: str) -> str:
    """A QIDO value as a MemoryPacs filter (comma list -> backslash list)."""
    if keyword in DATE_KEYWORDS | UID_KEYWORDS and ("*" in value or "?" in value):
        raise BadQuery(f"wildcard in {keyword}")
    return value.replace(",", "\\")


class QidoQuery:
    """A parsed QIDO request: filters, included fields and paging."""

    def __init__(self, pairs: Iterable[tuple[str, str]], path_filters: dict[str, str]) -> None:
        self.filters = dict(path_filters)
        self.include: set[str] = set()
        self.include_all = False
        self.limit: int | None = None
        self.offset = 0
        for name, value in pairs:
            self._add(name, value)

    def _add(self, name: str, value: str) -> None:
        if name == "includefield":
            for field in filter(None, value.split(",")):
                if field == "all":
                    self.include_all = True
                else:
                    self.include.add(_keyword(field))
        elif name in ("limit", "offset"):
            if not value.isdigit():
                raise BadQuery(f"{name} must be a number")
            setattr(self, name, int(value))
        elif name not in CONTROL_PARAMETERS and value:
            keyword = _keyword(name)
            self.filters[keyword] = _match_value(keyword, value)

    def fields(self, level: str) -> set[str]:
        return set(DEFAULT_FIELDS[level]) | self.include | set(self.filters)

    def page(self, answers: list[dict[str, Any]]) -> list[dict[str, Any]]:
        end = None if self.limit is None else self.offset + self.limit
        return answers[self.offset : end]


def _json_element(keyword: str, value: Any) -> dict[str, Any]:
    vr = dictionary_VR(tag_for_keyword(keyword))
    values = list(value) if isinstance(value, (tuple, list)) else ([value] if value != "" else [])
    if vr == "PN":
        values = [{"Alphabetic": v} for v in values]
    elif vr in ("IS", "US", "UL"):
        values = [int(v) for v in values]
    element: dict[str, Any] = {"vr": vr}
    if values:
        element["Value"] = values
    return element


def dicom_json(answer: dict[str, Any], fields: set[str] | None) -> dict[str, Any]:
    """One answer as a DICOM JSON dataset (``fields=None``: everything)."""
    dataset = {}
    for keyword, value in answer.items():
        tag = tag_for_keyword(keyword)
        if tag is None or (fields is not None and keyword not in fields):
            continue
        dataset[f"{tag:08X}"] = _json_element(keyword, value)
    return dict(sorted(dataset.items()))


# -- WADO ------------------------------------------------------------------------------


def multipart_body(
    parts: Iterable[bytes], boundary: str, cut_after: int | None, cut: Callable[[], None], before_last: Callable[[], None]
) -> Iterator[bytes]:
    """A ``multipart/related`` body, one chunk per part. Calls ``cut()``
    (which must end the connection) once ``cut_after`` parts were sent, and
    ``before_last()`` just before the closing boundary."""
    marker = boundary.encode()
    sent = 0
    for part in parts:
        if cut_after is not None and sent >= cut_after:
            cut()
        header = b"--" + marker + b"\r\nContent-Type: application/dicom\r\nContent-Length: %d\r\n\r\n" % len(part)
        yield header + part + b"\r\n"
        sent += 1
    if cut_after is not None and sent >= cut_after:
        cut()
    before_last()
    yield b"--" + marker + b"--\r\n"


def _leave_before_last(body: Iterable[bytes], leave: Callable[[], None]) -> Iterator[bytes]:
    """``body``, calling ``leave()`` just before its last chunk is handed on."""
    iterator = iter(body)
    pending = next(iterator, None)
    while pending is not None:
        following = next(iterator, None)
        if following is None:
            leave()
        yield pending
        pending = following


class _Visit:
    """One request's place in ``current_requests``: it leaves once, just
    before the last bytes of its answer are handed to the socket (a client
    that has the whole answer may send its next request at once, and must
    not find this one still counted), or when the answer is abandoned."""

    def __init__(self, server: MockDicomwebServer) -> None:
        self._server = server
        self._left = False
        self.streams = False  # the body calls leave() itself (WADO)

    def leave(self) -> None:
        if not self._left:
            self._left = True
            self._server._leave()


class MockDicomwebServer(WsgiServer):
    """A running mock DICOMweb server; see the module docstring."""

    def __init__(self, pacs: MemoryPacs, config: Config) -> None:
        self.pacs = rewrite(pacs, config.faults.hostile)
        self.config = config
        self.faults = config.faults.model_copy()
        self.auth = config.auth
        super().__init__(config.port, config.prefix, "mock-dicomweb")

    def describe(self) -> str:
        return (
            f"QIDO-RS/WADO-RS at {self.url} ({len(self.pacs)} instances of "
            f"{len(self.pacs.study_uids())} studies; auth: {self.auth.type})"
        )

    # -- accounting ---------------------------------------------------------------

    def _visit(self, kind: str) -> _Visit:
        self._enter(kind)
        return _Visit(self)

    @staticmethod
    def _counted(body: Iterable[bytes], visit: _Visit) -> Iterator[bytes]:
        try:
            yield from body if visit.streams else _leave_before_last(body, visit.leave)
        finally:
            visit.leave()

    def _take_fault(self, name: str, kind: str) -> bool:
        """Consume one unit of a counted fault that applies to ``kind``."""
        with self._lock:
            applies = self.faults.on == "any" or kind.startswith(self.faults.on)
            if applies and getattr(self.faults, name) > 0:
                setattr(self.faults, name, getattr(self.faults, name) - 1)
                return True
            return False

    # -- WSGI ----------------------------------------------------------------------

    def _wsgi(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        request = Request(environ)
        kind, endpoint, arguments = self._route(request)
        visit = self._visit(kind)
        try:
            response = self._respond(request, kind, endpoint, arguments, visit)
        except Exception:
            visit.leave()
            raise
        return self._counted(response(environ, start_response), visit)

    def _route(self, request: Request) -> tuple[str, Any, dict[str, str]]:
        path = request.path
        if not path.startswith(self._prefix + "/"):
            return "not-found", None, {}
        try:
            endpoint, arguments = ROUTES.bind("mock").match(path[len(self._prefix) :], method="GET")
        except HTTPException:
            return "not-found", None, {}
        kind = QIDO_KINDS[endpoint[1]] if endpoint[0] == "qido" else f"{endpoint[0]}-{endpoint[1]}"
        return kind, endpoint, arguments

    def _respond(
        self, request: Request, kind: str, endpoint: Any, arguments: dict[str, str], visit: _Visit
    ) -> Response:
        if not self._authorized(request):
            scheme = "Basic" if self.auth.type == "basic" else "Bearer"
            return Response("authentication required\n", 401, {"WWW-Authenticate": f'{scheme} realm="mock"'})
        fault = self._status_fault(kind)
        if fault is not None:
            return fault
        if endpoint is None:
            return NotFound().get_response()
        if endpoint[0] == "qido":
            return self._qido(request, endpoint[1], arguments)
        if endpoint[0] == "metadata":
            return self._metadata(arguments)
        return self._wado(request, endpoint[1], arguments, visit)

    def _authorized(self, request: Request) -> bool:
        if self.auth.type == "none":
            return True
        if self.auth.type == "basic":
            given = request.authorization
            return (
                given is not None
                and given.type == "basic"
                and (given.username, given.password) == (self.auth.username, self.auth.password)
            )
        return request.headers.get("Authorization", "") == f"Bearer {self.auth.token}"

    def _status_fault(self, kind: str) -> Response | None:
        if self.faults.delay:
            time.sleep(self.faults.delay)
        retry = {"Retry-After": self.faults.retry_after}
        if self._take_fault("throttle", kind):
            return Response("too many requests\n", 429, retry)
        if self._take_fault("unavailable", kind):
            return Response("unavailable\n", 503, retry)
        if self._take_fault("server_errors", kind):
            return Response("injected server error\n", 500)
        return None

    def _qido(self, request: Request, level: str, arguments: dict[str, str]) -> Response:
        path_filters = {
            "StudyInstanceUID": arguments.get("study", ""),
            "SeriesInstanceUID": arguments.get("series", ""),
        }
        try:
            if self.config.decode_percent_escapes:
                pairs: list[tuple[str, str]] = list(request.args.items(multi=True))
            else:
                pairs = _raw_parameters(request.environ.get("QUERY_STRING", ""))
            query = QidoQuery(pairs, {k: v for k, v in path_filters.items() if v})
        except BadQuery as exc:
            return Response(f"bad request: {exc}\n", 400)
        answers = query.page(self.pacs.find(level, query.filters))
        fields = None if query.include_all else query.fields(level)
        body = json.dumps([dicom_json(answer, fields) for answer in answers]).encode()
        return Response(body, 200, content_type="application/dicom+json")

    def _metadata(self, arguments: dict[str, str]) -> Response:
        answers = self.pacs.find("IMAGE", {"StudyInstanceUID": arguments["study"]})
        if not answers or self.config.metadata == "not-found":
            return NotFound().get_response()
        if self.config.metadata == "empty":
            answers = []
        body = json.dumps([dicom_json(answer, None) for answer in answers]).encode()
        return Response(body, 200, content_type="application/dicom+json")

    def _wado(self, request: Request, level: str, arguments: dict[str, str], visit: _Visit) -> Response:
        accept = request.headers.get("Accept", "*/*")
        if "application/dicom" not in accept and "*/*" not in accept:
            return Response("only multipart/related; type=application/dicom\n", 406)
        sops = [arguments["sop"]] if "sop" in arguments else None
        asked = list(self.pacs.instances(arguments["study"], arguments.get("series"), sops))
        instances = deliveries(self.pacs, self.faults.hostile, arguments["study"], arguments.get("series"), asked)
        if not instances:
            return NotFound().get_response()
        boundary = uuid.uuid4().hex
        cut_after = self.faults.cut_after_parts

        def cut() -> None:
            # Close the socket under werkzeug: the client sees the answer end
            # without its last chunk. ConnectionAbortedError is what werkzeug
            # treats as a dropped connection, quietly.
            request.environ["werkzeug.socket"].shutdown(socket.SHUT_RDWR)
            raise ConnectionAbortedError("mock: connection cut (fault injection)")

        visit.streams = True
        body = multipart_body(_stalling(instances, self.faults.part_delay), boundary, cut_after, cut, visit.leave)
        content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
        return Response(body, 200, content_type=content_type, direct_passthrough=True)


def _stalling(instances: list, delay: float) -> Iterator[bytes]:
    """The instances' files, with ``delay`` seconds before each but the first
    (a PACS that slows down or stops answering mid-series)."""
    for index, instance in enumerate(instances):
        if index and delay:
            time.sleep(delay)
        yield instance.read_part10()


def serve(pacs: MemoryPacs, config: Config | None = None) -> MockDicomwebServer:
    """Start serving ``pacs`` in a background thread; call ``.stop()`` when done."""
    return MockDicomwebServer(pacs, config or Config()).start()
