#!/usr/bin/env bash
# Install everything the tests need on a fresh Debian machine, then run the whole suite.
# Usage: scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq dataset-fashion-mnist
fi
python -m pip install -q torch==2.14.1 torchvision==0.29.1 2>/dev/null || python -m pip install -q torch torchvision
python -m pip install -q -e ".[dev]"
python -m ruff check .
python -m pytest "$@"
