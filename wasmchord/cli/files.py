"""Commands about model files: pull, info, convert, validate."""

from __future__ import annotations

import json

from .. import hub
from ..convert import QUANTS
from .progress import ProgressBar


def resolve(model: str, a):
    """A path for a model path or alias (pulled on first use, with a progress bar), from the parsed
    arguments `a` (--cache-dir, --verify)."""
    with ProgressBar() as bar:
        return hub.resolve_model(model, cache_dir=a.cache_dir, progress=bar, verify=getattr(a, "verify", False))


def add_verify(s):
    s.add_argument("--verify", action="store_true",
                   help="hash a cached model again, even when unchanged since its last hash (a bad copy is pulled again)")


# ---------------------------------------------------------------------------- pull

def add_pull(sub):
    s = sub.add_parser("pull", help="download a known model into the cache, or check a cached copy (hashed "
                       "again) and download a bad one again")
    s.add_argument("models", nargs="+", metavar="ALIAS", help=f"one of: {', '.join(hub.KNOWN_MODELS)}")
    s.add_argument("--force", action="store_true", help="download again even if cached")
    s.set_defaults(func=cmd_pull)


def cmd_pull(a):
    for alias in a.models:
        with ProgressBar() as bar:
            path = hub.pull(alias, cache_dir=a.cache_dir, progress=bar, force=a.force)
        print(path)


# ---------------------------------------------------------------------------- info

def add_info(sub):
    s = sub.add_parser("info", help="describe a GGUF model (architecture, sizes, tensors)")
    s.add_argument("model", nargs="?", help=f"path or alias (default: {hub.DEFAULT_MODEL})")
    s.add_argument("--tensors", action="store_true", help="list every tensor")
    s.add_argument("--metadata", action="store_true", help="list every metadata key")
    s.add_argument("--json", action="store_true", help="machine-readable summary")
    s.add_argument("--gpu", action="store_true", help="describe the GPU adapter, limits and features")
    s.add_argument("--gpu-backend", default=None, choices=["vulkan", "metal", "dx12", "opengl"],
                   help="with --gpu: the adapter on this wgpu backend")
    add_verify(s)
    s.set_defaults(func=cmd_info)


def cmd_info(a):
    if a.gpu:
        from ..backends import gpu_info
        print(gpu_info(a.gpu_backend))
        if not a.model:
            return
    from ..formats.gguf import GGUFFile
    from ..info import format_summary, summarize
    gf = GGUFFile(resolve(a.model or hub.DEFAULT_MODEL, a))
    if a.json:
        print(json.dumps(summarize(gf, tensors=a.tensors, metadata=a.metadata), indent=2, default=str))
    else:
        print(format_summary(gf, tensors=a.tensors, metadata=a.metadata))


# ---------------------------------------------------------------------------- convert

def add_convert(sub):
    s = sub.add_parser("convert", help="convert a Hugging Face model directory to GGUF")
    s.add_argument("--model", dest="model_dir", required=True, help="directory with config.json, weights and tokenizer")
    s.add_argument("--output", required=True, help="output .gguf file")
    s.add_argument("--quant", default="f16", type=str.lower, help=f"one of {', '.join(QUANTS)} (default: f16)")
    s.add_argument("--force", action="store_true", help="overwrite an existing output file")
    s.set_defaults(func=cmd_convert)


def cmd_convert(a):
    from ..convert import convert
    with ProgressBar() as bar:
        path = convert(a.model_dir, a.output, quant=a.quant, force=a.force, progress=bar)
    print(path)


# ---------------------------------------------------------------------------- validate

def add_validate(sub):
    s = sub.add_parser("validate", help="check GGUF files (structure, metadata, shapes, values, tokenizer); "
                       "exit 1 on problems")
    s.add_argument("files", nargs="+", metavar="FILE", help="path or alias")
    s.add_argument("--no-values", action="store_true", help="skip the NaN/Inf scan of the weights")
    add_verify(s)
    s.set_defaults(func=cmd_validate)


def cmd_validate(a) -> int:
    from ..validate import validate
    status = 0
    for f in a.files:
        with ProgressBar() as bar:
            report = validate(resolve(f, a), check_values=not a.no_values, progress=bar)
        print(report.format())
        status = status or (0 if report.ok else 1)
    return status


def add_commands(sub):
    for add in (add_pull, add_info, add_convert, add_validate):
        add(sub)
