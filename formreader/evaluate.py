"""Measuring a digit classifier: accuracy, confusion, calibration, risk-coverage, real digits.

The metric functions take arrays and return numbers or arrays; `evaluate_classifier` runs them
on the MNIST test split and on the NSYSU exam-box digits (segmented and normalised by
formreader's own code, exactly as a cell of a form is), and `write_plots` draws the figures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from formreader.classify import DigitClassifier
from formreader.datasets import load_mnist, load_nsysu
from formreader.segment import segment_digit


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, classes: int = 11) -> np.ndarray:
    """(classes, classes) counts; row = true class, column = predicted class."""
    m = np.zeros((classes, classes), np.int64)
    np.add.at(m, (labels, predicted), 1)
    return m


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE of the top-class confidence: sum over equal-width bins of |accuracy - confidence|,
    weighted by the share of samples in the bin. probabilities: (N, C); labels: (N,)."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def risk_coverage(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Error rate among accepted samples when only the k most confident are accepted, k = 1..N.

    Returns (coverage, risk), each (N,): coverage k/N and the error rate of those k.
    """
    order = np.argsort(-confidence, kind="stable")
    errors = np.cumsum(~correct[order])
    k = np.arange(1, len(order) + 1)
    return k / len(order), errors / k


def risk_at_coverage(confidence: np.ndarray, correct: np.ndarray, coverage: float) -> float:
    """Error rate among the accepted when the least confident (1 - coverage) go to review."""
    cov, risk = risk_coverage(confidence, correct)
    k = max(1, int(np.floor(coverage * len(cov))))
    return float(risk[k - 1])


@dataclass
class Evaluation:
    accuracy: float
    ece: float
    nll: float
    risk_at_99: float  # error among the rest, the 1% least confident sent to review
    confusion: np.ndarray
    coverage: np.ndarray
    risk: np.ndarray
    nsysu_accuracy: float | None = None
    nsysu_blank: int = 0
    nsysu_total: int = 0
    extra: dict = field(default_factory=dict)


def evaluate_probabilities(probabilities: np.ndarray, labels: np.ndarray) -> Evaluation:
    """All MNIST-style figures for probabilities (N, 11) and labels (N,)."""
    predicted = probabilities.argmax(axis=1)
    correct = predicted == labels
    confidence = probabilities.max(axis=1)
    coverage, risk = risk_coverage(confidence, correct)
    nll = float(-np.log(np.clip(probabilities[np.arange(len(labels)), labels], 1e-12, 1)).mean())
    return Evaluation(
        accuracy=float(correct.mean()),
        ece=expected_calibration_error(probabilities, labels),
        nll=nll,
        risk_at_99=risk_at_coverage(confidence, correct, 0.99),
        confusion=confusion_matrix(labels, predicted),
        coverage=coverage,
        risk=risk,
    )


def nsysu_inputs(crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Segment NSYSU crops (N, 28, 28) uint8 with formreader's own code.

    Returns (images (M, 28, 28), index (M,) of the crops that were not judged blank).
    """
    images, index = [], []
    for i, crop in enumerate(crops):
        seg = segment_digit(crop)
        if seg.image is not None:
            images.append(seg.image)
            index.append(i)
    return (np.stack(images) if images else np.zeros((0, 28, 28), np.float32)), np.array(index, dtype=np.int64)


def evaluate_classifier(classifier: DigitClassifier, mnist_dir: Path | None = None, nsysu_path: Path | None = None) -> Evaluation:
    """Evaluate on the MNIST test split, and on NSYSU exam digits when they are found."""
    x, y = load_mnist("test", mnist_dir)
    ev = evaluate_probabilities(classifier.probabilities(x.astype(np.float32) / 255.0), y.astype(np.int64))
    try:
        crops, labels, _ = load_nsysu(nsysu_path)
    except FileNotFoundError:
        return ev
    images, index = nsysu_inputs(crops)
    predicted = np.full(len(crops), -1)
    if len(index):
        predicted[index] = classifier.probabilities(images).argmax(axis=1)
    ev.nsysu_accuracy = float((predicted == labels).mean())
    ev.nsysu_blank = int(len(crops) - len(index))
    ev.nsysu_total = int(len(crops))
    return ev


def format_report(ev: Evaluation) -> str:
    """The evaluation as text for the terminal and the model card."""
    errors = int(round((1 - ev.accuracy) * len(ev.coverage)))
    lines = [
        f"MNIST test accuracy:          {ev.accuracy:.2%}  ({errors} errors of {len(ev.coverage)})",
        f"Expected calibration error:   {ev.ece:.3%}",
        f"Negative log-likelihood:      {ev.nll:.4f}",
        f"Error with 1% sent to review: {ev.risk_at_99:.3%}",
    ]
    for cov in (1.0, 0.995, 0.99, 0.98, 0.95):
        k = max(1, int(np.floor(cov * len(ev.coverage))))
        lines.append(f"  coverage {cov:6.1%}: error among accepted {ev.risk[k - 1]:.3%}")
    if ev.nsysu_accuracy is not None:
        lines.append(
            f"NSYSU exam digits accuracy:   {ev.nsysu_accuracy:.2%}  ({ev.nsysu_total} digits, {ev.nsysu_blank} judged blank)"
        )
    lines.append("Confusion matrix (rows: true 0-9, columns: predicted 0-9 and not-a-digit):")
    for d in range(10):
        lines.append("  " + str(d) + " " + " ".join(f"{v:5d}" for v in ev.confusion[d]))
    return "\n".join(lines)


def write_plots(ev: Evaluation, out_dir: Path) -> list[Path]:
    """Risk-coverage curve and confusion matrix as PNG files in out_dir."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(1 - ev.coverage, ev.risk * 100)
    ax.set_xlabel("fraction sent to review")
    ax.set_ylabel("error among accepted digits (%)")
    ax.set_xlim(0, 0.05)
    ax.set_title("Risk-coverage, MNIST test")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    curve = out_dir / "risk_coverage.png"
    fig.savefig(curve, dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 5))
    m = ev.confusion[:10].astype(float)
    off = m.copy()
    np.fill_diagonal(off, 0)
    ax.imshow(off, cmap="Reds")
    for i in range(10):
        for j in range(11):
            if ev.confusion[i, j]:
                ax.text(j, i, str(ev.confusion[i, j]), ha="center", va="center", fontsize=6)
    ax.set_xticks(range(11), [str(d) for d in range(10)] + ["X"])
    ax.set_yticks(range(10))
    ax.set_xlabel("predicted (X: not a digit)")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix, MNIST test (errors shaded)")
    fig.tight_layout()
    conf = out_dir / "confusion_matrix.png"
    fig.savefig(conf, dpi=120)
    plt.close(fig)
    return [curve, conf]
