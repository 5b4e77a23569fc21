"""A benchmark's command line: its parser, the options every benchmark takes, threads, device, ``main``."""

from __future__ import annotations

import argparse
from typing import Any, Callable, Sequence

import torch


def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return device


def argument_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """A benchmark's parser: its docstring's first paragraph as the description, from "Examples:" on as the epilog."""
    return argparse.ArgumentParser(
        prog=prog,
        description=doc.split("\n\n")[0],
        epilog=doc[doc.index("Examples:"):] if "Examples:" in doc else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def make_main(
    parse_args: Callable[[Sequence[str] | None], Any],
    run: Callable[[Any], dict[str, Any]],
    format_results: Callable[[dict[str, Any]], str],
) -> Callable[[Sequence[str] | None], int]:
    """A benchmark's ``main(argv)``: parse, run, print the report, return 0."""

    def main(argv: Sequence[str] | None = None) -> int:
        print(format_results(run(parse_args(argv))))
        return 0

    return main


def add_common_arguments(
    parser: argparse.ArgumentParser, *, repeats: int, warmup: int = 1, threads: str | None = None
) -> None:
    """--device, --dtype, --repeats, --warmup, --seed, --threads, --tiny. ``threads``: the bench times a list of
    thread counts (``--threads 1,2,default``, read by :func:`parse_thread_counts`), this one by default."""
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    parser.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="default: float32"
    )
    parser.add_argument("--repeats", type=int, default=repeats, help=f"timed runs per configuration (default: {repeats})")
    parser.add_argument("--warmup", type=int, default=warmup, help=f"untimed runs first (default: {warmup})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    if threads is None:
        parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    else:
        parser.add_argument("--threads", default=threads, help="torch CPU thread counts to time, comma-separated; "
                            f"'default' = torch's choice (default: {threads})")
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke configuration (used by the tests)")


def apply_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def parse_thread_counts(text: str) -> list[int | None]:
    """``"1,2,default"`` -> ``[1, 2, None]`` (None: torch's default thread count)."""
    counts: list[int | None] = []
    for part in (p.strip() for p in str(text).split(",")):
        if part == "default":
            counts.append(None)
        elif part.isdigit() and int(part) > 0:
            counts.append(int(part))
        else:
            raise ValueError(f"expected positive thread counts or 'default', comma-separated; got {part!r}")
    if not counts:
        raise ValueError("expected at least one thread count")
    return counts


def thread_label(threads: int | None, actual: int) -> str:
    """A row label: ``"2"``, or ``"default (2)"`` for torch's default."""
    return str(threads) if threads is not None else f"default ({actual})"
