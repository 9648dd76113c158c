"""llama.cpp's own tools (llama-server, llama-quantize, convert_hf_to_gguf.py), built once and cached.

    .venv/bin/python benchmarks/llamacpp.py [--jobs 2] [--force]

The only network this project may use is PyPI, so the source comes from the llama-cpp-python sdist,
which vendors llama.cpp under vendor/llama.cpp; the version is the one `herd bench` pins, so both
benchmarks measure the same llama.cpp. The binaries land in $HERD_CACHE/llama.cpp-VERSION/bin
(default ~/.cache/herd), with the vendored conversion scripts and gguf-py beside them in python/;
a second call finds them there and returns at once. The build (about 15 minutes on 2 cores) runs
under `nice` so it does not starve whatever else shares the machine.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

VERSION = "0.3.36"  # keep in step with herd/cli/benchmark.py's LLAMA_CPP pin
TARGETS = ("llama-server", "llama-quantize")
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    # Static binaries: the cache holds two executables, not a tree of .so files with rpaths into a
    # build directory that is deleted afterwards.
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_APP=OFF",
    # Offline: no web UI (the prebuilt one is fetched from Hugging Face, the other needs npm), no
    # curl (deprecated and ignored by this version, harmless on older ones), no HTTPS.
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DGGML_CCACHE=OFF",
]


@dataclass
class Tools:
    server: Path
    quantize: Path
    convert: Path  # convert_hf_to_gguf.py; run it with convert_env()
    gguf_py: Path

    def convert_env(self) -> dict:
        """Environment for convert_hf_to_gguf.py: the vendored gguf-py must win over any installed gguf,
        whose version need not match the script's."""
        return dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(self.gguf_py), *filter(None, [os.environ.get("PYTHONPATH")])]))


def cache_root() -> Path:
    return Path(os.environ.get("HERD_CACHE") or Path.home() / ".cache" / "herd")


def tools_dir(version: str = VERSION) -> Path:
    return cache_root() / f"llama.cpp-{version}"


def _tools(root: Path) -> Tools:
    return Tools(server=root / "bin" / "llama-server", quantize=root / "bin" / "llama-quantize",
                 convert=root / "python" / "convert_hf_to_gguf.py", gguf_py=root / "python" / "gguf-py")


def _complete(t: Tools) -> bool:
    return all(p.exists() for p in (t.server, t.quantize, t.convert, t.gguf_py / "gguf"))


def ensure(version: str = VERSION, jobs: int = 2, force: bool = False, log=print) -> Tools:
    """The cached tools for `version`, building them first if they are not there."""
    root = tools_dir(version)
    tools = _tools(root)
    if _complete(tools) and not force:
        return tools
    root.mkdir(parents=True, exist_ok=True)
    # Two benchmarks started together must not both spend 15 minutes building the same thing.
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _complete(tools) and not force:
            return tools
        _build(version, root, jobs, log)
    return tools


def _run(cmd: list, log, **kw) -> None:
    log("$ " + " ".join(map(str, cmd)))
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def _build(version: str, root: Path, jobs: int, log) -> None:
    # The work directory survives a failed or interrupted build, so a rerun resumes where cmake stopped
    # instead of starting the 15 minutes over; it is removed once the results are in place.
    work = root / "work"
    work.mkdir(exist_ok=True)
    started = time.perf_counter()
    sdist = next(work.glob(f"llama_cpp_python-{version}.tar.gz"), None)
    if sdist is None:
        _run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
              "--no-binary", ":all:", f"llama-cpp-python=={version}", "-d", work], log)
        sdist = next(work.glob("llama_cpp_python-*.tar.gz"))
    src = work / sdist.name[: -len(".tar.gz")] / "vendor" / "llama.cpp"
    if not (src / "CMakeLists.txt").exists():
        log(f"unpacking {sdist.name}")
        with tarfile.open(sdist) as tar:
            tar.extractall(work, filter="data")
    build = work / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    if not (build / "CMakeCache.txt").exists():
        _run(["cmake", "-S", src, "-B", build, *generator, *CMAKE_FLAGS], log)
    _run(["nice", "-n", "19", "cmake", "--build", build, "--target", *TARGETS, "-j", str(jobs)], log)

    # Install by renaming complete directories, so a reader never sees half a cache.
    for name, fill in (("bin", lambda d: [shutil.copy2(_binary(build, t), d / t) for t in TARGETS]),
                       ("python", lambda d: _copy_python(src, d))):
        staging = root / f"{name}.new"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        fill(staging)
        shutil.rmtree(root / name, ignore_errors=True)
        staging.rename(root / name)
    (root / "BUILD_INFO").write_text(f"llama-cpp-python {version}\ncmake {' '.join(CMAKE_FLAGS)}\n"
                                     f"built in {time.perf_counter() - started:.0f} s\n")
    shutil.rmtree(work)
    log(f"llama.cpp {version} tools in {root} ({time.perf_counter() - started:.0f} s)")


def _binary(build: Path, target: str) -> Path:
    for candidate in (build / "bin" / target, *build.rglob(target)):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(f"{target} not found under {build}")


def _copy_python(src: Path, dest: Path) -> None:
    for script in src.glob("convert*.py"):
        shutil.copy2(script, dest)
    # convert_hf_to_gguf.py imports its per-architecture code from conversion/ beside it.
    # Some architectures read chat templates from models/templates; the rest of models/ is 75 MB of
    # vocabulary test files the scripts never open.
    for tree in ("conversion", "gguf-py", "models/templates", "requirements"):
        if (src / tree).is_dir():
            shutil.copytree(src / tree, dest / tree, ignore=shutil.ignore_patterns("__pycache__"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--version", default=VERSION, help="llama-cpp-python sdist version to build from")
    p.add_argument("--jobs", type=int, default=2, help="parallel compile jobs")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = p.parse_args(argv)
    started = time.perf_counter()
    t = ensure(args.version, args.jobs, args.force)
    print(f"llama-server        {t.server}\nllama-quantize      {t.quantize}\n"
          f"convert_hf_to_gguf  {t.convert}\ngguf-py             {t.gguf_py}\n"
          f"({time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
