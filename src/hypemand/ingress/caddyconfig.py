"""The complete Caddy configuration (JSON) for a set of ingresses, pure.

One HTTP server per listening port (``ingress-<port>``), each a list of routes: literal hostnames
first (``host`` matcher), then patterns, most specific first (``vars_regexp`` on the request's
host, whose named groups Caddy exposes as ``{http.regexp.<matcher>.<capture>}``), then a 404 for
any other host. A rule's route proxies to ``<instance>.<INSTANCE_ZONE>`` looked up at request
time (``dynamic_upstreams`` of source ``a``) through our own DNS responder only; a rule with
``request_header_auth`` answers 401 first unless the header has exactly its value.

Automatic HTTPS is off on every server, so Caddy never opens a port or asks a CA for anything it
was not told to: TLS servers carry a connection policy, their certificate names are listed in the
``tls`` app with one issuer, the internal CA (``pki``, whose root Caddy must not try to install
into the host's trust store) or ACME when configured.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from hypemand.ingress.hostnames import Hostname, exact_re2, parse_hostname, target_template
from hypemand.ingress.models import Ingress, IngressRule

INSTANCE_ZONE = "vm.hypemand.internal"
# How long Caddy keeps an instance's address before asking our responder again. Each lookup is
# two local UDP exchanges (A, AAAA) answered from memory (~0.3 ms of the server's CPU), and one
# happens only when a request arrives after the interval, so at most 4 per second per busy
# route; it bounds how long a route goes to an old address after an instance's address changes
# (a stop/start, a fork), and how long a request for a VM that has just gone to sleep waits
# before it asks, which is what wakes the VM (1 s measured +0.8 s on such a wake).
DNS_REFRESH = "250ms"
# Wake on traffic (README "Wake on traffic"): a dial that fails is tried again every
# RETRY_INTERVAL for up to WAKE_WAIT, each try asking for the upstreams again. A VM in standby
# keeps its address, and TCP to it is reset at once (network/firewall.py) while our DNS responder,
# asked for it, has it restored: the request is answered once it runs. Only dial errors are
# retried (``retry_match`` that matches nothing), so a request that reached a VM is never sent
# twice, and no address (a stopped instance, a failed wake) is a 503 at once.
WAKE_WAIT = "30s"
RETRY_INTERVAL = "20ms"
NEVER: dict[str, Any] = {"expression": "false"}
# Caddy's idle connections to VMs close after this: an idle keep-alive connection is an open
# connection to the VM, which auto-standby counts as activity (Caddy's default is 2 minutes).
UPSTREAM_IDLE = "2s"
# TCP keep-alive probes on Caddy's connections to VMs (Caddy's default: 30 s). A request a VM was
# answering when a client put it to standby waits on a silent connection; the first probe is
# reset by the rule for sleeping VMs, and the client gets a 502 after this long at most.
UPSTREAM_PROBE = "5s"
REDIRECT_PORT = 80  # redirect_http answers plain HTTP here
GRACE_PERIOD = "2s"  # open connections get this long when a config change or a stop closes a server


@dataclass(frozen=True)
class CaddyOptions:
    """What the configuration needs besides the ingresses."""

    admin_socket: str  # relative to Caddy's working directory (short, whatever the data dir)
    storage: str  # certificates and the internal CA
    log_file: str
    dns_address: str  # host:port of our responder, inside Caddy's namespace
    listen_address: str = "0.0.0.0"
    acme_email: str | None = None
    acme_ca: str | None = None  # ACME directory URL; None: Caddy's default (Let's Encrypt)


@dataclass
class _Route:
    hostname: Hostname
    rule: IngressRule
    ingress_id: str
    handle: list[dict[str, Any]] = field(default_factory=list)


def _sort_key(route: _Route) -> tuple[int, int, str]:
    """Literals first; then patterns with more literal characters first (more specific)."""
    literal_chars = len(route.hostname.key.replace("{}", ""))
    return (1 if route.hostname.is_pattern else 0, -literal_chars, route.hostname.text)


def _upstream_name(rule: IngressRule, matcher: str) -> str:
    placeholder = "{{http.regexp." + matcher + ".{}}}"
    instance = target_template(rule.target.instance, placeholder)
    return f"{instance}.{INSTANCE_ZONE}."  # rooted: no search domain is ever appended


def _proxy(rule: IngressRule, matcher: str, options: CaddyOptions) -> dict[str, Any]:
    return {
        "handler": "reverse_proxy",
        "dynamic_upstreams": {
            "source": "a",
            "name": _upstream_name(rule, matcher),
            "port": str(rule.target.port),
            "refresh": DNS_REFRESH,
            "resolver": {"addresses": [f"udp/{options.dns_address}"]},
        },
        "load_balancing": {"try_duration": WAKE_WAIT, "try_interval": RETRY_INTERVAL, "retry_match": [NEVER]},
        # Caddy's defaults but the idle timeout and the probes (a keep_alive object replaces all).
        "transport": {"protocol": "http", "keep_alive": {
            "probe_interval": UPSTREAM_PROBE, "idle_timeout": UPSTREAM_IDLE, "max_idle_conns_per_host": 32}},
    }


def _guarded(rule: IngressRule, handler: dict[str, Any]) -> list[dict[str, Any]]:
    auth = rule.request_header_auth
    if auth is None:
        return [handler]
    refuse = {
        "match": [{"not": [{"header_regexp": {auth.header: {"pattern": exact_re2(auth.value)}}}]}],
        "handle": [{"handler": "static_response", "status_code": 401, "body": "unauthorized\n"}],
        "terminal": True,
    }
    return [{"handler": "subroute", "routes": [refuse, {"handle": [handler]}]}]


def _matcher(hostname: Hostname, name: str) -> dict[str, Any]:
    if not hostname.is_pattern:
        return {"host": [hostname.text]}
    return {"vars_regexp": {"{http.request.host}": {"name": name, "pattern": hostname.regex()}}}


def _redirect(rule: IngressRule) -> dict[str, Any]:
    port = "" if rule.match.port == 443 else f":{rule.match.port}"
    return {"handler": "static_response", "status_code": 308,
            "headers": {"Location": [f"https://{{http.request.host}}{port}{{http.request.uri}}"]}}


def _routes(entries: list[_Route], options: CaddyOptions) -> list[dict[str, Any]]:
    routes = []
    for index, entry in enumerate(sorted(entries, key=_sort_key)):
        name = f"h{index}"  # the pattern matcher's name: unique within its server
        handle = entry.handle or _guarded(entry.rule, _proxy(entry.rule, name, options))
        routes.append({"match": [_matcher(entry.hostname, name)], "handle": handle, "terminal": True})
    routes.append({"handle": [{"handler": "static_response", "status_code": 404,
                               "body": "no ingress for this host\n"}]})
    return routes


def build_config(ingresses: Iterable[Ingress], options: CaddyOptions) -> dict[str, Any]:
    by_port: dict[int, list[_Route]] = {}
    tls_ports: set[int] = set()
    certificate_names: set[str] = set()
    for ingress in sorted(ingresses, key=lambda i: i.id):
        for rule in ingress.rules:
            hostname = parse_hostname(rule.match.hostname)
            by_port.setdefault(rule.match.port, []).append(_Route(hostname, rule, ingress.id))
            if rule.tls:
                tls_ports.add(rule.match.port)
                certificate_names.add(hostname.certificate_name())
            if rule.redirects:
                by_port.setdefault(REDIRECT_PORT, []).append(
                    _Route(hostname, rule, ingress.id, handle=[_redirect(rule)]))
    config: dict[str, Any] = base_config(options)
    if not by_port:
        return config
    servers = {}
    for port, entries in sorted(by_port.items()):
        server: dict[str, Any] = {
            "listen": [_listen(options.listen_address, port)],
            "automatic_https": {"disable": True},
            "routes": _routes(entries, options),
        }
        if port in tls_ports:
            server["tls_connection_policies"] = [{}]
        servers[f"ingress-{port}"] = server
    config["apps"]["http"] = {"grace_period": GRACE_PERIOD, "servers": servers}
    if certificate_names:
        config["apps"].update(_tls_apps(sorted(certificate_names), options))
    return config


def base_config(options: CaddyOptions) -> dict[str, Any]:
    """What every configuration holds, the one Caddy starts with included: the admin API on its
    Unix socket only (a config without ``admin`` would move it to TCP localhost:2019), nothing
    saved by Caddy itself, its log rolled by Caddy, its storage in the data directory."""
    return {
        "admin": {"listen": f"unix/{options.admin_socket}", "config": {"persist": False}},
        "logging": {"logs": {"default": {"level": "INFO", "writer": {
            "output": "file", "filename": options.log_file, "roll_size_mb": 10, "roll_keep": 2}}}},
        "storage": {"module": "file_system", "root": options.storage},
        "apps": {},
    }


def _listen(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _tls_apps(names: list[str], options: CaddyOptions) -> dict[str, Any]:
    if options.acme_email:
        issuer: dict[str, Any] = {"module": "acme", "email": options.acme_email}
        if options.acme_ca:
            issuer["ca"] = options.acme_ca
        apps: dict[str, Any] = {}
    else:
        issuer = {"module": "internal", "ca": "local"}
        apps = {"pki": {"certificate_authorities": {"local": {"install_trust": False}}}}
    apps["tls"] = {
        "certificates": {"automate": names},
        "automation": {"policies": [{"subjects": names, "issuers": [issuer]}]},
    }
    return apps
