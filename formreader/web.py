"""The drawing pad: write a number with the mouse (or a finger) and see what formreader reads.

The student project's tkinter canvas, as a small web page served on localhost (Flask): the
drawing goes through exactly the code that reads a scanned field (`formreader.read_number`:
ink, blobs, cuts of touching digits, MNIST normalisation, the calibrated model), and the page
shows each digit read with its confidence, and whether formreader would send it to review.
"""

from __future__ import annotations

import hmac
import ipaddress
from pathlib import Path
from urllib.parse import urlsplit

from flask import Flask, abort, jsonify, request, send_from_directory

from formreader.fields import DEFAULT_REVIEW_THRESHOLD

STATIC = Path(__file__).resolve().parent / "static"
MAX_UPLOAD = 4 * 1024 * 1024
MAX_DRAWING_PIXELS = 4_000_000  # a drawing pad's canvas is a fraction of this


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_app(model: Path | None = None, threshold: float = DEFAULT_REVIEW_THRESHOLD, token: str | None = None) -> Flask:
    """The Flask app: GET / is the pad, POST /read takes a PNG of the drawing (dark on light).

    What keeps it the user's own: a request whose Host is not this machine by a loopback name
    (or, with a `token`, any host) is refused, so a web page cannot reach it through DNS
    rebinding; a POST from another origin (any page the user visits) is refused; with a
    `token` (`formreader pad` makes one when it listens beyond loopback) every request must
    carry it, in the URL (?token=) or the X-Formreader-Token header. Bodies over 4 MB get 413,
    drawings over 4 megapixels too.
    """
    from formreader.api import get_classifier, read_number
    from formreader.ingest import decode_image

    get_classifier(model)  # load the model now, not at the first drawing
    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = MAX_UPLOAD

    @app.before_request
    def guard():
        host = urlsplit("//" + request.host).hostname or ""
        if token is None and not is_loopback(host):
            abort(403, "this pad answers on 127.0.0.1 or localhost only")
        origin = request.headers.get("Origin")
        if request.method == "POST" and origin and urlsplit(origin).netloc != request.host:
            abort(403, "requests from other web pages are refused")
        given = request.args.get("token") or request.headers.get("X-Formreader-Token") or ""
        if token is not None and not hmac.compare_digest(given.encode(), token.encode()):
            abort(403, "a token is needed: use the URL formreader pad printed")

    @app.errorhandler(403)
    @app.errorhandler(413)
    def refused(e):
        return jsonify(error=e.description), e.code

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
