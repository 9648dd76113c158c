"""Fetching http(s) image URLs for herd serve --allow-image-urls: one GET per image, bounded in bytes and time,
refused for anything but an image-sized body. Data URLs and the decoding itself are herd.images'."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from herd.errors import ImageError
from herd.images import MAX_BYTES


@dataclass(frozen=True)
class ImageFetch:
    max_bytes: int | None = None  # None: herd.images.MAX_BYTES
    timeout: float = 10.0  # seconds for the whole download

    def __call__(self, url: str) -> bytes:
        limit = self.max_bytes or MAX_BYTES
        deadline = time.monotonic() + self.timeout
        request = urllib.request.Request(url, headers={"User-Agent": "herd-serve", "Accept": "image/*"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                declared = response.headers.get("Content-Length")
                if declared is not None and declared.isdigit() and int(declared) > limit:
                    raise ImageError(f"{url}: {int(declared):,} bytes exceeds the limit of {limit:,}")
                chunks, size = [], 0
                while chunk := response.read(65536):
                    size += len(chunk)
                    if size > limit:
                        raise ImageError(f"{url}: more than the limit of {limit:,} bytes")
                    if time.monotonic() > deadline:
                        raise ImageError(f"{url}: the download took longer than {self.timeout:g} s")
                    chunks.append(chunk)
                return b"".join(chunks)
        except ImageError:
            raise
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise ImageError(f"{url}: could not fetch the image ({e})") from None
