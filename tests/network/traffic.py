"""Traffic for the network tests, run inside a lab namespace (``ip netns exec NS python traffic.py``).

    serve-http ADDR PORT           an HTTP server answering "hello from the internet" (and
                                   /bytes/N with N zero bytes); prints "ready"
    fetch URL                      GET URL, print the body
    listen ADDR PORT               accept connections, answer "pong"; prints "ready"
    connect HOST PORT SECONDS      print "connected" or "refused"/"unreachable"/"timeout"
    source ADDR PORT               accept one connection and send to it until it closes; "ready"
    sink ADDR PORT WARMUP WINDOW   accept one connection, print the rate (B/s) received in WINDOW
                                   seconds after WARMUP seconds; "ready" first
    receive HOST PORT WARMUP WINDOW  connect and print the rate received, as sink does
    send HOST PORT SECONDS         connect and send for SECONDS

Every loop ends by itself: counts and durations are bounded by the arguments.
"""

from __future__ import annotations

import http.server
import socket
import sys
import time
import urllib.request

CHUNK = b"\0" * 65536


def ready() -> None:
    print("ready", flush=True)


def serve_http(addr: str, port: str) -> None:
    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            # /bytes/N: N zero bytes (a download to measure); anything else: a greeting.
            size = self.path.removeprefix("/bytes/")
            body = b"\0" * int(size) if size.isdigit() else b"hello from the internet\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer((addr, int(port)), Hello)
    ready()
    server.serve_forever()


def fetch(url: str) -> None:
    with urllib.request.urlopen(url, timeout=20) as answer:
        print(answer.read().decode(), end="")


def listen(addr: str, port: str) -> None:
    with socket.create_server((addr, int(port))) as server:
        ready()
        while True:
            conn, _ = server.accept()
            with conn:
                conn.sendall(b"pong")


def connect(host: str, port: str, seconds: str) -> None:
    try:
        with socket.create_connection((host, int(port)), timeout=float(seconds)) as conn:
            conn.recv(4)
        print("connected")
    except ConnectionRefusedError:
        print("refused")
    except TimeoutError:
        print("timeout")
    except OSError as err:
        print(f"unreachable {err.errno}")


def source(addr: str, port: str) -> None:
    with socket.create_server((addr, int(port))) as server:
        ready()
        conn, _ = server.accept()
        with conn:
            try:
                while True:
                    conn.sendall(CHUNK)
            except OSError:
                pass


def measure(conn: socket.socket, warmup: float, window: float) -> float:
    """Bytes per second received between warmup and warmup + window seconds."""
    conn.settimeout(30)
    start = time.monotonic()
    counted = 0
    window_start: float | None = None
    while True:
        data = conn.recv(65536)
        if not data:
            raise SystemExit("the sender stopped before the window ended")
        now = time.monotonic() - start
        if window_start is None:
            if now >= warmup:
                window_start = now
            continue
        counted += len(data)
        if now - window_start >= window:
            return counted / (now - window_start)


def sink(addr: str, port: str, warmup: str, window: str) -> None:
    with socket.create_server((addr, int(port))) as server:
        ready()
        conn, _ = server.accept()
        with conn:
            print(f"{measure(conn, float(warmup), float(window)):.0f}")


def receive(host: str, port: str, warmup: str, window: str) -> None:
    with socket.create_connection((host, int(port)), timeout=20) as conn:
        print(f"{measure(conn, float(warmup), float(window)):.0f}")


def send(host: str, port: str, seconds: str) -> None:
    end = time.monotonic() + float(seconds)
    with socket.create_connection((host, int(port)), timeout=20) as conn:
        try:
            while time.monotonic() < end:
                conn.sendall(CHUNK)
        except OSError:
            pass


COMMANDS = {"serve-http": serve_http, "fetch": fetch, "listen": listen, "connect": connect,
            "source": source, "sink": sink, "receive": receive, "send": send}

if __name__ == "__main__":
    COMMANDS[sys.argv[1]](*sys.argv[2:])
