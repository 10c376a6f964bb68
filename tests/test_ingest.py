"""Ingest: real PDFs rendered by poppler, multi-frame TIFFs, PNG and JPEG, and bad files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from formreader.reading.ingest import Page, PageError, PdfPage, find_inputs, is_bitonal, read_pages, scan_inputs

from .conftest import BAD_INPUTS, SCANS, TEMPLATE, run_cli, write_bad_inputs


def pages(path: Path, dpi: int = 150) -> list:
    return list(read_pages(path, pdf_dpi=dpi))


def test_pdf_every_page_read():
    got = pages(SCANS / "batch_a.pdf")
    assert [p.page for p in got] == [1, 2, 3, 4]
    assert all(isinstance(p, Page) and p.image.dtype == np.uint8 and p.image.ndim == 2 for p in got)
    # The scans were embedded at 150 DPI on a bed of 1290x909 px: rendering at 150 gives that back.
    assert all(abs(p.image.shape[1] - 1289) <= 2 and abs(p.image.shape[0] - 908) <= 2 for p in got)
    assert got[0].dpi == 150
    # Different pages, not the same one four times.
    assert np.abs(got[0].image.astype(int) - got[1].image.astype(int)).mean() > 1


def test_pdf_read_at_requested_resolution():
    # The 150-DPI JPEG scans are decoded at half their size (libjpeg's reduced decoding).
    (first, *_) = pages(SCANS / "batch_a.pdf", dpi=75)
    assert abs(first.image.shape[1] - 645) <= 2 and first.dpi == pytest.approx(75, abs=0.1)


def pdf_of_scan(path: Path, scan: np.ndarray, dpi: float, encoding: str = "jpeg", rotate: int = 0,
                content: bytes = b"", placed: tuple[float, float, float, float] | None = None) -> bytes:
    """Write a one-page PDF holding the grey `scan` as a scanner writes it: the image over the
    whole page. `content` is drawn after it; `placed` (x, y, w, h in points) puts the image
    elsewhere on the page. Returns the image's encoded bytes."""
    import zlib

    import cv2
    import pikepdf
    from pikepdf import Dictionary, Name

    h, w = scan.shape
    if encoding == "jpeg":
        data, codec = cv2.imencode(".jpg", scan, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes(), Name.DCTDecode
    else:
        data, codec = zlib.compress(scan.tobytes()), Name.FlateDecode
    pdf = pikepdf.new()
    image = pikepdf.Stream(pdf, data, Type=Name.XObject, Subtype=Name.Image, Width=w, Height=h,
                           ColorSpace=Name.DeviceGray, BitsPerComponent=8, Filter=codec)
    width_pt, height_pt = w * 72 / dpi, h * 72 / dpi
    x, y, pw, ph = placed or (0, 0, width_pt, height_pt)
    drawing = f"q {pw:.4f} 0 0 {ph:.4f} {x:.4f} {y:.4f} cm /Im0 Do Q\n".encode() + content
    page = Dictionary(Type=Name.Page, MediaBox=[0, 0, width_pt, height_pt],
                      Resources=Dictionary(XObject=Dictionary(Im0=image)), Contents=pikepdf.Stream(pdf, drawing))
    if rotate:
        page.Rotate = rotate
    pdf.pages.append(pikepdf.Page(page))
    pdf.save(path)
    return data


def poppler(path: Path, dpi: float) -> np.ndarray:
    """The PDF's first page as poppler renders it."""
    import io
    import subprocess

    command = ["pdftoppm", "-gray", "-r", f"{dpi:g}", "-f", "1", "-l", "1", str(path)]
    done = subprocess.run(command, capture_output=True, check=True)
    return np.asarray(Image.open(io.BytesIO(done.stdout)).convert("L"))


@pytest.mark.parametrize("encoding", ["jpeg", "flate"])
def test_a_scanned_pdf_page_is_read_as_its_scan(tmp_path, encoding):
    import cv2

    (scan,) = (p.image for p in pages(SCANS / "scan_c.png"))  # a 200-DPI grey scan
    data = pdf_of_scan(tmp_path / "s.pdf", scan, 200, encoding)
    (page,) = pages(tmp_path / "s.pdf", dpi=200)
    assert page.dpi == pytest.approx(200, abs=0.01)
    # The scan's own pixels, decoded from the file: the JPEG as libjpeg decodes it, Flate exact.
    expected = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE) if encoding == "jpeg" else scan
    assert np.array_equal(page.image, expected)
    # What poppler renders differs only by its resampling (which smooths the scan's noise).
    rendered = poppler(tmp_path / "s.pdf", 200)
    assert rendered.shape == page.image.shape
    assert np.abs(rendered.astype(int) - page.image).mean() < 6


def test_a_bitonal_pdf_and_a_turned_page_are_read_as_poppler_shows_them(tmp_path):
    fax = next(iter(pages(SCANS / "fax_b.tif"))).image  # bitonal, 150 DPI
    Image.fromarray(fax).convert("1").save(tmp_path / "fax.pdf", resolution=150)  # CCITT G4, as Pillow writes it
    (page,) = pages(tmp_path / "fax.pdf", dpi=150)
    assert np.array_equal(page.image, fax)
    rendered = poppler(tmp_path / "fax.pdf", 150)  # a row more: poppler rounds the page's size up
    assert np.mean(rendered[: fax.shape[0], : fax.shape[1]] != page.image) < 0.03

    (scan,) = (p.image for p in pages(SCANS / "scan_c.png"))
    pdf_of_scan(tmp_path / "turned.pdf", scan, 200, "flate", rotate=90)
    (page,) = pages(tmp_path / "turned.pdf", dpi=200)
    assert np.array_equal(page.image, np.rot90(scan, -1))  # /Rotate 90: a quarter turn clockwise
    assert np.abs(poppler(tmp_path / "turned.pdf", 200).astype(int) - page.image).mean() < 6


@pytest.mark.parametrize(("name", "scan_dpi", "eighths"), [("scan_e.jpg", 300, 4), ("scan_c.png", 200, 6)])
def test_a_finer_jpeg_scan_is_decoded_at_the_resolution_asked(tmp_path, name, scan_dpi, eighths):
    import cv2

    from formreader.pipeline import scale_to_template
    from formreader.reading.template import load_template

    (scan,) = (p.image for p in pages(SCANS / name))
    pdf_of_scan(tmp_path / "s.pdf", scan, scan_dpi)
    (page,) = pages(tmp_path / "s.pdf", dpi=150)
    # libjpeg decodes it at a whole number of eighths of its size, rounded up: 4/8 of a 300-DPI
    # scan, 6/8 of a 200-DPI one.
    h, w = scan.shape
    assert page.image.shape == (-(-h * eighths // 8), -(-w * eighths // 8))
    assert page.dpi == pytest.approx(150, rel=0.01)
    assert scale_to_template(page.image, page.dpi, load_template(TEMPLATE)) is page.image  # nothing left to resample
    # The same pixels as the scan resampled by area to that scale, but for noise.
    reduced = cv2.resize(scan, None, fx=eighths / 8, fy=eighths / 8, interpolation=cv2.INTER_AREA)
    rows, cols = min(reduced.shape[0], page.image.shape[0]), min(reduced.shape[1], page.image.shape[1])
    assert np.abs(reduced[:rows, :cols].astype(int) - page.image[:rows, :cols]).mean() < 3


def test_a_finer_jpeg_file_is_decoded_reduced_as_a_pdf_scan_is(tmp_path):
    import cv2

    (whole,) = pages(SCANS / "scan_e.jpg")  # 300 DPI, read as it is by default
    (page,) = read_pages(SCANS / "scan_e.jpg", pdf_dpi=150, reduce_jpeg=True)
    h, w = whole.image.shape
    assert page.dpi == 150 and page.image.shape == (-(-h // 2), -(-w // 2))
    reduced = cv2.resize(whole.image, (page.image.shape[1], page.image.shape[0]), interpolation=cv2.INTER_AREA)
    assert np.abs(reduced.astype(int) - page.image).mean() < 3
    # At 200 DPI asked: the fewest eighths that keep it, 6/8 (225 DPI).
    (finer,) = read_pages(SCANS / "scan_e.jpg", pdf_dpi=200, reduce_jpeg=True)
    assert finer.dpi == 225 and finer.image.shape[1] == -(-w * 6 // 8)
    # Read whole: a photo the camera turned (EXIF orientation, which PIL applies), a JPEG of
    # unknown resolution, one no finer than asked.
    with Image.open(SCANS / "scan_e.jpg") as img:
        exif = img.getexif()
        exif[0x0112] = 6  # turned 90 degrees clockwise for display
        img.save(tmp_path / "turned.jpg", dpi=(300, 300), exif=exif)
        img.save(tmp_path / "unknown.jpg")
    (turned,) = read_pages(tmp_path / "turned.jpg", pdf_dpi=150, reduce_jpeg=True)
    assert turned.image.shape == (w, h)
    (unknown,) = read_pages(tmp_path / "unknown.jpg", pdf_dpi=150, reduce_jpeg=True)
    assert unknown.dpi is None and unknown.image.shape == (h, w)
    (phone,) = read_pages(SCANS / "phone_d.jpg", pdf_dpi=150, reduce_jpeg=True)
    assert phone.dpi == 150 and phone.image.shape == next(iter(pages(SCANS / "phone_d.jpg"))).image.shape


def test_a_carried_pdf_page_reads_as_the_file_does_where_the_file_is_not(tmp_path):
    """A cluster's worker may not see the file: the page travels as a one-page PDF (`carried`)."""
    import pikepdf

    from formreader.reading.ingest import carried, render_pdf_page

    (scan,) = (p.image for p in pages(SCANS / "scan_c.png"))
    # A JPEG scan and a Flate one (decoded), a stamped scan (rendered by poppler), in one PDF
    # whose pages are turned by a /Rotate they inherit from the page tree.
    jpeg = pdf_of_scan(tmp_path / "scan.pdf", scan, 200)
    pdf_of_scan(tmp_path / "flate.pdf", scan, 200, "flate")
    pdf_of_scan(tmp_path / "stamped.pdf", scan, 200, content=b"0 g 36 36 72 72 re f\n")
    with pikepdf.new() as pdf:
        for name in ("scan", "flate", "stamped"):
            with pikepdf.open(tmp_path / f"{name}.pdf") as one:
                pdf.pages.append(one.pages[0])
        pdf.Root.Pages.Rotate = 90
        pdf.save(tmp_path / "all.pdf")
    tasks = [PdfPage(str(tmp_path / "all.pdf"), k, 150) for k in (1, 2, 3)]
    direct = [render_pdf_page(t) for t in tasks]
    assert all(page.image.shape[0] > page.image.shape[1] for page in direct)  # a landscape scan turned, as poppler shows it
    travelling = [carried(t) for t in tasks]
    (tmp_path / "all.pdf").rename(tmp_path / "elsewhere.pdf")
    assert all(t.data for t in travelling)
    assert len(travelling[0].data) < len(jpeg) + 2000  # a scanned page travels as its JPEG, not its pixels
    for task, want in zip(travelling, direct):
        got = render_pdf_page(task)
        assert (got.source, got.page, got.dpi) == (want.source, want.page, want.dpi)
        assert np.array_equal(got.image, want.image)
    assert render_pdf_page(tasks[0]).reason.startswith("page could not be rendered")  # the file itself is gone


def test_image_files_are_listed_here_and_decoded_where_they_are_read(tmp_path):
    """`read_pages(render=False)` lists a one-page image file (ImageFrame) from its header; a
    worker decodes it (`load_page`) as `read_pages` does, from the file or, carried, without it.
    A multi-frame TIFF's frames come decoded, in turn."""
    from formreader.reading.ingest import ImageFrame, carried, load_page

    names = ("scan_e.jpg", "scan_c.png")
    for name in (*names, "fax_b.tif"):
        shutil.copy(SCANS / name, tmp_path / name)
    want = {name: list(read_pages(tmp_path / name, pdf_dpi=150, reduce_jpeg=True)) for name in names}
    tasks = {name: list(read_pages(tmp_path / name, pdf_dpi=150, render=False, reduce_jpeg=True)) for name in names}
    assert all(len(ts) == 1 and isinstance(ts[0], ImageFrame) and ts[0].data is None for ts in tasks.values())
    tiff = list(read_pages(tmp_path / "fax_b.tif", pdf_dpi=150, render=False))
    assert [(type(p), p.page) for p in tiff] == [(Page, 1), (Page, 2), (Page, 3)]
    travelling = {name: [carried(t) for t in ts] for name, ts in tasks.items()}
    sizes = [(tmp_path / n).stat().st_size for n in names]
    assert [len(t.data) for n in names for t in travelling[n]] == sizes  # the file whole, compressed
    read_here = {name: [load_page(t) for t in ts] for name, ts in tasks.items()}
    for name in names:
        (tmp_path / name).rename(tmp_path / f"gone_{name}")
    for name, pages_wanted in want.items():
        for got in (read_here[name], [load_page(t) for t in travelling[name]]):
            assert [(p.source, p.page, p.dpi) for p in got] == [(p.source, p.page, p.dpi) for p in pages_wanted]
            assert all(np.array_equal(a.image, b.image) for a, b in zip(got, pages_wanted))
    assert want["scan_e.jpg"][0].dpi == 150  # the 300-DPI JPEG decoded at half its size, wherever
    (gone,) = [load_page(t) for t in tasks["scan_c.png"]]
    assert isinstance(gone, PageError) and "cannot open image" in gone.reason


def test_a_sound_pdf_is_listed_without_starting_poppler(monkeypatch):
    """Its pages (and their sizes, for the size limit) come from its page tree; poppler, a process
    a file, is asked only about what qpdf will not open as it is (test_bad_files_give_specific_errors)."""
    import pdf2image

    def no_poppler(*args, **kwargs):
        raise AssertionError("pdfinfo started")

    monkeypatch.setattr(pdf2image, "pdfinfo_from_path", no_poppler)
    tasks = list(read_pages(SCANS / "batch_a.pdf", pdf_dpi=150, render=False))
    assert [t.page for t in tasks] == [1, 2, 3, 4] and all(isinstance(t, PdfPage) for t in tasks)
    big = list(read_pages(SCANS / "batch_a.pdf", pdf_dpi=4000, render=False))  # 8.6 x 6.1 in: 34,000 px wide at 4,000 DPI
    assert all(isinstance(e, PageError) and "PDF page too large" in e.reason for e in big)


def test_a_page_that_is_more_than_a_scan_is_rendered_as_printed(tmp_path):
    (scan,) = (p.image for p in pages(SCANS / "scan_c.png"))
    h, w = scan.shape
    # A black square drawn over the scan (a stamp, a redaction): the page is rendered, square
    # and all, at the resolution asked for.
    pdf_of_scan(tmp_path / "stamped.pdf", scan, 200, content=b"0 g 36 36 72 72 re f\n")
    (page,) = pages(tmp_path / "stamped.pdf", dpi=100)
    assert page.dpi == 100 and abs(page.image.shape[1] - w / 2) <= 1
    bottom = page.image.shape[0]
    assert page.image[bottom - 145 : bottom - 55, 55:145].max() < 30  # the square: 0.5-1.5 in from the corner
    # A scan placed in a corner of a larger page: the page is rendered, paper around the scan.
    pdf_of_scan(tmp_path / "placed.pdf", scan, 200, placed=(0, 0, w * 36 / 200, h * 36 / 200))
    (page,) = pages(tmp_path / "placed.pdf", dpi=100)
    assert page.dpi == 100 and abs(page.image.shape[1] - w / 2) <= 1
    assert page.image[: page.image.shape[0] // 3].min() > 240  # the top of the page is blank paper


def test_tiff_every_frame():
    got = pages(SCANS / "fax_b.tif")
    assert [p.page for p in got] == [1, 2, 3]
    assert set(np.unique(got[0].image)) <= {0, 255}  # bilevel fax
    assert got[0].dpi == 150


def test_png_and_jpeg_with_resolution():
    (png,) = pages(SCANS / "scan_c.png")
    (jpg,) = pages(SCANS / "scan_e.jpg")
    assert png.dpi == pytest.approx(200, abs=1) and png.image.ndim == 2
    assert jpg.dpi == 300 and jpg.image.shape[1] > 2400


def test_find_inputs_recursive_stable_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.PNG").write_bytes(b"x")
    (tmp_path / "b" / "c.pdf").write_bytes(b"x")
    (tmp_path / "b" / "notes.txt").write_text("x")
    (tmp_path / ".hidden.png").write_bytes(b"x")
    assert [p.relative_to(tmp_path).as_posix() for p in find_inputs([tmp_path])] == ["a.PNG", "b/c.pdf"]


def test_scans_in_other_image_formats_are_read_and_other_files_named(tmp_path):
    """A scanner's BMP, GIF, lossless WebP and SANE's PGM are read as the same page; a
    spreadsheet and a phone's HEIC photo in the folder are named as not read, not skipped
    silently, and a folder holding nothing readable is refused with their names."""
    with Image.open(SCANS / "fax_b.tif") as tif:
        scan = tif.convert("L")
    for name in ("p.bmp", "p.gif", "p.pgm"):
        scan.save(tmp_path / name)
    scan.save(tmp_path / "p.webp", lossless=True)
    (tmp_path / "totals.xlsx").write_bytes(b"PK")
    (tmp_path / "IMG_0001.HEIC").write_bytes(b"x")
    found = find_inputs([tmp_path])
    assert [f.name for f in found] == ["p.bmp", "p.gif", "p.pgm", "p.webp"]
    for f in found:
        (page,) = pages(f)
        assert isinstance(page, Page) and np.array_equal(page.image, np.asarray(scan)), f.name
    assert [f.name for f in scan_inputs([tmp_path])[1]] == ["IMG_0001.HEIC", "totals.xlsx"]
    run = run_cli("process", tmp_path, "--template", TEMPLATE, "--out", tmp_path / "out" / "r.csv")
    assert run.returncode == 0 and "4 pages read from 4 files" in run.stdout
    assert "Not read: 2 files" in run.stderr and "IMG_0001.HEIC" in run.stderr and "totals.xlsx" in run.stderr
    (tmp_path / "only").mkdir()
    (tmp_path / "IMG_0001.HEIC").rename(tmp_path / "only" / "IMG_0001.HEIC")
    refused = run_cli("process", tmp_path / "only", "--template", TEMPLATE, "--out", tmp_path / "r.csv")
    assert refused.returncode == 2 and "IMG_0001.HEIC" in refused.stderr and not (tmp_path / "r.csv").exists()


def test_results_written_among_the_scans_are_not_read_as_scans(tmp_path):
    """A run whose results go into the scans' folder leaves page pictures (RESULTS.pages, JPEG)
    and corrected digits (RESULTS.corrections, PNG) there: the next run reads the scans alone,
    to the same rows, and does not list the results as files it left unread."""
    shutil.copyfile(SCANS / "batch_a.pdf", tmp_path / "batch_a.pdf")
    first = run_cli("process", tmp_path, "--template", TEMPLATE, "--out", tmp_path / "r.csv")
    assert first.returncode == 0, first.stderr
    assert any((tmp_path / "r.pages").glob("*.jpg"))
    (tmp_path / "r.corrections" / "7").mkdir(parents=True)
    Image.new("L", (28, 28), 255).save(tmp_path / "r.corrections" / "7" / "a.png")
    (tmp_path / "old.pages").mkdir()  # named like a results folder, but no results beside it: read
    Image.new("L", (300, 200), 255).save(tmp_path / "old.pages" / "blank.png")
    assert [f.relative_to(tmp_path).as_posix() for f in find_inputs([tmp_path])] == ["batch_a.pdf", "old.pages/blank.png"]
    assert scan_inputs([tmp_path])[1] == []
    (tmp_path / "old.pages" / "blank.png").unlink()
    second = run_cli("process", tmp_path, "--template", TEMPLATE, "--out", tmp_path / "again.csv")
    assert second.returncode == 0 and "Not read" not in second.stderr, second.stderr
    assert (tmp_path / "again.wide.csv").read_text() == (tmp_path / "r.wide.csv").read_text()


def test_rgba_and_16_bit_images_become_grey(tmp_path):
    rgba = np.zeros((40, 60, 4), np.uint8)
    rgba[..., 3] = 0  # fully transparent: paper
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    (page,) = pages(tmp_path / "t.png")
    assert page.image.min() == 255
    Image.fromarray(np.full((40, 60), 4000, np.uint16)).save(tmp_path / "w.png")
    (page,) = pages(tmp_path / "w.png")
    assert page.image.dtype == np.uint8


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_files_give_specific_errors(tmp_path, name):
    write_bad_inputs(tmp_path)
    got = pages(tmp_path / name)
    assert len(got) == 1 and isinstance(got[0], PageError)
    assert BAD_INPUTS[name] in got[0].reason
    assert got[0].source.endswith(name)


def test_a_fax_in_standard_mode_is_read_with_square_pixels(tmp_path, truth):
    """A fax's standard mode scans 204 DPI across and 98 down. Read as stored, its digits came
    half as tall as written and the page registered to no template ("no consistent alignment")."""
    from formreader.api import process_folder
    from formreader.training.synth import as_fax

    (scan,) = pages(SCANS / "scan_c.png")
    fax, resolution = as_fax(scan.image, scan.dpi, "standard")
    Image.fromarray(fax).convert("1").save(tmp_path / "fax.tif", dpi=resolution, compression="group3")
    (page,) = pages(tmp_path / "fax.tif")
    assert page.dpi == 204 and is_bitonal(page.image)
    assert page.image.shape == (round(fax.shape[0] * 204 / 98), fax.shape[1])
    read = process_folder(tmp_path, TEMPLATE)
    assert read.attrs["errors"].empty
    expected = truth[truth.file == "scan_c.png"].set_index("field").value
    assert read.set_index("field").value.to_dict() == expected.to_dict()
    # Tags that would make the page hundreds of megapixels once square are refused, not obeyed.
    Image.fromarray(fax).save(tmp_path / "odd.png", dpi=(4000, 60))
    (refused,) = pages(tmp_path / "odd.png")
    assert isinstance(refused, PageError) and "once its pixels are made square" in refused.reason


def test_a_grey_scan_of_oblong_pixels_is_read_square_and_grey(tmp_path):
    """A grey page whose resolution down is half its resolution across (a JPEG tagged 200 x 100
    DPI, the fast JPEG path declines it) comes back at 200 DPI, twice as tall as stored and still
    grey, as the scan it was made from."""
    (scan,) = pages(SCANS / "scan_c.png")
    h, w = scan.image.shape
    Image.fromarray(scan.image).resize((w, h // 2), Image.LANCZOS).save(tmp_path / "oblong.jpg", dpi=(200, 100), quality=92)
    (page,) = list(read_pages(tmp_path / "oblong.jpg", pdf_dpi=150, reduce_jpeg=True))
    assert page.dpi == 200 and page.image.shape == (2 * (h // 2), w) and not is_bitonal(page.image)
    # The scan again, less the detail halving its rows lost (a correlation of 0.98 when measured).
    assert np.corrcoef(page.image.ravel(), scan.image[: 2 * (h // 2)].ravel())[0, 1] > 0.95


def test_bitonal_scans_are_told_from_grey_ones():
    import cv2

    fax = [p.image for p in read_pages(SCANS / "fax_b.tif")]  # a bitonal fax
    grey = [p.image for name in ("batch_a.pdf", "scan_c.png", "phone_d.jpg") for p in read_pages(SCANS / name)]
    assert all(is_bitonal(image) for image in fax)
    assert not any(is_bitonal(image) for image in grey)
    # Still bitonal once saved as JPEG, or resampled (as a PDF of the fax is rendered).
    jpeg = cv2.imdecode(cv2.imencode(".jpg", fax[0], [cv2.IMWRITE_JPEG_QUALITY, 75])[1], cv2.IMREAD_GRAYSCALE)
    assert is_bitonal(jpeg)
    assert is_bitonal(cv2.resize(fax[0], None, fx=0.7, fy=0.7, interpolation=cv2.INTER_AREA))
