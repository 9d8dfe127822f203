"""In-sandbox supervisor of a :class:`cycleqd.sandbox.BwrapSession` (runs INSIDE bubblewrap).

This file is executed by the sandbox's own ``python3 -I -S -c <source>``; it imports only
the standard library and must run on any Python >= 3.8. It reads a session key (first
line), then one JSON request per line on stdin, and writes one reply per line on stdout:
``<HMAC-SHA256(key, json)> <json>``. The host channel (fds 0/1) is never inherited by the
commands it runs and the process marks itself non-dumpable (so commands, which run as the
same sandbox user, cannot read its memory or fds). bwrap's own init (pid 1) does hold the
channel and is reachable through ``/proc/1/fd``: a command may steal or inject lines
there, but without the key it cannot forge a reply the host accepts (the MAC covers the
request id), so such tampering only ends the session (a failed sample).

Requests (``op``):
- ``exec``: run ``argv`` (or, with ``shell``, a bash command in the persistent shell
  state: cwd, variables, exported environment, functions and aliases carried from one
  ``exec`` to the next like an interactive shell), with a timeout and an output cap; the
  command's process group is killed on timeout or when it prints more than the cap.
  Processes it leaves in the background keep running (until the session closes).
- ``spawn``: start a bash command detached in the background (a task's ``start`` script).
- ``ping``: liveness check.
"""

import hashlib
import hmac
import json
import os
import selectors
import signal
import subprocess
import sys
import time

_SKIP_VARS = (
    "BASH BASH_* BASHOPTS BASHPID COLUMNS COMP_* DIRSTACK EPOCHREALTIME EPOCHSECONDS EUID "
    "FUNCNAME GROUPS HISTCMD HOSTTYPE IFS LINENO LINES MACHTYPE OPTERR OPTIND OSTYPE "
    "PIPESTATUS PPID PS4 PWD RANDOM SECONDS SHELLOPTS SHLVL SRANDOM UID _ __cq_* __CQ_*"
)

# The persistent-shell wrapper: restore the state saved by the previous command, run the
# new command with eval, save the state again on exit (EXIT trap) to fd $__CQ_FD.
_WRAPPER = "; ".join([
    "builtin unset __CQ_W",
    "builtin shopt -s expand_aliases",
    'builtin eval "$__CQ_STATE" 2>/dev/null',
    "builtin unset __CQ_STATE",
    'builtin cd -- "$__CQ_CWD" 2>/dev/null || builtin cd /',
    "builtin unset __CQ_CWD",
    "__cq_cmd=$__CQ_CMD",
    "builtin unset __CQ_CMD",
    "__cq_save() { __cq_rc=$?",
    "builtin set +eu",
    "builtin local IFS=$' \\t\\n' __cq_v",
    "{ builtin printf '%s\\0' \"$PWD\"",
    "for __cq_v in $(builtin compgen -v); do case \"$__cq_v\" in @SKIP@) ;; "
    '*) builtin declare -p "$__cq_v" 2>/dev/null ;; esac; done',
    "builtin declare -f",
    'builtin alias -p; } >&"$__CQ_FD" 2>/dev/null',
    'builtin exit "$__cq_rc"; }',
    "builtin trap __cq_save EXIT",
    'builtin eval "$__cq_cmd"',
]).replace("@SKIP@", "|".join(_SKIP_VARS.split()))


def _set_nondumpable():
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 4
    except Exception:
        pass


def _killpg(pid):
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass


def _run(argv, *, stdin, timeout, max_output, merge, cwd, env, want_state):
    """Run argv; returns a dict (rc, stdout, stderr, timed_out, killed, truncated, state)."""
    state_r = state_w = None
    pass_fds = ()
    if want_state:
        state_r, state_w = os.pipe()
        env = dict(env)
        env["__CQ_FD"] = str(state_w)
        pass_fds = (state_w,)
    t0 = time.monotonic()
    try:
        p = subprocess.Popen(
            argv, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT if merge else subprocess.PIPE,
            cwd=cwd, env=env, start_new_session=True, pass_fds=pass_fds, close_fds=True)
    except OSError as e:
        for fd in (state_r, state_w):
            if fd is not None:
                os.close(fd)
        return {"rc": 127, "stdout": "", "stderr": "cannot start %r: %s" % (argv[0], e),
                "timed_out": False, "killed": None, "truncated": False, "state": None}
    if state_w is not None:
        os.close(state_w)
    sel = selectors.DefaultSelector()
    bufs = {"stdout": bytearray(), "stderr": bytearray(), "state": bytearray()}
    sel.register(p.stdout, selectors.EVENT_READ, "stdout")
    if not merge:
        sel.register(p.stderr, selectors.EVENT_READ, "stderr")
    if state_r is not None:
        os.set_blocking(state_r, False)
        sel.register(state_r, selectors.EVENT_READ, "state")
    pending = b""
    if stdin is not None:
        pending = stdin.encode("utf-8", "surrogateescape")
        os.set_blocking(p.stdin.fileno(), False)
        if pending:
            sel.register(p.stdin, selectors.EVENT_WRITE, "stdin")
        else:
            p.stdin.close()
    deadline = t0 + timeout
    timed_out = False
    killed = None
    truncated = False
    exited_at = None
    while True:
        now = time.monotonic()
        if exited_at is None and p.poll() is not None:
            exited_at = now
        if exited_at is not None and now - exited_at > 0.05:
            break  # main process gone; anything still holding the pipes is background
        if not sel.get_map():
            if exited_at is not None or p.poll() is not None:
                break
        if killed is None and now > deadline:
            timed_out, killed = True, "wall_time"
            _killpg(p.pid)
            deadline = now + 1e9
        events = sel.select(timeout=0.02) if sel.get_map() else (time.sleep(0.01) or [])
        for key, _ in events:
            name = key.data
            if name == "stdin":
                try:
                    n = os.write(p.stdin.fileno(), pending[:65536])
                    pending = pending[n:]
                except (BrokenPipeError, OSError):
                    pending = b""
                if not pending:
                    sel.unregister(p.stdin)
                    p.stdin.close()
                continue
            fd = key.fd
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                sel.unregister(key.fileobj)
                continue
            buf = bufs[name]
            if name == "state":
                if len(buf) < (8 << 20):
                    buf += chunk
                continue
            room = max_output - len(buf)
            if len(chunk) > room:
                buf += chunk[:max(room, 0)]
                truncated = True
                if killed is None:
                    killed = "output_limit"
                    _killpg(p.pid)
            else:
                buf += chunk
    if p.poll() is None:
        _killpg(p.pid)
    rc = p.wait()
    for f in (p.stdout, p.stderr, p.stdin):
        if f is not None:
            try:
                f.close()
            except OSError:
                pass
    if state_r is not None:
        os.close(state_r)
    state = None
    if want_state and killed is None and bufs["state"]:
        raw = bytes(bufs["state"])
        cwd_b, _, rest = raw.partition(b"\0")
        state = {"cwd": cwd_b.decode("utf-8", "surrogateescape"),
                 "shell": rest.decode("utf-8", "surrogateescape")}
    return {"rc": rc, "stdout": bufs["stdout"].decode("utf-8", "replace"),
            "stderr": bufs["stderr"].decode("utf-8", "replace"), "timed_out": timed_out,
            "killed": killed, "truncated": truncated, "state": state,
            "wall_s": time.monotonic() - t0}


def main():
    _set_nondumpable()
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    base_env = dict(os.environ)
    shell_cwd = base_env.get("__CQ_START_CWD", "/")
    base_env.pop("__CQ_START_CWD", None)
    shell_state = ""
    background = []
    inp = sys.stdin.buffer
    out = sys.stdout.buffer
    key = bytes.fromhex(inp.readline().decode().strip())  # before any command runs
    while True:
        line = inp.readline()
        if not line:
            return
        try:
            req = json.loads(line)
        except ValueError:
            continue
        background = [b for b in background if b.poll() is None]
        op = req.get("op")
        reply = {"id": req.get("id")}
        if op == "ping":
            reply["ok"] = True
        elif op == "spawn":
            env = dict(base_env)
            env.update(req.get("env") or {})
            try:
                background.append(subprocess.Popen(
                    ["/bin/bash", "-c", req["shell"]], stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    cwd=req.get("cwd") or shell_cwd, env=env, start_new_session=True,
                    close_fds=True))
                reply["ok"] = True
            except OSError as e:
                reply["ok"] = False
                reply["error"] = str(e)
        elif op == "exec":
            env = dict(base_env)
            env.update(req.get("env") or {})
            persist = bool(req.get("persist")) and "shell" in req
            if "shell" in req and persist:
                argv = ["/bin/bash", "--noprofile", "--norc", "-c", 'eval "$__CQ_W"', "bash"]
                env["__CQ_W"] = _WRAPPER
                env["__CQ_CMD"] = req["shell"]
                env["__CQ_STATE"] = shell_state
                env["__CQ_CWD"] = shell_cwd
                cwd = "/"
            elif "shell" in req:
                argv = ["/bin/bash", "-c", req["shell"], "bash"] + list(req.get("args") or [])
                cwd = req.get("cwd") or "/"
            else:
                argv = list(req["argv"])
                cwd = req.get("cwd") or "/"
            res = _run(argv, stdin=req.get("stdin"), timeout=float(req.get("timeout", 30)),
                       max_output=int(req.get("max_output", 65536)),
                       merge=bool(req.get("merge_stderr")), cwd=cwd, env=env,
                       want_state=persist)
            st = res.pop("state")
            if st is not None:
                shell_cwd, shell_state = st["cwd"] or shell_cwd, st["shell"]
            reply.update(res)
        else:
            reply["error"] = "unknown op %r" % (op,)
        body = json.dumps(reply).encode("utf-8")
        out.write(hmac.new(key, body, hashlib.sha256).hexdigest().encode() + b" " + body + b"\n")
        out.flush()


if __name__ == "__main__":
    main()
