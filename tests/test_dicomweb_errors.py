"""How the dicomweb backend reports failures: classified RemoteErrors with
messages that name config keys, never secrets or patient data."""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest

from dqr.errors import ConfigError, RemoteError
from dqr.model import StudyQuery

SECRET = "s3cr3t-Pa55word"
TOKEN = "tok-9f8e7d6c5b4a"


def query(backend, **filters: str) -> list:
    return list(backend.query_studies(StudyQuery(line=3, filters=filters)))


@pytest.fixture
def basic_mock(mock_dicomweb_factory):
    return mock_dicomweb_factory(auth={"type": "basic", "username": "dqr", "password": SECRET})


@pytest.fixture
def bearer_mock(mock_dicomweb_factory):
    return mock_dicomweb_factory(auth={"type": "bearer", "token": TOKEN})


def test_basic_auth_from_env_is_accepted(basic_mock, dicomweb_backend_factory, monkeypatch):
    monkeypatch.setenv("DQR_TEST_PASSWORD", SECRET)
    backend = dicomweb_backend_factory(
        basic_mock.url, auth={"type": "basic", "username": "dqr", "password_env": "DQR_TEST_PASSWORD"}
    )

    assert len(query(backend)) == 8


def test_bearer_token_from_file_is_accepted(bearer_mock, dicomweb_backend_factory, tmp_path):
    (tmp_path / "token").write_text(TOKEN + "\n")
    backend = dicomweb_backend_factory(bearer_mock.url, auth={"type": "bearer", "token_file": "token"})

    assert len(query(backend)) == 8


def test_401_names_the_config_key_and_never_the_secret(basic_mock, dicomweb_backend_factory, monkeypatch, dqr_log):
    dqr_log.set_level(logging.DEBUG)  # urllib3's debug lines too
    wrong = SECRET + "-wrong"
    monkeypatch.setenv("DQR_TEST_PASSWORD", wrong)
    backend = dicomweb_backend_factory(
        basic_mock.url, auth={"type": "basic", "username": "dqr", "password_env": "DQR_TEST_PASSWORD"}
    )

    with pytest.raises(RemoteError) as caught:
        query(backend, PatientName="DOE^JANE")

    message = str(caught.value)
    assert "HTTP 401" in message and "sources.web.auth.password_env" in message
    assert not caught.value.retriable
    for text in (message, dqr_log.text, repr(backend), repr(backend._session.auth)):
        assert SECRET not in text and wrong not in text
    assert "DOE" not in message  # the query string stays out of messages


def test_401_with_a_bearer_token_names_the_token_file_key(bearer_mock, dicomweb_backend_factory, tmp_path):
    (tmp_path / "token").write_text("not-the-token")
    backend = dicomweb_backend_factory(bearer_mock.url, auth={"type": "bearer", "token_file": "token"})

    with pytest.raises(RemoteError, match=r"sources\.web\.auth\.token_file") as caught:
        backend.echo()

    assert "not-the-token" not in str(caught.value)


def test_missing_password_variable_is_a_config_error_naming_the_key(dicomweb_backend_factory, monkeypatch):
    monkeypatch.delenv("DQR_TEST_MISSING", raising=False)

    with pytest.raises(ConfigError, match=r"sources\.web\.auth\.password_env: .*DQR_TEST_MISSING"):
        dicomweb_backend_factory(
            "http://127.0.0.1:9", auth={"type": "basic", "username": "u", "password_env": "DQR_TEST_MISSING"}
        )


def test_unreadable_token_file_is_a_config_error_naming_the_key(dicomweb_backend_factory):
    with pytest.raises(ConfigError, match=r"sources\.web\.auth\.token_file: cannot read"):
        dicomweb_backend_factory("http://127.0.0.1:9", auth={"type": "bearer", "token_file": "no-such-file"})


def test_429_with_retry_after_seconds_asks_to_slow_down(mock_dicomweb_pacs, dicomweb_backend_factory):
    mock_dicomweb_pacs.faults.throttle = 1
    mock_dicomweb_pacs.faults.retry_after = "7"
    backend = dicomweb_backend_factory(mock_dicomweb_pacs.url)

    with pytest.raises(RemoteError, match="HTTP 429") as caught:
        query(backend)

    assert caught.value.slow_down and caught.value.retriable and caught.value.retry_after == 7
    assert len(query(backend)) == 8  # the fault was for one request only


def test_503_with_retry_after_date_asks_to_slow_down(mock_dicomweb_pacs, dicomweb_backend_factory):
    mock_dicomweb_pacs.faults.unavailable = 1
    mock_dicomweb_pacs.faults.retry_after = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    backend = dicomweb_backend_factory(mock_dicomweb_pacs.url)

    with pytest.raises(RemoteError, match="HTTP 503") as caught:
        backend.echo()

    assert caught.value.slow_down and 25 <= caught.value.retry_after <= 31


def test_500_is_retriable_without_slowing_down(mock_dicomweb_pacs, dicomweb_backend_factory):
    mock_dicomweb_pacs.faults.server_errors = 1
    backend = dicomweb_backend_factory(mock_dicomweb_pacs.url)

    with pytest.raises(RemoteError, match="HTTP 500") as caught:
        query(backend)

    assert caught.value.retriable and not caught.value.slow_down and not caught.value.unreachable


def test_wrong_url_path_is_a_final_404_pointing_at_the_url_key(mock_dicomweb_pacs, dicomweb_backend_factory):
    backend = dicomweb_backend_factory(mock_dicomweb_pacs.url + "/wrong")

    with pytest.raises(RemoteError, match=r"HTTP 404.*sources\.web\.url") as caught:
        backend.echo()

    assert not caught.value.retriable


def test_connection_refused_is_unreachable(dicomweb_backend_factory):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    backend = dicomweb_backend_factory(f"http://127.0.0.1:{port}/dicom-web")

    with pytest.raises(RemoteError, match="connection refused") as caught:
        query(backend, PatientName="DOE^JANE")

    assert caught.value.unreachable and caught.value.retriable
    assert "DOE" not in str(caught.value)


def test_read_timeout_is_retriable(mock_dicomweb_pacs, dicomweb_backend_factory):
    mock_dicomweb_pacs.faults.delay = 1.0
    backend = dicomweb_backend_factory(mock_dicomweb_pacs.url, read_timeout=0.2)

    with pytest.raises(RemoteError, match="read_timeout") as caught:
        backend.echo()

    assert caught.value.retriable and not caught.value.unreachable


def write_self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (an IP SAN), and its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dqr test")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "server.crt", folder / "server.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.fixture
def tls_server(tmp_path):
    """An HTTPS server with a self-signed certificate (``server.crt`` in tmp_path)."""
    pytest.importorskip("cryptography")
    from werkzeug.serving import make_server
    from werkzeug.wrappers import Response

    cert, key = write_self_signed_certificate(tmp_path)
    app = Response("[]", content_type="application/dicom+json")
    server = make_server("127.0.0.1", 0, app, ssl_context=(str(cert), str(key)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_port}/dicom-web"
    server.shutdown()
    thread.join(5)
    server.server_close()


def test_untrusted_certificate_is_a_final_tls_error(tls_server, dicomweb_backend_factory):
    backend = dicomweb_backend_factory(tls_server)

    with pytest.raises(RemoteError, match=r"TLS failed.*sources\.web\.ca_bundle") as caught:
        backend.echo()

    assert not caught.value.retriable


def test_ca_bundle_makes_the_certificate_trusted(tls_server, dicomweb_backend_factory):
    backend = dicomweb_backend_factory(tls_server, ca_bundle="server.crt")  # relative to the config dir

    assert "holds no study" in backend.echo()


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_verify_tls_false_connects_and_warns(tls_server, dicomweb_backend_factory, dqr_log):
    backend = dicomweb_backend_factory(tls_server, verify_tls=False)

    assert "holds no study" in backend.echo()
    assert "verification is OFF" in dqr_log.text
