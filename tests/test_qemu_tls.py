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
``TLSAcceptor(https_compatible=True)``); 10.0 sends one on its multifd channels.

What a refusal looks like, as measured (both versions alike). Where qemu-restore checks (its
CA, its host name) it exits 1 with a TLSError saying why; QEMU logs ``TLS handshake failed``
for that incoming connection and keeps waiting: a QEMU destination never goes ``failed`` for a
connection whose TLS fails, it takes the next one (checked: a good restore then completes).
qemu-save, a destination too, does the same (issue 13: a connection that fails its handshake is
not the migration's): one warning line saying why per refused connection, and it keeps
waiting; QEMU fails its outgoing migration (the write after its handshake fails). Checked: a
good source then captures into it, or (where qemu-save's own CA was wrong) its ``--timeout``
ends it with an error naming the first refusal. Where QEMU checks (its CA, its host name), it
does so after the handshake and closes without an alert: a QEMU source goes ``failed`` with the
reason in ``error-desc``, a QEMU destination logs it. qemu-save's handshake waits for QEMU's
first bytes (``TLSAcceptor(first_bytes=True)``), so a close right after the handshake is a
TLSError saying that its certificate was refused; qemu-restore, which speaks first, sees only a
closed channel (ChannelClosed).

Matrix, per QEMU version (7.2, 10.0), about 26 s in all under TCG: one capture and restore over
mutual TLS (2 channels, zstd; a running guest, RAM equal to QEMU's pmemsave, the restored
guest runs on; 4-6 s), three refused captures (about 1 s each: QEMU trusts another CA, QEMU
wants another host name, qemu-save trusts another client CA) and three refused restores (1.5-2
s each, with a good restore after two of them: qemu-restore trusts another CA, wants another
host name; QEMU trusts another client CA). Each QEMU runs its own current machine type
(10.0: pc-q35-10.0, the per-round MULTIFD_FLUSH dialect with zero pages in packets).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

if os.fspath(Path(__file__).resolve().parent) not in sys.path:  # for the harness
    sys.path.insert(0, os.fspath(Path(__file__).resolve().parent))
pytest.register_assert_rewrite("qemu_harness")
import qemu_harness as qh  # noqa: E402
from procs import warnings_then_error  # noqa: E402

pytest_plugins = ["qemu_harness"]
QEMU_TESTS = True

RAM_SIZE = 64 << 20
CHANNELS = 2
METHOD = "zstd"
#: The machine type per QEMU version: each one's own.
MACHINE = {"7.2": "pc-q35-7.2", "10.0": "pc-q35-10.0"}
#: Bounds for each run here (the runs themselves take about a second).
WAIT = 30.0
#: A refused migration must end on both sides well before any timeout could end it.
PROMPT = 10.0


# --- certificates -------------------------------------------------------------------------


#: Our certificates: name -> (the CA that issues it, its identities).
LEAVES = {
    "server": ("ca", ("localhost", "127.0.0.1")),
    "client": ("ca", ("qemu.example",)),
    "other-server": ("other", ("localhost", "127.0.0.1")),
}


@dataclass
class PKI:
    """Two CAs, ``ca`` and ``other``, and the certificates of LEAVES, as files in ``root``."""

    root: Path

    def pem(self, name: str) -> Path:
        """A CA's certificate, or a leaf's certificate chain."""
        return self.root / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.root / f"{name}.key"

    def qemu_dir(self, endpoint: str, *, other: bool = False, cert: bool = True) -> Path:
        """A ``tls-creds-x509`` dir for ``endpoint`` (client | server): the CA's (or the
        other CA's) certificate as ca-cert.pem, and unless not ``cert`` a certificate of the
        same CA (QEMU refuses to start with its own certificate from a CA it does not trust).
        """
        d = self.root / f"qemu-{endpoint}-{'other' if other else 'ca'}-{cert}"
        if d.exists():
            return d
        d.mkdir()
        shutil.copyfile(self.pem("other" if other else "ca"), d / "ca-cert.pem")
        if cert:
            leaf = f"other-{endpoint}" if other else endpoint
            shutil.copyfile(self.pem(leaf), d / f"{endpoint}-cert.pem")
            shutil.copyfile(self.key(leaf), d / f"{endpoint}-key.pem")
        return d


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    p = PKI(tmp_path_factory.mktemp("pki"))
    cas = {"ca": trustme.CA(), "other": trustme.CA()}
    for name, ca in cas.items():
        ca.cert_pem.write_to_path(str(p.pem(name)))
    for name, (issuer, identities) in LEAVES.items():
        leaf = cas[issuer].issue_cert(*identities)
        p.pem(name).write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(p.key(name)))
    return p


def save_tls(pki: PKI, *, client_ca: Path | None) -> list[str]:
    """qemu-save's TLS options: our server certificate; with ``client_ca``, QEMU's client
    certificate required, from that CA."""
    return [
        "--tls-cert",
        os.fspath(pki.pem("server")),
        "--tls-key",
        os.fspath(pki.key("server")),
        *(["--tls-client-ca", os.fspath(client_ca)] if client_ca else []),
    ]


def restore_tls(pki: PKI, *, ca: Path | None = None, hostname: str | None = None) -> list[str]:
    """qemu-restore's TLS options: the CA to check QEMU with, our client certificate."""
    return [
        "--tls-ca",
        os.fspath(ca or pki.pem("ca")),
        "--tls-cert",
        os.fspath(pki.pem("client")),
        "--tls-key",
        os.fspath(pki.key("client")),
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
    lab: qh.Lab,
    pki: PKI,
    version: str,
    *,
    other: bool = False,
    cert: bool = True,
    hostname: str = "localhost",
    paused: bool = False,
    name: str = "src",
) -> qh.Qemu:
    """A boot-sector guest (running unless ``paused``) set to migrate with multifd over TLS:
    the client endpoint trusting the CA (or the other one), with a client certificate unless
    not ``cert``, checking that the server's certificate carries ``hostname``."""
    where = pki.qemu_dir("client", other=other, cert=cert)
    creds = f"tls-creds-x509,id=tls0,dir={where},endpoint=client"
    source = lab.qemu(
        name,
        "-machine",
        MACHINE[version],
        *boot_drive(lab, name),
        "-object",
        creds,
        paused=paused,
        version=version,
    )
    source.set_multifd(CHANNELS, METHOD, **{"tls-creds": "tls0", "tls-hostname": hostname})
    return source


def tls_destination(
    lab: qh.Lab, pki: PKI, version: str, *, other: bool = False
) -> tuple[qh.Qemu, int]:
    """A paused boot-sector guest waiting for a multifd migration over mutual TLS (the
    server endpoint, verify-peer=on: client certificates from its CA only), and its port.
    ``other``: QEMU in the other CA's world (its CA and its server certificate)."""
    where = pki.qemu_dir("server", other=other)
    creds = f"tls-creds-x509,id=tls0,dir={where},endpoint=server,verify-peer=on"
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


def start_save(
    lab: qh.Lab, pki: PKI, snap: Path, *, client_ca: Path | None, timeout: float = WAIT
) -> qh.MultifdProcess:
    save = lab.qemu_save(
        snap,
        channels=CHANNELS,
        method=METHOD,
        timeout=timeout,
        extra=save_tls(pki, client_ca=client_ca),
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


def wait_warning(proc: qh.MultifdProcess, command: str) -> str:
    """The first warning line ``proc`` writes on stderr, once written (bounded)."""
    deadline = time.monotonic() + PROMPT
    while True:
        lines = proc.stderr().splitlines(keepends=True)
        if lines and lines[0].endswith("\n"):
            assert lines[0].startswith(f"multifd {command}: warning: "), lines
            return lines[0].strip()
        assert proc.proc.poll() is None, proc.stderr()
        assert time.monotonic() < deadline, proc.stderr()
        time.sleep(0.05)


def error_line(proc: qh.MultifdProcess, command: str) -> str:
    """The command's stderr: exactly one line, its error."""
    err = proc.stderr()
    assert err.count("\n") == 1 and err.startswith(f"multifd {command}: error: "), err
    return err.strip()


# --- both ways ----------------------------------------------------------------------------


@pytest.mark.parametrize("version", qh.QEMU_VERSIONS)
def test_capture_and_restore_over_tls(lab: qh.Lab, pki: PKI, version: str) -> None:
    """QEMU -> qemu-save -> qemu-restore -> QEMU, every connection mutual TLS."""
    qh.skip_unless_qemu(version)
    source = tls_source(lab, pki, version)
    before = wait_counters(source, lab.tmp)
    snap = lab.tmp / "snap"
    save = start_save(lab, pki, snap, client_ca=pki.pem("ca"))
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


# --- refusals -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def snapshots(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[[str], Path]]:
    """A snapshot per QEMU version, made once for the refused restores (plain TCP: what is
    refused there is the restore's connection, not the capture's)."""
    made: dict[str, Path] = {}
    with qh.lab(tmp_path_factory.mktemp("snapshots")) as the_lab:

        def snapshot(version: str) -> Path:
            if version not in made:
                source = the_lab.qemu(
                    f"src-{version}", "-machine", MACHINE[version], version=version
                )
                source.set_multifd(CHANNELS, METHOD)
                snap = the_lab.tmp / f"snap-{version}"
                save = the_lab.qemu_save(snap, channels=CHANNELS, method=METHOD, timeout=WAIT)
                source.cmd("migrate", uri=f"tcp:127.0.0.1:{save.port}")
                assert source.wait_migration(WAIT)["status"] == "completed"
                assert save.wait(WAIT) == 0, save.stderr()
                made[version] = snap
            return made[version]

        yield snapshot


#: Refused captures: how QEMU (``tls_source``) and qemu-save differ from a good capture.
CAPTURE_REFUSALS: dict[str, tuple[dict[str, Any], str]] = {
    # QEMU does not trust our server certificate (and presents none: qemu-save asks none)
    "qemu-trusts-another-ca": ({"other": True, "cert": False}, "none"),
    "qemu-wants-another-host": ({"hostname": "wrong.example"}, "ca"),
    "save-trusts-another-ca": ({}, "other"),
}


@pytest.mark.parametrize("version", qh.QEMU_VERSIONS)
@pytest.mark.parametrize("case", list(CAPTURE_REFUSALS))
def test_capture_refused(lab: qh.Lab, pki: PKI, version: str, case: str) -> None:
    """QEMU's migration ends ``failed``; qemu-save says why at once in one warning line and,
    as a QEMU destination does, keeps waiting: where QEMU was wrong, a good source then
    captures into it; where qemu-save was, its --timeout ends it, naming the refusal."""
    qh.skip_unless_qemu(version)
    qemu_side, our_side = CAPTURE_REFUSALS[case]
    source = tls_source(lab, pki, version, paused=True, **qemu_side)
    snap = lab.tmp / "snap"
    client_ca = {"ca": pki.pem("ca"), "other": pki.pem("other"), "none": None}[our_side]
    ours_wrong = case == "save-trusts-another-ca"
    save = start_save(lab, pki, snap, client_ca=client_ca, timeout=5 if ours_wrong else WAIT)
    source.cmd("migrate", uri=f"tcp:127.0.0.1:{save.port}")
    info = source.wait_migration(PROMPT)
    assert info["status"] == "failed", info
    why = info.get("error-desc", "")
    line = wait_warning(save, "qemu-save")
    assert line.startswith("multifd qemu-save: warning: refused a connection from 127.0.0.1:")
    if ours_wrong:
        assert "TLSError: TLS handshake failed: certificate verify failed: " in line
        assert "the client's certificate" in line and "wrong CA?" in line, line
    else:
        # QEMU checks our certificate after the handshake and just closes: qemu-save says so
        assert "TLSError: TLS handshake failed: the client closed the " in line
        assert "right after the handshake" in line and "refused this side's certificate" in line
        if case == "qemu-wants-another-host":
            assert why == "Certificate does not match the hostname wrong.example", info
        else:
            assert "issuer" in why or "not trusted" in why or "signer" in why, info
    if ours_wrong:
        assert save.wait(WAIT) == 1, save.stderr()
        _, error = warnings_then_error(save.stderr(), "qemu-save")
        assert "MigrationTimeout: only 0 of 3 connections" in error, error
        assert "refused (the first from 127.0.0.1:" in error and "wrong CA?" in error, error
        assert not snap.exists() or not any(snap.iterdir()), sorted(snap.iterdir())
        return
    good = tls_source(lab, pki, version, name="good")
    good.cmd("migrate", uri=f"tcp:127.0.0.1:{save.port}")
    assert good.wait_migration(WAIT)["status"] == "completed", good.log_tail()
    assert save.wait(WAIT) == 0, save.stderr()
    assert save.json()["status"] == "completed"
    assert save.json()["refused-connections"] >= 1


#: Refused restores: how QEMU (``tls_destination``) and qemu-restore differ from a good one.
RESTORE_REFUSALS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "restore-trusts-another-ca": ({}, {"ca": "other"}),
    "restore-wants-another-host": ({}, {"hostname": "wrong.example"}),
    # QEMU does not trust our client certificate (we trust its server certificate)
    "qemu-trusts-another-ca": ({"other": True}, {"ca": "other"}),
}


@pytest.mark.parametrize("version", qh.QEMU_VERSIONS)
@pytest.mark.parametrize("case", list(RESTORE_REFUSALS))
def test_restore_refused(lab: qh.Lab, pki: PKI, snapshots: Any, version: str, case: str) -> None:
    """qemu-restore exits 1 at once with one error line. QEMU's incoming side logs why and,
    as QEMU does for a connection whose TLS fails, keeps waiting (it does not go ``failed``):
    where our side refused, a restore with the right options then completes into it."""
    qh.skip_unless_qemu(version)
    qemu_side, our_side = RESTORE_REFUSALS[case]
    snap = snapshots(version)
    dest, port = tls_destination(lab, pki, version, **qemu_side)
    ca = pki.pem("other") if our_side.get("ca") else None
    restore = start_restore(lab, pki, snap, port, ca=ca, hostname=our_side.get("hostname"))
    assert restore.wait(PROMPT) == 1, restore.stderr()
    line = error_line(restore, "qemu-restore")
    if case == "qemu-trusts-another-ca":
        # QEMU checks our certificate after the handshake and just closes: all we see
        assert "ChannelClosed" in line and "peer gone" in line, line
        wait_log(dest, "The certificate hasn't got a known issuer")
    else:
        assert "TLSError: main channel: TLS handshake failed: certificate verify failed: " in line
        if case == "restore-trusts-another-ca":
            assert "the server's certificate" in line and "wrong CA?" in line, line
        else:
            assert "Hostname mismatch" in line and "'wrong.example'" in line, line
        wait_log(dest, "TLS handshake failed")
    assert dest.query_migrate().get("status", "none") in ("none", "setup")
    if case != "qemu-trusts-another-ca":
        again = start_restore(lab, pki, snap, port)
        assert again.wait(WAIT) == 0, again.stderr()
        assert dest.wait_migration(WAIT)["status"] == "completed", dest.log_tail()


def wait_log(q: qh.Qemu, text: str) -> None:
    """Wait (bounded) until QEMU's log says ``text``."""
    deadline = time.monotonic() + PROMPT
    while text not in q.log_tail(100_000):
        assert time.monotonic() < deadline, (text, q.log_tail())
        time.sleep(0.05)
