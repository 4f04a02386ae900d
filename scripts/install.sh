#!/usr/bin/env bash
# One command installs everything on a fresh machine (see README).
# torch is pinned to 2.13.0: on a CPU-only machine with a local CPU wheel this avoids a
# multi-GB CUDA download; elsewhere pip takes the matching PyPI build (CUDA on Linux).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==2.13.0" -e ".[dev]"
# Headless Chromium for the browser tests of the report and the gallery (Debian/Ubuntu).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || echo "install.sh: chromium not installed; browser tests will skip" >&2
fi
