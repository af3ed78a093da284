"""``dandelion <stage>``: a thin command line over the library.

Each stage module provides ``add_cli_arguments(parser)`` and ``cli(args) -> int``; it is
imported only when its command runs, so ``dandelion --help`` stays instant.
Errors a user can fix (:class:`~dandelion_lib.core.errors.DandelionError`) print one line and
exit with status 2; nothing prints a stack trace.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dandelion_lib import __version__
from dandelion_lib.core.errors import DandelionError

COMMANDS: dict[str, tuple[str, str]] = {
    "ingest": (
        "dandelion_lib.cli.ingest",
        "Ingest images into the store as a new dataset version.",
    ),
    "train": (
        "dandelion_lib.cli.train",
        "Train a model on a dataset version; register it as challenger.",
    ),
    "evaluate": (
        "dandelion_lib.cli.evaluate",
        "Score a model on a labelled folder or a dataset split.",
    ),
    "promote": (
        "dandelion_lib.cli.promote",
        "Move the champion alias to the challenger if it passes.",
    ),
    "predict": ("dandelion_lib.cli.predict", "Classify image files with a registered model."),
    "feedback": ("dandelion_lib.cli.feedback", "List and review user feedback on predictions."),
    "drift": (
        "dandelion_lib.cli.drift",
        "Check a folder of new images for drift against a model.",
    ),
    "pipeline": (
        "dandelion_lib.cli.pipeline",
        "Run the whole pipeline through Airflow and summarise.",
    ),
}


def _usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = [f"usage: dandelion <command> [options]   (dandelion {__version__})", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'dandelion <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        print(__version__)
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"dandelion: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"dandelion {name}", description=help_)
    module.add_cli_arguments(parser)
    args = parser.parse_args(argv[1:])
    try:
        return int(module.cli(args) or 0)
    except DandelionError as exc:
        print(f"dandelion {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dandelion {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
