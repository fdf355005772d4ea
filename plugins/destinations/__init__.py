"""Network destinations: send relabeled studies to a Storage SCP (C-STORE:
a PACS, Orthanc, XNAT's DICOM receiver) or a DICOMweb archive (STOW-RS).

Configuration (see docs/destinations.md for every key)::

    destination:
      type: dimse
      host: 127.0.0.1
      port: 8104
      called_aet: XNAT
      calling_aet: DQR
      xnat_routing: true
      limits: {max_associations: 2}

    destination:
      type: dicomweb
      url: http://127.0.0.1:8042/dicom-web
      auth: {type: basic, username: dqr, password_env: DEST_PASSWORD}

This module holds the config models and the hooks only; the network code
(pynetdicom, requests) is loaded by the factories.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator, model_validator

import dqr
from dqr.config import DestinationConfig, Limits, Strict
from dqr.plugins.dicomweb import AuthConfig, NoAuth, check_service_url
from dqr.plugins.dimse import DEFAULT_TRANSPORT, AETitle, TlsOptions

if TYPE_CHECKING:
    from dqr.backend import DestinationContext
    from dqr.relabel import RelabelContext

#: STOW-RS: a series is sent in requests of at most this many bytes of DICOM.
DEFAULT_BATCH_BYTES = 50 * 1024 * 1024


class DestinationLimits(Strict):
    """How hard dqr may push a destination, and how it retries."""

    retries: int = Field(3, ge=0, le=20, description="retries of a retriable failure (busy, timeout, connection lost)")
    backoff_initial: float = Field(1.0, ge=0, description="first retry delay, seconds")
    backoff_max: float = Field(60.0, ge=0, description="longest retry delay, seconds")
    breaker_failures: int = Field(5, ge=1, description="consecutive failures to reach the destination that pause sending")
    breaker_cooldown: float = Field(30.0, ge=0, description="pause after the destination could not be reached, seconds")
    breaker_max_cooldowns: int = Field(5, ge=1, description="pauses in a row before giving up")

    def retry_limits(self) -> Limits:
        """The same settings in the shape :func:`dqr.throttle.call_with_retries` takes."""
        return Limits(
            retries=self.retries,
            backoff_initial=self.backoff_initial,
            backoff_max=self.backoff_max,
            breaker_failures=self.breaker_failures,
            breaker_cooldown=self.breaker_cooldown,
            breaker_max_cooldowns=self.breaker_max_cooldowns,
        )


class DimseDestinationLimits(DestinationLimits):
    max_associations: int = Field(2, ge=1, le=64, description="simultaneous associations to the destination")


class DicomwebDestinationLimits(DestinationLimits):
    max_requests: int = Field(2, ge=1, le=64, description="simultaneous STOW-RS/QIDO-RS requests to the destination")


class DimseDestinationConfig(DestinationConfig):
    """``destination: {type: dimse}``: C-STORE to a Storage SCP."""

    type: Literal["dimse"] = "dimse"
    host: str
    port: int = Field(ge=1, le=65535)
    called_aet: AETitle
    calling_aet: AETitle = "DQR"
    xnat_routing: bool = Field(
        False, description="write 'Project: <p> Subject: <s> Session: <e>' into Patient Comments (0010,4000)"
    )
    tls: TlsOptions | None = None
    transport: Literal["native", "pynetdicom"] | None = Field(
        None,
        description="DIMSE stack: native (dqr's own C-STORE requestor; default) or pynetdicom",
    )
    limits: DimseDestinationLimits = DimseDestinationLimits()
    verify: bool | Literal["commitment"] = Field(
        True, description="true: C-FIND at IMAGE level after each series; commitment: Storage Commitment; false: none"
    )
    commitment_port: int = Field(
        0, ge=0, le=65535, description="verify: commitment: port where dqr receives the N-EVENT-REPORT (0 = any free port)"
    )
    commitment_host: str = Field("0.0.0.0", description="verify: commitment: address the N-EVENT-REPORT receiver binds to")
    commitment_timeout: float = Field(60.0, gt=0, description="verify: commitment: seconds to wait for the N-EVENT-REPORT")
    connect_timeout: float = Field(10.0, gt=0, description="TCP connect, seconds")
    acse_timeout: float = Field(30.0, gt=0, description="association negotiation and release, seconds")
    dimse_timeout: float = Field(60.0, gt=0, description="waiting for one C-STORE/C-FIND response, seconds")
    network_timeout: float = Field(60.0, gt=0, description="an idle association is closed after, seconds")

    @property
    def effective_transport(self) -> str:
        """As for a dimse source: native unless named (TLS included)."""
        return self.transport or DEFAULT_TRANSPORT


class DicomwebDestinationConfig(DestinationConfig):
    """``destination: {type: dicomweb}``: STOW-RS to a DICOMweb server."""

    type: Literal["dicomweb"] = "dicomweb"
    url: str = Field(description="base URL of the DICOMweb service; instances are POSTed to <url>/studies")
    auth: AuthConfig = NoAuth()
    xnat_routing: bool = Field(
        False, description="write 'Project: <p> Subject: <s> Session: <e>' into Patient Comments (0010,4000)"
    )
    verify: bool = Field(True, description="true: QIDO-RS of the series' instances after each series; false: none")
    verify_tls: bool = Field(True, description="verify the server's TLS certificate")
    ca_bundle: str | None = Field(None, description="PEM file of CA certificates to trust")
    connect_timeout: float = Field(10.0, gt=0, description="seconds to open a connection")
    read_timeout: float = Field(300.0, gt=0, description="seconds to wait for the answer to a request")
    batch_bytes: int = Field(
        DEFAULT_BATCH_BYTES, ge=1, description="a STOW-RS request carries at most this many bytes of DICOM (one series)"
    )
    limits: DicomwebDestinationLimits = DicomwebDestinationLimits()

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return check_service_url(value)

    @field_validator("verify", mode="before")
    @classmethod
    def _no_commitment(cls, value: object) -> object:
        if value == "commitment":
            raise ValueError("Storage Commitment is a DIMSE service: use `verify: true` (QIDO-RS) or false")
        return value

    @model_validator(mode="after")
    def _tls_options_agree(self) -> DicomwebDestinationConfig:
        if self.ca_bundle is not None and not self.verify_tls:
            raise ValueError("`ca_bundle` is only used when `verify_tls` is true")
        return self


def make_dimse_destination(config: DimseDestinationConfig, context: DestinationContext):
    from dqr.plugins.destinations.dimse_store import DimseDestination

    return DimseDestination(config, context)


def make_dicomweb_destination(config: DicomwebDestinationConfig, context: DestinationContext):
    from dqr.plugins.destinations.stow import StowDestination

    return StowDestination(config, context)


@dqr.hookimpl
def dqr_register_destinations(register):
    register("dimse", make_dimse_destination, DimseDestinationConfig)
    register("dicomweb", make_dicomweb_destination, DicomwebDestinationConfig)


def xnat_routing_line(project: str, subject: str, session: str) -> str:
    """What XNAT's DICOM receiver reads first from Patient Comments to place a session."""
    return f"Project: {project} Subject: {subject} Session: {session}"


@dqr.hookimpl
def dqr_relabel(context: RelabelContext) -> None:
    destination = context.destination
    if not getattr(destination, "xnat_routing", False):
        return
    line = xnat_routing_line(destination.project, context.labels.subject, context.labels.session)
    context.set("PatientComments", line)
