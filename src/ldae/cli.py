"""The ``ldae`` command line: parse, call the library, report user errors as one line (exit 2).

Each subcommand lives in ``ldae.commands.<name>`` and defines ``HELP``, ``add_arguments(parser)`` and
``main(args) -> int | None``, which :func:`main` here dispatches to; heavy imports (torch, MONAI) stay
inside it so that ``ldae --help`` is instant. A subcommand that accepts config overrides sets
``ACCEPTS_OVERRIDES = True`` and receives the unparsed ``--section.key VALUE`` pairs in ``args.overrides``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback
from collections.abc import Sequence

from ldae import __version__
from ldae.errors import find_user_error, one_line

# name -> module; order is the order shown by `ldae --help`
COMMANDS: dict[str, str] = {
    "check": "ldae.commands.check",
    "synth": "ldae.commands.synth",
    "preprocess": "ldae.commands.preprocess",
    "fit": "ldae.commands.fit",
    "compress": "ldae.commands.compress",
    "generate": "ldae.commands.generate",
    "pipeline": "ldae.commands.pipeline",
    "import-official": "ldae.commands.import_official",
    "encode": "ldae.commands.encode",
    "reconstruct": "ldae.commands.reconstruct",
    "variations": "ldae.commands.variations",
    "interpolate": "ldae.commands.interpolate",
    "manipulate": "ldae.commands.manipulate",
    "evaluate": "ldae.commands.evaluate",
    "predict": "ldae.commands.predict",
    "demo": "ldae.commands.demo",
    "bench": "ldae.commands.bench",
}


def _available_commands() -> dict[str, object]:
    modules = {}
    for name, module_name in COMMANDS.items():
        try:
            modules[name] = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:  # a command whose module has not landed yet
            if exc.name != module_name:
                raise
    return modules


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, object]]:
    """The top-level parser with one subparser per available command."""
    parser = argparse.ArgumentParser(
        prog="ldae",
        description="Latent Diffusion Autoencoders for 3D brain MRI.",
    )
    parser.add_argument("--version", action="version", version=f"ldae {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = _available_commands()
    for name, module in modules.items():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)  # type: ignore[attr-defined]
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
        module.add_arguments(p)  # type: ignore[attr-defined]
    return parser, modules


def _quiet_lightning() -> None:
    """Lightning prints through its own handler on the ``lightning`` logger: keep those records from also
    reaching ours (every line twice), and drop its advertising tip."""
    logging.getLogger("lightning").propagate = False
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: "litlogger" not in record.getMessage())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ldae`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, modules = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    module = modules[args.command]
    if extra and not getattr(module, "ACCEPTS_OVERRIDES", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("ldae").setLevel(logging.DEBUG if args.debug else logging.INFO)
    _quiet_lightning()
    try:
        code = module.main(args)  # type: ignore[attr-defined]
    except KeyboardInterrupt:
        print("ldae: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        user_error = find_user_error(exc)
        if user_error is None or args.debug:
            if user_error is not None:
                traceback.print_exc()
                return user_error.exit_code
            raise
        message = one_line(user_error) or type(user_error).__name__
        print(f"ldae {args.command}: error: {message}", file=sys.stderr)
        return user_error.exit_code
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
