"""TLS with a private CA, the way a team runs it: a CA of its own signs the app's certificate, and
``habanero-pack --ca-file ca.pem`` trusts that CA. Push, status, push, rollback and status go
through the real CLI to the WSGI example's standalone endpoint (``install(tls_cert=..., tls_key=...)``
through its settings), and the app serves each version. A certificate from another CA is refused
with the CLI's one TLS line; the app's own certificate as the CA file is a trust anchor or not as
the TLS library's verification flags say.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from support.e2e import make_project, request, start_example

pytestmark = pytest.mark.slow  # a real app process and the real CLI

COUNTER = "counter/__init__.py"
_NOW = datetime.datetime.now(datetime.timezone.utc)


def _usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, key_cert_sign=ca, crl_sign=ca, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                         encipher_only=False, decipher_only=False)


def _write_pem(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


class CA:
    """A private certificate authority: its key and self-signed certificate."""

    def __init__(self, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
                               x509.NameAttribute(NameOID.COMMON_NAME, f"{name} root CA")])
        ski = x509.SubjectKeyIdentifier.from_public_key(self.key.public_key())
        self.cert = (x509.CertificateBuilder().subject_name(self.name).issuer_name(self.name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(_NOW - datetime.timedelta(minutes=5))
                     .not_valid_after(_NOW + datetime.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                     .add_extension(_usage(ca=True), critical=True)
                     .add_extension(ski, critical=False)
                     .sign(self.key, hashes.SHA256()))

    def server_cert(self, directory: Path) -> tuple[Path, Path]:
        """A certificate for 127.0.0.1 (an IP SAN) signed by this CA, and its key, as PEM files."""
        key = ec.generate_private_key(ec.SECP256R1())
        ca_ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "habanero app")]))
                .issuer_name(self.name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(_NOW - datetime.timedelta(minutes=5))
                .not_valid_after(_NOW + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                               critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(_usage(ca=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                               critical=False)
                .sign(self.key, hashes.SHA256()))
        directory.mkdir(parents=True, exist_ok=True)
        key_path = directory / "server.key"
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        key_path.chmod(0o600)
        return _write_pem(directory / "server.pem", cert), key_path


def _ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    return proc.stdout


def _tls_refusal(proc: subprocess.CompletedProcess[str], control: str) -> str:
    """The CLI's one TLS line, with no traceback."""
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"habanero-pack: error: TLS with {control} failed: "), proc.stderr
    return lines[0]


@pytest.fixture
def private_ca_app(launcher, tmp_path):
    """The WSGI example serving its endpoint over TLS with a certificate from a private CA."""
    project = make_project(tmp_path / "app", "wsgi_app")
    ca = CA("habanero tests")
    cert, key = ca.server_cert(tmp_path / "server")
    app = start_example(launcher, project, HABANERO_TLS_CERT=str(cert), HABANERO_TLS_KEY=str(key))
    return app, project, _write_pem(tmp_path / "ca.pem", ca.cert), cert


def test_push_status_and_rollback_through_a_private_ca(private_ca_app) -> None:
    app, project, ca_pem, _ = private_ca_app
    assert app.control.startswith("https://127.0.0.1:")
    trust = ("--ca-file", str(ca_pem))

    assert "pushed version 1" in _ok(project.push(app.control, *trust))
    assert request(app.url).body == b"counting: 1\n"
    assert "active     version 1" in _ok(project.pack("status", app.control, *trust))

    project.edit(COUNTER, 'return "counting"', 'return "tallying"')
    assert "pushed version 2" in _ok(project.push(app.control, *trust))
    assert request(app.url).body == b"tallying: 2\n"  # the same process: its count goes on

    rolled = _ok(project.pack("rollback", app.control, *trust))
    assert rolled.startswith(f"rolled back {app.control} from version 2 to 1 in ")
    assert request(app.url).body == b"counting: 3\n"  # still the same process, back on version 1
    assert "active     version 1" in _ok(project.pack("status", app.control, *trust))


def test_the_servers_own_certificate_as_the_ca_file_is_what_tls_makes_of_it(private_ca_app) -> None:
    app, project, _, server_pem = private_ca_app
    proc = project.pack("status", app.control, "--ca-file", str(server_pem))
    # The CLI's context is Python's default one: a certificate that is not self-signed anchors
    # trust only where partial chains are allowed (Python 3.13 sets that flag; 3.11 does not).
    if ssl.create_default_context().verify_flags & ssl.VERIFY_X509_PARTIAL_CHAIN:
        assert "active" in _ok(proc)
    else:
        assert "CERTIFICATE_VERIFY_FAILED" in _tls_refusal(proc, app.control)


def test_a_certificate_from_another_ca_is_refused_in_one_tls_line(private_ca_app, launcher, tmp_path) -> None:
    app, project, ca_pem, _ = private_ca_app
    stranger = CA("someone else")
    cert, key = stranger.server_cert(tmp_path / "impostor")
    other = make_project(tmp_path / "impostor-app", "wsgi_app")
    impostor = start_example(launcher, other, HABANERO_TLS_CERT=str(cert), HABANERO_TLS_KEY=str(key))
    for verb in (("status", impostor.control), ("--push", impostor.control)):
        line = _tls_refusal(project.pack(*verb, "--ca-file", str(ca_pem)), impostor.control)
        assert "CERTIFICATE_VERIFY_FAILED" in line and "--ca-file" in line
    assert request(impostor.url).body == b"counting: 1\n"  # nothing was pushed to it
    assert request(app.url).body == b"counting: 1\n"
