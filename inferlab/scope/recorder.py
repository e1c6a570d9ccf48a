"""Recording: `--record FILE` writes a header line, then one frame after every engine step (JSONL),
and `read_trace` reads such a file back for replay, refusing anything else with one line."""
from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from inferlab.outputs import RequestOutput
from inferlab.scope.frames import TRACE_VERSION, FrameBuilder, encode, header

if TYPE_CHECKING:
    from inferlab.engine import LLMEngine

log = logging.getLogger("inferlab")


class Recorder:
    """Watches an engine from the moment it is made until `close()`; use it as a context manager.
    It runs on the thread that steps the engine, as a step observer."""

    def __init__(self, engine: LLMEngine, path: str) -> None:
        self.engine = engine
        self.builder = FrameBuilder(engine)
        # Line-buffered: each frame reaches the file at once, so a server stopped by a signal
        # (uvicorn re-raises it after its graceful shutdown) still leaves a whole trace.
        try:
            self.file = open(path, "w", buffering=1)  # noqa: SIM115 - closed by close()
            self.file.write(encode(header(engine, "replay")) + "\n")
        except OSError as e:
            raise ValueError(f"cannot record to {path}: {e.strerror}") from None
        self.frames = 0
        self.failed = False
        engine.step_observers.append(self.on_step)

    def on_step(self, outputs: list[RequestOutput]) -> None:
        if self.failed:
            return
        self.builder.on_step(outputs)
        try:
            self.file.write(encode(self.builder.frame()) + "\n")
        except OSError as e:  # a full disk stops the recording, never the engine
            log.error("recording to %s stopped: %s", self.file.name, e)
            self.failed = True
            return
        self.frames += 1

    def close(self) -> None:
        if self.on_step in self.engine.step_observers:
            self.engine.step_observers.remove(self.on_step)
        try:
            self.file.close()
        except OSError as e:
            log.error("recording to %s lost its last frames: %s", self.file.name, e)

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _not_json(word: str) -> None:
    raise json.JSONDecodeError(f"{word} is not JSON", word, 0)


def read_trace(path: str) -> tuple[dict, list[str]]:
    """(header, frame lines) of a trace; ValueError naming the file and line if it is not one.
    Only a last line cut mid-write (a recording stopped) is dropped rather than refused."""
    try:
        with open(path) as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read an inferlab trace from it: {e}") from None
    if not lines:
        raise ValueError(f"{path}: empty file, not an inferlab trace")
    try:
        head = json.loads(lines[0])
    except json.JSONDecodeError:
        head = None
    if not isinstance(head, dict) or head.get("type") != "header":
        raise ValueError(f"{path}: line 1 is not an inferlab trace header (record one with --record)")
    if head.get("version") != TRACE_VERSION:
        raise ValueError(f"{path}: trace version {head.get('version')!r} is not supported (expected {TRACE_VERSION!r})")
    frames = lines[1:]
    # every frame is parsed as the page's JSON.parse reads it (no NaN or Infinity): it parses them all,
    # and one bad line in the middle stops its replay
    for i, line in enumerate(frames, start=2):
        try:
            frame = json.loads(line, parse_constant=_not_json)
        except json.JSONDecodeError:
            if i == len(lines) and line.startswith('{"type":"frame"'):  # a recording stopped mid-write
                frames.pop()
                break
            frame = None
        if not isinstance(frame, dict) or frame.get("type") != "frame":
            raise ValueError(f"{path}: line {i} is not a frame")
        if bad := next((k for k, kind in FRAME_FIELDS.items() if not _is(frame.get(k), kind)), None):
            raise ValueError(f"{path}: line {i} is not a frame the dashboard can show: its {bad!r} is "
                             f"{frame.get(bad)!r:.40}")
    if not frames:
        raise ValueError(f"{path}: the recording holds no frames (no engine step ran while it recorded)")
    return head, frames


# what the page reads of every frame (a frame of the right "type" without them left it blank)
FRAME_FIELDS = {"t": float, "step": int, "num_running": int, "num_waiting": int, "num_preemptions": int,
                "num_generation_tokens": int, "kv": dict, "batch": dict, "requests": list, "steps": list,
                "latency": dict}


def _is(value: object, kind: type) -> bool:
    return isinstance(value, (int, float) if kind is float else kind) and not isinstance(value, bool)
