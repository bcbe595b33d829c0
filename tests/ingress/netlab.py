"""Namespaces, stand-in VMs and an HTTP client for the ingress tests.

A test's traffic never leaves namespaces it made: ``<p>-srv`` is where Caddy and the DNS
responder run (as in a server's network namespace); ``<p>-vm`` stands for the VMs, joined to
``srv`` by a veth pair, with one address per stand-in VM, each with its own HTTP server. The
client sends from a thread that joined ``srv``, to 127.0.0.1 there.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from hypemand.network import InstanceAddress
from hypemand.network.namespace import run_in_namespace
from tests.network.lab import Lab, ip

VM_NET = "10.213.7"
GATEWAY = f"{VM_NET}.1"
BACKEND_PORT = 8000


class Directory:
    """The instances, as the instance manager would tell the resolver."""

    def __init__(self) -> None:
        self.table: dict[str, InstanceAddress] = {}

    def set(self, name: str, ip_address: str | None, instance_id: str | None = None,
            asleep: bool = False) -> None:
        entry = InstanceAddress(instance_id or f"{name:0<24}"[:24], name, ip_address, asleep)
        self.table[entry.name] = entry
        self.table[entry.id] = entry

    def find_address(self, ref: str) -> InstanceAddress | None:
        return self.table.get(ref)


class _Backend(BaseHTTPRequestHandler):
    label = "?"

    def do_GET(self) -> None:
        body = f"{self.label} {self.path} {self.headers.get('Host')}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@dataclass
class VmNet:
    lab: Lab
    srv: str
    vm: str
    servers: list[ThreadingHTTPServer] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    addresses: int = 1

    def add_vm(self, label: str) -> str:
        """A stand-in VM: a new address in the vm namespace with an HTTP server answering
        ``<label> <path> <host>``; returns the address."""
        self.addresses += 1
        address = f"{VM_NET}.{self.addresses}"
        ip("-n", self.vm, "addr", "add", f"{address}/24", "dev", "eth0")
        handler = type(f"Backend_{label}", (_Backend,), {"label": label})
        server = run_in_namespace(self.vm, lambda: ThreadingHTTPServer((address, BACKEND_PORT), handler))
        thread = threading.Thread(target=server.serve_forever, daemon=True, name=f"backend-{label}")
        thread.start()
        self.servers.append(server)
        self.threads.append(thread)
        return address

    def close(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()
        for thread in self.threads:
            thread.join(10)


@contextlib.contextmanager
def vm_net() -> Iterator[VmNet]:
    """The two namespaces and the veth between them; removed (with every server) at the end."""
    with contextlib.ExitStack() as stack:
        from tests.network.lab import lab

        own = stack.enter_context(lab())
        srv = own.add_namespace("srv")
        vm = own.add_namespace("vm")
        ip("-n", srv, "link", "add", "vms0", "type", "veth", "peer", "name", "eth0", "netns", vm)
        ip("-n", srv, "addr", "add", f"{GATEWAY}/24", "dev", "vms0")
        ip("-n", srv, "link", "set", "vms0", "up")
        ip("-n", vm, "link", "set", "eth0", "up")
        net = VmNet(own, srv, vm)
        stack.callback(net.close)
        yield net


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: str


def fetch(namespace: str, port: int, host: str, path: str = "/", headers: dict[str, str] | None = None,
          ca: Path | None = None, timeout: float = 10.0) -> Reply:
    """One GET to 127.0.0.1:``port`` in ``namespace`` with ``Host: host`` (and, with ``ca``, TLS
    with server name ``host`` checked against that root)."""

    def go() -> Reply:
        sock: socket.socket = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        try:
            if ca is not None:
                context = ssl.create_default_context(cafile=str(ca))
                sock = context.wrap_socket(sock, server_hostname=host)
            lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Connection: close"]
            lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
            response = http.client.HTTPResponse(sock)
            response.begin()
            body = response.read().decode(errors="replace")
            return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, body)
        finally:
            sock.close()

    return run_in_namespace(namespace, go)
