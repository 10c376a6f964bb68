"""The wheel: built here, it carries the shipped models and reads scans without TensorFlow."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pandas as pd

from .conftest import ROOT, SCANS, TEMPLATE

# What reading must never import: training, plotting and the pad are extras.
BLOCKED = ("tensorflow", "keras", "flask", "matplotlib")


def test_the_wheel_reads_the_samples_without_tensorflow(tmp_path, truth):
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist", ROOT],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    wheel = next((tmp_path / "dist").glob("formreader-*.whl"))
    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, wheel], capture_output=True, text=True
    )
    assert install.returncode == 0, install.stderr
    assert (site / "formreader" / "models" / "digits.tflite").exists()
    assert "from formreader.__main__ import main" in (site / "bin" / "formreader").read_text()
    launcher = tmp_path / "run.py"
    launcher.write_text(
        textwrap.dedent(f"""
        import sys

        class Blocked:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {BLOCKED!r}:
                    raise ImportError("not installed here: " + name)

        sys.meta_path.insert(0, Blocked())
        sys.path.insert(0, {str(site)!r})
        import formreader
        assert formreader.__file__.startswith({str(site)!r}), formreader.__file__

        if __name__ == "__main__":  # worker processes import this file too (spawn)
            from formreader.cli import main

            main()
    """)
    )
    out = tmp_path / "r.csv"
    run = subprocess.run(  # with worker processes: they too must find everything in the wheel
        [sys.executable, launcher, "process", SCANS, "--template", TEMPLATE, "--out", out, "-q", "--workers", "2"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    fields = pd.read_csv(out, dtype={"value": str}, keep_default_na=False)
    expected = {(r.file, int(r.page), r.field): r.value for r in truth.itertuples()}
    right = sum(
        expected[(f.split("/")[-1], int(p), n)] == v for f, p, n, v in zip(fields.file, fields.page, fields.field, fields.value)
    )
    assert len(fields) == len(truth) and right >= 0.85 * len(truth)


def test_python_m_formreader_is_the_command_and_its_module_imports_nothing_more():
    """`python -m formreader` is the command line. The `formreader` command's script imports
    formreader.__main__, which imports the command line only when run: a worker process runs its
    parent's main script again before it reads (multiprocessing's spawn start), and so starts
    without the command line's own imports."""
    run = subprocess.run([sys.executable, "-m", "formreader", "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and "process" in run.stdout and "review" in run.stdout
    probe = "import sys, formreader.__main__; print(sorted(m for m in ('click', 'numpy', 'formreader.cli') if m in sys.modules))"
    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert imported.returncode == 0 and imported.stdout.strip() == "[]", imported.stdout + imported.stderr
