"""Built-in environments, each with its reward; the tasks that draw their rows and demonstrations are in
`tether.tasks` (calculator, guess_number, python_math).

* `calculator`: arithmetic too hard to do in the head (a 3-digit by 2-digit product) and easy with the
  `calc` tool. Reward 1 when the final turn's last number is the answer.
* `guess_number`: find a hidden number in [low, high] with "higher" / "lower" replies; reward 1 when found
  within the episode's turns (env.max_turns). Only a policy that uses the feedback (bisection) always wins.
* `python`: a `python` tool that runs the model's code in the sandbox (tether.rewards.sandbox: own process
  group, timeout, output cap); reward 1 when the final turn's last number is the answer.
"""

from __future__ import annotations

import ast
import operator
import re

from tether.envs.base import Feedback, Turn
from tether.envs.tools import ToolEnvironment

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def last_number(text: str) -> str | None:
    found = _NUMBER.findall(text.replace(",", ""))
    return found[-1] if found else None


def final_number_matches(text: str, row: dict) -> float:
    """1.0 when the last number in `text` equals the row's answer (as a number), else 0.0."""
    got = last_number(text)
    if got is None:
        return 0.0
    try:
        return float(float(got) == float(row["answer"]))
    except (TypeError, ValueError):
        return 0.0


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
        ast.Mod: operator.mod, ast.Div: operator.truediv}


def calc(expression: str) -> str:
    """Evaluate an arithmetic expression of integers with + - * / // % and parentheses.

    Args:
        expression: the expression, for example "482*37"
    """
    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return -ev(node.operand) if isinstance(node.op, ast.USub) else ev(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError("only integers, + - * / // % and parentheses are allowed")

    if len(expression) > 200:
        raise ValueError("expression longer than 200 characters")
    value = ev(ast.parse(expression.strip(), mode="eval").body)
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


class CalculatorEnv(ToolEnvironment):
    def __init__(self, timeout_s: float = 2.0, max_output_chars: int = 200):
        super().__init__([calc], verify=final_number_matches, timeout_s=timeout_s, max_output_chars=max_output_chars)


def python(code: str) -> str:
    """Run Python code in a sandbox and return what it prints (stdout, then stderr). As in a REPL, the value of
    a final expression is printed too.

    Args:
        code: a Python program or expression, for example "2**100 % 997"
    """
    from tether.rewards.sandbox import run_sandboxed

    result = run_sandboxed(print_last_expression(code), timeout_s=PythonEnv.code_timeout_s)
    if result.timed_out:
        raise TimeoutError(f"the program ran past {PythonEnv.code_timeout_s:g} s and was killed")
    text = result.stdout + (("\n" + result.stderr) if result.stderr else "")
    return text.strip() or f"(no output; exit code {result.returncode})"


def print_last_expression(code: str) -> str:
    """`code` with its final expression statement, if any, printed as a REPL shows it (its repr, unless it is
    None), so that `2**100 % 997` answers as `print(2**100 % 997)` does. Code that does not parse is returned
    unchanged: the sandbox reports the SyntaxError as the program's output."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # ValueError: a null byte
        return code
    if not tree.body or not isinstance(tree.body[-1], ast.Expr):
        return code
    value = ast.unparse(tree.body[-1].value)
    head = ast.unparse(ast.Module(body=tree.body[:-1], type_ignores=[]))
    shown = f"__value__ = ({value})\nif __value__ is not None:\n    print(repr(__value__))\n"
    return f"{head}\n{shown}" if head else shown


class PythonEnv(ToolEnvironment):
    code_timeout_s = 5.0

    def __init__(self, timeout_s: float = 10.0, max_output_chars: int = 1000):
        super().__init__([python], verify=final_number_matches, timeout_s=timeout_s,
                         max_output_chars=max_output_chars)


class GuessNumberEnv:
    """Rows {"prompt", "secret", "low", "high"}. A turn whose text holds no number is told so (and counted as
    a tool error: an invalid move)."""

    def reset(self, row: dict):
        self.secret = int(row["secret"])
        return row["prompt"]

    def step(self, turn: Turn) -> Feedback:
        got = last_number(turn.text)
        if got is None or "." in got:
            return Feedback(messages=[{"role": "user", "content": "a number"}], info={"tool_errors": 1})
        guess = int(got)
        if guess == self.secret:
            return Feedback(reward=1.0, done=True)
        return Feedback(messages=[{"role": "user", "content": "higher" if guess < self.secret else "lower"}],
                        reward=0.0)


ENVIRONMENTS = {"calculator": CalculatorEnv, "guess_number": GuessNumberEnv, "python": PythonEnv}
