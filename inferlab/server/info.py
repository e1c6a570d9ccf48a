"""The routes that run no request: /health, /v1/models (and one model's), /metrics, /version, and
vLLM's /tokenize and /detokenize."""
from __future__ import annotations

import asyncio
import time

from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse

from inferlab import __version__
from inferlab.async_engine import AsyncEngine
from inferlab.server.prompts import PromptBuilder
from inferlab.server.protocol import DetokenizeRequest, TokenizeRequest
from inferlab.server.streams import APIError, check_model


def mount_info(app: FastAPI, engine: AsyncEngine, model_name: str, prompts: PromptBuilder) -> None:
    tok, max_model_len = prompts.tok, prompts.max_model_len

    @app.get("/health", response_model=None)
    async def health() -> dict | JSONResponse:  # a dead engine answers 503, so a router or probe moves on
        if engine.dead is not None:
            return JSONResponse({"status": "dead", "error": str(engine.dead)}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "inferlab", "max_model_len": max_model_len}]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        check_model(model_id, model_name)
        return (await models())["data"][0]

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(engine.metrics.render(engine.snapshot, model_name),
                                 media_type="text/plain; version=0.0.4")


    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict:
        """vLLM's: the token ids a completion's prompt or a chat's messages become."""
        check_model(req.model, model_name)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "send either prompt or messages")
        try:
            if req.messages is not None:  # as a chat request with these options builds its prompt
                ids = (await prompts.chat(req.template_messages(), req.add_generation_prompt,
                                          req.continue_final_message, req.chat_template_kwargs,
                                          None))["prompt_token_ids"]
            else:
                ids = await prompts.encode(req.prompt, req.add_special_tokens)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        strs = [tok.id_to_token(t) for t in ids] if req.return_token_strs else None
        return {"count": len(ids), "max_model_len": max_model_len, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict:
        check_model(req.model, model_name)

        def text() -> str:  # on a worker thread: a million ids held the event loop for half a second
            bad = next((t for t in req.tokens if not 0 <= t < tok.vocab_size), None)
            if bad is not None:
                raise APIError(400, f"token id {bad} is outside the vocabulary [0, {tok.vocab_size})")
            return tok.decode(req.tokens, skip_special_tokens=False)  # /tokenize's ids, back whole
        return {"prompt": await asyncio.to_thread(text)}
