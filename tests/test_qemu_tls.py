"""TLS with a real QEMU, 7.2 and 10.0, both ways: ``multifd qemu-save --tls-*`` as the
destination of a QEMU source, ``multifd qemu-restore --tls-*`` as the source of a QEMU
destination, QEMU with its ``tls-creds-x509`` object; certificates made here with trustme.

QEMU reads ``ca-cert.pem`` and ``server-cert.pem`` / ``server-key.pem`` (endpoint=server) or
``client-cert.pem`` / ``client-key.pem`` (endpoint=client) from the object's ``dir``. What its
TLS migration asks of the peer (QEMU's migration/tls.c, io/channel-tls.c, crypto/tlssession.c):
every connection, the main one and each multifd channel, is its own TLS session; the client
checks the server's certificate and host name (``tls-hostname``, else the host of the URI);
a server with ``verify-peer=on`` (the default) requires a client certificate from its CA and
checks no host name. QEMU checks the peer's certificate only once the handshake is done, and
then just closes the connection: its peer learns nothing but that the connection closed. QEMU
7.2 never ends a TLS channel with a close_notify (qemu-save takes that as an end of stream,
``TLSAcceptor(https_compatible=True)``); 10.0 sends one on multifd channels.

Matrix, per QEMU version (7.2, 10.0): one capture and restore over mutual TLS (2 channels,
zstd; a running guest, RAM equal to QEMU's pmemsave, the restored guest runs on; about 4 s
under TCG), and six refusals of about 1 s each: a wrong CA and a wrong host name on each end
of each direction where that end checks one (qemu-save's client CA, QEMU source's CA and host
name; qemu-restore's CA and host name, QEMU destination's CA). QEMU 10.0 runs with the
machine type pc-q35-7.2 here: a QEMU 10.0 source of its own machine type sends the 8.0+
main-stream dialect (MULTIFD_FLUSH), which qemu-save cannot read yet, TLS or not.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

if os.fspath(Path(__file__).resolve().parent) not in sys.path:  # for the harness
    sys.path.insert(0, os.fspath(Path(__file__).resolve().parent))
pytest.register_assert_rewrite("qemu_harness")
import qemu_harness as qh  # noqa: E402

pytest_plugins = ["qemu_harness"]
QEMU_TESTS = True

RAM_SIZE = 64 << 20
CHANNELS = 2
METHOD = "zstd"
#: The machine type per QEMU version (see the module's docstring for 10.0).
MACHINE = {"7.2": "pc-q35-7.2", "10.0": "pc-q35-7.2"}
#: Bounds for each run here (the runs themselves take about a second).
WAIT = 30.0
#: A refused migration must end on both sides well before any timeout could end it.
PROMPT = 10.0


# --- certificates -------------------------------------------------------------------------


@dataclass
class PKI:
    """A CA and another CA; a server certificate for localhost / 127.0.0.1 and a client
    certificate, both from the CA. Files for our side, and QEMU ``dir``s per role and CA."""

    root: Path
    ca: Path
    other_ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def qemu_dir(self, endpoint: str, *, trust: str = "ca") -> Path:
        """A ``tls-creds-x509`` dir for ``endpoint`` (client | server) with our certificates
        and ``trust`` (ca | other) as its ca-cert.pem."""
        d = self.root / f"qemu-{endpoint}-{trust}"
        if not d.exists():
            d.mkdir()
            shutil.copyfile(self.ca if trust == "ca" else self.other_ca, d / "ca-cert.pem")
            cert, key = (
                (self.server_cert, self.server_key)
                if endpoint == "server"
                else (self.client_cert, self.client_key)
            )
            shutil.copyfile(cert, d / f"{endpoint}-cert.pem")
            shutil.copyfile(key, d / f"{endpoint}-key.pem")
        return d


def _write_leaf(leaf: trustme.LeafCert, cert: Path, key: Path) -> None:
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    d = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    other.cert_pem.write_to_path(str(d / "other-ca.pem"))
    p = PKI(
        root=d,
        ca=d / "ca.pem",
        other_ca=d / "other-ca.pem",
        server_cert=d / "server.pem",
        server_key=d / "server.key",
        client_cert=d / "client.pem",
        client_key=d / "client.key",
    )
    _write_leaf(ca.issue_cert("localhost", "127.0.0.1"), p.server_cert, p.server_key)
    _write_leaf(ca.issue_cert("qemu.example"), p.client_cert, p.client_key)
    return p


def save_tls(pki: PKI, *, client_ca: Path | None = None) -> list[str]:
    """qemu-save's TLS options: our server certificate; QEMU's client certificate required."""
    return [
        "--tls-cert",
        os.fspath(pki.server_cert),
        "--tls-key",
        os.fspath(pki.server_key),
        "--tls-client-ca",
        os.fspath(client_ca or pki.ca),
    ]


def restore_tls(pki: PKI, *, ca: Path | None = None, hostname: str | None = None) -> list[str]:
    """qemu-restore's TLS options: the CA to check QEMU with, our client certificate."""
    return [
        "--tls-ca",
        os.fspath(ca or pki.ca),
        "--tls-cert",
        os.fspath(pki.client_cert),
        "--tls-key",
        os.fspath(pki.client_key),
        *(["--tls-hostname", hostname] if hostname else []),
    ]


# --- QEMUs --------------------------------------------------------------------------------


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[qh.Lab]:
    with qh.lab(tmp_path) as the_lab:
        yield the_lab


def boot_drive(lab: qh.Lab, name: str) -> tuple[str, ...]:
    """A copy of the boot-sector guest's disk (qemu_harness.BOOT_CODE) for one QEMU."""
    disk = qh.boot_disk(lab.tmp / f"{name}-boot.img")
    return ("-drive", f"file={disk},format=raw,if=ide", "-boot", "c")


def tls_source(
    lab: qh.Lab, pki: PKI, version: str, *, trust: str = "ca", hostname: str = "localhost"
) -> qh.Qemu:
    """A running boot-sector guest set to migrate with multifd over TLS (client endpoint)."""
    creds = f"tls-creds-x509,id=tls0,dir={pki.qemu_dir('client', trust=trust)},endpoint=client"
    source = lab.qemu(
        "src",
        "-machine",
        MACHINE[version],
        *boot_drive(lab, "src"),
        "-object",
        creds,
        paused=False,
        version=version,
    )
    source.set_multifd(CHANNELS, METHOD, **{"tls-creds": "tls0", "tls-hostname": hostname})
    return source


def tls_destination(
    lab: qh.Lab, pki: PKI, version: str, *, trust: str = "ca"
) -> tuple[qh.Qemu, int]:
    """A paused boot-sector guest waiting for a multifd migration over mutual TLS (the
    server endpoint, verify-peer=on); and its port."""
    creds = (
        f"tls-creds-x509,id=tls0,dir={pki.qemu_dir('server', trust=trust)},"
        "endpoint=server,verify-peer=on"
    )
    dest = lab.qemu(
        "dst",
        "-machine",
        MACHINE[version],
        *boot_drive(lab, "dst"),
        "-object",
        creds,
        "-incoming",
        "defer",
        version=version,
    )
    dest.set_multifd(CHANNELS, METHOD, **{"tls-creds": "tls0"})
    dest.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    return dest, int(dest.query_migrate()["socket-address"][0]["port"])


def start_save(lab: qh.Lab, pki: PKI, snap: Path, **tls: Any) -> qh.MultifdProcess:
    save = lab.qemu_save(
        snap, channels=CHANNELS, method=METHOD, timeout=WAIT, extra=save_tls(pki, **tls)
    )
    assert save.port is not None
    return save


def start_restore(lab: qh.Lab, pki: PKI, snap: Path, port: int, **tls: Any) -> qh.MultifdProcess:
    return lab.multifd(
        "qemu-restore",
        os.fspath(snap),
        "--connect",
        f"127.0.0.1:{port}",
        "--channels",
        str(CHANNELS),
        "--compression",
        METHOD,
        "--json",
        *restore_tls(pki, **tls),
    )


def wait_counters(q: qh.Qemu, tmp: Path, above: list[int] | None = None) -> list[int]:
    """The boot-sector guest's page counters once all are non-zero (and above ``above``)."""
    deadline = time.monotonic() + WAIT
    while True:
        mem = q.pmemsave(qh.COUNTER_FIRST_PAGE, qh.COUNTER_PAGES * qh.PAGE, tmp / "counters")
        counters = qh.read_counters(mem, qh.COUNTER_FIRST_PAGE)
        if all(counters) and (above is None or all(map(int.__gt__, counters, above))):
            return counters
        assert time.monotonic() < deadline, f"{q.name}: the guest does not run: {q.log_tail()}"
        time.sleep(0.05)


def one_error_line(proc: qh.MultifdProcess, command: str) -> str:
    lines = proc.stderr().strip().splitlines()
    assert len(lines) == 1, proc.stderr()
    assert lines[0].startswith(f"multifd {command}: error: "), lines
    return lines[0]


def wait_qemu_status(q: qh.Qemu, statuses: tuple[str, ...]) -> dict[str, Any]:
    """Poll query-migrate until its status is one of ``statuses`` (bounded)."""
    deadline = time.monotonic() + PROMPT
    while True:
        info = q.query_migrate()
        if info.get("status") in statuses:
            return info
        assert time.monotonic() < deadline, (info, q.log_tail())
        time.sleep(0.05)


# --- both ways ----------------------------------------------------------------------------


@pytest.mark.parametrize("version", qh.QEMU_VERSIONS)
def test_capture_and_restore_over_tls(lab: qh.Lab, pki: PKI, version: str) -> None:
    """QEMU -> qemu-save -> qemu-restore -> QEMU, every connection mutual TLS."""
    qh.skip_unless_qemu(version)
    source = tls_source(lab, pki, version)
    before = wait_counters(source, lab.tmp)
    snap = lab.tmp / "snap"
    save = start_save(lab, pki, snap)
    source.cmd("migrate", uri=f"tcp:127.0.0.1:{save.port}")
    info = source.wait_migration(WAIT)
    assert info["status"] == "completed", (info, source.log_tail())
    assert save.wait(WAIT) == 0, save.stderr()
    out = save.json()
    assert out["status"] == "completed" and out["channels"] == CHANNELS
    assert out["compression"] == METHOD and out["machine-type"] == MACHINE[version]

    final = source.pmemsave(0, RAM_SIZE, lab.tmp / "src.mem")
    image = qh.block_image(snap, "pc.ram")
    assert qh.outside_legacy_hole(image, final), qh.first_difference(image, final)
    counters = qh.read_counters(image)
    assert all(map(int.__gt__, counters, before)), "the source guest did not run"

    dest, port = tls_destination(lab, pki, version)
    restore = start_restore(lab, pki, snap, port)  # host name: 127.0.0.1, an IP SAN
    assert restore.wait(WAIT) == 0, restore.stderr()
    assert restore.json()["status"] == "completed"
    info = dest.wait_migration(WAIT)
    assert info["status"] == "completed", (info, dest.log_tail())
    restored = dest.pmemsave(0, RAM_SIZE, lab.tmp / "dst.mem")
    assert qh.outside_legacy_hole(restored, final), qh.first_difference(restored, final)
    dest.cmd("cont")
    wait_counters(dest, lab.tmp, above=counters)  # the restored guest runs on
    assert dest.cmd("query-status")["status"] == "running"
