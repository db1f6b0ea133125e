import os
import time

import psutil
import pytest

from tether.rewards.functions import RewardScorer
from tether.rewards.sandbox import code_tests_reward, extract_code, run_sandboxed


def test_runs_code_and_captures_output():
    res = run_sandboxed("import sys\nprint(input().upper())\nprint('err', file=sys.stderr)\nsys.exit(3)", stdin="hi\n")
    assert (res.returncode, res.stdout, res.stderr, res.timed_out, res.memory_exceeded) == (3, "HI\n", "err\n", False, False)


def test_infinite_loop_times_out_and_process_is_gone():
    t0 = time.perf_counter()
    res = run_sandboxed("import os\nprint(os.getpid(), flush=True)\nwhile True:\n    pass\n", timeout_s=1.0)
    elapsed = time.perf_counter() - t0
    assert res.timed_out and res.returncode < 0
    assert elapsed < 4.0
    pid = int(res.stdout.split()[0])
    assert not psutil.pid_exists(pid)


def test_background_children_are_killed_too():
    code = "import subprocess\np = subprocess.Popen(['sleep', '60'])\nprint(p.pid, flush=True)\n"
    res = run_sandboxed(code, timeout_s=5.0)
    assert res.returncode == 0 and not res.timed_out
    pid = int(res.stdout.split()[0])
    for _ in range(50):  # the sleep was SIGKILLed; give the kernel a moment to reap the orphan
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            break
        time.sleep(0.02)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_unbounded_allocation_hits_memory_limit_quickly():
    t0 = time.perf_counter()
    res = run_sandboxed("chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))\n", memory_mb=128, timeout_s=10.0)
    assert res.memory_exceeded and res.returncode != 0 and not res.timed_out
    assert "MemoryError" in res.stderr
    assert time.perf_counter() - t0 < 5.0


def test_parent_environment_is_not_visible(monkeypatch):
    monkeypatch.setenv("TETHER_TEST_SECRET", "hunter2")
    res = run_sandboxed("import os\nprint(os.environ.get('TETHER_TEST_SECRET'))\nprint(sorted(os.environ))")
    assert res.returncode == 0
    assert "hunter2" not in res.stdout
    assert res.stdout.splitlines()[0] == "None"


def test_runs_in_fresh_temp_dir_that_is_removed():
    res = run_sandboxed("import os\nprint(os.getcwd())\nopen('scratch.txt', 'w').write('x')")
    workdir = res.stdout.strip()
    assert workdir != os.getcwd() and "tether-sandbox-" in workdir
    assert not os.path.exists(workdir)


def test_limits_are_applied_and_site_packages_are_hidden():
    code = "import resource as r\nprint(r.getrlimit(r.RLIMIT_AS), r.getrlimit(r.RLIMIT_CPU), r.getrlimit(r.RLIMIT_CORE))"
    res = run_sandboxed(code, memory_mb=256, timeout_s=3.0)
    mem = 256 * 1024 * 1024
    assert res.stdout.strip() == f"({mem}, {mem}) (4, 5) (0, 0)"
    res = run_sandboxed("import torch")
    assert "ModuleNotFoundError" in res.stderr


def test_limits_cannot_be_raised():
    res = run_sandboxed("import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))")
    if res.returncode == 0 and os.geteuid() == 0:
        pytest.skip("running as root with CAP_SYS_RESOURCE, which may raise hard limits (use a container)")
    assert res.returncode != 0 and "not allowed to raise maximum limit" in res.stderr


def test_output_is_truncated():
    res = run_sandboxed("print('x' * 10**6)", max_output_bytes=1000)
    assert res.returncode == 0 and len(res.stdout) == 1000


def test_extract_code():
    assert extract_code("blah\n```python\nx = 1\n```\nthen\n```py\nx = 2\n```\n") == "x = 2\n"
    assert extract_code("```\ny = 3\n```") == "y = 3\n"
    assert extract_code("def f(): return 1") == "def f(): return 1"


def test_code_tests_reward_correct_wrong_and_hanging():
    tests = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"
    completions = [
        "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```",
        "```python\ndef add(a, b):\n    return a - b\n```",
        "def add(a, b):\n    while True:\n        pass",
        "def add(a, b) return",  # syntax error
        "```python\ndef add(a, b):\n    return a + b\n```",
    ]
    t0 = time.perf_counter()
    scores = code_tests_reward(["p"] * 5, completions, tests=[tests, tests, tests, tests, None], timeout_s=1.0)
    assert scores == [1.0, 0.0, 0.0, 0.0, None]
    assert time.perf_counter() - t0 < 6.0


def test_code_tests_reward_in_scorer_and_bad_tests_column():
    scorer = RewardScorer(["builtin:code_tests"])
    res = scorer(["p"], ["print('hi')"], {"tests": ["assert 1 == 1"]})
    assert res.scores.tolist() == [1.0]
    with pytest.raises(ValueError, match="tests for sample 0 must be a string"):
        code_tests_reward(["p"], ["x"], tests=[["assert True"]])
