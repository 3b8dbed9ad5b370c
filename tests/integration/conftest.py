"""Fixtures for the integration tier: the network lab of Linux namespaces.

Without root or ``ip netns`` (or haproxy) the lab tests are skipped with the reason;
under CI (``CI=true``) they fail instead, so a broken runner never passes silently.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from lbappliance.testing.netlab import NetworkLab, lab_unavailable_reason, open_lab

#: Prefix of the shared ``lab`` fixture; override to run two checkouts' suites side by side.
LAB_PREFIX = os.environ.get("LBAPPLIANCE_LAB_PREFIX", "lbt")


def skip_or_fail(reason: str) -> None:
    """Skip locally, fail in CI: the integration tier must really run there."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def lab_available() -> None:
    """Gate for anything that builds a NetworkLab."""
    reason = lab_unavailable_reason()
    if reason is None and shutil.which("haproxy") is None:
        reason = "network lab node responders need haproxy (apt-get install haproxy)"
    if reason is not None:
        skip_or_fail(reason)


@pytest.fixture(scope="module")
def lab(lab_available: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetworkLab]:
    """A 3-node lab shared by one test module (building one takes ~0.5 s, responders ~1 s).

    Tests that cut links or flip health must restore them; tests that need a pristine
    or differently sized lab build their own NetworkLab with another prefix.
    Logs stay under pytest's tmp dir for post-mortems.
    """
    net = open_lab(LAB_PREFIX, 3, tmp_path_factory.mktemp("netlab"))
    try:
        yield net
    finally:
        net.down()
