"""Run model-written Python in a separate, resource-limited process, and a code-execution reward built on it.

What the sandbox does, per call:
  * a fresh interpreter (`python -I -S`: isolated mode, no site-packages, so only the standard library) in a
    new session / process group, with a fresh temporary working directory that is deleted afterwards;
  * an environment holding only PATH, LANG and HOME (the temp dir): no inherited secrets or tokens;
  * rlimits: address space (`memory_mb`), CPU seconds (timeout + 1), file size (16 MiB), no core dumps;
  * a wall-clock timeout after which the whole process group is SIGKILLed and reaped; the group is also
    killed after a normal exit, so background children the program started do not outlive the call;
  * stdout/stderr are drained concurrently and truncated to `max_output_bytes` each.

What it does not do: it is a resource and crash boundary, not a security boundary against a hostile program.
The child can read any file the user can read and can open network connections, and a process that calls
`setsid()` leaves the process group. RLIMIT_NPROC is not set because it counts all processes and threads of
the user (a trainer has many) and is ignored for root. For untrusted code at scale, run the trainer (or this
function) inside a container or VM with no network and a read-only filesystem.

The limits are applied by a tiny bootstrap that runs first inside the child interpreter, not in a
`preexec_fn`: `preexec_fn` can deadlock when the parent has threads, and `code_tests_reward` runs sandboxes
from a thread pool. Soft and hard limits are set equal, so the program cannot raise them back (unless the
trainer runs as root, which a container should prevent).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

MAX_OUTPUT_BYTES = 64 * 1024
FILE_SIZE_LIMIT_MB = 16

# Runs in the child before the user's program: apply the limits, then execute main.py as __main__.
# Arguments: memory bytes, cpu seconds, file-size bytes.
_BOOTSTRAP = """\
import resource as _r, sys as _s
_mem, _cpu, _fsize = (int(a) for a in _s.argv[1:4])
_r.setrlimit(_r.RLIMIT_AS, (_mem, _mem))
_r.setrlimit(_r.RLIMIT_CPU, (_cpu, _cpu + 1))
_r.setrlimit(_r.RLIMIT_FSIZE, (_fsize, _fsize))
_r.setrlimit(_r.RLIMIT_CORE, (0, 0))
_s.argv = ["main.py"]
__file__ = "main.py"
with open("main.py", encoding="utf-8") as _h:
    _code = compile(_h.read(), "main.py", "exec")
del _r, _s, _mem, _cpu, _fsize, _h
# Run in the real __main__ namespace, so classes defined by the program pickle and `__name__` checks work.
exec(globals().pop("_code"), globals())
"""


@dataclass
class SandboxResult:
    """Outcome of one sandboxed run. `returncode` is negative when the process was killed by a signal.
    `memory_exceeded` is best effort: the program failed with a MemoryError, which is how the address-space
    limit shows up in Python code (allocations fail). stdout keeps its first `max_output_bytes`, stderr its
    last (that is where a traceback ends)."""

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    memory_exceeded: bool


def run_sandboxed(
    code: str,
    *,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    stdin: str | None = None,
    max_output_bytes: int = MAX_OUTPUT_BYTES,
) -> SandboxResult:
    """Run `code` as a Python program in a fresh, limited process and return its exit status and output."""
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
    if memory_mb < 32:
        raise ValueError(f"memory_mb={memory_mb} is too small for a Python interpreter to start; use >= 32")

    workdir = tempfile.mkdtemp(prefix="tether-sandbox-")
    try:
        with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        stdin_file = None
        if stdin is not None:
            # A file, not a pipe: writing a large stdin to a pipe could block while the child is not reading.
            with open(os.path.join(workdir, "stdin.txt"), "w", encoding="utf-8") as f:
                f.write(stdin)
            stdin_file = open(os.path.join(workdir, "stdin.txt"), "rb")
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir}
        cpu_s = int(timeout_s) + 1
        cmd = [sys.executable, "-I", "-S", "-c", _BOOTSTRAP,
               str(memory_mb * 1024 * 1024), str(cpu_s), str(FILE_SIZE_LIMIT_MB * 1024 * 1024)]
        try:
            proc = subprocess.Popen(
                cmd,
                cwd=workdir,
                env=env,
                stdin=stdin_file if stdin_file is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,  # own process group, so one killpg reaches every descendant
                close_fds=True,
            )
        finally:
            if stdin_file is not None:
                stdin_file.close()

        out_buf, err_buf = bytearray(), bytearray()
        readers = [
            threading.Thread(target=_drain, args=(proc.stdout, out_buf, max_output_bytes, False), daemon=True),
            threading.Thread(target=_drain, args=(proc.stderr, err_buf, max_output_bytes, True), daemon=True),
        ]
        for t in readers:
            t.start()

        timed_out = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        # Kill the whole group in every case: after a timeout this stops the program, after a normal exit it
        # removes background children that would otherwise outlive the call (and hold the pipes open).
        _kill_group(proc.pid)
        proc.wait()
        for t in readers:
            t.join(timeout=5.0)  # the pipes close once every process in the group is gone
        proc.stdout.close()
        proc.stderr.close()

        stdout = out_buf.decode("utf-8", errors="replace")
        stderr = err_buf.decode("utf-8", errors="replace")
        rc = proc.returncode
        if rc == -signal.SIGXCPU:  # the CPU-time limit is a timeout too
            timed_out = True
        memory_exceeded = not timed_out and rc != 0 and "MemoryError" in stderr
        return SandboxResult(rc, stdout, stderr, timed_out, memory_exceeded)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _drain(stream, buf: bytearray, limit: int, keep_tail: bool) -> None:
    # Keep reading past the limit so the child never blocks on a full pipe; just drop the excess.
    while True:
        try:
            chunk = stream.read1(65536)
        except (OSError, ValueError):  # closed under us: a process that escaped the group still held the pipe
            return
        if not chunk:
            return
        if keep_tail:
            buf.extend(chunk)
            if len(buf) > limit:
                del buf[: len(buf) - limit]
        elif len(buf) < limit:
            buf.extend(chunk[: limit - len(buf)])


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # already gone


# ----------------------------------------------------------------------------------------------------------
# Code-execution reward

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(completion: str) -> str:
    """The last fenced code block (```python, ```py or a bare ```), else the whole completion.

    The last block rather than the first: models often sketch or restate before the final solution."""
    blocks = _FENCE.findall(completion)
    return blocks[-1] if blocks else completion


def code_tests_reward(
    prompts: list[str],
    completions: list[str],
    tests: list[str | None],
    *,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    max_workers: int | None = None,
    **kwargs,
) -> list[float | None]:
    """1.0 if the completion's code followed by the row's `tests` (typically `assert` lines) exits with status
    0 in the sandbox, else 0.0 (failure, exception, timeout, memory). Rows whose `tests` is None or empty
    score None. Samples run in parallel, each in its own sandbox process."""
    if len(tests) != len(completions):
        raise ValueError(f"code_tests_reward: got {len(tests)} tests for {len(completions)} completions")
    for i, t in enumerate(tests):
        if t is not None and not isinstance(t, str):
            raise ValueError(f"code_tests_reward: tests for sample {i} must be a string of Python code, got {type(t).__name__}")

    def score(i: int) -> float | None:
        if not tests[i] or not tests[i].strip():
            return None
        program = extract_code(completions[i]) + "\n\n" + tests[i] + "\n"
        result = run_sandboxed(program, timeout_s=timeout_s, memory_mb=memory_mb)
        return 1.0 if result.returncode == 0 and not result.timed_out else 0.0

    workers = max_workers or min(8, os.cpu_count() or 1, max(1, len(completions)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(score, range(len(completions))))
