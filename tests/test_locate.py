"""Locating cells: boxes found on the page itself, and misplaced guesses pulled onto them."""

from __future__ import annotations

import cv2
import numpy as np

from formreader.reading.locate import cell_crop, cell_interior, find_boxes, refine_cells
from formreader.reading.register import register_page


def test_find_boxes_on_blank_form_matches_drawing(template):
    assert find_boxes(template.reference, 150) == template.cells


def test_find_boxes_on_filled_form_despite_handwriting(filled_pages):
    blank, fields, pages = filled_pages
    found = set(find_boxes(pages[2].image, 150, min_line=29))  # lines of 0.8 of a box side
    expected = {c for f in fields for c in f.cells}
    assert len(found & expected) >= 0.95 * len(expected)


def test_refine_cells_pulls_shifted_guesses_back(filled_pages):
    blank, fields, pages = filled_pages
    cells = [c for f in fields for c in f.cells]
    shifted = [(x + 5, y - 4, w, h) for x, y, w, h in cells]
    refined = refine_cells(pages[3].image, shifted, 150)
    found = [b for b, ok in refined if ok]
    assert len(found) >= 0.95 * len(cells)
    for (box, ok), truth in zip(refined, cells):
        if ok:
            assert max(abs(a - b) for a, b in zip(box, truth)) <= 1


def test_refine_cells_after_registration_of_a_tilted_scan(filled_pages):
    blank, fields, pages = filled_pages
    h, w = blank.shape
    m = cv2.getRotationMatrix2D((w / 2, h / 2), 6, 1.04)
    scan = cv2.warpAffine(pages[4].image, m, (w + 60, h + 60), borderValue=240)
    reg = register_page(cv2.GaussianBlur(scan, (3, 3), 0.8), blank)
    cells = [c for f in fields for c in f.cells]
    refined = refine_cells(reg.aligned, cells, 150)
    assert sum(ok for _, ok in refined) >= 0.9 * len(cells)
    for (box, _), truth in zip(refined, cells):
        assert max(abs(a - b) for a, b in zip(box, truth)) <= 2


def test_cell_crop_includes_a_margin_and_stays_inside_the_page():
    page = np.zeros((100, 100), np.uint8)
    assert cell_crop(page, (10, 10, 40, 40)).shape == (52, 52)
    assert cell_crop(page, (0, 0, 40, 40)).shape == (46, 46)


def test_cells_found_at_other_sizes_are_cut_as_large_as_their_template_box():
    # Boxes found a pixel or two off the template's 36 px: each crop is the template box's crop,
    # centred on the box found, with the interior where the box lies in it.
    page = np.arange(200 * 200, dtype=np.int64).reshape(200, 200) % 251
    like = (0, 0, 36, 36)
    for box in [(50, 60, 36, 36), (50, 60, 38, 37), (50, 60, 34, 35)]:
        crop, interior = cell_crop(page, box, like=like), cell_interior(page.shape, box, like=like)
        assert crop.shape == cell_crop(page, (50, 60, 36, 36)).shape == (46, 46)
        x, y, w, h = interior
        assert (w, h) == box[2:]
        assert abs(x - (46 - x - w)) <= 1 and abs(y - (46 - y - h)) <= 1  # centred
        assert np.array_equal(crop[y : y + h, x : x + w], page[60 : 60 + h, 50 : 50 + w])
    assert cell_crop(page, (50, 60, 38, 37)).shape == (49, 50)  # cut by its own size, as before
