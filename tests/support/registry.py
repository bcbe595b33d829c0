"""A real OCI registry (Debian's ``docker-registry``) for tests, plus a token service.

``run_registry`` writes a config of its own (127.0.0.1, a free port, a temp storage dir,
access log on) — never the packaged /etc/docker/registry/config.yml, which listens on all
interfaces and turns on htpasswd auth. The process is killed by its own PID in a finally.

``run_token_registry`` puts Docker-style token auth in front: a small token service on
127.0.0.1 that checks Basic credentials and issues RS256 JWTs signed with a test key whose
certificate the registry trusts (``auth.token.rootcertbundle``).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import httpx
import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from tests.support.net import free_port, http_server, send_body


@dataclass
class Registry:
    host: str  # "127.0.0.1:PORT": the registry part of an image reference
    storage: Path
    log_path: Path
    process: subprocess.Popen[bytes]
    username: str | None = None
    password: str | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def count_requests(self, method: str, path: str) -> int:
        """How often the access log shows ``METHOD path`` (e.g. a blob GET)."""
        return self.log().count(f'"{method} {path} ')


def _write_config(path: Path, storage: Path, port: int, auth: dict[str, object] | None) -> None:
    lines = [
        "version: 0.1",
        "log:",
        "  level: info",
        "  accesslog:",
        "    disabled: false",
        "storage:",
        "  filesystem:",
        f"    rootdirectory: {storage}",
        "  delete:",
        "    enabled: true",
        "http:",
        f"  addr: 127.0.0.1:{port}",
    ]
    if auth:
        lines += ["auth:", "  token:"] + [f"    {k}: {v}" for k, v in auth.items()]
    path.write_text("\n".join(lines) + "\n")


@contextmanager
def run_registry(workdir: Path, *, auth: dict[str, object] | None = None) -> Iterator[Registry]:
    workdir.mkdir(parents=True, exist_ok=True)
    storage = workdir / "storage"
    storage.mkdir(exist_ok=True)
    port = free_port()
    config = workdir / "config.yml"
    _write_config(config, storage, port, auth)
    log_path = workdir / "registry.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(["docker-registry", "serve", str(config)],
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    registry = Registry(host=f"127.0.0.1:{port}", storage=storage, log_path=log_path, process=process)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"docker-registry exited:\n{registry.log()}")
            try:
                status = httpx.get(f"{registry.url}/v2/", timeout=1).status_code
                if status in (200, 401):
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"docker-registry did not answer /v2/:\n{registry.log()}")
            time.sleep(0.05)
        yield registry
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


# ---- token auth ---------------------------------------------------------------------------


def libtrust_key_id(public_key: rsa.RSAPublicKey) -> str:
    """The key id docker-registry expects in a token's ``kid``: base32 of the SPKI hash."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(encoded[i : i + 4] for i in range(0, len(encoded), 4))


@dataclass
class TokenService:
    url: str
    server: ThreadingHTTPServer
    issued: list[str]  # scopes granted, for assertions


@contextmanager
def run_token_service(workdir: Path, *, service: str, issuer: str, username: str,
                      password: str) -> Iterator[tuple[TokenService, Path]]:
    """Yield the token service and the certificate bundle the registry must trust."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hypemand test token issuer")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    bundle = workdir / "token-cert.pem"
    workdir.mkdir(parents=True, exist_ok=True)
    bundle.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kid = libtrust_key_id(key.public_key())
    issued: list[str] = []
    expected = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_args: object) -> None:
            pass

        def do_GET(self) -> None:
            query = parse_qs(urlparse(self.path).query)
            if self.headers.get("Authorization") != expected:
                body = json.dumps({"errors": [{"code": "UNAUTHORIZED",
                                               "message": "token service: bad or missing credentials"}]})
                self._reply(401, body)
                return
            access = []
            for scope in query.get("scope", []):
                kind, name, actions = scope.split(":", 2) if scope.count(":") >= 2 else ("", "", "")
                if kind == "repository":
                    access.append({"type": kind, "name": name, "actions": actions.split(",")})
                    issued.append(scope)
            now_s = int(time.time())
            claims = {"iss": issuer, "sub": username, "aud": query.get("service", [service])[0],
                      "exp": now_s + 300, "nbf": now_s - 10, "iat": now_s, "jti": uuid.uuid4().hex,
                      "access": access}
            token = jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid})
            self._reply(200, json.dumps({"token": token, "access_token": token, "expires_in": 300}))

        def _reply(self, status: int, body: str) -> None:
            send_body(self, status, body.encode(), "application/json")

    with http_server(Handler) as server:
        yield TokenService(url=f"http://127.0.0.1:{server.server_address[1]}/token", server=server,
                           issued=issued), bundle


@contextmanager
def run_token_registry(workdir: Path, *, username: str = "tester",
                       password: str = "s3cret") -> Iterator[tuple[Registry, TokenService]]:
    """A registry that only serves holders of tokens from our token service."""
    service, issuer = "hypemand-test-registry", "hypemand-test-issuer"
    with run_token_service(workdir, service=service, issuer=issuer, username=username,
                           password=password) as (tokens, bundle), run_registry(
        workdir,
        auth={"realm": tokens.url, "service": service, "issuer": issuer, "rootcertbundle": str(bundle)},
    ) as registry:
        registry.username, registry.password = username, password
        yield registry, tokens
