"""The `formreader` command, and `python -m formreader`: formreader.cli, imported when run.

A pool's worker process first runs its parent's main script again (multiprocessing's spawn
start); the command's script imports only this module, so each worker starts without the
command line's own imports (click, about 35 ms of its start).
"""


def main() -> None:
    from formreader.cli import main as cli

    cli()


if __name__ == "__main__":
    main()
