"""The `pianolm` command line.

Runtime subcommands need only the runtime's dependencies. Torch-side subcommands (info, export,
train, ...) import pianolm.export lazily and say which extra to install when torch is missing.
Every user error ends with one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable


class UserError(Exception):
    """An error caused by the user's input: printed as one line, exit status 2."""


def _torch_side(module: str) -> object:
    try:
        return importlib.import_module(f"pianolm.export.{module}")
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in {"torch", "onnx", "onnxscript", "safetensors"}:
            raise UserError(f"this command needs the torch side: pip install 'pianolm[export]' "
                            f"({e.name} is not installed)") from None
        raise


def cmd_info(args: argparse.Namespace) -> None:
    system = _torch_side("system")
    print(system.describe_parameters(args.preset, args.encoder))


def cmd_data(args: argparse.Namespace) -> None:
    dataset = _torch_side("data.dataset")
    code = dataset.main_render(args.rest)
    if code:
        raise SystemExit(code)


def cmd_export(args: argparse.Namespace) -> None:
    code = _torch_side("onnx_export").main_export(args.rest)
    if code:
        raise SystemExit(code)


def cmd_build_engines(args: argparse.Namespace) -> None:
    code = _torch_side("tensorrt").main_build_engines(args.rest)
    if code:
        raise SystemExit(code)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pianolm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="parameter counts of a model preset, per part")
    info.add_argument("--preset", default="small", choices=["tiny", "small", "base"])
    info.add_argument("--encoder", default="hppnet", choices=["crnn", "hppnet"])
    info.set_defaults(func=cmd_info)

    data = sub.add_parser("data", help="training data: `pianolm data render --help`")
    data.add_argument("action", choices=["render"])
    data.add_argument("rest", nargs=argparse.REMAINDER, help="options of the action")
    data.set_defaults(func=cmd_data)

    # Options are parsed by the torch side; prefix_chars="+" hands every word after the
    # command (--help included) through to it untouched.
    export = sub.add_parser("export", prefix_chars="+", add_help=False,
                            help="export a model to ONNX: `pianolm export --help`")
    export.add_argument("rest", nargs=argparse.REMAINDER)
    export.set_defaults(func=cmd_export)
    engines = sub.add_parser("build-engines", prefix_chars="+", add_help=False,
                             help="TensorRT engines for an export: `pianolm build-engines --help`")
    engines.add_argument("rest", nargs=argparse.REMAINDER)
    engines.set_defaults(func=cmd_build_engines)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except UserError as e:
        print(f"pianolm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pianolm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
