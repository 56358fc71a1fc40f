"""The `serve` command: the OpenAI-compatible server (wasmchord.serve) under uvicorn."""

from __future__ import annotations

import socket
import sys
import threading

from .. import hub
from .files import resolve
from .run import add_device_options, backend_options

STOP_GRACE = 2.0  # s past --shutdown-timeout for the requests the engine then fails to get their errors out


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def add_serve(sub):
    s = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (needs wasmchord[serve])")
    s.add_argument("model", nargs="?", default=hub.DEFAULT_MODEL, help="model path or alias")
    add_device_options(s)  # --backend, --gpu-backend, --context-length (per slot), --verify
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--slots", type=int, default=4, help="sequences decoded at once (each takes a KV cache slot)")
    s.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 503s")
    s.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens evaluated per engine step")
    s.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds that Ctrl-C / SIGTERM waits for running requests before ending them")
    s.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY")
    s.add_argument("--cors-origins", default="", help="comma-separated origins allowed by CORS")
    s.add_argument("--served-model-name", default=None, help="the model id clients send (default: the alias or "
                   "file name)")
    s.set_defaults(func=cmd_serve)


def cmd_serve(a):
    from ..serve import create_app, require
    require()
    import uvicorn

    from ..errors import GenerationError, GGUFError, WasmchordError
    from ..model import Model
    for flag, value, low, high in (("--slots", a.slots, 1, 256), ("--max-queue", a.max_queue, 0, None),
                                   ("--prefill-chunk", a.prefill_chunk, 1, None), ("--port", a.port, 0, 65535)):
        if value < low or high is not None and value > high:  # before loading, not as a failed /health
            raise GenerationError(f"{flag} {value}: expected an integer from {low}" + (f" to {high}" if high else " up"))
    if a.context_length is not None and a.context_length < 2:
        raise GenerationError(f"--context-length {a.context_length}: expected an integer >= 2")
    if not a.shutdown_timeout >= 0:
        raise GenerationError(f"--shutdown-timeout {a.shutdown_timeout}: expected seconds >= 0")
    check_listen(a.host, a.port)
    options = backend_options(a)
    path = resolve(a.model, a)
    if not path.is_file():  # before the "loading" line and the server's start
        raise GGUFError(path, "no such file" if not path.exists() else "not a file")
    name = a.served_model_name or (a.model if a.model in hub.KNOWN_MODELS else path.name)

    def load():
        return Model.load(path, device=a.backend, context_length=a.context_length, slots=a.slots, **options)

    def ready(served):
        m = served.model
        print(f"wasmchord: serving {name} on {m.backend.name} ({m.load_stats.slots} slots x "
              f"{m.load_stats.context_length} positions) at http://{a.host}:{a.port}/v1", flush=True)

    failed, server = [], None

    def load_failed(e):  # on the load's thread: the server ends, and the command says why
        failed.append(e)
        if server is not None:
            server.should_exit = True

    app = create_app(load, name=name, api_key=a.api_key, on_ready=ready, on_error=load_failed,
                     cors_origins=[o for o in a.cors_origins.split(",") if o], max_queue=a.max_queue,
                     prefill_chunk=a.prefill_chunk)
    print(f"wasmchord: loading {name} (GET /health answers 503 until it is ready)", file=sys.stderr, flush=True)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            first, engine = not self.should_exit, app.state.served.engine
            super().handle_exit(sig, frame)  # first: a failed print must not lose the signal
            if not first:  # a second Ctrl-C or SIGTERM: what is left fails now, the server ends at once
                self.force_exit = True
                if engine is not None:
                    engine.abort()
                try:
                    print("wasmchord: second signal: stopping now", file=sys.stderr, flush=True)
                except RuntimeError:
                    pass
            elif engine is not None and (engine.running or engine.queued):
                # At the timeout the engine fails what is left (EngineStopped) without waiting for its
                # step: each client gets a 503 or an error event, written within uvicorn's own timeout,
                # which comes STOP_GRACE s later.
                timer = threading.Timer(a.shutdown_timeout, engine.abort)
                timer.daemon = True  # requests done sooner: nothing waits for it
                timer.start()
                try:
                    print(f"wasmchord: shutting down: {plural(engine.running, 'request')} running and "
                          f"{engine.queued} waiting get up to {a.shutdown_timeout:g} s to finish",
                          file=sys.stderr, flush=True)
                except RuntimeError:  # the signal came while the main thread wrote to stderr
                    pass
    config = uvicorn.Config(app, host=a.host, port=a.port, log_level="warning",
                            timeout_graceful_shutdown=a.shutdown_timeout + STOP_GRACE)
    server = Server(config)
    if failed:  # the load ended before the server existed
        server.should_exit = True
    server.run()
    if failed:
        e = failed[0]
        raise e if isinstance(e, WasmchordError) else WasmchordError(f"loading {name} failed: "
                                                                      f"{type(e).__name__}: {e}")


def check_listen(host: str, port: int):
    """OSError naming the address when the server could not listen there (checked before the model
    loads, as one line, rather than by uvicorn after it)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise OSError(f"--host {host}: {e.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(addr)
        except OSError as e:
            raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from None
