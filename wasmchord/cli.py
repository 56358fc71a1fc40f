"""The `wasmchord` command line. The only place that reads the outside world (argv, env, tty).

Every `WasmchordError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from . import hub
from .errors import WasmchordError


# ---------------------------------------------------------------------------- progress bars

class _Bar:
    """A tqdm bar per stage, on stderr; silent when stderr is not a terminal."""

    def __init__(self):
        self.bar, self.stage = None, None

    def __call__(self, stage: str, done: int, total: int):
        if not sys.stderr.isatty():
            return
        from tqdm import tqdm
        if stage != self.stage:
            self.close()
            unit = "B" if total > 10_000 else "it"
            self.bar = tqdm(total=total, desc=stage, unit=unit, unit_scale=unit == "B", file=sys.stderr, leave=False)
            self.stage = stage
        self.bar.n = done
        self.bar.refresh()

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _resolve(model: str, cache_dir=None):
    bar = _Bar()
    try:
        return hub.resolve_model(model, cache_dir=cache_dir, progress=bar)
    finally:
        bar.close()


# ---------------------------------------------------------------------------- commands

def cmd_pull(a):
    for alias in a.models:
        bar = _Bar()
        try:
            path = hub.pull(alias, cache_dir=a.cache_dir, progress=bar, force=a.force)
        finally:
            bar.close()
        print(path)


def cmd_info(a):
    if a.gpu:
        from .backends import gpu_info
        print(gpu_info())
        if not a.model:
            return
    from .formats.gguf import GGUFFile
    from .info import format_summary, summarize
    gf = GGUFFile(_resolve(a.model or hub.DEFAULT_MODEL, a.cache_dir))
    if a.json:
        print(json.dumps(summarize(gf), indent=2, default=str))
    else:
        print(format_summary(gf, tensors=a.tensors, metadata=a.metadata))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wasmchord", description="Run GGUF language models on the GPU (WebGPU) or CPU.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    p.add_argument("--cache-dir", default=None, help="model cache (default: $WASMCHORD_CACHE or ~/.cache/wasmchord)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("pull", help="download a known model into the cache")
    s.add_argument("models", nargs="+", metavar="ALIAS", help=f"one of: {', '.join(hub.KNOWN_MODELS)}")
    s.add_argument("--force", action="store_true", help="download again even if cached")
    s.set_defaults(func=cmd_pull)

    s = sub.add_parser("info", help="describe a GGUF model (architecture, sizes, tensors)")
    s.add_argument("model", nargs="?", help="path or alias (default: %s)" % hub.DEFAULT_MODEL)
    s.add_argument("--tensors", action="store_true", help="list every tensor")
    s.add_argument("--metadata", action="store_true", help="list every metadata key")
    s.add_argument("--json", action="store_true", help="machine-readable summary")
    s.add_argument("--gpu", action="store_true", help="describe the GPU adapter, limits and features")
    s.set_defaults(func=cmd_info)
    _add_engine_commands(sub)
    return p


def _add_engine_commands(sub):
    """The commands that run a model live in cli_engine, to keep this module small."""
    from .cli_engine import add_commands
    add_commands(sub)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except WasmchordError as e:
        print(f"wasmchord: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("wasmchord: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
