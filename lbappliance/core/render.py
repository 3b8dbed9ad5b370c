"""DesiredState -> haproxy.cfg and keepalived.conf text. Pure and byte-stable."""

from __future__ import annotations

import shlex
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .config import ApplianceConfig, HealthCheckConfig
from .health import health_monitors, is_monitor, monitor_name
from .models import Backend, DesiredState, Server, host_port
from .templates import environment

# HAProxy reads at most 64 words a line (`acl allowed_sources src` takes 3) and, in older
# versions, 2048 characters: 40 CIDRs of at most 43 characters each stay well inside both.
ACL_RANGES_PER_LINE = 40


@dataclass(frozen=True)
class RenderedConfigs:
    haproxy: str
    keepalived: str


def server_options(backend: Backend, server: Server | None = None) -> str:
    """Options of a server that checks for itself: monitors' servers, and the ones `add server`
    creates at runtime (HAProxy cannot make those track a monitor)."""
    return _with_proxy_protocol(backend, f"check port {backend.check_port}{check_addr(server)}{weight_option(server)}")


def check_addr(server: Server | None) -> str:
    """` addr X` when the node answers the check at another address than the server's."""
    return f" addr {server.check_address}" if server is not None and server.check_address else ""


def tracking_options(backend: Backend, server: Server) -> str:
    """Options of a rendered Service server: it follows its node's monitor instead of checking."""
    return _with_proxy_protocol(backend, f"track {monitor_name(backend.check_port, server)}/{server.name}"
                                         f"{weight_option(server)}")


def weight_option(server: Server | None) -> str:
    return f" weight {server.weight}" if server is not None and server.weight is not None else ""


def _with_proxy_protocol(backend: Backend, options: str) -> str:
    return f"{options} {backend.proxy_protocol}" if backend.proxy_protocol else options


def server_defaults(health: HealthCheckConfig) -> str:
    """The template's `default-server` line; `add server` ignores it, so the runtime API repeats it.

    No `on-marked-down shutdown-sessions`: it cannot tell a draining node from a dead one, so the
    daemon cuts sessions itself (`core/health.sessions_to_cut`)."""
    return f"inter {health.interval_ms}ms fall {health.fall} rise {health.rise}"


def server_target(server: Server, port: int) -> str:
    return host_port(server.address, port)


def _server_lines_renderer() -> Callable[[Backend], str]:
    """Server blocks differ only by nodePort, so build each shared block once per render."""
    blocks: dict[tuple[int, int, str | None, bool], str] = {}

    def server_lines(backend: Backend) -> str:
        monitor = is_monitor(backend)
        key = (id(backend.servers), backend.check_port, backend.proxy_protocol, monitor)
        block = blocks.get(key)
        if block is None:
            block = "".join(
                f"    server {s.name} {server_target(s, 0)[:-1]}\0 "
                f"{'check' if monitor else tracking_options(backend, s)}\n"
                for s in backend.servers)
            blocks[key] = block
        return block.replace("\0", str(backend.port))

    return server_lines


#: Who keepalived runs the scripts as in external mode: the daemon's user (the units' User=),
#: which is also HAProxy's, so `kill -0` reaches the HAProxy master and the notify hook writes
#: into the state dir that user owns. keepalived itself stays root; its scripts never are.
EXTERNAL_SCRIPT_USER = "lbappliance"

#: VRRP states keepalived passes to a notify hook.
VRRP_STATES = ("MASTER", "BACKUP", "FAULT", "STOP", "DELETED")


def script_user(config: ApplianceConfig) -> str:
    """The identity of keepalived's check and notify scripts: the one that runs the daemon, never more.

    External (the shipped units): `lbappliance`, an unprivileged user. Managed (lab, tests): the
    daemon starts keepalived itself and is root there, so root gains nothing from its own scripts.
    """
    return EXTERNAL_SCRIPT_USER if config.process_mode == "external" else "root"


def check_script(config: ApplianceConfig) -> str:
    """VRRP gives up VIPs when this box's HAProxy master is gone."""
    return check_command(config.paths.haproxy_pidfile)


def check_command(pidfile: str) -> str:
    """A pidfile that does not hold one positive number fails the check (`kill -0 -1` would succeed
    on any process of the user)."""
    return f"/bin/sh -c 'read pid < {shlex.quote(pidfile)} && [ $pid -gt 0 ] && kill -0 $pid'"


# The notify hook, as Python so it can use O_NOFOLLOW/O_EXCL and *at() calls: it opens the state
# dir without following a link and refuses it unless this user owns it and nobody else can write
# it (so nobody else can plant links in it), removes a stale temp file, creates the temp file
# with O_CREAT|O_EXCL|O_NOFOLLOW (a link planted in between makes it refuse, never follow) and
# renames it over the state file (a rename replaces a planted link; it never writes through it).
# Every failure is one line on keepalived's log. keepalived unescapes \" inside its own quotes.
_NOTIFY_PY = ";".join((
    "import os,sys",
    'sys.excepthook=lambda t,v,b:print("lbappliance vrrp notify: refused:",v,file=sys.stderr)',
    "d,k,i,s=sys.argv[1:5]",
    f'k=="INSTANCE" and s in {VRRP_STATES!r} and i.replace("-","_").isidentifier() '
    'or sys.exit("lbappliance vrrp notify: refused arguments %r" % sys.argv[2:])',
    "f=os.open(d,os.O_RDONLY|os.O_DIRECTORY|os.O_NOFOLLOW|os.O_CLOEXEC)",
    "m=os.fstat(f)",
    'm.st_uid==os.geteuid() and not m.st_mode&0o22 '
    'or sys.exit("lbappliance vrrp notify: refused: "+d+" is not a directory only this user can write")',
    't="vrrp-"+i+".state.tmp"',
    "t in os.listdir(f) and os.unlink(t,dir_fd=f)",
    "w=os.open(t,os.O_WRONLY|os.O_CREAT|os.O_EXCL|os.O_NOFOLLOW|os.O_CLOEXEC,0o644,dir_fd=f)",
    "os.write(w,(s+chr(10)).encode())",
    "os.close(w)",
    'os.rename(t,"vrrp-"+i+".state",src_dir_fd=f,dst_dir_fd=f)',
)).replace("'", '"')


def notify_script(config: ApplianceConfig) -> str:
    """Record each instance's VRRP state in `<stateDir>/vrrp-<instance>.state`, which the daemon
    and `status` read; run as `script_user`, who owns the state dir (see _NOTIFY_PY)."""
    return notify_command(config.paths.state_dir)


def notify_command(state_dir: str) -> str:
    code = _NOTIFY_PY.replace('"', '\\"')
    return f"/usr/bin/python3 -I -S -c '{code}' {shlex.quote(state_dir)}"


def render_haproxy(state: DesiredState, config: ApplianceConfig) -> str:
    return environment().get_template("haproxy.cfg.j2").render(
        frontends=state.frontends,
        udp=state.udp,
        monitors=health_monitors(state),
        server_lines=_server_lines_renderer(),
        server_defaults=server_defaults(config.health_check),
        paths=config.paths,
        haproxy=config.haproxy,
        health=config.health_check,
        acl_ranges_per_line=ACL_RANGES_PER_LINE,
        local_peer=config.name,
        # Configured peers always listen (other boxes and doctor expect them); alone, only for a sticky Service.
        table_peers=config.haproxy.table_peers(config.name)
        if config.haproxy.peers or any(fe.backend.affinity_timeout for fe in state.frontends) else (),
    )


def render_keepalived(state: DesiredState, config: ApplianceConfig) -> str:
    return environment().get_template("keepalived.conf.j2").render(
        name=config.name,
        vrrp=config.vrrp,
        instances=state.vrrp,
        script_user=script_user(config),
        check_script=check_script(config),
        notify_script=notify_script(config),
    )


def render(state: DesiredState, config: ApplianceConfig) -> RenderedConfigs:
    return RenderedConfigs(render_haproxy(state, config), render_keepalived(state, config))


SERVICE_COMMENT = "# Service "  # the template opens every Service's section with it


def services_on_lines(haproxy_cfg: str, line_numbers: Iterable[int]) -> frozenset[str] | None:
    """The Services whose sections hold these (1-based) lines of a rendered haproxy.cfg.

    None when any line lies outside every Service's section (global, defaults, the stats
    frontend, a shared health backend) or there is no line at all: then no Service alone is
    to blame. Lets the daemon leave out the Services whose config HAProxy refuses and serve
    the rest.
    """
    wanted = set(line_numbers)
    if not wanted:
        return None
    owners: dict[int, str | None] = {}
    owner: str | None = None
    for number, line in enumerate(haproxy_cfg.splitlines(), start=1):
        if line.startswith(SERVICE_COMMENT):
            owner = line[len(SERVICE_COMMENT):].split(" ", 1)[0]
        elif line.startswith("#") or (line[:1].strip() and not line.startswith(("listen ", "backend "))):
            owner = None  # another kind of section: global, defaults, frontend, health monitors
        if number in wanted:
            owners[number] = owner
    if set(owners) != wanted or None in owners.values():
        return None
    return frozenset(o for o in owners.values() if o is not None)
