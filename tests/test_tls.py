"""TLS on one machine, both ways an operator runs it (docs/operations.md "TLS"): the hub's proxy
serving the operator's certificate itself, and a TLS reverse proxy in front of it (a small
TLS-terminating relay stands in for nginx here, which this machine does not have). The
certificate is made here, self-signed for 127.0.0.1."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import threading
from pathlib import Path

import pytest
import requests

from conftest import browser_login
from helpers import ensure_user, free_port, kernel_json, start_platform, start_server, stop_server, user_token
from mlaas.settings import Settings

pytestmark = pytest.mark.platform


def make_certificate(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mlaas test hub")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "hub.crt", directory / "hub.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_file.chmod(0o600)
    return cert_file, key_file


class TlsRelay:
    """Terminates TLS on `port` and relays the bytes to `target` (what nginx or HAProxy do)."""

    def __init__(self, port: int, target: int, cert: Path, key: Path):
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        self.listener = socket.create_server(("127.0.0.1", port))
        self.target = target
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            client = self.context.wrap_socket(raw, server_side=True)
            upstream = socket.create_connection(("127.0.0.1", self.target))
        except OSError:
            raw.close()
            return

        def pipe(a: socket.socket, b: socket.socket) -> None:
            try:
                while data := a.recv(65536):
                    b.sendall(data)
            except OSError:
                pass
            finally:
                for s in (a, b):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()
        pipe(client, upstream)

    def close(self) -> None:
        self.listener.close()


def _login_cookie_is_secure(browser, url: str, password: str) -> list[str]:
    context = browser.new_context(ignore_https_errors=True)  # our own self-signed certificate
    try:
        page = context.new_page()
        browser_login(page, url, "alice", password)
        page.goto(f"{url}/hub/home")
        assert page.url.startswith(f"{url}/hub/home"), page.url
        return sorted(c["name"] for c in context.cookies() if c["name"].startswith("jupyterhub") and not c["secure"])
    finally:
        context.close()


def test_settings_say_what_a_https_public_url_needs():
    with pytest.raises(ValueError, match="public_url https://hub.example.org is https: give tls_cert_file"):
        Settings(public_url="https://hub.example.org")
    with pytest.raises(ValueError, match="tls_cert_file and tls_key_file go together"):
        Settings(public_url="https://hub.example.org", tls_cert_file=__file__)
    behind = Settings(public_url="https://hub.example.org", bind_url="http://127.0.0.1:8000")
    assert (behind.proxy_url, behind.internal_url) == ("http://127.0.0.1:8000", "http://127.0.0.1:8000")


def test_the_hub_serves_tls_itself_from_the_operators_certificate(tmp_path, browser, monkeypatch):
    cert, key = make_certificate(tmp_path)
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))  # this test's clients trust the hub's certificate
    hub = start_platform("tls", data={"enabled": False}, tracking={"enabled": False}, public_url=url, tls_cert_file=str(cert),
                         tls_key_file=str(key))
    try:
        assert requests.get(f"{url}/hub/health", timeout=10).status_code == 200
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/hub/health", timeout=10)  # no plain HTTP on that port
        assert _login_cookie_is_secure(browser, url, hub.password("alice")) == []

        ensure_user(hub, "tls-user", ["ml-users"])
        token = user_token(hub, "tls-user")
        start_server(hub, "tls-user", token, {"profile": "small"})
        clusters = kernel_json(hub, "tls-user", token, "import json; from dask_gateway import Gateway; "
                                                       "print(json.dumps(len(Gateway().list_clusters())))")
        assert clusters == 0  # the server's own programs reach the gateway under TLS too
        stop_server(hub, "tls-user")
    finally:
        hub.platform.stop()


def test_the_hub_behind_a_tls_reverse_proxy(tmp_path, browser, monkeypatch):
    cert, key = make_certificate(tmp_path)
    public, bind = free_port(), free_port()
    url = f"https://127.0.0.1:{public}"
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
    relay = TlsRelay(public, bind, cert, key)
    hub = start_platform("behind-tls", data={"enabled": False}, tracking={"enabled": False}, public_url=url, bind_url=f"http://127.0.0.1:{bind}")
    try:
        assert "listens at" not in " ".join(hub.platform.notices)  # loopback: no warning about forwarded headers
        assert requests.get(f"{url}/hub/health", timeout=10).status_code == 200
        assert _login_cookie_is_secure(browser, url, hub.password("alice")) == []  # https to users: Secure cookies
    finally:
        hub.platform.stop()
        relay.close()
