#!/usr/bin/env bash
# Sets up manlearn on a fresh machine: a virtual environment in .venv with the CPU build of
# torch 2.13.0, the package with its test extras, and Fashion-MNIST (Debian package) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch first and pinned: an unpinned torch would pull several GB of CUDA wheels.
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test,all]"
FM=/usr/share/datasets/fashion-mnist
if [ ! -f "$FM/train-images-idx3-ubyte.gz" ] && [ -z "${MANLEARN_DATA:-}" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing Fashion-MNIST (apt-get install dataset-fashion-mnist)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null
  else
    echo "setup: Fashion-MNIST not found; run 'sudo apt-get install dataset-fashion-mnist' or set MANLEARN_DATA" >&2
  fi
fi
echo "setup: done ($(.venv/bin/python -c 'import torch, manlearn; print("torch", torch.__version__, "manlearn", manlearn.__version__)'))"
