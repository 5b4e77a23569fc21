"""The ``dymu`` command line.

Each sub-command lives in its own module under :mod:`dymu.commands` and exposes
``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``. Modules are
discovered, so adding a command is adding a file. Heavy imports (torch,
transformers) happen inside ``run`` so that ``dymu --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import signal
import sys
from typing import Sequence

from dymu import __version__, commands


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written, and every option's default as "(default: X)" (argparse's
    ArgumentDefaultsHelpFormatter, but silent for None, for flags and where the help already says it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        said = text.lower()
        if (
            "%(default)" in text
            or "(default" in said
            or "default:" in said  # "default: 16" written by hand: not twice
            or default is None
            or action.nargs == 0  # a flag (store_true / store_false): "(default: True)" would mislead
            or default == argparse.SUPPRESS
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dymu",
        description=(
            "DyMU: training-free dynamic token merging (DToMe) for vision encoders and "
            "virtual token unmerging (VTU) for the language model of a VLM."
        ),
        epilog="Run 'dymu COMMAND --help' for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"dymu {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        p = sub.add_parser(
            module.NAME,
            help=module.HELP,
            description=(module.__doc__ or module.HELP).strip(),
            formatter_class=HelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run, _interrupted=getattr(module, "INTERRUPTED", None))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "_run"):
        parser.print_help()
        return 2
    previous = _exit_on_sigterm()
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as err:  # user-facing errors: no traceback
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"dymu {args.command}: error: {message}", file=sys.stderr)
        return 2
    except OSError as err:  # a file system refusal (permissions, full disk, a file where a folder should be)
        where = f": {err.filename}" if getattr(err, "filename", None) else ""
        print(f"dymu {args.command}: error: {err.strerror or err}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # Ctrl-C (or SIGTERM, see below): a short line, the shell's 128 + signal
        hint = getattr(args, "_interrupted", None)
        what = "terminated" if isinstance(stop, _Terminated) else "interrupted"
        print(f"dymu {args.command}: {what}" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return 143 if isinstance(stop, _Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same cleanups run."""


def _raise_interrupt(signum, frame):  # noqa: ANN001
    raise _Terminated


def _exit_on_sigterm():
    """Let SIGTERM (kill, a job scheduler) unwind like Ctrl-C, so that cleanups run (e.g. a half-built weights
    folder is removed); returns the previous handler, or None where it cannot be set (not the main thread)."""
    try:
        return signal.signal(signal.SIGTERM, _raise_interrupt)
    except (ValueError, OSError, AttributeError):
        return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
