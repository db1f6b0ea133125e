"""Tools: schemas from signatures, parsing calls, and every way a tool can fail becoming an observation."""

import time

import pytest

from tether.envs.base import Feedback, Turn
from tether.envs.builtin import CalculatorEnv, GuessNumberEnv, PythonEnv, calc, final_number_matches
from tether.envs.tools import (
    TRUNCATION_MARK,
    ToolCallError,
    ToolEnvironment,
    call_tool,
    parse_tool_calls,
    tool_schema,
    tools_system_text,
)


def add(a: int, b: int = 0) -> int:
    """Add two integers.

    Args:
        a: the first
        b: the second
    """
    return a + b


def test_schema_comes_from_the_signature_and_docstring():
    s = tool_schema(add)["function"]
    assert s["name"] == "add" and s["description"] == "Add two integers."
    assert s["parameters"]["properties"]["a"] == {"type": "integer", "description": "the first"}
    assert s["parameters"]["required"] == ["a"]
    assert '"name": "add"' in tools_system_text([tool_schema(add)])


def test_json_and_python_call_forms_parse_to_the_same_call():
    tools = {"add": add}
    j = parse_tool_calls('x <tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call> y', tools)
    p = parse_tool_calls("<tool_call>add(2, b=3)</tool_call>", tools)
    assert [(c.name, c.arguments) for c in j] == [(c.name, c.arguments) for c in p] == [("add", {"a": 2, "b": 3})]
    assert parse_tool_calls("no call here", tools) == []
    two = parse_tool_calls("<tool_call>add(1)</tool_call><tool_call>add(2)</tool_call>", tools)
    assert [c.arguments["a"] for c in two] == [1, 2]


@pytest.mark.parametrize("text, problem", [
    ('<tool_call>{"name": "add", "arguments": {"a": 2</tool_call>', "not valid JSON"),
    ("<tool_call>sub(1, 2)</tool_call>", "unknown tool 'sub'"),
    ("<tool_call>add(__import__('os'))</tool_call>", "literals"),
    ("<tool_call>add(1, 2, 3)</tool_call>", "too many positional"),
    ("<tool_call>add + 1</tool_call>", "not a call"),
])
def test_malformed_calls_name_the_problem(text, problem):
    with pytest.raises(ToolCallError, match=problem):
        parse_tool_calls(text, {"add": add})


def test_a_tool_that_raises_hangs_or_floods_becomes_an_observation():
    def boom():
        raise KeyError("nope")

    def hang():
        time.sleep(30)

    def flood():
        return "x" * 10_000

    r = call_tool(boom, {}, timeout_s=1, max_output_chars=100)
    assert r.error and r.content == "error: KeyError: 'nope'"
    t0 = time.perf_counter()
    r = call_tool(hang, {}, timeout_s=0.2, max_output_chars=100)
    assert r.timed_out and r.error and time.perf_counter() - t0 < 2
    r = call_tool(flood, {}, timeout_s=1, max_output_chars=100)
    assert r.truncated and not r.error and r.content == "x" * 100 + TRUNCATION_MARK


def test_tool_environment_counts_calls_and_errors_and_ends_on_an_answer():
    env = ToolEnvironment([add], verify=final_number_matches)
    assert env.reset({"prompt": "2+3?", "answer": "5"}) == "2+3?"
    fb = env.step(Turn("<tool_call>add(2, 3)</tool_call>", [1]))
    assert fb.messages == [{"role": "tool", "name": "add", "content": "5"}] and not fb.done
    assert fb.info == {"tool_calls": 1, "tool_errors": 0, "truncated_outputs": 0}
    bad = env.step(Turn("<tool_call>add(</tool_call>", [1]))
    assert bad.messages[0]["content"].startswith("error:") and bad.info["tool_errors"] == 1 and not bad.done
    assert env.step(Turn("It is 5.", [1])) == Feedback(reward=1.0, done=True)
    assert env.step(Turn("It is 6.", [1])).reward == 0.0


def test_calc_evaluates_arithmetic_and_refuses_anything_else():
    assert calc("482*37") == "17834" and calc("(7-2)*3//2") == "7" and calc("7/2") == "3.5"
    for bad in ("__import__('os')", "2**1000", "a*2", "1e9*2"):
        with pytest.raises((ValueError, SyntaxError)):
            calc(bad)
    env = CalculatorEnv()
    env.reset({"prompt": "482*37=", "answer": "17834"})
    assert env.step(Turn('<tool_call>calc("482*37")</tool_call>', [1])).messages[0]["content"] == "17834"


def test_python_tool_runs_in_the_sandbox_with_a_timeout():
    env = PythonEnv(timeout_s=20)
    env.reset({"prompt": "q", "answer": "1024"})
    fb = env.step(Turn('<tool_call>{"name": "python", "arguments": {"code": "print(2**10)"}}</tool_call>', [1]))
    assert fb.messages[0]["content"] == "1024" and fb.info["tool_errors"] == 0
    PythonEnv.code_timeout_s, old = 0.5, PythonEnv.code_timeout_s
    try:
        fb = env.step(Turn('<tool_call>python("while True: pass")</tool_call>', [1]))
    finally:
        PythonEnv.code_timeout_s = old
    assert fb.info["tool_errors"] == 1 and "killed" in fb.messages[0]["content"]


def test_python_tool_prints_a_final_expression_as_a_repl_does():
    from tether.envs.builtin import print_last_expression, python

    assert python("2**100 % 997") == str(2**100 % 997)
    assert python("x = 6\nx * 7") == "42"
    assert python("print(3)") == "3"  # print's own None is not shown again
    assert python("'a' + 'b'") == "'ab'"  # the repr, as a REPL shows it
    assert python("y = 1") == "(no output; exit code 0)"
    assert print_last_expression("def f(:") == "def f(:"  # left for the sandbox to report
    assert "SyntaxError" in python("def f(:")


def test_guess_number_replies_higher_lower_and_rewards_the_find():
    env = GuessNumberEnv()
    env.reset({"prompt": "Guess 1-20:", "secret": 13})
    assert env.step(Turn("10", [1])).messages[0]["content"] == "higher"
    assert env.step(Turn("15", [1])).messages[0]["content"] == "lower"
    assert env.step(Turn("??", [1])).info == {"tool_errors": 1}
    assert env.step(Turn("13", [1])) == Feedback(reward=1.0, done=True)
