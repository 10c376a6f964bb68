"""The whole pipeline on the shipped samples and on a batch full of bad files."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from formreader import pipeline
from formreader.export import journal_records
from formreader.pipeline import Journal, ReadingPool, process_paths, read_page
from formreader.reading.ingest import ImageFrame, Page, PdfPage
from formreader.training.synth import scan

from .conftest import BAD_INPUTS, SCANS, TEMPLATE, field_accuracy, run_cli, write_bad_inputs
from .test_register import other_form


@pytest.fixture(scope="module")
def sample_records(template, classifier):
    return list(process_paths([SCANS], template, classifier))


def test_samples_reproduce_ground_truth(sample_records, truth):
    right, total, flagged, wrong_unflagged = field_accuracy(sample_records, truth)
    assert total == len(truth) == 60
    # Measured with the shipped models (benchmarks/evaluate_forms.py): 55 of 60 right, every
    # wrong field flagged; 26.7% flagged (at the model's review threshold, chosen for at most
    # 0.3% wrong but `ok` on forms of writers it never saw; 20% at 0.85 with the second reader).
    assert right >= 52
    assert wrong_unflagged == 0
    assert flagged / total <= 0.35


def test_every_sample_page_registers_well(sample_records):
    assert len(sample_records) == 10
    assert all(r["error"] is None and r["quality"] > 0.8 for r in sample_records)
    upside_down = [r for r in sample_records if abs(r["rotation_deg"]) > 150]
    assert len(upside_down) == 2  # batch_a.pdf page 3 and scan_e.jpg were fed upside down


def test_read_page_is_pure_and_repeatable(filled_pages, template, classifier):
    _, _, pages = filled_pages
    image = scan(pages[0].image, np.random.default_rng(11))
    a = read_page(Page(image, 150.0, "x", 1), template, classifier)
    b = read_page(Page(image.copy(), 150.0, "x", 1), template, classifier)
    assert [(f.name, f.value, f.confidence) for f in a.fields] == [(f.name, f.value, f.confidence) for f in b.fields]
    right = sum(f.value == pages[0].values[f.name] for f in a.fields)
    assert right >= 5


def test_blank_field_is_empty_not_guessed(filled_pages, template, classifier, mnist_test):
    from formreader.training.synth import DigitSource, fill_form

    blank, fields, _ = filled_pages
    rng = np.random.default_rng(3)
    images, labels = mnist_test
    values = {
        "customer_no": "12345678",
        "date": "01022003",
        "quantity": "",
        "postal_code": "54321",
        "amount": "   1234",
        "phone": "0123456789",
    }
    page = fill_form(blank, fields, values, DigitSource(images, labels, rng), rng)
    read = read_page(Page(scan(page, rng, max_rotation=3), 150.0, "x", 1), template, classifier)
    quantity = read.fields[2]
    assert quantity.value == "" and quantity.status == "ok"  # optional and empty
    assert [d.digit for d in read.fields[4].digits][:3] == ["", "", ""]


def test_a_digit_the_scan_broke_up_is_flagged_not_dropped(filled_pages, template, classifier, mnist_test):
    """Pieces of a real digit, each too small to be one, left in the first box of `235`: the
    field is not read as `35` and `ok` (a digit silently lost) but keeps a '?' for review, and a
    person's correction still teaches the model the digits it did read."""
    from formreader.pipeline import page_record, segment_page
    from formreader.review.decisions import labelled_cells
    from formreader.training.synth import DigitSource, fill_form

    blank, fields, _ = filled_pages
    rng = np.random.default_rng(5)
    images, labels = mnist_test
    values = {"customer_no": "12345678", "date": "01022003", "quantity": " 35", "postal_code": "54321",
              "amount": "   1234", "phone": "0123456789"}
    page = fill_form(blank, fields, values, DigitSource(images, labels, rng), rng)
    x, y, w, h = fields[2].cells[0]  # quantity's first box, left empty above
    two = cv2.resize(images[np.flatnonzero(labels == 2)[0]], (w - 8, h - 8)) > 100
    ys, xs = np.nonzero(two)
    for k in np.linspace(0, len(ys) - 1, 3).astype(int):  # three pieces of its strokes, 3 px across
        piece = np.zeros_like(two)
        piece[max(0, ys[k] - 1) : ys[k] + 2, max(0, xs[k] - 1) : xs[k] + 2] = True
        page[y + 4 : y + h - 4, x + 4 : x + w - 4][piece & two] = 30
    scanned = Page(scan(page, rng, max_rotation=3), 150.0, "x", 1)
    read = read_page(scanned, template, classifier)
    quantity = read.fields[2]
    assert quantity.value == "35" and quantity.text == "?35"
    # No surer than the '?' cell's 0.1, raised to the field power as every boxed field's confidence is.
    assert quantity.status == "review" and quantity.confidence <= 0.1 ** classifier.field_power(False) + 1e-6 < 0.3
    assert quantity.reasons[0] == "mark that is not a digit in cell 1"
    record = page_record(read)["fields"][2]
    picture = segment_page(scanned, template).registration.aligned
    assert [(cell, label) for cell, _, label in labelled_cells(record, picture, "235")] == [(1, "3"), (2, "5")]


def test_a_date_read_as_no_date_is_read_as_the_likeliest_date(template, classifier, mnist_test):
    """Real MNIST digits for 76051999 in the demo form's date boxes, each read right: a day 76
    breaks the date's pattern, so the field holds the likeliest reading that keeps it (checked
    against every date the pattern allows) and goes to a person."""
    from formreader.reading.classify import reading_from_probabilities
    from formreader.reading.fields import read_field

    images, labels = mnist_test
    x = images.astype(np.float32) / 255.0
    p = classifier.probabilities(x[:2000])
    sure = [np.flatnonzero((labels[:2000] == d) & (p.argmax(1) == d))[0] for d in range(10)]
    spec = template.fields[1]
    cells = [reading_from_probabilities(p[sure[int(d)]]) for d in "76051999"]
    # The 7 read as 7 that a 0, 1, 2 or 3 comes least close to: no day is likely enough to put in
    # its place, and the field says so.
    sevens = np.flatnonzero((labels[:2000] == 7) & (p.argmax(1) == 7))
    clearest, closest = sevens[np.argmin(p[sevens, :4].max(1))], sevens[np.argmax(p[sevens, :4].max(1))]
    assert p[clearest, :4].max() < 1e-4
    cells[0] = reading_from_probabilities(p[clearest])
    field = read_field(spec, cells, threshold=0.85)
    assert field.value == "76051999" and field.reasons[0] == "'76051999' does not fit the field's pattern"
    # The one they come closest to: the likeliest date is read instead.
    cells[0] = reading_from_probabilities(p[closest])
    field = read_field(spec, cells, threshold=0.85)
    assert field.status == "review" and field.reasons[0] == "read '76051999', which does not fit the field's pattern"
    assert re.fullmatch(spec.pattern, field.value) and field.value[2:] == "051999"
    log_p = np.log(np.stack([c.probabilities[:10] for c in cells]))
    dates = [f"{d:02d}{m:02d}{y}" for d in range(1, 32) for m in range(1, 13) for y in range(1900, 2100)]
    digits = np.array([[int(ch) for ch in s] for s in dates])
    assert field.value == dates[int(np.argmax(log_p[np.arange(8), digits].sum(1)))]
    assert field.confidence < 0.85  # the product of what each box gives the digits now read
    assert pipeline.runner_up(field.digits[0])[0] == "7"  # the reviewer is offered what was read


def test_a_date_is_as_sure_as_its_share_of_the_dates_the_boxes_may_hold(template, classifier, mnist_test):
    """A real MNIST 1 that the model half takes for a 7, in the month's first box of the demo
    form's date: no month starts with 7, so the date is surer than the box alone says; its
    confidence is its share of every date the pattern allows (all enumerated here). The same 1
    in the year's last box, where a 7 fits as well, leaves the date as unsure as the box."""
    from formreader.reading.classify import reading_from_probabilities
    from formreader.reading.fields import read_field

    images, labels = mnist_test
    p = classifier.cell_probabilities(images[:3000].astype(np.float32) / 255.0)
    ones = np.flatnonzero((labels[:3000] == 1) & (p.argmax(1) == 1))
    doubtful = ones[np.argmax(p[ones, 7])]
    assert p[doubtful, 7] > 0.1  # the 7 is a real alternative
    sure = [np.flatnonzero((labels[:3000] == d) & (p.max(1) > 0.999))[0] for d in range(10)]
    spec = template.fields[1]

    def cells(written: str, doubtful_at: int):
        return [reading_from_probabilities(p[doubtful if i == doubtful_at else sure[int(d)]]) for i, d in enumerate(written)]

    plain = lambda field: float(np.prod([c.confidence for c in field.digits]))  # noqa: E731
    dates = [f"{d:02d}{m:02d}{y}" for d in range(1, 32) for m in range(1, 13) for y in range(1900, 2100)]
    digits = np.array([[int(ch) for ch in s] for s in dates])

    field = read_field(spec, cells("15121991", 2), threshold=0.85)
    log_p = np.log(np.stack([c.probabilities[:10] for c in field.digits]))
    share = np.exp(log_p[np.arange(8), digits].sum(1))
    assert field.value == "15121991"
    assert field.confidence == pytest.approx(share[dates.index("15121991")] / share.sum(), rel=1e-3)
    assert plain(field) < 0.85 <= field.confidence and field.status == "ok"

    field = read_field(spec, cells("15121991", 7), threshold=0.85)
    assert field.confidence == pytest.approx(plain(field), rel=1e-3) and field.status == "review"


def test_a_check_digit_corrects_a_misread_digit_and_steadies_a_doubtful_one(classifier, mnist_test):
    """16-digit card numbers (a Luhn check digit last) written in boxes with real MNIST digits.
    In one, a digit the model misreads, its true digit the runner-up: no single wrong digit
    passes Luhn, so the field goes to review read as the number that passes, which is the one
    written. In another, a digit read right but with the least sureness of 3,000: what it doubts
    would fail the check, so the field is as sure as its other boxes and passes."""
    from formreader.reading.classify import reading_from_probabilities
    from formreader.reading.fields import luhn_valid, read_field, read_free_field
    from formreader.reading.strings import StringReading
    from formreader.reading.template import Field

    images, labels = mnist_test
    labels = labels[:3000]
    p = classifier.cell_probabilities(images[:3000].astype(np.float32) / 255.0)
    sure = [np.flatnonzero((labels == d) & (p.max(1) > 0.999))[0] for d in range(10)]
    misread = np.flatnonzero((p.argmax(1) != labels) & (np.argsort(p, axis=1)[:, -2] == labels))[0]
    right = np.flatnonzero(p.argmax(1) == labels)
    doubtful = right[np.argmin(p[right].max(1))]
    spec = Field("card", tuple((40 * i, 0, 36, 36) for i in range(16)), length=16, check="luhn")

    def card(odd: int, at: int) -> tuple[str, list]:
        """A valid number with the MNIST digit `odd` in box `at` (as written), the rest sure digits."""
        body = list("453957876362148")
        body[at] = str(labels[odd])
        number = next(n for n in ("".join(body) + str(c) for c in range(10)) if luhn_valid(n))
        return number, [reading_from_probabilities(p[odd if i == at else sure[int(d)]]) for i, d in enumerate(number)]

    number, cells = card(misread, 5)
    assert not luhn_valid("".join(c.digit for c in cells))  # read as is, the number fails
    field = read_field(spec, cells, threshold=0.85)
    assert field.status == "review" and field.reasons[0].endswith("which fails its luhn check digit")
    assert field.value == number

    number, cells = card(doubtful, 3)
    field = read_field(spec, cells, threshold=0.85)
    plain = float(np.prod([c.confidence for c in field.digits]))
    assert field.value == number and plain < 0.85 <= field.confidence and field.status == "ok"

    # A free field's reading is held to its check digit too.
    free = Field("card", kind="free", box=(0, 0, 400, 40), check="luhn")
    wrong = number[:-1] + str((int(number[-1]) + 1) % 10)
    reading = StringReading(wrong, wrong, 0.99, [], [], [])
    assert read_free_field(free, reading).reasons == [f"'{wrong}' fails its luhn check digit"]


@pytest.fixture()
def messy_batch(tmp_path):
    """The samples plus every kind of bad input, in one folder."""
    batch = tmp_path / "batch"
    shutil.copytree(SCANS, batch)
    write_bad_inputs(batch)
    paper = np.clip(np.random.default_rng(0).normal(242, 3, (900, 1290)), 0, 255).astype(np.uint8)
    Image.fromarray(paper).save(batch / "blank.png")
    Image.fromarray(other_form()).save(batch / "other_form.png")
    return batch


EXPECTED_ERRORS = {**BAD_INPUTS, "blank.png": "blank page", "other_form.png": "does not match the template"}


def test_bad_inputs_reported_while_the_batch_goes_on(messy_batch, tmp_path, truth):
    out = tmp_path / "out" / "results.csv"
    run = run_cli("process", messy_batch, "--template", TEMPLATE, "--out", out, "--quiet")
    assert run.returncode == 1  # not every input could be read
    errors = pd.read_csv(out.with_name("results.errors.csv"))
    got = {name: errors[errors.file.str.endswith(name)].error.tolist() for name in EXPECTED_ERRORS}
    for name, reason in EXPECTED_ERRORS.items():
        assert len(got[name]) == 1 and reason in got[name][0], (name, got[name])
    fields = pd.read_csv(out, dtype={"value": str}, keep_default_na=False)
    assert len(fields) == 60  # every good page was still read
    assert not list(out.parent.glob("*.tmp")) and not list(out.parent.glob(".*.tmp"))


def test_cli_outputs_keep_leading_zeros_and_have_all_tables(tmp_path, truth):
    out = tmp_path / "results.csv"
    run = run_cli("process", SCANS, "--template", TEMPLATE, "--out", out, "--quiet")
    assert run.returncode == 0, run.stderr
    fields = pd.read_csv(out, dtype={"value": str}, keep_default_na=False)
    assert list(fields.columns[:7]) == ["file", "page", "field", "value", "text", "confidence", "status"]
    assert fields.confidence.between(0, 1).all() and set(fields.status) <= {"ok", "review"}
    phones = fields[fields.field == "phone"]
    assert phones.value.str.startswith("0").all()  # every phone number starts with 0 and keeps it
    # `text` is the number as written on the form: its printed separators in place.
    assert (phones.text.str.replace("-", "") == phones.value).all() and phones.text.str.fullmatch(r"\d{3}-\d{3}-[\d?]{4}").all()
    wide = pd.read_csv(tmp_path / "results.wide.csv", dtype=str, keep_default_na=False)
    assert len(wide) == 10 and {"customer_no", "phone", "review"} <= set(wide.columns)
    assert sorted(wide.phone) == sorted(phones.text) and wide.amount.str.fullmatch(r"\d*\.\d\d|").all()
    digits = pd.read_csv(tmp_path / "results.digits.csv", dtype={"digit": str}, keep_default_na=False)
    assert len(digits) == 10 * 42
    assert pd.read_csv(tmp_path / "results.errors.csv").empty


def test_resume_keeps_finished_files(tmp_path, template, classifier):
    journal_path = tmp_path / "r.partial.jsonl"
    first = list(process_paths([SCANS / "fax_b.tif"], template, classifier, journal=Journal(journal_path)))
    # A crash here leaves the journal; a half-written line at its end is ignored.
    with open(journal_path, "a") as fh:
        fh.write('{"kind": "page", "source": "cut sh')
    journal = Journal(journal_path, resume=True)
    assert list(journal.done.values()) == [3]
    read_now = list(process_paths([SCANS / "fax_b.tif", SCANS / "phone_d.jpg"], template, classifier, journal=journal))
    assert [Path(r["source"]).name for r in read_now] == ["phone_d.jpg"]  # the finished file is not read again
    assert list(journal_records(journal_path)) == first + read_now
    lines = [json.loads(line) for line in journal_path.read_text().splitlines()]
    assert sum(rec["kind"] == "file_done" for rec in lines) == 2


def test_a_file_is_recorded_done_only_once_its_pages_are_on_disk(tmp_path, template, classifier, monkeypatch):
    """The journal waits for the disk once a file, before the line that says the file is done
    (a machine's crash can then lose only files that resume reads again), not once a line."""
    journal_path = tmp_path / "r.partial.jsonl"
    synced, fsync = [], os.fsync
    lines = lambda: journal_path.read_text().count("\n") if journal_path.exists() else 0  # noqa: E731
    monkeypatch.setattr(pipeline.os, "fsync", lambda fd: synced.append(lines()) or fsync(fd))
    journal = Journal(journal_path)
    list(process_paths([SCANS / "batch_a.pdf", SCANS / "fax_b.tif"], template, classifier, journal=journal))
    journal.close()
    kinds = [json.loads(line)["kind"] for line in journal_path.read_text().splitlines()]
    assert kinds == ["run", *["page"] * 4, "file_done", *["page"] * 3, "file_done", "run_done"]
    # Synced: the new journal (before it takes the old one's place), the pages of each file
    # before its end is written, the run's end.
    assert synced == [0, 5, 9, 11]


def _in_worker(fn, item):
    """Run a pool task and say which process ran it."""
    return os.getpid(), fn(item)


class _TracedPool(ProcessPoolExecutor):
    """The pipeline's process pool, recording what it was given and which worker did each task."""

    tasks: list = []
    pids: list = []

    def submit(self, fn, item):
        if fn is not pipeline._read_or_error:  # the pool starting its workers (ReadingPool)
            return super().submit(fn, item)
        _TracedPool.tasks.append(item)
        future = super().submit(_in_worker, fn, item)

        class Traced:
            def result(self):
                pid, value = future.result()
                _TracedPool.pids.append(pid)
                return value

        return Traced()


def test_workers_give_the_same_results_page_by_page(template, classifier, sample_records, monkeypatch):
    """With workers, each page of a PDF is a task of its own, read whole (rendered, segmented,
    classified, decided) by a worker process, so one long PDF uses every core and the main
    process, which only records, never holds the many cores back; the results are those of one
    process."""
    monkeypatch.setattr(pipeline, "ProcessPoolExecutor", _TracedPool)
    decided_here, decide = [], pipeline.read_segmented
    monkeypatch.setattr(pipeline, "read_segmented", lambda *a, **k: decided_here.append(a) or decide(*a, **k))
    parallel = list(process_paths([SCANS], template, classifier, workers=2))
    assert parallel == sample_records
    assert not decided_here  # the main process classified nothing
    pdf_tasks = [t for t in _TracedPool.tasks if str(t.source).endswith("batch_a.pdf")]
    assert [(type(t), t.page) for t in pdf_tasks] == [(PdfPage, n) for n in (1, 2, 3, 4)]
    # and a one-page image file is decoded there too: the main process reads only its header (a
    # multi-frame TIFF's frames, read in turn, come decoded)
    kinds = {Path(t.source).name: type(t) for t in _TracedPool.tasks}
    assert [kinds[n] for n in ("scan_c.png", "phone_d.jpg", "scan_e.jpg", "fax_b.tif")] == [ImageFrame] * 3 + [Page]
    assert len(_TracedPool.pids) == len(sample_records) and os.getpid() not in _TracedPool.pids


def test_a_reading_pool_starts_its_workers_before_it_is_handed_what_they_read_with(template, classifier, sample_records):
    """`formreader process` makes its pool before it loads the template and the models, so that
    the workers' start (an interpreter and its imports each) overlaps that loading: the workers
    are running as soon as the pool is made; handed the state later, they read as a pool made
    with it does; a pool closed before it was handed one (the template was bad) stops them."""
    before = set(multiprocessing.active_children())
    with ReadingPool(2) as pool:
        started = [p for p in multiprocessing.active_children() if p not in before]
        assert len(started) == 2 and all(p.is_alive() for p in started)
        assert list(process_paths([SCANS], template, classifier, workers=pool)) == sample_records
        assert all(p.is_alive() for p in started)  # the pool is its owner's to close
    assert not any(p.is_alive() for p in started)
    unused = ReadingPool(2)
    started = [p for p in multiprocessing.active_children() if p not in before]
    unused.close()
    assert len(started) == 2 and not any(p.is_alive() for p in started)


def test_inspect_draws_the_overlay(tmp_path):
    out = tmp_path / "overlay.png"
    run = run_cli("inspect", SCANS / "batch_a.pdf", "--page", 3, "--template", TEMPLATE, "--out", out)
    assert run.returncode == 0, run.stderr
    img = cv2.imread(str(out))
    assert img.shape == (874, 1240, 3)
    # Cells are drawn in green (ok) or orange (review): colour only where the boxes are.
    coloured = (np.abs(img[..., 1].astype(int) - img[..., 2].astype(int)) > 60).mean()
    assert 0.002 < coloured < 0.2
    assert "customer_no" in run.stdout and "registration quality" in run.stdout


def test_cli_bad_template_is_a_usage_error(tmp_path):
    bad = tmp_path / "t.yaml"
    bad.write_text("reference: nothing.png\nfields: []\n")
    run = run_cli("process", SCANS, "--template", bad, "--out", tmp_path / "r.csv")
    assert run.returncode == 2 and str(bad) in run.stderr


def test_records_stream_page_by_page(template, classifier, monkeypatch):
    """Each page's record comes back as soon as the page is read, so the progress bar counts
    pages and the main process need not hold a batch's records."""
    from formreader.reading.ingest import count_pages

    assert [count_pages(SCANS / n) for n in ("batch_a.pdf", "fax_b.tif", "scan_c.png")] == [4, 3, 1]
    read, read_or_error = [], pipeline._read_or_error
    monkeypatch.setattr(pipeline, "_read_or_error", lambda *a: read.append(a[0].page) or read_or_error(*a))
    reading = process_paths([SCANS / "fax_b.tif", SCANS / "scan_c.png"], template, classifier)
    assert next(reading)["page"] == 1 and read == [1]
    assert [r["page"] for r in reading] == [2, 3, 1] and read == [1, 2, 3, 1]


def test_a_dask_cluster_gives_the_local_results(template, classifier, sample_records, tmp_path, monkeypatch):
    """The same batch on a real Dask LocalCluster (worker processes) reads what a local run reads;
    every page travels to the workers, which may not see the files (test_ingest.py reads such
    pages with their files gone)."""
    from distributed import LocalCluster

    from formreader.export import write_results

    sent, carried = [], pipeline.carried
    monkeypatch.setattr(pipeline, "carried", lambda task: sent.append((Path(task.source).name, task.page)) or carried(task))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        records = list(process_paths([SCANS], template, classifier, scheduler=cluster.scheduler_address))
    assert records == sample_records
    pages = [(Path(r["source"]).name, r["page"]) for r in records]
    # each page with its data; the frames of the multi-frame TIFF travel decoded
    assert sent == [(name, page) for name, page in pages if name != "fax_b.tif"] and len(sent) == len(pages) - 3
    # and so the CSVs written from them, byte for byte
    cluster_csvs = write_results(records, tmp_path / "cluster" / "r.csv")
    local_csvs = write_results(sample_records, tmp_path / "local" / "r.csv")
    assert [p.read_bytes() for p in cluster_csvs.values()] == [p.read_bytes() for p in local_csvs.values()]


def test_an_unreachable_scheduler_is_a_clear_refusal(tmp_path):
    """A scheduler's address that refuses connections, or whose host does not exist, is refused
    at once (Dask's client alone tried again for 20 s), and the run, stopped before its first page,
    leaves no journal that the next run, with the address mended, must be told to resume."""
    for address in ("tcp://127.0.0.1:9", "tcp://no-such-host.invalid:8786"):
        run = run_cli("process", SCANS / "scan_c.png", "-t", TEMPLATE, "-o", tmp_path / "r.csv", "--scheduler", address)
        assert run.returncode == 2 and f"cannot reach the Dask scheduler at {address}" in run.stderr
    again = run_cli("process", SCANS / "scan_c.png", "-t", TEMPLATE, "-o", tmp_path / "r.csv", "-q")
    assert again.returncode == 0, again.stderr
    assert len(pd.read_csv(tmp_path / "r.csv", dtype={"value": str}, keep_default_na=False)) == 6


def test_a_batch_of_three_forms_and_an_unknown_one(tmp_path, mnist_test):
    """process -t A -t B -t C: each page read as the form it is (a template column, a wide sheet
    per form); a page of a fourth form, which no template describes, is an error row."""
    from formreader.reading.template import template_yaml
    from formreader.training.synth import DPI, scanned_free_forms

    from .test_register import other_form

    batch = tmp_path / "inbox"
    batch.mkdir()
    shutil.copy(SCANS / "scan_c.png", batch / "order_1.png")
    shutil.copy(SCANS / "batch_a.pdf", batch / "orders.pdf")  # four pages, one upside down
    shutil.copy(SCANS.parent / "checks" / "check_b.png", batch / "check_1.png")
    shutil.copy(SCANS.parent / "checks" / "check_c.jpg", batch / "check_2.jpg")
    free, items = scanned_free_forms(*mnist_test, 2, seed=5)
    for i, (page, _) in enumerate(items):
        Image.fromarray(page.image).save(batch / f"return_{i}.png", dpi=(page.dpi, page.dpi))
    Image.fromarray(scan(other_form(), np.random.default_rng(3))).save(batch / "invoice.png", dpi=(DPI, DPI))
    Image.fromarray(free.reference).save(tmp_path / "free_form.png", dpi=(DPI, DPI))
    (tmp_path / "free_form.yaml").write_text(template_yaml(list(free.fields), "free_form.png", DPI, "free_form"))

    out = tmp_path / "r.csv"
    templates = ["-t", TEMPLATE, "-t", TEMPLATE.with_name("bank_check.yaml"), "-t", tmp_path / "free_form.yaml"]
    run = run_cli("process", batch, *templates, "-o", out, "-q")
    assert run.returncode == 1, run.stderr  # the invoice could not be read
    fields = pd.read_csv(out, dtype=str, keep_default_na=False)
    forms = fields.groupby("file").template.agg(set).to_dict()
    expect = {"order_1.png": "demo_form", "orders.pdf": "demo_form", "check_1.png": "bank_check", "check_2.jpg": "bank_check",
              "return_0.png": "free_form", "return_1.png": "free_form"}
    assert {name.split("/")[-1]: t for name, t in forms.items()} == {k: {v} for k, v in expect.items()}
    errors = pd.read_csv(tmp_path / "r.errors.csv", dtype=str, keep_default_na=False)
    assert len(errors) == 1 and errors.file.iloc[0].endswith("invoice.png") and "matches no template" in errors.error.iloc[0]
    for form, pages in (("demo_form", 5), ("bank_check", 2), ("free_form", 2)):
        wide = pd.read_csv(tmp_path / f"r.wide.{form}.csv", dtype=str, keep_default_na=False)
        names = set(fields[fields.template == form].field)
        assert len(wide) == pages and names <= set(wide.columns) and not (set(fields.field) - names) & set(wide.columns)
    from openpyxl import load_workbook

    assert run_cli("export", out, "--xlsx", tmp_path / "r.xlsx").returncode == 0
    book = load_workbook(tmp_path / "r.xlsx")
    assert sorted(book.sheetnames[:3]) == ["bank_check", "demo_form", "free_form"]
    assert book.sheetnames[3:] == ["errors", "settings"]
    check_fields = dict.fromkeys(fields[fields.template == "bank_check"].field)
    assert [c.value for c in book["bank_check"][1]] == ["file", "page", *check_fields]
    # The same template named twice is read once; two templates of one name are refused.
    again = run_cli("process", batch / "order_1.png", "-t", TEMPLATE, "-t", TEMPLATE, "-o", tmp_path / "s.csv", "-q")
    assert again.returncode == 0, again.stderr
    twin = tmp_path / "twin.yaml"
    twin.write_text(TEMPLATE.read_text().replace("reference: demo_form.png", f"reference: {TEMPLATE.with_suffix('.png')}"))
    clash = run_cli("process", batch / "order_1.png", "-t", TEMPLATE, "-t", twin, "-o", tmp_path / "t.csv", "-q")
    assert clash.returncode == 2 and "two templates are named 'demo_form'" in clash.stderr


@pytest.mark.parametrize("style", ["samples' form", "combs of short ticks"])
def test_a_template_drawn_a_few_pixels_off_reads_no_box_as_a_digit(style, classifier, mnist_test):
    """Boxes drawn as full frames or as short ticks on a base line, read with a hand-made
    template whose cells are a little larger than the boxes (their lines inside the cells):
    the form's own print is never read as strokes, so the fields read as with the exact
    template, but for a borderline digit flagged either way (before: an empty 4-box field read
    '1111' with confidence 0.96; up to 23 of 120 fields wrong but ok)."""
    from dataclasses import replace

    from formreader.reading.register import prepare_reference
    from formreader.training.synth import scanned_forms

    template, items = scanned_forms(style, *mnist_test, 6, seed=31)
    sloppy = replace(template, fields=tuple(
        replace(f, cells=tuple((x - 3, y - 2, w + 6, h + 4) for x, y, w, h in f.cells)) for f in template.fields
    ))
    readings = {}
    for name, tpl in (("exact", template), ("sloppy", sloppy)):
        features = prepare_reference(tpl.reference)
        readings[name] = [(f.value, f.status) for page, _ in items for f in read_page(page, tpl, classifier, features).fields]
    truths = [truth[f.name] for _, truth in items for f in template.fields]
    # A field may differ only by a borderline digit, and then both readings are flagged.
    differ = [(e, s) for e, s in zip(readings["exact"], readings["sloppy"]) if e[0] != s[0]]
    assert len(differ) <= 2 and all(e[1] != "ok" and s[1] != "ok" for e, s in differ), differ
    assert sum(v == t for (v, _), t in zip(readings["sloppy"], truths)) >= 0.85 * len(truths)


def test_boxed_fields_go_to_review_under_the_models_threshold_unless_one_is_given(template, classifier, sample_records):
    """By default a boxed field is flagged for its confidence under the threshold `formreader
    calibrate` chose for the model; a threshold given is used instead, for every field."""
    low = [f for r in sample_records for f in r["fields"] if any(x.startswith("low confidence") for x in f["reasons"])]
    sure = [f for r in sample_records for f in r["fields"] if not any(x.startswith("low confidence") for x in f["reasons"])]
    assert low and all(f["confidence"] < classifier.review_threshold for f in low)
    assert all(f["confidence"] >= classifier.review_threshold for f in sure)
    given = list(process_paths([SCANS], template, classifier, threshold=0.0))
    assert not any(x.startswith("low confidence") for r in given for f in r["fields"] for x in f["reasons"])


def test_resume_with_a_recalibrated_model_is_refused(tmp_path):
    """The same network with another field calibration reads other statuses: the journal's
    model fingerprint covers the card's calibration, so such a resume is refused."""
    import json
    import shutil

    from formreader.reading.classify import MODELS

    models = tmp_path / "models"
    shutil.copytree(MODELS, models, ignore=shutil.ignore_patterns("*.md"))
    out = tmp_path / "r.csv"
    first = run_cli("process", SCANS / "scan_c.png", "-t", TEMPLATE, "-o", out, "-q", "--model", models / "digits.keras")
    assert first.returncode == 0, first.stderr
    journal = tmp_path / "r.journal.jsonl"
    journal.write_text("\n".join(journal.read_text().splitlines()[:-1]) + "\n")  # interrupted: no end
    card = models / "digits.json"
    meta = json.loads(card.read_text())
    card.write_text(json.dumps({**meta, "field_power": meta["field_power"] * 1.5}))
    resumed = run_cli(
        "process", SCANS / "scan_c.png", "-t", TEMPLATE, "-o", out, "-q", "--resume", "--model", models / "digits.keras"
    )
    assert resumed.returncode == 2 and "other settings (model)" in resumed.stderr, resumed.stderr
