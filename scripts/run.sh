#!/usr/bin/env bash
# Run the server in the foreground and, once it answers, make the demo image available
# (busybox-static pushed into the server's own /v2 registry: no internet needed).
# HYPEMAND_HOST / HYPEMAND_PORT / HYPEMAND_DATA_DIR change where it listens and keeps its state.
# The VM network (bridge, TAPs, NAT, ingress proxy) is built in the network namespace
# "hypemand" unless HYPEMAND_NETWORK_NAMESPACE says otherwise (set it empty for the host's own
# namespace, as the reference does it).
set -euo pipefail
cd "$(dirname "$0")/.."
host=${HYPEMAND_HOST:-127.0.0.1}
port=${HYPEMAND_PORT:-4973}
export HYPEMAND_NETWORK_NAMESPACE=${HYPEMAND_NETWORK_NAMESPACE-hypemand}
args=(serve --host "$host" --port "$port")
[ -n "${HYPEMAND_DATA_DIR:-}" ] && args+=(--data-dir "$HYPEMAND_DATA_DIR")

.venv/bin/hypemand "${args[@]}" &
server=$!
trap 'kill -TERM "$server" 2>/dev/null; wait "$server"' INT TERM

url="http://$host:$port"
[ "$host" = 0.0.0.0 ] && url="http://127.0.0.1:$port"
for _ in $(seq 1 300); do
    curl -fsS "$url/health" >/dev/null 2>&1 && break
    kill -0 "$server" 2>/dev/null || { wait "$server"; exit $?; }
    sleep 0.2
done
.venv/bin/hypemand demo-image --url "$url" ${HYPEMAND_DATA_DIR:+--data-dir "$HYPEMAND_DATA_DIR"} \
    || echo "warning: the demo image could not be installed; the server runs on" >&2
echo "hypemand is serving on $url (Ctrl-C stops it; VMs keep running)"
wait "$server"
