"""Certificates for the TLS tests, made with trustme: a CA, another CA, and leaves of both."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass
class PKI:
    """Certificate files: a CA, a server certificate for localhost / 127.0.0.1, client
    certificates from the same CA and from another CA."""

    ca: Path
    other_ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    foreign_cert: Path  # a client certificate signed by the other CA
    foreign_key: Path
    other_server_cert: Path  # a server certificate signed by the other CA
    other_server_key: Path


def _write_leaf(leaf: trustme.LeafCert, cert: Path, key: Path) -> None:
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))


def make_pki(d: Path) -> PKI:
    """New CAs and certificates, their files in directory ``d``."""
    ca, other = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    other.cert_pem.write_to_path(str(d / "other-ca.pem"))
    p = PKI(
        ca=d / "ca.pem",
        other_ca=d / "other-ca.pem",
        server_cert=d / "server.pem",
        server_key=d / "server.key",
        client_cert=d / "client.pem",
        client_key=d / "client.key",
        foreign_cert=d / "foreign.pem",
        foreign_key=d / "foreign.key",
        other_server_cert=d / "other-server.pem",
        other_server_key=d / "other-server.key",
    )
    _write_leaf(ca.issue_cert("localhost", "127.0.0.1"), p.server_cert, p.server_key)
    _write_leaf(ca.issue_cert("source.example"), p.client_cert, p.client_key)
    _write_leaf(other.issue_cert("source.example"), p.foreign_cert, p.foreign_key)
    _write_leaf(other.issue_cert("localhost"), p.other_server_cert, p.other_server_key)
    return p
