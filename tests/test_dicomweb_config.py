"""The ``type: dicomweb`` source config: validated at load time, secrets
only by reference."""

from __future__ import annotations

from pathlib import Path

import pytest

from dqr.config import load_config
from dqr.errors import ConfigError
from dqr.plugins.dicomweb import BasicAuth, DicomwebSourceConfig


def write_config(folder: Path, source: str) -> Path:
    path = folder / "site.yaml"
    path.write_text(f"archive: archive\nsources:\n  web:\n{source}")
    return path


def test_documented_example_loads(tmp_path):
    path = write_config(
        tmp_path,
        "    type: dicomweb\n    url: http://127.0.0.1:8042/dicom-web/\n"
        "    auth: {type: basic, username: dqr, password_env: DQR_PASSWORD}\n",
    )

    source = load_config(path).sources["web"]

    assert isinstance(source, DicomwebSourceConfig) and isinstance(source.auth, BasicAuth)
    assert source.url == "http://127.0.0.1:8042/dicom-web" and source.verify_tls
    assert source.query_value_escaping == "raw"


def test_password_in_the_yaml_is_refused(tmp_path):
    path = write_config(
        tmp_path, "    type: dicomweb\n    url: http://h/dw\n    auth: {type: basic, username: u, password: p}\n"
    )

    with pytest.raises(ConfigError, match="secrets never go in the YAML"):
        load_config(path)


def test_credentials_in_the_url_are_refused():
    with pytest.raises(ValueError, match="credentials never go in the URL"):
        DicomwebSourceConfig(url="https://user:pw@pacs.example.org/dicom-web")


def test_basic_auth_needs_exactly_one_password_origin():
    with pytest.raises(ValueError, match="exactly one of `password_env` or `password_file`"):
        DicomwebSourceConfig(url="http://h/dw", auth={"type": "basic", "username": "u"})


def test_unknown_key_gets_a_suggestion(tmp_path):
    path = write_config(tmp_path, "    type: dicomweb\n    url: http://h/dw\n    verify_tsl: false\n")

    with pytest.raises(ConfigError, match="did you mean 'verify_tls'"):
        load_config(path)


def test_ca_bundle_with_verification_off_is_contradictory():
    with pytest.raises(ValueError, match="`ca_bundle` is only used when `verify_tls` is true"):
        DicomwebSourceConfig(url="https://h/dw", verify_tls=False, ca_bundle="ca.pem")
