"""nftables edge: load the appliance's own table (`inet lbappliance`) in one `nft -f` transaction.

The text comes from `lbappliance.core.nft.render_nft`; it names only our table, so other
tables (a firewall, kube-proxy on a shared box, anything an admin added) are never touched.
`argv_prefix` (for example `["ip", "netns", "exec", "lbt-app1"]`) runs nft inside a namespace,
the same one as the box's HAProxy and keepalived.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lbappliance.core.nft import render_nft

from .files import atomic_write
from .validate import Verdict, find_binary


class NftError(RuntimeError):
    """nft refused the ruleset (nothing was changed: the transaction is all or nothing)."""


@dataclass
class Nftables:
    state_dir: str
    binary: str = "/usr/sbin/nft"
    argv_prefix: Sequence[str] = ()

    @property
    def ruleset_path(self) -> Path:
        """The last ruleset loaded (or checked); what is live in the kernel, for humans to read."""
        return Path(self.state_dir) / "nftables.nft"

    def available(self) -> bool:
        return find_binary(self.binary, "nft") is not None

    def _nft(self, *args: str, timeout: float = 30.0) -> Verdict:
        found = find_binary(self.binary, "nft")
        if found is None:
            return Verdict(False, "nft binary not found")
        argv = [*self.argv_prefix, found, *args]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return Verdict(False, f"{' '.join(argv)}: {exc}")
        return Verdict(done.returncode == 0, (done.stdout + done.stderr).strip())

    def check(self, text: str) -> Verdict:
        """`nft -c -f`: the kernel checks the whole transaction without committing it."""
        candidate = Path(f"{self.ruleset_path}.candidate")
        atomic_write(candidate, text)
        verdict = self._nft("-c", "-f", str(candidate))
        candidate.unlink(missing_ok=True)
        return verdict

    def load(self, text: str) -> None:
        """Replace our table atomically; raises NftError (and changes nothing) when refused."""
        path = Path(f"{self.ruleset_path}.next")
        atomic_write(path, text)
        verdict = self._nft("-f", str(path))
        if not verdict.ok:
            path.replace(f"{self.ruleset_path}.rejected")
            raise NftError(f"nft -f refused the ruleset: {verdict.output}")
        path.replace(self.ruleset_path)

    def remove(self) -> None:
        """Drop our table (and nothing else); fine when it does not exist."""
        self.load(render_nft(()))
