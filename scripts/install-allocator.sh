#!/usr/bin/env bash
# Install tcmalloc (Debian's libtcmalloc-minimal4), which the alignkit command preloads
# when it finds it (see alignkit/cli.py: runtime_env). Optional: without it alignkit
# runs on glibc malloc, slower. Idempotent and quiet.
set -euo pipefail

for dir in /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu /usr/lib64 /usr/lib; do
    if [ -e "$dir/libtcmalloc_minimal.so.4" ]; then
        exit 0
    fi
done
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-allocator: no apt-get; install tcmalloc or jemalloc by hand" >&2
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO=(sudo -n); else
        echo "install-allocator: need root to install libtcmalloc-minimal4" >&2
        exit 0
    fi
else
    SUDO=()
fi
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq >/dev/null || true
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends libtcmalloc-minimal4 >/dev/null
echo "install-allocator: installed libtcmalloc-minimal4"
