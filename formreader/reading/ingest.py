"""Ingest: turn files (PDF, TIFF, PNG, JPEG) into grey page images.

This is the pipeline's I/O stage: it is the only one that reads files. Every page comes out as
an (H, W) uint8 array with its resolution; a file or page that cannot be read comes out as a
`PageError` with a specific reason, so that a batch goes on past it.
"""

from __future__ import annotations

import io
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# What scanners and their software write: TIFF, PNG and JPEG most, and BMP, GIF, WebP, JPEG 2000
# (archives) and PNM (SANE's scanimage); every one of them is read by Pillow.
IMAGE_SUFFIXES = {
    ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".jp2", ".j2k", ".jpx", ".pnm", ".pbm", ".pgm", ".ppm"
}
SUFFIXES = IMAGE_SUFFIXES | {".pdf"}
MAX_SIDE_PX = 20000  # about 1.7 m at 300 DPI: anything larger is not a scanned form
MAX_PIXELS = 200_000_000
# No page is worked on larger than this (an A3 page at 600 DPI is 70 MP; a form at the
# template's resolution is a few MP): a DPI tag that says 31 cannot blow a page up to gigabytes.
MAX_PAGE_PIXELS = 60_000_000
EXIF_ORIENTATION = 0x0112  # the EXIF tag saying how a photo is turned
MIN_DPI = 50  # a resolution tag under this is not a scan's: taken as unknown
MAX_PDF_PAGES = 1_000_000  # more than any PDF holds: pdfinfo is asked about every page


@dataclass
class Page:
    """One page: grey image (H, W) uint8, dark ink on light paper, and where it came from."""

    image: np.ndarray
    dpi: float | None  # None when the file does not say
    source: str
    page: int  # 1-based


def is_bitonal(image: np.ndarray) -> bool:
    """Whether a grey page (H, W) uint8 is a bitonal scan's: nearly every pixel pure black or
    pure white. A grey scanner's paper is never one flat level (tone and noise), a bitonal one's
    always is; resampled or JPEG-compressed, a bitonal page still has 90% of its pixels there."""
    extremes = np.count_nonzero(image >= 254) + np.count_nonzero(image <= 1)
    return extremes >= 0.9 * image.size


# A bitonal scanner's halftone mode (and many a fax) renders grey (tinted paper, grey print,
# pencil) as scattered dots, and every dot is ink to the stages after: every field of the samples'
# scan_c dithered so went to review as "writing crosses the box's lines", its empty one too. Of a
# page thresholded, as bitonal scanners mostly do, under 0.1% of the black pixels are dots alone
# (the samples' fax, the benchmarks' bitonal forms); of that page dithered, 65-77% (its paper
# 220-255). A page is taken for dithered above this share.
DITHERED_DOTS = 0.1


def is_dithered(image: np.ndarray) -> bool:
    """Whether a bitonal page (H, W) uint8 (`is_bitonal`) has its greys dithered: at least
    DITHERED_DOTS of the black pixels of its middle (half its height and width: as telling as the
    whole page, at a quarter of the work) with no black pixel among their eight neighbours."""
    import cv2  # (ingest itself needs no OpenCV: the processes that only list pages do not load it)

    h, w = image.shape
    black = (image[h // 4 : h - h // 4, w // 4 : w - w // 4] < 128).astype(np.uint8)
    total = cv2.countNonZero(black)
    if not total:
        return False
    around = cv2.boxFilter(black, -1, (3, 3), normalize=False, borderType=cv2.BORDER_CONSTANT)  # itself included
    alone = cv2.compare(around, 1, cv2.CMP_EQ)
    return cv2.countNonZero(cv2.bitwise_and(alone, alone, mask=black)) >= DITHERED_DOTS * total


# The dots a dithered page's paper is made of, at 200 DPI (in proportion to the area at others):
# at most 2 px each (at a paper of 220-255 most are one pixel alone). Chosen on the samples' grey
# pages dithered and on scan_c's with its ink made as pale as a pencil's (grey 110 and 140): 2 px
# read the samples 41 of 42 right with 9 flagged (4 px: 41, 10), and the pale ink, whose strokes
# dither into dots too, without the field that 4 px let out wrong (a 9 thinned into a 7).
DITHER_DOT_PX = 2


def without_dither_dots(image: np.ndarray, dpi: float | None = None) -> np.ndarray:
    """A dithered bitonal page (H, W) uint8 (`is_dithered`) as a thresholding bitonal scanner
    would have given it: every black speck of at most DITHER_DOT_PX pixels made paper. What was
    dark enough to dither into joined dots (ink, the form's lines) stays.

    The samples' seven grey pages dithered (`benchmarks/evaluate_forms.py --dithered`): 41 of 42
    fields read right and 9 flagged, as the grey pages (41, 7); with the dots left in, 25 right
    and all 42 flagged, most for writing beyond their boxes' lines. Ink as pale as a pencil's
    dithers into dots as the paper does, and some of it goes with them (as a thresholding scanner
    drops it): scan_c so made reads 5 and 4 of its 6 fields right, the others flagged. (Blurring
    the dots back to grey instead spreads the print beyond its mask, and fields stayed flagged.)"""
    import cv2

    black = (image < 128).astype(np.uint8)
    _, labels, stats, _ = cv2.connectedComponentsWithStats(black, connectivity=8)
    dot = stats[:, cv2.CC_STAT_AREA] <= DITHER_DOT_PX * ((dpi or 200) / 200) ** 2
    dot[0] = False  # the paper
    out = image.copy()
    out[dot[labels]] = 255
    return out


@dataclass
class PageError:
    """A file or page that could not be read; page 0 means the whole file."""

    source: str
    page: int
    reason: str


@dataclass(frozen=True)
class PdfPage:
    """A PDF page to be read (decoded or rendered): deferred, so that it is read where it is
    segmented (a worker), not by the process that lists the batch's pages."""

    source: str
    page: int  # 1-based
    dpi: int
    # The page alone as a one-page PDF, for a worker that may not see `source` (a cluster's,
    # with no shared file system: `carried`); None: the worker reads `source` itself.
    data: bytes | None = None


@dataclass(frozen=True)
class ImageFrame:
    """A one-page image file (PNG, JPEG, a one-frame TIFF...) to be decoded where it is segmented,
    as a PdfPage is rendered there: the process that lists a batch reads only its header. (A
    multi-frame TIFF's frames are decoded as they are listed, in turn: a frame read on its own
    walks every frame before it, which for a 300-page TIFF cost 2.7 times the decoding.)"""

    source: str
    page: int  # 1
    dpi: float  # a JPEG scanned finer than this is decoded reduced (read_pages' reduce_jpeg); 0: whole
    data: bytes | None = None  # the file itself, for a worker that may not see `source` (`carried`)


def find_inputs(paths: list[Path]) -> list[Path]:
    """Files to read under `paths` (files or folders, recursively), in a stable sorted order:
    the first list of `scan_inputs`."""
    return scan_inputs(paths)[0]


def scan_inputs(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """(files to read, files left unread) under `paths` (files or folders, recursively), each in
    a stable sorted order, from one walk of the folders.

    Hidden files are skipped, and so are the folders of pictures a run's results keep beside
    them (`RESULTS_FOLDERS`); files of other types inside folders are left unread, and listed as
    such (not a PDF or an image it reads: a spreadsheet, a phone's HEIC photo) unless they are
    formreader's own results (`_results_stems`). A file named explicitly is always read, so that
    a wrong type is reported rather than silently ignored. Symlinked folders are followed (once
    each: a link loop ends there); a link that leads nowhere and a folder that cannot be listed
    are kept, so that reading them gives an error row rather than silence. A file reached twice
    (named twice, or by a folder and a glob) is read once.
    """
    found: list[Path] = []
    seen: set[str] = set()
    others: set[Path] = set()

    def add(f: Path) -> None:
        key = os.path.realpath(f)
        if key not in seen:
            seen.add(key)
            found.append(f)

    for p in paths:
        p = Path(p)
        if not p.is_dir():
            add(p)
            continue
        problems: list[Path] = []  # folders that could not be listed
        in_folder: list[Path] = []
        for f, of_results in _folder_files(p, problems):
            if f.suffix.lower() in SUFFIXES:
                in_folder.append(f)
            elif not of_results:
                others.add(f)
        for f in sorted(in_folder + problems):
            add(f)
    return found, sorted(others)


# What a run writing RESULTS.csv leaves beside it (formreader.export): RESULTS.manifest.json and,
# while it runs, RESULTS.journal.jsonl; the folders RESULTS.pages (the registered pages, JPEG) and
# RESULTS.corrections (digits a person corrected, PNG). Results written into the scans' folder
# must not be read as scans by the next run: they would add their pictures' pages to its rows.
RESULTS_MARKERS = (".manifest.json", ".journal.jsonl")
RESULTS_FOLDERS = (".pages", ".corrections")


def _results_stems(names: list[str]) -> set[str]:
    """The names (without endings) of the formreader results among a folder's file `names`."""
    return {name[: -len(marker)] for name in names for marker in RESULTS_MARKERS if name.endswith(marker)}


def _of_results(name: str, stems: set[str]) -> bool:
    """Whether a file or folder `name` is one of the results named by `stems`: RESULTS.anything."""
    return any(name.startswith(stem + ".") for stem in stems)


def _folder_files(folder: Path, problems: list[Path]) -> Iterator[tuple[Path, bool]]:
    """Every file under `folder` that is not hidden, nor in a hidden folder or a folder of
    formreader's results, and whether it is one of those results (known from its folder's own
    listing); symlinked folders followed once each. Folders that cannot be listed are added to
    `problems`."""
    visited: set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=True, onerror=lambda e: problems.append(Path(e.filename))):
        real = os.path.realpath(root)
        if real in visited:
            dirs[:] = []
            continue
        visited.add(real)
        stems = _results_stems(files)
        dirs[:] = [d for d in dirs if not d.startswith(".") and not (d.endswith(RESULTS_FOLDERS) and _of_results(d, stems))]
        yield from ((Path(root) / name, _of_results(name, stems)) for name in files if not name.startswith("."))


def count_pages(path: Path) -> int:
    """How many pages a file holds, cheaply (no page is decoded): for a progress bar. A file
    that cannot be opened counts as one (its error row)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
        if head.startswith(b"%PDF") or path.suffix.lower() == ".pdf":  # listed as read_pages lists them
            return max(1, len(_page_sizes(path) or _page_sizes_by_poppler(path)))
        with Image.open(path) as img:
            return max(1, int(getattr(img, "n_frames", 1)))
    except Exception:  # noqa: BLE001 - counting must never fail a run; reading reports the problem
        return 1


def read_pages(
    path: Path, pdf_dpi: int = 200, render: bool = True, reduce_jpeg: bool = False
) -> Iterator[Page | PdfPage | ImageFrame | PageError]:
    """Yield every page of one file, or a PageError for what cannot be read.

    PDFs are read one page at a time, so a long PDF never sits in memory whole: a scanned page
    is its image, at the scan's resolution; any other page is rendered by poppler at `pdf_dpi`
    (`render_pdf_page`). TIFFs yield every frame. With `render` False a PDF's pages come as
    PdfPage and a one-page image file as ImageFrame, to be read where they are to be segmented
    (a worker: `load_page`); only the file's header is read here. With `reduce_jpeg`, a JPEG file
    whose resolution is known and finer than `pdf_dpi` is decoded as a PDF's JPEG scan is, at
    the fewest eighths of its size that keep `pdf_dpi` (a 300-DPI photo at half size for a
    150-DPI form: a third of the decoding, and no resampling after it).
    """
    path = Path(path)
    source = str(path)
    if path.is_dir():
        try:
            os.listdir(path)
            reason = "is a folder, not a file"
        except OSError as e:
            reason = f"folder cannot be listed ({e.strerror or e})"
        yield PageError(source, 0, f"{reason}: its files were not read")
        return
    try:
        size = path.stat().st_size
    except OSError as e:
        link = " (a symbolic link to a file that does not exist)" if path.is_symlink() else ""
        yield PageError(source, 0, f"cannot open file: {e.strerror or e}{link}")
        return
    if size == 0:
        yield PageError(source, 0, "empty file (0 bytes)")
        return
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"%PDF") or path.suffix.lower() == ".pdf":
        yield from _read_pdf(path, pdf_dpi, render)
    else:
        yield from _read_image(path, pdf_dpi if reduce_jpeg else 0, render)


def _read_pdf(path: Path, dpi: int, render: bool) -> Iterator[Page | PdfPage | PageError]:
    source = str(path)
    sizes = _page_sizes(path)
    if sizes is None:
        try:
            sizes = _page_sizes_by_poppler(path)
        except _UnreadablePdfError as e:
            yield PageError(source, 0, str(e))
            return
    for number, (width_pt, height_pt) in enumerate(sizes, 1):
        # Every page's own size, before it is rendered: one huge page among small ones.
        w_px, h_px = width_pt * dpi / 72, height_pt * dpi / 72
        if max(w_px, h_px) > MAX_SIDE_PX or w_px * h_px > MAX_PAGE_PIXELS:
            yield PageError(source, number, f"PDF page too large: {width_pt:.0f}x{height_pt:.0f} pt at {dpi} DPI is "
                            f"{w_px * h_px / 1e6:.0f} megapixels (limit {MAX_PAGE_PIXELS / 1e6:.0f})")
            continue
        task = PdfPage(source, number, dpi)
        yield render_pdf_page(task) if render else task


def _page_sizes(path: Path) -> list[tuple[float, float]] | None:
    """Every page's size in points (its crop box, which poppler renders), read by pikepdf from the
    page tree: a fraction of a millisecond, where poppler's pdfinfo is a process of its own (5 ms
    a file, which a folder of one-page PDFs paid once a page). None where pikepdf cannot open the
    file as it is (no repairs: a truncated file's surviving pages are not a batch's pages) or
    finds no page: poppler is asked, and says what is wrong."""
    import pikepdf

    try:
        with pikepdf.open(path, attempt_recovery=False) as pdf:
            sizes = []
            for page in pdf.pages:
                x0, y0, x1, y1 = (float(v) for v in page.cropbox)
                sizes.append((abs(x1 - x0), abs(y1 - y0)))
    except Exception:  # noqa: BLE001 - whatever qpdf refuses, poppler is asked about
        return None
    return sizes or None


class _UnreadablePdfError(Exception):
    """A PDF poppler cannot list: the message says why, in the user's words."""


def _page_sizes_by_poppler(path: Path) -> list[tuple[float, float]]:
    """Every page's size in points by poppler's pdfinfo (one call: the page count and every
    page's size); _UnreadablePdfError, saying why, for an encrypted, empty or damaged PDF."""
    from pdf2image import pdfinfo_from_path
    from pdf2image.exceptions import PDFPageCountError, PDFSyntaxError

    try:
        info = pdfinfo_from_path(str(path), first_page=1, last_page=MAX_PDF_PAGES)
        pages = int(info["Pages"])
    except (PDFPageCountError, PDFSyntaxError, KeyError, ValueError) as e:
        message = str(e)
        if "password" in message.lower() or "encrypt" in message.lower():
            raise _UnreadablePdfError("encrypted PDF: a password is needed to read it") from e
        if "page count 0" in message:  # poppler's word for a well-formed PDF of no pages
            raise _UnreadablePdfError("the PDF has no pages") from e
        raise _UnreadablePdfError(f"not a readable PDF (damaged or truncated): {_first_line(message)}") from e
    return [_page_size_points(info.get(f"Page {number:4d} size", "")) for number in range(1, pages + 1)]


def render_pdf_page(task: PdfPage) -> Page | PageError:
    """One PDF page in grey. A scanned page (one image over the whole page) is its image,
    decoded straight from the file at the scan's own resolution (`scanned_image`); any other page
    is rendered at `task.dpi` by poppler's pdftoppm (its PGM read from the pipe: no temporary
    files, and no second poppler call per page for the page count)."""
    scanned = scanned_image(task.source, task.page, task.dpi, task.data)
    if scanned is not None:
        return scanned
    # Carried (task.data): poppler reads the one-page PDF from its standard input.
    number, source = (1, "-") if task.data is not None else (task.page, task.source)
    try:
        done = subprocess.run(
            ["pdftoppm", "-gray", "-r", str(task.dpi), "-f", str(number), "-l", str(number), source],
            input=task.data, capture_output=True, timeout=120, check=False,
        )
    except subprocess.TimeoutExpired:
        return PageError(task.source, task.page, "page could not be rendered: poppler took longer than 120 s")
    except OSError as e:
        return PageError(task.source, task.page, f"page could not be rendered: cannot run pdftoppm ({e.strerror or e})")
    if done.returncode != 0 or not done.stdout:
        reason = _first_line(done.stderr.decode("utf-8", "replace")) if done.stderr.strip() else "poppler returned nothing"
        return PageError(task.source, task.page, f"page could not be rendered: {reason}")
    try:
        with Image.open(io.BytesIO(done.stdout)) as img:
            return Page(np.asarray(img.convert("L")).copy(), float(task.dpi), task.source, task.page)
    except (OSError, ValueError) as e:
        return PageError(task.source, task.page, f"page could not be rendered: {_first_line(str(e))}")


# What a scanned page's image is decoded from; anything else (JPEG 2000, JBIG2...) poppler renders.
SCAN_FILTERS = {"/DCTDecode", "/FlateDecode", "/CCITTFaxDecode"}
SCAN_COLOURS = {"/DeviceGray", "/DeviceRGB"}
# libjpeg-turbo scales a JPEG while decoding it, by any of 1/8, 2/8, ... 8/8: far cheaper than
# decoding it whole and resampling it (a 200-DPI page to a 150-DPI template: 4.5 ms against
# 8.4). (A PDF reader ignores a JPEG's own orientation tag; simplejpeg reads none.)
JPEG_SCALES = tuple(range(1, 9))  # eighths
MAX_SCAN_CONTENT_BYTES = 1024
ALIGNMENT_PT = 0.05  # how far (in points) the image may be from covering the page exactly


def load_page(task: PdfPage | ImageFrame) -> Page | PageError:
    """A page listed by `read_pages(render=False)`, read: a PDF's rendered or decoded
    (`render_pdf_page`), an image file's frame decoded (`decode_frame`)."""
    return render_pdf_page(task) if isinstance(task, PdfPage) else decode_frame(task)


def carried(task: PdfPage | ImageFrame) -> PdfPage | ImageFrame | PageError:
    """The task with its page in it, for a worker that may not see the file: a cluster's machines
    share no file system with the one that lists the batch. A PDF's page is copied out as a
    one-page PDF (`PdfPage.data`: a scanned page is its compressed image and a few hundred
    bytes), a one-page image file goes whole (`ImageFrame.data`, still compressed); a
    multi-frame TIFF's frames are listed decoded (`read_pages`), and their pixels travel. A PDF
    page that cannot be copied is left as it is: the worker reads the file, or says why it
    cannot."""
    if isinstance(task, ImageFrame):
        try:
            return ImageFrame(task.source, task.page, task.dpi, Path(task.source).read_bytes())
        except OSError as e:
            return PageError(task.source, task.page, f"cannot open image: {e.strerror or e}")
    import pikepdf

    try:
        with pikepdf.open(task.source) as pdf, pikepdf.new() as one:
            one.pages.append(pdf.pages[task.page - 1])
            buffer = io.BytesIO()
            one.save(buffer)
    except Exception:  # noqa: BLE001 - the file's own errors are the worker's to report, as for any page
        return task
    return PdfPage(task.source, task.page, task.dpi, buffer.getvalue())


def scanned_image(source: str, number: int, dpi: float = 0, data: bytes | None = None) -> Page | None:
    """Page `number` (1-based) of a PDF as the scan it holds, decoded straight from the file: about
    2 ms for a JPEG page where poppler takes 25 ms to render it, and no resampling of the scan.
    A JPEG scanned finer than `dpi` is decoded at the fewest eighths of its size that keep it at
    `dpi` (a 200-DPI scan at 6/8 for a 150-DPI template: then it needs no resampling at all).

    Only for a page that is nothing but one image drawn upright over the whole page, as
    scanners, img2pdf and Pillow write them: its content stream is `q`, `cm`, `Do`, `Q`; the image
    is 8-bit grey or RGB (JPEG or Flate) or 1-bit grey (CCITT or Flate), with no mask and no
    decode array; the page's /Rotate is applied. The resolution is the scan's, from its pixels and
    the page's size. Anything else (text, drawings, several images, a crop box, a scan placed in
    a margin...) gives None, and poppler renders the page as printed. With `data` (the page
    alone as a one-page PDF, `carried`), that is read instead of the file."""
    import pikepdf

    try:
        with pikepdf.open(io.BytesIO(data) if data is not None else source) as pdf:
            page = pdf.pages[0 if data is not None else number - 1]
            x0, y0, x1, y1 = (float(v) for v in page.mediabox)
            rotate = int(page.obj.get("/Rotate", 0)) % 360
            image = _lone_full_page_image(page)
            grey = None if image is None or rotate % 90 else _decode_scan(image, x1 - x0, dpi)
    except Exception:  # noqa: BLE001 - anything unexpected here is poppler's to render (or report)
        return None
    if grey is None:
        return None
    dpi_x, dpi_y = grey.shape[1] * 72 / abs(x1 - x0), grey.shape[0] * 72 / abs(y1 - y0)
    if abs(dpi_x - dpi_y) > 0.01 * dpi_x:  # pixels that are not square: poppler resamples
        return None
    # /Rotate turns the page clockwise for display, as poppler renders it.
    return Page(np.ascontiguousarray(np.rot90(grey, k=-(rotate // 90))), round(dpi_x, 2), source, number)


def _lone_full_page_image(page) -> object | None:
    """The image XObject that a page consists of, when the page draws it, and only it, over the
    whole media box with no rotation or flip; else None."""
    from pikepdf import Array, Name, parse_content_stream

    box = [float(v) for v in page.mediabox]
    if "/CropBox" in page.obj and [float(v) for v in page.obj.CropBox] != box:
        return None
    # Drawing one image takes a few dozen bytes: a longer content stream (text, vector drawing)
    # is not parsed at all.
    contents = page.obj.get("/Contents")
    streams = contents if isinstance(contents, Array) else [contents] if contents is not None else []
    if sum(int(stream.get("/Length", 0)) for stream in streams) > MAX_SCAN_CONTENT_BYTES:
        return None
    drawn, matrix, saved = [], [1.0, 0, 0, 1.0, 0, 0], []
    for operands, operator in parse_content_stream(page):
        op = str(operator)
        if op == "q":
            saved.append(matrix)
        elif op == "Q":
            matrix = saved.pop() if saved else matrix
        elif op == "cm":
            a, b, c, d, e, f = (float(v) for v in operands)
            m = matrix
            matrix = [a * m[0] + b * m[2], a * m[1] + b * m[3], c * m[0] + d * m[2], c * m[1] + d * m[3],
                      e * m[0] + f * m[2] + m[4], e * m[1] + f * m[3] + m[5]]
        elif op == "Do":
            drawn.append((operands[0], matrix))
        else:
            return None
    if len(drawn) != 1:
        return None
    name, (a, b, c, d, e, f) = drawn[0]
    placed = [e, f, e + a, f + d]
    if abs(b) > 1e-6 or abs(c) > 1e-6 or max(abs(p - q) for p, q in zip(placed, box)) > ALIGNMENT_PT:
        return None
    image = page.resources.get("/XObject", {}).get(name)
    if image is None or image.get("/Subtype") != Name.Image:
        return None
    return image


def _decode_scan(image, width_pt: float, dpi: float) -> np.ndarray | None:
    """An image XObject's pixels as grey (H, W) uint8, for the kinds a scan is stored as; else None.
    A JPEG is decoded at the fewest eighths of its size (JPEG_SCALES) that keep it at `dpi` or
    more (within 1%), on a page `width_pt` wide."""
    import pikepdf

    filters = image.get("/Filter")
    filters = [str(f) for f in (filters if isinstance(filters, pikepdf.Array) else [filters] if filters else [])]
    colour = image.get("/ColorSpace")
    bits = int(image.get("/BitsPerComponent", 0))
    w, h = int(image.Width), int(image.Height)
    if len(filters) != 1 or filters[0] not in SCAN_FILTERS or str(colour) not in SCAN_COLOURS:
        return None
    # 8-bit grey or colour (JPEG, Flate); 1-bit black and white (CCITT, Flate).
    eight = bits == 8 and filters[0] != "/CCITTFaxDecode"
    one = bits == 1 and str(colour) == "/DeviceGray" and filters[0] != "/DCTDecode"
    masked = any(k in image for k in ("/ImageMask", "/Mask", "/SMask", "/Decode"))
    if not (eight or one) or masked or max(w, h) > MAX_SIDE_PX or w * h > MAX_PAGE_PIXELS:
        return None
    if filters[0] != "/DCTDecode":
        grey = _to_grey(pikepdf.PdfImage(image).as_pil_image())
        return grey if grey.shape == (h, w) else None
    return _decode_jpeg(image.read_raw_bytes(), (h, w), _jpeg_eighths(w * 72 / abs(width_pt), dpi))


def _jpeg_eighths(scan_dpi: float, dpi: float) -> int:
    """The fewest eighths of a JPEG's size (JPEG_SCALES) that keep a scan of `scan_dpi` at `dpi`
    or more (within 1%); 8 (full size) when `dpi` is 0."""
    return next((m for m in JPEG_SCALES if dpi and scan_dpi * m / 8 >= 0.99 * dpi), 8)


def _decode_jpeg(data: bytes, shape: tuple[int, int], eighths: int) -> np.ndarray | None:
    """A JPEG of `shape` (H, W) decoded to grey (h, w) uint8 at `eighths` of its size (libjpeg
    scales in the DCT: the reduction costs less than decoding whole), or None where the decoder
    gives another size."""
    import simplejpeg

    size = (-(-shape[0] * eighths // 8), -(-shape[1] * eighths // 8))
    grey = simplejpeg.decode_jpeg(data, colorspace="GRAY", min_height=size[0], min_width=size[1])
    return grey[..., 0] if grey.shape[:2] == size else None


def _read_image(path: Path, dpi: float = 0, render: bool = True) -> Iterator[Page | ImageFrame | PageError]:
    """The frames of an image file (a one-frame file as an ImageFrame task where not `render`); a
    JPEG finer than `dpi` (when not 0) decoded reduced (read_pages)."""
    source = str(path)
    try:
        img = Image.open(path)
    except UnidentifiedImageError:
        yield PageError(source, 0, f"not an image file: content is not PDF, TIFF, PNG, JPEG or another image format read "
                        f"(suffix {path.suffix!r})")
        return
    except Image.DecompressionBombError as e:  # Pillow's own limit, met before ours when opening
        yield PageError(source, 0, f"image too large: {_first_line(str(e))}")
        return
    except OSError as e:
        yield PageError(source, 0, f"cannot open image: {e}")
        return
    with img:
        w, h = img.size
        if max(w, h) > MAX_SIDE_PX or w * h > MAX_PAGE_PIXELS:
            yield PageError(source, 0, f"image too large: {w}x{h} px (limit {MAX_SIDE_PX} px a side, "
                            f"{MAX_PAGE_PIXELS / 1e6:.0f} megapixels)")
            return
        frames = getattr(img, "n_frames", 1)
        if frames == 1 and not render:
            yield ImageFrame(source, 1, dpi)
            return
        for number in range(1, frames + 1):
            yield _frame(img, number, source, dpi, path.read_bytes)


def decode_frame(task: ImageFrame) -> Page | PageError:
    """A one-page image file in grey, as `read_pages` decodes it, from the file or the bytes the
    task carries."""
    data = task.data
    try:
        img = Image.open(io.BytesIO(data) if data is not None else task.source)
    except (OSError, Image.DecompressionBombError) as e:
        return PageError(task.source, task.page, f"cannot open image: {_first_line(str(e))}")
    with img:
        return _frame(img, task.page, task.source, task.dpi, (lambda: data) if data is not None else Path(task.source).read_bytes)


def _frame(img: Image.Image, number: int, source: str, dpi: float, load: Callable[[], bytes]) -> Page | PageError:
    """Frame `number` of an open image in grey; a single JPEG finer than `dpi` decoded reduced
    from its bytes (`load()`)."""
    reduced = _reduced_jpeg(img, dpi, load, source) if dpi and number == 1 else None
    if reduced is not None:
        return reduced
    try:
        img.seek(number - 1)
        grey, (dpi_x, dpi_y) = _to_grey(img), _image_dpis(img)
        if _oblong(dpi_x, dpi_y):
            squared = grey.size * max(dpi_x, dpi_y) / min(dpi_x, dpi_y)
            if squared > MAX_PAGE_PIXELS:
                return PageError(source, number, f"image too large: {grey.shape[1]}x{grey.shape[0]} px at {dpi_x:g} x {dpi_y:g} "
                                 f"DPI would be {squared / 1e6:.0f} megapixels once its pixels are made square "
                                 f"(limit {MAX_PAGE_PIXELS / 1e6:.0f}): are its DPI tags right?")
            return Page(square_pixels(grey, dpi_x, dpi_y), max(dpi_x, dpi_y), source, number)
        return Page(grey, dpi_x, source, number)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return PageError(source, number, f"image data damaged or truncated: {_first_line(str(e))}")


def _reduced_jpeg(img: Image.Image, dpi: float, load: Callable[[], bytes], source: str) -> Page | None:
    """A JPEG file's page decoded from its bytes (`load()`) at the fewest eighths of its size that
    keep `dpi`, where that is less than its size; None where it is not, or where the file is no
    plain grey or colour JPEG of known, square resolution upright as stored (PIL then reads it
    whole, as any image)."""
    if img.format != "JPEG" or img.mode not in ("L", "RGB"):
        return None  # asked first: another format's EXIF may lie after its pixels, and asking for it decodes them
    scan_dpi = _image_dpi(img)
    square = scan_dpi is not None and abs(float(img.info["dpi"][1]) - scan_dpi) <= 0.01 * scan_dpi
    if not square or img.getexif().get(EXIF_ORIENTATION, 1) != 1:
        return None
    eighths = _jpeg_eighths(scan_dpi, dpi)
    if eighths == 8:
        return None
    try:
        grey = _decode_jpeg(load(), (img.height, img.width), eighths)
    except (OSError, ValueError):  # simplejpeg's errors are ValueErrors; PIL then reports the damage
        return None
    return None if grey is None else Page(grey, round(scan_dpi * eighths / 8, 2), source, 1)


def decode_image(data: bytes, max_pixels: int = MAX_PAGE_PIXELS) -> np.ndarray:
    """Decode one image held in memory (PNG, JPEG, TIFF first frame) into grey (H, W) uint8.
    Raises OverflowError, before decoding, for an image of more than `max_pixels`."""
    with Image.open(io.BytesIO(data)) as img:
        w, h = img.size
        if w * h > max_pixels:
            raise OverflowError(f"image too large: {w}x{h} px (limit {max_pixels / 1e6:g} megapixels)")
        return _to_grey(img)


def _to_grey(img: Image.Image) -> np.ndarray:
    img = ImageOps.exif_transpose(img) if "exif" in img.info else img
    if img.mode in ("RGBA", "LA", "P"):
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    if img.mode.startswith("I;16"):  # 16-bit grey: the full range is 0-65535
        return np.round(np.asarray(img, dtype=np.float64) / 257).astype(np.uint8)
    if img.mode in ("I", "F"):  # 32-bit integer or float grey: scaled by its own range
        arr = np.asarray(img, dtype=np.float64)
        finite = arr[np.isfinite(arr)]
        unit = finite.size and 0 <= finite.min() and finite.max() <= 1.0  # a float image in [0, 1]
        top = 1.0 if unit or not finite.size else max(float(finite.max()), 1.0)
        return np.round(255 * np.clip(np.nan_to_num(arr / top, nan=1.0), 0, 1)).astype(np.uint8)
    return np.asarray(img.convert("L")).copy()


def _image_dpi(img: Image.Image) -> float | None:
    """An image's resolution where it was measured and its pixels are square; else None."""
    dpi_x, dpi_y = _image_dpis(img)
    return None if _oblong(dpi_x, dpi_y) else dpi_x


def _oblong(dpi_x: float | None, dpi_y: float | None) -> bool:
    """Whether both resolutions are measured and differ by more than 1%: pixels not square."""
    return bool(dpi_x and dpi_y and abs(dpi_x - dpi_y) > 0.01 * max(dpi_x, dpi_y))


def _image_dpis(img: Image.Image) -> tuple[float | None, float | None]:
    """An image's horizontal and vertical resolution as the page lies once turned upright by its
    EXIF orientation (which `_to_grey` applies), each None where the file does not measure it."""
    dpi = img.info.get("dpi")
    try:
        values = [float(dpi[0]), float(dpi[1])] if dpi else [None, None]
    except (TypeError, ValueError, IndexError):
        return None, None
    # 72 and 96 DPI are what software writes when nobody measured anything.
    dpi_x, dpi_y = (v if v and v >= MIN_DPI and round(v) not in (72, 96) else None for v in values)
    if "exif" in img.info and img.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):  # turned a quarter
        return dpi_y, dpi_x
    return dpi_x, dpi_y


def square_pixels(page: np.ndarray, dpi_x: float, dpi_y: float) -> np.ndarray:
    """A page (H, W) uint8 scanned at one resolution across and another down, resampled to
    square pixels at the finer of the two: (H', W'). A fax in standard mode is 204 x 98 DPI, each
    pixel twice as tall as wide; read as it is stored, every digit is squashed to half its height
    and the page registers to no template. A bitonal page stays bitonal (nearest neighbour), so
    that it is read and calibrated as the bitonal scan it is."""
    import cv2

    finest = max(dpi_x, dpi_y)
    h, w = page.shape
    size = (max(1, round(w * finest / dpi_x)), max(1, round(h * finest / dpi_y)))
    return cv2.resize(page, size, interpolation=cv2.INTER_NEAREST if is_bitonal(page) else cv2.INTER_LINEAR)


def _page_size_points(text: str) -> tuple[float, float]:
    try:
        parts = text.split()
        return float(parts[0]), float(parts[2])
    except (IndexError, ValueError):
        return 612.0, 792.0


def _first_line(message: str) -> str:
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return lines[0] if lines else "unknown error"


def grey_crop(crop: np.ndarray) -> np.ndarray:
    """An image array handed in by a program, as the reading stages take it: (H, W) uint8, dark
    ink on light paper.

    crop: (H, W) grey, (H, W, 3) RGB or (H, W, 4) RGBA (laid on white paper); bool (True: ink),
    and integers of 0 and 1 only likewise (a mask stored as uint8, 1: ink); uint8, uint16
    (0-65535), other integers (0-255, or their own range beyond it), or floats (0-1; -1 to 1,
    as USPS's digits come, when any pixel is below 0; 0-255 when any is above 1). Light ink on
    dark paper, as MNIST's own arrays are, is turned over: when most of the crop's outermost
    pixels, and most of all its pixels, are darker than halfway between its darkest and
    lightest, the dark is the paper (a digit is thinner than the paper around it); of crops of
    one shape handed in together (`grey_crops`), also one whose digit covers most of it, where
    most of the others are so.
    Raises ValueError saying what is wrong with any other array.
    """
    return grey_crops([crop])[0]


def grey_crops(crops: list[np.ndarray]) -> list[np.ndarray]:
    """`grey_crop` of each of several crops; those of one shape are looked at together (a batch
    of 10,000 digits in milliseconds). A ValueError names the first crop that is no image."""
    out = []
    for k, crop in enumerate(crops):
        try:
            out.append(_grey_pixels(crop))
        except ValueError as e:
            raise ValueError(f"crop {k}: {e}" if len(crops) > 1 else str(e)) from None
    by_shape: dict[tuple[int, int], list[int]] = {}
    for k, a in enumerate(out):
        by_shape.setdefault(a.shape, []).append(k)
    for members in by_shape.values():
        stack = np.stack([out[k] for k in members])
        lo, hi = stack.min(axis=(1, 2)).astype(np.int16), stack.max(axis=(1, 2)).astype(np.int16)
        # uint8 crops of 0 and 1 only are masks (_grey_pixels turns other integers so itself).
        for k in np.flatnonzero(hi <= 1):
            out[members[k]] = stack[k] = np.where(stack[k] > 0, 0, 255).astype(np.uint8)
            lo[k], hi[k] = stack[k].min(), stack[k].max()
        middle = (lo + hi) / 2
        ring = np.concatenate([stack[:, 0], stack[:, -1], stack[:, :, 0], stack[:, :, -1]], axis=1)
        edge_dark = np.flatnonzero((hi - lo >= 16) & ((ring < middle[:, None]).mean(axis=1) > 0.5))
        if not len(edge_dark):
            continue
        mostly_dark = (stack[edge_dark] < middle[edge_dark, None, None]).mean(axis=(1, 2)) > 0.5
        # Crops of one shape handed in together come from one source: where most of those with a
        # dark edge are dark all over, a bold digit that covers most of its crop (a 0 or an 8 cut
        # tight, as USPS's are) lies on the same dark paper.
        for k in edge_dark if mostly_dark.mean() > 0.5 else edge_dark[mostly_dark]:
            out[members[k]] = 255 - out[members[k]]
    return out


def _grey_pixels(crop: np.ndarray) -> np.ndarray:
    """A crop's pixels as (H, W) uint8 (see `grey_crop`), either polarity."""
    a = np.asarray(crop)
    if a.ndim == 3 and a.shape[2] in (3, 4):
        alpha = _unit_range(a[..., 3]) if a.shape[2] == 4 else 1.0
        a = (_unit_range(a[..., :3]) @ np.array([0.299, 0.587, 0.114])) * alpha + (1.0 - alpha)
    elif a.ndim != 2:
        raise ValueError(f"an image of shape {a.shape}: expected (H, W) grey, or (H, W, 3) RGB / (H, W, 4) RGBA")
    if a.size == 0:
        raise ValueError(f"an empty image (shape {a.shape})")
    if a.dtype == bool:
        return np.where(a, 0, 255).astype(np.uint8)
    if a.dtype != np.uint8 and np.issubdtype(a.dtype, np.integer) and a.min() >= 0 and a.max() <= 1:
        # Integers of 0 and 1 only are a mask (thresholded, then stored so): no scan or rendering
        # has one grey level of range. (uint8 ones: grey_crops, all of a batch at once.)
        return np.where(a > 0, 0, 255).astype(np.uint8)
    if a.dtype != np.uint8:
        return np.round(255 * _unit_range(a)).astype(np.uint8)
    return a


def _unit_range(a: np.ndarray) -> np.ndarray:
    """Pixel values of any numeric type as float64 in [0, 1] (see `grey_crop`)."""
    if a.dtype == bool:
        return a.astype(np.float64)
    if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
        raise ValueError(f"pixels of type {a.dtype}: expected numbers")
    f = a.astype(np.float64)
    if not np.isfinite(f).all():
        raise ValueError("an image with NaN or infinite pixels")
    if a.dtype == np.uint8:
        return f / 255
    if a.dtype == np.uint16:
        return f / 65535
    floating = np.issubdtype(a.dtype, np.floating)
    if floating and -1.0 <= f.min() < 0 and f.max() <= 1.0:
        return (f + 1) / 2
    if f.min() < 0:
        raise ValueError(f"negative pixel values (down to {f.min():g}): expected 0-1, -1 to 1, 0-255 or 0-65535")
    top = 1.0 if floating and f.max() <= 1.0 else 255.0 if f.max() <= 255 else f.max()
    return f / top
