"""TLS on one machine (docs/operations.md "TLS"): either the hub's proxy serves it from the
operator's certificate (`tls_cert_file`, `tls_key_file`), or a TLS reverse proxy in front of it
does (`public_url` https, `bind_url` where our proxy listens, on loopback).

The platform's own programs reach the proxy at `Settings.internal_url`; they trust the system's
certificate authorities and the configured certificate itself (a self-signed one included), and
nothing else."""

from __future__ import annotations

import ssl
from pathlib import Path

from .netaddr import is_loopback_url

CA_ENV = "MLAAS_TLS_CA"  # the certificate the platform's programs trust for internal_url


def client_context(cert_file: str | Path | None) -> ssl.SSLContext:
    """The system's trust plus `cert_file` as a trust anchor of its own."""
    context = ssl.create_default_context()
    if cert_file:
        context.load_verify_locations(cafile=str(cert_file))
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # the server's own certificate, not only CAs
    return context


def forwarded_header_notice(public_url: str, bind_url: str | None) -> str | None:
    """Behind a reverse proxy the hub trusts the X-Forwarded-* headers it is given: our proxy must
    then be reachable by that reverse proxy only."""
    if bind_url and bind_url.rstrip("/") != public_url.rstrip("/") and not is_loopback_url(bind_url):
        return (f"WARNING: the hub's proxy listens at {bind_url}, not on loopback, behind {public_url}: anyone who "
                "reaches it directly bypasses your TLS proxy and can set X-Forwarded-* headers; bind it to "
                "127.0.0.1 or firewall it to the reverse proxy")
    return None
