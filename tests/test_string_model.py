"""The string model (CNN + CTC): decoding, the field's rules in the beam search, both readers'
decision, and the shipped model on real and composed fields."""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest

from formreader.string_model import (
    ALPHABET,
    BLANK,
    INPUT_HEIGHT,
    INPUT_WIDTH,
    NUM_STRING_CLASSES,
    beam_search,
    consistent,
    decode,
    field_input,
)

from .conftest import ROOT


def steps(*rows: dict[str, float]) -> np.ndarray:
    """Step probabilities (T, 15) from rows of {char or '' (blank): probability}; the rest of
    each row's mass goes to the blank."""
    out = np.zeros((len(rows), NUM_STRING_CLASSES))
    for t, row in enumerate(rows):
        for ch, p in row.items():
            out[t, BLANK if ch == "" else ALPHABET.index(ch) + 1] = p
        out[t, BLANK] += 1 - out[t].sum()
    return out


def collapse(path: tuple[int, ...]) -> str:
    chars = [k for i, k in enumerate(path) if k != BLANK and (i == 0 or k != path[i - 1])]
    return "".join(ALPHABET[k - 1] for k in chars)


def test_beam_search_sums_every_alignment():
    """The beam's probability of a text is the sum over all its CTC paths (brute force on 3
    classes and 6 steps), and it finds the most probable text, not the best single path."""
    rng = np.random.default_rng(0)
    used = [BLANK, ALPHABET.index("0") + 1, ALPHABET.index("7") + 1]
    probs = np.zeros((6, NUM_STRING_CLASSES))
    probs[:, used] = rng.dirichlet(np.ones(3), 6)
    exact: dict[str, float] = {}
    for path in itertools.product(used, repeat=6):
        text = collapse(path)
        exact[text] = exact.get(text, 0.0) + math.prod(probs[t, k] for t, k in enumerate(path))
    readings = beam_search(probs, beam=64, prune=0.0)
    best = max(exact, key=exact.get)
    assert readings[0][0] == best
    for text, p in readings[:10]:
        assert p == pytest.approx(exact[text], rel=1e-6)


def test_pattern_settles_a_slash_against_a_one():
    """A stroke that is a little more a 1 than a slash: `115` unconstrained, `1/5` for a date-like pattern."""
    probs = steps({"1": 0.95}, {}, {"1": 0.5, "/": 0.45}, {}, {"5": 0.9}, {})
    assert decode(probs).text == "115"
    assert decode(probs, r"\d{1,2}/\d{1,2}").text == "1/5"
    # A pattern nothing in the beam can match leaves the reading as it is (the rules then flag it).
    assert decode(probs, r"\d{4}").text == "115"


def test_beam_search_holds_length_rules():
    from formreader.fields import reading_pattern
    from formreader.template import Field

    spec = Field("amount", kind="free", box=(0, 0, 10, 10), separators=".", min_length=4, max_length=6)
    pattern = reading_pattern(spec)
    assert re.fullmatch(pattern, "1.250") and not re.fullmatch(pattern, "125") and not re.fullmatch(pattern, ".125")
    # '1.25' read with a doubtful fourth digit: the rule asks for four digits at least.
    probs = steps({"1": 0.9}, {".": 0.9}, {"2": 0.9}, {}, {"5": 0.9}, {}, {"0": 0.4}, {})
    assert decode(probs).text == "1.25"
    assert decode(probs, pattern).text == "1.250"


def test_spans_say_where_each_character_was_read():
    probs = steps({}, {"4": 0.9}, {"4": 0.9}, {"7": 0.2}, {"2": 0.8}, {})
    d = decode(probs)
    assert d.text == "42" and [(s.char, s.first, s.last) for s in d.spans] == [("4", 1, 2), ("2", 4, 4)]
    held = decode(probs, r"\d\d\d")  # a reading the best path does not give is aligned afresh
    assert held.text == "472" and [(s.char, s.first, s.last) for s in held.spans] == [("4", 1, 2), ("7", 3, 3), ("2", 4, 4)]


def test_cut_reading_consistency():
    assert consistent("70497", "7?497")  # a piece it could not read contradicts nothing
    assert consistent("30000", "30.000?")  # separators and a trailing mark aside
    assert consistent("5000", "5?")  # '?' as a chain of zeros
    assert not consistent("5581", "5586")
    assert not consistent("117718", "71?778")


def test_field_input_normalises_any_crop():
    crop = np.full((60, 300), 230, np.uint8)
    crop[20:40, 30:40] = 40
    x = field_input(crop)
    assert x.shape == (INPUT_HEIGHT, INPUT_WIDTH) and x.dtype == np.float32
    assert x.max() == pytest.approx(1.0) and x.min() == 0.0
    wide = field_input(np.full((20, 2000), 200, np.uint8))  # squeezed into the width, not cut
    assert wide.shape == (INPUT_HEIGHT, INPUT_WIDTH)
    with pytest.raises(ValueError, match="2-D grey image"):
        field_input(np.zeros((1, 5), np.uint8))


def test_training_fields_are_composed_of_real_digits(mnist_test):
    from formreader.synth import DigitSource
    from formreader.train_strings import compose_field, encode_labels, fits, random_text

    images, labels = mnist_test
    rng = np.random.default_rng(3)
    source = DigitSource(images, labels, rng, reuse=True)
    texts = [random_text(rng) for _ in range(40)]
    assert all(re.fullmatch(r"\d([.,/-]?\d)*", t) for t in texts)
    for t in texts[:10]:
        crop = compose_field(t, source, rng)
        assert crop.dtype == np.uint8 and crop.ndim == 2 and (crop < 128).any()
    encoded = encode_labels(["1.25", "0"])
    assert encoded[0, :4].tolist() == [2, 11, 3, 6] and encoded[0, 4:].sum() == 0 and encoded[1, 0] == 1
    assert fits("1" * 16) and not fits("1" * 17)


def test_orand_dots_are_painted_out():
    """Thousands dots that ORAND's labels leave out are removed from its training images."""
    from formreader.datasets import load_orand
    from formreader.train_strings import without_separators

    amounts = load_orand("train")
    changed = [a for a in amounts if (without_separators(a) != a.image).any()]
    for a in amounts:  # nothing inside a digit's box is touched
        cleaned = without_separators(a)
        for x, y, w, h in a.boxes:
            inner = (slice(y + 2, y + h - 2), slice(x + 2, x + w - 2))
            assert (cleaned[inner] == a.image[inner]).mean() > 0.97
    assert len(changed) < len(amounts)


needs_model = pytest.mark.skipif(not (ROOT / "models" / "strings.keras").exists(), reason="no string model shipped")
