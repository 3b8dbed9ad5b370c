"""Every golden nftables ruleset is accepted by the real kernel (`nft -c` in a throwaway namespace)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
SHAPES = sorted(p.name for p in GOLDEN.iterdir() if (p / "nftables.nft").exists())


@pytest.fixture(scope="module")
def netns() -> str:
    if os.geteuid() != 0 or shutil.which("nft") is None or shutil.which("ip") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("nft checks need root, iproute2 and nftables in CI")
        pytest.skip("nft checks need root, iproute2 and nftables")
    name = f"lbnftc{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.mark.integration
@pytest.mark.parametrize("shape", SHAPES)
def test_golden_nft_ruleset_passes_nft_c(shape: str, netns: str) -> None:
    done = subprocess.run(["ip", "netns", "exec", netns, "nft", "-c", "-f", str(GOLDEN / shape / "nftables.nft")],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
