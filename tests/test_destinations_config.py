"""The network destinations' config sections are validated when the config
is loaded (a typo exits 2 before anything is queried), and every key is
documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from dqr.plugins.destinations import DicomwebDestinationConfig, DimseDestinationConfig

QUERY_CSV = "Patient ID\nP1\n"
DIMSE = {"type": "dimse", "host": "127.0.0.1", "port": 104, "called_aet": "XNAT"}
DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.fixture
def queries(write_csv):
    return write_csv(QUERY_CSV)


def test_a_misspelt_dimse_destination_key_exits_2_with_the_closest_key(site, dqr, queries, tmp_path):
    result = dqr("run", "--config", site(destination={**DIMSE, "xnat_routeing": True}), "--csv", queries)
    assert result.exit_code == 2
    assert "unknown key 'destination.xnat_routeing'" in result.stderr and "did you mean 'xnat_routing'" in result.stderr
    assert not (tmp_path / "archive-job.sqlite").exists()


def test_a_dimse_destination_needs_host_port_and_called_aet(site, dqr, queries):
    result = dqr("validate", "--csv", queries, "--config", site(destination={"type": "dimse"}))
    assert result.exit_code == 2
    for key in ("host", "port", "called_aet"):
        assert f"missing key 'destination.{key}'" in result.stderr


def test_an_unknown_destination_limit_is_refused(site, dqr, queries):
    destination = {**DIMSE, "limits": {"max_association": 2}}
    result = dqr("validate", "--csv", queries, "--config", site(destination=destination))
    assert result.exit_code == 2
    assert "destination.limits.max_association" in result.stderr


def test_storage_commitment_is_refused_for_a_dicomweb_destination(site, dqr, queries):
    destination = {"type": "dicomweb", "url": "http://127.0.0.1:8042/dicom-web", "verify": "commitment"}
    result = dqr("validate", "--csv", queries, "--config", site(destination=destination))
    assert result.exit_code == 2
    assert "Storage Commitment is a DIMSE service" in result.stderr


def test_a_password_in_the_destination_section_is_refused(site, dqr, queries):
    destination = {"type": "dicomweb", "url": "http://h/dicom-web", "auth": {"type": "basic", "username": "u", "password": "x"}}
    result = dqr("validate", "--csv", queries, "--config", site(destination=destination))
    assert result.exit_code == 2
    assert "secrets never go in the YAML" in result.stderr


def test_valid_network_destinations_pass_validate(site, dqr, queries):
    for destination in (
        {**DIMSE, "xnat_routing": True, "limits": {"max_associations": 2}, "verify": "commitment"},
        {"type": "dicomweb", "url": "http://127.0.0.1:8042/dicom-web", "auth": {"type": "bearer", "token_env": "T"}},
    ):
        result = dqr("validate", "--csv", queries, "--config", site(destination=destination))
        assert result.exit_code == 0, result.stderr


def test_dqr_plugins_lists_the_network_destination_types(dqr):
    output = dqr("plugins").stdout
    assert re.search(r"dimse\s.*dqr\.plugins\.destinations", output)
    assert re.search(r"dicomweb\s.*dqr\.plugins\.destinations", output)


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and name == "limits":
            keys += _keys(annotation, f"{prefix}{name}.")
    return keys


@pytest.mark.parametrize("model", [DimseDestinationConfig, DicomwebDestinationConfig])
def test_every_destination_key_is_documented(model):
    text = (DOCS / "destinations.md").read_text(encoding="utf-8")
    undocumented = [key for key in _keys(model) if f"`{key.rsplit('.', 1)[-1]}`" not in text]
    assert undocumented == []


def test_missing_destination_tls_files_exit_2_naming_each_key(site, dqr, queries):
    tls = {"ca_file": "nope-ca.pem", "cert_file": "nope.crt", "key_file": "nope.key"}
    result = dqr("run", "--config", site(destination={**DIMSE, "tls": tls}), "--csv", queries)
    assert result.exit_code == 2
    for key, file in tls.items():
        assert f"destination.tls.{key}" in result.stderr and file in result.stderr
    assert "Traceback" not in result.output


def test_a_dimse_destination_sends_natively_unless_told_otherwise_tls_included():
    assert DimseDestinationConfig(**DIMSE).effective_transport == "native"
    assert DimseDestinationConfig(**DIMSE, transport="pynetdicom").effective_transport == "pynetdicom"
    assert DimseDestinationConfig(**DIMSE, tls={"ca_file": "ca.pem"}).effective_transport == "native"
