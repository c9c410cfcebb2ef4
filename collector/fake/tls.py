"""TLS for the fake exchange (`--tls`): a throwaway CA and a server certificate, made at start.

Production is `wss://` and `https://`; serving them lets the benchmark and the tests measure and
check the collector on the same transport. The CA is written to a PEM file that a client trusts
through the standard variables, with no setting of the collector's own:
`SSL_CERT_FILE` (Python's `ssl`, hence websockets) and `REQUESTS_CA_BUNDLE` (requests).
The certificates come from `trustme`, the test-CA library the Python TLS projects use.
"""

from __future__ import annotations

import ssl
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import trustme

CA_FILE_NAME: Final = "fake-exchange-ca.pem"


@dataclass(frozen=True)
class FakeTls:
    """The server's TLS context and where the CA that signed its certificate is."""

    context: ssl.SSLContext
    ca_file: Path

    def client_env(self) -> dict[str, str]:
        """The variables that make a collector (websockets and requests alike) trust this server."""
        return {"SSL_CERT_FILE": str(self.ca_file), "REQUESTS_CA_BUNDLE": str(self.ca_file)}


def make_tls(hosts: Sequence[str], directory: Path | None = None) -> FakeTls:
    """A new CA, a certificate for `hosts` signed by it, and the CA written to `directory` (a new
    temporary folder when None)."""
    folder = directory if directory is not None else Path(tempfile.mkdtemp(prefix="fake-exchange-tls-"))
    folder.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="collector fake exchange")
    names = list(
        dict.fromkeys(host for host in (*hosts, "127.0.0.1", "localhost") if host not in ("", "0.0.0.0"))
    )
    certificate = ca.issue_cert(*names)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certificate.configure_cert(context)
    ca_file = folder / CA_FILE_NAME
    ca.cert_pem.write_to_path(str(ca_file))
    return FakeTls(context, ca_file)
