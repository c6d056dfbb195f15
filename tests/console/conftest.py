"""Fixtures of the console's browser tests: a `bluebatch serve` of the suite, signed API requests
to it (Shared Key, written here), and headless Chromium from Debian's packages driven by Selenium.

Environment:
  BLUEBATCH_BIN   path of the server binary (default: <repo>/target/debug/bluebatch)
  CHROMIUM        the browser (default /usr/bin/chromium)
  CHROMEDRIVER    its driver (default /usr/bin/chromedriver); no browser or driver is downloaded
  BLUEBATCH_TEST_DEADLINE  seconds each test (setup, body, teardown) may take (default 120)
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import hashlib
import hmac
import json
import os
import queue
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

REPO = Path(__file__).resolve().parents[2]
# Where the screenshots go: BLUEBATCH_CONSOLE_SHOTS=docs/console refreshes the ones docs/console.md
# shows; by default they go under the temporary directory, so a test run leaves the tree unchanged.
# (A relative BLUEBATCH_CONSOLE_SHOTS is taken from the repository's top.)
SHOTS = (
    REPO / os.environ["BLUEBATCH_CONSOLE_SHOTS"]
    if os.environ.get("BLUEBATCH_CONSOLE_SHOTS")
    else Path(os.environ.get("TMPDIR", "/tmp")) / "bluebatch-console-shots"
)
STARTUP_SECONDS = 30
API_VERSION = "2023-11-01.18.0"
NODE_STEP_MS = 1000
LISTENING = re.compile(r"bluebatch listening on (http://127\.0\.0\.1:(\d+))\s*$")
SIGNED = ["content-encoding", "content-language", "content-length", "content-md5",
          "content-type", "date", "if-modified-since", "if-match", "if-none-match",
          "if-unmodified-since", "range"]
LINUX_POOL = {
    "vmSize": "STANDARD_D2S_V3",
    "virtualMachineConfiguration": {
        "imageReference": {"publisher": "Canonical", "offer": "0001-com-ubuntu-server-jammy",
                           "sku": "22_04-lts"},
        "nodeAgentSKUId": "batch.node.ubuntu 22.04"},
}


@dataclasses.dataclass
class Server:
    url: str
    account: str
    key: str
    log_path: Path

    @property
    def console(self) -> str:
        return f"{self.url}/_bluebatch/console"

    def api(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict | None]:
        """A Shared Key signed request of the Batch API: (status, JSON body or None); 20 s."""
        data = b"" if body is None else json.dumps(body).encode()
        headers = {"ocp-date": datetime.datetime.now(datetime.timezone.utc)
                   .strftime("%a, %d %b %Y %H:%M:%S GMT")}
        if body is not None:
            headers["content-type"] = "application/json; odata=minimalmetadata"
            headers["content-length"] = str(len(data))
        sts = "\n".join([method] + [headers.get(h, "") for h in SIGNED]) + "\n"
        sts += f"ocp-date:{headers['ocp-date']}\n/{self.account}{path}\napi-version:{API_VERSION}"
        sig = base64.b64encode(hmac.new(base64.b64decode(self.key), sts.encode(),
                                        hashlib.sha256).digest()).decode()
        headers["authorization"] = f"SharedKey {self.account}:{sig}"
        req = urllib.request.Request(f"{self.url}{path}?api-version={API_VERSION}",
                                     data=data if body is not None else None,
                                     headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=20) as r:
                raw = r.read()
                return r.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as e:
            raw = e.read()
            return e.code, json.loads(raw) if raw else None

    def create_pool(self, pool: str, nodes: int = 1) -> None:
        status, body = self.api("POST", "/pools", {"id": pool, "targetDedicatedNodes": nodes,
                                                   **LINUX_POOL})
        assert status == 201, body

    def nodes(self, pool: str) -> list[dict]:
        status, body = self.api("GET", f"/pools/{pool}/nodes")
        assert status == 200, body
        return body["value"]

    def ready_pool(self, pool: str, nodes: int = 1, timeout: float = 30) -> list[str]:
        """Creates a Linux pool and waits (bounded) until its nodes are idle; their ids."""
        self.create_pool(pool, nodes)
        deadline = time.monotonic() + timeout
        while True:
            got = self.nodes(pool)
            if len(got) == nodes and all(n["state"] == "idle" for n in got):
                return [n["id"] for n in got]
            assert time.monotonic() < deadline, f"nodes of {pool} never idle: {got}"
            time.sleep(0.1)


def _binary() -> Path:
    return Path(os.environ.get("BLUEBATCH_BIN") or REPO / "target" / "debug" / "bluebatch")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Server:
    binary = _binary()
    if not binary.exists():
        pytest.fail(f"bluebatch binary not found at {binary} (build it, or set BLUEBATCH_BIN)")
    work = tmp_path_factory.mktemp("bluebatch")
    (work / "data").mkdir()
    log_path = work / "server.log"
    log = open(log_path, "w", encoding="utf-8")
    # Node state changes slowed to NODE_STEP_MS, so a page can be seen following an allocation.
    argv = [str(binary), "serve", "--port", "0", "--in-memory", "--data-dir", str(work / "data"),
            "--node-step-ms", str(NODE_STEP_MS)]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                            cwd=str(work), start_new_session=True)
    lines: "queue.Queue[str | None]" = queue.Queue()

    def pump():
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace")
            log.write(line)
            log.flush()
            lines.put(line.rstrip("\r\n"))
        lines.put(None)

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    url = account = key = None
    deadline = time.monotonic() + STARTUP_SECONDS
    try:
        while url is None or account is None or key is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"bluebatch did not announce url/account/key in {STARTUP_SECONDS}s")
            try:
                line = lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                pytest.fail(f"bluebatch exited before it was ready: {log_path.read_text()[-4000:]}")
            m = LISTENING.search(line)
            if m:
                url = m.group(1)
                continue
            name, sep, value = line.partition(":")
            if sep and name.strip() == "account name":
                account = value.strip()
            elif sep and name.strip() == "account key":
                key = value.strip()
        yield Server(url=url, account=account, key=key, log_path=log_path)
    finally:
        _stop(proc)
        t.join(timeout=5)
        log.close()


def new_browser(width: int = 1280, height: int = 800) -> webdriver.Chrome:
    """Headless Chromium from the system's packages; the page's viewport width x height."""
    options = webdriver.ChromeOptions()
    options.binary_location = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--no-first-run", "--disable-extensions", f"--window-size={width},{height}"):
        options.add_argument(arg)
    service = Service(os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(10)
    # The viewport (what a screenshot holds) exactly width x height.
    inner = driver.execute_script("return [window.innerWidth, window.innerHeight]")
    if inner != [width, height]:
        rect = driver.get_window_size()
        driver.set_window_size(rect["width"] + width - inner[0], rect["height"] + height - inner[1])
    return driver


@pytest.fixture
def browser():
    driver = new_browser()
    try:
        yield driver
    finally:
        driver.quit()


def shot(driver, name: str) -> Path:
    """Saves the viewport as SHOTS/<name>.png (overwriting)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    assert driver.save_screenshot(str(path)), path
    return path


# Every test (its setup, body and teardown, each) has a deadline, so a hang fails the test.
TEST_DEADLINE = float(os.environ.get("BLUEBATCH_TEST_DEADLINE", "120"))


@contextlib.contextmanager
def _deadline(item, phase: str):
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum, frame):
        pytest.fail(f"{item.nodeid}: {phase} not done within {TEST_DEADLINE:.0f} s (a hang)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, TEST_DEADLINE)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    with _deadline(item, "setup"):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    with _deadline(item, "the test"):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    with _deadline(item, "teardown"):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On failure, attach the tail of the server's log to the report."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        srv = item.funcargs.get("server")
        if srv is not None:
            with contextlib.suppress(OSError):
                report.sections.append(("bluebatch server log (tail)",
                                        srv.log_path.read_text(errors="replace")[-6000:]))
