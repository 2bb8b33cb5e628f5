"""Serve a trained policy (and LoRA adapters) over an OpenAI-compatible chat API."""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from alignkit.errors import InputError

MAX_NEW_TOKENS_LIMIT = 4096


class ContentPart(BaseModel):
    """One part of a multi-part message; only text parts are understood."""

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """An OpenAI chat message."""

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart]

    def text(self) -> str:
        """The message content as one string."""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(BaseModel):
    """The subset of OpenAI's chat completion request this server honours."""

    model: str = Field(min_length=1, max_length=200)
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_tokens: Annotated[int, Field(ge=1, le=MAX_NEW_TOKENS_LIMIT)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, le=MAX_NEW_TOKENS_LIMIT)] | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=8)
    stream: bool = False
    seed: int | None = None
    stop: str | list[str] | None = None


def _error(status: int, message: str, code: str) -> JSONResponse:
    """An error in OpenAI's shape, which the ``openai`` client turns into typed exceptions."""
    return JSONResponse(
        {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": None,
                "code": code,
            }
        },
        status_code=status,
    )


class PolicyServer:
    """One base model with optional LoRA adapters; one generation at a time (adapters are global state)."""

    def __init__(
        self,
        model_dir: str,
        adapters: dict[str, str],
        name: str | None,
        max_new_tokens: int,
        device: Any = "cpu",  # a torch.device or its name (the CLI's --device, resolved)
    ) -> None:
        import torch

        from alignkit.models import load_policy, load_tokenizer, resolve_model

        self.device = torch.device(device)

        path = resolve_model(model_dir)
        self.base_name = name or Path(path).name
        self.tokenizer = load_tokenizer(path, padding_side="left")
        if not self.tokenizer.chat_template:
            raise InputError("the tokenizer has no chat template", path=model_dir)
        model = load_policy(path, device=self.device).eval()
        self.adapter_names = list(adapters)
        if adapters:
            from peft import PeftModel

            first, *rest = adapters.items()
            model = PeftModel.from_pretrained(model, first[1], adapter_name=first[0])
            for adapter_name, adapter_dir in rest:
                model.load_adapter(adapter_dir, adapter_name=adapter_name)
            model.to(self.device).eval()
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.lock = threading.Lock()
        self.created = int(time.time())

    def model_ids(self) -> list[str]:
        """The names a request's ``model`` may use: the base, then each adapter."""
        return [self.base_name, *self.adapter_names]

    def _adapter_context(self, model_id: str):  # noqa: ANN202 - a context manager
        import contextlib

        if not self.adapter_names:
            return contextlib.nullcontext()
        if model_id == self.base_name:
            return self.model.disable_adapter()
        self.model.set_adapter(model_id)
        return contextlib.nullcontext()

    def _inputs(self, request: ChatRequest) -> dict[str, Any]:
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in request.messages
        ]
        inputs = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        return {key: value.to(self.device) for key, value in inputs.items()}

    def _generate_kwargs(self, request: ChatRequest) -> dict[str, Any]:
        max_new = request.max_completion_tokens or request.max_tokens or self.max_new_tokens
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new,
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": self.tokenizer.eos_token_id,
        }
        if request.temperature > 0:
            kwargs.update(
                do_sample=True, temperature=request.temperature, top_p=request.top_p, top_k=0
            )
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs

    @staticmethod
    def _stops(request: ChatRequest) -> list[str]:
        if request.stop is None:
            return []
        return [request.stop] if isinstance(request.stop, str) else [s for s in request.stop if s]

    def complete(self, request: ChatRequest) -> tuple[list[tuple[str, str]], int, int]:
        """``n`` completions as (text, finish_reason), plus prompt and completion token counts."""
        import torch

        from alignkit.models import autocast

        inputs = self._inputs(request)
        prompt_length = inputs["input_ids"].shape[1]
        kwargs = self._generate_kwargs(request)
        with (
            self.lock,
            torch.inference_mode(),
            autocast(self.device),
            self._adapter_context(request.model),
        ):
            if request.seed is not None:
                torch.manual_seed(request.seed)
            output = self.model.generate(**inputs, num_return_sequences=request.n, **kwargs)
        results, completion_tokens = [], 0
        for row in output[:, prompt_length:]:
            ids = row.tolist()
            ended = self.tokenizer.eos_token_id in ids
            if ended:
                ids = ids[: ids.index(self.tokenizer.eos_token_id)]
            ids = [i for i in ids if i != self.tokenizer.pad_token_id]
            completion_tokens += len(ids)
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            text, stopped = _cut_at_stop(text, self._stops(request))
            results.append((text, "stop" if ended or stopped else "length"))
        return results, prompt_length, completion_tokens

    def stream(self, request: ChatRequest) -> Iterator[str]:
        """Text pieces of one completion as they are generated."""
        import torch
        from transformers import TextIteratorStreamer

        from alignkit.models import autocast

        inputs = self._inputs(request)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = self._generate_kwargs(request)

        def run() -> None:
            with (
                self.lock,
                torch.inference_mode(),
                autocast(self.device),
                self._adapter_context(request.model),
            ):
                if request.seed is not None:
                    torch.manual_seed(request.seed)
                self.model.generate(**inputs, streamer=streamer, **kwargs)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        yield from streamer
        worker.join()


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cuts = [text.index(s) for s in stops if s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _chunk(
    completion_id: str, created: int, model: str, delta: dict, finish: str | None, index: int = 0
) -> str:
    payload = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": index, "delta": delta, "finish_reason": finish}],
    }
    return f"data: {json.dumps(payload)}\n\n"


def create_app(server: PolicyServer) -> FastAPI:
    """The OpenAI-compatible app: ``GET /v1/models``, ``POST /v1/chat/completions``."""
    app = FastAPI(title="alignkit serve", docs_url=None, redoc_url=None)
    app.state.server = server

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(400, f"{where}: {first.get('msg', 'invalid request')}", "invalid_request")

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, error: HTTPException) -> JSONResponse:
        return _error(error.status_code, str(error.detail), "http_error")

    @app.get("/v1/models")
    def list_models() -> dict[str, Any]:
        """Every servable model id (the base and its adapters)."""
        data = [
            {"id": model_id, "object": "model", "created": server.created, "owned_by": "alignkit"}
            for model_id in server.model_ids()
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions", response_model=None)
    def chat_completions(request: ChatRequest) -> Any:
        """A chat completion (``stream: true`` for server-sent events)."""
        if request.model not in server.model_ids():
            return _error(
                404, f"model {request.model!r} not found; see /v1/models", "model_not_found"
            )
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if request.stream:
            return StreamingResponse(
                _events(server, request, completion_id, created), media_type="text/event-stream"
            )
        results, prompt_tokens, completion_tokens = server.complete(request)
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": request.model,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish,
                }
                for i, (text, finish) in enumerate(results)
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    return app


def _events(
    server: PolicyServer, request: ChatRequest, completion_id: str, created: int
) -> Iterator[str]:
    """SSE chunks: a role delta, content deltas, a finish chunk per choice, then ``[DONE]``."""
    if request.n == 1 and not PolicyServer._stops(request):
        yield _chunk(
            completion_id, created, request.model, {"role": "assistant", "content": ""}, None
        )
        for piece in server.stream(request):
            if piece:
                yield _chunk(completion_id, created, request.model, {"content": piece}, None)
        yield _chunk(completion_id, created, request.model, {}, "stop")
    else:  # several choices or stop strings: generate, then send each choice as chunks
        results, _, _ = server.complete(request)
        for index, (text, finish) in enumerate(results):
            yield _chunk(
                completion_id,
                created,
                request.model,
                {"role": "assistant", "content": ""},
                None,
                index,
            )
            yield _chunk(completion_id, created, request.model, {"content": text}, None, index)
            yield _chunk(completion_id, created, request.model, {}, finish, index)
    yield "data: [DONE]\n\n"


def parse_adapters(specs: list[str]) -> dict[str, str]:
    """``NAME=DIR`` arguments as a dict; each DIR must hold a PEFT adapter."""
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, directory = spec.partition("=")
        if not sep or not name or not directory:
            raise InputError("must be NAME=DIR", field="--adapter", path=spec)
        if not (Path(directory) / "adapter_config.json").is_file():
            raise InputError(
                "is not a PEFT adapter directory (no adapter_config.json)", path=directory
            )
        if name in adapters:
            raise InputError(f"adapter name {name!r} given twice", field="--adapter")
        adapters[name] = directory
    return adapters


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``alignkit serve MODEL [--adapter NAME=DIR ...]``."""
    parser.add_argument(
        "model", help="a policy directory (or tiny-random-llama / smollm2-135m-instruct)"
    )
    parser.add_argument(
        "--adapter", action="append", default=[], metavar="NAME=DIR", help="a LoRA adapter; repeat"
    )
    parser.add_argument("--name", help="model id of the base (default: the directory name)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--max-new-tokens", type=int, default=256, help="default when a request sets none"
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="where the model runs: auto (cuda:LOCAL_RANK when CUDA is available, else cpu), "
        "cpu, cuda, cuda:N",
    )


def main(args: argparse.Namespace) -> int:
    """Load the model and serve it with uvicorn."""
    import uvicorn

    from alignkit.models import resolve_device

    # a bad --device is refused before the model loads
    device = resolve_device(args.device, key="--device", source="command line")
    adapters = parse_adapters(args.adapter)
    server = PolicyServer(args.model, adapters, args.name, args.max_new_tokens, device)
    if server.base_name in server.adapter_names:
        raise InputError(
            f"adapter name {server.base_name!r} is the base model's name", field="--adapter"
        )
    print(
        f"serving {', '.join(server.model_ids())} on http://{args.host}:{args.port}/v1", flush=True
    )
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="warning")
    return 0
