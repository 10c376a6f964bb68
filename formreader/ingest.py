"""Ingest: turn files (PDF, TIFF, PNG, JPEG) into grey page images.

This is the pipeline's I/O stage: it is the only one that reads files. Every page comes out as
an (H, W) uint8 array with its resolution; a file or page that cannot be read comes out as a
`PageError` with a specific reason, so that a batch goes on past it.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}
SUFFIXES = IMAGE_SUFFIXES | {".pdf"}
MAX_SIDE_PX = 20000  # about 1.7 m at 300 DPI: anything larger is not a scanned form
MAX_PIXELS = 200_000_000


@dataclass
class Page:
    """One page: grey image (H, W) uint8, dark ink on light paper, and where it came from."""

    image: np.ndarray
    dpi: float | None  # None when the file does not say
    source: str
    page: int  # 1-based


@dataclass
class PageError:
    """A file or page that could not be read; page 0 means the whole file."""

    source: str
    page: int
    reason: str


def find_inputs(paths: list[Path]) -> list[Path]:
    """Files to read under `paths` (files or folders, recursively), in a stable sorted order.

    Hidden files and files of other types inside folders are skipped; a file named explicitly is
    always kept, so that a wrong type is reported rather than silently ignored.
    """
    found: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found += sorted(
                f
                for f in p.rglob("*")
                if f.is_file()
                and f.suffix.lower() in SUFFIXES
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
        else:
            found.append(p)
    return found


def read_pages(path: Path, pdf_dpi: int = 200) -> Iterator[Page | PageError]:
    """Yield every page of one file, or a PageError for what cannot be read.

    PDFs are rendered by poppler (through pdf2image) one page at a time at `pdf_dpi`, so a long
    PDF never sits in memory whole; TIFFs yield every frame.
    """
    path = Path(path)
    source = str(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        yield PageError(source, 0, f"cannot open file: {e.strerror or e}")
        return
    if size == 0:
        yield PageError(source, 0, "empty file (0 bytes)")
        return
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"%PDF") or path.suffix.lower() == ".pdf":
        yield from _read_pdf(path, pdf_dpi)
    else:
        yield from _read_image(path)


def _read_pdf(path: Path, dpi: int) -> Iterator[Page | PageError]:
    from pdf2image import convert_from_path, pdfinfo_from_path
    from pdf2image.exceptions import PDFPageCountError, PDFSyntaxError

    source = str(path)
    try:
        info = pdfinfo_from_path(str(path))
        pages = int(info["Pages"])
    except (PDFPageCountError, PDFSyntaxError, KeyError, ValueError) as e:
        message = str(e)
        if "password" in message.lower() or "encrypt" in message.lower():
            yield PageError(source, 0, "encrypted PDF: a password is needed to read it")
        else:
            yield PageError(source, 0, f"not a readable PDF (damaged or truncated): {_first_line(message)}")
        return
    width_pt, height_pt = _page_size_points(info.get("Page size", ""))
    if max(width_pt, height_pt) * dpi / 72 > MAX_SIDE_PX:
        yield PageError(source, 0, f"PDF page too large: {width_pt:.0f}x{height_pt:.0f} pt at {dpi} DPI exceeds {MAX_SIDE_PX} px")
        return
    for number in range(1, pages + 1):
        try:
            images = convert_from_path(str(path), dpi=dpi, first_page=number, last_page=number, grayscale=True, timeout=120)
        except Exception as e:  # poppler reports damaged pages in many ways
            yield PageError(source, number, f"page could not be rendered: {_first_line(str(e))}")
            continue
        if not images:
            yield PageError(source, number, "page could not be rendered: poppler returned nothing")
            continue
        yield Page(np.asarray(images[0].convert("L")), float(dpi), source, number)


def _read_image(path: Path) -> Iterator[Page | PageError]:
    source = str(path)
    try:
        img = Image.open(path)
    except UnidentifiedImageError:
        yield PageError(source, 0, f"not an image file: content is not PNG, JPEG or TIFF (suffix {path.suffix!r})")
        return
    except OSError as e:
        yield PageError(source, 0, f"cannot open image: {e}")
        return
    with img:
        w, h = img.size
        if max(w, h) > MAX_SIDE_PX or w * h > MAX_PIXELS:
            yield PageError(source, 0, f"image too large: {w}x{h} px (limit {MAX_SIDE_PX} px a side)")
            return
        frames = getattr(img, "n_frames", 1)
        for number in range(1, frames + 1):
            try:
                img.seek(number - 1)
                yield Page(_to_grey(img), _image_dpi(img), source, number)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                yield PageError(source, number, f"image data damaged or truncated: {_first_line(str(e))}")


def decode_image(data: bytes) -> np.ndarray:
    """Decode one image held in memory (PNG, JPEG, TIFF first frame) into grey (H, W) uint8."""
    with Image.open(io.BytesIO(data)) as img:
        return _to_grey(img)


def _to_grey(img: Image.Image) -> np.ndarray:
    img = ImageOps.exif_transpose(img) if "exif" in img.info else img
    if img.mode in ("RGBA", "LA", "P"):
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    if img.mode == "I;16" or img.mode == "I":
        arr = np.asarray(img, dtype=np.float64)
        return (255 * arr / max(arr.max(), 1)).astype(np.uint8)
    return np.asarray(img.convert("L")).copy()


def _image_dpi(img: Image.Image) -> float | None:
    dpi = img.info.get("dpi")
    try:
        value = float(dpi[0]) if dpi else None
    except (TypeError, ValueError):
        return None
    # 72 and 96 DPI are what software writes when nobody measured anything.
    return value if value and value > 30 and round(value) not in (72, 96) else None


def _page_size_points(text: str) -> tuple[float, float]:
    try:
        parts = text.split()
        return float(parts[0]), float(parts[2])
    except (IndexError, ValueError):
        return 612.0, 792.0


def _first_line(message: str) -> str:
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return lines[0] if lines else "unknown error"
