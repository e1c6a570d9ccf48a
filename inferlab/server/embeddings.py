"""Embeddings over HTTP: OpenAI's /v1/embeddings, Ollama's /api/embed and its older /api/embeddings
(mounted by `ollama.py`, in its error shape), and what they share with scoring.py: the inputs of a
body (`PoolingInputs`) and the pass that runs them (`pool`). Each input is one engine request with
PoolingParams (inferlab/pooling.py), all added between two steps, so a body's inputs are batched
together and beside whatever else runs; a client that leaves has them aborted."""
from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from inferlab.allocation import OutOfKVMemoryError
from inferlab.async_engine import AsyncEngine, EngineStopping
from inferlab.outputs import RequestOutput
from inferlab.pooling import PoolingParams
from inferlab.server.prompts import PromptBuilder
from inferlab.server.protocol import Int, TokenIds
from inferlab.server.streams import SHUTTING_DOWN, APIError, check_model, collect

MAX_INPUTS = 2048  # OpenAI's limit on one request's inputs


class PoolingInputs(BaseModel):
    """A body's `input`: a string, strings, token ids or lists of them (OpenAI's and vLLM's)."""

    model_config = ConfigDict(extra="ignore")  # `user` and the like change nothing

    model: StrictStr | None = None
    input: StrictStr | list[StrictStr] | TokenIds | list[TokenIds] = Field(union_mode="left_to_right")
    # vLLM's: keep only the prompt's last k tokens (-1: as many as the context holds)
    truncate_prompt_tokens: Int | None = None

    async def prompts(self, builder: PromptBuilder, limit: int) -> list[dict]:
        """Each input's engine prompt, its token ids cut as `truncate_prompt_tokens` asks."""
        given = self.input
        inputs = [given] if isinstance(given, str) or (given and isinstance(given[0], int)) else list(given)
        if not inputs:
            raise APIError(400, "input is empty: send a string, a list of strings, or token ids")
        if len(inputs) > MAX_INPUTS:
            raise APIError(400, f"{len(inputs)} inputs, more than the {MAX_INPUTS} one request may hold")
        try:
            ids = [x if isinstance(x, list) else await builder.encode(x) for x in inputs]
        except ValueError as e:
            raise APIError(400, str(e)) from None
        return [{"prompt_token_ids": keep(t, limit, self.truncate_prompt_tokens, True,
                                          "truncate_prompt_tokens keeps its last ones")} for t in ids]


class EmbeddingRequest(PoolingInputs):
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Int | None = None


def keep(ids: list[int], limit: int, truncate: int | None, from_end: bool, hint: str) -> list[int]:
    """The token ids an input runs as: `truncate` of them (-1: the most the context takes), the last
    ones (vLLM's) or the first (Ollama's); all of them when None, refused past the context (`hint`
    says how to cut it). An embedding still computes one token after its prompt's last, so the
    context holds `limit` - 1 of them."""
    most = limit - 1
    if truncate is None:
        if len(ids) > most:
            raise APIError(400, f"an input has {len(ids)} tokens, more than the {most} this model pools (its "
                                f"context of {limit} tokens less one); {hint}")
        return ids
    if truncate != -1 and not 1 <= truncate <= most:
        raise APIError(400, f"truncate_prompt_tokens must be -1 or between 1 and {most} (the context's "
                            f"{limit} tokens less one), got {truncate}")
    k = most if truncate == -1 else truncate
    return ids[-k:] if from_end else ids[:k]


async def pool(engine: AsyncEngine, raw: Request, prompts: list[dict], params: PoolingParams) -> list[RequestOutput]:
    """Each prompt's pooling request (an embedding, or classes), added all or none and run to its end."""
    try:
        params.validate(engine.engine.model.args.hidden_size, engine.engine.model.classifier)
        base = uuid.uuid4().hex
        rids = [f"{params.task}-{base}-{i}" for i in range(len(prompts))]
        streams = await engine.add_many([(rid, p, params, 0) for rid, p in zip(rids, prompts)])
    except OutOfKVMemoryError as e:  # kv_allocation="reserve": others' reservations hold the pool, for now
        raise APIError(503, str(e), "server_error", "out_of_kv_memory") from None
    except EngineStopping:
        raise APIError(*SHUTTING_DOWN) from None
    except ValueError as e:
        raise APIError(400, str(e)) from None
    return await collect(engine, raw, rids, streams)


def mount_embeddings(app: FastAPI, engine: AsyncEngine, model_name: str, prompts: PromptBuilder) -> None:
    limit = engine.engine.max_request_tokens

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest, raw: Request) -> dict:
        check_model(req.model, model_name)
        finals = await pool(engine, raw, await req.prompts(prompts, limit), PoolingParams(dimensions=req.dimensions))

        def vector(out: RequestOutput) -> list[float] | str:
            if req.encoding_format == "base64":  # OpenAI's: little-endian float32s (its Python client asks for it)
                return base64.b64encode(np.asarray(out.embedding, dtype="<f4").tobytes()).decode()
            return out.embedding
        used = sum(len(o.prompt_token_ids) for o in finals)
        return {"object": "list", "model": model_name, "created": int(time.time()),
                "data": [{"object": "embedding", "index": i, "embedding": vector(o)} for i, o in enumerate(finals)],
                "usage": {"prompt_tokens": used, "total_tokens": used}}


def mount_ollama_embed(app: FastAPI, engine: AsyncEngine, prompts: PromptBuilder,
                       read: Callable[[Request], Awaitable[Any]], guarded: Callable[[Awaitable], Awaitable]) -> None:
    """Ollama's /api/embed and its older /api/embeddings; `read` and `guarded` are `ollama.py`'s body
    reader and error shape."""
    limit = engine.engine.max_request_tokens

    async def vectors(raw: Request, req: Any, texts: list[str], normalize: bool) -> tuple[list, int]:
        """The embeddings of `texts` (each cut to the context's first tokens with `truncate`) and their tokens."""
        try:
            ids = [await prompts.encode(t) for t in texts]
        except ValueError as e:
            raise APIError(400, str(e)) from None
        cut = [keep(t, limit, -1 if req.truncate else None, False, "truncate: true keeps its first ones") for t in ids]
        finals = await pool(engine, raw, [{"prompt_token_ids": t} for t in cut],
                             PoolingParams(normalize, req.dimensions))
        return [o.embedding for o in finals], sum(map(len, cut))

    @app.post("/api/embed", include_in_schema=False)
    async def ollama_embed(raw: Request):
        async def work():
            start, req = time.monotonic(), await read(raw)
            texts = [] if req.input == "" else [req.input] if isinstance(req.input, str) else req.input
            if "" in texts:  # (one empty string is Ollama's way to load the model: no vectors)
                raise APIError(400, f"input {texts.index('')} is empty")
            vecs, count = await vectors(raw, req, texts, True) if texts else ([], 0)
            return {"model": req.model, "embeddings": vecs, "total_duration": int((time.monotonic() - start) * 1e9),
                    "load_duration": 0, "prompt_eval_count": count}
        return await guarded(work())

    @app.post("/api/embeddings", include_in_schema=False)
    async def ollama_embeddings(raw: Request):  # the older route: one prompt, its vector not normalised
        async def work():
            req = await read(raw)
            return {"embedding": (await vectors(raw, req, [req.prompt], False))[0][0] if req.prompt else []}
        return await guarded(work())
