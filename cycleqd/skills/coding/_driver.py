"""Trusted driver of the coding judge (runs in its OWN sandbox, never with candidate code).

Usage (inside the sandbox): ``python3 -s -B /cq/driver.py`` with ``/cq/wire.py`` and
``/cq/jobs.json`` = ``{"mode": "record"|"judge", "timeout": s, "memory": bytes,
"jobs": [...]}``. Each job runs in a forked child (its own copy of this clean process,
with CPU/address-space rlimits and a wall-clock kill), so one job cannot touch another's
result; the parent writes one JSON line per job to stdout.

record job ``{"id", "program", "entries", "test"}``: ``program`` is setup + the reference
solution. The tested functions are wrapped by a recorder, then the benchmark's test code
runs. Result ``{"id", "calls": [call keys in order], "passed", "detail"}``: the inputs the
tests give the function (only top-level calls, not the reference's own recursion).

judge job ``{"id", "program", "entries", "test", "table": {key: [status, payload]}}``:
``program`` is setup (+ the HumanEval prompt's helpers), with NO candidate code. Each
tested function is replaced by a replay that returns, for a call key, a fresh value decoded
from the candidate's plain-data result (or raises the exception it reported); the
benchmark's own test code then decides. Result ``{"id", "status": pass|fail|error|missing,
"detail", "missing": [keys the table lacks]}``.

``random`` is seeded (0) before the tests in both modes, and the sandbox fixes
``PYTHONHASHSEED``, so tests that draw random inputs ask for the same calls each time.
"""

import builtins
import json
import os
import random
import resource
import select
import signal
import sys
import time
import traceback

import wire


class _Missing(BaseException):
    """A call the candidate has not been asked yet (escapes ``except Exception``)."""


def _last_test_line(tb):
    line = None
    for fr, lineno in traceback.walk_tb(tb):
        if fr.f_code.co_filename == "<test>":
            line = lineno
    return line


def _run_record(job):
    ns = {"__name__": "__main__"}
    exec(compile(job["program"], "<reference>", "exec"), ns)
    calls = []
    depth = [0]

    def wrap(name, fn):
        def recorder(*args, **kwargs):
            if depth[0] == 0:
                calls.append(wire.call_key(name, args, kwargs))
            depth[0] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1
        return recorder

    for name in job["entries"]:
        ns[name] = wrap(name, ns[name])
    random.seed(0)
    passed, detail = True, ""
    try:
        exec(compile(job["test"], "<test>", "exec"), ns)
    except BaseException as e:  # noqa: BLE001
        passed, detail = False, "%s: %s (test line %s)" % (type(e).__name__, str(e)[:200],
                                                           _last_test_line(e.__traceback__))
    return {"calls": calls, "passed": passed, "detail": detail}


_RAISABLE = {n: getattr(builtins, n) for n in dir(builtins)
             if isinstance(getattr(builtins, n), type) and issubclass(getattr(builtins, n), Exception)}


class CandidateRaised(Exception):
    """Marker mixed into exceptions the replay raises on the candidate's behalf."""


def _run_judge(job):
    ns = {"__name__": "__main__"}
    exec(compile(job["program"], "<setup>", "exec"), ns)
    table = job["table"]
    missing = []
    raised = []

    def replay(name):
        def candidate(*args, **kwargs):
            key = wire.call_key(name, args, kwargs)
            entry = table.get(key)
            if entry is None:
                missing.append(key)
                raise _Missing()
            status, payload = entry
            if status == "ok":
                return wire.loads(payload)
            try:
                kind, text = json.loads(payload)
                kind, text = str(kind)[:60], str(text)[:300]
            except (ValueError, TypeError, RecursionError):
                kind, text = "RuntimeError", "unreadable error report"
            if status == "bad":
                kind, text = "ValueError", "result is not plain data (%s)" % kind
            cls = _RAISABLE.get(kind, RuntimeError)
            raised.append("%s: %s" % (kind, text))
            try:
                exc = cls(text)
            except Exception:  # noqa: BLE001 - e.g. UnicodeDecodeError needs 5 args
                exc = RuntimeError("%s: %s" % (kind, text))
            raise exc
        candidate.__name__ = name
        return candidate

    for name in job["entries"]:
        ns[name] = replay(name)
    random.seed(0)
    try:
        exec(compile(job["test"], "<test>", "exec"), ns)
    except _Missing:
        pass
    except wire.WireError as e:
        return {"status": "error", "detail": "result not readable: %s" % e, "missing": []}
    except BaseException as e:  # noqa: BLE001
        if missing:
            return {"status": "missing", "detail": "", "missing": missing[:64]}
        line = _last_test_line(e.__traceback__)
        if raised:
            return {"status": "error", "detail": "candidate raised %s" % raised[-1][:200],
                    "missing": []}
        if isinstance(e, AssertionError):
            return {"status": "fail", "detail": "assertion failed (test line %s)" % line,
                    "missing": []}
        return {"status": "fail", "detail": "%s: %s (test line %s)" % (
            type(e).__name__, str(e)[:200], line), "missing": []}
    if missing:
        return {"status": "missing", "detail": "", "missing": missing[:64]}
    return {"status": "pass", "detail": "", "missing": []}


def _child(job, mode, timeout, memory, wfd):
    try:
        resource.setrlimit(resource.RLIMIT_CPU, (int(timeout) + 1, int(timeout) + 2))
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    except (ValueError, OSError):
        pass
    try:
        res = _run_record(job) if mode == "record" else _run_judge(job)
    except BaseException as e:  # noqa: BLE001
        res = {"status": "error", "detail": "%s: %s" % (type(e).__name__, str(e)[:200]),
               "calls": [], "passed": False, "missing": []}
    try:
        data = json.dumps(res).encode()
    except BaseException as e:  # noqa: BLE001
        data = json.dumps({"status": "error", "detail": "unserialisable verdict: %s" % e,
                           "calls": [], "passed": False, "missing": []}).encode()
    while data:
        n = os.write(wfd, data)
        data = data[n:]
    os._exit(0)


def _one(job, mode, timeout, memory):
    r, w = os.pipe()
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _child(job, mode, timeout, memory, w)
    os.close(w)
    chunks, deadline, killed = [], time.monotonic() + timeout, None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            killed = "timeout"
            break
        ready, _, _ = select.select([r], [], [], min(left, 1.0))
        if ready:
            b = os.read(r, 1 << 16)
            if not b:
                break
            chunks.append(b)
    if killed:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if killed:
        return {"status": "timeout", "detail": "test code ran over %.1f s" % timeout,
                "calls": [], "passed": False, "missing": []}
    try:
        return json.loads(b"".join(chunks).decode())
    except ValueError:
        sig = -status if status < 0 else (os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0)
        return {"status": "error", "detail": "judge child died (signal %s, status %s)" % (sig, status),
                "calls": [], "passed": False, "missing": []}


def main():
    with open("/cq/jobs.json", encoding="utf-8") as f:
        spec = json.load(f)
    mode, timeout, memory = spec["mode"], float(spec["timeout"]), int(spec["memory"])
    for job in spec["jobs"]:
        res = _one(job, mode, timeout, memory)
        res["id"] = job["id"]
        sys.stdout.write(json.dumps(res) + "\n")
        sys.stdout.flush()


main()
