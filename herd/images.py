"""Images in, model inputs out: decoding (any format Pillow opens, EXIF rotation applied, a GIF's first frame,
transparency composited on white) and Llama 4's preprocessing (tiles of the best arrangement plus a global
thumbnail, normalised). Pillow and torch only.

Llama 4's rules are those of HF transformers' Llama4ImageProcessor (image_processing_llama4.py) and
llama-models' VariableSizeImageTransform: the tile arrangements of at most `max_tiles` tiles; the one that
needs the least upscaling (or, when every arrangement shrinks the image, the least downscaling; ties go to
the smaller canvas); upscaling limited to the tile size; a resize that keeps the aspect ratio (bilinear,
antialiased), zero padding right and bottom, rescaling and normalisation in bfloat16 as Meta's transform
does; when there is more than one tile, the whole image squeezed into one more tile, last. With
`resize_to_max_canvas` the canvas is the one that upscales most and the upscaling is not limited.

The settings (tile count, rescale factor, mean, std, ...) are the checkpoint's own, read with its config
(herd.formats.hf reads its image processor's files into VisionArgs / MllamaVisionArgs); the defaults here
are the released models'.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
import platform
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from herd.errors import ImageError

MAX_PIXELS = 50_000_000  # default limit on width x height: a decompression bomb is refused before decoding
MAX_BYTES = 20 * 1024 * 1024  # default limit on an encoded image (a data URL's payload, a downloaded file)


def decode_image(data: bytes, name: str = "image", max_pixels: int = MAX_PIXELS):
    """Encoded bytes -> an RGB PIL image, upright. Raises ImageError naming `name` for anything unusable; the
    size is checked from the header (image_size) before a pixel is decoded."""
    from PIL import ImageOps

    with _opened(data, name) as img:
        _check_size(img, name, max_pixels)
        img.seek(0)  # a GIF's or WebP's first frame
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)


def image_size(data: bytes, name: str = "image", max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(width, height) read from the image's header alone: Pillow decodes no pixel until asked, so a limit on
    the pixels of several images together is checked before any of them costs memory."""
    with _opened(data, name) as img:
        return _check_size(img, name, max_pixels)


def _check_size(img, name: str, max_pixels: int) -> tuple[int, int]:
    width, height = img.size
    if width * height > max_pixels:
        raise ImageError(f"{name}: {width}x{height} = {width * height:,} pixels exceeds the limit of {max_pixels:,}")
    if width == 0 or height == 0:
        raise ImageError(f"{name}: the image is {width}x{height} pixels")
    return width, height


@contextmanager
def _opened(data: bytes, name: str):
    """The image Pillow opens lazily from `data`; Pillow's errors become ImageErrors naming `name`. They never
    quote the data (it may be a file or a download the reader of the message must not see)."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageError(f"{name}: empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            yield img
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: refused as a decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image Pillow can read") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # truncated or corrupt data
        raise ImageError(f"{name}: corrupt or truncated image ({e})") from None


def to_rgb(img):
    """RGB, with any transparency composited on white (as Meta's and HF's processors do)."""
    from PIL import Image

    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def image_bytes(source, max_bytes: int = MAX_BYTES) -> tuple[bytes, str]:
    """(encoded bytes, a name for messages) from a data URL, a file path or raw bytes. Remote URLs are the
    caller's to fetch (the server does, with its own limits)."""
    if isinstance(source, (bytes, bytearray)):
        data, name = bytes(source), "image"
    elif isinstance(source, str) and source.startswith("data:"):
        header, sep, payload = source.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ImageError("image data URL must look like data:image/png;base64,<data>")
        if len(payload) > max_bytes * 4 // 3 + 4:
            raise ImageError(f"image data URL: more than the limit of {max_bytes:,} bytes")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ImageError(f"image data URL: invalid base64 ({e})") from None
        name = f"image data URL ({header[5:]})"
    elif isinstance(source, str) and source.startswith(("http://", "https://")):
        raise ImageError(f"{source}: remote image URLs are not fetched here; pass the image's bytes, a file path "
                         "or a data URL (herd serve fetches http(s) URLs with --allow-image-urls)")
    elif isinstance(source, (str, Path)):
        path = Path(str(source).removeprefix("file://"))
        if not path.is_file():
            raise ImageError(f"{path}: no such image file")
        if path.stat().st_size > max_bytes:
            raise ImageError(f"{path}: {path.stat().st_size:,} bytes exceeds the limit of {max_bytes:,}")
        data, name = path.read_bytes(), str(path)
    else:
        raise ImageError(f"an image must be a data URL, a file path or bytes, not {type(source).__name__}")
    if len(data) > max_bytes:
        raise ImageError(f"{name}: {len(data):,} bytes exceeds the limit of {max_bytes:,}")
    return data, name


def load_image(source, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_BYTES):
    """A data URL, file path or bytes -> an upright RGB PIL image."""
    data, name = image_bytes(source, max_bytes)
    return decode_image(data, name, max_pixels)


@dataclass(frozen=True)
class ImageInput:
    """One preprocessed image: `tiles` [N, 3, T, T] (bfloat16, the model's input), the arrangement
    (rows, columns) of the tiles before the global one, and `digest`, the SHA-256 of the tiles (the key of
    the encoder-output cache and of the prefix cache's image blocks)."""

    tiles: torch.Tensor
    arrangement: tuple[int, int]
    digest: str


def tile_arrangements(max_tiles: int) -> list[tuple[int, int]]:
    """Every (rows, columns) with at most max_tiles tiles, in the order HF's find_supported_resolutions
    lists them (by aspect ratio as first met, counts from max_tiles down)."""
    by_ratio: dict[float, list[tuple[int, int]]] = {}
    for count in range(max_tiles, 0, -1):
        for rows in sorted(d for d in range(1, count + 1) if count % d == 0):
            by_ratio.setdefault(rows / (count // rows), []).append((rows, count // rows))
    return [a for group in by_ratio.values() for a in group]


def best_canvas(height: int, width: int, tile: int, max_tiles: int,
                largest: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The canvas (pixels, as 0-d int64 tensors) an image of height x width is fitted into (see the module
    doc; `largest`: resize_to_max_canvas). The arithmetic is HF's to the bit: float32 scales, and a tie in
    float32 is a tie."""
    canvases = torch.tensor([(r * tile, c * tile) for r, c in tile_arrangements(max_tiles)])
    scale_h, scale_w = canvases[:, 0] / height, canvases[:, 1] / width
    scales = torch.minimum(scale_h, scale_w)
    up = scales[scales >= 1]
    chosen = (up.max() if largest else up.min()) if len(up) else scales[scales < 1].max()
    candidates = canvases[scales == chosen]
    best = candidates[torch.argmin(candidates[:, 0] * candidates[:, 1])]
    return best[0], best[1]


def fit_without_distortion(height: int, width: int, target_h, target_w) -> tuple[int, int]:
    """The largest size with the image's aspect ratio inside target. A target is an int or a 0-d tensor, and
    the scales are float64 or float32 accordingly, as in HF's processor, whose outputs must be matched."""
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        new_h, new_w = min(math.floor(height * scale_w), target_h), target_w
    else:
        new_h, new_w = target_h, min(math.floor(width * scale_h), target_w)
    return max(int(new_h), 1), max(int(new_w), 1)


def _native_uint8_bilinear() -> bool:
    """Where torchvision resizes uint8 bilinear natively (torch's vectorised kernel) rather than in float32."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")


def resize(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 [1, 3, H, W] -> [1, 3, height, width], bilinear with antialiasing, rounded back to uint8."""
    if tuple(pixels.shape[-2:]) == (height, width):
        return pixels
    if _native_uint8_bilinear():
        return F.interpolate(pixels, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    out = F.interpolate(pixels.float(), size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return out.round_().to(torch.uint8)


LLAMA4_MEAN_STD = (0.5, 0.5, 0.5)  # Llama 4's normalisation (its released processor and Meta's transform)


def normalize(pixels: torch.Tensor, mean=LLAMA4_MEAN_STD, std=LLAMA4_MEAN_STD,
              rescale_factor: float = 1 / 255) -> torch.Tensor:
    """uint8 -> bfloat16: x * rescale_factor, then (x - mean) / std per channel, every step rounded to
    bfloat16 and mean and std too, as HF's Llama4ImageProcessor (torchvision's normalize) computes it."""
    x = pixels.to(torch.bfloat16) * rescale_factor
    mean = torch.tensor(mean, dtype=torch.bfloat16).view(-1, 1, 1)
    std = torch.tensor(std, dtype=torch.bfloat16).view(-1, 1, 1)
    return (x - mean) / std


def preprocess_llama4(img, tile: int = 336, max_tiles: int = 16, mean=LLAMA4_MEAN_STD, std=LLAMA4_MEAN_STD,
                      rescale_factor: float = 1 / 255, resize_to_max_canvas: bool = False) -> ImageInput:
    """An RGB PIL image -> Llama 4's tiles (see the module doc)."""
    import numpy as np

    pixels = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()[None]
    height, width = pixels.shape[-2:]
    canvas_h, canvas_w = best_canvas(height, width, tile, max_tiles, largest=resize_to_max_canvas)
    if resize_to_max_canvas:  # the image fills the canvas as far as its aspect ratio allows
        limit_h, limit_w = canvas_h, canvas_w
    else:  # upscaling stops at one tile's size (Python's min keeps the int on a tie, and with it float64 scales)
        limit_h, limit_w = min(max(height, tile), canvas_h), min(max(width, tile), canvas_w)
    new_h, new_w = fit_without_distortion(height, width, limit_h, limit_w)
    canvas_h, canvas_w = int(canvas_h), int(canvas_w)
    fitted = F.pad(resize(pixels, new_h, new_w), (0, canvas_w - new_w, 0, canvas_h - new_h))
    rows, cols = canvas_h // tile, canvas_w // tile

    def normalized(x):
        return normalize(x, mean, std, rescale_factor)

    tiles = normalized(fitted).reshape(3, rows, tile, cols, tile).permute(1, 3, 0, 2, 4).reshape(-1, 3, tile, tile)
    if rows * cols > 1:
        tiles = torch.cat([tiles, normalized(resize(pixels, tile, tile))])
    tiles = tiles.contiguous()
    digest = hashlib.sha256(tiles.view(torch.int16).numpy().tobytes()).hexdigest()
    return ImageInput(tiles, (rows, cols), digest)




# Llama 3.2 Vision's released normalisation (the defaults of herd.config.MllamaVisionArgs too; herd.images
# imports nothing of herd's but its errors)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class MllamaImage:
    """One image for Llama 3.2 Vision: `tiles` [1, max_tiles, 3, T, T] float32 (tiles past n_tiles are zero),
    the arrangement id (1-based into the model's aspect_ratios) and `digest` (SHA-256 of the tiles)."""

    tiles: torch.Tensor
    n_tiles: int
    ratio_id: int
    digest: str


def mllama_canvas(height: int, width: int, tile: int, max_tiles: int) -> tuple[int, int]:
    """HF MllamaImageProcessor's canvas: the arrangements (a, b), a*b <= max_tiles, a outer, as (height, width)
    in tiles; the least upscaling (else least downscaling), ties to the smallest area; float64 as numpy."""
    arrangements = [(a, b) for a in range(1, max_tiles + 1) for b in range(1, max_tiles + 1) if a * b <= max_tiles]
    scales = [min(b * tile / width, a * tile / height) for a, b in arrangements]
    up = [x for x in scales if x >= 1]
    chosen = min(up) if up else max(x for x in scales if x < 1)
    candidates = [arr for arr, x in zip(arrangements, scales) if x == chosen]
    return min(candidates, key=lambda arr: arr[0] * arr[1])


def preprocess_mllama(img, tile: int = 560, max_tiles: int = 4, mean=CLIP_MEAN, std=CLIP_STD,
                      aspect_ratios: tuple[tuple[int, int], ...] | None = None,
                      rescale_factor: float = 1 / 255) -> MllamaImage:
    """An RGB PIL image -> Llama 3.2 Vision's tiles (HF MllamaImageProcessor; llama-models
    llama3/multimodal/image_transform.py): the canvas of tiles that needs the least rescaling, the image
    resized into it keeping its aspect ratio (never below one tile a side), zero padding right and bottom,
    normalised in float32 ((x * rescale_factor - mean) / std, the rescaling folded into mean and std as HF
    does), cut into tiles and padded with empty tiles to max_tiles."""
    import numpy as np

    pixels = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()[None]
    height, width = pixels.shape[-2:]
    rows, cols = mllama_canvas(height, width, tile, max_tiles)
    target_h, target_w = min(max(height, tile), rows * tile), min(max(width, tile), cols * tile)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        new_h, new_w = min(math.floor(height * scale_w) or 1, target_h), target_w
    else:
        new_h, new_w = target_h, min(math.floor(width * scale_h) or 1, target_w)
    fitted = F.pad(resize(pixels, new_h, new_w), (0, cols * tile - new_w, 0, rows * tile - new_h))
    tiles = fitted.reshape(3, rows, tile, cols, tile).permute(1, 3, 0, 2, 4).reshape(-1, 3, tile, tile)
    scaled_mean = torch.tensor(mean) * (1.0 / rescale_factor)  # rescaling folded into the normalisation, as HF does
    scaled_std = torch.tensor(std) * (1.0 / rescale_factor)
    tiles = (tiles.float() - scaled_mean.view(-1, 1, 1)) / scaled_std.view(-1, 1, 1)
    out = torch.zeros(1, max_tiles, 3, tile, tile)
    out[0, : rows * cols] = tiles
    ratios = list(aspect_ratios) if aspect_ratios is not None else [
        (a, b) for a in range(1, max_tiles + 1) for b in range(1, max_tiles + 1) if a * b <= max_tiles]
    if (rows, cols) not in ratios:
        raise ImageError(f"the tile arrangement {rows}x{cols} is not among the model's aspect ratios")
    digest = hashlib.sha256(out.numpy().tobytes()).hexdigest()
    return MllamaImage(out, rows * cols, ratios.index((rows, cols)) + 1, digest)


__all__ = ["decode_image", "load_image", "image_bytes", "preprocess_llama4", "preprocess_mllama", "ImageInput",
           "MllamaImage", "MAX_PIXELS", "MAX_BYTES", "image_size"]
