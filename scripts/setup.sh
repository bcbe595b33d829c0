#!/usr/bin/env bash
# Prepare this machine for hypemand: Debian packages, the virtual environment, and the system
# files (guest kernel, guest binary, initrd). Idempotent: a second run only checks and returns.
#   scripts/setup.sh            what the server needs
#   scripts/setup.sh --test     also what the test suite needs
set -euo pipefail
cd "$(dirname "$0")/.."

want_tests=0
[ "${1:-}" = "--test" ] && want_tests=1

RUNTIME_PACKAGES=(qemu-system-x86 qemu-utils e2fsprogs erofs-utils busybox-static kmod cpio zstd lz4
                  musl-tools gcc libc6-dev binutils make skopeo umoci ca-certificates curl
                  iproute2 nftables conntrack caddy mmdebstrap)
# buildah on the host only for the bench (builds in a VM vs directly); the server never runs it.
TEST_PACKAGES=(docker-registry nodejs npm tmux xfsprogs buildah)

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
die() { printf '\033[31merror:\033[0m %s\n' "$*" >&2; exit 1; }

packages=("${RUNTIME_PACKAGES[@]}")
[ "$want_tests" = 1 ] && packages+=("${TEST_PACKAGES[@]}")
if ! command -v python3 >/dev/null; then packages+=(python3); fi
if [ "$(command -v python3 || true)" = /usr/bin/python3 ]; then packages+=(python3-venv python3-dev); fi

missing=()
for pkg in "${packages[@]}"; do
    # nodejs/npm may come from elsewhere (nvm, NodeSource): a working binary is enough.
    case "$pkg" in nodejs) command -v node >/dev/null && continue ;; npm) command -v npm >/dev/null && continue ;; esac
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    [ "$(id -u)" = 0 ] || die "missing Debian packages: ${missing[*]} (run as root, or: sudo apt-get install ${missing[*]})"
    command -v apt-get >/dev/null || die "this needs a Debian-like system with apt-get; missing: ${missing[*]}"
    say "installing Debian packages: ${missing[*]}"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null \
        || die "apt-get install failed for: ${missing[*]}"
fi
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found: apt-get install qemu-system-x86"

# The virtual environment, reinstalled only when pyproject.toml (or the extras below) change.
# Extras: dev (tests, linters) and cli (the `hypeman` command: the official SDK, typer, rich).
extras='.[dev,cli]'
stamp=.venv/.pyproject.sha256
sum=$( { cat pyproject.toml; echo "$extras"; } | sha256sum | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$sum" ]; then
    say "preparing the virtual environment (.venv)"
    python3 -m venv .venv || die "python3 -m venv failed: apt-get install python3-venv"
    .venv/bin/pip install -q --upgrade pip >/dev/null
    .venv/bin/pip install -q -e "$extras" || die "pip install failed"
    echo "$sum" > "$stamp"
fi

# Guest kernel, guest binary and initrd, into the shared system directory.
say "checking system files (guest kernel, guest binary, initrd)"
.venv/bin/python -m hypemand.system

# The builder VMs' image (Debian + buildah, made with mmdebstrap from Debian's archive), and with
# --test the small Debian image (bash, python3) the tests use; made once, again when their spec changes.
rootfs_args=()
[ "$want_tests" = 1 ] && rootfs_args=(--test)
say "checking the Debian root filesystems (mmdebstrap)"
.venv/bin/python -m hypemand.builds.rootfs "${rootfs_args[@]}"
