"""The README works as written: its Python block runs as pasted (against the suite's server), and
its seed file starts a server whose pool and user are there and log in over real OpenSSH.

Only the server URL is changed in the Python block (the README's is the default port); the block
runs in its own Python process, as a user's pasted script would, with a deadline.
"""
from __future__ import annotations

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

from conftest import LISTENING, new_client
from sdkutil import wait_nodes
from test_ssh_login import assert_login_ok, assert_password_refused, ssh_password

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
README_URL = "http://127.0.0.1:8521"
SNIPPET_SECONDS = 90
STARTUP_SECONDS = 30


def block_after(heading: str, lang: str) -> str:
    """The first ```lang fenced block after the line `heading` in README.md."""
    text = README.read_text(encoding="utf-8")
    start = text.find("\n" + heading + "\n")
    assert start >= 0, f"README has no heading {heading!r}"
    m = re.compile(r"^```" + re.escape(lang) + r"\n(.*?)^```$", re.S | re.M).search(text, start)
    assert m, f"README has no ```{lang} block after {heading!r}"
    return m.group(1)


def test_readme_python_block_runs_as_pasted(server, tmp_path):
    code = block_after("## Use it from the Python SDK (azure-batch 15.x)", "python")
    assert "…" not in code and "..." not in code, "the block must be complete as a user pastes it"
    assert server.key in code, "the block's key must be the development key, whole"
    assert code.count(README_URL) == 1
    script = tmp_path / "readme_snippet.py"
    script.write_text(code.replace(README_URL, server.url), encoding="utf-8")

    r = subprocess.run([sys.executable, str(script)], cwd=str(tmp_path), stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=SNIPPET_SECONDS)
    assert r.returncode == 0, f"README block failed: exit {r.returncode}\n{r.stdout}\n{r.stderr[-4000:]}"

    # It prints the ssh command; the new password logs in there and the old one is refused.
    m = re.search(r"^ssh -p (\d+) alice@(\S+)\s+# password (\S+)$", r.stdout, re.M)
    assert m, f"unexpected output: {r.stdout!r}"
    port, ip, password = int(m.group(1)), m.group(2), m.group(3)
    assert password == "New-pass-2"
    assert_login_ok(ssh_password(ip, port, "alice", password))
    assert_password_refused(ssh_password(ip, port, "alice", "Old-pass-1"))
    server.client.begin_delete_pool("pool1", polling_interval=1)


def _binary() -> Path:
    return Path(os.environ.get("BLUEBATCH_BIN") or REPO / "target" / "debug" / "bluebatch")


def test_readme_seed_file_starts(tmp_path):
    seed = block_after("## Seed file", "json")
    assert "…" not in seed
    seed_path = tmp_path / "seed.json"
    seed_path.write_text(seed, encoding="utf-8")
    data_dir = tmp_path / "data"
    log_path = tmp_path / "server.log"
    argv = [str(_binary()), "serve", "--port", "0", "--data-dir", str(data_dir), "--seed", str(seed_path)]
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                                cwd=str(tmp_path), start_new_session=True)
        lines: "queue.Queue[str | None]" = queue.Queue()

        def pump():
            for raw in iter(proc.stdout.readline, b""):
                lines.put(raw.decode("utf-8", "replace").rstrip("\r\n"))
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        try:
            url = key = None
            deadline = time.monotonic() + STARTUP_SECONDS
            while url is None or key is None:
                try:
                    line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
                except queue.Empty:
                    line = ""
                if line is None or time.monotonic() > deadline:
                    proc.poll()
                    pytest.fail(f"serve --seed (README's seed) did not start (exit {proc.returncode}):\n"
                                f"{log_path.read_text(errors='replace')[-4000:]}")
                if (m := LISTENING.search(line)):
                    url = m.group(1)
                elif line.startswith("account key:"):
                    key = line.split(":", 1)[1].strip()

            client = new_client(url, "bluebatchdev", key)
            pool = client.get_pool("ci")
            assert pool.target_dedicated_nodes == 2
            nodes = wait_nodes(client, "ci", 2)
            for node in nodes:
                rl = client.get_node_remote_login_settings("ci", node.id)
                assert_login_ok(ssh_password(rl.remote_login_ip_address, rl.remote_login_port, "ci", "Ci-pass-1"))
            client.close()
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
