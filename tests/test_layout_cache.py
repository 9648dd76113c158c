"""The repacked-layout cache (herd.layout_cache): a second load of a quantized file maps the layout herd
built the first time, gives the same logits as a fresh build, and a damaged or stale cache is rebuilt.

Reference: the model built from the file without the cache (whose outputs the quantized-path tests check
against llama.cpp and HF transformers)."""

import os
import shutil

import pytest
import torch

import herd
from herd import layout_cache, loader

IDS = [[1, 504, 3458, 282, 4649, 314, 2]]


@pytest.fixture
def counted_builds(monkeypatch, tmp_path):
    monkeypatch.setenv("HERD_LAYOUT_CACHE", str(tmp_path / "layouts"))
    builds = []
    real = loader._load_quantized
    monkeypatch.setattr(loader, "_load_quantized", lambda *a: (builds.append(1), real(*a))[1])
    return builds


def _logits(llm):
    with torch.inference_mode():
        return llm.model(torch.tensor(IDS))


def test_a_second_load_maps_the_cached_layout_and_computes_the_same(counted_builds, smollm2_path, tmp_path):
    fresh = herd.load(smollm2_path, device="cpu")
    assert len(counted_builds) == 1
    cached = list((tmp_path / "layouts").glob("*.pt"))
    assert len(cached) == 1
    again = herd.load(smollm2_path, device="cpu")
    assert len(counted_builds) == 1  # nothing repacked
    assert torch.equal(_logits(fresh), _logits(again))
    assert again.generate("The capital of France is", max_tokens=8, temperature=0).token_ids == \
        fresh.generate("The capital of France is", max_tokens=8, temperature=0).token_ids


def test_a_damaged_cache_is_rebuilt_with_a_warning(counted_builds, smollm2_path, tmp_path):
    fresh = herd.load(smollm2_path, device="cpu")
    (entry,) = (tmp_path / "layouts").glob("*.pt")
    with open(entry, "r+b") as f:
        f.truncate(entry.stat().st_size // 2)
    with pytest.warns(UserWarning, match="ignoring the cached layout"):
        rebuilt = herd.load(smollm2_path, device="cpu")
    assert len(counted_builds) == 2
    assert torch.equal(_logits(fresh), _logits(rebuilt))
    assert herd.load(smollm2_path, device="cpu") is not None and len(counted_builds) == 2  # cached again


def test_a_changed_file_gets_a_new_key(counted_builds, smollm2_path, tmp_path):
    copy = tmp_path / smollm2_path.name
    shutil.copyfile(smollm2_path, copy)
    before = layout_cache.key(copy)
    os.utime(copy, ns=(1, 1))
    assert layout_cache.key(copy) != before
    assert layout_cache.key(smollm2_path) not in (before, None)


def test_off_and_small_files_are_never_cached(counted_builds, monkeypatch, smollm2_path, tmp_path):
    monkeypatch.setenv("HERD_LAYOUT_CACHE", "0")
    herd.load(smollm2_path, device="cpu")
    herd.load(smollm2_path, device="cpu")
    assert len(counted_builds) == 2 and not (tmp_path / "layouts").exists()
    small = tmp_path / "small.gguf"
    small.write_bytes(b"\0" * 1024)
    monkeypatch.setenv("HERD_LAYOUT_CACHE", "1")
    assert layout_cache.key(small) is None
