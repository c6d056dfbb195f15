"""Session fixture: start `bluebatch serve` and hand the tests an azure-batch client for it.

Environment:
  BLUEBATCH_BIN       path of the server binary (default: <repo>/target/debug/bluebatch)
  BLUEBATCH_WIRE_LOG  set to 1 to log every request/response body and header (azure-core
                      network trace) into the captured test logs
  BLUEBATCH_SDK_NODES `agents`: the suite's server runs `--nodes agents` and its pools' nodes come
                      from a `bluebatch agent --simulate N` joined with a join token (the node
                      protocol end to end); default `embedded`
                      `sandbox`: `--nodes sandbox` (root): every Linux node a sandboxed machine
                      with a real sshd on port 22 of its own address
  BLUEBATCH_SDK_AGENT_NODES  N for that agent (default 64)
  BLUEBATCH_SDK_STORE `postgres`: two `bluebatch serve --store postgres://… --nodes agents` replicas
                      on a fresh database of the cluster BLUEBATCH_TEST_PG names (dropped at the
                      end), every request of the suite alternating between them through
                      tests/lb/rr_proxy.py, their nodes from a `bluebatch agent --simulate N`
                      polling through the proxy too; default `embedded` (one server)
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from azure.core.credentials import AzureNamedKeyCredential
from azure.batch import BatchClient

REPO = Path(__file__).resolve().parents[2]
STARTUP_SECONDS = 30

LISTENING = re.compile(r"bluebatch listening on (http://127\.0\.0\.1:(\d+))\s*$")


@dataclasses.dataclass
class Server:
    url: str
    account: str
    key: str
    log_path: Path
    client: BatchClient

    def make_client(self, *, account: str | None = None, key: str | None = None, **kwargs) -> BatchClient:
        """A separate client, e.g. with another key or api_version."""
        return new_client(self.url, account or self.account, key or self.key, **kwargs)


def new_client(url: str, account: str, key: str, **kwargs) -> BatchClient:
    if os.environ.get("BLUEBATCH_WIRE_LOG") == "1":
        kwargs.setdefault("logging_enable", True)
    return BatchClient(url, AzureNamedKeyCredential(account, key), **kwargs)


def _binary() -> Path:
    return Path(os.environ.get("BLUEBATCH_BIN") or REPO / "target" / "debug" / "bluebatch")


def _pump(stream, sink, lines: "queue.Queue[str | None]"):
    """Copy the server's stdout to the log file and hand each line to the fixture."""
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", "replace")
        sink.write(line)
        sink.flush()
        lines.put(line.rstrip("\r\n"))
    lines.put(None)


@dataclasses.dataclass
class _Serve:
    """One `bluebatch serve` process of the suite and what its banner said."""
    proc: subprocess.Popen
    pump: threading.Thread
    url: str
    account: str
    key: str


def _launch(argv: list[str], work: Path, log, log_path: Path) -> _Serve:
    """Starts `argv` (a `bluebatch serve`), its stdout and stderr into `log`; waits (at most
    STARTUP_SECONDS) for its URL, account name and key lines."""
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=log,
        cwd=str(work),
        start_new_session=True,
    )
    lines: "queue.Queue[str | None]" = queue.Queue()
    pump = threading.Thread(target=_pump, args=(proc.stdout, log, lines), daemon=True)
    pump.start()
    url = account = key = None
    deadline = time.monotonic() + STARTUP_SECONDS
    try:
        while url is None or account is None or key is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"bluebatch did not announce url/account/key within {STARTUP_SECONDS}s; log: {log_path}")
            try:
                line = lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                proc.wait(timeout=5)
                pytest.fail(
                    f"bluebatch exited (status {proc.returncode}) before it was ready; "
                    f"argv {argv}; log {log_path}:\n{log_path.read_text(errors='replace')[-4000:]}"
                )
            m = LISTENING.search(line)
            if m:
                url = m.group(1)
                continue
            name, sep, value = line.partition(":")
            if not sep:
                continue
            if name.strip() == "account name":
                account = value.strip()
            elif name.strip() == "account key":
                key = value.strip()
    except BaseException:
        _stop(proc)
        raise
    return _Serve(proc=proc, pump=pump, url=url, account=account, key=key)


def _psql(url: str, sql: str) -> None:
    """One SQL statement with psql (Debian's PostgreSQL 15 client) against `url`, at most 30 s."""
    psql = Path(os.environ.get("BLUEBATCH_PG_BIN", "/usr/lib/postgresql/15/bin")) / "psql"
    r = subprocess.run([str(psql) if psql.exists() else "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1",
                        "-d", url, "-c", sql], stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=30)
    if r.returncode != 0:
        pytest.fail(f"psql {sql!r}: {r.stderr.strip()}")


def _with_database(url: str, db: str) -> str:
    """`url` (postgres://…) with its database replaced by `db`, the query string kept."""
    scheme, _, rest = url.partition("://")
    rest, q, query = rest.partition("?")
    authority = rest.split("/", 1)[0]
    return f"{scheme}://{authority}/{db}" + (f"?{query}" if q else "")


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Server:
    if os.environ.get("BLUEBATCH_WIRE_LOG") == "1":
        logging.getLogger("azure").setLevel(logging.DEBUG)

    binary = _binary()
    if not binary.exists():
        pytest.fail(f"bluebatch binary not found at {binary} (build it, or set BLUEBATCH_BIN)")

    work = tmp_path_factory.mktemp("bluebatch")
    data_dir = work / "data"
    data_dir.mkdir()
    log_path = work / "server.log"
    log = open(log_path, "w", encoding="utf-8")
    nodes = os.environ.get("BLUEBATCH_SDK_NODES", "embedded").strip() or "embedded"
    if nodes not in ("embedded", "agents", "sandbox"):
        pytest.fail(f"BLUEBATCH_SDK_NODES={nodes!r}: embedded, agents or sandbox")
    store = os.environ.get("BLUEBATCH_SDK_STORE", "embedded").strip() or "embedded"
    if store not in ("embedded", "postgres"):
        pytest.fail(f"BLUEBATCH_SDK_STORE={store!r}: embedded or postgres")

    serves: list[_Serve] = []
    proxy = agent = None
    db_base = db_name = None
    try:
        if store == "postgres":
            # Two replicas on one fresh database, their nodes from an agent, every request of the
            # suite alternating between them through a round-robin proxy.
            db_base = os.environ.get("BLUEBATCH_TEST_PG", "").strip()
            if not db_base:
                pytest.fail("BLUEBATCH_SDK_STORE=postgres needs BLUEBATCH_TEST_PG (scripts/pg.sh start; "
                            "BLUEBATCH_TEST_PG=$(scripts/pg.sh url))")
            db_name = f"bbsdk_{os.getpid()}"
            _psql(db_base, f"DROP DATABASE IF EXISTS {db_name} WITH (FORCE)")
            _psql(db_base, f"CREATE DATABASE {db_name}")
            db_url = _with_database(db_base, db_name)
            nodes = "agents"
            for i in range(2):
                d = work / f"replica{i}"
                d.mkdir()
                serves.append(_launch([str(binary), "serve", "--port", "0", "--store", db_url,
                                       "--nodes", "agents", "--data-dir", str(d)], work, log, log_path))
            proxy, url = _start_proxy(work, [s.url for s in serves])
            with open(log_path, "a", encoding="utf-8") as l:
                l.write(f"sdk suite: two replicas on PostgreSQL ({' '.join(s.url for s in serves)}) "
                        f"behind {url}\n")
        else:
            argv = [str(binary), "serve", "--port", "0", "--in-memory", "--data-dir", str(data_dir)]
            if nodes in ("agents", "sandbox"):
                argv += ["--nodes", nodes]
            serves.append(_launch(argv, work, log, log_path))
            url = serves[0].url
        account, key = serves[0].account, serves[0].key
        if any((s.account, s.key) != (account, key) for s in serves):
            pytest.fail("the replicas announced different development accounts")

        if nodes == "agents":
            agent = _start_agent(binary, work, url, account, key, log_path)
        client = new_client(url, account, key)
        yield Server(url=url, account=account, key=key, log_path=log_path, client=client)
        client.close()
    finally:
        if agent is not None:
            _stop(agent)
        if proxy is not None:
            _stop(proxy)
        for s in serves:
            _stop(s.proc)
            s.pump.join(timeout=5)
        log.close()
        if db_name is not None:
            _psql(db_base, f"DROP DATABASE IF EXISTS {db_name} WITH (FORCE)")


def _start_proxy(work: Path, upstreams: list[str]):
    """tests/lb/rr_proxy.py in front of `upstreams`; (process, its URL) once it listens."""
    argv = [sys.executable, str(REPO / "tests" / "lb" / "rr_proxy.py"), "--port", "0",
            "--log", str(work / "lb.log")]
    for u in upstreams:
        argv += ["--upstream", u]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=open(work / "lb.err", "w"), cwd=str(work), start_new_session=True)
    found: "queue.Queue[str | None]" = queue.Queue()

    def read():
        for raw in iter(proc.stdout.readline, b""):
            m = re.search(r"rr_proxy listening on (http://\S+)", raw.decode("utf-8", "replace"))
            if m:
                found.put(m.group(1))
        found.put(None)

    threading.Thread(target=read, daemon=True).start()
    try:
        url = found.get(timeout=STARTUP_SECONDS)
    except queue.Empty:
        url = None
    if url is None:
        _stop(proc)
        pytest.fail(f"rr_proxy did not listen within {STARTUP_SECONDS}s: "
                    f"{(work / 'lb.err').read_text(errors='replace')[-2000:]}")
    return proc, url


def _cli(binary: Path, url: str, account: str, key: str, *args: str) -> str:
    """A `bluebatch` client command against the suite's server (key in the environment); its
    stdout. Fails the session when it does not succeed within 20 s."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLUEBATCH_")}
    env.update(BLUEBATCH_URL=url, BLUEBATCH_ACCOUNT=account, BLUEBATCH_KEY=key)
    r = subprocess.run([str(binary), *args], env=env, stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=20)
    if r.returncode != 0:
        pytest.fail(f"bluebatch {' '.join(args)} exited {r.returncode}: {r.stderr}")
    return r.stdout


def _start_agent(binary: Path, work: Path, url: str, account: str, key: str, log_path: Path):
    """`bluebatch agent --simulate N` joined to the server with a join token made by the CLI (the
    operator's flow); returns once the service lists the host as connected."""
    slots = int(os.environ.get("BLUEBATCH_SDK_AGENT_NODES", "64"))
    token_file = work / "join-token"
    token_file.touch(mode=0o600)
    token_file.write_text(_cli(binary, url, account, key, "join-token", "create", "--ttl", "10m"))
    state = work / "agent-state"
    agent_log = open(work / "agent.log", "w", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLUEBATCH_")}
    env["BLUEBATCH_LOG"] = "info,russh=warn"
    proc = subprocess.Popen(
        [str(binary), "agent", "--server", url, "--join-token-file", str(token_file),
         "--state-dir", str(state), "--simulate", str(slots), "--ssh-ports", "18000-19999"],
        env=env, stdin=subprocess.DEVNULL, stdout=agent_log, stderr=subprocess.STDOUT,
        cwd=str(work), start_new_session=True,
    )
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        if proc.poll() is not None:
            pytest.fail(f"bluebatch agent exited ({proc.returncode}) before joining:\n"
                        f"{(work / 'agent.log').read_text(errors='replace')[-4000:]}")
        listed = _cli(binary, url, account, key, "host", "list", "--json")
        value = json.loads(listed)
        hosts = value.get("value", value) if isinstance(value, dict) else value
        if any(h.get("connected") for h in hosts):
            with open(log_path, "a", encoding="utf-8") as log:
                log.write(f"sdk suite: nodes from bluebatch agent --simulate {slots}\n")
            return proc
        if time.monotonic() > deadline:
            _stop(proc)
            pytest.fail(f"bluebatch agent did not connect within {STARTUP_SECONDS}s: {listed}")
        time.sleep(0.2)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def client(server):
    return server.client


def in_ci() -> bool:
    """Whether this is a CI run (`CI` set to anything but empty, `0` or `false`)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false")


def require(present: bool, what: str) -> None:
    """A prerequisite of a test: without it the test is skipped with a loud reason locally, and
    fails under CI (where nothing may be skipped; see the report hook below)."""
    if present:
        return
    if in_ci():
        pytest.fail(f"missing prerequisite: {what} (CI is set: this is a failure, not a skip)")
    pytest.skip(f"SKIPPED: missing {what}; under CI=true this fails")


# Every test (its setup, body and teardown, each) has a deadline, so a hang fails the test
# instead of blocking the run; every wait inside a test has a shorter one of its own.
TEST_DEADLINE = float(os.environ.get("BLUEBATCH_TEST_DEADLINE", "120"))


@contextlib.contextmanager
def _deadline(item, phase: str):
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum, frame):
        pytest.fail(f"{item.nodeid}: {phase} not done within {TEST_DEADLINE:.0f} s (a hang; "
                    "BLUEBATCH_TEST_DEADLINE sets the limit)")

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
    """On failure, attach the tail of the server's log to the report. Under CI a skipped test
    (pytest.skip anywhere, a skip marker) is reported as failed: CI skips nothing."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and in_ci() and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true (a failure there, not a skip): {reason}"
        return
    if report.when == "call" and report.failed:
        srv = item.funcargs.get("server")
        if srv is None:
            return
        try:
            tail = srv.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return
        report.sections.append(("bluebatch server log (tail)", tail))
