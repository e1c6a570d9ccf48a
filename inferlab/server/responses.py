"""OpenAI's Responses API, POST /v1/responses (as vLLM serves it): `input` (a text, or items:
messages whose content is text or input_text parts, and an agent's replayed `function_call` and
`function_call_output` items) after the `instructions`, through the chat template; the answer as
output items (responses_output.py), whole or streamed as the API's typed events. `text.format` asks
for JSON (a structured output). Function `tools` run as on chat completions (tools.py): `tool_choice`
none, a named function, required, or auto (with the server's --tool-call-parser). Nothing is
stored, so `previous_response_id` is refused; so are the hosted tools (web search, file search...),
which this server has not."""
from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Discriminator, Field, PrivateAttr, StrictBool, StrictStr, Tag

from inferlab.async_engine import AsyncEngine
from inferlab.outputs import RequestOutput
from inferlab.sampling_params import SamplingParams
from inferlab.server import openai_format as fmt
from inferlab.server.constraints import response_format_constraint
from inferlab.server.messages import MAX_MESSAGES, with_parsed_arguments
from inferlab.server.prompts import PromptBuilder
from inferlab.server.protocol import Float, Int
from inferlab.server.reasoning import ReasoningParser
from inferlab.server.responses_output import Answer, body, events
from inferlab.server.streams import APIError, check_model, collect, start, streaming
from inferlab.server.tools import Tool, ToolFunction, ToolPlan
from inferlab.structured.params import StructuredOutputsParams


class Part(BaseModel):
    type: Literal["input_text", "output_text", "text"]
    text: StrictStr


def joined(content: str | list[Part]) -> str:
    return content if isinstance(content, str) else "".join(p.text for p in content)


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: StrictStr | list[Part]

    def as_chat(self) -> dict:
        return {"role": "system" if self.role == "developer" else self.role, "content": joined(self.content)}


class FunctionCall(BaseModel):
    """A call the model made earlier, replayed by an agent that keeps its own history."""
    model_config = ConfigDict(extra="ignore")  # id, status

    type: Literal["function_call"]
    call_id: StrictStr
    name: StrictStr
    arguments: StrictStr

    def as_chat(self) -> dict:
        return with_parsed_arguments({"id": self.call_id, "type": "function",
                                      "function": {"name": self.name, "arguments": self.arguments}})


class FunctionCallOutput(BaseModel):
    """A tool's answer to a call."""
    model_config = ConfigDict(extra="ignore")

    type: Literal["function_call_output"]
    call_id: StrictStr
    output: StrictStr | list[Part]


class Reasoning(BaseModel):
    """A reasoning item the model gave earlier (a reasoning parser's), replayed: left out of the
    prompt, as chat templates leave out an earlier turn's thinking."""
    model_config = ConfigDict(extra="ignore")

    type: Literal["reasoning"]


def item_type(item: Any) -> str:  # a message may leave its type out
    return (item.get("type") if isinstance(item, dict) else getattr(item, "type", None)) or "message"


Item = Annotated[Annotated[Message, Tag("message")] | Annotated[FunctionCall, Tag("function_call")] |
                 Annotated[FunctionCallOutput, Tag("function_call_output")] | Annotated[Reasoning, Tag("reasoning")],
                 Discriminator(item_type)]


class FunctionTool(BaseModel):
    """The Responses API's function tool: chat completions' function, one level up."""
    model_config = ConfigDict(extra="ignore")  # strict changes nothing here

    type: Literal["function"]
    name: StrictStr
    description: StrictStr | None = None
    parameters: dict[StrictStr, Any] | None = None

    def as_chat(self) -> Tool:
        return Tool(type="function", function=ToolFunction(name=self.name, description=self.description,
                                                           parameters=self.parameters))


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # include, service_tier and the like change nothing here

    model: StrictStr | None = None
    input: StrictStr | list[Item] = Field(max_length=MAX_MESSAGES)
    instructions: StrictStr | None = None
    max_output_tokens: Int | None = None
    temperature: Float | None = None
    top_p: Float | None = None
    seed: Int | None = None
    stream: StrictBool = False
    store: StrictBool | None = None  # nothing is stored: the answer says store false
    previous_response_id: StrictStr | None = None
    tools: list[dict[StrictStr, Any]] | None = None  # checked in `tool_plan`, to name a hosted tool it refuses
    tool_choice: StrictStr | dict[StrictStr, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    include: list[StrictStr] | None = None  # "message.output_text.logprobs": each token's logprob
    top_logprobs: Int | None = None  # with it, the most likely tokens at each position
    text: dict[StrictStr, Any] | None = None  # {"format": {"type": "text" | "json_object" | "json_schema", ...}}
    metadata: dict[StrictStr, StrictStr] | None = None
    # what streams.start reads of a request: one answer, at the default priority
    n: ClassVar[int] = 1
    priority: ClassVar[int] = 0
    _tools: ToolPlan = PrivateAttr(default_factory=lambda: ToolPlan("none"))

    def check(self) -> None:
        if self.previous_response_id is not None:
            raise APIError(400, "previous_response_id is not supported: this server stores no responses; send the "
                                "conversation in input")
        if self.max_output_tokens is not None and self.max_output_tokens < 1:
            raise APIError(400, f"max_output_tokens must be an integer >= 1, got {self.max_output_tokens}")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= 20:
            raise APIError(400, f"top_logprobs must be in [0, 20], got {self.top_logprobs}")

    def num_logprobs(self) -> int | None:
        """How many alternatives each token's logprob comes with; None: no logprobs asked (OpenAI's
        answer carries them only where `include` names them)."""
        return self.top_logprobs or 0 if "message.output_text.logprobs" in (self.include or []) else None

    def tool_plan(self, parser: str | None) -> ToolPlan:
        tools = []
        for i, t in enumerate(self.tools or []):
            if t.get("type") != "function":
                raise ValueError(f"tools.{i}: {t.get('type')!r} tools are not supported: this server runs function "
                                 "tools only")
            try:
                tools.append(FunctionTool.model_validate(t).as_chat())
            except ValueError as e:
                raise ValueError(f"tools.{i}: {e.errors()[0]['msg']} ({'.'.join(map(str, e.errors()[0]['loc']))})") \
                    from None
        choice = self.tool_choice
        if isinstance(choice, dict):  # {"type": "function", "name"}: chat completions' shape, for ToolPlan
            if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
                raise ValueError(f"tool_choice must be none, auto, required or {{'type': 'function', 'name': ...}}, "
                                 f"got {choice!r}")
            choice = {"type": "function", "function": {"name": choice["name"]}}
        self._tools = ToolPlan.of(tools, choice, parser, self.parallel_tool_calls is not False)
        return self._tools

    def messages(self) -> list[dict]:
        if isinstance(self.input, str):
            given = [{"role": "user", "content": self.input}]
        else:
            given = []
            for item in self.input:
                if isinstance(item, FunctionCall):  # calls after an assistant's text are that turn's
                    if not (given and given[-1]["role"] == "assistant"):
                        given.append({"role": "assistant", "content": ""})
                    given[-1].setdefault("tool_calls", []).append(item.as_chat())
                elif isinstance(item, FunctionCallOutput):
                    given.append({"role": "tool", "tool_call_id": item.call_id, "content": joined(item.output)})
                elif isinstance(item, Message):
                    given.append(item.as_chat())
        if not given:
            raise APIError(400, "input is empty: send a text or messages")
        return ([{"role": "system", "content": self.instructions}] if self.instructions else []) + given

    def format(self) -> dict:
        fmt = (self.text or {}).get("format") or {"type": "text"}
        if not isinstance(fmt, dict):
            raise APIError(400, f"text.format must be an object, got {fmt!r}")
        return fmt

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        fmt = self.format()  # the Responses API's json_schema carries its schema at the format's top level
        try:
            fields = response_format_constraint({"type": fmt.get("type"), "json_schema": fmt})
            structured = StructuredOutputsParams(**fields) if fields else None
        except ValueError as e:
            raise ValueError(f"text.format: {str(e).removeprefix('response_format ')}") from None
        held = self._tools.structured()
        if held and structured:
            raise ValueError(f"tool_choice {self._tools.mode} and text.format both constrain the answer: send one")
        return SamplingParams(max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
                              top_p=1.0 if self.top_p is None else self.top_p, seed=self.seed, logprobs=logprobs,
                              structured_outputs=held or structured)

    def echoed(self) -> dict:
        """The request's settings as the response object repeats them."""
        return {"instructions": self.instructions, "max_output_tokens": self.max_output_tokens,
                "temperature": 1.0 if self.temperature is None else self.temperature,
                "top_p": 1.0 if self.top_p is None else self.top_p, "tools": self.tools or [],
                "tool_choice": self.tool_choice or "auto", "parallel_tool_calls": self.parallel_tool_calls is not False,
                "text": {"format": self.format()}, "metadata": self.metadata or {}, "top_logprobs": self.top_logprobs}


def mount_responses(app: FastAPI, engine: AsyncEngine, model_name: str, prompts: PromptBuilder,
                    tool_parser: str | None = None, thinks: ReasoningParser | None = None) -> None:
    @app.post("/v1/responses")
    async def responses(req: ResponsesRequest, raw: Request):
        check_model(req.model, model_name)
        req.check()
        try:  # (a text.format that cannot be is refused by `start`, before anything is added)
            plan = req.tool_plan(tool_parser)
            tools = plan.template_tools()
            prompt = await prompts.chat(req.messages(), True, False, None if tools is None else {"tools": tools}, None)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        n = req.num_logprobs()
        base, rids, streams = await start(engine, req, [prompt], req.max_output_tokens, n)

        def logprobs(out: RequestOutput, count: int) -> list[dict]:  # the last `count` tokens' (chat's entries)
            return fmt.chat_logprobs(prompts.tok, fmt.new_logprobs(out, count), n)["content"]

        answer = Answer(f"resp_{base}", model_name, req.echoed(), plan, None if n is None else logprobs, thinks)
        if not req.stream:
            return body(answer, (await collect(engine, raw, rids, streams))[0])
        return streaming(engine, events(answer, streams), rids)
