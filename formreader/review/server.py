"""The drawing pad: write a number with the mouse (or a finger) and see what formreader reads.

The student project's tkinter canvas, as a small web page served on localhost (Flask): the
drawing goes through exactly the code that reads a scanned field (`formreader.read_number`:
ink, blobs, cuts of touching digits, MNIST normalisation, the calibrated model), and the page
shows each digit read with its confidence, and whether formreader would send it to review.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from flask import Flask, abort, jsonify, request, send_from_directory

STATIC = Path(__file__).resolve().parent / "static"
MAX_UPLOAD = 4 * 1024 * 1024
MAX_DRAWING_PIXELS = 4_000_000  # a drawing pad's canvas is a fraction of this
# The review station sends its list of fields in windows: a batch of 100,000 pages flags about
# 160,000 fields: 85 MB of JSON and some 40 s of the server's time to send whole.
WINDOW = 100
MAX_WINDOW = 1000


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _guard(app: Flask, token: str | None, loopback_only: str) -> None:
    """Refuse what is not the user's own: a request whose Host is not this machine by a loopback
    name (unless a token guards the app), a POST from another web page (Origin), and, with a
    `token`, any request that does not carry it (?token= in the URL or the X-Formreader-Token
    header). Refusals are JSON with the reason."""

    @app.before_request
    def guard():
        host = urlsplit("//" + request.host).hostname or ""
        if token is None and not is_loopback(host):
            abort(403, loopback_only)
        origin = request.headers.get("Origin")
        if request.method == "POST" and origin and urlsplit(origin).netloc != request.host:
            abort(403, "requests from other web pages are refused")
        given = request.args.get("token") or request.headers.get("X-Formreader-Token") or ""
        if token is not None and not hmac.compare_digest(given.encode(), token.encode()):
            abort(403, "a token is needed: use the URL formreader printed")

    @app.errorhandler(400)
    @app.errorhandler(403)
    @app.errorhandler(404)
    @app.errorhandler(409)
    @app.errorhandler(413)
    def refused(e):
        return jsonify(error=e.description), e.code


def create_app(model: Path | None = None, token: str | None = None) -> Flask:
    """The Flask app: GET / is the pad, POST /read takes a PNG of the drawing (dark on light).

    What keeps it the user's own: a request whose Host is not this machine by a loopback name
    (or, with a `token`, any host) is refused, so a web page cannot reach it through DNS
    rebinding; a POST from another origin (any page the user visits) is refused; with a
    `token` (`formreader pad` makes one when it listens beyond loopback) every request must
    carry it, in the URL (?token=) or the X-Formreader-Token header. Bodies over 4 MB get 413,
    drawings over 4 megapixels too.
    """
    from formreader.api import get_classifier, read_number
    from formreader.reading.ingest import decode_image

    get_classifier(model)  # load the model now, not at the first drawing
    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = MAX_UPLOAD
    _guard(app, token, "this pad answers on 127.0.0.1 or localhost only")

    @app.get("/")
    def pad():
        return send_from_directory(STATIC, "pad.html")

    @app.post("/read")
    def read():
        if (request.content_length or 0) > MAX_UPLOAD:
            abort(413, f"the drawing is larger than {MAX_UPLOAD // 2**20} MB")
        data = request.get_data()  # over MAX_CONTENT_LENGTH without a length: 413 from Flask
        try:
            image = decode_image(data, max_pixels=MAX_DRAWING_PIXELS)
        except OverflowError as e:
            abort(413, str(e))
        except Exception:  # noqa: BLE001 - any undecodable upload is the client's error
            return jsonify(error="the request body must be a PNG or JPEG image"), 400
        reading = read_number(image, model)
        digits = [
            {
                "digit": d.digit,
                "confidence": round(d.confidence, 4),
                "top": [
                    [str(k) if k < 10 else "?", round(float(d.probabilities[k]), 4)] for k in (-d.probabilities).argsort()[:3]
                ]
                if d.probabilities is not None
                else [],
            }
            for d in reading.digits
        ]
        return jsonify(
            value=reading.value,
            raw=reading.raw,
            confidence=round(reading.confidence, 4) if reading.raw else None,
            review=reading.status == "review" and bool(reading.raw),
            reasons=reading.reasons,
            digits=digits,
            cuts=reading.cuts,
        )

    return app


class ResultsWriter:
    """Writes a batch's results again in a thread of its own, as often as asked but never two at
    once: decisions made while the results are being written go into the next writing, so a
    clerk's click waits for the decision's journal line only, never for the CSVs and workbook of
    a batch of thousands of pages (0.2 s per 200 pages with a workbook). `wait` returns once
    everything asked so far is written. A writing that fails is reported on stderr; the
    decisions stay in their journal, and the next decision or start writes them again."""

    def __init__(self, write: Callable[[], None]):
        self._write = write
        self._asked = self._done = 0
        self._cond = threading.Condition()
        threading.Thread(target=self._run, daemon=True, name="formreader-results-writer").start()

    def ask(self) -> None:
        with self._cond:
            self._asked += 1
            self._cond.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._done >= self._asked, timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._done < self._asked)
                asked = self._asked
            try:
                self._write()
            except Exception as e:  # noqa: BLE001 - the decisions are journaled: a later writing catches up
                print(f"formreader: could not write the results again: {type(e).__name__}: {e}", file=sys.stderr)
            with self._cond:
                self._done = asked
                self._cond.notify_all()


def create_review_app(results: Path, reviewer: str, token: str) -> Flask:
    """The review station for the results of `process --out results` (formreader.review.decisions).

    GET / is the page; GET /api/items lists the flagged fields (least sure first) or, with
    ?field=NAME, one field on every page, a window of ?count= of them from ?start=, with the
    list's length and the journal's `version` (without ?start=, the window holding the first
    field not decided, and `first` and `decided`: its position and how many are); POST /api/decide
    takes {file, page, field, action, value}, writes it to the review journal and answers; the
    CSVs (and results.xlsx beside them, if there is one) are then written again atomically by a
    ResultsWriter (the app's extensions["formreader.results_writer"]; also at the start, for
    decisions a killed station had not written yet); GET /view/NAME is a page picture, only
    those of these results. Every request must carry `token`; the Host must be a loopback name."""

    from formreader.export import (
        JournalIndex,
        corrections_path_for,
        display_path,
        journal_path_for,
        journal_records,
        reviews_path_for,
        rewrite_results,
        view_name,
        views_path_for,
        write_atomically,
    )
    from formreader.reading.locate import bounding_box
    from formreader.review.decisions import (
        ACTIONS,
        ReviewError,
        apply_decisions,
        decide,
        field_key,
        find_field,
        labelled_cells,
        load_decisions,
        record_decision,
        review_list,
        review_progress,
        review_window,
    )

    journal = journal_path_for(results)
    if not journal.exists():
        raise FileNotFoundError(f"{journal} not found: review needs the results of `formreader process --out {results}`")
    # The station holds where each page's record lies and which fields were flagged, not the
    # records: a batch of 10,000 pages would hold 200 MB of them. The browser asks for the list in
    # windows, whose pages are read from the journal when asked for.
    index = JournalIndex(journal)
    reviews, views, corrections = reviews_path_for(results), views_path_for(results), corrections_path_for(results)
    writing = threading.Lock()  # one decision journaled at a time
    writer = ResultsWriter(lambda: rewrite_results(results, apply_decisions(journal_records(journal), load_decisions(reviews))))
    if reviews.exists():
        writer.ask()
    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = 64 * 1024
    _guard(app, token, "the review station answers on 127.0.0.1 or localhost only")

    def item_json(f: dict) -> dict:
        picture = view_name(f["source"], f["page"])
        return {
            "file": f["source"],
            "shown_as": display_path(f["source"]),
            "page": f["page"],
            "field": f["field"],
            "value": f["value"],
            "text": f.get("text") or f["value"],
            "raw": f.get("raw", ""),
            "confidence": f["confidence"],
            "status": f["status"],
            "reasons": f.get("reasons", []),
            "digits": f.get("digits", []),
            "runner_up": f.get("runner_up", []),
            "box": bounding_box(f.get("cells") or []),  # the field on its page picture, template pixels
            "view": picture if (views / picture).exists() else None,
            "reviewed_value": f.get("reviewed_value"),
        }

    @app.get("/")
    def page():
        return send_from_directory(STATIC, "review.html")

    @app.get("/api/items")
    def items():
        field = request.args.get("field") or None
        try:
            count = int(request.args.get("count", WINDOW))
            start = request.args.get("start")
            start = None if start is None else int(start)
        except ValueError:
            abort(400, "start and count are whole numbers")
        if not 0 < count <= MAX_WINDOW or (start is not None and start < 0):
            abort(400, f"count is 1 to {MAX_WINDOW}, start 0 or more")
        index.refresh()
        decisions = load_decisions(reviews)
        keys = review_list(index, field)
        progress = {}
        if start is None:  # the page opens: where to resume, and how far the review has come
            decided, first = review_progress(index, decisions, keys)
            progress, start = {"decided": decided, "first": first}, (first // count) * count
        window = review_window(index, decisions, keys, start, count)
        return jsonify(
            items=[item_json(f) for f in window], start=start, total=len(keys), **progress,
            version="-".join(map(str, index.stamp)), fields=index.fields, reviewer=reviewer,
        )

    @app.post("/api/decide")
    def decide_field():
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            abort(400, "a JSON object is expected: {file, page, field, action, value}")
        try:
            source, number = str(body.get("file")), int(body.get("page", 0))
            records = page_records(source, number)
            decision = decide(
                records, source, number, str(body.get("field")), str(body.get("action")), str(body.get("value", "")), reviewer,
            )
        except (ReviewError, ValueError, TypeError) as e:
            abort(400, str(e))
        with writing:
            record_decision(reviews, decision)
            keep_labelled_digits(decision, records)
        writer.ask()
        return jsonify(status=ACTIONS[decision["action"]], value=decision["value"])

    def page_records(source: str, page: int) -> list[dict]:
        """The one page's record, read from the journal, as the decisions' functions take records."""
        found = index.record(source, page)
        return [found] if found else []

    def keep_labelled_digits(decision: dict, records: list[dict]) -> None:
        """Save the digits of a confirmed or corrected boxed field as labelled crops (the
        corrections folder, LABEL/NAME.png), replacing what an earlier decision on it saved."""
        import cv2

        stem = hashlib.sha256(field_key(decision["file"], decision["page"], decision["field"]).encode()).hexdigest()[:20]
        for old in corrections.glob(f"*/{stem}-*.png"):
            old.unlink()
        picture_path = views / view_name(decision["file"], decision["page"])
        if decision["action"] == "unreadable" or not picture_path.exists():
            return
        field = find_field(records, decision["file"], decision["page"], decision["field"])
        picture = cv2.imread(str(picture_path), cv2.IMREAD_GRAYSCALE)
        for cell, image, label in labelled_cells(field, picture, decision["value"]):
            png = cv2.imencode(".png", np.round(image * 255).astype(np.uint8))[1].tobytes()
            write_atomically(corrections / label / f"{stem}-{cell}.png", png)

    @app.get("/view/<name>")
    def view(name: str):
        index.refresh()
        if name not in index.pictures or not (views / name).exists():
            abort(404, "no such page picture in these results")
        return send_from_directory(views, name, mimetype="image/jpeg")

    app.extensions["formreader.results_writer"] = writer
    return app
