"""Shared fixtures: the shipped template, model and samples, and real MNIST test digits (the
committed copy in tests/fixtures/data)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parent.parent
# The tests read small copies of the data sets committed beside them (made by
# tests/fixtures/make_fixtures.py), never the full sets: a clone has no ../shared.
FIXTURE_DATA = ROOT / "tests" / "fixtures" / "data"
os.environ["FORMREADER_DATA"] = str(FIXTURE_DATA)
TEMPLATE = ROOT / "templates" / "demo_form.yaml"
SCANS = ROOT / "samples" / "scans"


def run_cli(*args, **kwargs) -> subprocess.CompletedProcess:
    """formreader's command line in a fresh process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "formreader.cli", *map(str, args)], capture_output=True, text=True, **kwargs)


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="session")
def browser():
    """Debian's chromium, headless, driven by Playwright (never a downloaded browser)."""
    from playwright.sync_api import sync_playwright

    if not shutil.which("chromium") and not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is not installed (make setup installs it)")
    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        yield b
        b.close()


@pytest.fixture(scope="session")
def template():
    from formreader.reading.template import load_template

    return load_template(TEMPLATE)


@pytest.fixture(scope="session")
def classifier():
    from formreader.reading.classify import DigitClassifier

    return DigitClassifier.load()


@pytest.fixture(scope="session")
def mnist_test():
    from formreader.training.datasets import load_mnist

    return load_mnist("test", download=False)


@pytest.fixture(scope="session")
def truth() -> pd.DataFrame:
    return pd.read_csv(ROOT / "samples" / "truth.csv", dtype={"value": str}, keep_default_na=False)


@pytest.fixture(scope="session")
def filled_pages(mnist_test):
    """Eight filled demo forms (unscanned) with ground truth, from MNIST test digits."""
    from formreader.training.synth import make_pages

    images, labels = mnist_test
    # A seed other than the samples', so these pages are not the shipped ones.
    blank, fields, pages = make_pages(8, seed=4242, images=images, labels=labels)
    return blank, fields, pages


def field_accuracy(records: list[dict], truth: pd.DataFrame) -> tuple[int, int, int, int]:
    """(right, total, flagged, wrong and not flagged) of page records against a truth table."""
    expected = {(Path(r.file).name, int(r.page), r.field): r.value for r in truth.itertuples()}
    right = total = flagged = wrong_unflagged = 0
    for rec in records:
        for f in rec["fields"]:
            key = (Path(rec["source"]).name, rec["page"], f["field"])
            ok = f["value"] == expected[key]
            total += 1
            right += ok
            flagged += f["status"] != "ok"
            wrong_unflagged += (not ok) and f["status"] == "ok"
    return right, total, flagged, wrong_unflagged


# Bad inputs a batch must survive: file name -> what its error must say.
BAD_INPUTS = {
    "empty.pdf": "empty file (0 bytes)",
    "truncated.pdf": "not a readable PDF",
    "encrypted.pdf": "encrypted PDF",
    "notes.png": "not an image file",
    "huge.png": "image too large: 30000x20 px",
    "cut.jpg": "damaged or truncated",
}


def write_bad_inputs(folder: Path) -> None:
    """Write the files of BAD_INPUTS into folder, made from the real samples."""
    from PIL import Image
    from pypdf import PdfReader, PdfWriter

    good = (SCANS / "batch_a.pdf").read_bytes()
    (folder / "empty.pdf").write_bytes(b"")
    (folder / "truncated.pdf").write_bytes(good[: len(good) // 3])
    writer = PdfWriter()
    writer.append(PdfReader(SCANS / "batch_a.pdf"))
    writer.encrypt("secret", algorithm="RC4-128")  # a real encrypted PDF: poppler asks for the password
    writer.write(folder / "encrypted.pdf")
    (folder / "notes.png").write_text("this is a text file, not a picture\n")
    Image.new("L", (30000, 20), 255).save(folder / "huge.png")
    jpeg = (SCANS / "phone_d.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])


def write_png_bomb(path: Path, side: int = 40000) -> None:
    """A real PNG of side x side white 1-bit pixels (1.6 gigapixels at 40000), a few hundred KB
    on disk, written row by row so that making it costs no memory."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" + b"\xff" * ((side + 7) // 8)  # filter byte 0, then the row's bits
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n")
        fh.write(chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)))
        fh.write(chunk(b"IDAT", data))
        fh.write(chunk(b"IEND", b""))
