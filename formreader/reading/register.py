"""Register: map a scanned page onto the template's reference image.

Coarse to fine. Coarse: ORB keypoints (rotation invariant, so pages fed upside down register
too) of a reduced page are matched to the reference's, and a similarity is fitted robustly
(RANSAC); a few hundred keypoints of the page reduced to 600 px suffice for most pages, and a
page they fail on is tried again at 1,100 px, then with several thousand. Fine: the page is
warped by that estimate, and the reference's corners (points with structure in two directions,
chosen once per template) are tracked into it by pyramidal Lucas-Kanade; a homography fitted to
them robustly is right to a fraction of a pixel. A quality
score then says how much of the reference's printed structure is found on the page: a blank
page or a page of another form scores low and is reported instead of read.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

# (pixels of the page's longer side, ORB keypoints) tried in turn. 600 px are enough for grey
# scans and cost 2 ms a page less than 800 did; the ragged lines of a bitonal scan need 1,100 px
# on about one page in five (bench_register.py: 9 of its 40 thick worn bitonal pages, 2 of 40
# combs of short ticks, none of the samples' form); several thousand keypoints for the pages
# those fail on.
ATTEMPTS = ((600, 500), (1100, 800), (1100, 4000))
# Reference corners tracked to refine the estimate: the strongest 100 place cells as well as 200
# did (bench_register.py, every style; the PDF pages' worst cell 0.33 px against 0.62), and
# following half as many saves a page 1.1 ms.
CORNERS = 100
MATCH_TOLERANCE = 4.0  # px of the reduced reference: how far a matched keypoint may lie from the fit
# How far (px at full size) Lucas-Kanade's 21-px window reaches on its own; each pyramid level doubles it.
REACH_PX = 10.0


class RegistrationError(ValueError):
    """The page could not be registered to the template; the message says why, and `quality`
    how much of the form's print was found where a registration got that far (else 0)."""

    def __init__(self, message: str, quality: float = 0.0):
        super().__init__(message)
        self.quality = quality


@dataclass
class ReferenceFeatures:
    """What registration needs of the reference, computed once per template (picklable)."""

    shape: tuple[int, int]
    # per ATTEMPTS: work-resolution pixels per reference pixel, (N, 2) float32 keypoint positions
    # (work resolution), (N, 32) uint8 ORB descriptors. The first attempt's only, until a page
    # needs a finer one (register_page adds it then): they cost 30 ms at a run's start, on the way
    # to the first page, and many batches never need them (one page in five of a ragged bitonal
    # batch does).
    keypoints: list[tuple[float, np.ndarray, np.ndarray] | None]
    corners: np.ndarray  # (M, 1, 2) float32, reference pixels: well-textured points to track
    smooth: np.ndarray  # (H, W) uint8, the reference slightly blurred, as corners are tracked on it
    levels: tuple[float, float]  # the reference's paper and print grey levels (grey_levels)
    structure: np.ndarray  # (H // 2, W // 2) bool, printed lines and text of the reference halved
    # (H, W) bool, everything printed on the blank form, grey print included, widened by 2 px:
    # on a registered page, ink there is the form's own, not handwriting.
    printed: np.ndarray


@dataclass
class Registration:
    aligned: np.ndarray  # (H, W) uint8, the page in the reference's frame
    homography: np.ndarray  # (3, 3) page pixels -> reference pixels
    quality: float  # share of the reference's printed structure found on the page above chance, 0..1
    rotation_deg: float  # counter-clockwise, as the page lay on the scanner


def _orb(grey: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray | None]:
    orb = cv2.ORB_create(nfeatures=n, scaleFactor=1.2, nlevels=8, fastThreshold=10)
    # Keypoints of the slightly smoothed image, reference and page alike: on a raw bitonal scan
    # FAST finds the ragged edges of thick, worn lines, which match the clean reference poorly
    # (a quarter of such pages got a wrong estimate from 1,200 keypoints; none now, and twice
    # the consistent matches on every form style of bench_register.py).
    kps, desc = orb.detectAndCompute(cv2.GaussianBlur(grey, (0, 0), 1.0), None)
    return np.float32([k.pt for k in kps]).reshape(-1, 2), desc


def _ink(grey: np.ndarray) -> np.ndarray:
    block = max(15, (min(grey.shape) // 40) | 1)
    return cv2.adaptiveThreshold(grey, 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY_INV, block, 15) > 0


def _smooth(grey: np.ndarray) -> np.ndarray:
    # Tracking compares grey levels: the clean reference blurred a little looks as a scanned page
    # does, whose optics, and the warp that brings it to the reference, blur it as much.
    return cv2.GaussianBlur(grey, (0, 0), 1.0)


def _reduced(grey: np.ndarray, side: int) -> tuple[np.ndarray, float]:
    """The image with its longer side at most `side` px, and the scale it was reduced by."""
    scale = min(1.0, side / max(grey.shape))
    if scale <= 0.5:  # halved exactly first: area averaging at another ratio cost a page 1.8 ms, halving 0.3
        small, rest = _reduced(_half(grey), side)
        return small, rest / 2
    # Area averaging buys nothing at a ratio like 0.85 (keypoints are found on the image blurred).
    return cv2.resize(grey, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR), scale


def prepare_reference(reference: np.ndarray) -> ReferenceFeatures:
    """Compute the reference's features once (the finer attempts' keypoints when a page first
    needs them: register_page). reference: (H, W) uint8 blank form."""
    keypoints = [_reference_keypoints(reference, *ATTEMPTS[0])] + [None] * (len(ATTEMPTS) - 1)
    corners = cv2.goodFeaturesToTrack(reference, CORNERS, 0.01, max(reference.shape) / 40, blockSize=7)
    corners = np.zeros((0, 1, 2), np.float32) if corners is None else corners.astype(np.float32)
    # The structure that must be found again: dark print (lines, text), not a light background
    # pattern or tint, which scanning blurs away; at half size, as registration_quality looks.
    half = _half(reference)
    structure = _ink(half) & (half < 160)
    printed = cv2.dilate((reference < 200).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    return ReferenceFeatures(
        reference.shape, keypoints, corners, _smooth(reference), grey_levels(reference), structure, printed
    )


def _reference_keypoints(reference: np.ndarray, side: int, n: int) -> tuple[float, np.ndarray, np.ndarray]:
    """One attempt's keypoints of the reference (ReferenceFeatures.keypoints); RegistrationError
    when it has too little printed structure for them."""
    small, scale = _reduced(reference, side)
    points, descriptors = _orb(small, n)
    if descriptors is None or len(points) < 20:
        raise RegistrationError("the template's reference image has too little printed structure to register against")
    return scale, points, descriptors


def grey_levels(grey: np.ndarray) -> tuple[float, float]:
    """(paper, print) grey levels of a page: its median and its darkest 1%. grey: (H, W) uint8."""
    cumulative = np.cumsum(cv2.calcHist([grey], [0], None, [256], [0, 256]).ravel())
    paper, ink = np.searchsorted(cumulative, [0.5 * cumulative[-1], 0.01 * cumulative[-1]])
    return float(paper), float(ink)


def _as_reference(page: np.ndarray, levels: tuple[float, float]) -> np.ndarray:
    """A lookup table (256,) uint8 taking a page's paper and print grey levels (grey_levels) to
    the reference's `levels`. Tracking compares grey levels: on a page scanned darker or paler
    than the reference, a corner's window is matched off by a pixel or two, and the fit to them
    wanders instead of settling."""
    paper, ink = grey_levels(page)
    ref_paper, ref_ink = levels
    gain = (ref_paper - ref_ink) / max(paper - ink, 1.0)
    return np.clip((np.arange(256) - ink) * gain + ref_ink, 0, 255).astype(np.uint8)


def register_page(
    page: np.ndarray, reference: np.ndarray, features: ReferenceFeatures | None = None, min_quality: float = 0.5
) -> Registration:
    """Register a page to the reference.

    page: (H, W) uint8 grey scan, at roughly the reference's resolution (within a factor of 2).
    reference: (H, W) uint8 blank form. Handles shift, rotation (any angle, including 180),
    scale and mild perspective. Raises RegistrationError if the page is blank, does not match,
    or matches too poorly (quality below `min_quality`).
    """
    features = features or prepare_reference(reference)
    first = ATTEMPTS[0][0]
    reduced = {first: _reduced(page, first)}  # the page at each work side, made as it is first tried
    failure = RegistrationError("page does not match the template")
    for attempt, (side, n) in enumerate(ATTEMPTS):
        # Whether the page is blank is asked only of a page the first attempt failed on (0.35 ms
        # a page less for every other), and before the finer attempts, which would cost a blank
        # page (the back of a duplex scan) tens of ms.
        if attempt == 1 and _blank(reduced[first][0], page):
            raise RegistrationError("blank page: no printed form found")
        if features.keypoints[attempt] is None:
            features.keypoints[attempt] = _reference_keypoints(reference, side, n)
        ref_scale, ref_points, ref_desc = features.keypoints[attempt]
        if side not in reduced:
            reduced[side] = _reduced(page, side)
        try:
            similarity, src, dst = _match(*reduced[side], n, ref_points, ref_desc, ref_scale)
        except RegistrationError as e:
            failure = e
            continue
        # Tracking starts from the similarity. A homography fitted to keypoints of the reduced
        # page overfits perspective (on 20 of bench_scale.py's pages its worst corner of the form
        # 5-190 px out, median 26; the similarity's 22 at most, median 13); tracked from that far
        # through three pyramid levels above full size, corners could lock onto the next box of a
        # comb, and pages were read a box off yet accepted (`bench_register.py --batch 200`: 4
        # pages 1.4-16 px off; now the worst 1.03 px). The tracking corrects the
        # perspective itself; the fitted one is the start only where the similarity is not
        # confirmed.
        homography = _refine(page, features, similarity, levels=2)
        perspective = None
        if homography is None:
            perspective = _perspective(src, dst, MATCH_TOLERANCE / ref_scale, page.shape)
            homography = None if perspective is None else _refine(page, features, perspective, levels=3)
        if homography is None:
            if attempt < len(ATTEMPTS) - 1:
                continue  # unconfirmed: try again finer, or with more keypoints
            homography = similarity if perspective is None else perspective  # the best there is; the quality score decides
        aligned = _warp(page, homography, reference.shape)
        quality = registration_quality(aligned, features.structure)
        if quality >= min_quality:
            rotation = float(np.degrees(np.arctan2(homography[1, 0], homography[0, 0])))
            return Registration(aligned, homography, quality, rotation)
        failure = RegistrationError(
            f"page does not match the template: only {quality:.0%} of the form's printed lines found (need {min_quality:.0%})",
            max(quality, failure.quality),
        )
    raise failure


def _blank(small: np.ndarray, page: np.ndarray) -> bool:
    """Whether a page holds no print: almost no ink on it reduced (`small`), or its grey levels
    hardly vary. (H, W) uint8 each."""
    return bool(_ink(small).mean() < 0.002 or float(cv2.meanStdDev(page)[1][0, 0]) < 4)


def _match(
    small: np.ndarray, scale: float, n: int, ref_points: np.ndarray, ref_desc: np.ndarray, ref_scale: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A page -> reference similarity (3, 3) from `n` ORB keypoints of the reduced page (4
    degrees of freedom: robust with few true matches), and the matched points consistent with
    it, (K, 2) page and (K, 2) reference pixels. Raises RegistrationError when too few match
    consistently."""
    pts, desc = _orb(small, n)
    if desc is None or len(pts) < 20:
        raise RegistrationError("too few features on the page: not a form, or an empty scan")
    pairs = cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(desc, ref_desc, k=2)
    good = [m for m, *rest in pairs if rest and m.distance < 0.8 * rest[0].distance]
    if len(good) < 12:
        raise RegistrationError(f"page does not match the template (only {len(good)} feature matches)")
    src = pts[[m.queryIdx for m in good]] / scale
    dst = ref_points[[m.trainIdx for m in good]] / ref_scale
    tolerance = MATCH_TOLERANCE / ref_scale
    sim, inliers = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=tolerance, maxIters=5000)
    # A page is at the reference's resolution within a factor of 2 (register_page); a scale far
    # beyond that is keypoints matched by chance (a few on one spot fit a near-singular one, as
    # 500 keypoints of a page reduced to 500 px did): the page is tried again finer instead.
    if sim is None or inliers is None or inliers.sum() < 10 or not 0.4 < np.sqrt(abs(np.linalg.det(sim[:, :2]))) < 2.5:
        raise RegistrationError("page does not match the template (no consistent alignment)")
    keep = inliers.ravel().astype(bool)
    return np.vstack([sim, [0, 0, 1]]), src[keep], dst[keep]


def _perspective(src: np.ndarray, dst: np.ndarray, tolerance: float, shape: tuple[int, int]) -> np.ndarray | None:
    """A page -> reference homography fitted to matched points (K, 2) each, or None when too
    few or implausible (_plausible)."""
    if len(src) < 20:
        return None
    h, _ = cv2.findHomography(src, dst, cv2.RANSAC, tolerance)
    return h if h is not None and _plausible(h, shape) else None


def _plausible(h: np.ndarray, shape: tuple[int, int]) -> bool:
    """A homography is plausible if it keeps the page convex and does not bend it much."""
    hgt, wid = shape
    corners = np.float32([[0, 0], [wid, 0], [wid, hgt], [0, hgt]]).reshape(-1, 1, 2)
    warped = cv2.perspectiveTransform(corners, h).reshape(-1, 2)
    if not cv2.isContourConvex(warped.astype(np.float32)):
        return False
    return abs(h[2, 0]) * wid < 0.2 and abs(h[2, 1]) * hgt < 0.2


def _refine(page: np.ndarray, features: ReferenceFeatures, homography: np.ndarray, levels: int) -> np.ndarray | None:
    """Correct a page -> reference homography by tracking the reference's corners on the page.

    The page is warped by the estimate, and each corner is followed from the reference into it
    (pyramidal Lucas-Kanade). A homography fitted to them (RANSAC, 1 px) is the result: a corner
    that handwriting or a torn line pulled lies off the fit the others agree on, and is left out.
    None when the estimate cannot be confirmed: too few corners follow, or the fit lies farther
    from the estimate than tracking reaches (gone astray).

    Tracked forward only: each corner tracked back as well, and kept only if it returned within
    0.3 px, cost a page 3.5 ms (22.3 against 18.8, `bench_register.py --batch 200`) for nothing
    the fit's own tolerance did not do (cells off at the median / 99th percentile / worst, px:
    the batch's PDF pages 0.01 / 0.08 / 0.33 against 0.02 / 0.08 / 0.31; the thick worn bitonal
    form 0.28 / 0.43 / 0.59 against 0.28 / 0.39 / 0.55; `evaluate_forms.py`'s held-out forms the
    same fields right, flagged and let out).

    One warp and one tracking: tracking lands each corner to a fraction of a pixel wherever it
    starts within reach; warping again by the corrected estimate and tracking again until the
    correction settled (as this did, two or three rounds) cost a page 6 ms (15 against 9) for
    little (bench_register.py's PDF pages: cells 0.05 px off at the median either way, 0.30 at
    the 99th percentile against 0.28, the worst 1.03 px, a page turned 9.6 degrees, against
    0.63). Tracked at full size: on the page and the reference halved, at a quarter of the cost,
    corners landed less surely (cells 1.4-3.4 px off on a few pages in 200, whatever the window
    or the fit's tolerance). The page's grey levels are taken from the page, not from the warped
    image, whose paper added beyond the page's edge shifts them (a page 0.51 px off, against 0.15).

    levels: pyramid levels above full size, as far out as the estimate may be (each doubles the
    reach of the 21-px window: 2 reach about 40 px, 3 about 80). No more than that: on a coarse
    level a comb's boxes blur into a repeating pattern, and a corner tracked from afar can lock
    onto the next box.
    """
    h, w = features.shape
    if len(features.corners) < 12:
        return None
    # The warped page is not blurred again: blurred twice, it was blurrier than the reference and
    # corners landed worse (bench_register.py: cells 0.03 -> 0.01 px off at the median; on pages
    # scanned blurrier, sigma 1.5 and 2.2 px, the combs' 99th percentile 0.49 and 2.02 -> 0.28 and 0.84).
    target = cv2.LUT(_warp(page, homography, features.shape), _as_reference(page, features.levels))
    corners = features.corners
    track = dict(winSize=(21, 21), maxLevel=levels, criteria=(cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 20, 0.03))
    found, ok, _ = cv2.calcOpticalFlowPyrLK(features.smooth, target, corners, None, **track)
    keep = ok.ravel() == 1
    if keep.sum() < 12:
        return None
    to_page = np.linalg.inv(homography)
    refined, inliers = cv2.findHomography(cv2.perspectiveTransform(found[keep], to_page), corners[keep], cv2.RANSAC, 1.0)
    if refined is None or inliers.sum() < 12:
        return None
    frame = np.float32([[0, 0], [w, 0], [w, h], [0, h]]).reshape(-1, 1, 2)
    moved = cv2.perspectiveTransform(frame, np.linalg.inv(refined)) - cv2.perspectiveTransform(frame, to_page)
    return refined / refined[2, 2] if np.abs(moved).max() < REACH_PX * 2**levels else None


def _half(grey: np.ndarray) -> np.ndarray:
    """(H, W) uint8 -> (H // 2, W // 2), each pixel the mean of the two by two it covers (an odd
    last row or column left out, so that the ratio is exactly a half)."""
    h, w = grey.shape
    return cv2.resize(grey[: h - h % 2, : w - w % 2], (w // 2, h // 2), interpolation=cv2.INTER_AREA)


def _warp(page: np.ndarray, homography: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The page warped by a (3, 3) homography into an image of (H, W) `shape`, paper beyond it;
    by an affine one (the keypoints' similarity) with the cheaper affine warp (1.1 ms against
    1.5 at the reference's size)."""
    size, flags = (shape[1], shape[0]), cv2.INTER_LINEAR
    if homography[2, 0] == homography[2, 1] == 0:
        return cv2.warpAffine(page, homography[:2] / homography[2, 2], size, flags=flags, borderValue=255)
    return cv2.warpPerspective(page, homography, size, flags=flags, borderValue=255)


def registration_quality(aligned: np.ndarray, structure: np.ndarray) -> float:
    """How much of the reference's printed structure the aligned page has, above chance: the
    fraction of the reference's printed pixels with ink within 2 px on the page, less the
    fraction that elsewhere on the page would have it anyway, scaled to 0..1. aligned: (H, W)
    uint8; structure: (H // 2, W // 2) bool (ReferenceFeatures.structure).

    Both are compared halved (a pixel of them 2 px of the page): 0.44 ms a page against 1.26 at
    full size, and the forms told apart as well or better (`evaluate_templates.py`'s mixed batch,
    each page against each form: a page's own form 0.91 at least against 0.87, another form 0.39
    at most against 0.53).

    The correction is what tells a page of another form: a check's security pattern or a dense
    page has ink near 40-50% of any form's lines by chance alone (pages of the wrong form scored
    up to 0.52 uncorrected, 0.34 corrected; pages of the right form 0.97-1.0 either way).
    """
    ink = cv2.dilate(_ink(_half(aligned)).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    total = np.count_nonzero(structure)
    if not total or total == structure.size:
        return 0.0
    on_print = np.count_nonzero(ink & structure)
    found = on_print / total
    # Counted, not indexed: ink[~structure] copied most of the page (1.3 ms of a page's 50).
    chance = (np.count_nonzero(ink) - on_print) / (structure.size - total)
    return max(0.0, (found - chance) / (1.0 - chance)) if chance < 1 else 0.0
