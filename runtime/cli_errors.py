"""The one error type of every command line (vae-run, vae-train, vae-export, vae-eval): a
library's ValueError or OSError becomes one line on stderr and exit status 2."""

from __future__ import annotations

import contextlib

import click


class CliError(click.ClickException):
    """A one-line error with exit status 2 (bad input, bad bundle), never a traceback."""

    exit_code = 2


@contextlib.contextmanager
def library_errors():
    try:
        yield
    # OSError too: a full disk or a read-only output directory is a one-line error,
    # not a traceback, on a kiosk nobody watches.
    except (ValueError, OSError) as exc:
        raise CliError(str(exc)) from None
