"""The daemon and its files: a bad file at start exits 78 (systemd does not restart-loop), a bad
file on a live reload is refused without a crash, and the pools watch reacts to writes only.

No API server is needed: building the Daemon only loads the kubeconfig; nothing is started.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import yaml

from lbappliance.daemon.loop import Daemon, Flags, PoolsWatch, StartupError, main

POOLS = "apiVersion: lbappliance.io/v1alpha1\nkind: AddressPoolList\npools:\n- name: default\n  addresses: [192.0.2.240/29]\n"
KUBECONFIG = {
    "apiVersion": "v1", "kind": "Config", "current-context": "c",
    "clusters": [{"name": "k", "cluster": {"server": "https://127.0.0.1:1", "insecure-skip-tls-verify": True}}],
    "users": [{"name": "u", "user": {"token": "t"}}],
    "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
}
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8))
HOSTILE_FILES = {
    "not UTF-8": b"name: app\xff1\n",
    "recursive anchor": b"name: &x [*x]\n",
    "deep nesting": b"name: " + b"[" * 5000 + b"]" * 5000 + b"\n",
    "entity-expansion bomb": BOMB.encode(),
}


def files(tmp_path: Path, kubeconfig: Path | None = None) -> Path:
    (tmp_path / "pools.yaml").write_text(POOLS)
    if kubeconfig is None:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump(KUBECONFIG))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"paths": {"pools": str(tmp_path / "pools.yaml"), "stateDir": str(tmp_path / "s")},
                                      "cluster": {"kubeconfig": str(kubeconfig)}}))
    return config


@pytest.mark.parametrize("kubeconfig", ["missing", "not yaml: [", "kind: Config\n"])
def test_a_bad_or_missing_kubeconfig_at_start_exits_78(tmp_path: Path, kubeconfig: str,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "kubeconfig"
    if kubeconfig != "missing":
        path.write_text(kubeconfig)
    config = files(tmp_path, path)
    with pytest.raises(StartupError, match="kubeconfig"):
        Daemon(config)
    assert main(config) == 78


@pytest.mark.parametrize("kind", sorted(HOSTILE_FILES))
def test_a_hostile_config_or_pools_file_at_start_exits_78(tmp_path: Path, kind: str) -> None:
    config = files(tmp_path)
    (tmp_path / "pools.yaml").write_bytes(HOSTILE_FILES[kind])
    assert main(config) == 78
    files(tmp_path)
    config.write_bytes(HOSTILE_FILES[kind])
    assert main(config) == 78


@pytest.mark.parametrize("kind", sorted(HOSTILE_FILES))
def test_a_hostile_file_on_a_live_reload_is_refused_and_the_daemon_keeps_its_config(tmp_path: Path,
                                                                                     kind: str) -> None:
    config = files(tmp_path)
    daemon = Daemon(config)
    running, pools = daemon.config, daemon.pools
    (tmp_path / "pools.yaml").write_bytes(HOSTILE_FILES[kind])
    assert daemon.reload_pools(daemon.config) is False
    assert daemon.metrics.config_stale.labels("pools")._value.get() == 1
    config.write_bytes(HOSTILE_FILES[kind])
    assert daemon.reload_config() is False
    assert daemon.metrics.config_stale.labels("config")._value.get() == 1
    assert (daemon.config, daemon.pools) == (running, pools)


def test_the_pools_watch_ignores_reads_and_wakes_on_writes(tmp_path: Path) -> None:
    """The daemon's own read of pools.yaml fired inotify 'opened' events and woke it, ~14 passes
    a second after any edit; only writes, creates and moves onto the file count."""
    pools = tmp_path / "pools.yaml"
    pools.write_text(POOLS)
    (tmp_path / "other.yaml").write_text("x")
    flags = Flags()
    pokes: list[float] = []
    wake = flags.wake

    class CountingEvent(threading.Event):
        def set(self) -> None:
            pokes.append(time.monotonic())
            wake.set()

    flags.wake = CountingEvent()
    watch = PoolsWatch(flags)
    watch.follow(str(pools))
    try:
        time.sleep(0.3)
        for _ in range(50):
            pools.read_text()  # what every reload does
        (tmp_path / "other.yaml").write_text("y")
        time.sleep(0.5)
        assert pokes == [] and not flags.reload_pools
        pools.write_text(POOLS + "\n")
        deadline = time.monotonic() + 5
        while not flags.reload_pools and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.5)  # one write is a few events (modified, closed): let them all arrive
        assert flags.reload_pools and 1 <= len(pokes) <= 3
        flags.reload_pools = False
        pokes.clear()
        for _ in range(50):
            pools.read_text()
        time.sleep(0.5)
        assert pokes == [], "reads after an edit must not wake the loop"
    finally:
        watch.stop()
