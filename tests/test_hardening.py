"""Nothing lost, nothing mixed, no way in: the cases a careful user or an attacker finds."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from formreader.export import OutputLock, results_complete
from formreader.reading.ingest import PageError, find_inputs, read_pages

from .conftest import ROOT, SCANS, TEMPLATE, run_cli, write_png_bomb

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def read_results(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    fields = pd.read_csv(out, dtype=str, keep_default_na=False)
    errors = pd.read_csv(out.with_name(out.stem + ".errors.csv"), dtype=str, keep_default_na=False)
    return fields, errors


def test_a_file_name_that_is_not_utf8_is_read_and_written(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    odd = os.fsdecode(b"caf\xe9 scan.png")  # Latin-1 bytes, as a share written from Windows has them
    shutil.copyfile(SCANS / "scan_c.png", folder / odd)
    out = tmp_path / "r.csv"
    run = run_cli("process", folder, "--template", TEMPLATE, "--out", out, "-q")
    assert run.returncode == 0, run.stderr
    fields, _ = read_results(out)
    assert len(fields) == 6 and fields.file.str.endswith("caf\\xe9 scan.png").all()
    assert results_complete(out)


def test_links_and_folders_that_cannot_be_read_are_reported(tmp_path):
    inputs = tmp_path / "in"
    (inputs / "sub").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copyfile(SCANS / "scan_c.png", elsewhere / "linked.png")
    shutil.copyfile(SCANS / "fax_b.tif", inputs / "sub" / "fax.tif")
    (inputs / "shared").symlink_to(elsewhere, target_is_directory=True)  # a symlinked subfolder is read
    (inputs / "loop").symlink_to(inputs, target_is_directory=True)  # a link loop ends
    (inputs / "gone.png").symlink_to(tmp_path / "deleted.png")  # a dangling link is an error row
    found = find_inputs([inputs])
    assert [p.name for p in found] == ["gone.png", "linked.png", "fax.tif"]  # in/, in/shared/, in/sub/
    errors = [e for e in read_pages(found[0]) if isinstance(e, PageError)]
    assert "symbolic link to a file that does not exist" in errors[0].reason


def test_a_folder_that_cannot_be_listed_is_an_error_row(tmp_path):
    (tmp_path / "in").mkdir()
    shutil.copyfile(SCANS / "scan_c.png", tmp_path / "in" / "a.png")
    if IS_ROOT:  # root lists any folder it owns; not the kernel's map of another process's files
        try:
            os.listdir("/proc/1/map_files")
            pytest.skip("this root can list every folder: none unreadable to test with")
        except OSError:
            pass
        locked = tmp_path / "in" / "locked"
        locked.symlink_to("/proc/1/map_files", target_is_directory=True)
    else:
        locked = tmp_path / "in" / "locked"
        locked.mkdir()
        locked.chmod(0)
    try:
        found = find_inputs([tmp_path / "in"])
        assert found == [tmp_path / "in" / "a.png", locked]
        assert "cannot be listed" in next(iter(read_pages(locked))).reason
        out = tmp_path / "r.csv"
        run = run_cli("process", tmp_path / "in", "--template", TEMPLATE, "--out", out, "-q")
        assert run.returncode == 1
        fields, errors = read_results(out)
        assert len(fields) == 6 and errors.error.str.contains("cannot be listed").all() and len(errors) == 1
    finally:
        if not IS_ROOT:
            locked.chmod(0o755)


def test_the_same_file_named_twice_is_read_once(tmp_path):
    out = tmp_path / "r.csv"
    # The folder, the file in it, and the file by another way there (a relative path through a link).
    (tmp_path / "link").symlink_to(SCANS, target_is_directory=True)
    run = run_cli(
        "process", SCANS, SCANS / "scan_c.png", "link/scan_c.png", "--template", TEMPLATE, "--out", out, "-q", cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr
    fields, _ = read_results(out)
    assert len(fields[fields.file.str.endswith("scan_c.png")]) == 6  # one page of six fields, once


def test_out_naming_an_input_is_refused(tmp_path):
    scan = tmp_path / "scan_c.png"
    shutil.copyfile(SCANS / "scan_c.png", scan)
    before = scan.read_bytes()
    run = run_cli("process", tmp_path, "--template", TEMPLATE, "--out", tmp_path / "scan_c.png", "-q")
    assert run.returncode == 2 and "would overwrite the input" in run.stderr
    assert scan.read_bytes() == before


def test_a_second_run_on_the_same_out_is_refused(tmp_path):
    out = tmp_path / "r.csv"
    with OutputLock(out):
        run = run_cli("process", SCANS / "scan_c.png", "--template", TEMPLATE, "--out", out, "-q")
    assert run.returncode == 2 and "another formreader run is writing" in run.stderr
    assert not out.exists()


def test_resume_refuses_other_settings_and_a_journal_is_never_thrown_away(tmp_path):
    out = tmp_path / "r.csv"
    journal = tmp_path / "r.journal.jsonl"
    first = run_cli("process", SCANS / "scan_c.png", "--template", TEMPLATE, "--out", out, "-q")
    assert first.returncode == 0 and journal.exists()  # a finished run's journal stays
    assert run_cli("process", SCANS / "scan_c.png", "--template", TEMPLATE, "--out", out, "-q").returncode == 0
    # What an interrupted run leaves: its settings and a finished file, and no end.
    journal.write_text(
        json.dumps({"kind": "run", "settings": {"review_threshold": 0.5}})
        + "\n"
        + json.dumps({"kind": "file_done", "source": str(SCANS / "scan_c.png")})
        + "\n"
    )
    again = run_cli("process", SCANS / "scan_c.png", "--template", TEMPLATE, "--out", out, "-q")
    assert again.returncode == 2 and "pass --resume" in again.stderr
    resumed = run_cli("process", SCANS / "scan_c.png", "--template", TEMPLATE, "--out", out, "-q", "--resume")
    assert resumed.returncode == 2 and "other settings" in resumed.stderr and "review_threshold" in resumed.stderr
    assert journal.exists()  # still there for the right --resume


def test_a_rerun_with_resume_reads_only_new_files(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copyfile(SCANS / "scan_c.png", folder / "first.png")
    out = tmp_path / "r.csv"
    assert run_cli("process", folder, "--template", TEMPLATE, "--out", out, "-q").returncode == 0
    before, _ = read_results(out)
    shutil.copyfile(SCANS / "fax_b.tif", folder / "second.tif")
    # The first file is gone now: read again, it would be an error row; it is not read again.
    (folder / "first.png").write_bytes(b"")
    run = run_cli("process", folder, "--template", TEMPLATE, "--out", out, "-q", "--resume")
    assert run.returncode == 0, run.stderr
    after, errors = read_results(out)
    assert errors.empty and len(after) == 6 + 3 * 6
    assert after[after.file.str.endswith("first.png")].value.tolist() == before.value.tolist()


def converted_again(folder: Path, mnist_test) -> None:
    """The .tflite in `folder` was made again by the card's recipe (the card names its digest) and
    reads real digits as the shipped one does. Not byte for byte: TensorFlow's converter folds
    the batch normalisation into the weights with the CPU's own float arithmetic, and the shipped
    file was converted on another CPU (stop 43: 384 of its 473,976 bytes differ on an Intel Xeon,
    logits by 0.02 at most)."""
    from formreader.reading.classify import TFLITE_RECIPE, DigitClassifier

    remade = (folder / "digits.tflite").read_bytes()
    card = json.loads((folder / "digits.json").read_text())
    assert card["tflite_sha256"] == hashlib.sha256(remade).hexdigest() and card["tflite_recipe"] == TFLITE_RECIPE
    images, _ = mnist_test
    x = images[:256].astype(np.float32) / 255
    again, shipped = DigitClassifier.load(folder / "digits.keras").logits(x), DigitClassifier.load().logits(x)
    assert np.abs(again - shipped).max() < 0.1
    assert (again.argmax(1) == shipped.argmax(1)).all()


def test_a_damaged_converted_model_is_made_again(tmp_path, mnist_test):
    from formreader.reading.classify import DigitClassifier

    for name in ("digits.keras", "digits.json", "digits.tflite"):
        shutil.copyfile(ROOT / "models" / name, tmp_path / name)
    cache = bytearray((tmp_path / "digits.tflite").read_bytes())
    cache[len(cache) // 2] ^= 0xFF  # one flipped bit-pattern in the weights
    (tmp_path / "digits.tflite").write_bytes(bytes(cache))
    DigitClassifier.load(tmp_path / "digits.keras")
    assert (tmp_path / "digits.tflite").read_bytes() != bytes(cache)
    converted_again(tmp_path, mnist_test)


def test_a_model_converted_by_another_recipe_is_converted_again(tmp_path, mnist_test):
    """A .tflite that is intact and from the same .keras file, but converted another way (the
    float32 conversion of earlier releases), is not run: the card's recipe decides."""
    from formreader.reading.classify import DigitClassifier, convert_to_tflite, load_keras_model

    for name in ("digits.keras", "digits.json"):
        shutil.copyfile(ROOT / "models" / name, tmp_path / name)
    plain = convert_to_tflite(load_keras_model(tmp_path / "digits.keras"), quantize=False)
    (tmp_path / "digits.tflite").write_bytes(plain)
    card = json.loads((tmp_path / "digits.json").read_text())
    card.update(tflite_sha256=hashlib.sha256(plain).hexdigest(), tflite_recipe="float32")
    (tmp_path / "digits.json").write_text(json.dumps(card))
    DigitClassifier.load(tmp_path / "digits.keras")
    assert (tmp_path / "digits.tflite").read_bytes() != plain
    converted_again(tmp_path, mnist_test)


@pytest.mark.parametrize("mode", ["I;16", "F"])
def test_16_bit_and_float_scans_read_like_8_bit(tmp_path, mode):
    grey = np.asarray(Image.open(SCANS / "scan_c.png").convert("L"))
    data = grey.astype(np.uint16) * 257 if mode == "I;16" else grey.astype(np.float32) / 255
    image = Image.fromarray(data)
    assert image.mode == mode
    image.save(tmp_path / "deep.tif", dpi=(150, 150))
    page = next(iter(read_pages(tmp_path / "deep.tif")))
    assert np.abs(page.image.astype(int) - grey).max() <= 1
    out = tmp_path / "r.csv"
    for src in (tmp_path / "deep.tif", SCANS / "scan_c.png"):
        assert run_cli("process", src, "--template", TEMPLATE, "--out", out.with_name(src.stem + ".csv"), "-q").returncode == 0
    deep, _ = read_results(out.with_name("deep.csv"))
    eight, _ = read_results(out.with_name("scan_c.csv"))
    assert deep.value.tolist() == eight.value.tolist()


def test_pdfs_with_no_pages_or_a_huge_page(tmp_path):
    from pypdf import PdfReader, PdfWriter

    empty = PdfWriter()
    with open(tmp_path / "none.pdf", "wb") as fh:
        empty.write(fh)
    assert [e.reason for e in read_pages(tmp_path / "none.pdf")] == ["the PDF has no pages"]
    mixed = PdfWriter()
    mixed.add_page(PdfReader(SCANS / "batch_a.pdf").pages[0])
    mixed.add_blank_page(width=14400, height=14400)  # 200 inches a side: 2 gigapixels at 150 DPI
    with open(tmp_path / "mixed.pdf", "wb") as fh:
        mixed.write(fh)
    pages = list(read_pages(tmp_path / "mixed.pdf", pdf_dpi=150))
    assert pages[0].image.shape[1] > 1000  # the first page is read
    assert isinstance(pages[1], PageError) and pages[1].page == 2 and "too large" in pages[1].reason


def test_a_dpi_tag_cannot_blow_a_page_up(tmp_path):
    from formreader.pipeline import read_page
    from formreader.reading.template import load_template

    # 6000 x 6000 px said to be 55 DPI: at the form's 150 DPI it would be 268 megapixels.
    Image.new("L", (6000, 6000), 255).save(tmp_path / "tagged.png", dpi=(55, 55))
    page = next(iter(read_pages(tmp_path / "tagged.png")))
    assert page.dpi == pytest.approx(55, abs=0.1)
    read = read_page(page, load_template(TEMPLATE), classifier=None)
    assert "megapixels" in read.error and "is its DPI right" in read.error
    # A tag under 50 DPI is no scanner's: the resolution is taken as unknown.
    Image.new("L", (600, 600), 255).save(tmp_path / "odd.png", dpi=(31, 31))
    assert next(iter(read_pages(tmp_path / "odd.png"))).dpi is None


def test_a_page_scanned_too_coarse_is_read_and_every_field_says_why(tmp_path, classifier):
    """A page scanned under half the template's resolution is read, and every field goes to review
    naming the resolution it was scanned at: found from the registration when the file says none,
    and from the file's DPI when it does. The same page at its own 200 DPI has no such reason."""
    from formreader.pipeline import read_page
    from formreader.reading.template import load_template

    template = load_template(TEMPLATE)
    grey = Image.open(SCANS / "scan_c.png").convert("L")  # scanned at 200 DPI
    grey.resize((grey.width // 3, grey.height // 3), Image.BICUBIC).save(tmp_path / "coarse.png")  # no DPI said
    grey.resize((grey.width * 9 // 25, grey.height * 9 // 25), Image.BICUBIC).save(tmp_path / "tagged.tif", dpi=(72, 72))
    fine = read_page(next(iter(read_pages(SCANS / "scan_c.png"))), template, classifier)
    assert fine.error is None and not any("DPI" in r for f in fine.fields for r in f.reasons)
    for name, dpi in (("coarse.png", 200 / 3), ("tagged.tif", 72)):
        read = read_page(next(iter(read_pages(tmp_path / name))), template, classifier)
        assert read.error is None and len(read.fields) == len(fine.fields)
        for f in read.fields:
            said = re.fullmatch(r"scanned at about (\d+) DPI, under half the template's 150: scan it finer", f.reasons[0])
            assert f.status == "review" and said and abs(int(said[1]) - dpi) <= 3, f.reasons


def test_a_halftone_scan_reads_as_its_grey_scan_does(tmp_path, classifier):
    """A bitonal scanner's halftone mode dithers the paper's grey into dots, and the dots are no
    ink: the samples' grey page dithered (a G4 TIFF) reads the values the grey page reads, no field
    sent to review for writing beyond its boxes' lines. A page thresholded, as most bitonal scans
    and the samples' fax are, is not taken for dithered."""
    from formreader.pipeline import read_page
    from formreader.reading.ingest import is_dithered
    from formreader.reading.template import load_template

    template = load_template(TEMPLATE)
    grey = Image.open(SCANS / "scan_c.png").convert("L")  # scanned at 200 DPI, its paper a light grey
    grey.convert("1").save(tmp_path / "halftone.tif", compression="group4", dpi=(200, 200))  # Floyd-Steinberg
    thresholded = grey.point(lambda v: 255 if v > 140 else 0).convert("1", dither=Image.Dither.NONE)
    thresholded.save(tmp_path / "thresholded.tif", compression="group4", dpi=(200, 200))
    halftone = next(iter(read_pages(tmp_path / "halftone.tif")))
    assert is_dithered(halftone.image)
    assert not is_dithered(next(iter(read_pages(tmp_path / "thresholded.tif"))).image)
    assert not any(is_dithered(page.image) for page in read_pages(SCANS / "fax_b.tif"))
    fine = read_page(next(iter(read_pages(SCANS / "scan_c.png"))), template, classifier)
    read = read_page(halftone, template, classifier)
    assert read.error is None and [f.value for f in read.fields] == [f.value for f in fine.fields]
    assert not any("lines" in r for f in read.fields for r in f.reasons), [f.reasons for f in read.fields]
    assert sum(f.status == "review" for f in read.fields) <= sum(f.status == "review" for f in fine.fields) + 1


def test_dust_beside_the_boxes_is_no_writing_across_their_lines(classifier):
    """Specks of dust or toner (1-3 px, dark) over a scanned page are not writing that goes on
    beyond its box: no field of the samples' page sprinkled with 400 of them goes to review for
    crossing its boxes' lines, and the values read are the clean page's (but where a speck fell
    inside a box: that field says so)."""
    from formreader.pipeline import read_page
    from formreader.reading.ingest import Page
    from formreader.reading.template import load_template

    template = load_template(TEMPLATE)
    clean = next(iter(read_pages(SCANS / "scan_c.png")))
    dusty = clean.image.copy()
    rng = np.random.default_rng(300)
    for _ in range(400):
        y, x, side = rng.integers(0, dusty.shape[0] - 3), rng.integers(0, dusty.shape[1] - 3), rng.integers(1, 4)
        dusty[y : y + side, x : x + side] = rng.integers(0, 60)
    fine = read_page(clean, template, classifier)
    read = read_page(Page(dusty, clean.dpi, clean.source, clean.page), template, classifier)
    assert not any("lines" in r for f in read.fields for r in f.reasons), [f.reasons for f in read.fields]
    for before, after in zip(fine.fields, read.fields):
        if not any("mark" in r for r in after.reasons):  # a speck inside a box is a mark for a person to see
            assert after.value == before.value, after


def test_outputs_follow_the_umask_and_are_a_whole_set(tmp_path):
    out = tmp_path / "r.csv"
    run = run_cli("process", SCANS / "scan_c.png", "--template", TEMPLATE, "--out", out, "-q", preexec_fn=lambda: os.umask(0o022))
    assert run.returncode == 0, run.stderr
    assert run.stderr == "" and run.stdout == ""  # -q: not even the inference runtime's INFO line
    for name in ("r.csv", "r.wide.csv", "r.digits.csv", "r.errors.csv", "r.manifest.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644
    assert results_complete(out)
    with open(out, "a") as fh:
        fh.write("x\n")
    assert not results_complete(out)  # a set a crash mixed is told from a whole one
    assert not list(tmp_path.glob(".*.tmp"))


def children(pid: int) -> list[int]:
    found = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in found]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return False


def start_batch(tmp_path: Path, *options: str) -> subprocess.Popen:
    """A run on six copies of the samples' 4-page PDF (made on the first call), two workers."""
    folder = tmp_path / "in"
    if not folder.exists():
        folder.mkdir()
        for i in range(6):
            shutil.copyfile(SCANS / "batch_a.pdf", folder / f"b{i}.pdf")
    cmd = [
        sys.executable,
        "-m",
        "formreader.cli",
        "process",
        folder,
        "--template",
        TEMPLATE,
        "--out",
        tmp_path / "r.csv",
        "-j",
        "2",
        *options,
    ]
    return subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
    except OSError:  # gone meanwhile (a pdftoppm the run started, say)
        return ""


def wait_for_workers(proc: subprocess.Popen, count: int = 2, timeout: float = 60) -> list[int]:
    """The run's pool workers (spawned Python processes), once `count` of them are up; not
    multiprocessing's resource tracker, also a child of the run, which "multiprocessing" in the
    command line took for a worker."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        workers = [p for p in children(proc.pid) if "spawn_main" in cmdline(p)]
        if len(workers) >= count:
            return workers
        time.sleep(0.2)
    raise AssertionError("the run started no workers")


def test_interrupted_run_exits_130_and_resumes_to_the_same_rows(tmp_path):
    proc = start_batch(tmp_path)
    journal = tmp_path / "r.journal.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (journal.exists() and "file_done" in journal.read_text()):
        time.sleep(0.2)
    workers = wait_for_workers(proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "--resume" in err
    time.sleep(1.0)
    assert not any(alive(w) for w in workers)
    resumed = run_cli("process", tmp_path / "in", "--template", TEMPLATE, "--out", tmp_path / "r.csv", "-q", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    fields, _ = read_results(tmp_path / "r.csv")
    assert len(fields) == 6 * 4 * 6 and not fields.duplicated(["file", "page", "field"]).any()


def test_a_run_killed_at_several_points_resumes_to_the_uninterrupted_csvs(tmp_path):
    """kill -9 once a page, then nine, then seventeen of the 24 pages are in the journal (each
    time resumed with --resume, and killed again): the last resume's CSVs are byte for byte
    those of a run that was never interrupted."""
    proc = start_batch(tmp_path)
    journal = tmp_path / "r.journal.jsonl"
    for pages in (1, 9, 17):
        deadline = time.time() + 120
        while time.time() < deadline and (not journal.exists() or journal.read_text().count('"kind": "page"') < pages):
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.kill()
        proc.communicate(timeout=30)
        assert not (tmp_path / "r.csv").exists()
        proc = start_batch(tmp_path, "--resume")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    whole = run_cli("process", tmp_path / "in", "--template", TEMPLATE, "--out", tmp_path / "whole" / "r.csv", "-q", "-j", "2")
    assert whole.returncode == 0, whole.stderr
    for name in ("r.csv", "r.wide.csv", "r.digits.csv", "r.errors.csv"):
        assert (tmp_path / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert len(read_results(tmp_path / "r.csv")[0]) == 6 * 4 * 6


def test_workers_of_a_killed_run_end_too(tmp_path):
    proc = start_batch(tmp_path)
    workers = wait_for_workers(proc)
    proc.kill()  # kill -9: the run gets no chance to stop its pool
    proc.communicate(timeout=30)
    deadline = time.time() + 15
    while time.time() < deadline and any(alive(w) for w in workers):
        time.sleep(0.2)
    assert not any(alive(w) for w in workers)


def test_a_run_that_fails_before_reading_stops_the_workers_it_started(tmp_path):
    """The workers start before the template and the models are loaded (pipeline.ReadingPool): a
    run whose model is missing says so and exits 2, as a run of one process does, and does not
    wait on workers that will never be handed anything to read."""
    start = time.time()
    proc = start_batch(tmp_path, "--model", str(tmp_path / "missing.keras"))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "missing.keras" in err and "Traceback" not in err
    assert time.time() - start < 30


def start_80_pages(tmp_path: Path, signals: str) -> subprocess.Popen:
    """A run of 80 pages on two workers, several seconds' work, in a session of its own, started by
    `env` with `signals` (its options: how SIGINT is to be disposed)."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(20):
        shutil.copyfile(SCANS / "batch_a.pdf", folder / f"b{i}.pdf")
    cmd = [sys.executable, "-m", "formreader", "process", folder, "-t", TEMPLATE, "-o", tmp_path / "r.csv", "-j", "2"]
    return subprocess.Popen(["env", signals, *map(str, cmd)], stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.mark.parametrize("after", [0.0, 0.15, 0.35])
def test_ctrl_c_while_the_run_starts_exits_130_without_tracebacks(tmp_path, after):
    """Ctrl-C reaches every process of the terminal's group. The workers never take it (the run
    stops them), and the main process holds it while it imports and loads the template and the
    models (raised there, inside a library's import, it ended the run killed by the signal,
    status -2, or broke pydantic-core's start); so a run interrupted as its workers start, or a
    moment later, says it was interrupted and exits 130, with no traceback of any process.
    The run reads 80 pages, several seconds' work, and must still be running when it is interrupted.
    It is started as a terminal starts a command in the foreground, Ctrl-C not ignored: a run
    started in the background (`make test &`) inherits SIGINT ignored, as Unix's convention wants,
    keeps it ignored once loaded, and read all 80 pages (stop 55's "Ctrl-C lost now and then")."""
    proc = start_80_pages(tmp_path, "--default-signal=INT")
    wait_for_workers(proc)
    time.sleep(after)
    assert proc.poll() is None, "the run ended before it was interrupted: the test's timing, not the run, is at fault"
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err


def test_a_run_started_with_ctrl_c_ignored_goes_on_ignoring_it(tmp_path):
    """A background job of a shell (`formreader process ... &`, nohup) starts with SIGINT ignored,
    and a Ctrl-C at the terminal is not meant for it: interrupted as it starts (when the run holds
    Ctrl-C to raise it later) and again while it reads, it reads every page and exits 0."""
    proc = start_80_pages(tmp_path, "--ignore-signal=INT")
    wait_for_workers(proc)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.6)
    assert proc.poll() is None, "the run ended before it was interrupted again: the test's timing is at fault"
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    fields, _ = read_results(tmp_path / "r.csv")
    assert proc.returncode == 0 and "interrupted" not in err, err
    assert fields[["file", "page"]].drop_duplicates().shape[0] == 80


BOMB = """a: &a ["x","x","x","x","x","x","x","x","x"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
reference: blank.png
fields: *i
"""


@pytest.mark.parametrize(
    "case, message",
    [
        ("latin1", "not UTF-8 text"),
        ("alias bomb", "anchors and aliases"),
        ("reference is a folder", "is a folder, not a file"),
        ("reference is a bomb", "image too large"),
    ],
)
def test_bad_templates_get_exit_2_and_a_reason(tmp_path, case, message):
    text = (ROOT / "templates" / "demo_form.yaml").read_text()
    reference = (ROOT / "templates" / "demo_form.yaml").parent / "demo_form.png"
    text = text.replace("reference: demo_form.png", f"reference: {reference}")
    bad = tmp_path / "t.yaml"
    if case == "latin1":
        bad.write_bytes(text.replace("name: demo", "name: d\xe9mo").encode("latin-1"))
    elif case == "alias bomb":
        bad.write_text(BOMB)
    elif case == "reference is a folder":
        (tmp_path / "ref").mkdir()
        bad.write_text(text.replace(f"reference: {reference}", "reference: ref"))
    else:  # a tiny PNG that says it is 40000 x 40000 pixels
        write_png_bomb(tmp_path / "bomb.png")
        bad.write_text(text.replace(f"reference: {reference}", "reference: bomb.png"))
    for command in (["template", "check", bad], ["process", SCANS / "scan_c.png", "-t", bad, "-o", tmp_path / "r.csv"]):
        start = time.time()
        run = run_cli(*command)
        assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr, (case, run.stderr)
        assert time.time() - start < 30


def test_an_unwritable_out_is_exit_2_with_a_reason(tmp_path):
    if IS_ROOT:
        target = Path("/proc/formreader-results/r.csv")  # not even root writes there
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
        target = tmp_path / "ro" / "r.csv"
    run = run_cli("process", SCANS / "scan_c.png", "--template", TEMPLATE, "--out", target, "-q")
    assert run.returncode == 2 and "cannot write the results" in run.stderr and "Traceback" not in run.stderr


def test_bombs_cost_an_error_row_each_and_little_memory(tmp_path):
    """Inputs built to blow memory up: each is an error row, the rest is read, and the run's
    peak memory stays far under 2 GB."""
    from pypdf import PdfReader, PdfWriter

    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copyfile(SCANS / "scan_c.png", folder / "good.png")
    Image.new("L", (6000, 6000), 255).save(folder / "dpi_tag.png", dpi=(55, 55))  # 268 MP at the form's DPI
    write_png_bomb(folder / "bomb.png")  # 200 KB that decode to 1.6 GB
    pdf = PdfWriter()
    pdf.add_page(PdfReader(SCANS / "batch_a.pdf").pages[0])
    pdf.add_blank_page(width=14400, height=14400)
    with open(folder / "huge_page.pdf", "wb") as fh:
        pdf.write(fh)
    out = tmp_path / "r.csv"
    cmd = [sys.executable, "-m", "formreader.cli", "process", folder, "--template", TEMPLATE, "--out", out, "-q"]
    # Started from a small Python of its own, so that its peak memory is its own (a child forked
    # from this test process would be charged with the pages it shares with it).
    probe = "import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; " + (
        "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    rc, peak_kib = map(
        int, subprocess.run([sys.executable, "-c", probe, *map(str, cmd)], capture_output=True, text=True).stdout.split()
    )
    assert rc == 1
    fields, errors = read_results(out)
    assert set(fields.file.map(lambda f: Path(f).name)) == {"good.png", "huge_page.pdf"}
    reasons = dict(zip(errors.file.map(lambda f: Path(f).name), errors.error))
    assert "megapixels" in reasons["dpi_tag.png"] and "too large" in reasons["bomb.png"]
    assert "too large" in reasons["huge_page.pdf"]
    assert peak_kib < 2**20  # under 1 GB (the limit asked for is 2 GB)


def test_no_cell_can_become_a_formula(tmp_path):
    """A file named like a formula is written as text (OWASP's rule against CSV injection)."""
    shutil.copyfile(SCANS / "scan_c.png", tmp_path / "=HYPERLINK(1).png")
    run = run_cli("process", "=HYPERLINK(1).png", "--template", TEMPLATE, "--out", "r.csv", "-q", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    fields, _ = read_results(tmp_path / "r.csv")
    assert (fields.file == "'=HYPERLINK(1).png").all()


def test_results_as_a_spreadsheet(tmp_path):
    """export --xlsx (real openpyxl): text cells keep leading zeros, review cells are filled with
    their reasons as a comment, a formula-like file name stays text, errors and settings sheets."""
    from openpyxl import load_workbook

    shutil.copyfile(SCANS / "scan_c.png", tmp_path / "=HYPERLINK(1).png")
    shutil.copyfile(SCANS / "fax_b.tif", tmp_path / "fax_b.tif")
    (tmp_path / "empty.pdf").write_bytes(b"")
    run = run_cli("process", ".", "--template", TEMPLATE, "--out", "r.csv", "-q", cwd=tmp_path)
    assert run.returncode == 1, run.stderr
    made = run_cli("export", tmp_path / "r.csv", "--xlsx", tmp_path / "r.xlsx")
    assert made.returncode == 0, made.stderr
    book = load_workbook(tmp_path / "r.xlsx")
    sheet = book["fields"]
    header = [c.value for c in sheet[1]]
    assert header[:2] == ["file", "page"] and "phone" in header
    assert sheet.column_dimensions["A"].width >= len("=HYPERLINK(1).png")  # nothing shown cut short
    rows = list(sheet.iter_rows(min_row=2))
    assert len(rows) == 4  # one page of scan_c, three of fax_b
    assert {r[0].value for r in rows} == {"=HYPERLINK(1).png", "fax_b.tif"}
    assert all(r[0].data_type == "s" for r in rows)  # the formula-like name is text
    fields = pd.read_csv(tmp_path / "r.csv", dtype=str, keep_default_na=False)
    flagged = fields[fields.status != "ok"]
    # Values as written: identifiers and dates as text (leading zeros kept), with their printed
    # separators; the amount, which the template calls numeric, a number cell with its decimals
    # where nobody need check it.
    amount = header.index("amount")
    assert all(c.data_type == "s" for r in rows for i, c in enumerate(r[2:], start=2) if c.value is not None and i != amount)
    phones = [r[header.index("phone")].value for r in rows]
    assert all(re.fullmatch(r"0\d\d-\d{3}-\d{4}", p) for p in phones if p and "?" not in p)
    dates = [r[header.index("date")].value for r in rows]
    assert all(re.fullmatch(r"\d\d/\d\d/\d{4}", d) for d in dates if d and "?" not in d)
    for r in rows:
        read = fields[(fields.file == ("'" if r[0].value.startswith("=") else "") + r[0].value)
                      & (fields.page == str(r[1].value)) & (fields.field == "amount")].iloc[0]
        if read.status == "ok":
            assert r[amount].data_type == "n" and r[amount].number_format == "0.00"
            assert r[amount].value == float(read.text) and read.text.replace(".", "") == read.value and read.text[-3] == "."
        else:
            assert r[amount].data_type == "s"
    filled = [c for r in rows for c in r[2:] if c.fill.fgColor.rgb.endswith("FFD27F")]
    assert len(filled) == len(flagged) and all(c.comment is not None for c in filled)
    assert book["errors"].max_row == 2 and "empty file" in book["errors"].cell(2, 3).value
    settings = {r[0].value: r[1].value for r in book["settings"].iter_rows(min_row=2)}
    assert "review_threshold" in settings and "template" in settings
    assert run_cli("export", tmp_path / "r.csv", "--xlsx", tmp_path / "r.csv.txt").returncode == 2


@pytest.mark.parametrize("name", ["page", "review", "File"])
def test_a_field_named_like_a_results_column_is_refused(tmp_path, name):
    text = (ROOT / "templates" / "demo_form.yaml").read_text()
    reference = ROOT / "templates" / "demo_form.png"
    text = text.replace("reference: demo_form.png", f"reference: {reference}").replace("name: quantity", f"name: {name}")
    (tmp_path / "t.yaml").write_text(text)
    run = run_cli("template", "check", tmp_path / "t.yaml")
    assert run.returncode == 2 and f"the name '{name}' is taken by a column of the results" in run.stderr


def test_out_named_xlsx_is_refused_with_the_way_to_a_workbook(tmp_path):
    run = run_cli("process", SCANS / "scan_c.png", "--template", TEMPLATE, "--out", tmp_path / "r.xlsx", "-q")
    assert run.returncode == 2 and "formreader export" in run.stderr and not (tmp_path / "r.xlsx").exists()
