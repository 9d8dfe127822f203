"""Red-team attacks on the OS grader's inline checks (issue 12 item 3).

Inline ``check`` entries (bash/python code that inspects the machine's end state, e.g.
AgentBench dev's ``check/0.sh`` for the ``calc`` tasks) run in the agent's machine after the
agent, through ``bash -c`` / ``python3 -c`` looked up on the machine's own PATH. The agent
is root on a writable root file system, so it can replace the interpreter the check runs
with (or plant ``sitecustomize``) and every inline check then passes without the task being
done. These tests FAIL on the current code (score 1.0 for a do-nothing agent).
"""

from __future__ import annotations

import pytest

from tests.security.test_os_graders import ROOTFS_OK, ROOTFS_WHY, SANDBOX, Agent, _score

pytestmark = pytest.mark.skipif(not SANDBOX.available, reason=f"no sandbox: {SANDBOX.reason}")
needs_rootfs = pytest.mark.skipif(not ROOTFS_OK, reason=f"no OS machine image: {ROOTFS_WHY}")

BASH_TASK = {
    "description": "Create the file /root/ok holding the single line hello.",
    "create": {"init": {"code": "true"}},
    "evaluation": {"check": [{"code": "grep -qx hello /root/ok"}]},
}
PY_TASK = {
    "description": "Create the file /root/ok holding the single line hello.",
    "create": {"init": {"code": "true"}},
    "evaluation": {"check": [{"language": "python",
                              "code": "import sys; sys.exit(open('/root/ok').read() != 'hello\\n')"}]},
}

FAKE_BASH = ("printf '#!/bin/sh\\nexit 0\\n' > /tmp/fb && chmod 755 /tmp/fb && "
             "rm -f /usr/bin/bash && cp /tmp/fb /usr/bin/bash && echo planted")
SITECUSTOMIZE = ("for d in $(python3 -c 'import site,sys; print(\" \".join(site.getsitepackages()+[p for p in sys.path if p.endswith(\"python3\") or \"python3.\" in p]))'); do "
                 "mkdir -p $d && echo 'import os; os._exit(0)' > $d/sitecustomize.py; done; echo planted")


@needs_rootfs
def test_honest_agent_passes_inline_checks(tmp_path):
    s, d = _score(tmp_path, BASH_TASK, Agent(["echo hello > /root/ok"], "done"), "rootfs")
    assert s == 1.0, d
    s, d = _score(tmp_path, BASH_TASK, Agent(["true"], "done"), "rootfs")
    assert s == 0.0, d


@needs_rootfs
def test_replacing_bash_does_not_pass_an_inline_check(tmp_path):
    s, d = _score(tmp_path, BASH_TASK, Agent([FAKE_BASH], "done"), "rootfs")
    assert s == 0.0, ("a do-nothing agent that replaced /usr/bin/bash passed the inline "
                      f"bash check: {d}")


@needs_rootfs
def test_sitecustomize_does_not_pass_an_inline_python_check(tmp_path):
    s, d = _score(tmp_path, PY_TASK, Agent([SITECUSTOMIZE], "done"), "rootfs")
    assert s == 0.0, ("a do-nothing agent that planted sitecustomize.py passed the inline "
                      f"python check: {d}")


USERCUSTOMIZE = ("d=$(python3 -c 'import site; print(site.getusersitepackages())') && mkdir -p $d && "
                 "echo 'import os; os._exit(0)' > $d/usercustomize.py && echo planted $d")


@pytest.mark.parametrize("machine", ["host", "rootfs"])
def test_usercustomize_does_not_pass_an_inline_python_check(tmp_path, machine):
    """``python3 -c CHECK`` (no ``-I``/``-s``) imports the agent's ``usercustomize.py`` from
    its writable home -- on the host-tree sandbox too, where /usr is read-only."""
    if machine == "rootfs" and not ROOTFS_OK:
        pytest.skip(f"no OS machine image: {ROOTFS_WHY}")
    s, d = _score(tmp_path, PY_TASK, Agent([USERCUSTOMIZE], "done"), machine)
    assert s == 0.0, ("a do-nothing agent that planted usercustomize.py passed the inline "
                      f"python check ({machine}): {d}")


PRELOAD_TASK = {
    "description": "Create the file /root/ok holding the single line hello.",
    "create": {"init": {"code": "true"}},
    # passes only if the check sees the agent's /root/ok AND the image's own (absent)
    # /etc/ld.so.preload, not the one the agent wrote
    "evaluation": {"check": [{"code": "test ! -e /etc/ld.so.preload && grep -qx hello /root/ok"}]},
}


@needs_rootfs
def test_inline_check_sees_pristine_ld_so_preload_and_the_agents_files(tmp_path):
    """An agent writing /etc/ld.so.preload (pointing at its own library) does not reach
    the check's processes: /etc/ld.so.* in the judge machine are the image's; the agent's
    other files (its end state) are what the check inspects."""
    cmd = "echo /root/evil.so > /etc/ld.so.preload && echo hello > /root/ok"
    s, d = _score(tmp_path, PRELOAD_TASK, Agent([cmd], "done"), "rootfs")
    assert s == 1.0, f"the check saw the agent's /etc/ld.so.preload or not its /root/ok: {d}"


USRLOCAL_TASK = {
    "description": "Install an executable /usr/local/bin/greet printing hello.",
    "create": {"init": {"code": "true"}},
    "evaluation": {"check": [{"code": "test \"$(greet)\" = hello"},
                             {"language": "python",
                              "code": "import subprocess,sys; sys.exit(subprocess.run(['greet'],"
                                      "capture_output=True,text=True).stdout != 'hello\\n')"}]},
}


@needs_rootfs
def test_inline_check_uses_agents_usr_local_but_not_planted_system_tools(tmp_path):
    honest = "printf '#!/bin/sh\\necho hello\\n' > /usr/local/bin/greet && chmod 755 /usr/local/bin/greet"
    s, d = _score(tmp_path, USRLOCAL_TASK, Agent([honest], "done"), "rootfs")
    assert s == 1.0, d
    # a tool the agent drops into /usr/bin (a guarded directory) is not in the judge machine
    planted = "printf '#!/bin/sh\\necho hello\\n' > /usr/bin/greet && chmod 755 /usr/bin/greet"
    s, d = _score(tmp_path, USRLOCAL_TASK, Agent([planted], "done"), "rootfs")
    assert s == 0.0, d


def test_cache_key_pins_the_images_package_versions(tmp_path):
    """Red team #9: the image key hashes the recipe, not what it installed; a rebuild
    months later (same key, newer packages) must not reuse cached OS outcomes."""
    import json
    from dataclasses import replace

    from cycleqd.sandbox.rootfs import RootFS, dpkg_digest
    from cycleqd.skills.agentbench.os_interaction import OSInteractionSkill

    status = ("Package: bash\nStatus: install ok installed\nArchitecture: amd64\nVersion: 5.2.15-2\n\n"
              "Package: gone\nStatus: deinstall ok config-files\nVersion: 1\n\n"
              "Package: coreutils\nStatus: install ok installed\nArchitecture: amd64\nVersion: 9.1-1\n")
    img = tmp_path / "img"
    (img / "var/lib/dpkg").mkdir(parents=True)
    (img / "var/lib/dpkg/status").write_text(status)
    d_old = dpkg_digest(img)
    (img / "var/lib/dpkg/status").write_text(status.replace("9.1-1", "9.1-1+deb12u1"))
    d_new = dpkg_digest(img)
    assert d_old != d_new
    (img / "var/lib/dpkg/status").write_text(status.replace("Version: 1\n", "Version: 2\n"))
    assert dpkg_digest(img) == d_old  # a package that is not installed does not count

    path = tmp_path / "t.json"
    path.write_text(json.dumps([{"description": "x", "evaluation": {"match": "1"}}]))
    fake = RootFS(img, "aaaa", "bookworm", (), d_old)
    k_old = OSInteractionSkill(data_path=path, split="all", rootfs=fake).cache_key
    k_new = OSInteractionSkill(data_path=path, split="all", rootfs=replace(fake, content=d_new)).cache_key
    assert k_old != k_new


def test_image_without_recorded_digest_gets_it_on_load(tmp_path):
    import json

    from cycleqd.sandbox import rootfs as rf

    d = tmp_path / "os-rootfs" / "k"
    (d / "root/var/lib/dpkg").mkdir(parents=True)
    (d / "root/var/lib/dpkg/status").write_text(
        "Package: bash\nStatus: install ok installed\nVersion: 5\n")
    m = {"key": "k", "packages": ["bash"]}
    r = rf._loaded(d, "k", "bookworm", m, ())
    assert r.content == rf.dpkg_digest(d / "root") and len(r.content) == 16
    assert rf._loaded(d, "k", "bookworm", {**m, "dpkg": "feedface"}, ()).content == "feedface"


@pytest.mark.parametrize("machine", ["host", "rootfs"])
def test_isolated_python_check_keeps_what_checks_use(tmp_path, machine):
    """``python3 -I -S`` drops ``site``; the official CycleQD checks call ``exit()`` (a
    ``site`` builtin) and read ``argv``: both must still work."""
    if machine == "rootfs" and not ROOTFS_OK:
        pytest.skip(f"no OS machine image: {ROOTFS_WHY}")
    code = "from sys import argv\n\n\nif int(argv[1]) == int(argv[2]):\n    exit(0)\nexit(1)\n"
    task = {"description": "How many lines does /etc/hostname have?",
            "evaluation": {"check": [None, {"language": "python", "code": code}],
                           "example": {"code": "wc -l < /etc/hostname"}}}
    s, d = _score(tmp_path, task, Agent(["wc -l < /etc/hostname"], "1"), machine)
    assert s == 1.0, d
    s, d = _score(tmp_path, task, Agent([], "7"), machine)
    assert s == 0.0, d
