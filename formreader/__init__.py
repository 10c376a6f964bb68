"""formreader: read handwritten digits off scanned forms into a spreadsheet, with honest review flags."""

from formreader.api import process_folder, read_digits, read_number

__all__ = ["process_folder", "read_digits", "read_number"]
__version__ = "0.1.0"
