"""The ``--tiny`` switch of every script here: a smoke run of the same code path, which a test runs
so that no benchmark rots. Its figures are not measurements, and the output says so first and last
(the test looks for the note)."""
from __future__ import annotations

import argparse

NOTE = "tiny mode: a smoke run of the same code path; its figures are not measurements"


def parse(parser: argparse.ArgumentParser, what: str, **sizes) -> argparse.Namespace:
    """Parse the command line. With ``--tiny``, ``sizes`` replace the defaults (values given on the
    command line still win; a size with no option of its own is set all the same) and the note is
    printed. ``what`` says in ``--help`` what tiny mode runs."""
    parser.add_argument("--tiny", action="store_true", help=f"{what}: figures are not measurements")
    args = parser.parse_args()
    if args.tiny:
        parser.set_defaults(**sizes)
        args = parser.parse_args()
        print(NOTE)
    return args


def end(args: argparse.Namespace) -> None:
    """The note again under the figures, so that none is read as a measurement."""
    if args.tiny:
        print(NOTE)
