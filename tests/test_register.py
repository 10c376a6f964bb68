"""Registration: known distortions are undone to within a pixel or two; bad pages are refused."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from formreader.reading.register import RegistrationError, prepare_reference, register_page
from formreader.training.synth import blank_form


def distort(page: np.ndarray, angle: float, scale: float, shift: tuple[float, float], perspective: float = 0.0):
    """Warp a page with a known homography; returns (scan, homography page -> scan)."""
    h, w = page.shape
    m = np.vstack([cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale), [0, 0, 1]])
    m[0, 2] += shift[0]
    m[1, 2] += shift[1]
    m[2, 0] = perspective / w
    out = cv2.warpPerspective(page, m, (int(w * 1.1), int(h * 1.1)), borderValue=235)
    noise = np.random.default_rng(1).normal(0, 4, out.shape)
    return np.clip(out.astype(float) * 0.95 + noise, 0, 255).astype(np.uint8), m


def cell_error(reg_h: np.ndarray, true_m: np.ndarray, cells) -> float:
    """Largest distance (px) between where registration puts cell centres and where they are."""
    centres = np.float32([[x + w / 2, y + h / 2] for x, y, w, h in cells]).reshape(-1, 1, 2)
    on_scan = cv2.perspectiveTransform(centres, true_m)
    back = cv2.perspectiveTransform(on_scan, reg_h)
    return float(np.abs(back - centres).max())


@pytest.mark.parametrize(
    "angle, scale, shift, perspective",
    [
        (0, 1.0, (25, -15), 0),
        (9.5, 1.0, (10, 30), 0),
        (-7, 1.09, (-20, 10), 0),
        (3, 0.91, (40, 40), 0.015),
        (180, 1.0, (60, 40), 0),
        (177, 1.05, (70, 50), 0),
    ],
)
def test_register_undoes_rotation_scale_shift_perspective(filled_pages, angle, scale, shift, perspective):
    blank, fields, pages = filled_pages
    scan, m = distort(pages[0].image, angle, scale, shift, perspective)
    reg = register_page(scan, blank)
    cells = [c for f in fields for c in f.cells]
    assert cell_error(reg.homography, m, cells) < 1.5
    assert reg.quality > 0.8  # above chance: pages of another form score under 0.35
    assert reg.aligned.shape == blank.shape
    assert abs(((reg.rotation_deg - angle + 180) % 360) - 180) < 1.0  # counter-clockwise, as scanned


def test_blank_page_is_refused():
    blank, _ = blank_form()
    paper = np.clip(np.random.default_rng(0).normal(240, 3, (900, 1300)), 0, 255).astype(np.uint8)
    with pytest.raises(RegistrationError, match="blank page"):
        register_page(paper, blank)


def other_form() -> np.ndarray:
    """A page of a form no template describes."""
    from formreader.training.synth import invoice_form

    return invoice_form()


def test_page_of_another_form_is_refused():
    blank, _ = blank_form()
    with pytest.raises(RegistrationError, match="does not match the template"):
        register_page(other_form(), blank)


def test_reference_features_are_reusable(filled_pages):
    blank, _, pages = filled_pages
    features = prepare_reference(blank)
    a = register_page(distort(pages[1].image, 4, 1.0, (5, 5))[0], blank, features)
    b = register_page(distort(pages[1].image, 4, 1.0, (5, 5))[0], blank)
    assert np.allclose(a.homography, b.homography, atol=1e-6)


def test_a_check_is_not_read_as_an_order_form(mnist_test):
    """A page of another form whose dense print lies near many of the template's lines by
    chance (a check on its security pattern) is refused, not read as guesses."""
    from formreader.training.synth import make_checks, scan

    images, labels = mnist_test
    blank, _ = blank_form()
    features = prepare_reference(blank)
    _, _, checks = make_checks(4, 1, images, labels)
    rng = np.random.default_rng(0)
    for page, _ in checks:
        with pytest.raises(RegistrationError, match="does not match the template"):
            register_page(scan(page, rng), blank, features)
