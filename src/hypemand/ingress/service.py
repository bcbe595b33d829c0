"""The ingress domain: the ingresses, the Caddy that serves them and the DNS responder it asks.

One change at a time (a lock): a create or delete builds the complete configuration of every
ingress that will exist, has Caddy load it (Caddy keeps its old configuration when it refuses
the new one), and only then writes or removes ``ingresses/<id>.json``. Caddy and the responder
are brought up at the server's start when there is something to serve (stored ingresses, or a
Caddy of ours still running), else at the first create.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hypemand.errors import BadRequest, Conflict, DomainError, NotFound
from hypemand.fsutil import write_atomic, write_model_atomic
from hypemand.ingress.admin import AdminUnavailable
from hypemand.ingress.caddy import CaddyProcess, config_bytes
from hypemand.ingress.caddyconfig import INSTANCE_ZONE, REDIRECT_PORT, CaddyOptions, base_config, build_config
from hypemand.ingress.hostnames import domain_allowed, is_template, parse_hostname
from hypemand.ingress.models import CreateIngressRequest, Ingress, IngressRule, new_ingress_id
from hypemand.ingress.resolver import DnsResponder, InstanceDirectory, bind_udp
from hypemand.ingress.wakefail import WakeFailures
from hypemand.ingress.waker import Waker
from hypemand.layout import DataLayout
from hypemand.network.namespace import NamespaceWorker, ensure_namespace

log = logging.getLogger(__name__)

DNS_HOST = "127.0.0.1"
RESTART_DELAY = 1.0  # after Caddy died unexpectedly, before it is started again
_ADDRESS_IN_USE = re.compile(r"listen(ing)? \w+ [^ ]*:(\d+): bind: address already in use")


class ProxyUnavailable(DomainError):
    """Caddy cannot be run or reached: the server's fault, said as such."""

    status = 500
    code = "proxy_unavailable"


@dataclass(frozen=True)
class IngressOptions:
    """What the service takes from the settings."""

    namespace: str | None
    caddy_binary: Path
    listen_address: str
    stop_on_shutdown: bool
    api_port: int  # never given to Caddy: clients of the API would reach the proxy instead
    dns_port: int
    acme_email: str | None = None
    acme_ca: str | None = None
    tls_allowed_domains: tuple[str, ...] | None = None


class IngressService:
    def __init__(self, layout: DataLayout, options: IngressOptions, directory: InstanceDirectory,
                 unavailable: Callable[[], str | None],
                 restore: Callable[[str], Awaitable[object]] | None = None) -> None:
        """``unavailable()`` says why the server has no bridge network to route to (None: it has).
        ``restore(instance_id)`` wakes an instance in standby that a request is for (None:
        requests for one fail)."""
        self.layout = layout
        self.options = options
        self.directory = directory
        self.unavailable = unavailable
        self._ingresses: dict[str, Ingress] = {}
        self._lock = asyncio.Lock()
        self._worker: NamespaceWorker | None = None
        self._caddy: CaddyProcess | None = None
        self._failures = WakeFailures()
        self._refused: dict[str, str] = {}  # instance id -> the address answered 502 for it
        self.waker = Waker(restore, self._asleep, on_failure=self._refuse, on_clear=self._admit) \
            if restore is not None else None
        self._dns = DnsResponder(INSTANCE_ZONE, directory, self.waker.wake if self.waker else None)
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False
        paths = layout.caddy
        self.caddy_options = CaddyOptions(
            admin_socket=paths.admin_socket.name, storage=str(paths.storage.absolute()),
            log_file=str(paths.log.absolute()), dns_address=f"{DNS_HOST}:{options.dns_port}",
            listen_address=options.listen_address, acme_email=options.acme_email,
            acme_ca=options.acme_ca)

    # ---- start and stop ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._ingresses = await asyncio.to_thread(_load_all, self.layout)
        running = await asyncio.to_thread(self.layout.caddy.pid_file.exists)
        if not self._ingresses and not running:
            return  # nothing to serve: Caddy comes with the first ingress
        if (why := self.unavailable()) is not None:
            log.warning("ingress: %d ingresses are not served: %s", len(self._ingresses), why)
            return
        async with self._lock:
            try:
                await self._bring_up()
                await self._load(self._config(self._ingresses.values()))
            except DomainError as exc:
                # Served again by the next change; the server itself is still useful.
                log.warning("ingress: the proxy could not load the stored ingresses: %s", exc)

    async def stop(self) -> None:
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        self._dns.close()
        if self.waker is not None:
            await self.waker.close()
        await self._failures.close()
        if self._caddy is not None:
            if self.options.stop_on_shutdown:
                await self._caddy.stop()
            else:
                self._caddy.release()
        if self._worker is not None:
            await asyncio.to_thread(self._worker.close)

    async def _bring_up(self) -> None:
        """Caddy and the DNS responder, in the namespace (under the lock)."""
        if self._caddy is not None:
            return
        namespace = self.options.namespace
        try:
            if namespace is not None:
                await asyncio.to_thread(ensure_namespace, namespace)
            self._worker = self._worker or NamespaceWorker(namespace, label="ingress")
            sock = await self._worker.run(bind_udp, DNS_HOST, self.options.dns_port)
            await self._dns.serve(sock)
            if self.waker is not None:
                try:
                    await self._failures.start(self._worker)
                except (OSError, RuntimeError) as exc:  # wakes work; a failed one waits for Caddy's limit
                    log.warning("ingress: failed wakes cannot be answered at once: %s", exc)
            caddy = CaddyProcess(self.layout.caddy, self.options.caddy_binary, self._worker)
            how = await caddy.run(base_config(self.caddy_options))
        except DomainError:
            self._dns.close()
            raise
        except (OSError, RuntimeError) as exc:
            self._dns.close()
            raise ProxyUnavailable(f"the ingress proxy could not start: {exc}") from exc
        log.info("ingress: Caddy %s (pid %s), DNS on %s:%d%s", how, caddy.pid, DNS_HOST,
                 self.options.dns_port, f" in namespace {namespace}" if namespace else "")
        self._caddy = caddy
        self._supervisor = asyncio.create_task(self._supervise(caddy), name="caddy-supervisor")

    async def _supervise(self, caddy: CaddyProcess) -> None:
        """Start Caddy again, with the current ingresses, whenever it dies under the server."""
        while not self._stopping:
            await caddy.wait_exit()
            if self._stopping:
                return
            last_words = await asyncio.to_thread(caddy.output_tail, 500)
            log.warning("ingress: Caddy exited unexpectedly: %s", last_words)
            await asyncio.sleep(RESTART_DELAY)
            async with self._lock:
                try:
                    await caddy.run(base_config(self.caddy_options))
                    await self._load(self._config(self._ingresses.values()))
                except (DomainError, OSError, RuntimeError) as exc:
                    log.warning("ingress: restarting Caddy failed: %s", exc)

    # ---- wake on traffic (waker.py, wakefail.py) -----------------------------------------------

    def instance_changed(self, instance_id: str) -> None:
        """The instance was restored, started, stopped or deleted: a failed wake of it is history."""
        if self.waker is not None:
            self.waker.forget(instance_id)

    def _asleep(self, instance_id: str) -> bool:
        found = self.directory.find_address(instance_id)
        return found is not None and found.asleep

    async def _refuse(self, instance_id: str, reason: str) -> None:
        found = self.directory.find_address(instance_id)
        if found is None or found.ip is None:
            return
        self._refused[instance_id] = found.ip
        try:
            await self._failures.refuse(found.ip, f"instance {found.name} is in standby and could not be "
                                        f"woken: {reason}")
        except (OSError, RuntimeError) as exc:  # requests wait for Caddy's own limit instead
            log.warning("ingress: could not answer for instance %s at once: %s", instance_id, exc)

    async def _admit(self, instance_id: str) -> None:
        address = self._refused.pop(instance_id, None)
        if address is None:
            return
        try:
            await self._failures.admit(address)
        except (OSError, RuntimeError) as exc:
            log.warning("ingress: instance %s's address is still answered by the server: %s",
                        instance_id, exc)

    # ---- reads ------------------------------------------------------------------------------------

    def list(self, tags: dict[str, str] | None = None) -> list[Ingress]:
        found = [i for i in self._ingresses.values()
                 if all((i.tags or {}).get(k) == v for k, v in (tags or {}).items())]
        return sorted(found, key=lambda i: (i.created_at, i.id))

    def get(self, ref: str) -> Ingress:
        """By id, then exact name, then unique id prefix."""
        if found := self._ingresses.get(ref):
            return found
        named = [i for i in self._ingresses.values() if i.name == ref]
        if len(named) == 1:
            return named[0]
        prefixed = [i for i in self._ingresses.values() if ref and i.id.startswith(ref)]
        if len(prefixed) == 1:
            return prefixed[0]
        if len(prefixed) > 1:
            raise Conflict("multiple resources match, use full ID", code="ambiguous")
        raise NotFound(f"ingress {ref!r} not found")

    # ---- changes ----------------------------------------------------------------------------------

    async def create(self, request: CreateIngressRequest) -> Ingress:
        if (why := self.unavailable()) is not None:
            raise Conflict(f"ingress needs the server's bridge network, and this server has none: {why}",
                           code="network_unavailable")
        async with self._lock:
            if any(i.name == request.name for i in self._ingresses.values()):
                raise Conflict(f"an ingress named {request.name!r} already exists", code="name_conflict")
            self._check_rules(request.rules)
            ingress = Ingress(id=new_ingress_id(), name=request.name, rules=request.rules,
                              tags=request.tags, created_at=datetime.now(UTC))
            await self._bring_up()
            await self._load(self._config([*self._ingresses.values(), ingress]))
            try:
                await asyncio.to_thread(write_model_atomic, self.layout.ingress(ingress.id), ingress)
            except BaseException:
                await self._restore_config()
                raise
            self._ingresses[ingress.id] = ingress
            log.info("ingress %s (%s) created: %s", ingress.name, ingress.id, _summary(ingress))
            return ingress

    async def delete(self, ref: str) -> None:
        async with self._lock:
            ingress = self.get(ref)
            remaining = [i for i in self._ingresses.values() if i.id != ingress.id]
            if self._caddy is not None:
                await self._load(self._config(remaining))
            await asyncio.to_thread(self.layout.ingress(ingress.id).unlink, missing_ok=True)
            del self._ingresses[ingress.id]
            log.info("ingress %s (%s) deleted", ingress.name, ingress.id)

    def _check_rules(self, rules: Sequence[IngressRule]) -> None:
        """What a rule cannot be given the other ingresses, the instances and the settings."""
        taken: dict[tuple[str, int], str] = {}  # (hostname key, port) -> ingress name
        port_tls: dict[int, tuple[bool, str]] = {}  # port -> (serves tls, ingress name)
        for other in self._ingresses.values():
            for rule in other.rules:
                for key in _occupies(rule):
                    taken[key] = other.name
                for port, tls in _ports(rule):
                    port_tls[port] = (tls, other.name)
        mine: dict[int, bool] = {}
        own: set[tuple[str, int]] = set()
        for rule in rules:
            hostname = parse_hostname(rule.match.hostname)
            for port, tls in _ports(rule):
                if port == self.options.api_port:
                    raise Conflict(f"port {port} is the API server's own port", code="port_in_use")
                if port in port_tls and port_tls[port][0] != tls:
                    raise Conflict(f"port {port} serves {'HTTPS' if port_tls[port][0] else 'plain HTTP'} "
                                   f"for ingress {port_tls[port][1]!r}: one port cannot serve both",
                                   code="port_in_use")
                if mine.setdefault(port, tls) != tls:
                    raise BadRequest(f"port {port} cannot serve both HTTPS and plain HTTP",
                                     code="invalid_request")
            for key in _occupies(rule):
                if key in taken:
                    raise Conflict(f"hostname {hostname.text} on port {key[1]} is already used by "
                                   f"ingress {taken[key]!r}", code="hostname_in_use")
                if key in own:
                    raise BadRequest(f"hostname {hostname.text} on port {key[1]} appears in two rules",
                                     code="invalid_request")
                own.add(key)
            if rule.tls:
                self._check_tls(hostname.certificate_name(), hostname.is_pattern)
            target = rule.target.instance
            if not is_template(target) and self.directory.find_address(target) is None:
                raise BadRequest(f"target instance {target!r} does not exist", code="invalid_request")

    def _check_tls(self, certificate_name: str, pattern: bool) -> None:
        allowed = self.options.tls_allowed_domains
        if allowed is not None and not domain_allowed(certificate_name, allowed):
            raise BadRequest(f"tls for {certificate_name} is not allowed (TLS_ALLOWED_DOMAINS: "
                             f"{', '.join(allowed)})", code="domain_not_allowed")
        if pattern and self.options.acme_email:
            raise BadRequest(f"a pattern hostname with tls needs the wildcard certificate "
                             f"{certificate_name}, which an ACME CA issues only through a DNS "
                             "challenge this server's Caddy cannot answer", code="invalid_request")

    # ---- Caddy ------------------------------------------------------------------------------------

    def _config(self, ingresses: Iterable[Ingress]) -> dict[str, Any]:
        return build_config(ingresses, self.caddy_options)

    async def _load(self, config: dict[str, Any]) -> None:
        """Have Caddy run ``config`` (under the lock); on a refusal Caddy keeps the old one."""
        caddy = self._caddy
        if caddy is None:
            raise ProxyUnavailable("the ingress proxy is not running")
        try:
            answer = await caddy.admin.load(config)
        except AdminUnavailable as exc:
            raise ProxyUnavailable(f"the ingress proxy does not answer: {exc}") from exc
        if answer.status != 200:
            reason = answer.error()
            if in_use := _ADDRESS_IN_USE.search(reason):
                raise Conflict(f"port {in_use.group(2)} is in use by another program in the ingress "
                               f"network namespace ({reason})", code="port_in_use")
            raise BadRequest(f"the ingress proxy refused the configuration: {reason}",
                             code="config_validation_failed")
        await asyncio.to_thread(write_atomic, self.layout.caddy.config, config_bytes(config), 0o600)

    async def _restore_config(self) -> None:
        with contextlib.suppress(DomainError):
            await self._load(self._config(self._ingresses.values()))


def _ports(rule: IngressRule) -> list[tuple[int, bool]]:
    """The ports a rule has Caddy listen on, each with whether it serves TLS there."""
    ports = [(rule.match.port, rule.tls)]
    if rule.redirects:
        ports.append((REDIRECT_PORT, False))
    return ports


def _occupies(rule: IngressRule) -> list[tuple[str, int]]:
    key = parse_hostname(rule.match.hostname).key
    return [(key, port) for port, _ in _ports(rule)]


def _summary(ingress: Ingress, shown: int = 3) -> str:
    """The first rules, for the log (a client may send a hundred)."""
    text = ", ".join(f"{r.match.hostname}:{r.match.port} -> {r.target.instance}:{r.target.port}"
                     f"{' (tls)' if r.tls else ''}" for r in ingress.rules[:shown])
    more = len(ingress.rules) - shown
    return text + (f" and {more} more rules" if more > 0 else "")


def _load_all(layout: DataLayout) -> dict[str, Ingress]:
    found: dict[str, Ingress] = {}
    if not layout.ingresses.is_dir():
        return found
    for path in sorted(layout.ingresses.glob("*.json")):
        try:
            ingress = Ingress.model_validate_json(path.read_bytes())
        except ValueError as exc:
            # Written atomically: this is damage from outside. Keep the file, say so.
            log.warning("ingress file %s is unreadable, leaving it alone: %s", path.name, exc)
            continue
        found[ingress.id] = ingress
    return found
