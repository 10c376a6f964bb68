"""The review station: a clerk checks a batch with the keyboard in a real browser (Debian
chromium); every decision is on disk the moment it is made; a killed server loses nothing; only
the holder of the printed token, and only the results' own page pictures, get through."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from formreader import export
from formreader.export import as_number, results_complete
from formreader.review.decisions import ACTIONS, apply_decisions, decide

from .conftest import SCANS, TEMPLATE, run_cli

SCREENSHOTS = os.environ.get("FORMREADER_SCREENSHOTS")  # a folder: the README's pictures are taken here


@pytest.fixture(scope="module")
def processed(tmp_path_factory):
    """The shipped samples read once: results.csv and its companions (page pictures included)."""
    out = tmp_path_factory.mktemp("batch") / "results.csv"
    run = run_cli("process", SCANS, "-t", TEMPLATE, "-o", out, "-q")
    assert run.returncode == 0, run.stderr
    return out


@pytest.fixture
def batch(processed, tmp_path):
    """A fresh copy of the processed batch for one test to change."""
    for f in processed.parent.iterdir():
        (shutil.copytree if f.is_dir() else shutil.copy)(f, tmp_path / f.name)
    return tmp_path / "results.csv"


def start_station(results: Path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "formreader.cli", "review", str(results), "--port", "0", "--reviewer", "clerk"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    line = proc.stdout.readline()
    found = re.search(r"http://127\.0\.0\.1:\d+/\?token=\S+", line)
    assert found, (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc, found.group(0)


def fields_csv(results: Path) -> pd.DataFrame:
    return pd.read_csv(results, dtype=str, keep_default_na=False)


def row(results: Path, decision: dict, timeout: float = 30.0) -> pd.Series:
    """The decision's row of the fields CSV once the station has written the decision into the
    results (it does so in the background), the whole set of CSVs swapped in."""
    deadline = time.monotonic() + timeout
    while True:
        table = fields_csv(results)
        hit = table[(table.file == decision["file"]) & (table.page == str(decision["page"])) & (table.field == decision["field"])]
        assert len(hit) == 1
        written = hit.iloc[0].status == ACTIONS.get(decision["action"]) and results_complete(results)
        if written or time.monotonic() > deadline:
            return hit.iloc[0]
        time.sleep(0.05)


def workbook_values(path: Path, wanted, timeout: float = 30.0) -> list:
    """Every cell value of the workbook's 'fields' sheet, once `wanted` is among them (the
    station writes the workbook after the CSVs)."""
    from openpyxl import load_workbook

    deadline = time.monotonic() + timeout
    while True:
        try:
            values = [c.value for r in load_workbook(path)["fields"].iter_rows() for c in r]
        except (OSError, KeyError, zipfile.BadZipFile):
            values = []
        if wanted in values or time.monotonic() > deadline:
            return values
        time.sleep(0.05)


def decisions(results: Path) -> list[dict]:
    path = results.with_name("results.reviews.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def progress(page) -> str:
    return page.text_content("#progress")


def test_a_batch_reviewed_with_the_keyboard_only(batch, browser):
    from openpyxl import load_workbook

    assert run_cli("export", batch, "--xlsx", batch.with_suffix(".xlsx")).returncode == 0
    flagged = int((fields_csv(batch).status == "review").sum())
    assert flagged >= 5
    proc, url = start_station(batch)
    try:
        page = browser.new_page(viewport={"width": 980, "height": 760})
        page.goto(url)
        page.wait_for_function("document.getElementById('progress').textContent.includes(' of ')")
        assert progress(page) == f"1 of {flagged}"
        page.wait_for_function("document.getElementById('crop').height > 40")  # the field, cut from its page
        if SCREENSHOTS:
            page.screenshot(path=str(Path(SCREENSHOTS) / "review.png"))
        shown = page.input_value("#value")

        page.keyboard.press("Enter")  # 1: the reading is right
        page.wait_for_function("document.getElementById('progress').textContent.startsWith('2 of')")
        first = decisions(batch)[-1]
        assert (first["action"], first["value"], first["by"]) == ("confirm", shown, "clerk")
        got = row(batch, first)
        assert (got.status, got.reviewed_value, got.reviewed_by, got.text) == ("confirmed", shown, "clerk", shown)
        # Its digits are kept as labelled 28x28 crops for `train --extra` (a '?' leaves the cells unlabelled).
        saved = sorted(batch.with_name("results.corrections").glob("*/*.png"))
        assert [p.parent.name for p in saved] == ([] if "?" in shown else sorted(c for c in shown if c.isdigit()))
        assert all(Image.open(p).size == (28, 28) for p in saved)

        page.keyboard.type("0123")  # 2: typed over the pre-filled, selected reading
        page.keyboard.press("Enter")
        page.wait_for_function("document.getElementById('progress').textContent.startsWith('3 of')")
        second = decisions(batch)[-1]
        assert (second["action"], second["value"]) == ("correct", "0123")
        assert (row(batch, second).status, row(batch, second).reviewed_value) == ("corrected", "0123")
        wide = pd.read_csv(batch.with_name("results.wide.csv"), dtype=str, keep_default_na=False)
        on_page = wide[(wide.file == second["file"]) & (wide.page == str(second["page"]))].iloc[0]
        assert on_page[second["field"]] == "0123" and second["field"] not in on_page["review"].split()
        book = load_workbook(batch.with_suffix(".xlsx"))
        # The workbook is written again with the correction: as typed, leading zero kept, or as
        # a number where the template calls the field numeric.
        numeric = dict(book["settings"].iter_rows(min_row=2, values_only=True))["numeric_fields"].split()
        written = as_number("0123")[0] if second["field"] in numeric else "0123"
        assert written in workbook_values(batch.with_suffix(".xlsx"), written)

        page.keyboard.press("x")  # 3: unreadable
        page.wait_for_function("document.getElementById('progress').textContent.startsWith('4 of')")
        third = decisions(batch)[-1]
        assert third["action"] == "unreadable" and row(batch, third).status == "unreadable"

        page.keyboard.press("ArrowUp")  # back to the third: its decision is shown
        page.wait_for_function("document.getElementById('progress').textContent.startsWith('3 of')")
        assert "unreadable" in page.text_content("#decision")
        assert len(decisions(batch)) == 3
    finally:
        proc.kill()  # SIGKILL: no chance to tidy up
        proc.wait()

    proc, url = start_station(batch)  # reopened: it resumes at the first field not decided
    try:
        page.goto(url)
        page.wait_for_function("document.getElementById('progress').textContent.includes(' of ')")
        assert progress(page) == f"4 of {flagged}" and page.text_content("#decided") == "3 decided"
        # One field on every page: the corrected one, its decision shown where it was made.
        page.select_option("#mode", second["field"])
        pages = fields_csv(batch)[["file", "page"]].drop_duplicates().shape[0]
        page.wait_for_function(f"document.getElementById('progress').textContent.endsWith(' of {pages}')")
        for _ in range(pages):
            if page.text_content("#where").find(f"page {second['page']} ") >= 0 and "corrected" in page.text_content("#decision"):
                break
            page.keyboard.press("ArrowDown")
        assert page.input_value("#value") == "0123"
        page.close()
    finally:
        proc.kill()
        proc.wait()

    # A later `process --resume` of the same batch keeps every decision in its CSVs.
    assert run_cli("process", SCANS, "-t", TEMPLATE, "-o", batch, "-q", "--resume").returncode == 0
    assert [row(batch, d).status for d in (first, second, third)] == ["confirmed", "corrected", "unreadable"]


def test_only_the_token_and_the_results_own_pictures_get_through(processed):
    from formreader.export import view_name
    from formreader.review.server import create_review_app

    app = create_review_app(processed, "clerk", token="s3cret")
    client = app.test_client()
    assert client.get("/api/items").status_code == 403
    assert client.get("/api/items?token=wrong").status_code == 403
    assert client.get("/").status_code == 403
    items = client.get("/api/items", headers={"X-Formreader-Token": "s3cret"}).get_json()["items"]
    name = view_name(items[0]["file"], items[0]["page"])
    picture = client.get(f"/view/{name}?token=s3cret")
    assert picture.status_code == 200 and picture.data[:2] == b"\xff\xd8"  # a JPEG
    assert client.get(f"/view/{name}").status_code == 403
    for outside in ("..%2Fresults.csv", "../results.csv", "results.csv", "0" * 24 + ".jpg", "%2Fetc%2Fpasswd"):
        assert client.get(f"/view/{outside}?token=s3cret").status_code == 404, outside
    body = {"file": items[0]["file"], "page": items[0]["page"], "field": items[0]["field"], "action": "confirm"}
    other_site = client.post("/api/decide?token=s3cret", json=body, headers={"Origin": "http://evil.example"})
    assert other_site.status_code == 403
    bad_values = ({**body, "action": "correct", "value": v} for v in ("=1+1", "12a", "-5"))
    for bad in (*bad_values, {**body, "field": "nope"}, {**body, "action": "delete"}):
        res = client.post("/api/decide?token=s3cret", json=bad)
        assert res.status_code == 400 and res.get_json()["error"]
    assert not processed.with_name("results.reviews.jsonl").exists()  # nothing refused was recorded


def test_a_click_never_waits_for_the_results_to_be_written(batch, monkeypatch):
    """A decision is answered once it is journaled; the CSVs are written again in the background,
    the decisions made meanwhile together; a station stopped before writing them (killed) writes
    them when it starts again."""
    from formreader.review.server import create_review_app

    release, rewrite, writings = threading.Event(), export.rewrite_results, []
    monkeypatch.setattr(export, "rewrite_results", lambda *a: writings.append(1) or release.wait(30) and rewrite(*a))
    app = create_review_app(batch, "clerk", token="t")
    client = app.test_client()
    items = client.get("/api/items?token=t").get_json()["items"][:3]
    bodies = [{"file": f["file"], "page": f["page"], "field": f["field"], "action": "correct", "value": "0123"} for f in items]
    assert client.post("/api/decide?token=t", json=bodies[0]).status_code == 200
    while not writings:  # the first click's writing has begun, and is held up
        time.sleep(0.01)
    for body in bodies[1:]:  # two more clicks meanwhile: each answered at once
        assert client.post("/api/decide?token=t", json=body).status_code == 200
    assert len(decisions(batch)) == 3 and fields_csv(batch).status.isin(["corrected"]).sum() == 0
    writer = app.extensions["formreader.results_writer"]
    assert not writer.wait(timeout=0.2)
    release.set()
    assert writer.wait(timeout=30)
    assert [row(batch, b, timeout=0).status for b in bodies] == ["corrected"] * 3
    assert len(writings) == 2  # the first click's writing, then the two clicks made meanwhile together

    # A station killed before it wrote a decision: the next one writes it when it starts.
    release.clear()
    more = {**bodies[0], "value": "0456"}
    assert client.post("/api/decide?token=t", json=more).status_code == 200  # its writing held up
    monkeypatch.setattr(export, "rewrite_results", rewrite)
    again = create_review_app(batch, "clerk", token="t")
    assert again.extensions["formreader.results_writer"].wait(timeout=30)
    assert row(batch, more, timeout=0).reviewed_value == "0456"
    release.set()
    assert writer.wait(timeout=30)  # the first station's held-up writing ends too


def test_a_decision_holds_only_for_the_reading_it_was_made_on():
    records = [{"source": "a.pdf", "page": 1, "fields": [{"field": "n", "value": "17", "status": "review", "confidence": 0.5}]}]
    d = decide(records, "a.pdf", 1, "n", "correct", "71", "clerk")
    key = json.dumps(["a.pdf", 1, "n"])
    assert next(apply_decisions(records, {key: d}))["fields"][0]["status"] == "corrected"
    reread = [{**records[0], "fields": [{**records[0]["fields"][0], "value": "11"}]}]
    assert next(apply_decisions(reread, {key: d}))["fields"][0]["status"] == "review"
    assert records[0]["fields"][0]["status"] == "review"  # the records given are not changed


def test_the_station_reads_each_page_from_the_journal_as_it_is_now(batch):
    """The station keeps where each page's record lies in the journal, not the records: after the
    journal changed on disk (every line elsewhere, a page read otherwise), a decision finds the
    field as the journal now has it, and the list shows the new reading."""
    from formreader.review.server import create_review_app

    app = create_review_app(batch, "clerk", token="t")
    client = app.test_client()
    item = client.get("/api/items?token=t").get_json()["items"][0]
    journal = export.journal_path_for(batch)
    lines = journal.read_text().splitlines(keepends=True)
    records = [json.loads(line) for line in lines]
    target = next(r for r in records if (r.get("source"), r.get("page")) == (item["file"], item["page"]))
    field = next(f for f in target["fields"] if f["field"] == item["field"])
    field["value"] = field["text"] = field["value"] + "9"  # the rerun read it otherwise
    # A run line ahead of the rest shifts every page's line; records rewritten in reverse.
    rest = [json.dumps(r) + "\n" if r is target else line for r, line in zip(records[1:], lines[1:])]
    rewritten = [lines[0], lines[0], *rest[::-1]]
    journal.write_text("".join(rewritten))
    stale = {"file": item["file"], "page": item["page"], "field": item["field"], "action": "confirm"}
    answer = client.post("/api/decide?token=t", json=stale)
    assert answer.status_code == 200 and answer.get_json()["value"] == field["value"]
    assert decisions(batch)[-1]["read"] == field["value"]  # the decision is on the reading the journal has now
    listed = client.get("/api/items?token=t").get_json()["items"]
    assert any(i["file"] == item["file"] and i["page"] == item["page"] and i["value"] == field["value"] for i in listed)
    assert app.extensions["formreader.results_writer"].wait(timeout=30)
    assert row(batch, stale).reviewed_value == field["value"]


def repeated_batch(batch: Path, times: int) -> Path:
    """The batch's pages recorded `times` over under other file names (each with its picture), as
    a large batch would be: its journal is written again, its CSVs are not needed."""
    journal = export.journal_path_for(batch)
    lines = journal.read_text().splitlines(keepends=True)
    records = [json.loads(line) for line in lines if json.loads(line).get("kind") == "page"]
    views = export.views_path_for(batch)
    out = [lines[0]]
    for k in range(times):
        for rec in records:
            copy = {**rec, "source": f"{k:03d}-{rec['source']}"}
            picture = views / export.view_name(rec["source"], rec["page"])
            shutil.copy(picture, views / export.view_name(copy["source"], copy["page"]))
            out.append(json.dumps(copy) + "\n")
    journal.write_text("".join(out))
    return batch


def test_the_list_comes_in_windows_that_make_the_whole(batch):
    """A large batch's fields to review are sent a window at a time: the windows together are
    every flagged field, least confident first; without `start` the window holding the first
    field not decided comes, with how many are decided; one field across the batch likewise."""
    from formreader.review.server import create_review_app

    repeated_batch(batch, 12)
    records = list(export.journal_records(export.journal_path_for(batch)))
    flagged = sorted(
        ((f["confidence"], r["source"], r["page"], f["field"]) for r in records for f in r["fields"] if f["status"] != "ok"),
        key=lambda x: x[0],
    )
    assert len(flagged) > 150
    client = create_review_app(batch, "clerk", token="t").test_client()
    windows = [client.get(f"/api/items?token=t&start={s}&count=64").get_json() for s in range(0, len(flagged) + 64, 64)]
    listed = [(i["confidence"], i["file"], i["page"], i["field"]) for w in windows for i in w["items"]]
    assert listed == flagged and windows[-1]["items"] == []
    assert {w["total"] for w in windows} == {len(flagged)}
    opened = client.get("/api/items?token=t&count=64").get_json()  # the page opens: where to resume
    assert (opened["start"], opened["first"], opened["decided"]) == (0, 0, 0)

    for _, source, page, field in flagged[:70]:  # the first 70 decided: the list resumes at the 71st
        body = {"file": source, "page": page, "field": field, "action": "unreadable"}
        assert client.post("/api/decide?token=t", json=body).status_code == 200
    resumed = client.get("/api/items?token=t&count=64").get_json()
    assert (resumed["start"], resumed["first"], resumed["decided"]) == (64, 70, 70)
    assert [i["status"] for i in resumed["items"][:7]] == ["unreadable"] * 6 + ["review"]

    # One field on every page; a field read `ok` can be decided there too (its reading is read
    # back from the journal, the index holding only the flagged fields').
    name = flagged[0][3]
    fine = next(r for r in records if any(f["field"] == name and f["status"] == "ok" for f in r["fields"]))
    body = {"file": fine["source"], "page": fine["page"], "field": name, "action": "confirm"}
    assert client.post("/api/decide?token=t", json=body).status_code == 200
    on_every_page = client.get(f"/api/items?token=t&field={name}&count=1000").get_json()
    pages = [(r["source"], r["page"]) for r in records if any(f["field"] == name for f in r["fields"])]
    assert [(i["file"], i["page"]) for i in on_every_page["items"]] == pages
    decided_here = sum(1 for _, s, p, f in flagged[:70] if f == name) + 1
    assert on_every_page["decided"] == decided_here > 1
    for bad in ("count=0", "count=1001", "start=-1", "start=x"):
        assert client.get(f"/api/items?token=t&{bad}").status_code == 400, bad


def test_a_clerk_moves_across_windows_in_the_browser(batch, browser):
    """With more fields than a window, the page resumes in a later window and goes back into the
    one before, each fetched when needed."""
    from formreader.review.server import WINDOW, create_review_app

    repeated_batch(batch, 8)
    client = create_review_app(batch, "clerk", token="t").test_client()
    first = client.get(f"/api/items?token=t&start=0&count={WINDOW}").get_json()
    assert first["total"] > WINDOW + 1
    for item in first["items"]:  # the whole first window decided
        body = {"file": item["file"], "page": item["page"], "field": item["field"], "action": "confirm"}
        assert client.post("/api/decide?token=t", json=body).status_code == 200
    proc, url = start_station(batch)
    try:
        page = browser.new_page()
        asked = []
        page.on("request", lambda r: asked.append(r.url) if "/api/items" in r.url else None)
        # The first window's fetch fails once (the station restarting): the clerk is told, and the
        # next visit asks for it again rather than keep the failure. (Its requests fail from the
        # start: the page has no need of that window until the clerk goes back into it.)
        first_window = re.compile(r"/api/items\?.*start=0(&|$)")
        page.route(first_window, lambda route: route.abort())
        page.goto(url)
        page.wait_for_function("document.getElementById('progress').textContent.includes(' of ')")
        assert progress(page) == f"{WINDOW + 1} of {first['total']}"
        assert page.text_content("#decided") == f"{WINDOW} decided"
        assert not any("start=0" in u for u in asked)
        page.keyboard.press("ArrowUp")
        page.wait_for_function("document.getElementById('error').textContent !== ''")
        page.unroute(first_window)
        page.keyboard.press("ArrowDown")
        page.wait_for_function(f"document.getElementById('progress').textContent.startsWith('{WINDOW + 1} of')")
        page.keyboard.press("ArrowUp")  # into the first window, fetched now
        page.wait_for_function("document.getElementById('decision').textContent.startsWith('confirmed')")
        assert progress(page) == f"{WINDOW} of {first['total']}"
        last = first["items"][-1]
        assert f"page {last['page']} " in page.text_content("#where") and page.input_value("#value") == last["text"]
        assert any("start=0" in u for u in asked)
        page.keyboard.press("ArrowDown")
        page.keyboard.press("Enter")  # the 101st confirmed
        page.wait_for_function(f"document.getElementById('progress').textContent.startsWith('{WINDOW + 2} of')")
        assert page.text_content("#decided") == f"{WINDOW + 1} decided"
        assert len(decisions(batch)) == WINDOW + 1
        # A fast clerk: keys pressed while a decision is on its way (held up here for 0.3 s) are
        # for a field not yet shown, and decide nothing.
        page.evaluate("""() => { const send = window.fetch; window.fetch = (url, options) =>
            options && options.method === 'POST' ? new Promise((r) => setTimeout(r, 300)).then(() => send(url, options))
                                                : send(url, options); }""")
        for _ in range(3):
            page.keyboard.press("Enter")
        page.wait_for_function(f"document.getElementById('progress').textContent.startsWith('{WINDOW + 3} of')")
        page.wait_for_timeout(500)  # what a second decision would have taken
        assert len(decisions(batch)) == WINDOW + 2 and progress(page).startswith(f"{WINDOW + 3} of")
        page.close()
    finally:
        proc.kill()
        proc.wait()


def test_pictures_of_pages_added_since_the_station_started_are_served(batch):
    from formreader.review.server import create_review_app

    client = create_review_app(batch, "clerk", token="t").test_client()
    journal = export.journal_path_for(batch)
    rec = next(r for r in export.journal_records(journal) if r.get("fields"))
    added = {**rec, "source": "later.pdf"}
    views = export.views_path_for(batch)
    name = export.view_name(added["source"], added["page"])
    shutil.copy(views / export.view_name(rec["source"], rec["page"]), views / name)
    assert client.get(f"/view/{name}?token=t").status_code == 404  # not of these results yet
    with open(journal, "a", encoding="utf-8") as fh:  # a `process --resume` read one more file
        fh.write(json.dumps(added) + "\n")
    assert client.get(f"/view/{name}?token=t").status_code == 200
