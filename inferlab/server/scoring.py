"""Classification and scoring over HTTP, vLLM's routes: /classify (a classification head's classes),
/score and /v1/score (how well pairs of texts match) and /rerank, /v1/rerank and /v2/rerank (a
query's documents by relevance, in Jina's and Cohere's shape). How a pair is scored, by a reranker's
head or by comparing embeddings, is `pooling.ScorePlan`; its prompts run through `embeddings.pool`."""
from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, StrictBool, StrictStr

from inferlab.async_engine import AsyncEngine
from inferlab.pooling import PoolingParams, ScorePlan, score_pairs
from inferlab.server.embeddings import MAX_INPUTS, PoolingInputs, pool
from inferlab.server.prompts import PromptBuilder
from inferlab.server.protocol import Int
from inferlab.server.streams import APIError, check_model


class ClassifyRequest(PoolingInputs):
    use_activation: StrictBool = True  # False: the head's logits instead of probabilities


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    text_1: StrictStr | list[StrictStr]
    text_2: StrictStr | list[StrictStr]
    truncate_prompt_tokens: Int | None = None  # vLLM's; refused (see `refuse_truncation`)


class Document(BaseModel):
    text: StrictStr


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    query: StrictStr
    documents: list[StrictStr | Document]
    top_n: Int | None = None  # the best n only (None or 0: all)
    return_documents: StrictBool = True
    max_tokens_per_doc: Int | None = None  # Cohere's: each document cut to its first k tokens
    truncate_prompt_tokens: Int | None = None


def refuse_truncation(value: int | None) -> None:
    """A pair past the context is refused whole rather than cut at a place the client did not choose."""
    if value is not None:
        raise APIError(400, "truncate_prompt_tokens is not supported for pairs; send them shorter (a rerank's "
                            "max_tokens_per_doc cuts each document to its first tokens)")


def mount_scoring(app: FastAPI, engine: AsyncEngine, model_name: str, prompts: PromptBuilder) -> None:
    limit = engine.engine.max_request_tokens

    @app.post("/classify")
    async def classify(req: ClassifyRequest, raw: Request) -> dict:
        check_model(req.model, model_name)
        head = engine.engine.model.classifier
        finals = await pool(engine, raw, await req.prompts(prompts, limit),
                            PoolingParams(task="classify", use_activation=req.use_activation))
        used = sum(len(o.prompt_token_ids) for o in finals)
        return {"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                "model": model_name, "usage": usage(used),
                "data": [{"index": i, "label": head.labels[max(range(len(o.embedding)), key=o.embedding.__getitem__)],
                          "probs": o.embedding, "num_classes": len(o.embedding)} for i, o in enumerate(finals)]}

    async def scores(raw: Request, firsts: str | list[str], seconds: list[str],
                     names: tuple[str, str]) -> tuple[list[float], int]:
        """The pairs' scores (see `score_pairs` for the pairing) and the tokens their prompts ran."""
        try:
            pairs = score_pairs(firsts, seconds, names)
            if len(pairs) > MAX_INPUTS:
                raise ValueError(f"{len(pairs)} pairs, more than the {MAX_INPUTS} one request may score")
            for text in {t for pair in pairs for t in pair}:
                prompts.check_length(len(text))
            plan = await asyncio.to_thread(ScorePlan.of, pairs, engine.engine.model.classifier, engine.engine.tokenizer)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        finals = await pool(engine, raw, [{"prompt_token_ids": ids} for ids in plan.prompts], plan.params)
        return plan.scores([o.embedding for o in finals]), sum(map(len, plan.prompts))

    @app.post("/score")
    @app.post("/v1/score")
    async def score(req: ScoreRequest, raw: Request) -> dict:
        check_model(req.model, model_name)
        refuse_truncation(req.truncate_prompt_tokens)
        values, used = await scores(raw, req.text_1, req.text_2 if isinstance(req.text_2, list) else [req.text_2],
                                    ("text_1", "text_2"))
        return {"id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                "model": model_name, "usage": usage(used),
                "data": [{"index": i, "object": "score", "score": v} for i, v in enumerate(values)]}

    @app.post("/rerank")
    @app.post("/v1/rerank")
    @app.post("/v2/rerank")
    async def rerank(req: RerankRequest, raw: Request) -> dict:
        check_model(req.model, model_name)
        refuse_truncation(req.truncate_prompt_tokens)
        if req.top_n is not None and req.top_n < 0:
            raise APIError(400, f"top_n must be 0 (all) or more, got {req.top_n}")
        k = req.max_tokens_per_doc
        if k is not None and k < 1:
            raise APIError(400, f"max_tokens_per_doc must be at least 1, got {k}")
        texts = scored = [d if isinstance(d, str) else d.text for d in req.documents]
        if k is not None:  # a document's first k tokens, as text (the pair is tokenized whole after)
            tok = engine.engine.tokenizer
            cut = [await prompts.encode(t, add_special_tokens=False) for t in texts]
            scored = [t if len(ids) <= k else tok.decode(ids[:k]) for t, ids in zip(texts, cut)]
        values, used = await scores(raw, req.query, scored, ("query", "documents"))
        best = sorted(range(len(texts)), key=lambda i: -values[i])[:req.top_n or None]
        return {"id": f"rerank-{uuid.uuid4().hex}", "model": model_name, "usage": {"total_tokens": used},
                "results": [{"index": i, "relevance_score": values[i],
                             **({"document": {"text": texts[i]}} if req.return_documents else {})} for i in best]}


def usage(tokens: int) -> dict:
    return {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}
