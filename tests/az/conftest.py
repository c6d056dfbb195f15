"""The az suite: the real az CLI (a cached venv made by scripts/setup-az.sh) against bluebatch.

It reuses the SDK suite's server fixture (tests/sdk/conftest.py: the real binary on port 0 with its
own temporary data directory) and puts a recording proxy (capture.py) between az and the server,
so each test asserts what az printed, what it sent, and the state through the API.

Environment:
  BLUEBATCH_AZ   the az executable (default: what scripts/setup-az.sh prints)
  BLUEBATCH_BIN  the server binary (default: <repo>/target/debug/bluebatch)
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SDK = REPO / "tests" / "sdk"
sys.path.insert(0, str(SDK))
sys.path.insert(0, str(HERE))

_spec = importlib.util.spec_from_file_location("bluebatch_sdk_conftest", SDK / "conftest.py")
_sdk_conftest = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _sdk_conftest
_spec.loader.exec_module(_sdk_conftest)

# The SDK suite's fixtures and failure hook, registered here as this directory's own.
server = _sdk_conftest.server
client = _sdk_conftest.client
pytest_runtest_makereport = _sdk_conftest.pytest_runtest_makereport
# The deadline of each test's setup, body and teardown (a hang fails), as in the SDK suite.
pytest_runtest_setup = _sdk_conftest.pytest_runtest_setup
pytest_runtest_call = _sdk_conftest.pytest_runtest_call
pytest_runtest_teardown = _sdk_conftest.pytest_runtest_teardown
# The skip policy: locally a missing prerequisite skips loudly; under CI=true any skip fails.
require = _sdk_conftest.require
in_ci = _sdk_conftest.in_ci

from capture import CaptureProxy  # noqa: E402

AZ_TIMEOUT = 90


@dataclasses.dataclass
class AzResult:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    exchanges: list  # what az sent and got, from the capture proxy

    @property
    def json(self):
        assert self.stdout.strip(), f"az printed nothing: {self}"
        return json.loads(self.stdout)

    def ok(self) -> "AzResult":
        assert self.returncode == 0, f"az {' '.join(self.argv)} failed (exit {self.returncode}):\n{self.stderr[-3000:]}\nexchanges: {self.brief()}"
        return self

    def brief(self):
        return [(e["method"], e["path"], e["body"], e["status"], e["code"]) for e in self.exchanges]

    def only(self, method: str, path_suffix: str):
        """The one exchange with this method whose path ends with path_suffix."""
        found = [e for e in self.exchanges if e["method"] == method and e["path"].endswith(path_suffix)]
        assert len(found) == 1, f"wanted one {method} …{path_suffix}, saw {self.brief()}"
        return found[0]


def _az_path() -> str:
    given = os.environ.get("BLUEBATCH_AZ")
    if given:
        return given
    out = subprocess.run([str(REPO / "scripts" / "setup-az.sh")], stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        pytest.fail(f"scripts/setup-az.sh could not provide the az CLI:\n{out.stderr[-3000:]}")
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def proxy(server):
    p = CaptureProxy(server.url).start()
    yield p
    p.stop()


@pytest.fixture(scope="session")
def az(server, proxy, tmp_path_factory):
    """az(*args) runs `az <args> -o json` with a deadline against the server (through the proxy)."""
    exe = _az_path()
    config = tmp_path_factory.mktemp("azure-config")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(config),
        "LANG": "C.UTF-8",
        "AZURE_CONFIG_DIR": str(config),
        "AZURE_CORE_COLLECT_TELEMETRY": "no",
        "AZURE_CORE_NO_COLOR": "true",
        "AZURE_BATCH_ACCOUNT": server.account,
        "AZURE_BATCH_ENDPOINT": proxy.url,
        # The key goes through the environment, never argv.
        "AZURE_BATCH_ACCESS_KEY": server.key,
    }

    def run(*args: str, timeout: float = AZ_TIMEOUT) -> AzResult:
        argv = [exe, *args, "-o", "json"]
        mark = proxy.mark()
        try:
            r = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                               timeout=timeout)
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"az {' '.join(args)} did not finish within {timeout}s; sent {proxy.since(mark)}: {e}")
        return AzResult(list(args), r.returncode, r.stdout, r.stderr, proxy.since(mark))

    return run
