"""Reading a source's secret (late, from an environment variable or a file)
and attaching it to HTTP requests without it ever reaching a log or an error.

Secrets live in :class:`pydantic.SecretStr`, whose ``str``/``repr`` print
``**********``; only :meth:`__call__` of the auth classes unwraps them, to set
the ``Authorization`` header of an outgoing request.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import requests
from pydantic import SecretStr

from dqr.config import resolve_path
from dqr.errors import ConfigError
from dqr.plugins.dicomweb import AuthConfig, BasicAuth, BearerAuth


def _from_env(variable: str, key: str) -> SecretStr:
    value = os.environ.get(variable)
    if not value:
        raise ConfigError(f"{key}: the environment variable {variable} is not set or is empty")
    return SecretStr(value)


def _from_file(path: str, base: Path, key: str) -> SecretStr:
    resolved = resolve_path(path, base)
    try:
        text = resolved.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {resolved}: {exc.strerror}") from None
    # The first line only: files written by `echo` end with a newline that is
    # not part of the secret.
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise ConfigError(f"{key}: {resolved} is empty")
    return SecretStr(lines[0].strip())


def read_secret(env: str | None, file: str | None, key_prefix: str, base: Path) -> SecretStr:
    """The secret named by ``<key_prefix>_env`` or ``<key_prefix>_file``.

    ``key_prefix`` is the config key path (``sources.web.auth.password``)
    used in error messages; the secret's value never is.
    """
    if env is not None:
        return _from_env(env, f"{key_prefix}_env")
    assert file is not None  # the config model requires one of them
    return _from_file(file, base, f"{key_prefix}_file")


class SecretBasicAuth(requests.auth.AuthBase):
    """HTTP basic authentication with the password kept in a SecretStr."""

    def __init__(self, username: str, password: SecretStr) -> None:
        self.username = username
        self._password = password

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        pair = f"{self.username}:{self._password.get_secret_value()}".encode()
        request.headers["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
        return request

    def __repr__(self) -> str:
        return f"SecretBasicAuth(username={self.username!r}, password={self._password!r})"


class SecretBearerAuth(requests.auth.AuthBase):
    """``Authorization: Bearer <token>`` with the token kept in a SecretStr."""

    def __init__(self, token: SecretStr) -> None:
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = "Bearer " + self._token.get_secret_value()
        return request

    def __repr__(self) -> str:
        return f"SecretBearerAuth(token={self._token!r})"


def make_auth(auth: AuthConfig, source: str, base: Path, section: str = "") -> requests.auth.AuthBase | None:
    """The requests auth for a source's ``auth:`` section (``None`` for none);
    ``section`` replaces ``sources.<source>`` in messages (``destination``)."""
    prefix = f"{section or f'sources.{source}'}.auth"
    if isinstance(auth, BasicAuth):
        password = read_secret(auth.password_env, auth.password_file, f"{prefix}.password", base)
        return SecretBasicAuth(auth.username, password)
    if isinstance(auth, BearerAuth):
        return SecretBearerAuth(read_secret(auth.token_env, auth.token_file, f"{prefix}.token", base))
    return None


def credential_keys(auth: AuthConfig, source: str, section: str = "") -> str:
    """The config keys a user should check after a 401/403 (names, never values)."""
    prefix = f"{section or f'sources.{source}'}.auth"
    if isinstance(auth, BasicAuth):
        origin = (
            f"{prefix}.password_env (environment variable {auth.password_env})"
            if auth.password_env
            else f"{prefix}.password_file ({auth.password_file})"
        )
        return f"{prefix}.username and {origin}"
    if isinstance(auth, BearerAuth):
        return (
            f"{prefix}.token_env (environment variable {auth.token_env})"
            if auth.token_env
            else f"{prefix}.token_file ({auth.token_file})"
        )
    return f"{prefix} (none configured: the server wants credentials)"
