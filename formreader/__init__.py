"""formreader: read handwritten digits off scanned forms into a spreadsheet, with honest review flags."""

__all__ = ["process_folder", "read_digits", "read_number"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The API is imported when first used: a page worker, which imports formreader.pipeline,
    # then starts without the API's tables (pandas).
    if name in __all__:
        from formreader import api

        return getattr(api, name)
    raise AttributeError(f"module 'formreader' has no attribute {name!r}")
