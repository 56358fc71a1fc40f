"""Commands that run a model: generate, chat, bench."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields
from pathlib import Path

from .. import hub
from ..atomic import atomic_write, check_writable
from ..errors import WasmchordError
from ..generate import DEFAULT_MAX_TOKENS
from ..sampling import SamplingParams
from .files import add_verify, resolve
from .progress import ProgressBar


GPU_BACKENDS = ["vulkan", "metal", "dx12", "opengl"]  # wasmchord.backends.webgpu.device.GPU_BACKENDS


def add_device_options(s):
    s.add_argument("--backend", default="auto", choices=["auto", "cpu", "gpu"], help="compute backend")
    s.add_argument("--gpu-backend", default=None, choices=GPU_BACKENDS,
                   help="require this wgpu backend for the GPU (default: wgpu's choice, said on stderr)")
    s.add_argument("--context-length", type=int, default=None, help="cap the context (default: model's, max 4096)")
    s.add_argument("--weights", choices=["quantized", "f32"], default=None,
                   help="cpu backend: keep weights in their GGUF blocks (quantized, the default) or expand "
                        "them to float32 at load (f32, the exact reference)")
    s.add_argument("--activations", choices=["auto", "f32", "int16", "int8"], default=None,
                   help="cpu backend: multiply float32 activations (f32), or integer ones: int16 (logits within a "
                        "few 1e-4 of float32) or int8 (llama.cpp's precision, fastest), for every product with "
                        "AVX-512 VNNI; with AVX2 alone for prompts of 32 tokens or more and decode's Q4_K and "
                        "Q6_K products; auto: int16 where the CPU has either (the default)")
    add_verify(s)


def add_sampling_options(s):
    """-n, --stop and one flag per `SamplingParams` field, with its default and help."""
    s.add_argument("-n", "--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"generate at most this many tokens (default: {DEFAULT_MAX_TOKENS})")
    for f in fields(SamplingParams):
        default = "" if f.default is None else f" (default: {f.default})"
        s.add_argument("--" + f.name.replace("_", "-"), type=f.metadata["type"], default=f.default,
                       help=f.metadata["help"] + default)
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def sampling_options(a) -> dict:
    """The keyword arguments of `Model.stream` from parsed flags, checked: an error names the flag."""
    from ..errors import GenerationError
    from ..generate import check_args
    params = {f.name: getattr(a, f.name) for f in fields(SamplingParams)}
    if a.max_tokens < 1:
        raise GenerationError(f"-n/--max-tokens {a.max_tokens}: expected an integer >= 1")
    for s in a.stop:
        if not s:
            raise GenerationError("--stop '': expected a non-empty string")
    try:
        check_args(a.max_tokens, a.stop)
        SamplingParams(**params)
    except GenerationError as e:  # "top_p = 2.0: expected ..." -> "--top-p 2.0: expected ..."
        name, _, rest = str(e).partition(" = ")
        value, _, want = rest.partition(": expected ")
        raise GenerationError(f"--{name.replace('_', '-')} {value}: expected {want.removesuffix(', or None')}"
                              if name in params and want else str(e)) from None
    return dict(max_tokens=a.max_tokens, stop=a.stop or None, **params)


def backend_options(a) -> dict:
    """Backend keyword arguments from --gpu-backend, --weights and --activations."""
    from ..errors import BackendError
    options = {}
    if a.gpu_backend:
        if a.backend == "cpu":
            raise BackendError("--gpu-backend needs --backend gpu (or auto)")
        options["gpu_backend"] = a.gpu_backend
    if a.weights:
        if a.backend == "gpu":
            raise BackendError("--weights chooses how the cpu backend stores weights; the gpu backend has no such option")
        options["weights"] = a.weights
    if getattr(a, "activations", None):
        if a.backend == "gpu":
            raise BackendError("--activations chooses how the cpu backend multiplies; the gpu backend has no such option")
        options["activations"] = a.activations
    return options


def load(a):
    from ..model import Model
    options = backend_options(a)
    path = resolve(a.model, a)
    with ProgressBar() as bar:
        m = Model.load(path, device=a.backend, context_length=a.context_length, progress=bar, **options)
    if m.backend.name == "gpu":
        print(f"wasmchord: GPU {m.backend.device_name}", file=sys.stderr)
    return m


def write_stream(chunks):
    """Write streamed text to stdout as it comes; returns the last chunk (it carries the statistics)."""
    ch = None
    for ch in chunks:
        sys.stdout.write(ch.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return ch


# ---------------------------------------------------------------------------- generate

def add_generate(sub):
    s = sub.add_parser("generate", help="generate text from a prompt (streams to stdout)")
    s.add_argument("model", help="model path or alias, or the prompt when only one argument is given (and it "
                   "names no model)")
    s.add_argument("prompt", nargs="?", default=None, help="the prompt; - reads it from stdin")
    add_device_options(s)
    add_sampling_options(s)
    s.add_argument("--raw", action="store_true",
                   help="send the prompt as it is (default: as a user message through the model's chat template, "
                        "when it has one)")
    s.add_argument("--stats", action="store_true", help="print timings to stderr")
    s.set_defaults(func=cmd_generate)


def cmd_generate(a):
    if a.prompt is None:  # one positional: it is the prompt, unless it names a model (the prompt forgotten)
        if a.model in hub.KNOWN_MODELS or a.model.endswith(".gguf") and Path(a.model).is_file():
            raise WasmchordError(f"{a.model} is a model: give the prompt too (wasmchord generate {a.model} PROMPT)")
        a.model, a.prompt = hub.DEFAULT_MODEL, a.model
    if a.prompt == "-":  # the prompt from stdin, as a file's text is: `wasmchord generate - < prompt.txt`
        a.prompt = sys.stdin.read()
    options = sampling_options(a)  # before the model loads
    m = load(a)
    t0 = time.perf_counter()
    if a.raw or not m.tokenizer.chat_template:
        chunks = m.stream(a.prompt, **options)
    else:  # as llama-cli and mlx_lm.generate do: an instruct model answers a user turn, not raw text
        try:
            chunks = m.chat_stream([{"role": "user", "content": a.prompt}], **options)
        except WasmchordError as e:
            if "chat template" not in str(e):
                raise
            raise WasmchordError(f"{e} (--raw sends the prompt without the template)") from None
    s = write_stream(chunks).stats
    if a.stats:
        print(f"[{s.prompt_tokens} prompt tokens in {s.prompt_eval_s:.2f} s, {s.completion_tokens} tokens at "
              f"{s.completion_tokens / s.eval_s if s.eval_s else 0:.1f} tok/s, total {time.perf_counter() - t0:.2f} s, "
              f"backend {m.backend.name}]", file=sys.stderr)


# ---------------------------------------------------------------------------- chat

def add_chat(sub):
    s = sub.add_parser("chat", help="interactive chat (/reset, /exit)")
    s.add_argument("model", nargs="?", default=hub.DEFAULT_MODEL)
    s.add_argument("--system", default=None, help="system prompt")
    add_device_options(s)
    add_sampling_options(s)
    s.set_defaults(func=cmd_chat)


def cmd_chat(a):
    options = sampling_options(a)  # before the model loads
    m = load(a)
    chat = m.start_chat(system=a.system)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {m.gguf.path.name} on {m.backend.name}; /reset to start over, /exit to quit",
              file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            break
        if line == "/reset":
            chat.reset()
            print("[conversation reset]", file=sys.stderr)
            continue
        if line.startswith("/") and " " not in line:  # a typo'd command is not sent to the model
            print(f"unknown command {line}: /reset starts over, /exit quits", file=sys.stderr)
            continue
        if not interactive:  # a script's chat: an error ends it (one line, exit status 2)
            write_stream(chat.send_stream(line, **options))
            continue
        try:  # at the terminal, Ctrl-C stops the reply and an error ends the turn, not the session
            write_stream(chat.send_stream(line, **options))
        except KeyboardInterrupt:
            print("\n[reply interrupted: not kept in the conversation]", file=sys.stderr)
        except WasmchordError as e:
            print(f"wasmchord: error: {e} (/reset starts over)", file=sys.stderr)


# ---------------------------------------------------------------------------- bench

def positive_int(text: str) -> int:
    """An argparse type: a positive integer."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def positive_ints(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated positive integers."""
    return tuple(positive_int(x) for x in text.split(","))


def add_bench(sub):
    s = sub.add_parser("bench", help="benchmark load, prefill and decode (with llama.cpp when installed)")
    s.add_argument("model", nargs="?", default=hub.DEFAULT_MODEL)
    add_device_options(s)
    s.add_argument("--prompt-lengths", default=(64, 256, 1024), type=positive_ints,
                   help="prompt lengths to time, comma-separated (default: 64,256,1024)")
    s.add_argument("--gen-tokens", type=positive_int, default=None,
                   help="tokens to decode (default: 128; per sequence with --batch: 48)")
    s.add_argument("--no-llama-cpp", action="store_true", help="skip the llama.cpp comparison")
    s.add_argument("--profile", action="store_true", help="GPU: per-kernel times (timestamp queries), GB/s, "
                   "host encode time and dispatches per decode step")
    s.add_argument("--profile-steps", type=positive_int, default=16,
                   help="decode steps timed per --profile measurement (default: 16)")
    s.add_argument("--timestamp-period", type=float, default=1.0,
                   help="ns per GPU timestamp tick (Vulkan timestampPeriod: 1 on lavapipe and NVIDIA)")
    s.add_argument("--batch", default=None, type=positive_ints, metavar="B,B,...",
                   help="instead: the batch engine at these batch sizes (e.g. 1,2,4,8,16) against one by one")
    s.add_argument("--temperature", type=float, default=0.0,
                   help="with --batch: sample at this temperature (prompt i with seed i) instead of greedy")
    s.add_argument("--json", help="write results as JSON here")
    s.set_defaults(func=cmd_bench)


def cmd_bench(a):
    from .. import bench
    if a.context_length is not None:
        raise WasmchordError("--context-length: bench sizes the context from --prompt-lengths and --gen-tokens")
    if a.json:  # checked before minutes of benchmarking, not after
        out = Path(a.json)
        if out.is_dir() or not out.parent.is_dir():
            raise WasmchordError(f"--json {a.json}: expected a file in an existing directory")
        check_writable(out)
    path = resolve(a.model, a)
    if a.batch:
        with ProgressBar() as bar:
            res = bench.batch_sweep(path, device=a.backend, batches=a.batch, n_gen=a.gen_tokens or 48, progress=bar,
                                    temperature=a.temperature, **backend_options(a))
        print(bench.format_sweep(res))
    else:
        with ProgressBar() as bar:
            res = bench.run(path, device=a.backend, prompt_lengths=a.prompt_lengths, n_gen=a.gen_tokens or 128,
                            llama_cpp="off" if a.no_llama_cpp else "auto", progress=bar, profile=a.profile,
                            profile_steps=a.profile_steps,
                            timestamp_period_ns=a.timestamp_period, **backend_options(a))
        print(bench.format_result(res))
    if a.json:
        with atomic_write(a.json) as f:  # whole or not at all
            f.write(json.dumps(res, indent=2, default=str).encode())


def add_commands(sub):
    for add in (add_generate, add_chat, add_bench):
        add(sub)
