"""The HTTP layer: an OpenAI-compatible FastAPI app over the batch engine.

Handlers only parse requests, submit them to the engine (which owns the model on a thread of its own)
and turn its chunks into OpenAI's objects; a request's chunks reach the event loop through the
engine's notify hook. The model loads on a background thread: /health is 503 until it is ready.
Imported only once FastAPI is known to be installed (wasmchord.serve.require).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..constrain import Constraint
from ..engine import EngineStopped, QueueFull
from ..errors import GenerationError, WasmchordError
from .metrics import Metrics
from ..text.chat_template import takes_tools
from .protocol import (ApiError, ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, chat_logprobs,
                       completion_logprobs, envelope, new_id, parse, prompt_chunks, template_messages, usage)
from .tools import (CallStream, call_grammar, callable_functions, check_tools, cut_call, explain_call_grammar,
                    parse_calls)

log = logging.getLogger(__name__)
OPEN_PATHS = ("/health", "/metrics")
DISCONNECT_CHECK = 0.25  # seconds between checks that the client is still there
MAX_BODY = 32 * 2**20  # bytes of a request body (larger: 413)


class Served:
    """The model behind the app: loading, ready (model and engine) or failed."""

    def __init__(self, load, name: str, engine_options: dict, on_ready=None, on_error=None):
        self.load, self.name, self.engine_options, self.on_ready = load, name, engine_options, on_ready
        self.on_error = on_error
        self.model = self.engine = self.error = None
        self.metrics = Metrics()
        self.created = int(time.time())
        self._once, self._started = threading.Lock(), False

    def start(self):
        """Load the model on a thread (once, however often this is called)."""
        with self._once:
            if self._started:
                return
            self._started = True
        threading.Thread(target=self._load, name="wasmchord-load", daemon=True).start()

    def _load(self):
        try:
            model = self.load()
            engine = model.engine(**self.engine_options)
            engine.observe = self.metrics.observe
            engine.start()
            self.model, self.engine = model, engine
            if self.on_ready:
                self.on_ready(self)
        except Exception as e:  # reported by /health and every request, or to on_error (a CLI ends)
            self.error = e
            if self.on_error:
                self.on_error(e)
            elif isinstance(e, WasmchordError):
                log.error("loading the model failed: %s", e)
            else:
                log.exception("loading the model failed")

    def ready(self):
        if self.error is not None:
            raise ApiError(500, f"the model failed to load: {self.error}", kind="server_error")
        if self.engine is None:
            raise ApiError(503, "the model is loading", kind="server_error", headers={"Retry-After": "5"})

    def check_model(self, name: str | None):
        if name is not None and name != self.name:
            raise ApiError(404, f"model {name!r} does not exist; this server serves {self.name!r}",
                           param="model", code="model_not_found")


class Guard:
    """ASGI middleware: the API key (401 without it), and a bug answered as a 500 in OpenAI's shape and
    logged. An exception that left the app would have uvicorn close the client's keep-alive connection;
    a plain ASGI middleware (not `@app.middleware`) also leaves `receive` as the server gives it, so a
    handler sees a client's disconnect."""

    def __init__(self, app, api_key: str | None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.api_key and scope["path"] not in OPEN_PATHS and scope["method"] != "OPTIONS":
            scheme, _, key = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or key.strip() != self.api_key:
                answer = ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                                  kind="authentication_error", code="invalid_api_key")
                return await JSONResponse(answer.body(), status_code=401)(scope, receive, send)
        started = False

        async def watched(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)
        try:
            await self.app(scope, receive, watched)
        except Exception as e:
            log.exception("%s %s failed", scope["method"], scope["path"])
            if started:  # part of an answer is out: nothing to add to it
                return
            answer = ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error")
            await JSONResponse(answer.body(), status_code=500)(scope, receive, send)


def create_app(load, *, name: str, api_key: str | None = None, cors_origins=(), on_ready=None, on_error=None,
               **engine_options):
    """The app. `load()` returns a loaded `Model` (called on a background thread at startup); `name` is
    the model id clients send; `engine_options` go to `Model.engine` (max_queue, prefill_chunk);
    `on_ready(served)` / `on_error(exception)` are called when the load ends (on its thread)."""
    served = Served(load, name, engine_options, on_ready, on_error)

    async def lifespan(app):
        served.start()
        yield
        if served.engine is not None:
            served.engine.stop()

    app = FastAPI(title="wasmchord", lifespan=lifespan)
    app.state.served = served

    def error(e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(ApiError)
    async def on_api_error(request, e: ApiError):
        return error(e)

    @app.exception_handler(HTTPException)
    async def on_http_error(request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error(ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", kind=kind,
                              headers=getattr(e, "headers", None)))  # a 405's Allow

    app.add_middleware(Guard, api_key=api_key)
    if cors_origins:  # added last, so outermost: error answers (a 401 included) carry its headers too
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["*"], allow_headers=["*"])

    async def body(request: Request, kind):
        """The request parsed as `kind`, once the model is ready and the request names it."""
        served.ready()
        too_big = ApiError(413, f"the request body is over {MAX_BODY // 2**20} MiB", code="request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY:
            raise too_big
        data, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > MAX_BODY:
                raise too_big
            data.append(part)
        try:
            b = parse(kind, json.loads(b"".join(data)))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        except RecursionError:  # in the JSON parser or in validation
            raise ApiError(400, "the request body is nested too deeply") from None
        served.check_model(b.model)
        return b

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        try:
            served.ready()
        except ApiError as e:
            return JSONResponse({"status": "loading" if e.status == 503 else "failed", "detail": e.message},
                                status_code=e.status, headers=e.headers)
        return {"status": "ok", "model": served.name}

    @app.api_route("/metrics", methods=["GET", "HEAD"])
    async def metrics():
        if served.engine is None:
            return PlainTextResponse("# the model is not loaded\n", status_code=503)
        return PlainTextResponse(served.metrics.render(served.engine), media_type="text/plain; version=0.0.4")

    def model_card():
        return {"id": served.name, "object": "model", "created": served.created, "owned_by": "wasmchord"}

    @app.api_route("/v1/models", methods=["GET", "HEAD"])
    async def models():
        served.ready()
        return {"object": "list", "data": [model_card()]}

    @app.api_route("/v1/models/{model_id:path}", methods=["GET", "HEAD"])
    async def model(model_id: str):
        served.ready()
        served.check_model(model_id)
        return model_card()

    def check_request_tools(tools, choice):
        if not takes_tools(served.model.tokenizer):
            raise ApiError(400, f"{served.name}'s chat template does not take tools", param="tools")
        check_tools(tools, choice)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        b = await body(request, TokenizeRequest)
        tok = served.model.tokenizer
        if b.messages is not None and b.prompt is not None:
            raise ApiError(400, "give prompt or messages, not both", param="prompt")
        if b.tools and b.messages is None:
            raise ApiError(400, "tools are counted with messages (as the chat endpoint renders them), not with a "
                                "prompt", param="tools")
        if b.continue_final_message and b.messages is None:
            raise ApiError(400, "continue_final_message goes with messages, not with a prompt",
                           param="continue_final_message")
        if b.messages is not None:  # the prompt the chat endpoint would evaluate
            if b.tools:
                check_request_tools(b.tools, "auto")
            try:
                ids = await asyncio.to_thread(served.model.chat_ids, template_messages(b.messages),
                                              tools=b.tools or None, continue_final_message=b.continue_final_message)
            except GenerationError as e:
                raise ApiError(400, str(e), param="messages") from None
        elif b.prompt is not None:
            ids = await asyncio.to_thread(tok.encode, b.prompt, add_bos=None if b.add_special_tokens else False)
        else:
            raise ApiError(400, "give prompt or messages", param="prompt")
        return {"tokens": ids, "count": len(ids), "max_model_len": served.model.transformer.max_ctx}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        b = await body(request, DetokenizeRequest)
        try:
            return {"prompt": served.model.tokenizer.decode([served.model.tokenizer.check_id(i) for i in b.tokens])}
        except (WasmchordError, ValueError) as e:
            raise ApiError(400, str(e), param="tokens") from None

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        b = await body(request, ChatRequest)
        b.check_unsupported()
        messages, grammar = b.chat_messages(), None
        if b.tools:
            check_request_tools(b.tools, b.tool_choice)
            grammar = call_grammar(b.tools, b.tool_choice)
        try:
            ids = await asyncio.to_thread(served.model.chat_ids, messages, tools=b.tools or None,  # off the loop
                                          continue_final_message=b.continue_final_message)
        except GenerationError as e:
            raise ApiError(400, str(e), param="messages") from None
        logprobs = (b.top_logprobs or 0) if b.logprobs else None
        calls = bool(b.tools) and b.tool_choice != "none"
        constraint = b.constraint()
        if b.continue_final_message and (grammar or b.response_format and b.response_format.get("type") != "text"):
            raise ApiError(400, "continue_final_message and " + ("a required tool call" if grammar else "response_format")
                           + " cannot both shape the reply (the constraint would start after the begun text)",
                           param="continue_final_message")
        if grammar:
            if constraint:
                raise ApiError(400, "response_format and a required tool call cannot both constrain the reply",
                               param="response_format")
            constraint = {"grammar": grammar}
        names = [t.get("function", {}).get("name") for t in b.tools or []]
        return await run(request, b, [ids], b.max_completion_tokens or b.max_tokens, logprobs, chat=True,
                         constraint=constraint, calls=names if calls else None,
                         one_call=b.parallel_tool_calls is False, tools=(b.tools, b.tool_choice) if grammar else None)

    @app.post("/v1/completions")
    async def completions(request: Request):
        b = await body(request, CompletionRequest)
        b.check_unsupported()
        prompts = b.prompts()
        batch = []
        for i, p in enumerate(prompts):
            try:
                batch.append(await asyncio.to_thread(served.model.prompt_ids, p))  # off the event loop
            except (WasmchordError, TypeError, ValueError) as e:  # ValueError: an id outside the vocabulary
                raise ApiError(400, (f"prompt {i}: " if len(prompts) > 1 else "") + str(e), param="prompt") from None
        echo = [p if isinstance(p, str) else None for p in prompts] if b.echo else None  # the texts to echo
        return await run(request, b, batch, b.max_tokens, b.logprobs, chat=False, constraint=b.constraint(),
                         echo=echo)

    async def run(request, b, prompts, max_tokens, logprobs, *, chat: bool, constraint: dict, calls=None,
                  one_call=False, tools=None, echo: list | None = None):
        """Submit each of `prompts` (token ids; n samples of each, the choices numbered across them), then
        answer with the whole reply or a stream; `calls` (the tools' names): tool calls in the reply
        become `tool_calls` (only the first when `one_call`); `tools`: (tools, tool_choice) when the
        constraint is a tool call's grammar, else it is the response_format's; `echo` (each prompt's
        text, None for token ids): each completion follows its prompt."""
        ctx = served.model.transformer.max_ctx
        rooms = [ctx - len(ids) + 1 for ids in prompts]  # tokens each can have: the last needs no cache slot
        for i, (ids, room) in enumerate(zip(prompts, rooms)):
            if room < 2 and not (max_tokens == 0 and len(ids) <= ctx):  # max_tokens 0: the prompt alone
                full = " and no room for a completion token (echo with max_tokens 0 scores it)" \
                    if len(ids) == ctx and not chat else ""
                raise ApiError(400, (f"prompt {i}: " if len(prompts) > 1 else "") + f"the prompt has {len(ids)} "
                               f"tokens; the context holds {ctx}{full}", param="messages" if chat else "prompt",
                               code="context_length_exceeded")
        slots = served.model.transformer.slots
        if b.n > slots:
            raise ApiError(400, f"n = {b.n}: this server runs {slots} sequences at once (--slots)", param="n")
        if len(prompts) * b.n > slots + served.engine.max_queue:  # would never fit: not a 503 to retry
            raise ApiError(400, f"{len(prompts)} prompts x n = {b.n} make {len(prompts) * b.n} sequences; this server "
                                f"holds at most {slots + served.engine.max_queue} ({slots} running, "
                                f"{served.engine.max_queue} waiting)", param="prompt")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def notify(req, item):  # on the engine's thread
            loop.call_soon_threadsafe(queue.put_nowait, (req, item))
        if constraint:  # compiled off the event loop (the first one builds the vocabulary's token table)
            try:
                constraint = {"constraint": await asyncio.to_thread(Constraint.from_options, served.model.tokenizer,
                                                                    dict(constraint))}
            except GenerationError as e:
                if tools is None:
                    raise ApiError(400, str(e), param="response_format") from None
                why = await asyncio.to_thread(explain_call_grammar, served.model.tokenizer, *tools, e)
                raise ApiError(400, why, param="tools") from None
        scored = {"prompt_logprobs": logprobs} if echo is not None and logprobs is not None else {}
        reqs, echoes = [], {}
        try:
            for i, (ids, room) in enumerate(zip(prompts, rooms)):
                new = served.engine.submit(ids, logprobs=logprobs, notify=notify, **constraint, **scored,
                                           **b.engine_args(min(room if max_tokens is None else max_tokens, room)))
                reqs += new
                echoes.update({r: echo[i] for r in new} if echo is not None else {})
        except QueueFull as e:
            for r in reqs:
                served.engine.cancel(r)
            served.metrics.count("wasmchord_requests_rejected_total")
            raise ApiError(503, str(e), kind="server_error", code="queue_full",
                           headers={"Retry-After": str(served.engine.retry_after())}) from None
        except EngineStopped:
            raise ApiError(503, "the server is shutting down", kind="server_error", code="shutting_down") from None
        except (GenerationError, TypeError) as e:
            for r in reqs:
                served.engine.cancel(r)
            raise ApiError(400, str(e), param="logit_bias" if str(e).startswith("logit_bias") else None) from None
        except BaseException:  # a bug, or the handler cancelled: the prompts already submitted end too
            for r in reqs:
                served.engine.cancel(r)
            raise
        served.metrics.count("wasmchord_requests_total")
        rid = new_id("chatcmpl" if chat else "cmpl")
        kind = "chat.completion" if chat else "text_completion"
        forced = [f["name"] for _, f in callable_functions(*tools)] if tools else None
        if b.stream:
            return StreamingResponse(sse(request, reqs, queue, rid, kind, b, chat, calls, one_call, forced, echoes),
                                     media_type="text/event-stream")
        return await complete(request, reqs, queue, rid, kind, chat, calls, one_call, forced, echoes)

    async def events(request, reqs, queue, *, streaming: bool):
        """(request, chunk) as the engine produces them, until every request is done; cancels them all
        when the client goes away or the handler is cancelled. A stream's disconnect cancels its response
        (StreamingResponse listens for it); a whole reply's is looked for every DISCONNECT_CHECK seconds,
        whether or not chunks keep coming."""
        left, checked = set(reqs), time.monotonic()
        try:
            while left:
                try:
                    req, item = await asyncio.wait_for(queue.get(), DISCONNECT_CHECK)
                except asyncio.TimeoutError:
                    req = item = None
                if (item is None or not streaming) and time.monotonic() - checked >= DISCONNECT_CHECK:
                    if await request.is_disconnected():
                        return
                    checked = time.monotonic()
                if item is None:
                    continue
                if isinstance(item, EngineStopped):  # the server's shutdown timeout ran out
                    raise ApiError(503, "the server shut down before this request finished", kind="server_error",
                                   code="shutting_down")
                if isinstance(item, BaseException):
                    served.metrics.count("wasmchord_request_errors_total")
                    raise ApiError(500, f"generation failed: {item}", kind="server_error")
                if item.finish_reason is not None:
                    left.discard(req)
                yield req, item
        finally:
            for r in reqs:
                if not r.done:
                    served.engine.cancel(r)

    def cut_short(text, finish, forced):
        """The call a forced reply cut by max_tokens was writing (finish_reason stays "length"; [] while its
        function is unknown); None when the reply is not a forced one cut short."""
        return cut_call(text, forced) if forced and finish == "length" else None

    def echoed(req, echo):
        """(the prompt's text, its chunks) of an echoing completion (`echo`: the prompt's text, None for
        token ids: their text, special tokens included)."""
        pieces = prompt_chunks(served.model.tokenizer, req.prompt_logprobs, req.prompt, skip_special=echo is not None)
        return ("".join(c.text for c in pieces) if echo is None else echo), pieces

    async def complete(request, reqs, queue, rid, kind, chat, calls, one_call, forced, echoes):
        chunks = {r: [] for r in reqs}
        async for req, ch in events(request, reqs, queue, streaming=False):
            chunks[req].append(ch)
        tok = served.model.tokenizer
        choices = []
        for i, r in enumerate(reqs):
            cs = chunks[r]
            text = "".join(c.text for c in cs)
            head, pieces = echoed(r, echoes[r]) if r in echoes else ("", [])
            lp = None
            if r.logprobs is not None:
                lp = chat_logprobs(tok, cs) if chat else completion_logprobs(tok, cs, len(head))
                if pieces:  # the echoed prompt's tokens first
                    lp = {k: v + lp[k] for k, v in completion_logprobs(tok, pieces).items()}
            text = head + text
            body_, finish = {"role": "assistant", "content": text}, r.finish_reason
            if calls:
                content, found = parse_calls(text, calls)
                found = found[:1] if one_call else found
                if found:  # a forced call cut after its arguments, before its block's end, still says "length"
                    finish = "length" if forced and finish == "length" else "tool_calls"
                    body_ = {"role": "assistant", "content": content, "tool_calls": found}
                elif (cut := cut_short(text, finish, forced)) is not None:  # the grammar's text is not content
                    body_ = {"role": "assistant", "content": None, **({"tool_calls": cut} if cut else {})}
            choices.append({"index": i, **({"message": body_} if chat else {"text": text}), "logprobs": lp,
                            "finish_reason": finish})
        return envelope(kind, rid, served.name, choices, use_of(reqs))

    def use_of(reqs):
        firsts = [r for r in reqs if r.choice == 0]  # each prompt counts once, whatever n
        return usage(sum(len(r.prompt) for r in firsts), sum(len(r.tokens) for r in reqs),
                     sum(r.stats.cached_tokens for r in firsts))

    async def sse(request, reqs, queue, rid, kind, b, chat, calls, one_call, forced, echoes):
        chunk_kind = "chat.completion.chunk" if chat else "text_completion"
        tok = served.model.tokenizer
        split = {r: CallStream(calls) for r in reqs} if calls else {}

        offset = {r: 0 for r in reqs}  # characters of each choice's text sent (completions' text_offset)
        heads = set()  # the choices whose echoed prompt was sent
        index = {r: i for i, r in enumerate(reqs)}  # choices numbered across the prompts
        live = {}  # a forced call's arguments sent so far, per choice (sent as they are written)

        def data(choices, use=None):
            chunk = envelope(chunk_kind, rid, served.name, choices, use, null_usage=b.include_usage)
            return f"data: {json.dumps(chunk)}\n\n"

        def call_deltas(req, calls_now):
            """The tool-call deltas that bring what was sent of a forced call up to `calls_now` (the
            call as far as it is written): its id and name once the function is known, then the new
            text of its arguments."""
            if not calls_now:
                return []
            call, out = calls_now[0], []
            if req not in live:
                live[req] = ""
                out.append({"index": 0, "id": call["id"], "type": "function",
                            "function": {"name": call["function"]["name"], "arguments": ""}})
            args, sent = call["function"]["arguments"], live[req]
            if args.startswith(sent) and len(args) > len(sent):
                out.append({"index": 0, "function": {"arguments": args[len(sent):]}})
                live[req] = args
            return out
        if chat:
            yield data([{"index": index[r], "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None} for r in reqs])
        try:
            async for req, ch in events(request, reqs, queue, streaming=True):
                if req in echoes and req not in heads:  # the prompt first
                    head, pieces = echoed(req, echoes[req])
                    heads.add(req)
                    offset[req] = len(head)
                    plp = completion_logprobs(tok, pieces) if req.logprobs is not None else None
                    yield data([{"index": index[req], "text": head, "logprobs": plp, "finish_reason": None}])
                lp = None
                if req.logprobs is not None and ch.logprob is not None:
                    lp = chat_logprobs(tok, [ch]) if chat else completion_logprobs(tok, [ch], offset[req])
                offset[req] += len(ch.text)
                text = split[req].add(ch.text) if calls else ch.text
                if text or lp is not None:
                    part = {"delta": {"content": text}} if chat else {"text": text}
                    yield data([{"index": index[req], **part, "logprobs": lp, "finish_reason": None}])
                if forced and ch.finish_reason is None:  # a forced call streams as it is written
                    for delta in call_deltas(req, cut_call(split[req].text, forced)):
                        yield data([{"index": index[req], "delta": {"tool_calls": [delta]}, "logprobs": None,
                                     "finish_reason": None}])
                if ch.finish_reason is not None:
                    finish = ch.finish_reason
                    if calls:
                        rest, found = split[req].finish()
                        found = found[:1] if one_call else found
                        if found and not (forced and finish == "length"):
                            finish = "tool_calls"
                        if forced:  # the rest of the call streamed so far (the grammar's text is not content)
                            final = found[:1] or cut_short(split[req].text, finish, forced) or []
                            rest, found = "", []
                            for delta in call_deltas(req, final):
                                yield data([{"index": index[req], "delta": {"tool_calls": [delta]},
                                             "logprobs": None, "finish_reason": None}])
                        if rest:
                            yield data([{"index": index[req], "delta": {"content": rest}, "logprobs": None,
                                         "finish_reason": None}])
                        for k, call in enumerate(found):  # each call: its id and name, then its arguments
                            head = {"index": k, "id": call["id"], "type": "function",
                                    "function": {"name": call["function"]["name"], "arguments": ""}}
                            for delta in (head, {"index": k, "function": {"arguments": call["function"]["arguments"]}}):
                                yield data([{"index": index[req], "delta": {"tool_calls": [delta]}, "logprobs": None,
                                             "finish_reason": None}])
                    part = {"delta": {}} if chat else {"text": ""}
                    yield data([{"index": index[req], **part, "logprobs": None, "finish_reason": finish}])
        except ApiError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
            return
        if b.include_usage:
            yield data([], use_of(reqs))
        yield "data: [DONE]\n\n"

    return app
