"""Where herd serve takes images from: data URLs always; http(s) URLs only with --allow-image-urls, each fetched
with one GET bounded in bytes and time. Never a file: a path, a relative path or a file:// URL in a request names
a file on the server, which a client must not reach (nor learn whether it exists). Decoding is herd.images'."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from herd.errors import ImageError
from herd.images import MAX_BYTES, image_bytes


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


@dataclass(frozen=True)
class ImageSources:
    """The server's `read_image` for herd.api.LLM.chat_inputs: (bytes, name) of an image part's url."""

    fetch: ImageFetch | None = None  # None: http(s) URLs are refused
    max_bytes: int = MAX_BYTES  # of a data URL's image

    def __call__(self, url) -> tuple[bytes, str]:
        if isinstance(url, str) and url.startswith("data:"):
            return image_bytes(url, self.max_bytes)
        if isinstance(url, str) and url.startswith(("http://", "https://")):
            if self.fetch is None:
                raise ImageError("an http(s) image URL, but this server was not started with --allow-image-urls: "
                                 "send the image as a data URL (data:image/png;base64,...)")
            return self.fetch(url), url
        # The same words for every other url, whatever it names, so that nothing about the server's files shows.
        raise ImageError("an image_url must be a data URL (data:image/png;base64,...)"
                         + (" or an http(s) URL" if self.fetch is not None else "")
                         + "; this server reads no files")
