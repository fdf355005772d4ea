"""A STOW-RS server for destination tests (werkzeug, 127.0.0.1): keeps what
it receives in memory, answers QIDO-RS over it (so dqr can verify), and
injects faults::

    POST {url}/studies                                  (STOW-RS)
    GET  {url}/studies                                  (echo: [])
    GET  {url}/studies/{study}/series/{series}/instances

Faults (``server.faults``, changeable while it runs): ``delay`` seconds
before each answer (slow acknowledgements); ``refuse`` maps a SOP Instance
UID to the FailureReason put in FailedSOPSequence (202 when others were
stored, 409 when none was); the next ``unavailable`` requests get 503 and
the next ``server_errors`` 500; the next ``cut`` STOW requests have their
connection closed without an answer (after the body was read, nothing
stored).

Counters: ``requests`` (per kind: ``stow``, ``qido``), ``stored`` (STOW
parts per SOP Instance UID, refused ones included), ``received`` (UID ->
Part-10 bytes), ``max_concurrent_requests``.
"""

from __future__ import annotations

import json
import socket
import time
from collections import Counter
from io import BytesIO
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydicom import dcmread
from werkzeug.wrappers import Request, Response

from dqr.plugins.destinations.common import parse_part10
from dqr.plugins.dicomweb.multipart import boundary_from_content_type, iter_parts
from dqr.plugins.testpacs.mockpacs.wsgi import WsgiServer


class StowFaults(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    delay: float = Field(0.0, ge=0)
    refuse: dict[str, int] = Field(default_factory=dict, description="SOP Instance UID -> FailureReason")
    unavailable: int = Field(0, ge=0, description="next N requests answered 503")
    server_errors: int = Field(0, ge=0, description="next N requests answered 500")
    cut: int = Field(0, ge=0, description="next N STOW requests: connection closed, no answer")
    lose: list[str] = Field(default_factory=list, description="SOP Instance UIDs acknowledged but not kept")


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    port: int = Field(0, ge=0, le=65535)
    prefix: str = "/dicom-web"
    faults: StowFaults = StowFaults()


def _element(vr: str, *values: Any) -> dict[str, Any]:
    return {"vr": vr, "Value": list(values)}


class MockStowServer(WsgiServer):
    def __init__(self, config: Config) -> None:
        self.config = config
        self.faults = config.faults.model_copy(deep=True)
        self.stored: Counter[str] = Counter()
        self.received: dict[str, bytes] = {}
        self._series: dict[str, tuple[str, str]] = {}
        super().__init__(config.port, config.prefix, "mock-stow")

    def describe(self) -> str:
        return f"STOW-RS at {self.url} ({len(self.received)} instances received)"

    def _take(self, name: str) -> bool:
        with self._lock:
            if getattr(self.faults, name) > 0:
                setattr(self.faults, name, getattr(self.faults, name) - 1)
                return True
        return False

    def _wsgi(self, environ: dict[str, Any], start_response: Any):
        request = Request(environ)
        self._enter("stow" if request.method == "POST" else "qido")
        try:
            response = self._answer(request)
        finally:
            self._leave()
        return response(environ, start_response)

    def _answer(self, request: Request) -> Response:
        path = request.path[len(self._prefix) :] if request.path.startswith(self._prefix) else request.path
        parts = [p for p in path.split("/") if p]
        if self.faults.delay:
            time.sleep(self.faults.delay)
        if self._take("unavailable"):
            return Response("busy\n", 503, headers={"Retry-After": "0"})
        if self._take("server_errors"):
            return Response("mock failure\n", 500)
        if request.method == "POST" and parts == ["studies"]:
            return self._stow(request)
        if request.method == "GET" and parts == ["studies"]:
            return Response("[]", 200, content_type="application/dicom+json")
        if request.method == "GET" and len(parts) == 5 and parts[0] == "studies" and parts[2] == "series":
            return self._instances(parts[1], parts[3])
        return Response("not found\n", 404)

    def _stow(self, request: Request) -> Response:
        boundary = boundary_from_content_type(request.headers.get("Content-Type", ""))
        if boundary is None:
            return Response("multipart/related with a boundary expected\n", 415)
        body = request.get_data()
        if self._take("cut"):
            request.environ["werkzeug.socket"].shutdown(socket.SHUT_RDWR)
            raise ConnectionAbortedError("mock: connection cut (fault injection)")
        referenced, failed = [], []
        for part in iter_parts([body], boundary):
            info = parse_part10(part)
            uid = info.sop_instance_uid
            with self._lock:
                self.stored[uid] += 1
                reason = self.faults.refuse.get(uid)
            item = {
                "00081150": _element("UI", info.sop_class_uid),
                "00081155": _element("UI", uid),
            }
            if reason is not None:
                item["00081197"] = _element("US", reason)
                failed.append(item)
                continue
            dataset = dcmread(BytesIO(part), stop_before_pixels=True)
            with self._lock:
                if uid not in self.faults.lose:  # a server that acknowledges, then loses it
                    self.received[uid] = part
                    self._series[uid] = (str(dataset.StudyInstanceUID), str(dataset.SeriesInstanceUID))
            referenced.append(item)
        answer: dict[str, Any] = {}
        if referenced:
            answer["00081199"] = {"vr": "SQ", "Value": referenced}
        if failed:
            answer["00081198"] = {"vr": "SQ", "Value": failed}
        status = 200 if not failed else 202 if referenced else 409
        return Response(json.dumps(answer), status, content_type="application/dicom+json")

    def _instances(self, study: str, series: str) -> Response:
        with self._lock:
            held = [uid for uid, (st, se) in self._series.items() if (st, se) == (study, series)]
        answers = [{"00080018": _element("UI", uid), "0020000E": _element("UI", series)} for uid in held]
        return Response(json.dumps(answers), 200, content_type="application/dicom+json")

    def forget(self, uids: list[str]) -> None:
        with self._lock:
            for uid in uids:
                self.received.pop(uid, None)
                self._series.pop(uid, None)


def serve(pacs: Any, config: Config | None = None) -> MockStowServer:
    """Start a STOW-RS server in a background thread (``pacs`` is unused)."""
    return MockStowServer(config or Config()).start()
