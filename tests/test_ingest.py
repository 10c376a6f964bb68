"""Ingest: real PDFs rendered by poppler, multi-frame TIFFs, PNG and JPEG, and bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from formreader.reading.ingest import Page, PageError, find_inputs, is_bitonal, read_pages

from .conftest import BAD_INPUTS, SCANS, write_bad_inputs


def pages(path: Path, dpi: int = 150) -> list:
    return list(read_pages(path, pdf_dpi=dpi))


def test_pdf_every_page_rendered_by_poppler():
    got = pages(SCANS / "batch_a.pdf")
    assert [p.page for p in got] == [1, 2, 3, 4]
    assert all(isinstance(p, Page) and p.image.dtype == np.uint8 and p.image.ndim == 2 for p in got)
    # The scans were embedded at 150 DPI on a bed of 1290x909 px: rendering at 150 gives that back.
    assert all(abs(p.image.shape[1] - 1289) <= 2 and abs(p.image.shape[0] - 908) <= 2 for p in got)
    assert got[0].dpi == 150
    # Different pages, not the same one four times.
    assert np.abs(got[0].image.astype(int) - got[1].image.astype(int)).mean() > 1


def test_pdf_rendered_at_requested_resolution():
    (first, *_) = pages(SCANS / "batch_a.pdf", dpi=75)
    assert abs(first.image.shape[1] - 645) <= 2 and first.dpi == 75


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
