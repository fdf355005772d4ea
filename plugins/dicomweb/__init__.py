"""The ``dicomweb`` backend: QIDO-RS queries and WADO-RS retrieval over HTTP(S).

Configuration (see docs/dicomweb.md for every key)::

    sources:
      web:
        type: dicomweb
        url: https://pacs.example.org/dicom-web
        auth: {type: basic, username: dqr, password_env: DQR_PASSWORD}

Secrets are never in the YAML: ``password_env``/``token_env`` name an
environment variable, ``password_file``/``token_file`` a file. They are read
when the backend is built, not when the config is validated.

This module only holds the config models and the hook: the HTTP code (and
its imports of requests and dicomweb-client) is loaded by the factory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

import dqr
from dqr.config import SourceConfig, Strict

if TYPE_CHECKING:
    from dqr.backend import SourceContext


class NoAuth(Strict):
    """``auth: {type: none}`` (the default): no credentials are sent."""

    type: Literal["none"] = "none"


class BasicAuth(Strict):
    """``auth: {type: basic, username: ..., password_env: VAR}`` (or ``password_file``)."""

    type: Literal["basic"]
    username: str = Field(min_length=1)
    password_env: str | None = Field(None, description="environment variable holding the password")
    password_file: str | None = Field(None, description="file holding the password (first line)")

    @model_validator(mode="after")
    def _one_password_origin(self) -> BasicAuth:
        if (self.password_env is None) == (self.password_file is None):
            raise ValueError("give exactly one of `password_env` or `password_file`")
        return self


class BearerAuth(Strict):
    """``auth: {type: bearer, token_file: ...}`` (or ``token_env``)."""

    type: Literal["bearer"]
    token_env: str | None = Field(None, description="environment variable holding the token")
    token_file: str | None = Field(None, description="file holding the token (first line)")

    @model_validator(mode="after")
    def _one_token_origin(self) -> BearerAuth:
        if (self.token_env is None) == (self.token_file is None):
            raise ValueError("give exactly one of `token_env` or `token_file`")
        return self


AuthConfig = Annotated[NoAuth | BasicAuth | BearerAuth, Field(discriminator="type")]

#: ``query_value_escaping`` values; see :mod:`dqr.plugins.dicomweb.qido`.
QueryValueEscaping = Literal["raw", "percent"]
#: ``listing`` values: how a selected study's series and instances are
#: learnt; see :mod:`dqr.plugins.dicomweb.metadata`.
Listing = Literal["metadata", "qido"]


def check_service_url(value: str) -> str:
    """A DICOMweb service URL (a source's or a destination's): http(s) with a
    host, no credentials, no query; without its trailing slash."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise ValueError("credentials never go in the URL: use `auth:`")
    if parts.query or parts.fragment:
        raise ValueError("must not have a query (?...) or fragment (#...)")
    return value.rstrip("/")


class DicomwebSourceConfig(SourceConfig):
    """``type: dicomweb``: a DICOMweb server (QIDO-RS and WADO-RS)."""

    type: Literal["dicomweb"] = "dicomweb"
    url: str = Field(description="base URL of the DICOMweb service, e.g. http://host:8042/dicom-web")
    qido_prefix: str | None = Field(None, description="path added to `url` for QIDO-RS only")
    wado_prefix: str | None = Field(None, description="path added to `url` for WADO-RS only")
    auth: AuthConfig = NoAuth()
    verify_tls: bool = Field(True, description="verify the server's TLS certificate")
    ca_bundle: str | None = Field(None, description="PEM file of CA certificates to trust")
    connect_timeout: float = Field(10.0, gt=0, description="seconds to open a connection")
    read_timeout: float = Field(120.0, gt=0, description="seconds to wait for the next bytes")
    query_value_escaping: QueryValueEscaping = Field(
        "raw",
        description=(
            "raw: send query-string-legal characters as they are and turn the others into "
            "wildcards, re-checking answers (works with Orthanc, which does not percent-decode); "
            "percent: RFC 3986 percent-encoding (for servers that decode it)"
        ),
    )
    listing: Listing = Field(
        "metadata",
        description=(
            "metadata: a selected study's series and instances from one WADO-RS metadata request "
            "(QIDO-RS if the server refuses it); qido: from a QIDO-RS series search and instance search"
        ),
    )
    page_size: int = Field(1000, ge=1, description="QIDO-RS `limit` per request; answers are paged")
    max_uid_list_length: int = Field(
        2000, ge=64, description="characters of a UID list per QIDO-RS request (longer lists are split)"
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return check_service_url(value)

    @field_validator("qido_prefix", "wado_prefix")
    @classmethod
    def _check_prefix(cls, value: str | None) -> str | None:
        return value.strip("/") if value else None

    @model_validator(mode="after")
    def _tls_options_agree(self) -> DicomwebSourceConfig:
        if self.ca_bundle is not None and not self.verify_tls:
            raise ValueError("`ca_bundle` is only used when `verify_tls` is true")
        return self


def make_backend(config: DicomwebSourceConfig, context: SourceContext):  # -> DicomwebBackend
    from dqr.plugins.dicomweb.backend import DicomwebBackend

    return DicomwebBackend(config, context)


@dqr.hookimpl
def dqr_register_backends(register):
    register("dicomweb", make_backend, DicomwebSourceConfig)
