"""``igw bench``: benchmark commands."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="igw bench", description="igw benchmarks")
    parser.add_subparsers(dest="command", required=True)
    parser.parse_args(argv)
    return 0
