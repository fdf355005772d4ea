"""Validation of `type: dimse` source sections, as users meet it."""

from __future__ import annotations

import pytest

from dqr.config import load_config
from dqr.errors import ConfigError

PACS = {"type": "dimse", "host": "127.0.0.1", "port": 4242, "called_aet": "ORTHANC"}


def problems(site, **keys) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(site(source={**PACS, **keys}))
    return str(caught.value)


def test_minimal_source_gets_documented_defaults(site):
    source = load_config(site(source=PACS)).sources["main"]
    assert (source.calling_aet, source.query_model, source.retrieve) == ("DQR", "study", "auto")
    assert source.destination_aet == "DQR"
    assert source.source_aets == {"ORTHANC"}  # C-STOREs only from the PACS's own AE title
    assert source.store_host is None  # bound to the address that reaches `host`


def test_tls_without_a_transport_uses_the_native_transport(site, tmp_path):
    source = load_config(site(source={**PACS, "tls": {}})).sources["main"]
    assert source.effective_transport == "native"


def test_a_tls_storage_scp_without_a_certificate_is_refused(site):
    assert "`storage_scp: true` needs `cert_file` and `key_file`" in problems(
        site, tls={"ca_file": "ca.pem", "storage_scp": True}
    )


def test_unknown_transport_is_refused(site):
    assert "sources.main.transport" in problems(site, transport="dcmtk")


def test_ae_title_longer_than_16_characters_is_refused(site):
    assert "has 17 characters; DICOM allows at most 16" in problems(site, calling_aet="A" * 17)


@pytest.mark.parametrize("title", ["DQR\\1", "DQR\t", "   "])
def test_ae_title_with_backslash_control_character_or_blank_is_refused(site, title):
    assert "sources.main.calling_aet" in problems(site, calling_aet=title)


def test_c_move_without_store_port_explains_why(site):
    assert "needs `store_port`" in problems(site, retrieve="c-move")


def test_unknown_key_is_suggested(site):
    assert "did you mean 'store_port'" in problems(site, store_prot=11113)


def test_tls_key_without_certificate_is_refused(site):
    assert "both `cert_file` and `key_file`" in problems(site, tls={"key_file": "dqr.key"})


def test_dqr_echo_through_the_cli(site, dqr, mock_dimse_pacs):
    config = site(source={**PACS, "port": mock_dimse_pacs.port, "called_aet": mock_dimse_pacs.aet})
    result = dqr("echo", "--config", config)
    assert result.exit_code == 0, result.output
    assert "OK" in result.output


def test_missing_tls_files_are_each_named_with_exit_2_and_no_traceback(site, dqr):
    config = site(source={**PACS, "tls": {"ca_file": "ca.pem", "cert_file": "dqr.crt", "key_file": "dqr.key"}})
    result = dqr("echo", "--config", config)
    assert result.exit_code == 2, result.output
    for key in ("ca_file", "cert_file", "key_file"):
        assert f"sources.main.tls.{key}" in result.output
    assert "3 problems" in result.output and "Traceback" not in result.output
