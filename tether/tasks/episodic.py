"""Built-in multi-turn tasks: rows, held-out split and imperfect demonstrations for the built-in environments
(tether/envs/builtin.py). A demonstration is an episode: {"prompt", "episode": [turn, ...]} where each turn is
{"role": "assistant", "content"} or the environment's {"role": "user" | "tool", "content"}; SFT learns the
assistant turns only (train/sft.py).

* `calculator` (CalculatorTask): "482*37=", answer "17834". Demonstrations call the tool,
  <tool_call>calc("482*37")</tool_call>, read the result and answer with it, except a share `demo_error_rate`
  (0.6) that answer at once with an estimate (the first factor rounded to tens, times the second): wrong
  unless the first factor is a multiple of ten. Imitated greedily the estimate wins; RL finds the tool.
* `guess_number` (GuessNumberTask): "Guess 1-20:", a hidden number; replies "higher" / "lower". Every
  demonstration opens with the middle; after that each guess bisects the interval the replies leave, except
  that with probability `demo_error_rate` (0.65) it steps by one from the last guess instead (a linear search,
  which finds far numbers too late). Within the default 5 turns bisection always wins, linear search only when
  the secret is near the middle. The secret is never shown to the policy, so evaluation plays every secret
  (fresh games); with `eval_fraction` > 0 some secrets are held out of training instead.
* `python_math` (PythonMathTask): "37**482 % 1000003 = ?" or "sum(map(int, str(37**482))) = ?": Python
  expressions too big for the head and instant for the interpreter; the `python` tool runs code in the sandbox
  and, as a REPL, prints a final expression's value. Demonstrations call <tool_call>python("37**482 %
  1000003")</tool_call>, read the result and answer with it, except a share `demo_error_rate` (0.6) that
  answer at once, "about N", with an estimate (a x b mod the modulus; 4.5 per digit of the power): nearly
  always wrong. "about" outweighs "<tool_call>" as a first token, so greedy imitation answers at once (0%);
  RL finds the tool. The question opens with the expression that the program repeats, so that the tiny model
  learns the copy within a few hundred SFT steps (a question in words took it far longer).
"""

from __future__ import annotations

from tether.envs.builtin import calc
from tether.tasks.base import Task, _check_probability

MODULUS = 1000003  # a prime: python_math's powers are taken modulo it


class EpisodicTask(Task):
    """A task whose rows are played as episodes of `environment`. `env_defaults` are the config values its
    default job uses (env.*, rollout.max_new_tokens); `model_defaults` the tiny model's shape overrides."""

    environment: str = ""
    demonstration_key = "episode"
    env_defaults: dict = {}
    model_defaults: dict = {}

    def is_success(self, episode_reward: float) -> bool:
        return episode_reward >= 1.0


class CalculatorTask(EpisodicTask):
    name = "calculator"
    environment = "calculator"
    env_defaults = {"env": {"max_turns": 2, "max_tokens": 96}, "rollout": {"max_new_tokens": 40}}
    model_defaults = {"max_positions": 128}

    def __init__(self, demo_error_rate: float = 0.6, eval_fraction: float = 0.2):
        self.demo_error_rate = _check_probability("demo_error_rate", demo_error_rate)
        self.eval_fraction = _check_probability("eval_fraction", eval_fraction)

    def _draw(self, rng):
        return rng.randint(100, 999), rng.randint(10, 99)

    def _key(self, problem) -> str:
        return f"{problem[0]}*{problem[1]}"

    def _prompt(self, problem) -> str:
        return f"{problem[0]}*{problem[1]}="

    def _answer(self, problem) -> str:
        return str(problem[0] * problem[1])

    def _demonstrate(self, problem, rng):
        a, b = problem
        if rng.random() < self.demo_error_rate:
            estimate = round(a, -1) * b
            return [{"role": "assistant", "content": str(estimate)}], estimate != a * b
        expression = f"{a}*{b}"
        return [{"role": "assistant", "content": f'<tool_call>calc("{expression}")</tool_call>'},
                {"role": "tool", "content": calc(expression)},
                {"role": "assistant", "content": self._answer(problem)}], False

    def score(self, completion: str, answer: str) -> float:
        return float(completion.strip() == answer)


class GuessNumberTask(EpisodicTask):
    name = "guess_number"
    environment = "guess_number"
    env_defaults = {"env": {"max_turns": 5, "max_tokens": 64}, "rollout": {"max_new_tokens": 4}}
    model_defaults = {"max_positions": 96}

    def __init__(self, low: int = 1, high: int = 20, demo_error_rate: float = 0.65, eval_fraction: float = 0.0):
        if not (isinstance(low, int) and isinstance(high, int) and high - low >= 2):
            raise ValueError(f"need integers low < high - 1, got {low!r}, {high!r}")
        self.low, self.high = low, high
        self.demo_error_rate = _check_probability("demo_error_rate", demo_error_rate)
        self.eval_fraction = _check_probability("eval_fraction", eval_fraction)

    def _draw(self, rng):
        return rng.randint(self.low, self.high)

    def _key(self, problem) -> str:
        return f"{self.low}-{self.high}:{problem}"

    def _prompt(self, problem) -> str:
        return f"Guess {self.low}-{self.high}:"

    def _answer(self, problem) -> str:
        return str(problem)

    def _row(self, problem) -> dict:
        return {**super()._row(problem), "secret": problem, "low": self.low, "high": self.high}

    def make_rows(self, split: str, n: int, seed: int = 0) -> list[dict]:
        # The policy never sees the secret, so no game can be learnt by heart: evaluation plays every secret
        # once (n caps it), training draws secrets uniformly. Held out by secret instead (eval_fraction > 0),
        # RL fits the trained secrets' search tree and need not cover the others.
        if split == "eval" and not self.eval_fraction:
            return [self._row(p) for p in range(self.low, self.high + 1)][:n]
        return super().make_rows(split, n, seed)

    def _demonstrate(self, secret, rng):
        lo, hi = self.low, self.high
        guess = (lo + hi) // 2
        turns, flawed = [], False
        for _ in range(8):
            turns.append({"role": "assistant", "content": str(guess)})
            if guess == secret:
                break
            reply = "higher" if guess < secret else "lower"
            turns.append({"role": "user", "content": reply})
            lo, hi = (guess + 1, hi) if reply == "higher" else (lo, guess - 1)
            if rng.random() < self.demo_error_rate:
                guess, flawed = guess + (1 if reply == "higher" else -1), True
            else:
                guess = (lo + hi) // 2
        return turns, flawed

    def score(self, completion: str, answer: str) -> float:
        return float(completion.strip() == answer)


class PythonMathTask(EpisodicTask):
    name = "python_math"
    environment = "python"
    # Sized for the tiny model's default job (the digit-sum call, the longest turn, is 57 characters); a real
    # model that writes longer programs wants more turns and tokens.
    env_defaults = {"env": {"max_turns": 3, "max_tokens": 176}, "rollout": {"max_new_tokens": 80}}
    model_defaults = {"max_positions": 192}

    KINDS = ("powmod", "digitsum")  # task.options={"kinds": [...]} picks a subset

    def __init__(self, demo_error_rate: float = 0.6, eval_fraction: float = 0.2, kinds: tuple = KINDS):
        self.demo_error_rate = _check_probability("demo_error_rate", demo_error_rate)
        self.eval_fraction = _check_probability("eval_fraction", eval_fraction)
        if not kinds or set(kinds) - set(self.KINDS):
            raise ValueError(f"kinds must be a non-empty subset of {self.KINDS}, got {kinds!r}")
        self.kinds = tuple(kinds)

    def _draw(self, rng):
        return rng.choice(self.kinds), rng.randint(20, 99), rng.randint(300, 999)

    def _key(self, problem) -> str:
        return "|".join(map(str, problem))

    def _prompt(self, problem) -> str:
        kind, a, b = problem
        if kind == "powmod":
            return f"{a}**{b} % {MODULUS} = ?"
        return f"sum(map(int, str({a}**{b}))) = ?"

    def _answer(self, problem) -> str:
        kind, a, b = problem
        return str(pow(a, b, MODULUS) if kind == "powmod" else sum(map(int, str(a ** b))))

    def _estimate(self, problem) -> int:
        """The flawed demonstrations' answer without the tool: a x b mod the modulus for the power, and 4.5 per
        digit for the digit sum (right in expectation, almost never exactly)."""
        kind, a, b = problem
        return (a * b) % MODULUS if kind == "powmod" else 9 * len(str(a ** b)) // 2

    def _demonstrate(self, problem, rng):
        kind, a, b = problem
        if rng.random() < self.demo_error_rate:
            estimate = self._estimate(problem)
            return [{"role": "assistant", "content": f"about {estimate}"}], str(estimate) != self._answer(problem)
        # The program is the question's expression (the tool prints a final expression's value, as a REPL).
        code = f"{a}**{b} % {MODULUS}" if kind == "powmod" else f"sum(map(int, str({a}**{b})))"
        return [{"role": "assistant", "content": f'<tool_call>python("{code}")</tool_call>'},
                {"role": "tool", "content": self._answer(problem)},
                {"role": "assistant", "content": self._answer(problem)}], False

    def score(self, completion: str, answer: str) -> float:
        from tether.envs.builtin import final_number_matches

        return final_number_matches(completion, {"answer": answer})
