"""The review station on a large batch: its memory, and how long a clerk waits.

    python benchmarks/bench_review.py [--pages 1000 10000]

Reads the shipped samples once (`formreader process`, 10 pages), then writes, for each size,
a batch's journal of that many pages by repeating their records under other file names, and
starts the review station on it in this process (Flask's test client; the browser adds nothing
the server does). Prints, per size: the Python memory the station holds once started and at most
while starting (tracemalloc), the start, the first window of the list of fields to review as the
page asks for it (`GET /api/items`, 100 fields), a window in the middle of the list, the bytes of
a window, one decision (`POST /api/decide`: the answer, then the results written again in the
background) and one field on every page (`?field=`, its first window).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from formreader.export import journal_lines, journal_path_for  # noqa: E402
from formreader.review.server import create_review_app  # noqa: E402


def sample_run(folder: Path) -> Path:
    """The samples' results (their journal holds the page records to repeat)."""
    out = folder / "samples" / "results.csv"
    subprocess.run(
        [sys.executable, "-m", "formreader.cli", "process", str(ROOT / "samples" / "scans"), "-t",
         str(ROOT / "templates" / "demo_form.yaml"), "-o", str(out), "-q"],
        check=True,
    )
    return out


def large_batch(sample: Path, folder: Path, pages: int) -> Path:
    """A batch of `pages` pages: the samples' journal, its page records repeated under other names."""
    lines = list(journal_lines(journal_path_for(sample)))
    run = next(line for line, rec in lines if rec.get("kind") == "run")
    records = [rec for _, rec in lines if rec.get("kind") == "page"]
    out = folder / f"batch{pages}" / "results.csv"
    out.parent.mkdir()
    with open(journal_path_for(out), "w", encoding="utf-8") as fh:
        fh.write(run)
        for k in range(pages):
            rec = records[k % len(records)]
            fh.write(json.dumps({**rec, "source": f"{k // len(records):06d}-{rec['source']}"}) + "\n")
    return out


def measure(results: Path) -> str:
    tracemalloc.start()  # the memory of a start (tracemalloc slows Python: timed apart, below)
    app = create_review_app(results, "clerk", token="t")
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    start = time.perf_counter()
    app = create_review_app(results, "clerk", token="t")
    started = time.perf_counter() - start
    client = app.test_client()
    start = time.perf_counter()
    answer = client.get("/api/items?token=t")
    listed = time.perf_counter() - start
    first = answer.get_json()
    middle = first["total"] // 2
    start = time.perf_counter()
    item = client.get(f"/api/items?token=t&start={middle}&count=1").get_json()["items"][0]
    windowed = time.perf_counter() - start
    body = {"file": item["file"], "page": item["page"], "field": item["field"], "action": "confirm"}
    start = time.perf_counter()
    assert client.post("/api/decide?token=t", json=body).status_code == 200
    answered = time.perf_counter() - start
    app.extensions["formreader.results_writer"].wait()
    written = time.perf_counter() - start
    start = time.perf_counter()
    client.get(f"/api/items?token=t&field={item['field']}")
    one_field = time.perf_counter() - start
    return (f"{held / 2**20:8.1f} {peak / 2**20:8.1f} {started:7.2f} {first['total']:7d} {listed:7.2f} {windowed:8.2f} "
            f"{len(answer.data) / 1024:6.0f} {answered * 1000:8.1f} {written:8.2f} {one_field:7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pages", type=int, nargs="+", default=[1000, 10000])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sample = sample_run(tmp)
        print("pages  held MiB peak MiB start s   items first s middle s    KiB click ms  write s field s")
        for pages in args.pages:
            print(f"{pages:5d}", measure(large_batch(sample, tmp, pages)), flush=True)


if __name__ == "__main__":
    main()
