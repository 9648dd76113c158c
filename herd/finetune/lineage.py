"""The lineage record every fine-tuned export carries: what it came from and how it was made."""

from __future__ import annotations

import platform
import time


def versions() -> dict:
    import torch

    from herd import __version__

    return {"herd": __version__, "torch": torch.__version__, "python": platform.python_version()}


def data_record(dataset) -> dict | None:
    if dataset is None:
        return None
    return {"path": str(dataset["path"]), "sha256": dataset["sha256"], "kind": dataset.get("kind"),
            "records": dataset.get("records"), "examples": dataset.get("examples"), "tokens": dataset.get("tokens"),
            "truncated": dataset.get("truncated", 0)}


def make_lineage(base: dict, method: str, hyperparameters: dict, train: dict | None, eval_: dict | None = None,
                 steps: int | None = None, fingerprint: str | None = None, parent: dict | None = None) -> dict:
    """`base`: {"path", "format", "fingerprint"} of the model trained from; `fingerprint`: the new weights'."""
    return {
        "base": base, "fingerprint": fingerprint, "method": method, "steps": steps,
        "data": {"train": data_record(train), "eval": data_record(eval_)},
        "hyperparameters": hyperparameters, "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **({"adapter": parent} if parent else {}),
    }


__all__ = ["make_lineage", "versions"]
