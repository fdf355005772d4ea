#!/usr/bin/env bash
# The demo: bootstrap .venv (no system packages needed), then run dqr on the
# demo config, an embedded synthetic PACS. Extra arguments go to `dqr run`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/_bootstrap.sh

ensure_venv
exec .venv/bin/dqr run --config configs/demo.yaml "$@"
