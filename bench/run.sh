#!/bin/sh
# erp-broker benchmark: bench/run.sh [--quick | --soak [SECONDS]]   (see bench/README.md)
set -eu
cd "$(dirname "$0")/.."
need=""
for tool in nginx wrk taskset curl; do
    command -v "$tool" >/dev/null 2>&1 || need="$need $tool"
done
if [ -n "$need" ]; then
    echo "installing:$need" >&2
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq nginx-light wrk util-linux curl >/dev/null
fi
PYTHON="${PYTHON:-python3}"
"$PYTHON" -c "import broker" 2>/dev/null || "$PYTHON" -m pip install -q -e .
exec "$PYTHON" -m bench "$@"
