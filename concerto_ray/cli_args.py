"""Command-line options shared by the CLI's subcommands and the `jobs/` scripts."""

from __future__ import annotations

import argparse


def add_set_option(p: argparse.ArgumentParser, help: str) -> None:
    """`--set KEY=VALUE` (repeatable), collected in `args.overrides`: one override syntax for every command."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)
