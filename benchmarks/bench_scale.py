"""A batch as an office runs one: many pages of scanned-form PDFs, default options, every core.

    python benchmarks/bench_scale.py [--pages 200] [--per-pdf 10] [--rounds 3] [--files jpg|png]

Writes `--pages` pages of the samples' form (MNIST test digits, scanned at 200 DPI by
formreader.training.synth) into PDFs of `--per-pdf` pages, then times, in the same run:
- `pdftoppm -gray -r 200` rendering every PDF, two processes at a time (the floor: decoding);
- `formreader process` on the folder with default options (a process of its own, as a user
  runs it), and its peak memory.
Prints both times, their ratio, pages/s and the CPU time each took (all processes). The two are
timed `--rounds` times, one after the other, and the round of the median ratio is shown with every
round's ratio: on a shared machine a run's speed drifts by several percent from one minute to the
next, and the two timed together drift alike. With
`--files jpg` (or `png`), the same scans are also saved as one image file a page (200 DPI, as a
scanner saves a folder of them) and `formreader process` is timed on that folder too.
"""

from __future__ import annotations

import argparse
import compileall
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pikepdf  # noqa: E402
from PIL import Image  # noqa: E402

from formreader.training.datasets import load_mnist  # noqa: E402
from formreader.training.synth import make_pages, scan  # noqa: E402


def write_pdfs(
    folder: Path, pages: int, per_pdf: int, seed: int = 2027, files: Path | None = None, kind: str = "jpg"
) -> dict[tuple[str, int], dict[str, str]]:
    """Write the PDFs (and each scan as an image file of `kind` into `files`, if given); returns
    each page's truth: (file name, page) -> field -> digits."""
    images, labels = load_mnist("test")
    _, _, filled = make_pages(pages, seed, images, labels)
    rng = np.random.default_rng(seed)
    scans = [Image.fromarray(scan(p.image, rng, dpi_scale=200 / 150)) for p in filled]
    truth = {}
    for k in range(0, pages, per_pdf):
        group = scans[k : k + per_pdf]
        group[0].save(folder / f"batch_{k // per_pdf:03d}.pdf", save_all=True, append_images=group[1:], resolution=200.0)
    for k, (page, filled_page) in enumerate(zip(scans, filled)):
        truth[(f"batch_{k // per_pdf:03d}.pdf", k % per_pdf + 1)] = filled_page.values
        if files is not None:
            name = f"batch_{k // per_pdf:03d}_{k % per_pdf + 1:02d}.{kind}"
            page.save(files / name, dpi=(200, 200), **({"quality": 85} if kind == "jpg" else {}))
            truth[(name, 1)] = filled_page.values
    return truth


def fields_read(results: Path, truth: dict[tuple[str, int], dict[str, str]]) -> str:
    """Right, flagged and wrong-but-ok fields of a run, against the pages' truth."""
    rows = pd.read_csv(results, dtype={"value": str}, keep_default_na=False)
    rows = rows[rows.field != ""]
    right = np.array([truth[(Path(f).name, int(p))][k] == v for f, p, k, v in zip(rows.file, rows.page, rows.field, rows.value)])
    ok = (rows.status == "ok").to_numpy()
    return (f"{len(rows)} fields: {right.mean():.2%} right, {1 - ok.mean():.1%} flagged, "
            f"{(ok & ~right).sum()} wrong but ok ({(ok & ~right).mean():.2%})")


def children_cpu() -> float:
    """CPU seconds (user and system) of this process's finished children so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def render_all(folder: Path, out: Path) -> tuple[float, float]:
    """Render every PDF with pdftoppm, two at a time: (seconds, CPU seconds)."""
    pdfs = sorted(folder.glob("*.pdf"))
    start, cpu = time.perf_counter(), children_cpu()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda p: subprocess.run(["pdftoppm", "-gray", "-r", "200", str(p), str(out / p.stem)], check=True), pdfs))
    return time.perf_counter() - start, children_cpu() - cpu


def run_formreader(folder: Path, out: Path) -> tuple[float, float, int, float]:
    """`formreader process` on a folder with default options, in a process of its own as a user
    runs it: (seconds, CPU seconds of all its processes, peak memory of the largest in KiB, CPU
    seconds of its main process alone: the one that lists the pages and records the results)."""
    args = ["process", str(folder), "-t", str(ROOT / "templates" / "demo_form.yaml"), "-o", str(out), "-q"]
    # The CLI run in a process that then says what it used itself (its workers apart); started from
    # a small process, since a child's peak memory counts what it held before it became itself
    # (a fork of this process, which holds the benchmark's pages).
    cli = (
        "import resource, sys\n"
        "from formreader.cli import main\n"
        "sys.argv = ['formreader', *sys.argv[1:]]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "me, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)\n"
        "print(max(me.ru_maxrss, workers.ru_maxrss), me.ru_utime + me.ru_stime)"
    )
    probe = "import subprocess, sys; print(subprocess.run(sys.argv[1:], capture_output=True, text=True).stdout)"
    start, cpu = time.perf_counter(), children_cpu()
    run = subprocess.run([sys.executable, "-c", probe, sys.executable, "-c", cli, *args], capture_output=True, text=True)
    peak_kib, main_cpu = run.stdout.split()[-2:]
    return time.perf_counter() - start, children_cpu() - cpu, int(peak_kib), float(main_cpu)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pages", type=int, default=200)
    parser.add_argument("--per-pdf", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="times to time both, alternately (the median is shown)")
    parser.add_argument("--files", choices=("jpg", "png"), help="also the same scans as a folder of image files")
    args = parser.parse_args()
    # The code timed as installed: byte-compiled (make setup does it; code edited since would be
    # compiled again by each process of each run where Python may not write bytecode).
    compileall.compile_dir(ROOT / "formreader", quiet=1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for sub in ("pdfs", "ppm", "files"):
            (tmp / sub).mkdir()
        truth = write_pdfs(tmp / "pdfs", args.pages, args.per_pdf, files=tmp / "files" if args.files else None, kind=args.files)
        rounds = []
        for k in range(max(1, args.rounds)):
            poppler, poppler_cpu = render_all(tmp / "pdfs", tmp / "ppm")
            rounds.append((poppler, poppler_cpu, *run_formreader(tmp / "pdfs", tmp / f"out{k}" / "r.csv")))
        ratios = [r[2] / r[0] for r in rounds]
        median = sorted(range(len(rounds)), key=lambda k: ratios[k])[len(rounds) // 2]
        poppler, poppler_cpu, formreader, formreader_cpu, _, main_cpu = rounds[median]
        peak_kib = max(r[4] for r in rounds)
        accuracy = fields_read(tmp / f"out{median}" / "r.csv", truth)
        if args.files:
            files, files_cpu, _, files_main_cpu = run_formreader(tmp / "files", tmp / "out_files" / "r.csv")
            files_accuracy = fields_read(tmp / "out_files" / "r.csv", truth)
        # The main process's start (imports, models, the template's features), from a run of one page.
        (tmp / "one").mkdir()
        with pikepdf.open(tmp / "pdfs" / "batch_000.pdf") as pdf, pikepdf.new() as one:
            one.pages.append(pdf.pages[0])
            one.save(tmp / "one" / "page.pdf")
        *_, start_cpu = run_formreader(tmp / "one", tmp / "out_one" / "r.csv")
    print(f"{args.pages} pages of 200-DPI scanned forms in {args.pages // args.per_pdf} PDFs, {os.cpu_count()} cores")
    # CPU time as well: the run is compute-bound, and on a shared machine its wall time varies
    # from run to run more than its CPU time does.
    print(f"  {'':34} {'seconds':>8} {'pages/s':>8} {'CPU s':>7} {'CPU ms a page':>14}")
    rows = [
        ("pdftoppm -gray -r 200, 2 at a time", poppler, poppler_cpu),
        ("formreader process (defaults)", formreader, formreader_cpu),
    ]
    if args.files:
        rows.append((f"formreader process, {args.files.upper()} files", files, files_cpu))
    for name, wall, used in rows:
        print(f"  {name:34} {wall:8.1f} {args.pages / wall:8.1f} {used:7.1f} {1000 * used / args.pages:14.1f}")
    print(
        f"  ratio {formreader / poppler:.2f}x the rendering alone (CPU {formreader_cpu / poppler_cpu:.2f}x), the median of "
        f"{len(rounds)} rounds ({' / '.join(f'{r:.2f}x' for r in ratios)}); peak memory of the largest process "
        f"{peak_kib / 1024:.0f} MiB"
    )
    # The main process lists the pages and records what the workers read: on a machine of many
    # cores, what it spends a page bounds the whole batch's pages/s.
    beyond = lambda used: 1000 * (used - start_cpu) / (args.pages - 1)  # noqa: E731
    main_ms = f"{beyond(main_cpu):.1f}"
    if args.files:
        main_ms += f", {beyond(files_main_cpu):.1f} for the {args.files.upper()} files"
    print(f"  main process (lists, records): {main_ms} CPU ms a page beyond its start ({start_cpu:.2f} s, a run of one page)")
    print(f"  {accuracy}")
    if args.files:
        print(f"  {args.files.upper()} files: {files_accuracy}")


if __name__ == "__main__":
    main()
