"""Candidate-side harness of the coding judge (runs INSIDE the candidate's sandbox).

Usage (inside the sandbox): ``python3 -s -B /cq/harness.py MAX_RESULT_BYTES`` with
``/cq/wire.py`` (:mod:`cycleqd.skills.coding.wire`), ``/cq/solution.py`` (setup + the
candidate's code, no tests) and ``/cq/calls.bin`` (``marshal`` data written by the trusted
host: per call, the marshalled ``(function name, args, kwargs)`` -- the inputs only;
expected values and test code are never here). ``marshal`` is only ever *read* here, from
the host; nothing the candidate writes is ever unmarshalled.

It executes the solution once, then calls the tested function on fresh copies of each
input and writes one line per call to the original stdout::

    R <TAB> index <TAB> ok|err|bad <TAB> payload

``ok``: the return value as wire text; ``err``: ``[exception type, message]``; ``bad``: the
value is not plain data or is larger than MAX_RESULT_BYTES. Before it, ``T <TAB> index <TAB>
seconds`` gives the call's wall time (MBPP+'s time limits scale the reference's). The
candidate's own prints go to stderr. Nothing here is trusted: the candidate can rewrite any of it (it runs in this
process), which only lets it choose its outputs -- the verdict is decided elsewhere.
"""

import marshal
import os
import sys
import time


def _emit(fd, i, status, payload):
    data = ("R\t%d\t%s\t%s\n" % (i, status, payload)).encode("utf-8", "backslashreplace")
    while data:
        n = os.write(fd, data)
        data = data[n:]


def _emit_time(fd, i, seconds):
    data = ("T\t%d\t%.6f\n" % (i, seconds)).encode()
    while data:
        n = os.write(fd, data)
        data = data[n:]


def main():
    limit = int(sys.argv[1])
    out = os.dup(1)
    os.dup2(2, 1)  # the candidate's prints go to stderr, not to the results channel
    import wire

    with open("/cq/calls.bin", "rb") as f:
        calls = marshal.loads(f.read())
    with open("/cq/solution.py", encoding="utf-8") as f:
        src = f.read()
    ns = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(src, "solution.py", "exec"), ns)
    except BaseException as e:  # noqa: BLE001 - anything the program does is its failure
        msg = wire.to_text(["LoadError", ("%s: %s" % (type(e).__name__, e))[:300]])
        for i in range(len(calls)):
            _emit(out, i, "err", msg)
        return
    for i, blob in enumerate(calls):
        name, args, kwargs = marshal.loads(blob)  # fresh copies for every call
        try:
            fn = ns.get(name)
            if not callable(fn):
                raise NameError("name %r is not defined" % name)
            t0 = time.perf_counter()
            value = fn(*args, **kwargs)
            _emit_time(out, i, time.perf_counter() - t0)
        except BaseException as e:  # noqa: BLE001
            try:
                text = str(e)[:300]
            except BaseException:  # noqa: BLE001
                text = "?"
            _emit(out, i, "err", wire.to_text([type(e).__name__[:60], text]))
            continue
        try:
            payload = wire.encode_result(value)
        except BaseException as e:  # noqa: BLE001
            _emit(out, i, "bad", wire.to_text(["not plain data: %s" % type(e).__name__, str(e)[:200]]))
            continue
        if len(payload) > limit:
            _emit(out, i, "bad", wire.to_text(["too large", "%d bytes > %d" % (len(payload), limit)]))
            continue
        _emit(out, i, "ok", payload)


main()
