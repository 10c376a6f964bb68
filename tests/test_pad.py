"""The drawing pad: its endpoint on real digits, and the page in a real browser (Debian chromium)."""

from __future__ import annotations

import io
import threading

import cv2
import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def app():
    from formreader.review.server import create_app

    return create_app()


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_read_endpoint_on_mnist_digits(app, mnist_test):
    images, labels = mnist_test
    client = app.test_client()
    right = 0
    for i in range(20):
        drawing = np.full((200, 560), 255, np.uint8)
        digit = cv2.resize(255 - images[i], (140, 140), interpolation=cv2.INTER_CUBIC)
        drawing[30:170, 200:340] = digit
        out = client.post("/read", data=png(drawing), content_type="image/png").get_json()
        right += out["value"] == str(labels[i])
        assert 0 <= out["confidence"] <= 1 and len(out["digits"][0]["top"]) == 3
    assert right >= 19


def test_read_endpoint_rejects_what_is_not_an_image(app):
    res = app.test_client().post("/read", data=b"hello", content_type="image/png")
    assert res.status_code == 400 and "PNG or JPEG" in res.get_json()["error"]


def test_empty_drawing_reads_nothing(app):
    out = app.test_client().post("/read", data=png(np.full((200, 560), 255, np.uint8))).get_json()
    assert out["value"] == "" and out["raw"] == "" and out["review"] is False


@pytest.fixture(scope="module")
def server(app):
    from werkzeug.serving import make_server

    srv = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_port}/"
    srv.shutdown()


def stroke(page, points):
    box = page.locator("#pad").bounding_box()
    page.mouse.move(box["x"] + points[0][0], box["y"] + points[0][1])
    page.mouse.down()
    for x, y in points[1:]:
        page.mouse.move(box["x"] + x, box["y"] + y, steps=8)
    page.mouse.up()


def test_drawing_a_number_in_the_browser(server, browser, tmp_path):
    page = browser.new_page()
    page.goto(server)
    assert page.title() == "formreader drawing pad"
    stroke(page, [(100, 40), (100, 160)])  # a 1
    stroke(page, [(180, 45), (250, 45), (205, 160)])  # a 7
    page.click("#read")
    page.wait_for_function("document.getElementById('value').textContent.length > 0")
    assert page.text_content("#value") == "17"
    assert page.locator("#digits tbody tr").count() == 2
    page.screenshot(path=str(tmp_path / "pad.png"))
    page.click("#clear")
    assert page.text_content("#value") == ""
    page.close()


def test_twenty_clients_at_once_get_their_own_answers(server, mnist_test):
    """One interpreter per thread: answers never fail or mix under concurrent requests."""
    from concurrent.futures import ThreadPoolExecutor

    images, labels = mnist_test
    drawings = []
    for i in range(40):
        drawing = np.full((200, 560), 255, np.uint8)
        drawing[30:170, 200:340] = cv2.resize(255 - images[i], (140, 140), interpolation=cv2.INTER_CUBIC)
        drawings.append(png(drawing))
    alone = [app_read(server, d) for d in drawings]

    with ThreadPoolExecutor(20) as pool:
        together = list(pool.map(lambda d: app_read(server, d), drawings * 3))
    assert together == alone * 3
    assert sum(a["value"] == str(labels[i]) for i, a in enumerate(alone)) >= 38


def app_read(server: str, body: bytes, headers: dict | None = None):
    import json
    import urllib.request

    req = urllib.request.Request(server + "read", data=body, headers={"Content-Type": "image/png", **(headers or {})})
    with urllib.request.urlopen(req, timeout=60) as res:
        return json.loads(res.read())


def status_of(response) -> tuple[int, dict]:
    return response.status_code, response.get_json()


def test_the_pad_keeps_to_its_user(app):
    client = app.test_client()
    ok = np.full((200, 560), 255, np.uint8)
    # Another web page the user visits cannot post to it.
    code, body = status_of(client.post("/read", data=png(ok), headers={"Origin": "http://evil.example"}))
    assert code == 403 and "other web pages" in body["error"]
    # DNS rebinding: a request for another host name is refused.
    code, _ = status_of(client.post("/read", data=png(ok), headers={"Host": "evil.example:8000"}))
    assert code == 403
    # Too big: the body, and a small PNG that decodes to 169 megapixels.
    code, _ = status_of(client.post("/read", data=b"\0" * (5 * 2**20)))
    assert code == 413
    big = Image.new("1", (13000, 13000), 1)
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    assert len(buf.getvalue()) < 300_000
    code, body = status_of(client.post("/read", data=buf.getvalue()))
    assert code == 413 and "megapixels" in body["error"]


def test_beyond_loopback_a_token_is_needed():
    from formreader.review.server import create_app

    client = create_app(token="s3cret").test_client()
    ok = png(np.full((200, 560), 255, np.uint8))
    host = {"Host": "192.168.1.20:8000"}
    assert client.get("/", headers=host).status_code == 403
    assert client.post("/read", data=ok, headers=host).status_code == 403
    assert client.get("/?token=s3cret", headers=host).status_code == 200
    assert client.post("/read", data=ok, headers={**host, "X-Formreader-Token": "s3cret"}).status_code == 200
