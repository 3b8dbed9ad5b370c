"""Check candidate configs with the real binaries before anything replaces a running one."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Verdict:
    ok: bool
    output: str
    returncode: int | None = None


def _run(argv: list[str], timeout: float = 60.0) -> Verdict:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Verdict(False, f"{argv[0]}: {exc}")
    return Verdict(done.returncode == 0, (done.stdout + done.stderr).strip(), done.returncode)


def find_binary(configured: str, name: str) -> str | None:
    return configured if Path(configured).exists() else shutil.which(name)


def check_haproxy(path: Path, binary: str = "/usr/sbin/haproxy") -> Verdict:
    """`haproxy -c` parses and resolves references; it does not bind (see dataplane notes)."""
    found = find_binary(binary, "haproxy")
    if found is None:
        return Verdict(False, "haproxy binary not found")
    return _run([found, "-c", "-f", str(path)])  # not -q: it hides the reason for a rejection


def cited_lines(output: str, path: Path | str) -> list[int]:
    """The line numbers of `path` that HAProxy's messages cite (`[<path>:<line>]`)."""
    return [int(n) for n in re.findall(rf"\[{re.escape(str(path))}:(\d+)\]", output)]


def check_keepalived(path: Path, binary: str = "/usr/sbin/keepalived", *, unprivileged: bool | None = None) -> Verdict:
    found = find_binary(binary, "keepalived")
    if found is None:
        return Verdict(False, "keepalived binary not found")
    verdict = _run([found, "-t", "-l", "-D", "-f", str(path)])
    if unprivileged is None:
        unprivileged = os.geteuid() != 0
    if unprivileged:
        verdict = _forgive_unprivileged_script_check(verdict)
    # keepalived -t exits 0 on some config problems and only logs them; treat any complaint as fatal.
    complaint = any(word in verdict.output.lower()
                    for word in ("invalid", "unknown", "error", "ignoring", "missing", "violation"))
    return Verdict(verdict.ok and not complaint, verdict.output, verdict.returncode)


# Run by a non-root user (the hardened daemon, external processMode), keepalived -t cannot
# verify that a `script_user root` track script is safe and says so, exiting 5. The root
# keepalived that loads the file checks it for real, so that line alone is not a rejection.
_UNPRIVILEGED_SCRIPT_LINE = re.compile(r"^Disabling track script \S+ due to insecure$")
_CONFIG_TEST_FAILED = 5


def _forgive_unprivileged_script_check(verdict: Verdict) -> Verdict:
    lines = [line for line in verdict.output.splitlines() if line.strip()]
    rest = [line for line in lines if not _UNPRIVILEGED_SCRIPT_LINE.fullmatch(line.strip())]
    if verdict.returncode not in (0, _CONFIG_TEST_FAILED) or rest or not lines:
        return verdict
    return Verdict(True, "")
