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


# Torch-side commands: `pianolm NAME ...` hands every later word to an entry function that
# parses its own options. NAME -> (module under pianolm.export, entry function, help).
PASS_THROUGH = {
    "data": ("data.dataset", "main_render", "training data: `pianolm data render --help`"),
    "train": ("train", "main_train", "train encoder / LM stages: `pianolm train --help`"),
    "export": ("onnx_export", "main_export", "export a model to ONNX: `pianolm export --help`"),
    "build-engines": ("tensorrt", "main_build_engines",
                      "TensorRT engines for an export: `pianolm build-engines --help`"),
}


def cmd_pass_through(args: argparse.Namespace) -> None:
    module, entry, _ = PASS_THROUGH[args.command]
    rest = list(args.rest)
    if args.command == "data":  # the only data action so far
        if rest[:1] != ["render"]:
            raise UserError("usage: pianolm data render --out DIR [options]")
        rest = rest[1:]
    code = getattr(_torch_side(module), entry)(rest)
    if code:
        raise SystemExit(code)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pianolm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="parameter counts of a model preset, per part")
    info.add_argument("--preset", default="small", choices=["tiny", "small", "base"])
    info.add_argument("--encoder", default="hppnet", choices=["crnn", "hppnet"])
    info.set_defaults(func=cmd_info)

    for name, (_, _, help_text) in PASS_THROUGH.items():
        # prefix_chars="+" hands every word after the command (--help included) through.
        cmd = sub.add_parser(name, prefix_chars="+", add_help=False, help=help_text)
        cmd.add_argument("rest", nargs=argparse.REMAINDER)
        cmd.set_defaults(func=cmd_pass_through)
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
