#!/usr/bin/env bash
# Times the README's first command on a fresh clone of this repository:
# venv + install + `harness pretrain` (quickstart). Prints the run's own
# summary (steps, images/s, loss start -> end) and the total wall time.
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
git clone -q "$src" "$work/harness" && cd "$work/harness"
start=$(date +%s)
python3 -m venv .venv && .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1 -e . >/dev/null 2>&1
setup=$(( $(date +%s) - start ))
.venv/bin/harness pretrain 2>/dev/null | grep '^done'
echo "setup ${setup}s, total $(( $(date +%s) - start ))s (README first command, fresh clone)"
rm -rf "$work"
