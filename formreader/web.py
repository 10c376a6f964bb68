"""The drawing pad: write a number with the mouse (or a finger) and see what formreader reads.

The student project's tkinter canvas, as a small web page served on localhost (Flask): the
drawing goes through exactly the code that reads a scanned field (`formreader.read_number`:
ink, blobs, cuts of touching digits, MNIST normalisation, the calibrated model), and the page
shows each digit read with its confidence, and whether formreader would send it to review.
"""

from __future__ import annotations

from pathlib import Path

from flask import Flask, jsonify, request, send_from_directory

from formreader.fields import DEFAULT_REVIEW_THRESHOLD

STATIC = Path(__file__).resolve().parent / "static"
MAX_UPLOAD = 4 * 1024 * 1024


def create_app(model: Path | None = None, threshold: float = DEFAULT_REVIEW_THRESHOLD) -> Flask:
    """The Flask app: GET / is the pad, POST /read takes a PNG of the drawing (dark on light)."""
    from formreader.api import get_classifier, read_number
    from formreader.ingest import decode_image

    get_classifier(model)  # load the model now, not at the first drawing
    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = MAX_UPLOAD

    @app.get("/")
    def pad():
        return send_from_directory(STATIC, "pad.html")

    @app.post("/read")
    def read():
        try:
            image = decode_image(request.get_data())
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
            review=bool(reading.raw) and (reading.confidence < threshold or reading.unreadable > 0),
            digits=digits,
            cuts=reading.cuts,
        )

    return app
