#!/usr/bin/env bash
# Run the server in the foreground. Set HYPEMAND_HOST / HYPEMAND_PORT / HYPEMAND_DATA_DIR to change
# where it listens and keeps its state.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/hypemand serve --host "${HYPEMAND_HOST:-127.0.0.1}" --port "${HYPEMAND_PORT:-4973}" \
    ${HYPEMAND_DATA_DIR:+--data-dir "$HYPEMAND_DATA_DIR"}
