"""A minimal QMP client over a unix socket, with bounded waits (events are skipped)."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

from procs import BenchError, Child


class QMP:
    def __init__(self, path: Path, child: Child, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        self.sock = socket.socket(socket.AF_UNIX)
        while True:
            try:
                self.sock.connect(str(path))
                break
            except OSError:
                if child.try_reap():
                    self.sock.close()
                    raise BenchError(child.describe_failure()) from None
                if time.monotonic() > deadline:
                    self.sock.close()
                    raise BenchError(f"no QMP socket {path} after {timeout:.0f} s") from None
                time.sleep(0.02)
        self.sock.settimeout(timeout)
        self.file = self.sock.makefile("rwb")
        self.name = child.name
        greeting = self._read()
        if "QMP" not in greeting:
            raise BenchError(f"{self.name}: not a QMP greeting: {greeting}")
        self.cmd("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        try:
            line = self.file.readline()
        except TimeoutError:
            raise BenchError(f"{self.name}: QMP did not answer in time") from None
        if not line:
            raise BenchError(f"{self.name}: QMP connection closed")
        return dict(json.loads(line))

    def cmd(self, name: str, **args: Any) -> Any:
        msg: dict[str, Any] = {"execute": name}
        if args:
            msg["arguments"] = args
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        while True:
            reply = self._read()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise BenchError(f"{self.name}: QMP {name} failed: {reply['error']}")
            # an event: skip it

    def close(self) -> None:
        try:
            self.file.close()
        finally:
            self.sock.close()
