"""Built-in synthetic tasks and their registry.

    task = get_task("arithmetic", digits=2, partial_credit=True)
    rows = task.make_rows("eval", 500, seed=0)
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from tether.tasks.arithmetic import ArithmeticTask
from tether.tasks.base import Task
from tether.tasks.chat_arithmetic import ChatArithmeticTask
from tether.tasks.episodic import CalculatorTask, EpisodicTask, GuessNumberTask, PythonMathTask
from tether.tasks.sequence import SequenceTask

# name -> factory (a Task subclass or any callable returning a Task). Other modules may add entries.
TASKS: dict[str, Callable[..., Task]] = {
    "arithmetic": ArithmeticTask,
    "chat_arithmetic": ChatArithmeticTask,
    "sequence": SequenceTask,
    "calculator": CalculatorTask,
    "guess_number": GuessNumberTask,
    "python_math": PythonMathTask,
}


def get_task(name: str, **options: Any) -> Task:
    """Build the registered task `name` with keyword `options`; unknown names or options raise ValueError."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    factory = TASKS[name]
    params = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = sorted(set(options) - set(params))
    if unknown and not takes_any:
        known = [k for k, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL]
        raise ValueError(f"task {name!r} has no option(s) {', '.join(unknown)}; its options are: {', '.join(known)}")
    return factory(**options)


__all__ = ["TASKS", "ArithmeticTask", "CalculatorTask", "ChatArithmeticTask", "EpisodicTask", "GuessNumberTask",
           "PythonMathTask", "SequenceTask", "Task", "get_task"]
