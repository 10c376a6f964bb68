"""Pipeline speed and memory on the shipped samples: pages/s, digits/s, peak memory.

    python benchmarks/bench_pipeline.py [--repeat 3] [--workers 1]

Times `process_paths` over samples/scans (PDF rendering by poppler included) after one warm-up
run, and prints the figures with a break-down of the per-page stages.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


from formreader.pipeline import page_probabilities, process_paths, segment_page  # noqa: E402
from formreader.reading.classify import DigitClassifier  # noqa: E402
from formreader.reading.ingest import Page, find_inputs, read_pages  # noqa: E402
from formreader.reading.register import prepare_reference  # noqa: E402
from formreader.reading.template import load_template  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    template = load_template(ROOT / "templates" / "demo_form.yaml")
    classifier = DigitClassifier.load()
    scans = ROOT / "samples" / "scans"
    list(process_paths([scans], template, classifier, workers=args.workers))  # warm-up
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        records = list(process_paths([scans], template, classifier, workers=args.workers))
        times.append(time.perf_counter() - start)
    pages = sum(1 for r in records if not r["error"])
    digits = sum(1 for r in records for f in r["fields"] for d in f["digits"] if d[0])
    best = min(times)
    print(f"samples: {pages} pages, {digits} digits, {args.workers} worker(s), best of {args.repeat}")
    print(f"pages/s:  {pages / best:.2f}")
    print(f"digits/s: {digits / best:.1f}")

    # Where a page's time goes (single process).
    features = prepare_reference(template.reference)
    stage = {"ingest": 0.0, "register+locate+segment": 0.0, "classify": 0.0}
    all_pages: list[Page] = []
    t = time.perf_counter()
    for f in find_inputs([scans]):
        all_pages += [p for p in read_pages(f, pdf_dpi=150, reduce_jpeg=True) if isinstance(p, Page)]
    stage["ingest"] = time.perf_counter() - t
    t = time.perf_counter()
    segs = [segment_page(p, template, features) for p in all_pages]
    stage["register+locate+segment"] = time.perf_counter() - t
    t = time.perf_counter()
    for seg in segs:  # page by page, as a worker classifies them
        page_probabilities(seg, classifier)
    stage["classify"] = time.perf_counter() - t
    for name, seconds in stage.items():
        print(f"  {name:26s} {1000 * seconds / len(all_pages):7.1f} ms/page")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"peak memory: {peak:.0f} MiB (this process), {children:.0f} MiB (largest child: poppler or a worker)")


if __name__ == "__main__":
    main()
