"""A real Kubernetes control plane (kube-apiserver + etcd) for tests and the lab.

The binaries are built from the Kubernetes Go modules by
``tools/controlplane/build.sh`` into a cache directory outside the repository
(see :func:`ensure_built`). :class:`ControlPlane` starts etcd and
kube-apiserver on loopback ports with freshly generated certificates and
writes two kubeconfigs:

* ``admin.kubeconfig`` -- client certificate ``O=system:masters`` (cluster admin);
* ``appliance.kubeconfig`` -- client certificate ``CN=lbappliance`` and no group
  besides ``system:authenticated``; it can do nothing until ``deploy/rbac.yaml``
  is applied.

No controller-manager or scheduler runs: the apiserver still allocates
ClusterIPs and NodePorts, validates status writes and honours finalizers, but
namespaces never finish terminating and nothing garbage-collects.

``cryptography`` is a test extra, so it is imported lazily.

Usage::

    bin_dir = find_binaries()
    with ControlPlane(bin_dir) as cp:
        client = kubernetes.config.new_client_from_config(config_file=str(cp.admin_kubeconfig))

Standalone: ``python -m lbappliance.testing.controlplane`` (prints the
kubeconfig paths and waits for Ctrl-C).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from lbappliance.edges.processes import signal_and_wait, stop_child

log = logging.getLogger(__name__)

#: Environment variable naming a directory that holds ``kube-apiserver`` and ``etcd``.
BIN_ENV = "LBAPPLIANCE_CONTROLPLANE_BIN"
#: Set to ``1`` to keep the work directory (certs, logs, etcd data) after stop().
KEEP_ENV = "LBAPPLIANCE_KEEP_CONTROLPLANE"

APISERVER = "kube-apiserver"
ETCD = "etcd"

#: In-apiserver ClusterIP allocation range. Nothing ever routes or contacts these
#: addresses: no kube-proxy runs, the tests only talk to loopback.
DEFAULT_SERVICE_CIDR = "10.96.0.0/16"
DEFAULT_SERVICE_NODE_PORT_RANGE = "30000-32767"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"

ADMIN_USER = "lbappliance-admin"
APPLIANCE_USER = "lbappliance"


class ControlPlaneError(RuntimeError):
    """The control plane could not be built, found, started or stopped."""


# --------------------------------------------------------------------------- binaries


def find_repo_root(start: Path | None = None) -> Path | None:
    """The checkout holding ``tools/controlplane/build.sh`` (None for an installed wheel)."""
    candidates: list[Path] = []
    if start is not None:
        candidates.append(Path(start).resolve())
    candidates.append(Path(__file__).resolve().parent)
    candidates.append(Path.cwd().resolve())
    for base in candidates:
        for d in (base, *base.parents):
            if (d / "tools" / "controlplane" / "build.sh").is_file():
                return d
    return None


def _check_bin_dir(bin_dir: Path) -> Path:
    missing = [n for n in (APISERVER, ETCD) if not os.access(bin_dir / n, os.X_OK)]
    if missing:
        raise ControlPlaneError(f"{bin_dir}: missing executable(s): {', '.join(missing)}")
    return bin_dir


def ensure_built(repo_root: Path | str | None = None, *, timeout: float | None = None) -> Path:
    """Run ``tools/controlplane/build.sh`` (a no-op when already built); return the bin dir.

    A cold build takes 10-20+ minutes on 2 cores. Build output goes to stderr.
    """
    root = Path(repo_root) if repo_root is not None else find_repo_root()
    if root is None:
        raise ControlPlaneError("cannot find tools/controlplane/build.sh (not running from a checkout?)")
    script = root / "tools" / "controlplane" / "build.sh"
    if not script.is_file():
        raise ControlPlaneError(f"{script} does not exist")
    if shutil.which("go") is None:
        raise ControlPlaneError("`go` is not on PATH; cannot build kube-apiserver/etcd")
    try:
        proc = subprocess.run(
            ["bash", str(script)],
            stdout=subprocess.PIPE,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ControlPlaneError(f"{script} timed out after {timeout}s") from exc
    if proc.returncode != 0:
        raise ControlPlaneError(f"{script} failed with exit code {proc.returncode}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if not lines:
        raise ControlPlaneError(f"{script} printed no bin directory")
    return _check_bin_dir(Path(lines[-1].strip()))


def find_binaries(repo_root: Path | str | None = None, *, build: bool = True) -> Path:
    """Directory holding ``kube-apiserver`` and ``etcd``.

    ``$LBAPPLIANCE_CONTROLPLANE_BIN`` wins when set. Otherwise, in a checkout,
    the build script is run (it returns at once when the cached binaries
    exist); with ``build=False``, or without a checkout, only an existing
    build is accepted.
    """
    env = os.environ.get(BIN_ENV)
    if env:
        return _check_bin_dir(Path(env))
    root = Path(repo_root) if repo_root is not None else find_repo_root()
    if build and root is not None:
        return ensure_built(root)
    # The newest complete build in the cache the build script fills (an installed wheel has no
    # build script, but a build made earlier from a checkout, or copied there, serves it too).
    cache = Path(os.environ.get("LBAPPLIANCE_CACHE", Path.home() / ".cache" / "lbappliance")) / "controlplane"
    for d in sorted(cache.glob("*/bin"), key=lambda p: p.stat().st_mtime, reverse=True):
        with contextlib.suppress(ControlPlaneError):
            return _check_bin_dir(d)
    raise ControlPlaneError(f"no built control plane under {cache}: run tools/controlplane/build.sh from a checkout, "
                            f"or set ${BIN_ENV} to a directory holding kube-apiserver and etcd")


# --------------------------------------------------------------------------- PKI


@dataclass(frozen=True)
class _KeyPair:
    cert_pem: bytes
    key_pem: bytes


class _PKI:
    """A throwaway CA (serving and client CA) plus helpers to issue certificates."""

    def __init__(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self._x509 = x509
        self._hashes = hashes
        self._ser = serialization
        self._ec = ec
        self._oid = NameOID
        self._now = _dt.datetime.now(_dt.UTC) - _dt.timedelta(hours=1)
        self._not_after = self._now + _dt.timedelta(days=365)

        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lbappliance-test-ca")])
        ski = x509.SubjectKeyIdentifier.from_public_key(self.ca_key.public_key())
        self.ca_cert = (
            self._builder(name, name, self.ca_key.public_key(), ca=True)
            .add_extension(ski, critical=False)
            .sign(self.ca_key, hashes.SHA256())
        )

    def _builder(self, subject: Any, issuer: Any, public_key: Any, *, ca: bool) -> Any:
        """A certificate valid for a year: a CA's (signs certificates) or a leaf's (signs only)."""
        x509 = self._x509
        usage = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                              data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                              encipher_only=False, decipher_only=False)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._now)
            .not_valid_after(self._not_after)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(usage, critical=True)
        )

    @property
    def ca_pem(self) -> bytes:
        return self.ca_cert.public_bytes(self._ser.Encoding.PEM)

    def _key_pem(self, key) -> bytes:  # type: ignore[no-untyped-def]
        return key.private_bytes(self._ser.Encoding.PEM, self._ser.PrivateFormat.PKCS8, self._ser.NoEncryption())

    def issue(
        self,
        common_name: str,
        *,
        organizations: Sequence[str] = (),
        server: bool = False,
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[str] = (),
    ) -> _KeyPair:
        x509, NameOID = self._x509, self._oid
        key = self._ec.generate_private_key(self._ec.SECP256R1())
        attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
        eku = x509.oid.ExtendedKeyUsageOID.SERVER_AUTH if server else x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            self._builder(x509.Name(attrs), self.ca_cert.subject, key.public_key(), ca=False)
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key.public_key()), critical=False)
        )
        if server:
            sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
            sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.ca_key, self._hashes.SHA256())
        return _KeyPair(cert.public_bytes(self._ser.Encoding.PEM), self._key_pem(key))

    @staticmethod
    def service_account_keys() -> tuple[bytes, bytes]:
        """(private PEM, public PEM) RSA pair for signing service-account tokens."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        priv = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        return priv, pub


def _write(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _kubeconfig(server: str, ca_pem: bytes, user: str, pair: _KeyPair, context: str) -> str:
    # JSON is valid YAML, and keeps this free of a PyYAML import.
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "lbappliance-test",
                "cluster": {"server": server, "certificate-authority-data": _b64(ca_pem)},
            }
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate-data": _b64(pair.cert_pem),
                    "client-key-data": _b64(pair.key_pem),
                },
            }
        ],
        "contexts": [{"name": context, "context": {"cluster": "lbappliance-test", "user": user}}],
        "current-context": context,
        "preferences": {},
    }
    return json.dumps(doc, indent=2) + "\n"


# --------------------------------------------------------------------------- processes


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on ``host`` (racy by nature; callers retry)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    # PR_SET_PDEATHSIG: the child gets SIGKILL when the thread that forked it
    # dies, so an aborted test run never leaks etcd/apiserver processes.
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)
    except Exception:
        pass


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class _Proc:
    """One child process we started, logged to a file, stopped by PID only."""

    def __init__(self, name: str, argv: list[str], log_path: Path, *, die_with_parent: bool) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._log.write(f"\n==== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(argv)}\n".encode())
        self._log.flush()
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in a terminal reaches us, not the children
            preexec_fn=_die_with_parent if die_with_parent else None,
            close_fds=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.popen.poll() is None and not signal_and_wait(self.pid, signal.SIGTERM, timeout, self.popen):
            log.warning("%s (pid %d) ignored SIGTERM for %.0fs; sending SIGKILL", self.name, self.pid, timeout)
        stop_child(self.popen, signal.SIGKILL, 10)
        with contextlib.suppress(Exception):
            self._log.close()
        return self.popen.returncode


# --------------------------------------------------------------------------- control plane


class ControlPlane:
    """etcd + kube-apiserver on loopback, with generated PKI and kubeconfigs.

    ``workdir``: where certs, kubeconfigs, logs and etcd data go. When None a
    temporary directory is created and removed again by :meth:`stop` (unless
    ``keep`` is set, start-up failed, the ``with`` block raised, or
    ``$LBAPPLIANCE_KEEP_CONTROLPLANE=1``). A caller-supplied ``workdir`` is
    never removed.

    ``bind_address``: the apiserver's listen/advertise address (loopback by
    default; the lab may pass an address reachable from its namespaces).
    """

    def __init__(
        self,
        bin_dir: Path | str,
        workdir: Path | str | None = None,
        *,
        keep: bool = False,
        bind_address: str = "127.0.0.1",
        service_cidr: str = DEFAULT_SERVICE_CIDR,
        extra_apiserver_args: Iterable[str] = (),
        extra_etcd_args: Iterable[str] = (),
        die_with_parent: bool = True,
        start_timeout: float = 60.0,
    ) -> None:
        self.bin_dir = _check_bin_dir(Path(bin_dir))
        self._own_workdir = workdir is None
        self._workdir_arg = Path(workdir) if workdir is not None else None
        self.keep = keep or os.environ.get(KEEP_ENV, "") not in ("", "0", "false")
        self.bind_address = bind_address
        self.service_cidr = service_cidr
        self.extra_apiserver_args = list(extra_apiserver_args)
        self.extra_etcd_args = list(extra_etcd_args)
        self.die_with_parent = die_with_parent
        self.start_timeout = start_timeout

        self.workdir: Path | None = None
        self.etcd_port: int | None = None
        self.etcd_peer_port: int | None = None
        self.secure_port: int | None = None
        self.ready_seconds: float | None = None  # start() call to ready
        self.apiserver_ready_seconds: float | None = None  # last apiserver (re)start to ready
        self._etcd: _Proc | None = None
        self._apiserver: _Proc | None = None
        self._pki: _PKI | None = None
        self._failed = False

    # ---- paths and URLs ----------------------------------------------------------

    def _wd(self) -> Path:
        if self.workdir is None:
            raise ControlPlaneError("control plane not started")
        return self.workdir

    @property
    def pki_dir(self) -> Path:
        return self._wd() / "pki"

    @property
    def logs_dir(self) -> Path:
        return self._wd() / "logs"

    @property
    def etcd_data_dir(self) -> Path:
        return self._wd() / "etcd-data"

    @property
    def ca_file(self) -> Path:
        return self.pki_dir / "ca.crt"

    @property
    def admin_kubeconfig(self) -> Path:
        return self._wd() / "admin.kubeconfig"

    @property
    def appliance_kubeconfig(self) -> Path:
        return self._wd() / "appliance.kubeconfig"

    @property
    def url(self) -> str:
        host = f"[{self.bind_address}]" if ":" in self.bind_address else self.bind_address
        return f"https://{host}:{self.secure_port}"

    @property
    def etcd_url(self) -> str:
        return f"http://127.0.0.1:{self.etcd_port}"

    @property
    def apiserver_pid(self) -> int | None:
        return self._apiserver.pid if self._apiserver and self._apiserver.alive() else None

    @property
    def etcd_pid(self) -> int | None:
        return self._etcd.pid if self._etcd and self._etcd.alive() else None

    @property
    def apiserver_log(self) -> Path:
        return self.logs_dir / "kube-apiserver.log"

    @property
    def etcd_log(self) -> Path:
        return self.logs_dir / "etcd.log"

    # ---- lifecycle -----------------------------------------------------------------

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None and exc_type is not KeyboardInterrupt:
            self._failed = True
        self.stop()

    def start(self) -> float:
        """Start etcd and kube-apiserver; block until ready. Returns seconds to ready."""
        if self._etcd is not None:
            raise ControlPlaneError("already started")
        t0 = time.monotonic()
        if self._own_workdir:
            self.workdir = Path(tempfile.mkdtemp(prefix="lbappliance-cp-"))
        else:
            assert self._workdir_arg is not None
            self.workdir = self._workdir_arg.resolve()
            self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._write_pki()
            last: Exception | None = None
            for _attempt in range(3):  # free ports are racy: retry with new ones
                try:
                    self._start_etcd()
                    break
                except ControlPlaneError as e:
                    last = e
                    if self._etcd:
                        self._etcd.stop()
                        self._etcd = None
                    shutil.rmtree(self.etcd_data_dir, ignore_errors=True)
            else:
                raise last or ControlPlaneError("etcd did not start")
            for _attempt in range(3):
                try:
                    self.secure_port = free_port(self.bind_address)
                    self._write_kubeconfigs()
                    self.start_apiserver()
                    break
                except ControlPlaneError as e:
                    last = e
                    if "address already in use" not in _tail(self.apiserver_log, 80):
                        raise
            else:
                raise last or ControlPlaneError("kube-apiserver did not start")
        except BaseException:
            self._failed = True
            self.stop()
            raise
        self.ready_seconds = time.monotonic() - t0
        log.info("control plane ready in %.2fs at %s (workdir %s)", self.ready_seconds, self.url, self.workdir)
        return self.ready_seconds

    def stop(self) -> None:
        """Stop what we started (apiserver first, then etcd) and clean up."""
        self.stop_apiserver()
        if self._etcd is not None:
            self._etcd.stop()
            self._etcd = None
        if self.workdir is None:
            return
        if self._failed or self.keep:
            print(f"lbappliance control plane: kept {self.workdir} (logs in {self.logs_dir})", file=sys.stderr)
        elif self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def stop_apiserver(self, timeout: float = 15.0) -> None:
        """Stop only kube-apiserver (an API outage); etcd and the certs stay."""
        if self._apiserver is not None:
            self._apiserver.stop(timeout=timeout)
            self._apiserver = None

    def start_apiserver(self) -> float:
        """(Re)start kube-apiserver on the same port with the same etcd and certs.

        Blocks until ``/readyz`` and ``GET /api/v1/namespaces/default`` succeed;
        returns the seconds that took.
        """
        if self._etcd is None or not self._etcd.alive():
            raise ControlPlaneError("etcd is not running")
        if self._apiserver is not None and self._apiserver.alive():
            raise ControlPlaneError("kube-apiserver is already running")
        t0 = time.monotonic()
        self._apiserver = _Proc(
            APISERVER, self._apiserver_argv(), self.apiserver_log, die_with_parent=self.die_with_parent
        )
        try:
            self._wait_apiserver_ready(t0 + self.start_timeout)
        except BaseException:
            self.stop_apiserver(timeout=5)
            raise
        self.apiserver_ready_seconds = time.monotonic() - t0
        return self.apiserver_ready_seconds

    # ---- internals -------------------------------------------------------------------

    def _write_pki(self) -> None:
        pki = _PKI()
        self._pki = pki
        sans_ip = sorted({"127.0.0.1", self.bind_address, str(next(ipaddress.ip_network(self.service_cidr).hosts()))})
        serving = pki.issue(
            "kube-apiserver",
            server=True,
            dns_names=[
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
            ip_addresses=sans_ip,
        )
        d = self.pki_dir
        _write(d / "ca.crt", pki.ca_pem, 0o644)
        _write(d / "apiserver.crt", serving.cert_pem, 0o644)
        _write(d / "apiserver.key", serving.key_pem)
        sa_priv, sa_pub = pki.service_account_keys()
        _write(d / "sa.key", sa_priv)
        _write(d / "sa.pub", sa_pub, 0o644)
        admin = pki.issue(ADMIN_USER, organizations=["system:masters"])
        _write(d / "admin.crt", admin.cert_pem, 0o644)
        _write(d / "admin.key", admin.key_pem)
        appliance = pki.issue(APPLIANCE_USER)
        _write(d / "appliance.crt", appliance.cert_pem, 0o644)
        _write(d / "appliance.key", appliance.key_pem)
        self._admin_pair = admin
        self._appliance_pair = appliance

    def _write_kubeconfigs(self) -> None:
        assert self._pki is not None
        _write(
            self.admin_kubeconfig,
            _kubeconfig(self.url, self._pki.ca_pem, ADMIN_USER, self._admin_pair, "admin").encode(),
        )
        _write(
            self.appliance_kubeconfig,
            _kubeconfig(self.url, self._pki.ca_pem, APPLIANCE_USER, self._appliance_pair, "lbappliance").encode(),
        )

    def issue_kubeconfig(self, path: Path, user: str, groups: Sequence[str] = ()) -> Path:
        """A kubeconfig for `user` (client certificate CN=user, O=groups) from this control plane's CA.

        For identities the apiserver's bootstrap RBAC already knows, e.g. ``system:kube-proxy``
        (bound to the ClusterRole ``system:node-proxier``): the lab's kube-proxies are not admin.
        """
        if self._pki is None:
            raise ControlPlaneError("control plane not started")
        pair = self._pki.issue(user, organizations=groups)
        return _write(Path(path), _kubeconfig(self.url, self._pki.ca_pem, user, pair, user).encode())

    def _start_etcd(self) -> None:
        self.etcd_port = free_port()
        self.etcd_peer_port = free_port()
        while self.etcd_peer_port == self.etcd_port:
            self.etcd_peer_port = free_port()
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        argv = [
            str(self.bin_dir / ETCD),
            "--name=default",
            f"--data-dir={self.etcd_data_dir}",
            f"--listen-client-urls={self.etcd_url}",
            f"--advertise-client-urls={self.etcd_url}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=default={peer}",
            "--initial-cluster-state=new",
            "--unsafe-no-fsync=true",
            "--log-level=warn",
            *self.extra_etcd_args,
        ]
        self._etcd = _Proc(ETCD, argv, self.etcd_log, die_with_parent=self.die_with_parent)
        deadline = time.monotonic() + self.start_timeout
        while True:
            if not self._etcd.alive():
                raise ControlPlaneError(
                    f"etcd exited with {self._etcd.popen.returncode}; log {self.etcd_log}:\n{_tail(self.etcd_log)}"
                )
            try:
                with urllib.request.urlopen(f"{self.etcd_url}/health", timeout=2) as r:
                    if json.loads(r.read()).get("health") == "true":
                        return
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"etcd not healthy after {self.start_timeout}s; log {self.etcd_log}")
            time.sleep(0.05)

    def _apiserver_argv(self) -> list[str]:
        d = self.pki_dir
        return [
            str(self.bin_dir / APISERVER),
            f"--etcd-servers={self.etcd_url}",
            f"--cert-dir={d}",
            f"--tls-cert-file={d / 'apiserver.crt'}",
            f"--tls-private-key-file={d / 'apiserver.key'}",
            f"--client-ca-file={d / 'ca.crt'}",
            f"--secure-port={self.secure_port}",
            f"--bind-address={self.bind_address}",
            f"--advertise-address={self.bind_address}",
            f"--service-cluster-ip-range={self.service_cidr}",
            f"--service-node-port-range={DEFAULT_SERVICE_NODE_PORT_RANGE}",
            "--authorization-mode=RBAC",
            "--disable-admission-plugins=ServiceAccount",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={d / 'sa.pub'}",
            f"--service-account-signing-key-file={d / 'sa.key'}",
            "--allow-privileged=true",
            "--profiling=false",
            "--v=1",
            *self.extra_apiserver_args,
        ]

    def ssl_context(self, identity: str = "admin") -> ssl.SSLContext:
        """TLS context trusting the test CA and presenting ``admin`` or ``appliance`` client certs."""
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        ctx.load_cert_chain(str(self.pki_dir / f"{identity}.crt"), str(self.pki_dir / f"{identity}.key"))
        return ctx

    def request(
        self,
        method: str,
        path: str,
        body: object | None = None,
        *,
        identity: str = "admin",
        timeout: float = 5.0,
    ) -> tuple[int, bytes]:
        """A raw HTTPS request to the apiserver; returns (status, body). Never raises on HTTP errors."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, context=self.ssl_context(identity), timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def _wait_apiserver_ready(self, deadline: float) -> None:
        assert self._apiserver is not None
        ctx = self.ssl_context("admin")
        stage = "/readyz"
        last = ""
        while True:
            if not self._apiserver.alive():
                raise ControlPlaneError(
                    f"kube-apiserver exited with {self._apiserver.popen.returncode}; "
                    f"log {self.apiserver_log}:\n{_tail(self.apiserver_log)}"
                )
            try:
                with urllib.request.urlopen(self.url + stage, context=ctx, timeout=2) as r:
                    if r.status == 200:
                        if stage == "/readyz":
                            stage = "/api/v1/namespaces/default"
                            continue
                        return
            except urllib.error.HTTPError as e:
                last = f"{stage}: HTTP {e.code}"
            except (OSError, ssl.SSLError) as e:
                last = f"{stage}: {e}"
            if time.monotonic() > deadline:
                raise ControlPlaneError(
                    f"kube-apiserver not ready ({last}); log {self.apiserver_log}:\n{_tail(self.apiserver_log)}"
                )
            time.sleep(0.05)

    # ---- etcd helpers ------------------------------------------------------------------

    def _etcd_post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(
            self.etcd_url + path,
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def etcd_revision(self) -> int:
        """etcd's current revision (through the grpc-gateway JSON API)."""
        # Range over a key nobody uses; the response header carries the revision.
        resp = self._etcd_post("/v3/kv/range", {"key": _b64(b"/lbappliance-test/none")})
        return int(resp["header"]["revision"])

    def etcd_compact(self, revision: int | None = None) -> int:
        """Compact etcd's history up to ``revision`` (default: current). Returns it."""
        rev = revision if revision is not None else self.etcd_revision()
        self._etcd_post("/v3/kv/compaction", {"revision": str(rev), "physical": True})
        return rev


def apply_manifest(api_client: object, path: Path | str, *, field_manager: str = "lbappliance-tests") -> list[dict]:
    """Server-side apply every object of a YAML manifest (idempotent) with a
    ``kubernetes.client.ApiClient``; e.g. ``deploy/rbac.yaml`` as admin. Returns the documents."""
    import yaml
    from kubernetes.dynamic import DynamicClient

    with open(path) as f:
        docs = [doc for doc in yaml.safe_load_all(f) if doc]
    dyn = DynamicClient(api_client)
    for doc in docs:
        resource = dyn.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
        kwargs: dict = {}
        if resource.namespaced:
            kwargs["namespace"] = doc["metadata"].get("namespace", "default")
        resource.server_side_apply(body=doc, field_manager=field_manager, force_conflicts=True, **kwargs)
    return docs


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m lbappliance.testing.controlplane", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", help="keep certs/kubeconfigs/logs here (default: a temp dir, removed on exit)")
    p.add_argument("--bin-dir", help=f"directory with kube-apiserver and etcd (default: ${BIN_ENV} or build)")
    p.add_argument("--bind-address", default="127.0.0.1")
    p.add_argument("--keep", action="store_true", help="keep the work directory on exit")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    bin_dir = Path(args.bin_dir) if args.bin_dir else find_binaries()
    cp = ControlPlane(bin_dir, args.workdir, keep=args.keep, bind_address=args.bind_address)
    stop = {"flag": False}

    def _on_signal(signum: int, _frame: object) -> None:
        stop["flag"] = True

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        cp.start()
        print(f"ready in {cp.ready_seconds:.2f}s")
        print(f"server:               {cp.url}")
        print(f"etcd:                 {cp.etcd_url}")
        print(f"admin kubeconfig:     {cp.admin_kubeconfig}")
        print(f"appliance kubeconfig: {cp.appliance_kubeconfig}")
        print(f"logs:                 {cp.logs_dir}")
        print("Ctrl-C to stop", flush=True)
        while not stop["flag"]:
            if cp.apiserver_pid is None or cp.etcd_pid is None:
                print("a control-plane process exited; stopping", file=sys.stderr)
                cp._failed = True
                return 1
            time.sleep(0.5)
        return 0
    finally:
        cp.stop()


if __name__ == "__main__":
    sys.exit(main())
