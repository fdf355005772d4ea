"""The ``dimse`` backend: a PACS reached over DICOM networking (pynetdicom).

C-ECHO, C-FIND (Study or Patient Root), and retrieval by C-GET or by C-MOVE
to dqr's own storage SCP. See docs/dimse.md for every key and for the
troubleshooting of association errors.

This module stays light (no pynetdicom import) so that ``dqr --help`` and
config validation stay fast; the backend is built in :func:`make_backend`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

import dqr
from dqr.config import SourceConfig, Strict

if TYPE_CHECKING:
    from dqr.backend import SourceContext

#: DICOM caps an AE title at 16 characters of the default repertoire (PS3.5 6.2).
AE_TITLE_MAX = 16


def validate_ae_title(value: str) -> str:
    """Check an AE title; leading/trailing spaces are insignificant in DICOM."""
    title = value.strip(" ")
    if not title:
        raise ValueError("an AE title cannot be blank")
    if len(title) > AE_TITLE_MAX:
        raise ValueError(
            f"AE title {title!r} has {len(title)} characters; DICOM allows at most {AE_TITLE_MAX}"
        )
    if "\\" in title:
        raise ValueError(f"AE title {title!r} contains a backslash, which DICOM forbids")
    if any(ord(char) < 32 or ord(char) == 127 for char in title):
        raise ValueError(f"AE title {title!r} contains a control character")
    if not title.isascii():
        raise ValueError(f"AE title {title!r} must be plain ASCII")
    return title


AETitle = Annotated[str, AfterValidator(validate_ae_title)]

#: The DIMSE stack used when a source names none.
DEFAULT_TRANSPORT = "native"


class TlsOptions(Strict):
    """DICOM over TLS. Paths are relative to the site config's directory."""

    ca_file: str | None = Field(None, description="CA bundle that signed the PACS's certificate")
    cert_file: str | None = Field(
        None, description="dqr's client certificate (PEM), if the PACS asks for one"
    )
    key_file: str | None = Field(None, description="private key of cert_file (PEM)")

    @model_validator(mode="after")
    def _key_with_cert(self) -> TlsOptions:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("give both `cert_file` and `key_file`, or neither")
        return self


class SourceTlsOptions(TlsOptions):
    """A source's ``tls:``: also for dqr's own storage SCP (C-MOVE)."""

    storage_scp: bool = Field(
        False,
        description="c-move: dqr's storage SCP speaks TLS too, with cert_file as its certificate "
        "(ca_file then verifies the PACS's)",
    )

    @model_validator(mode="after")
    def _scp_has_a_certificate(self) -> SourceTlsOptions:
        if self.storage_scp and self.cert_file is None:
            raise ValueError(
                "`storage_scp: true` needs `cert_file` and `key_file`: the storage SCP presents "
                "that certificate to the PACS"
            )
        return self


class DimseSourceConfig(SourceConfig):
    """``type: dimse``: a PACS spoken to over DIMSE."""

    type: Literal["dimse"] = "dimse"
    host: str
    port: int = Field(ge=1, le=65535)
    called_aet: AETitle
    calling_aet: AETitle = "DQR"
    query_model: Literal["study", "patient"] = Field(
        "study", description="Study Root or Patient Root C-FIND/C-GET/C-MOVE"
    )
    retrieve: Literal["auto", "c-get", "c-move"] = Field(
        "auto",
        description="auto: C-GET, falling back to C-MOVE (needs store_port) when the PACS refuses C-GET",
    )
    transport: Literal["native", "pynetdicom"] | None = Field(
        None,
        description="DIMSE stack: native (dqr's event loop; default) or pynetdicom",
    )
    move_destination: AETitle | None = Field(
        None, description="c-move: AE title the PACS sends to (default: calling_aet)"
    )
    store_port: int | None = Field(
        None, ge=0, le=65535, description="c-move: port of dqr's storage SCP (0 = any free port)"
    )
    store_host: str | None = Field(
        None,
        description="c-move: address dqr's storage SCP binds to (default: the local address that reaches `host`)",
    )
    move_source_aets: list[AETitle] | None = Field(
        None,
        description="c-move: calling AE titles allowed to send C-STOREs to dqr (default: called_aet)",
    )
    tls: SourceTlsOptions | None = None
    connect_timeout: float = Field(10.0, gt=0, description="TCP connect, seconds")
    acse_timeout: float = Field(
        30.0, gt=0, description="association negotiation and release, seconds"
    )
    dimse_timeout: float = Field(60.0, gt=0, description="waiting for one DIMSE response, seconds")
    network_timeout: float = Field(
        60.0, gt=0, description="an idle association is closed after, seconds"
    )
    move_timeout: float = Field(
        60.0, gt=0, description="c-move: wait for late C-STOREs after the final response, seconds"
    )

    @model_validator(mode="after")
    def _move_needs_a_receiver(self) -> DimseSourceConfig:
        if self.retrieve == "c-move" and self.store_port is None:
            raise ValueError(
                "retrieve: c-move needs `store_port`, the port of dqr's own storage SCP "
                "(the PACS must know it, with move_destination and this machine's address)"
            )
        return self

    @property
    def destination_aet(self) -> str:
        return self.move_destination or self.calling_aet

    @property
    def effective_transport(self) -> str:
        return self.transport or DEFAULT_TRANSPORT

    @property
    def source_aets(self) -> frozenset[str]:
        return frozenset(self.move_source_aets or [self.called_aet])


def make_backend(config: DimseSourceConfig, context: SourceContext, retrieve_mode: str | None = None):
    """``retrieve_mode``: what ``retrieve: auto`` found on an earlier run
    (``DimseBackend.retrieve_mode``, kept in the job state through
    ``learnt()`` and given back in ``context.learnt``), so that it is not
    probed again."""
    retrieve_mode = retrieve_mode or context.learnt.get("retrieve_mode")
    from dqr.plugins.dimse.backend import DimseBackend

    return DimseBackend(config, context, retrieve_mode=retrieve_mode)


@dqr.hookimpl
def dqr_register_backends(register):
    register("dimse", make_backend, DimseSourceConfig)
