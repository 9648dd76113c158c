"""The worker process behind herd.chat.template.RenderProcesses: renders chat templates, one request at a time.

Once started it writes one frame, b"R". Each request on stdin is an 8-byte little-endian length and a pickle of (template source, variables,
value size limit, memory budget, seconds); each reply on stdout is a length and then b"O" and the
rendered text, or b"E" and a TemplateError's message, in UTF-8. Before each render the address space is
limited to what the worker takes plus three times the render's memory budget (a template that gets past
the sandbox's own accounting meets MemoryError, not the machine's memory), and lifted afterwards. The
worker exits at the end of its input, or after a render that left it larger than RECYCLE_BYTES.
"""

from __future__ import annotations

import os
import pickle
import resource
import signal
import struct
import sys

from herd.chat.template import WORKER_OVERHEAD, TemplateFormat
from herd.errors import TemplateError

RECYCLE_BYTES = 1 << 30
CACHED_TEMPLATES = 8


def _address_space() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _read(fd: int, n: int) -> bytes | None:
    data = bytearray()
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def _write(fd: int, data: bytes) -> None:
    view = memoryview(struct.pack("<Q", len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def _render(formats: dict, source: str, variables: dict, limit: int, budget: int, timeout_s: float) -> bytes:
    try:
        fmt = formats.get(source)
        if fmt is None:
            if len(formats) >= CACHED_TEMPLATES:
                formats.clear()
            fmt = formats[source] = TemplateFormat(source)
        fmt.timeout_s = timeout_s
        return b"O" + fmt.render_variables(variables, limit, budget).encode("utf-8", "surrogatepass")
    except TemplateError as e:
        return b"E" + str(e).encode("utf-8", "surrogatepass")
    except MemoryError:
        return b"E" + b"the chat template needs more memory than a render may have"


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server stops its workers itself
    formats: dict[str, TemplateFormat] = {}
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    _write(1, b"R")  # ready: the imports are done
    while True:
        header = _read(0, 8)
        if header is None:
            return
        request = _read(0, struct.unpack("<Q", header)[0])
        if request is None:
            return
        source, variables, limit, budget, timeout_s = pickle.loads(request)
        size = _address_space()
        if size is not None:
            cap = size + 3 * budget + WORKER_OVERHEAD
            resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
        try:
            reply = _render(formats, source, variables, limit, budget, timeout_s)
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
        del variables, request
        _write(1, reply)
        size = _address_space()
        if size is not None and size > RECYCLE_BYTES:
            return


if __name__ == "__main__":
    main()
