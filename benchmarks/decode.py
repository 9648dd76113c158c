"""herd vs llama.cpp (llama-cpp-python) vs HF transformers on the same GGUF file: decode and prefill
tokens/s, load-to-first-token, peak RSS; medians of several fresh-process runs and herd/peer ratios.

    .venv/bin/python benchmarks/decode.py [SOURCE] [--runs 3] [--threads N] [--engines herd,llama.cpp,hf]

The peers are installed on first use into benchmarks/.venv-peers (never into herd's environment);
the same table comes from `herd bench SOURCE`. See herd/cli/benchmark.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from herd.cli.benchmark import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
