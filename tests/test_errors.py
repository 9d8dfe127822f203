"""One error family (issue 16 item 4): CycleQDError, MissingDependencyError with the extra."""

from __future__ import annotations

import pytest

from cycleqd.cli import main
from cycleqd.config import ConfigError
from cycleqd.engine.rundir import RunDirError
from cycleqd.errors import CycleQDError, MissingDependencyError, require
from cycleqd.datasets.fetch import ChecksumError, DataError, DataMissingError
from cycleqd.models.sources import ModelLoadError
from cycleqd.registry import ConfigError as RegistryConfigError
from cycleqd.sandbox.limits import SandboxUnavailableError


def test_user_errors_share_one_base_and_keep_their_old_ones():
    for cls in (ConfigError, RunDirError, ModelLoadError):
        assert issubclass(cls, CycleQDError) and issubclass(cls, ValueError)
    assert issubclass(MissingDependencyError, ImportError)
    assert RegistryConfigError is ConfigError      # one class: registry and config raise the same
    for cls in (DataError, DataMissingError, ChecksumError, SandboxUnavailableError):
        assert issubclass(cls, CycleQDError) and issubclass(cls, RuntimeError)
    assert issubclass(DataMissingError, FileNotFoundError)


@pytest.mark.parametrize("module, extra, pkg", [("ray", "ray", "ray[default]"), ("vllm", "vllm", "vllm"),
                                                ("lm_eval", "lmeval", "lm-eval"),
                                                ("pymysql", "mariadb", "pymysql")])
def test_missing_dependency_names_the_extra(module, extra, pkg):
    msg = str(MissingDependencyError(module, "the feature"))
    assert msg == f"the feature needs {pkg}: pip install 'cycleqd[{extra}]' (or pip install '{pkg}')"


def test_require_imports_or_raises_missing_dependency():
    import json

    assert require("json", "x") is json
    with pytest.raises(MissingDependencyError, match=r"^the probe needs no_such_pkg_zz: pip install") as e:
        require("no_such_pkg_zz", "the probe")
    assert isinstance(e.value, ImportError) and e.value.name == "no_such_pkg_zz"


def test_cli_prints_a_cycleqd_error_as_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path} is not a cycleqd run directory (no config.yaml)\n"


def test_preference_hub_and_table_errors_are_cycleqd_errors():
    """Errors a user's input can cause in selection, hub pushes and DB tables join the family;
    the sandbox wire format's WireError and NonFiniteScore stay internal (a failed sample, a
    rejected child), and DiskFullError keeps its own message and exit code (OSError)."""
    from cycleqd._io import DiskFullError
    from cycleqd.engine.elites import PreferenceError
    from cycleqd.engine.export import HubPushError
    from cycleqd.sandbox.sql.base import TableBuildError

    for cls, old in ((PreferenceError, ValueError), (HubPushError, RuntimeError), (TableBuildError, ValueError)):
        assert issubclass(cls, CycleQDError) and issubclass(cls, old)
    assert not issubclass(DiskFullError, CycleQDError) and issubclass(DiskFullError, OSError)
