"""keepalived edge: start (managed mode), SIGHUP reload, stop, and the VRRP state the notify hook records.

Every pid file lives in the appliance's state dir, so two keepalived in different network
namespaces on one host (the lab) never see each other's pid files and refuse to start.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import signal
import stat
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..core.render import EXTERNAL_SCRIPT_USER, VRRP_STATES, check_command, notify_command
from .files import read_text
from .processes import alive, kill_group, signal_and_wait, spawn_logged, stop_child, wait_ready


class KeepalivedError(RuntimeError):
    """keepalived could not be started or signalled."""


_TRANSITION = re.compile(r"\(([^)]+)\) Entering (MASTER|BACKUP|FAULT) STATE")


@dataclass
class Keepalived:
    """One keepalived (VRRP subsystem only) with its pid files under `state_dir`."""

    config_path: str
    state_dir: str
    pidfile: str
    binary: str = "/usr/sbin/keepalived"
    argv_prefix: Sequence[str] = ()
    log_path: str | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def vrrp_pidfile(self) -> str:
        return f"{self.state_dir}/keepalived-vrrp.pid"

    @property
    def checkers_pidfile(self) -> str:
        return f"{self.state_dir}/keepalived-checkers.pid"

    def argv(self) -> list[str]:
        """Foreground (-n), VRRP only (-P), log to the console (our log file), not to syslog (-G)."""
        return [*self.argv_prefix, self.binary, "-n", "-P", "-l", "-D", "-G", "-f", self.config_path,
                "-p", self.pidfile, "-r", self.vrrp_pidfile, "-c", self.checkers_pidfile]

    def start(self, timeout: float = 10.0) -> None:
        if self.running():
            raise KeepalivedError(f"keepalived already running as pid {self.main_pid()}")
        for path in (self.pidfile, self.vrrp_pidfile, self.checkers_pidfile):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self.proc = spawn_logged(self.argv(), self.log_path)
        problem = wait_ready(self.proc, lambda: bool(_read_pid(self.pidfile) and _read_pid(self.vrrp_pidfile)),
                             timeout)
        if problem is not None:
            raise KeepalivedError(f"keepalived {problem} (no pid files); see {self.log_path}")

    def main_pid(self) -> int | None:
        return _read_pid(self.pidfile)

    def vrrp_pid(self) -> int | None:
        return _read_pid(self.vrrp_pidfile)

    def running(self) -> bool:
        pid = self.main_pid()
        return pid is not None and alive(pid) and not (self.proc is not None and self.proc.poll() is not None)

    def reload(self) -> None:
        """SIGHUP: keepalived re-reads its config; VRRP instances that did not change keep their state."""
        pid = self.main_pid()
        if pid is None or not alive(pid):
            raise KeepalivedError("keepalived is not running; cannot reload")
        os.kill(pid, signal.SIGHUP)

    @property
    def reload_request_path(self) -> str:
        return f"{self.state_dir}/keepalived.reload"

    def request_reload(self) -> None:
        """External mode: keepalived is root's; ask lbappliance-keepalived-reload.path to
        reload-or-restart it. The file is the whole request; systemd consumes it."""
        fd = os.open(self.reload_request_path, os.O_WRONLY | os.O_CREAT, 0o644)
        os.close(fd)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM: keepalived sends priority-0 adverts so the peer takes over at once (planned failover)."""
        if self.proc is not None:
            stop_child(self.proc, signal.SIGTERM, timeout)
            return
        pid = self.main_pid()
        if pid is None:
            return
        signal_and_wait(pid, signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL parent and VRRP child together: a hard failure, no goodbye advert."""
        for pid in (self.vrrp_pid(), self.main_pid()):
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            kill_group(self.proc.pid)
            self.proc.wait(10)

    def transitions(self) -> list[tuple[str, str]]:
        """(instance, state) for every `Entering X STATE` line keepalived logged so far."""
        if not self.log_path:
            return []
        try:
            text = read_text(Path(self.log_path))
        except OSError:
            return []
        return _TRANSITION.findall(text)


def read_vrrp_states(state_dir: str) -> dict[str, str]:
    """instance -> MASTER/BACKUP/FAULT/STOP, as the notify hook last wrote it.

    Tolerant of anything else in the directory: links are not followed, and a file that is not
    a small regular file holding one known state is skipped (the hook never writes one).
    """
    out: dict[str, str] = {}
    for path in sorted(Path(state_dir).glob("vrrp-*.state")):
        state = _read_state_file(path)
        if state is not None:
            out[path.name[len("vrrp-"):-len(".state")]] = state
    return out


def _read_state_file(path: Path) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        state = os.read(fd, 64).decode("ascii", "replace").strip()
    except OSError:
        return None
    finally:
        os.close(fd)
    return state if state in VRRP_STATES else None


# ---- admission of the daemon-written keepalived.conf by root --------------------------------
#
# The unprivileged daemon writes /etc/keepalived/keepalived.conf; root keepalived reads it. A
# config can name scripts and the user they run as, so whoever writes it could make root run
# anything. keepalived.service therefore never reads the daemon's file: before every start and
# reload, `python -m lbappliance.edges.keepalived admit SRC DST` (as root) reads it once, checks
# it is made only of what the template renders, and writes that checked copy where only root
# can write; keepalived reads the copy. What is checked: every line's keyword is one the
# template uses; `script_user` is the daemon's user; `script` and `notify` are exactly the
# rendered check and notify commands (any path argument, which that user's permissions govern);
# no include, no `$` definitions, no `@` conditionals, no per-script user, no quotes elsewhere.

_KEYWORDS = frozenset({
    "global_defs", "router_id", "vrrp_version", "script_user", "enable_script_security", "vrrp_priority",
    "vrrp_garp_master_delay", "vrrp_garp_master_repeat", "vrrp_script", "interval", "timeout", "fall", "rise",
    "vrrp_instance", "state", "interface", "virtual_router_id", "priority", "advert_int", "nopreempt",
    "preempt_delay", "unicast_src_ip", "unicast_peer", "virtual_ipaddress", "virtual_ipaddress_excluded",
    "track_script",
})
_ADDRESS_BLOCKS = frozenset({"virtual_ipaddress", "virtual_ipaddress_excluded", "unicast_peer"})
_ADDRESS_OPTIONS = {"dev": None, "scope": frozenset({"link", "host", "global"})}
_PLAIN = re.compile(r"[A-Za-z0-9_.:/{} -]*")  # every line but `script`/`notify`: no quotes, $, @, ~, \, !, #
_PATH = r"/[A-Za-z0-9_./@+-]*"
_CHECK_LINE = re.compile(r'script "(?P<cmd>[^"]*)"')
_NOTIFY_LINE = re.compile(r'notify "(?P<cmd>.*)"')
MAX_CONFIG_BYTES = 16 << 20


class KeepalivedConfigRefused(ValueError):
    """A keepalived.conf that root will not load: it holds something the template never renders."""


def admit_config(text: str, script_user: str = EXTERNAL_SCRIPT_USER) -> None:
    """Raise KeepalivedConfigRefused unless `text` is made only of what keepalived.conf.j2 renders."""
    problems: list[str] = []
    blocks: list[str] = []
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip()
        if not line or (line.startswith("#") and number == 1):
            continue
        problem = _line_problem(line, blocks, script_user)
        if problem:
            problems.append(f"line {number}: {problem}")
    if blocks:
        problems.append(f"unclosed block {blocks[-1]!r}")
    if problems:
        raise KeepalivedConfigRefused("; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)"
                                                                 if len(problems) > 5 else ""))


def _line_problem(line: str, blocks: list[str], script_user: str) -> str | None:
    keyword = line.split()[0]
    if keyword in ("script", "notify"):
        return _script_problem(line, keyword)
    if not _PLAIN.fullmatch(line):
        return f"{keyword[:40]!r}: a character the template never renders"
    tokens = line.split()
    if tokens == ["}"]:
        if not blocks:
            return "'}' without a block"
        blocks.pop()
        return None
    if "}" in line or "{" in tokens[:-1] or ("{" in line and tokens[-1] != "{"):
        return "braces only at the end of a line, '}' on its own"
    opens = tokens[-1] == "{"
    words = tokens[:-1] if opens else tokens
    inside = blocks[-1] if blocks else None
    if inside in _ADDRESS_BLOCKS:
        problem = _address_problem(words)
    elif inside == "track_script":
        problem = None if len(words) == 1 and not opens else "one script name per line"
    elif keyword not in _KEYWORDS:
        problem = f"keyword {keyword[:40]!r} is not one the template renders"
    elif keyword == "script_user" and words != ["script_user", script_user]:
        problem = f"script_user must be {script_user!r}"
    else:
        problem = None
    if opens and problem is None:
        blocks.append(keyword)
    return problem


def _address_problem(words: list[str]) -> str | None:
    try:
        ipaddress.ip_interface(words[0])
    except ValueError:
        return f"{words[0][:60]!r} is not an address"
    rest = words[1:]
    while rest:
        option, value, rest = rest[0], rest[1] if len(rest) > 1 else None, rest[2:]
        allowed = _ADDRESS_OPTIONS.get(option, ())
        if option not in _ADDRESS_OPTIONS or value is None or (allowed is not None and value not in allowed):
            return f"address option {option[:40]!r} is not one the template renders"
    return None


def _script_problem(line: str, keyword: str) -> str | None:
    match = (_CHECK_LINE if keyword == "script" else _NOTIFY_LINE).fullmatch(line)
    if match is None:
        return f"{keyword}: not the rendered form (one quoted command, no user after it)"
    command = match.group("cmd").replace('\\"', '"')
    if keyword == "notify":
        argument = command.rsplit(" ", 1)[-1]
    else:
        found = re.search(r"< (\S+) ", command)
        argument = found.group(1) if found else ""
    if not re.fullmatch(_PATH, argument):
        return f"{keyword}: its path is not an absolute path of [A-Za-z0-9_./@+-]"
    expected = notify_command(argument) if keyword == "notify" else check_command(argument)
    if command != expected.replace('\\"', '"'):
        return f"{keyword}: not exactly the rendered {'notify' if keyword == 'notify' else 'check'} command"
    return None


def admit(source: str, target: str, script_user: str = EXTERNAL_SCRIPT_USER) -> None:
    """Root's side: read `source` once (no link followed, a regular file, bounded), check it, and
    write exactly those bytes to `target` (mode 0600, by rename). Raises KeepalivedConfigRefused or
    OSError; `target` is left as it was on any failure, so keepalived keeps its last admitted config."""
    fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_CONFIG_BYTES:
            raise KeepalivedConfigRefused(f"{source}: not a regular file of at most {MAX_CONFIG_BYTES} bytes")
        data = b""
        while chunk := os.read(fd, 1 << 20):
            data += chunk
            if len(data) > MAX_CONFIG_BYTES:
                raise KeepalivedConfigRefused(f"{source}: larger than {MAX_CONFIG_BYTES} bytes")
    finally:
        os.close(fd)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KeepalivedConfigRefused(f"{source}: not UTF-8 (offset {exc.start})") from None
    if any(ch != "\n" and ch != "\t" and not ch.isprintable() for ch in text):
        raise KeepalivedConfigRefused(f"{source}: holds control characters")
    try:
        admit_config(text, script_user)
    except KeepalivedConfigRefused as exc:
        raise KeepalivedConfigRefused(f"{source}: refused: {exc}") from None
    directory = os.path.dirname(target) or "."
    fd, tmp = tempfile.mkstemp(prefix=".admitted.", dir=directory)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m lbappliance.edges.keepalived admit SOURCE TARGET [SCRIPT_USER]` (keepalived.service)."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) not in (3, 4) or args[0] != "admit":
        print("usage: python -m lbappliance.edges.keepalived admit SOURCE TARGET [SCRIPT_USER]", file=sys.stderr)
        return 2
    try:
        admit(args[1], args[2], *args[3:])
    except (KeepalivedConfigRefused, OSError) as exc:
        print(f"lbappliance: keepalived config not admitted, keepalived keeps the last one: {exc}", file=sys.stderr)
        return 1
    print(f"lbappliance: admitted {args[1]} as {args[2]}")
    return 0


def _read_pid(path: str) -> int | None:
    try:
        return int(read_text(Path(path)).split()[0])
    except (OSError, ValueError, IndexError):
        return None


if __name__ == "__main__":
    raise SystemExit(main())
