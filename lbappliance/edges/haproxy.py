"""HAProxy edge: master-worker process control, master CLI reloads, runtime API over unix sockets.

Facts this relies on (HAProxy 2.6.12, checked): the master CLI `reload` answers nothing and a
failed reload only shows in `show proc` (`[failed: N]` on the master line) while the old worker
keeps serving; the master CLI keeps a connection open unless the command ends in `;quit`;
dynamic servers (`add server`) do not inherit `default-server`, start in maintenance and need
`enable server` + `enable health`; `del server` refuses while the server has connections.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .files import atomic_write, read_text
from .processes import alive, spawn_logged, stop_child, stop_pid, wait_ready

log = logging.getLogger(__name__)


class HaproxyError(RuntimeError):
    """A socket or process operation failed; the message carries HAProxy's answer."""


def socket_command(path: str, command: str, timeout: float = 5.0) -> str:
    """Send one command line to a unix CLI socket and read until HAProxy closes the connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            sock.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except OSError as exc:
            raise HaproxyError(f"{path}: {command!r}: {exc}") from exc
    return b"".join(chunks).decode(errors="replace")


@dataclass(frozen=True)
class ProcTable:
    """The master's `show proc`: reload and failure counters, current and old workers."""

    master_pid: int
    reloads: int
    failed: int
    workers: tuple[int, ...] = ()
    old_workers: tuple[int, ...] = ()


_MASTER_LINE = re.compile(r"^(\d+)\s+master\s+(\d+)(?:\s+\[failed:\s*(\d+)\])?")
_WORKER_LINE = re.compile(r"^(\d+)\s+worker\s+(\d+)")


def parse_show_proc(text: str) -> ProcTable:
    """Parse `show proc` (2.6 layout: master line, `# workers`, `# old workers`, `# programs`)."""
    master = reloads = failed = 0
    workers: list[int] = []
    old: list[int] = []
    section = ""
    for line in text.splitlines():
        if line.startswith("#"):
            section = line.strip("# ").lower()
            continue
        if m := _MASTER_LINE.match(line):
            master, reloads, failed = int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
        elif m := _WORKER_LINE.match(line):
            (old if section.startswith("old") else workers).append(int(m.group(1)))
    if not master:
        raise HaproxyError(f"no master line in show proc output: {text!r}")
    return ProcTable(master, reloads, failed, tuple(workers), tuple(old))


def rss_kb(pid: int) -> int:
    """Resident memory of a process from /proc (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return 0
    return 0


@dataclass(frozen=True)
class ReloadResult:
    ok: bool
    seconds: float
    worker: int | None
    message: str = ""


_STATUS_WORDS = ("MAINT", "DRAIN", "DOWN", "UP")


def normalise_status(status: str) -> str:
    """`UP 1/2`, `DOWN 1/2`, `no check`, `MAINT (via ...)` -> UP/DOWN/MAINT/DRAIN."""
    upper = status.upper()
    if upper.startswith("NO CHECK"):
        return "UP"
    return next((w for w in _STATUS_WORDS if upper.startswith(w)), upper or "UNKNOWN")


@dataclass
class HAProxy:
    """One HAProxy master and its workers, reached through the master socket and the runtime socket.

    `argv_prefix` (for example `["ip", "netns", "exec", "ns"]`) lets tests run it inside a namespace.
    """

    config_path: str
    master_socket: str
    runtime_socket: str
    pidfile: str
    binary: str = "/usr/sbin/haproxy"
    argv_prefix: Sequence[str] = ()
    log_path: str | None = None
    server_state_file: str | None = None  # the config's `server-state-file`; None: nothing carried over
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    # ---- process control

    def argv(self) -> list[str]:
        """Foreground master-worker; the pidfile comes from the config's `pidfile` (a second -p warns)."""
        return [*self.argv_prefix, self.binary, "-W", "-S", f"{self.master_socket},mode,600", "-f", self.config_path]

    def start(self, timeout: float = 15.0, take_over: HAProxy | None = None) -> None:
        """Start the master (managed mode) and wait until a worker answers on the runtime socket.

        `take_over`: a running master on other paths (a reload moved the state dir). The new one
        receives its listening sockets over its runtime socket (`-x`, `expose-fd listeners`), so
        no connection is refused in between. Only once a new worker answers is the old master told
        to finish its connections and exit (SIGUSR1, a soft stop): with `-sf` the new master signals
        it as it forks, and a SYN could wait on nobody while the new worker was still starting.
        """
        if self.running():
            raise HaproxyError(f"haproxy already running as pid {self.master_pid()}")
        for stale in (self.pidfile, self.server_state_file):  # a cold start trusts its own checks
            if stale:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(stale)
        argv = self.argv()
        old_pid = take_over.master_pid() if take_over is not None else None
        if take_over is not None and old_pid is not None:
            argv += ["-x", take_over.runtime_socket]
            take_over.save_server_state(self.server_state_file)
        self.proc = spawn_logged(argv, self.log_path)
        problem = wait_ready(self.proc, lambda: bool(self.show_proc().workers and self.runtime("show info")),
                             timeout, (HaproxyError,))
        if problem is not None:
            raise HaproxyError(f"haproxy {problem}; see {self.log_path}")
        if old_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(old_pid, signal.SIGUSR1)

    def save_server_state(self, path: str | None = None) -> None:
        """Which servers the checks hold DOWN, to the file the next worker loads (`server-state-file`;
        `path`: the next master's, on a take-over): a new worker assumes every server UP, and sends a
        dead node traffic until its checks fail again. Best effort: without the file the next
        worker starts from its checks."""
        path = path or self.server_state_file
        if path is None:
            return
        try:
            atomic_write(Path(path), down_servers_only(self.runtime("show servers state")))
        except (HaproxyError, OSError) as exc:
            log.debug("server state not saved: %s", exc)

    def master_pid(self) -> int | None:
        try:
            return int(read_text(Path(self.pidfile)).split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def running(self) -> bool:
        pid = self.master_pid()
        return pid is not None and alive(pid) and not (self.proc is not None and self.proc.poll() is not None)

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
        """Stop the master (it stops its workers); SIGKILL the group if it lingers."""
        if self.proc is not None:
            stop_child(self.proc, sig, timeout)
            return
        pid = self.master_pid()
        if pid is not None:
            stop_pid(pid, sig, timeout)

    # ---- master CLI

    def master(self, command: str, timeout: float = 5.0) -> str:
        """A master CLI command; `;quit` makes the master close the connection when done."""
        return socket_command(self.master_socket, f"{command};quit", timeout)

    def show_proc(self) -> ProcTable:
        return parse_show_proc(self.master("show proc"))

    def reload(self, timeout: float = 30.0) -> ReloadResult:
        """Seamless reload; success means the failed counter held and a new worker answers the CLI."""
        start = time.monotonic()
        before = self.show_proc()
        self.save_server_state()
        with contextlib.suppress(HaproxyError):
            self.master("reload", timeout)  # 2.6.12 closes the connection without an answer
        deadline = start + timeout
        while time.monotonic() < deadline:
            try:
                table = self.show_proc()
            except HaproxyError:
                time.sleep(0.01)  # the master is re-executing itself
                continue
            if table.reloads > before.reloads:
                return self._reload_outcome(before, table, start, deadline)
            time.sleep(0.01)
        return ReloadResult(False, time.monotonic() - start, None, "reload not acknowledged in show proc")

    def _reload_outcome(self, before: ProcTable, after: ProcTable, start: float, deadline: float) -> ReloadResult:
        if after.failed > before.failed:
            return ReloadResult(False, time.monotonic() - start, None,
                                f"reload failed (show proc failed {before.failed} -> {after.failed}); "
                                "old worker keeps serving")
        fresh = [pid for pid in after.workers if pid not in before.workers]
        if not fresh:
            return ReloadResult(False, time.monotonic() - start, None, "no new worker after reload")
        while time.monotonic() < deadline:
            with contextlib.suppress(HaproxyError, ValueError):
                if _info_pid(self.master("@1 show info")) == fresh[0]:
                    return ReloadResult(True, time.monotonic() - start, fresh[0])
            time.sleep(0.005)
        return ReloadResult(False, time.monotonic() - start, fresh[0], "new worker never answered")

    def old_workers(self) -> list[tuple[int, int]]:
        """(pid, RSS kB) of workers left over from earlier reloads, still finishing connections."""
        return [(pid, rss_kb(pid)) for pid in self.show_proc().old_workers]

    def worker_rss(self) -> list[tuple[int, int]]:
        return [(pid, rss_kb(pid)) for pid in self.show_proc().workers]

    # ---- runtime API (current worker)

    def runtime(self, command: str, timeout: float = 5.0) -> str:
        return socket_command(self.runtime_socket, command, timeout).strip()

    def _expect(self, command: str, ok: Sequence[str] = ("",)) -> str:
        answer = self.runtime(command)
        if not any(answer.startswith(prefix) for prefix in ok) and answer not in ok:
            raise HaproxyError(f"{command!r}: {answer}")
        return answer

    def add_server(self, backend: str, name: str, target: str, options: str) -> None:
        """Create a dynamic server, then take it out of maintenance and start its checks."""
        self._expect(f"add server {backend}/{name} {target} {options}".strip(), ("New server registered",))
        if "check" in options.split():
            self._expect(f"enable health {backend}/{name}")
        self._expect(f"enable server {backend}/{name}")

    def readd_server(self, backend: str, name: str, address: str, port: int) -> None:
        """A server awaiting deletion is wanted again: point it at the address and make it ready."""
        self.set_address(backend, name, address, port)
        self._expect(f"set server {backend}/{name} state ready")

    def set_address(self, backend: str, name: str, address: str, port: int) -> None:
        self._expect(f"set server {backend}/{name} addr {address} port {port}", ("IP changed", "no need to change"))

    def set_weight(self, backend: str, name: str, weight: int) -> None:
        self._expect(f"set server {backend}/{name} weight {int(weight)}")

    def remove_server(self, backend: str, name: str) -> bool:
        """Drain, and delete once no session is left; False while it still has some (retry later).

        Maintenance is not a safe first step: with `on-marked-down shutdown-sessions` HAProxy cuts
        the server's sessions on entering maintenance too, so only an idle server goes to maint.
        """
        answer = self.runtime(f"set server {backend}/{name} state drain")
        if answer.startswith("No such server"):
            return True
        if self.server_sessions(backend, name) > 0:
            return False
        self._expect(f"set server {backend}/{name} state maint")
        answer = self.runtime(f"del server {backend}/{name}")
        if answer.startswith(("Server deleted", "No such server")):
            return True
        if "pointing to it" in answer:
            # A rendered monitor server others tracked: HAProxy keeps it for good. It stays in
            # maintenance (unchecked) until the next reload; a returning node re-enables it.
            return True
        if "connection" in answer.lower() or "queue" in answer.lower():
            return False
        raise HaproxyError(f"del server {backend}/{name}: {answer}")

    def server_sessions(self, backend: str, name: str) -> int:
        """Current sessions plus queued requests of one server (`show stat <backend> 4 -1`)."""
        for row in self.stat_rows(f"{backend} 4 -1"):
            if row.get("svname") == name:
                return int(row.get("scur") or 0) + int(row.get("qcur") or 0)
        return 0

    def server_states(self) -> dict[tuple[str, str], str]:
        """(backend, server) -> UP/DOWN/MAINT/DRAIN from `show stat` of the current worker."""
        return {key: status for key, (status, _check) in self.server_checks().items()}

    def server_checks(self) -> dict[tuple[str, str], tuple[str, str]]:
        """(backend, server) -> (UP/DOWN/MAINT/DRAIN, check status), from one `show stat` of the
        servers only (`-1 4 -1`: at 1,000 Services 3,000 of 5,000 rows, half the time)."""
        return parse_server_checks(self.runtime("show stat -1 4 -1"))

    def shutdown_sessions(self, backend: str, name: str) -> None:
        """End every session of one server now (a dead node's, or a drain that timed out)."""
        self._expect(f"shutdown sessions server {backend}/{name}", ("", "No such server."))

    def stat_rows(self, selector: str = "") -> list[dict[str, str]]:
        """`show stat [selector]` as dicts (counters for tests and metrics)."""
        lines = self.runtime(f"show stat {selector}".strip()).splitlines()
        header = lines[0].lstrip("# ").split(",") if lines else []
        return [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]


def down_servers_only(dump: str) -> str:
    """`show servers state` reduced to the servers its checks hold DOWN (operational state 0), in
    no maintenance: everything else comes from the new config (weights, addresses, runtime
    maintenance of servers awaiting deletion must not outlive the reload that drops them)."""
    lines = dump.splitlines()
    kept = [lines[0]] if lines else []
    for line in lines[1:]:
        fields = line.split()
        if len(fields) > 6 and not line.startswith("#") and fields[5] == "0":
            fields[6] = "0"
            kept.append(" ".join(fields))
    return "\n".join(kept) + "\n" if kept else ""


def parse_server_checks(text: str) -> dict[tuple[str, str], tuple[str, str]]:
    """`show stat` CSV -> (backend, server) -> (UP/DOWN/MAINT/DRAIN, its check's status such as
    L7STS or L4TOUT; empty for a server that tracks another instead of checking)."""
    out: dict[tuple[str, str], tuple[str, str]] = {}
    lines = text.splitlines()
    if not lines:
        return out
    col = {name: i for i, name in enumerate(lines[0].lstrip("# ").split(","))}
    status_at, check_at = col["status"], col.get("check_status", -1)
    for line in lines[1:]:
        fields = line.split(",")
        if len(fields) <= max(status_at, check_at) or fields[1] in ("FRONTEND", "BACKEND", ""):
            continue
        check = fields[check_at].lstrip("* ") if check_at >= 0 else ""
        out[(fields[0], fields[1])] = (normalise_status(fields[status_at]), check)
    return out


def _info_pid(text: str) -> int:
    for line in text.splitlines():
        if line.startswith("Pid:"):
            return int(line.split(":", 1)[1])
    raise ValueError("no Pid in show info")

