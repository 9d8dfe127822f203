"""The OS skill: AgentBench OS-interaction, a multi-turn shell agent (paper sec. 4.1: OS).

Protocol (AgentBench v0.2 ``src/server/tasks/os_interaction/task.py``; prompt wording and
one-shot example verbatim):

1. **Machine**: every episode gets a fresh :class:`cycleqd.sandbox.BwrapSession` on the
   OS machine image (:mod:`cycleqd.sandbox.rootfs`: Debian built once with
   ``mmdebstrap``, read-only, under a per-episode writable overlay; own user namespace
   with real users, so ``useradd``/``su``/``sudo`` work; root has Docker's default
   capabilities; no network; own PID namespace; CPU/memory/process/tmpfs/output limits;
   everything killed at the end; nothing of the host visible). Where the image cannot be
   built or used (not root, no ``mmdebstrap``, no archive), one line says so and the
   host-tree sandbox is used (read-only host ``/usr``, ``/etc``: ~15 % of tasks cannot
   pass there). The task's ``init`` scripts run first, each independently (``bash -c`` /
   ``python3 -c`` at ``/``, as ``docker exec`` does); one that fails (non-zero exit,
   timeout) fails the sample. Then the machine's state is snapshotted for the reference
   (4.), then the ``start``
   script is typed into the agent's shell (its working directory and variables carry
   over, as AgentBench's ``container.execute``).
2. **Conversation**: the instruction, the one-shot example (``ls /etc`` ... ``answer(220)``)
   and "Now, I will start a new problem in a new OS. My problem is: ...".
3. **Turns** (lockstep over all episodes; one batched ``generate`` per turn; at most
   ``max_rounds`` replies): the LAST ``Act:`` line decides -- ``bash``: every ```bash
   block (joined by blank lines) runs in the episode's persistent shell (cwd, variables
   kept; stdout+stderr merged as a terminal shows them) and the output, cut to 780
   characters + "[truncated because the output is too long]" when over 800, is the next
   user message ("The output of the OS is empty." when empty); ``answer(...)``: the text
   between the first "(" and the last ")" is the answer; ``finish``: ends with no
   answer. A reply without a valid action fails the episode.
4. **Judging**: ``match`` compares the answer (stripped) with the expected string or
   regex. A ``check`` chain runs in order with arguments = [answer, outputs of the earlier
   entries...]; every entry must succeed. A ``null`` entry stands for the reference
   (``example``) command, whose output here comes from the machine **as init left it**,
   not as the agent left it: right after ``init`` (before ``start`` and the agent), the
   machine's writable layer is snapshotted and, when the verdict first needs it, the
   reference runs in a second machine started from that snapshot (so ``$RANDOM`` setups keep their values, the reference's
   own side effects never reach the agent's machine, and nothing the agent deletes or
   plants changes it); it gets no arguments (never the answer) and only its stdout
   counts (when ``init`` leaves processes running, which a snapshot cannot hold, the
   reference runs in the agent's machine right after ``init``, before the agent).
   Named checkers (:data:`CHECKERS`: ``integer-match``, ``string-match``,
   ``size-match``, ``containing``, ``in``) compare the answer with the last output and
   fail when no output precedes them. Other entries (inline checks of the end state)
   get the arguments, stdout only, and run with trusted interpreters
   (``/usr/bin/python3 -I -S``, ``/usr/bin/bash --norc --noprofile``, clean environment,
   :func:`_check_argv`) in a *judge machine*: the agent's final writable layer under a
   guard layer that restores the image's system directories
   (:func:`cycleqd.sandbox.rootfs.judge_guard_layer`), so replacing ``bash``, planting
   ``sitecustomize``/``usercustomize`` or writing ``/etc/ld.so.preload`` changes no
   verdict (host-tree sandbox: the agent's machine, read-only host system directories).

Differences from AgentBench (THUDM/AgentBench ``src/server/tasks/os_interaction/task.py``,
also the official CycleQD ``fishfarm/tasks/os_interaction.py``): there the reference
runs after the agent in its container with the answer as ``$1`` and stdout+stderr, and
init exit codes are ignored -- each of these lets an agent (or a broken task) pass
without solving it, which an evolutionary search would exploit. A ``start`` that
switches users (``su``) does not carry the new user into later commands (each command
runs in a fresh bash restoring cwd, variables, functions and aliases). On the
host-tree sandbox the reference runs in the agent's machine before the agent starts.
Score: quality = fraction of tasks passed; sub-score ``<name>_pass`` = quality.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from cycleqd.sandbox import BwrapSession, SandboxLimits
from cycleqd.sandbox.rootfs import RootFS, RootfsUnavailableError, build_rootfs
from cycleqd.registry import SKILLS
from cycleqd.skills.base import SkillResult
from cycleqd.skills.cache import SampleCache
from cycleqd.skills.agentbench import official
from cycleqd.skills.agentbench.data import (OSItem, Script, check_protocol, check_source, load_os,
                                           load_os_official)
from cycleqd.skills.agentbench.episode import Episode, evaluate_cached, run_lockstep

OS_PROMPT = """You are an assistant that will act like a person, I will play the role of linux(ubuntu) operating system. Your goal is to implement the operations required by me or answer to the question proposed by me. For each of your turn, you should first think what you should do, and then take exact one of the three actions: "bash", "finish" or "answer". 

1. If you think you should execute some bash code, take bash action, and you should print like this:

Think: put your thought here.

Act: bash

```bash
# put your bash code here
```

2. If you think you have finished the task, take finish action, and you should print like this:

Think: put your thought here.

Act: finish

3. If you think you have got the answer to the question, take answer action, and you should print like this:

Think: put your thought here.

Act: answer(Your answer to the question should be put in this pair of parentheses)

If the output is too long, I will truncate it. The truncated output is not complete. You have to deal with the truncating problem by yourself. Attention, your bash code should not contain any input operation. Once again, you should take only exact one of the three actions in each turn.

"""

ONE_SHOT = [
    {"role": "user", "content": 'tell me how many files are in the directory "/etc"?'},
    {"role": "assistant", "content": """Think: To count the files in /etc, I need to print all the files in it.

Act: bash

```bash
ls /etc
```"""},
    {"role": "user", "content": "The output of the OS:\ncpi cron.hourly fuse.conf iproute2 lvm networkd-dispatcher protocols "
                                "selinux tmpfiles.d [truncated because the output is too long]"},
    {"role": "assistant", "content": """Think: The output has been truncated because it is too long, so I need to count files by script directly.

Act: bash

```bash
ls -1 /etc | wc -l
```"""},
    {"role": "user", "content": "The output of the OS:\n220"},
    {"role": "assistant", "content": """Think: Now I get the answer, it is 220.

Act: answer(220)"""},
]

#: Judge version (part of :attr:`OSInteractionSkill.cache_key`): 2 = reference from the
#: post-init snapshot, stdout only, failed init fails, checker needs a reference; 3 =
#: inline checks in a judge machine (agent's files, the image's system directories) with
#: trusted interpreters (``/usr/bin/python3 -I -S``, ``/usr/bin/bash --norc --noprofile``,
#: clean environment).
_VERSION = "3"
#: PATH of an inline check: the image's (read-only, guarded) system directories first.
_CHECK_PATH = "/usr/sbin:/usr/bin:/sbin:/bin:/usr/local/sbin:/usr/local/bin"
#: Limits of one episode's machine.
OS_LIMITS = SandboxLimits(cpu_seconds=20, memory_bytes=512 << 20, wall_seconds=10,
                          max_output_bytes=64 << 10, max_processes=96,
                          max_file_bytes=64 << 20, tmpfs_bytes=128 << 20,
                          max_open_files=1 << 20)
# (open files: Docker's default, capped at the evaluator's own hard limit; one official
# task's init writes `echo 123321>/var/x`, which bash reads as a redirection of fd 123321)


# ----------------------------------------------------------------------------- parsing


def extract_action(raw: str) -> dict[str, Any]:
    """AgentBench ``extract_action``: {"thought", "action": "bash"|"commit"|None, "content"}.
    The last ``Act:`` line that parses wins; ``answer(...)`` keeps the text between the
    first "(" and the last ")" of that line."""
    think = re.findall(r"Think:\s*(.+)", raw)
    acts = re.findall(r"Act:\s*(.+)", raw)
    ret: dict[str, Any] = {"thought": "\n".join(think), "action": None, "content": None}
    for act in acts[::-1]:
        low = act.lower()
        if low.startswith("bash"):
            ret["action"] = "bash"
            break
        if low.startswith("finish"):
            ret["action"] = "commit"
            break
        if low.startswith("answer"):
            content = act[6:].strip()
            lp, rp = content.find("("), content.rfind(")")
            if lp == -1 or rp == -1:
                continue
            ret["action"], ret["content"] = "commit", content[lp + 1:rp]
            break
    if ret["action"] == "bash":
        ret["content"] = "\n\n".join(re.findall(r"```bash\n(.*?)\n```", raw, re.DOTALL))
    return ret


def os_observation(output: str) -> str:
    """AgentBench's user message for a command's output."""
    if len(output) > 800:
        output = output[:780] + "\n[truncated because the output is too long]"
    return ("The output of the OS:\n\n" + output) if output else "The output of the OS is empty."


# ----------------------------------------------------------------------------- checkers


def _nl(s: str) -> str:
    return s.replace("\r\n", "\n").replace("\r", "\n").strip()


def integer_match(answer: str, reference: str) -> bool:
    try:
        return int(answer) == int(reference)
    except (TypeError, ValueError):
        return False


def string_match(answer: str, reference: str) -> bool:
    return _nl(answer) == _nl(reference)


_UNITS = {"": 1, "B": 1, "BYTE": 1, "BYTES": 1}
for _i, _u in enumerate("KMGTP", start=1):
    for _suf in (_u, _u + "B", _u + "IB"):
        _UNITS[_suf] = 1024 ** _i


def parse_size(s: str) -> float | None:
    """``4.0K`` / ``12M`` / ``1.5GB`` / ``1024`` -> bytes (powers of 1024, as ``du -h``)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", s or "")
    if not m or m.group(2).upper() not in _UNITS:
        return None
    return float(m.group(1)) * _UNITS[m.group(2).upper()]


def size_match(answer: str, reference: str) -> bool:
    """AgentBench ``size-match`` extended to decimals (``du -h`` prints ``4.0K``, which
    the original ``int()`` parse rejects)."""
    a, b = parse_size(answer), parse_size(reference)
    return a is not None and b is not None and abs(a - b) <= 1e-9 * max(1.0, abs(b))


def containing(answer: str, reference: str) -> bool:
    """The answer contains the reference."""
    return _nl(reference) in _nl(answer)


def in_(answer: str, reference: str) -> bool:
    """The answer is contained in the reference."""
    return _nl(answer) in _nl(reference)


CHECKERS: dict[str, Callable[[str, str], bool]] = {
    "integer-match": integer_match, "string-match": string_match, "size-match": size_match,
    "containing": containing, "in": in_}


# ----------------------------------------------------------------------------- episodes


def _script_argv(script: Script, params: Sequence[str]) -> list[str]:
    if script.language == "python":
        return ["python3", "-c", script.code, *params]
    if script.language == "bash":
        return ["bash", "-c", script.code, *(["--", *params] if params else [])]
    raise ValueError(f"unsupported script language {script.language!r}")


#: ``python3 -I -S -c`` bootstrap of an inline python check: what ``site`` would add and a
#: check may use (``exit``/``quit``; the Debian packages' ``dist-packages``, a system
#: directory) without ``site`` itself (which would run ``.pth`` files of the agent's
#: ``/usr/local``); then the check's code (``argv[1]``, removed so that ``sys.argv`` is
#: ``["-c", *arguments]`` as with ``python3 -c CODE``) runs as ``__main__``.
_PY_CHECK_BOOT = ("import builtins, sys\n"
                  "builtins.exit = builtins.quit = sys.exit\n"
                  "sys.path.append('/usr/lib/python3/dist-packages')\n"
                  "_code = sys.argv.pop(1)\n"
                  "exec(compile(_code, '<string>', 'exec'), "
                  "{'__name__': '__main__', '__builtins__': builtins})\n")


def _check_argv(script: Script, params: Sequence[str]) -> list[str]:
    """argv of an inline check (judge code, run after the agent): interpreters by
    absolute path, isolated from everything the agent can write (``python3 -I -S``: no
    ``PYTHON*`` variables, user site, ``site``/``sitecustomize``/``.pth`` files, or
    current directory on ``sys.path``; ``bash --norc --noprofile``) under a clean
    environment (``env -i``: no ``BASH_ENV``, ``LD_PRELOAD``, ...; PATH = system
    directories first). The same argument convention as :func:`_script_argv`."""
    env = ["/usr/bin/env", "-i", f"PATH={_CHECK_PATH}", "HOME=/root", "USER=root",
           "LOGNAME=root", "SHELL=/bin/bash", "LANG=C.UTF-8", "LC_ALL=C.UTF-8", "TERM=dumb"]
    if script.language == "python":
        return [*env, "/usr/bin/python3", "-I", "-S", "-c", _PY_CHECK_BOOT, script.code, *params]
    if script.language == "bash":
        return [*env, "/usr/bin/bash", "--norc", "--noprofile", "-c", script.code,
                *(["--", *params] if params else [])]
    raise ValueError(f"unsupported script language {script.language!r}")


def _needs_reference(item: OSItem) -> bool:
    return item.check is not None and any(c is None for c in item.check)


def _sweep_stale_snapshots(max_age_s: float = 6 * 3600) -> None:
    """Remove post-init snapshots left on /dev/shm by killed evaluators (each is deleted
    when its episode closes; one older than ``max_age_s`` has no live episode)."""
    import time

    for d in Path("/dev/shm").glob("cycleqd-ref-*"):
        try:
            if time.time() - d.stat().st_mtime > max_age_s:
                shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass


def _snapshot_dir(rootfs: RootFS) -> Path:
    """A fresh host directory for a post-init snapshot: on /dev/shm (a tmpfs, like the
    machine's writable layer, so ``du`` counts the same blocks in the reference machine
    as in the agent's), else beside the image."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(prefix="cycleqd-ref-", dir=shm))
    d = Path(rootfs.path).parent / "snap"
    d.mkdir(exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="ref-", dir=d))


class OSEpisode(Episode):
    """One OS task in its own machine (see the module docstring for the protocol).

    Args:
        item: the task.
        limits: the machine's sandbox limits.
        command_timeout_s: limit of one agent command, seconds.
        setup_timeout_s: limit of each init / reference / check script, seconds.
        one_shot: include AgentBench's one-shot example conversation.
        rootfs: the OS machine image (:func:`cycleqd.sandbox.rootfs.build_rootfs`); None:
            the host-tree sandbox (read-only host ``/usr``, ``/etc``).
        protocol: ``"official"``: the official 7-message problem
            (:func:`cycleqd.skills.agentbench.official.os_problem`, typo "I'will" kept),
            its observation message; a command over ``command_timeout_s`` ends the episode;
            an episode that ends without committing (no valid action, command timeout,
            round limit) is judged with the empty answer ``""``, and ``finish`` with no
            answer (None: a check chain gets ``"None"``), as the official code does.
    """

    def __init__(self, item: OSItem, *, limits: SandboxLimits, command_timeout_s: float,
                 setup_timeout_s: float, one_shot: bool = True,
                 rootfs: RootFS | None = None, protocol: str = "project") -> None:
        self.protocol = protocol
        if protocol == "official":
            msgs = official.os_problem(item.description)
        elif one_shot:
            msgs = [{"role": "user", "content": OS_PROMPT + "Now, my problem is:\n\n"
                     + ONE_SHOT[0]["content"]}] + [dict(m) for m in ONE_SHOT[1:]]
            msgs.append({"role": "user", "content": "Now, I will start a new problem in a new OS. "
                                                    "My problem is:\n\n" + item.description})
        else:
            msgs = [{"role": "user", "content": OS_PROMPT + "Now, my problem is:\n\n"
                     + item.description}]
        super().__init__(item.id, msgs)
        self.item = item
        self.limits = limits
        self.rootfs = rootfs
        self.command_timeout_s, self.setup_timeout_s = command_timeout_s, setup_timeout_s
        self.answer: str | None = None
        self.committed = False
        self.setup_failed: str | None = None
        #: stdout of the reference (``example``) command on the machine as it was right
        #: after ``init`` (None: not needed or not run), and whether it exited 0.
        self.reference: str | None = None
        self.reference_ok = False
        self._snap: Path | None = None  # post-init snapshot, until the reference ran
        self._judge: BwrapSession | None = None  # judge machine (inline checks), lazily
        self._judge_snap: Path | None = None  # the agent's final layer, for it
        self.session = BwrapSession(limits, workdir="/", rootfs=rootfs)

    # -- setup
    def setup(self) -> None:
        """Start the machine; run ``init`` (each script must exit 0, else the sample
        fails, as in AgentBench); compute the reference output on a copy of the
        post-init machine; run ``start`` in the agent's shell. Errors are recorded, not
        raised (a broken task is a failed sample)."""
        self.session.start()
        for k, script in enumerate(self.item.init):
            r = self.session.run(_script_argv(script, []), timeout=self.setup_timeout_s,
                                 merge_stderr=True)
            if not r.ok:
                why = r.killed or f"exit {r.returncode}"
                self._fail_setup(f"init[{k}] failed ({why}): {r.stdout.strip()[-200:]}")
                return
        if _needs_reference(self.item):
            if self.rootfs is None or self._init_left_processes():
                # host-tree sandbox, or processes started by init (a snapshot holds files
                # only): the reference runs now, in this machine, before the agent
                self._run_reference(in_this_machine=True)
            else:
                self._snap = _snapshot_dir(self.rootfs)
                self.session.snapshot(self._snap)  # the reference runs on it when judging
        if self.item.start is not None:
            s = self.item.start
            cmd = s.code if s.language == "bash" else "python3 -c " + shlex.quote(s.code)
            # typed into the agent's shell, as AgentBench does (cwd, variables carry over)
            r = self.session.exec(cmd, timeout=self.setup_timeout_s, merge_stderr=True)
            if r.killed == "sandbox_died":
                self._fail_setup("start killed the machine")

    def _init_left_processes(self) -> bool:
        """Whether ``init`` left processes running (besides the machine's own init and
        supervisor, pids 1 and 2)."""
        r = self.session.run(["/bin/sh", "-c", 'ps -e -o pid=,ppid= | awk -v me=$$ '
                              "'$1 > 2 && $1 != me && $2 != me' | wc -l"], timeout=30)
        return not r.ok or r.stdout.strip() != "0"

    def _drop_snapshot(self) -> None:
        if self._snap is not None:
            shutil.rmtree(self._snap, ignore_errors=True)
            self._snap = None

    def _fail_setup(self, why: str) -> None:
        self.setup_failed = why
        self.detail["end"] = "setup failed"
        self.detail["setup"] = why
        self.done = True

    def _run_reference(self, in_this_machine: bool = False) -> None:
        """The ``example`` command, stdout only, without the agent's answer as argument,
        on the machine as ``init`` left it: with an OS machine image, in a second machine
        started from the snapshot of this one's writable layer taken right after
        ``init`` (so the reference's own side effects stay out of the agent's machine and
        nothing the agent does can change it; run when the verdict first needs it, so
        episodes that never answer cost no second machine). A snapshot holds files, not
        processes: when ``init`` left processes running (e.g. ``sudo -u user sleep &``
        for a "count the user's processes" task), and on the host-tree sandbox, the
        reference runs in this machine at setup, before the agent starts (untouchable by
        the agent; its side effects stay)."""
        ex = self.item.example
        assert ex is not None  # checked at load
        argv = _script_argv(ex, [])
        if in_this_machine:
            r = self.session.run(argv, timeout=self.setup_timeout_s)
        else:
            assert self._snap is not None
            try:
                with BwrapSession(self.limits, workdir="/", rootfs=self.rootfs,
                                  layers=[self._snap]) as ref:
                    r = ref.run(argv, timeout=self.setup_timeout_s)
            finally:
                self._drop_snapshot()
        self.reference, self.reference_ok = r.stdout, r.ok
        self.detail["reference"] = r.stdout[:200]
        if not r.ok:
            self.detail["reference_error"] = (r.killed or f"exit {r.returncode}") + \
                (": " + r.stderr.strip()[-200:] if r.stderr.strip() else "")

    # -- turns
    def step(self, reply: str) -> None:
        act = extract_action(reply)
        if act["action"] is None:
            self.detail["end"] = "no valid action"
            self.done = True
            return
        if act["action"] == "commit":
            self.answer, self.committed = act["content"], True
            self.detail["end"] = "answer" if act["content"] is not None else "finish"
            self.done = True
            return
        r = self.session.exec(act["content"] or "", timeout=self.command_timeout_s,
                              merge_stderr=True)
        if self.protocol == "official" and r.timed_out:
            # official: a turn not done within 5 s ends the episode, answer "" (judged)
            self.detail["end"] = "command timeout"
            self.done = True
            return
        out = r.stdout
        if r.killed == "sandbox_died":
            out = out or "bash: the shell was killed"
        obs = official.os_observation(out) if self.protocol == "official" else os_observation(out)
        self.messages.append({"role": "user", "content": obs})

    # -- verdict
    def judge(self, answer: str | None) -> bool:
        """AgentBench's verdict for ``answer``: ``match`` compares the answer; a ``check``
        chain runs in order with arguments [answer, outputs of earlier entries], where a
        ``null`` entry contributes the reference output computed at setup (never run
        again, never given the answer), named checkers compare the answer with the last
        output (and fail when there is none), and other entries (inline checks of the
        machine's end state) run in the judge machine (:meth:`_judge_machine`) with
        trusted interpreters (:func:`_check_argv`). Every entry must succeed."""
        it = self.item
        if self.setup_failed is not None:
            return False
        if it.match is not None:
            if not isinstance(answer, str):
                return False
            if it.match.get("strip", True):
                answer = answer.strip()
            if "answer" in it.match:
                return answer == it.match["answer"]
            try:
                return re.search(it.match["regex"], answer) is not None
            except re.error:
                return False
        params = [str(answer)]
        for script in it.check or ():
            if script is None:
                if self.reference is None and self._snap is not None:
                    self._run_reference()
                if self.reference is None or not self.reference_ok:
                    return False
                params.append(self.reference)
                continue
            if script.language == "checker":
                fn = CHECKERS.get(script.code)
                if fn is None or len(params) < 2 or not fn(params[0], params[-1]):
                    return False  # a checker with no reference before it compares nothing
                params.append("")
                continue
            judge = self._judge_machine()
            if judge is None:
                return False
            r = judge.run(_check_argv(script, params), timeout=self.setup_timeout_s)
            if not r.ok:
                return False
            params.append(r.stdout)
        return True

    def _judge_machine(self) -> BwrapSession | None:
        """Where inline checks run. With an OS machine image: a second machine made of
        the agent's final writable layer (its end state: files, users, /usr/local, ...)
        under :func:`cycleqd.sandbox.rootfs.judge_guard_layer`, so that every system
        directory (interpreters, tools, libraries, ``/etc/ld.so.*``, ``/etc/python3*``)
        is the untouched image's, whatever the agent replaced or planted; the agent's
        processes are stopped (SIGSTOP, from the host) before its layer is copied and
        are not in the judge machine. On the host-tree sandbox (system directories are
        the host's, read-only): the agent's machine. None: the judge machine could not
        be made (recorded in ``detail``; the sample fails)."""
        if self.rootfs is None:
            return self.session
        if self._judge is not None:
            return self._judge
        from cycleqd.sandbox.rootfs import judge_guard_layer

        try:
            guard = judge_guard_layer(self.rootfs)
            self._stop_agent()
            self._judge_snap = _snapshot_dir(self.rootfs)
            self.session.snapshot(self._judge_snap)
            self._judge = BwrapSession(self.limits, workdir="/", rootfs=self.rootfs,
                                       layers=[guard, self._judge_snap]).start()
        except Exception as e:  # noqa: BLE001 -- one failed sample, with its reason
            self.detail["judge_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            return None
        return self._judge

    def _stop_agent(self) -> None:
        """SIGSTOP every process of the agent's machine (its cgroup), repeated until no
        new one appears, so that nothing changes its layer while the host copies it."""
        sb = getattr(self.session, "_sb", None)
        cg = getattr(sb, "cg", None)
        if cg is None or not cg.active:
            return
        import signal

        stopped: set[int] = set()
        for _ in range(50):
            new = cg.pids() - stopped
            if not new:
                break
            for pid in new:
                try:
                    os.kill(pid, signal.SIGSTOP)
                except OSError:
                    pass
            stopped |= new

    def finish(self) -> None:
        self.detail["answer"] = None if self.answer is None else self.answer[:500]
        if self.setup_failed is not None:
            self.score = 0.0
            return
        if self.protocol == "official":
            # the official code judges every episode: one that ended without committing (no
            # valid action, a command over the limit, the round limit) with ""; ``finish``
            # commits no answer, None, which a check chain receives as "None" (str(None))
            self.detail.setdefault("end", "round limit")
            self.score = 1.0 if self.judge(self.answer if self.committed else "") else 0.0
            return
        if not self.committed:
            self.detail.setdefault("end", "round limit")
            self.score = 0.0
            return
        self.score = 1.0 if self.judge(self.answer) else 0.0

    def close(self) -> None:
        self.session.close()
        if self._judge is not None:
            self._judge.close()
        self._drop_snapshot()
        if self._judge_snap is not None:
            shutil.rmtree(self._judge_snap, ignore_errors=True)
            self._judge_snap = None


def check_args(params: Mapping[str, Any]) -> None:
    """The argument checks of :class:`OSInteractionSkill` that need no data read
    (``machine``, positive ints and timeouts, ``limits``; split, limit and the ``data_path``
    kind through :func:`cycleqd.skills.agentbench.data.check_source`; ``protocol`` and
    ``repeats`` -- official only -- through :func:`~cycleqd.skills.agentbench.data.check_protocol`;
    under ``official`` another value of a parameter it fixes,
    :data:`~cycleqd.skills.agentbench.official.OS_FIXED`, is refused; ``chat_format``). The constructor and
    the registry checker (``cycleqd validate``) both call it. Raises ValueError naming it."""
    machine = params.get("machine", "auto")
    if machine not in ("auto", "rootfs", "host"):
        raise ValueError(f"machine must be 'auto', 'rootfs' or 'host', got {machine!r}")
    for k in ("max_rounds", "max_new_tokens", "episode_batch", "workers"):
        v = params.get(k, 1)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{k} must be a positive int, got {v!r}")
    for k in ("command_timeout_s", "setup_timeout_s"):
        v = params.get(k)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0):
            raise ValueError(f"{k} must be a positive number, got {v!r}")
    if "limits" in params and not isinstance(params["limits"], SandboxLimits):
        raise ValueError(f"limits must be a SandboxLimits, got {type(params['limits']).__name__}")
    repeats = params.get("repeats")
    if repeats is not None and (not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1):
        raise ValueError(f"repeats must be a positive int or None, got {repeats!r}")
    protocol = check_protocol("os", params)
    if protocol == "official":
        official.check_fixed(params, official.OS_FIXED)
    official.check_chat_format(params, protocol)
    if protocol == "project":
        if repeats not in (None, 1):
            raise ValueError(f"repeats applies to protocol 'official' only, got repeats={repeats!r}")
        check_source("os", params.get("data_path"), params.get("split", "search"), params.get("limit"))


@SKILLS.register("os", source="AgentBench OS interaction (Liu et al. 2023); CycleQD paper §4",
                 context=("name", "rootfs", "cache_dir"), paths=("data_path", "script_dir"), checker=check_args)
class OSInteractionSkill:
    """AgentBench OS interaction as a CycleQD skill (see module docstring).

    Args:
        data_path: a folder holding ``os_interaction/`` (or the JSON file) (default:
            the data dir, ``$CYCLEQD_DATA_DIR`` else ``<cache>/data``; ``cycleqd data fetch os``).
        split: ``search`` | ``test`` | ``train`` | ``dev`` | ``all``.
        limit: score only the first ``limit`` tasks of the split.
        name: skill name (prefix of sub-scores).
        max_rounds: model replies per episode (the paper's setting: 5; AgentBench: 8).
        max_new_tokens: generation budget per reply.
        limits: each machine's sandbox limits (``wall_seconds`` is not used: see below).
        command_timeout_s: wall-clock limit of one agent command (None: 10 s; official: 5 s).
        setup_timeout_s: limit of each init / check / example script, seconds (AgentBench has
            none; some tasks' init sleeps 60 s).
        episode_batch: machines alive at once (episodes run in lockstep per batch).
        workers: threads running the episodes' commands between turns.
        script_dir: AgentBench's ``scripts/`` folder, for tasks referring to script files.
        cache: a :class:`SampleCache` or a path to one; None disables caching.
        machine: ``"auto"`` (default: the OS machine image, built once on first use;
            where it cannot be built or used, one line on stderr says why and the
            host-tree sandbox is used -- unless ``$CYCLEQD_REQUIRE_ROOTFS=1``, which makes
            that an error), ``"rootfs"`` (the image or an error) or ``"host"`` (the
            host-tree sandbox: read-only host ``/usr`` and ``/etc``).
        rootfs: a built image (:class:`cycleqd.sandbox.rootfs.RootFS`) to use instead
            of the default one.
        cache_dir: where the image is built/cached (default ``$CYCLEQD_CACHE`` or
            ``~/.cache/cycleqd``).
        protocol: ``"project"`` (default: the splits and settings above) or ``"official"``
            (the official CycleQD protocol: the 110 official search tasks,
            :func:`~cycleqd.skills.agentbench.data.load_os_official`; the official
            7-message problem; ``max_rounds`` 5 and ``command_timeout_s`` 5 s forced (a
            command over it ends the episode, as the official 5 s per-turn limit does); an
            episode that ends without committing judged with ``""``; each task run
            ``repeats`` times, each in a fresh machine, its outcome = the mean, so quality
            = the mean of the repeated evaluations' accuracies; ``split`` must be
            ``search``). Deviations kept: every task runs in the project's Debian machine
            (official: the ``local-os/default`` Ubuntu image) and is judged as under the
            project protocol (reference from the post-init machine, init failures fail).
            ``max_rounds``, ``max_new_tokens``, ``command_timeout_s``, ``stop`` and
            ``one_shot`` are fixed at the official values
            (:data:`~cycleqd.skills.agentbench.official.OS_FIXED`): another value is
            refused, never silently replaced.
        chat_format: ``"model"`` (default: the model's chat template) or
            ``"llama3-official"`` (official protocol only: the official raw LLAMA3 string
            with the double BOS the official code sends to a Llama-3 model).
        repeats: official protocol only: evaluations averaged (default 5, as the official
            code; greedy decoding gives the same replies in every repeat unless the
            machine's state differs, e.g. ``$RANDOM`` in init -- they are run anyway).
            Not fixed by the protocol check: fewer repeats is a documented cost/variance
            trade-off for CPU runs (in the cache key), the default is the official 5.

    Raises:
        ValueError: bad arguments (named), before any data is read.
        RootfsUnavailableError: ``machine="rootfs"`` (or required) and no image.
    """

    def __init__(self, data_path: str | Path | None = None, split: str = "search",
                 limit: int | None = None, *, name: str = "os", max_rounds: int = 5,
                 max_new_tokens: int = 512, limits: SandboxLimits = OS_LIMITS,
                 command_timeout_s: float | None = None, setup_timeout_s: float = 120.0,
                 episode_batch: int = 16, workers: int = 4, one_shot: bool = True,
                 stop: Sequence[str] = (), script_dir: str | Path | None = None,
                 cache: SampleCache | str | Path | None = None, machine: str = "auto",
                 rootfs: RootFS | None = None, cache_dir: str | Path | None = None,
                 protocol: str = "project", repeats: int | None = None,
                 chat_format: str = "model") -> None:
        check_args(dict(machine=machine, max_rounds=max_rounds, max_new_tokens=max_new_tokens,
                        episode_batch=episode_batch, workers=workers, command_timeout_s=command_timeout_s,
                        setup_timeout_s=setup_timeout_s, limits=limits, split=split, stop=stop,
                        one_shot=one_shot, limit=limit, protocol=protocol, repeats=repeats,
                        chat_format=chat_format))   # data_path: resolved by the loader
        self.protocol, self.chat_format = protocol, chat_format or "model"
        self.repeats = 1
        if command_timeout_s is None:
            command_timeout_s = 10.0
        if protocol == "official":
            max_rounds, command_timeout_s = official.OS_MAX_ROUND, official.OS_COMMAND_TIMEOUT_S
            self.repeats = official.OS_REPEATS if repeats is None else repeats
            self.items: list[OSItem] = load_os_official(data_path, limit)
        else:
            self.items = load_os(data_path, split, limit, script_dir=script_dir)
        if not self.items:
            raise ValueError(f"OS split {split!r} has no items")
        self.name, self.split = name, split
        self.max_rounds, self.max_new_tokens = max_rounds, max_new_tokens
        self.limits = limits
        self.command_timeout_s, self.setup_timeout_s = float(command_timeout_s), float(setup_timeout_s)
        self.episode_batch, self.workers, self.one_shot = episode_batch, workers, one_shot
        self.stop = tuple(stop)
        self.cache = SampleCache(cache) if isinstance(cache, (str, Path)) else cache
        self.last_details: dict[str, dict[str, Any]] = {}
        self.rootfs: RootFS | None = rootfs if machine != "host" else None
        if machine != "host" and rootfs is None:
            try:
                self.rootfs = build_rootfs(cache_dir, log=lambda m: print(m, file=sys.stderr))
            except RootfsUnavailableError as e:
                if machine == "rootfs" or os.environ.get("CYCLEQD_REQUIRE_ROOTFS") == "1":
                    raise
                print(f"cycleqd OS skill: no OS machine image ({e}); using the host-tree "
                      f"sandbox (read-only /usr, /etc: ~15 % of tasks cannot pass)",
                      file=sys.stderr)
        if self.rootfs is not None:
            _sweep_stale_snapshots()

    @property
    def cache_key(self) -> str:
        cfg = {"v": _VERSION, "prompt": OS_PROMPT, "one_shot": ONE_SHOT if self.one_shot else None,
               "rounds": self.max_rounds, "tok": self.max_new_tokens, "stop": list(self.stop),
               "cmd_t": self.command_timeout_s, "setup_t": self.setup_timeout_s,
               "limits": dataclasses.asdict(self.limits),  # every limit: output caps reach the model
               "machine": (f"rootfs:{self.rootfs.key}:{self.rootfs.content}"  # recipe + package versions
                           if self.rootfs is not None else "host")}
        if self.protocol != "project":  # absent for the default: its keys stay as they were
            cfg["protocol"], cfg["repeats"] = self.protocol, self.repeats
        if self.chat_format != "model":
            cfg["chat_format"] = self.chat_format
        return "os/" + hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]

    def _episode(self, item: OSItem) -> OSEpisode:
        return OSEpisode(item, limits=self.limits, command_timeout_s=self.command_timeout_s,
                         setup_timeout_s=self.setup_timeout_s, one_shot=self.one_shot,
                         rootfs=self.rootfs, protocol=self.protocol)

    def run_episodes(self, items: Sequence[OSItem], generate) -> dict[str, OSEpisode]:
        """Run ``items`` with ``generate(conversations) -> replies``; finished episodes.
        With ``repeats`` > 1 (official protocol) every item runs that many times, each in a
        fresh machine: the returned episode is the last repeat's, its ``score`` the mean
        over the repeats, ``detail["repeat_scores"]`` each repeat's score (an evaluator
        failure in any repeat marks the item ``evaluator_error``: not cached)."""
        generate = official.render_for(self.chat_format, generate)
        if self.repeats == 1:
            return self._run_once(items, generate)
        scores: dict[str, list[float]] = {}
        failed: set[str] = set()
        last: dict[str, OSEpisode] = {}
        for _ in range(self.repeats):
            for sid, ep in self._run_once(items, generate).items():
                scores.setdefault(sid, []).append(ep.score)
                if ep.detail.get("evaluator_error"):
                    failed.add(sid)
                last[sid] = ep
        for sid, ep in last.items():
            ep.score = sum(scores[sid]) / len(scores[sid])
            ep.detail["repeat_scores"] = scores[sid]
            if sid in failed:
                ep.detail["evaluator_error"] = True
        return last

    def _run_once(self, items: Sequence[OSItem], generate) -> dict[str, OSEpisode]:
        from concurrent.futures import ThreadPoolExecutor

        done: dict[str, OSEpisode] = {}
        for s in range(0, len(items), self.episode_batch):
            eps = [self._episode(it) for it in items[s:s + self.episode_batch]]
            try:
                def _setup(ep: OSEpisode) -> None:
                    try:
                        ep.setup()
                    except Exception as e:  # noqa: BLE001 - no machine = failed sample
                        ep.detail["error"] = f"setup: {type(e).__name__}: {e}"
                        ep.detail["evaluator_error"] = True   # the evaluator failed: not cached
                        ep.done = True

                with ThreadPoolExecutor(max_workers=self.workers) as pool:
                    list(pool.map(_setup, eps))
                run_lockstep(eps, generate, max_turns=self.max_rounds, workers=self.workers)
            finally:
                for ep in eps:
                    ep.close()
            done.update({ep.sample_id: ep for ep in eps})
        return done

    def evaluate(self, model: Any) -> SkillResult:
        """Score a :class:`~cycleqd.inference.base.GenerationBackend` (greedy). Cached
        outcomes (same ``model.fingerprint`` and :attr:`cache_key`) are reused."""
        outcomes = evaluate_cached(self, model)
        q = sum(outcomes.values()) / len(outcomes)
        return SkillResult(quality=q, outcomes=outcomes, subscores={f"{self.name}_pass": q})


__all__ = ["OSInteractionSkill", "OSEpisode", "OS_PROMPT", "ONE_SHOT", "OS_LIMITS", "CHECKERS",
           "extract_action", "os_observation", "integer_match", "string_match", "size_match",
           "containing", "in_", "parse_size"]
