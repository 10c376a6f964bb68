"""Register: map a scanned page onto the template's reference image.

Features (ORB keypoints, which are rotation invariant, so pages fed upside down register too)
are matched between page and reference, a homography is fitted robustly (RANSAC), then refined
by ECC on the whole image. The page is warped into the reference's frame, and a quality score
says how much of the reference's printed structure is found there: a blank page or a page of
another form scores low and is reported instead of read.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

WORK_SIDE = 1100  # pixels of the longer side at which features are matched


class RegistrationError(ValueError):
    """The page could not be registered to the template; the message says why."""


@dataclass
class ReferenceFeatures:
    """What registration needs of the reference, computed once per template (picklable)."""

    shape: tuple[int, int]
    scale: float  # work-resolution pixels per reference pixel
    points: np.ndarray  # (N, 2) float32 keypoint positions, work resolution
    descriptors: np.ndarray  # (N, 32) uint8 ORB descriptors
    structure: np.ndarray  # (H, W) bool, printed lines and text of the reference


@dataclass
class Registration:
    aligned: np.ndarray  # (H, W) uint8, the page in the reference's frame
    homography: np.ndarray  # (3, 3) page pixels -> reference pixels
    quality: float  # share of the reference's printed structure found on the page above chance, 0..1
    rotation_deg: float  # counter-clockwise, as the page lay on the scanner


def _orb(grey: np.ndarray, n: int = 4000):
    orb = cv2.ORB_create(nfeatures=n, scaleFactor=1.2, nlevels=8, fastThreshold=10)
    kps, desc = orb.detectAndCompute(grey, None)
    pts = np.float32([k.pt for k in kps]).reshape(-1, 2)
    return pts, desc


def _ink(grey: np.ndarray) -> np.ndarray:
    block = max(15, (min(grey.shape) // 40) | 1)
    return cv2.adaptiveThreshold(grey, 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY_INV, block, 15) > 0


def prepare_reference(reference: np.ndarray) -> ReferenceFeatures:
    """Compute the reference's features once. reference: (H, W) uint8 blank form."""
    scale = min(1.0, WORK_SIDE / max(reference.shape))
    small = cv2.resize(reference, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    pts, desc = _orb(small)
    if desc is None or len(pts) < 20:
        raise RegistrationError("the template's reference image has too little printed structure to register against")
    # The structure that must be found again: dark print (lines, text), not a light background
    # pattern or tint, which scanning blurs away.
    structure = _ink(reference) & (reference < 160)
    return ReferenceFeatures(reference.shape, scale, pts, desc, structure)


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
    ink = _ink(page)
    if ink.mean() < 0.002 or float(np.std(page)) < 4:
        raise RegistrationError("blank page: no printed form found")
    scale = min(1.0, WORK_SIDE / max(page.shape))
    small = cv2.resize(page, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    pts, desc = _orb(small)
    if desc is None or len(pts) < 20:
        raise RegistrationError("too few features on the page: not a form, or an empty scan")
    matcher = cv2.BFMatcher(cv2.NORM_HAMMING)
    pairs = matcher.knnMatch(desc, features.descriptors, k=2)
    good = [m for m, *rest in pairs if rest and m.distance < 0.8 * rest[0].distance]
    if len(good) < 12:
        raise RegistrationError(f"page does not match the template (only {len(good)} feature matches)")
    src = pts[[m.queryIdx for m in good]] / scale
    dst = features.points[[m.trainIdx for m in good]] / features.scale
    tolerance = 4.0 / features.scale
    # A similarity transform first (4 degrees of freedom: robust with few true matches), then a
    # homography among its inliers for perspective.
    sim, inliers = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=tolerance, maxIters=5000)
    if sim is None or inliers is None or inliers.sum() < 10:
        raise RegistrationError("page does not match the template (no consistent alignment)")
    keep = inliers.ravel().astype(bool)
    homography = np.vstack([sim, [0, 0, 1]])
    if keep.sum() >= 20:
        h, mask = cv2.findHomography(src[keep], dst[keep], cv2.RANSAC, tolerance)
        if h is not None and _plausible(h, page.shape):
            homography = h
    homography = _refine_ecc(page, reference, homography)
    aligned = cv2.warpPerspective(
        page, homography, (reference.shape[1], reference.shape[0]), flags=cv2.INTER_LINEAR, borderValue=255
    )
    quality = registration_quality(aligned, features.structure)
    a, b = homography[0, 0], homography[1, 0]
    rotation = float(np.degrees(np.arctan2(b, a)))
    if quality < min_quality:
        raise RegistrationError(
            f"page does not match the template: only {quality:.0%} of the form's printed lines found (need {min_quality:.0%})"
        )
    return Registration(aligned, homography, quality, rotation)


def _plausible(h: np.ndarray, shape: tuple[int, int]) -> bool:
    """A homography is plausible if it keeps the page convex and does not bend it much."""
    hgt, wid = shape
    corners = np.float32([[0, 0], [wid, 0], [wid, hgt], [0, hgt]]).reshape(-1, 1, 2)
    warped = cv2.perspectiveTransform(corners, h).reshape(-1, 2)
    if not cv2.isContourConvex(warped.astype(np.float32)):
        return False
    return abs(h[2, 0]) * wid < 0.2 and abs(h[2, 1]) * hgt < 0.2


def _refine_ecc(page: np.ndarray, reference: np.ndarray, homography: np.ndarray) -> np.ndarray:
    """Refine a page->reference homography by maximising the correlation of the two images.

    ECC works at half resolution on blurred images (robust to noise and to the handwriting,
    which the reference lacks); if it fails to converge the feature estimate is kept.
    """
    f = 0.5
    s = np.diag([f, f, 1.0])
    ref_small = cv2.GaussianBlur(cv2.resize(reference, None, fx=f, fy=f, interpolation=cv2.INTER_AREA), (5, 5), 0)
    page_small = cv2.resize(page, None, fx=f, fy=f, interpolation=cv2.INTER_AREA)
    # ECC's warp maps template (reference) coordinates to input (page) coordinates.
    warp = (s @ np.linalg.inv(homography) @ np.linalg.inv(s)).astype(np.float32)
    warp /= warp[2, 2]
    page_small = cv2.GaussianBlur(page_small, (5, 5), 0)
    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 60, 1e-5)
    try:
        _, warp = cv2.findTransformECC(ref_small, page_small, warp, cv2.MOTION_HOMOGRAPHY, criteria, None, 1)
    except cv2.error:
        return homography
    refined = np.linalg.inv(s) @ np.linalg.inv(warp.astype(np.float64)) @ s
    refined /= refined[2, 2]
    # Accept the refinement only if it stays close to the feature estimate (ECC can run off).
    corners = np.float32([[0, 0], [page.shape[1], 0], [page.shape[1], page.shape[0]], [0, page.shape[0]]]).reshape(-1, 1, 2)
    moved = np.abs(cv2.perspectiveTransform(corners, refined) - cv2.perspectiveTransform(corners, homography)).max()
    return refined if moved < 0.02 * max(reference.shape) else homography


def registration_quality(aligned: np.ndarray, structure: np.ndarray) -> float:
    """How much of the reference's printed structure the aligned page has, above chance: the
    fraction of the reference's printed pixels with ink within 2 px on the page, less the
    fraction that elsewhere on the page would have it anyway, scaled to 0..1.

    The correction is what tells a page of another form: a check's security pattern or a dense
    page has ink near 40-50% of any form's lines by chance alone (pages of the wrong form scored
    up to 0.52 uncorrected, 0.34 corrected; pages of the right form 0.97-1.0 either way).
    """
    ink = cv2.dilate(_ink(aligned).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    total = int(structure.sum())
    if not total or total == structure.size:
        return 0.0
    found = float((ink & structure).sum() / total)
    chance = float(ink[~structure].mean())
    return max(0.0, (found - chance) / (1.0 - chance)) if chance < 1 else 0.0
