#!/usr/bin/env bash
# One command installs everything on a fresh machine (see README).
# torch is pinned to 2.13.0: on a CPU-only machine with a local CPU wheel this avoids a
# multi-GB CUDA download; elsewhere pip takes the matching PyPI build (CUDA on Linux).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==2.13.0" -e ".[dev]"
# Headless Chromium for the browser tests of the report and the gallery, and wrk for the serving
# benchmark (Debian/Ubuntu; optional: without them the browser tests skip, bench/serve.py uses httpx).
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    missing=""
    command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
    command -v wrk >/dev/null 2>&1 || missing="$missing wrk"
    if [ -n "$missing" ]; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null) \
            || echo "install.sh: could not install$missing; browser tests will skip, bench/serve.py falls back to httpx" >&2
    fi
fi
