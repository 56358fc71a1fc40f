"""The `wasmchord` command line: the parser and `main`, where errors become exit codes.

The CLI is the only part of wasmchord that reads the outside world (argv, env, tty) and prints. Each
command's arguments are defined next to its code: `run` (generate, chat, bench), `serve` and `files`
(pull, info, convert, validate). A `WasmchordError` or an `OSError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys

from ..errors import WasmchordError
from . import files, run, serve


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line on stderr (exit code 2), like every other error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="wasmchord", description="Run GGUF language models on the GPU (WebGPU) or CPU.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    p.add_argument("--cache-dir", default=None, help="model cache (default: $WASMCHORD_CACHE or ~/.cache/wasmchord)")
    sub = p.add_subparsers(dest="command", required=True)
    run.add_commands(sub)
    serve.add_serve(sub)
    files.add_commands(sub)
    for command in sub.choices.values():  # -v after the command too (SUPPRESS: absent, it leaves the global one)
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log progress")
    return p


def main(argv=None) -> int:
    """Run the command line `argv` (default: sys.argv[1:]); returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        with _compile_notice(args):
            return args.func(args) or 0
    except BrokenPipeError:
        return 0
    except (WasmchordError, OSError) as e:  # the library's words for what a flag sets, as the flag
        print(f"wasmchord: error: {e}".replace("raise context_length", "raise --context-length"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("wasmchord: interrupted", file=sys.stderr)
        return 130


# The CPU kernels whose first compilation on a machine (numba, per block type; cached on disk afterwards)
# takes seconds to tens of seconds each, at the first prompt or token.
_KERNELS = frozenset({"matvec", "matvec_int", "matmul", "matmul_int", "matmul_int16", "decode_attention"})


@contextlib.contextmanager
def _compile_notice(args):
    """Say once on stderr when a CPU kernel starts compiling, which otherwise looks like a hang."""
    if getattr(args, "backend", "gpu") == "gpu":  # commands without a model, or on the GPU: no kernels
        yield
        return
    from numba.core import event

    class Notice(event.Listener):
        said = False

        def on_start(self, ev):
            if not self.said and ev.data["dispatcher"].py_func.__name__ in _KERNELS:
                self.said = True
                print("wasmchord: compiling the CPU kernels for this model's block types (their first use on this "
                      "machine; cached for later runs)", file=sys.stderr, flush=True)

        def on_end(self, ev):
            pass

    with event.install_listener("numba:compile", Notice()):
        yield
