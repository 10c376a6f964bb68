#!/bin/sh
# The README's picture of a workbook: the samples read, exported, and rendered by LibreOffice
# (apt-get install libreoffice-calc). The review station's picture is taken by its test:
#   FORMREADER_SCREENSHOTS=docs .venv/bin/python -m pytest tests/test_review.py
set -e
cd "$(dirname "$0")/.."
work=$(mktemp -d)
.venv/bin/formreader process samples/scans --template templates/demo_form.yaml --out "$work/results.csv" -q || true
.venv/bin/formreader export "$work/results.csv" --xlsx "$work/results.xlsx"
soffice --headless --norestore --convert-to pdf --outdir "$work" "$work/results.xlsx" >/dev/null
pdftoppm -png -r 150 -f 1 -l 1 -x 60 -y 140 -W 1440 -H 340 "$work/results.pdf" docs/xlsx
mv docs/xlsx-1.png docs/xlsx.png
rm -rf "$work"
