"""The DICOMweb backend: QIDO-RS queries, WADO-RS retrieval streamed into
the store callback.

One :class:`requests.Session` is shared by every engine thread, with a
connection pool as large as the source's limits allow; two semaphores keep
simultaneous queries within ``limits.max_queries`` and simultaneous
retrievals within ``limits.max_retrievals``. Failures raise :class:`dqr.errors.RemoteError`
once, classified (see :mod:`dqr.plugins.dicomweb.http_errors`); retrying is
the engine's job, so nothing here loops on an error.

Warnings: a query that matched nothing although one of its values holds
characters some servers mishandle is not an error, but must not be silent.
It is logged (logger ``dqr.plugins.dicomweb.backend``, level WARNING,
naming the CSV line and the keywords, never the values) and appended to
``query.warnings`` (a list of strings the engine shows with the row).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any
from urllib.parse import quote, urlsplit

import requests
from requests.adapters import HTTPAdapter

import dqr
from dqr.backend import SourceContext, StoreCallback
from dqr.errors import ConfigError, RemoteError, UntrustedValueError
from dqr.model import (
    Instance,
    ReceivedInstance,
    RetrieveReport,
    RetrieveRequest,
    Series,
    Study,
    StudyQuery,
    StudyRetrieveRequest,
)
from dqr.plugins.dicomweb import DicomwebSourceConfig
from dqr.plugins.dicomweb.credentials import credential_keys, make_auth
from dqr.plugins.dicomweb.http_errors import Operation, error_for_exception, error_for_status
from dqr.plugins.dicomweb.metadata import JsonArrayError, iter_json_array, series_from_metadata
from dqr.plugins.dicomweb.multipart import (
    MultipartError,
    TruncatedMultipartError,
    boundary_from_content_type,
    iter_parts,
    received_instance,
)
from dqr.plugins.dicomweb.qido import (
    INSTANCE_FIELDS,
    SERIES_FIELDS,
    STUDY_FIELDS,
    describe_characters,
    encode_filter,
    instance_from_json,
    json_text,
    query_string,
    series_from_json,
    split_uid_lists,
    still_matches,
    study_from_json,
    suspicious_keys,
)
from dqr.throttle import Deadline

logger = logging.getLogger(__name__)

QIDO_ACCEPT = "application/dicom+json, application/json"
#: ``transfer-syntax=*``: the instances as stored (no transcoding), so the
#: archive holds byte-identical pixel data.
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
CHUNK_SIZE = 256 * 1024


def _join(base: str, prefix: str | None) -> str:
    return f"{base}/{prefix}" if prefix else base


def _uid(uid: str) -> str:
    return quote(uid, safe="")


def _location(url: str) -> str:
    """The URL without its query string (which may hold patient names)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _resolve_ca_bundle(path: str, context: SourceContext) -> str:
    resolved = context.resolve(path)
    if not resolved.is_file():
        raise ConfigError(f"sources.{context.name}.ca_bundle: {resolved} is not a file")
    return str(resolved)


def make_session(config: DicomwebSourceConfig, context: SourceContext) -> requests.Session:
    """The source's HTTP session: credentials and a pool with a connection
    for every request the limits allow at once."""
    auth = make_auth(config.auth, context.name, context.config_dir)
    session = requests.Session()  # not dicomweb-client's helper: the same, without importing that package
    session.auth = auth
    pool = context.limits.max_queries + context.limits.max_retrievals
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = f"dqr/{dqr.__version__}"
    return session


def tls_verify(config: DicomwebSourceConfig, context: SourceContext) -> bool | str:
    """requests' ``verify`` for the source, passed with every request:
    ``session.verify`` is overridden by $REQUESTS_CA_BUNDLE/$CURL_CA_BUNDLE
    (psf/requests#3829), so ``verify_tls: false`` would not always hold."""
    if not config.verify_tls:
        logger.warning(
            "source %s: TLS certificate verification is OFF (verify_tls: false): "
            "anyone between dqr and %s can read and change the traffic",
            context.name,
            urlsplit(config.url).netloc,
        )
        return False
    if config.ca_bundle:
        return _resolve_ca_bundle(config.ca_bundle, context)
    return True


def _add_warning(query: StudyQuery, message: str) -> None:
    query.warnings.append(message)
    logger.warning("%s", message)


def _with_progress(error: RemoteError, delivered: int) -> RemoteError:
    return RemoteError(
        f"{error} ({delivered} instances had arrived and were stored)",
        retriable=error.retriable,
        slow_down=error.slow_down,
        retry_after=error.retry_after,
        unreachable=error.unreachable,
    )


def _within(deadline: Deadline, what: str, chunks: Iterator[bytes]) -> Iterator[bytes]:
    """``chunks`` until ``deadline`` passes: a trickling answer is cut there
    (a stalled one by the read timeout, which the deadline bounds)."""
    for chunk in chunks:
        deadline.check(what)
        yield chunk


class DicomwebBackend:
    """A :class:`dqr.backend.Backend` for one ``type: dicomweb`` source."""

    def __init__(self, config: DicomwebSourceConfig, context: SourceContext) -> None:
        self.config = config
        self.source = context.name
        self._qido_url = _join(config.url, config.qido_prefix)
        self._wado_url = _join(config.url, config.wado_prefix)
        self._timeout = (config.connect_timeout, config.read_timeout)
        self._credentials = credential_keys(config.auth, context.name)
        self._session = make_session(config, context)
        self._verify = tls_verify(config, context)
        self._limits = context.limits
        self._query_slots = threading.BoundedSemaphore(context.limits.max_queries)
        self._retrieve_slots = threading.BoundedSemaphore(context.limits.max_retrievals)

    def __repr__(self) -> str:
        return f"DicomwebBackend(source={self.source!r}, url={self.config.url!r})"

    # -- HTTP --------------------------------------------------------------------

    def _operation(self, what: str, url: str) -> Operation:
        return Operation(what, _location(url), self.source, self._credentials)

    def _get(self, url: str, op: Operation, accept: str, stream: bool, deadline: Deadline) -> requests.Response:
        deadline.check(op.what)
        # No single read may outlast the operation's own bound.
        timeout = (self._timeout[0], max(0.01, min(self._timeout[1], deadline.remaining())))
        try:
            response = self._session.get(url, headers={"Accept": accept}, timeout=timeout, stream=stream, verify=self._verify)
        except requests.RequestException as exc:
            # `from None`: the requests exception's text holds the full URL,
            # query string (patient names) included.
            raise (deadline.error(op.what) if deadline.passed else error_for_exception(exc, op)) from None
        if response.status_code >= 400:
            error = error_for_status(response, op)
            response.close()
            raise error
        return response

    def _qido_page(self, url: str, op: Operation, deadline: Deadline) -> tuple[list[dict[str, Any]], bool]:
        """One QIDO-RS answer, and whether the server said more results exist
        (``Warning: 299``, PS3.18 6.7.1.2)."""
        with self._query_slots:
            response = self._get(url, op, QIDO_ACCEPT, False, deadline)
        more = "299" in response.headers.get("Warning", "")
        if not response.content:  # 204, or 200 with an empty body: no match
            return [], more
        try:
            answers = response.json()
        except ValueError:
            raise RemoteError(f"{op.what}: {op.where} answered something that is not DICOM JSON") from None
        return ([answers] if isinstance(answers, dict) else list(answers)), more

    def _qido(self, path: str, pairs: list[tuple[str, str]], what: str) -> Iterator[dict[str, Any]]:
        """Every answer of a QIDO-RS search, paged with limit/offset until the
        server has nothing more, so no match is silently cut off."""
        page_size = self.config.page_size
        offset = 0
        previous_first: Any = None
        deadline = Deadline(self._limits.query_timeout, "query_timeout")  # the whole search, every page
        while True:
            url = f"{path}?{query_string([*pairs, ('limit', str(page_size)), ('offset', str(offset))])}"
            page, more = self._qido_page(url, self._operation(what, url), deadline)
            if page and page[0] == previous_first:
                raise RemoteError(f"{what}: {_location(url)} ignores `offset`, so its answers cannot be paged")
            yield from page
            # A page larger than asked means the server ignored `limit` and
            # sent everything; a short page without a 299 warning is the last.
            if not page or len(page) > page_size or (len(page) < page_size and not more):
                return
            offset += len(page)
            previous_first = page[0]

    def _stream_instances(
        self, response: requests.Response, op: Operation, deadline: Deadline
    ) -> Iterator[ReceivedInstance]:
        """The instances of a WADO-RS answer, each as soon as it has arrived."""
        content_type = response.headers.get("Content-Type", "")
        media_type = content_type.split(";")[0].strip().lower()
        delivered = 0
        try:
            if media_type == "application/dicom":  # one bare instance: not standard, but seen
                parts: Iterator[bytes] = iter([response.content])
            elif media_type == "multipart/related" and boundary_from_content_type(content_type):
                boundary = boundary_from_content_type(content_type)
                parts = iter_parts(response.iter_content(CHUNK_SIZE), boundary)  # type: ignore[arg-type]
            else:
                raise RemoteError(f"{op.what}: {op.where} answered {content_type or 'no Content-Type'}, "
                                  'not multipart/related; type="application/dicom"')
            for part in parts:
                # A trickling answer is cut at the deadline; a stalled one is cut by the
                # read timeout, which the deadline bounds (see _get).
                if delivered:
                    deadline.check(op.what)
                instance = received_instance(part)
                delivered += 1
                yield instance
        except requests.RequestException as exc:
            error = deadline.error(op.what) if deadline.passed else error_for_exception(exc, op)
            raise _with_progress(error, delivered) from None
        except TruncatedMultipartError:
            raise _with_progress(
                RemoteError(f"{op.what}: {op.where}: the answer ended early", retriable=True), delivered
            ) from None
        except MultipartError as exc:
            raise _with_progress(RemoteError(f"{op.what}: {op.where}: {exc}"), delivered) from None

    def _retrieve_one(self, url: str, op: Operation, store: StoreCallback, deadline: Deadline) -> int:
        delivered = 0
        with self._retrieve_slots:
            response = self._get(url, op, WADO_ACCEPT, True, deadline)
            with response:
                for instance in self._stream_instances(response, op, deadline):
                    store(instance)  # store's own errors pass through unchanged
                    delivered += 1
        return delivered

    # -- Backend -------------------------------------------------------------------

    def echo(self) -> str:
        started = time.monotonic()
        url = f"{self._qido_url}/studies?limit=1"
        page, _ = self._qido_page(
            url, self._operation("echo (QIDO-RS search for one study)", url), Deadline(self._limits.query_timeout, "query_timeout")
        )
        elapsed = (time.monotonic() - started) * 1000
        holds = "has studies" if page else "holds no study"
        return f"DICOMweb service {self.config.url} answered QIDO-RS in {elapsed:.0f} ms ({holds})"

    def query_studies(self, query: StudyQuery) -> Iterator[Study]:
        filters = {key: value for key, value in query.filters.items() if value}
        # ModalitiesInStudy is not sent: Orthanc (1.10, DICOMweb 1.7) applies
        # limit/offset before matching computed attributes, so paging a query
        # on it silently loses matches. The engine matches it on the answers
        # (dqr.steps, for every backend), asking for series modalities where
        # an answer leaves them out.
        filters.pop("ModalitiesInStudy", None)
        what = f"QIDO-RS study search (CSV line {query.line})"
        found = 0
        for answer in self._study_answers(filters, what):
            found += 1
            yield study_from_json(answer)
        if not found:
            self._warn_if_suspicious(query, filters)

    def _study_answers(self, filters: dict[str, str], what: str) -> Iterator[dict[str, Any]]:
        """Study answers matching ``filters``: UID lists chunked, every chunk
        paged, widened values checked again."""
        fixed = [("fuzzymatching", "false"), ("includefield", ",".join(STUDY_FIELDS))]
        for chunk in split_uid_lists(filters, self.config.max_uid_list_length):
            encoded = [encode_filter(k, v, self.config.query_value_escaping) for k, v in chunk.items()]
            widened = [item for item in encoded if item.widened]
            pairs = [(item.keyword, item.sent) for item in encoded] + fixed
            for answer in self._qido(f"{self._qido_url}/studies", pairs, what):
                if not widened or still_matches(answer, widened):
                    yield answer

    def _warn_if_suspicious(self, query: StudyQuery, filters: dict[str, str]) -> None:
        keys = suspicious_keys(filters)
        if not keys:
            return
        held = "; ".join(f"{key} holds {describe_characters(filters[key])}" for key in keys)
        if self.config.query_value_escaping == "percent":
            advice = (
                "they were percent-encoded (query_value_escaping: percent), which some servers "
                f"(e.g. Orthanc) do not decode: try `query_value_escaping: raw` on sources.{self.source}"
            )
        else:
            advice = (
                "characters that cannot be sent as they are were sent as wildcards "
                "(query_value_escaping: raw); if the study exists, check the value, or try "
                f"`query_value_escaping: percent` on sources.{self.source} for a strict server"
            )
        _add_warning(
            query,
            f"CSV line {query.line}: no study matched on source {self.source} ({held}); "
            f"if a match was expected: {advice}",
        )

    def query_series(self, study: Study) -> Iterator[Series]:
        listed = self._series_from_metadata(study) if self.config.listing == "metadata" else None
        yield from self._series_from_qido(study) if listed is None else listed

    def _series_from_metadata(self, study: Study) -> list[Series] | None:
        """The study's series and their instances from one WADO-RS metadata
        request; ``None`` when the server refuses it, does not answer it with
        DICOM JSON or lists no instance (QIDO-RS then). Retriable failures
        are raised."""
        url = f"{self._wado_url}/studies/{_uid(study.study_uid)}/metadata"
        op = self._operation(f"WADO-RS study metadata (study {study.study_uid})", url)
        deadline = Deadline(self._limits.query_timeout, "query_timeout")
        try:
            with self._query_slots:
                response = self._get(url, op, QIDO_ACCEPT, True, deadline)
                with response:
                    answers = iter_json_array(_within(deadline, op.what, response.iter_content(CHUNK_SIZE)))
                    listed = series_from_metadata(study, answers)
            if listed:
                return listed
            # The study query found it, so it has instances: an empty answer
            # is a server that does not really answer metadata, not an empty study.
            logger.info("%s: %s listed no instance; listing with QIDO-RS", op.what, op.where)
        except requests.RequestException as exc:  # while reading the answer
            raise (deadline.error(op.what) if deadline.passed else error_for_exception(exc, op)) from None
        except RemoteError as exc:
            if exc.retriable or exc.unreachable or isinstance(exc, UntrustedValueError):
                raise
            logger.info("%s: %s; listing with QIDO-RS", op.what, exc)
        except JsonArrayError as exc:
            logger.info("%s: %s answered something that is not DICOM JSON (%s); listing with QIDO-RS", op.what, op.where, exc)
        return None

    def _series_from_qido(self, study: Study) -> Iterator[Series]:
        path = f"{self._qido_url}/studies/{_uid(study.study_uid)}/series"
        pairs = [("includefield", ",".join(SERIES_FIELDS))]
        answers = list(self._qido(path, pairs, f"QIDO-RS series search (study {study.study_uid})"))
        instances = self._instances_by_series(study)
        for answer in answers:
            series = series_from_json(study, answer)
            if instances is not None:
                found = instances.get(series.series_uid, [])
                series = replace(
                    series,
                    sop_class_uids=frozenset(i.sop_class_uid for i in found if i.sop_class_uid),
                    instance_uids=tuple(i.sop_instance_uid for i in found),
                )
            yield series

    def _instances_by_series(self, study: Study) -> dict[str, list[Instance]] | None:
        """Every instance of the study from one QIDO-RS request, grouped by
        series: the engine's expected instances without a request per
        series. ``None`` when the server refuses study-level instance search."""
        path = f"{self._qido_url}/studies/{_uid(study.study_uid)}/instances"
        pairs = [("includefield", ",".join(("SeriesInstanceUID", *INSTANCE_FIELDS)))]
        try:
            answers = self._qido(path, pairs, f"QIDO-RS instance search (study {study.study_uid})")
            found: dict[str, list[Instance]] = {}
            for answer in answers:
                series_uid = json_text(answer, "SeriesInstanceUID")
                found.setdefault(series_uid, []).append(instance_from_json(Series(study.study_uid, series_uid), answer))
            return found
        except RemoteError as exc:
            if exc.retriable or exc.unreachable:
                raise
            return None

    def query_instances(self, study: Study, series: Series) -> Iterator[Instance]:
        path = f"{self._qido_url}/studies/{_uid(study.study_uid)}/series/{_uid(series.series_uid)}/instances"
        pairs = [("includefield", ",".join(INSTANCE_FIELDS))]
        for answer in self._qido(path, pairs, f"QIDO-RS instance search (series {series.series_uid})"):
            yield instance_from_json(series, answer)

    def retrieve(self, request: RetrieveRequest, store: StoreCallback) -> RetrieveReport:
        series_url = (
            f"{self._wado_url}/studies/{_uid(request.study.study_uid)}/series/{_uid(request.series.series_uid)}"
        )
        if request.sop_instance_uids is None:
            targets = [(series_url, f"WADO-RS series retrieve ({request.series.series_uid})")]
        else:
            targets = [
                (f"{series_url}/instances/{_uid(uid)}", f"WADO-RS instance retrieve ({uid})")
                for uid in request.sop_instance_uids
            ]
        deadline = Deadline(self._limits.retrieve_timeout, "retrieve_timeout")  # the whole request
        for url, what in targets:
            self._retrieve_one(url, self._operation(what, url), store, deadline)
        return RetrieveReport()

    def retrieve_study(self, request: StudyRetrieveRequest, store: StoreCallback) -> RetrieveReport:
        url = f"{self._wado_url}/studies/{_uid(request.study.study_uid)}"
        deadline = Deadline(self._limits.retrieve_timeout, "retrieve_timeout")
        self._retrieve_one(url, self._operation(f"WADO-RS study retrieve ({request.study.study_uid})", url), store, deadline)
        return RetrieveReport()

    def close(self) -> None:
        self._session.close()
