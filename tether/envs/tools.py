"""Tools: Python callables a model can call in its turn, as the common special case of an environment.

* Schemas come from each callable's signature and Google-style docstring (`transformers.utils.get_json_schema`,
  the format chat templates take as `tools=`).
* A call is written in the model's turn as  <tool_call>{"name": "calc", "arguments": {"expression": "2*3"}}</tool_call>
  (the Hermes / Qwen format), or in the short form  <tool_call>calc("2*3")</tool_call>  (Python call syntax,
  literal arguments only: never evaluated as code).
* Each result goes back as a tool message. A tool that raises, runs past its timeout, or returns more than
  `max_output_chars` becomes an observation saying so (truncated results end with a marker), never a crash;
  so does a malformed call. Model-written code runs only in the sandbox (`python_tool`).

Where the chat template has no `tools` support, `tools_system_text` is the plain-text description given
in the system message instead.
"""

from __future__ import annotations

import ast
import json
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable

from transformers.utils import get_json_schema

from tether.envs.base import Feedback, Turn

CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
TRUNCATION_MARK = "...[truncated]"


def tool_schema(fn: Callable) -> dict:
    """The JSON schema of `fn` ({"type": "function", "function": {name, description, parameters}}); every
    argument needs a type hint and a description in the docstring's Args section."""
    return get_json_schema(fn)


def tools_system_text(schemas: list[dict]) -> str:
    """The plain-text tool description for chat templates without `tools` support (and for reading)."""
    lines = ["You can call tools. To call one, write", '<tool_call>{"name": NAME, "arguments": {ARGUMENTS}}</tool_call>',
             "and end your turn; the result comes back in a tool message. When you know the answer, give it "
             "without a tool call. The tools:"]
    lines += [json.dumps(s["function"], sort_keys=True) for s in schemas]
    return "\n".join(lines)


@dataclass
class ToolCall:
    name: str
    arguments: dict


class ToolCallError(ValueError):
    """A tool call the model wrote that cannot be parsed or bound."""


def parse_tool_calls(text: str, tools: dict[str, Callable]) -> list[ToolCall]:
    """Every <tool_call>...</tool_call> in `text`, in order, with its arguments bound by name; a malformed one
    raises ToolCallError with what is wrong (it becomes the observation)."""
    calls = []
    for body in CALL_RE.findall(text):
        body = body.strip()
        calls.append(_parse_json_call(body) if body.startswith("{") else _parse_python_call(body, tools))
    for call in calls:
        if call.name not in tools:
            raise ToolCallError(f"unknown tool {call.name!r}; the tools are: {', '.join(sorted(tools))}")
    return calls


def _parse_json_call(body: str) -> ToolCall:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        raise ToolCallError(f"tool call is not valid JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise ToolCallError('tool call must be {"name": str, "arguments": {...}}')
    args = obj.get("arguments", {})
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            raise ToolCallError("tool call arguments are a string that is not JSON") from None
    if not isinstance(args, dict):
        raise ToolCallError(f"tool call arguments must be an object, got {type(args).__name__}")
    return ToolCall(obj["name"], args)


def _parse_python_call(body: str, tools: dict[str, Callable]) -> ToolCall:
    try:
        node = ast.parse(body, mode="eval").body
    except SyntaxError:
        raise ToolCallError(f"tool call {body[:80]!r} is neither JSON nor a call like name(\"arg\")") from None
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        raise ToolCallError(f"tool call {body[:80]!r} is not a call like name(\"arg\")")
    name = node.func.id
    try:
        positional = [ast.literal_eval(a) for a in node.args]
        keywords = {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg is not None}
    except (ValueError, SyntaxError):
        raise ToolCallError(f"tool call {body[:80]!r}: arguments must be literals (strings, numbers)") from None
    if name not in tools:
        return ToolCall(name, keywords)
    import inspect

    try:
        bound = inspect.signature(tools[name]).bind(*positional, **keywords)
    except TypeError as e:
        raise ToolCallError(f"tool call {body[:80]!r}: {e}") from None
    return ToolCall(name, dict(bound.arguments))


@dataclass
class ToolResult:
    content: str
    error: bool = False
    timed_out: bool = False
    truncated: bool = False


def call_tool(fn: Callable, arguments: dict, *, timeout_s: float, max_output_chars: int) -> ToolResult:
    """Run one tool call in a thread with a timeout. A Python thread cannot be killed: a tool that hangs is
    abandoned (its thread is a daemon) and reported as timed out; tools that run untrusted code use the
    sandbox, which kills its process (`python_tool`)."""
    box: dict[str, Any] = {}

    def target():
        try:
            box["value"] = fn(**arguments)
        except BaseException as e:  # noqa: BLE001 - any failure of the tool is the model's observation
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True, name=f"tool-{getattr(fn, '__name__', 'tool')}")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        return ToolResult(f"error: the tool did not finish within {timeout_s:g} s", error=True, timed_out=True)
    if "error" in box:
        e = box["error"]
        return _clip(ToolResult(f"error: {type(e).__name__}: {e}", error=True), max_output_chars)
    value = box.get("value")
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return _clip(ToolResult(text), max_output_chars)


def _clip(result: ToolResult, limit: int) -> ToolResult:
    if len(result.content) > limit:
        result.content = result.content[:limit] + TRUNCATION_MARK
        result.truncated = True
    return result


class ToolEnvironment:
    """An episode in which the model may call `tools` before it answers.

    Each model turn with tool calls gets one tool message per call; a turn without one is the final answer,
    and the episode ends there with reward `verify(answer_text, row)` (None: no reward from the environment,
    reward functions score it). `info` counts tool_calls, tool_errors (raised, timed out, malformed) and
    truncated_outputs.
    """

    def __init__(self, tools: list[Callable], *, verify: Callable[[str, dict], float] | None = None,
                 timeout_s: float = 5.0, max_output_chars: int = 1000):
        self.tools = {getattr(fn, "__name__", f"tool{i}"): fn for i, fn in enumerate(tools)}
        self.verify = verify
        self.timeout_s = timeout_s
        self.max_output_chars = max_output_chars
        self.row: dict = {}

    @property
    def schemas(self) -> list[dict]:
        return [tool_schema(fn) for fn in self.tools.values()]

    def reset(self, row: dict):
        self.row = row
        return row["prompt"]

    def step(self, turn: Turn) -> Feedback:
        try:
            calls = parse_tool_calls(turn.text, self.tools)
        except ToolCallError as e:
            return Feedback(messages=[{"role": "tool", "content": f"error: {e}"}],
                            info={"tool_calls": 1, "tool_errors": 1})
        if not calls:
            reward = None if self.verify is None else float(self.verify(turn.text, self.row))
            return Feedback(reward=reward, done=True)
        out, errors, truncated = [], 0, 0
        for call in calls:
            result = call_tool(self.tools[call.name], call.arguments, timeout_s=self.timeout_s,
                               max_output_chars=self.max_output_chars)
            errors += result.error
            truncated += result.truncated
            out.append({"role": "tool", "name": call.name, "content": result.content})
        return Feedback(messages=out, info={"tool_calls": len(calls), "tool_errors": errors,
                                            "truncated_outputs": truncated})
