"""Accounts set through azure-batch log in over real OpenSSH to the node's remote-login endpoint.

Passwords go to sshpass through the SSHPASS environment variable (`sshpass -e`), never argv.
A refusal is only accepted as such when ssh reached the server and authentication failed
(so a node whose SSH endpoint is down fails these tests instead of passing them).
"""
from __future__ import annotations

import datetime
import os
import re
import shutil
import subprocess

import pytest
from azure.batch import models

from sdkutil import delete_pool_quietly, generate_ssh_key, linux_pool, make_pool, unique, unique_user, utcnow

SSH_TIMEOUT = 30
COMMON_OPTS = [
    "-F", "/dev/null",
    "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "GlobalKnownHostsFile=/dev/null",
    "-o", "ConnectTimeout=5",
    "-o", "LogLevel=ERROR",
    "-o", "NumberOfPasswordPrompts=1",
]


@pytest.fixture(scope="module")
def ssh_tools():
    missing = [t for t in ("ssh", "sshpass", "ssh-keygen") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing tools: {missing} (apt-get install openssh-client sshpass)")


@pytest.fixture(scope="module")
def node(server, ssh_tools):
    client = server.client
    pool_id = unique("ssh")
    node_id = make_pool(client, linux_pool(pool_id, nodes=1), 1)[0].id
    settings = client.get_node_remote_login_settings(pool_id, node_id)
    assert settings.remote_login_ip_address
    assert isinstance(settings.remote_login_port, int)
    yield pool_id, node_id, settings.remote_login_ip_address, settings.remote_login_port
    delete_pool_quietly(client, pool_id)


def _env(extra=None):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C"}
    if extra:
        env.update(extra)
    return env


def ssh_password(ip, port, user, password, command="echo ok"):
    # LogLevel=INFO (after COMMON_OPTS' ERROR: ssh takes the first value, so it goes first) shows
    # "Connection closed by …" when a server with PAM takes the password and then refuses the
    # account (expired): that is a refusal too.
    argv = ["sshpass", "-e", "ssh", "-o", "LogLevel=INFO", *COMMON_OPTS,
            "-o", "PreferredAuthentications=password", "-o", "PubkeyAuthentication=no",
            "-p", str(port), f"{user}@{ip}", command]
    assert password not in argv
    return subprocess.run(argv, env=_env({"SSHPASS": password}), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=SSH_TIMEOUT)


def ssh_key(ip, port, user, key_path, command="echo ok"):
    argv = ["ssh", *COMMON_OPTS, "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
            "-o", "PreferredAuthentications=publickey", "-o", "PasswordAuthentication=no",
            "-i", key_path, "-p", str(port), f"{user}@{ip}", command]
    return subprocess.run(argv, env=_env(), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=SSH_TIMEOUT)


def _describe(r):
    return f"exit {r.returncode}, stdout {r.stdout!r}, stderr {r.stderr!r}"


def assert_login_ok(r):
    assert r.returncode == 0, f"login failed: {_describe(r)}"
    assert r.stdout.strip().splitlines()[-1:] == ["ok"], f"unexpected output: {_describe(r)}"


def assert_password_refused(r):
    # sshpass exits 5 when the password prompt comes back (wrong password); ssh itself prints
    # "Permission denied" when the server allows no (more) password attempts.
    refused = r.returncode == 5 or (r.returncode == 255 and "Permission denied" in r.stderr)
    # A sandboxed node's sshd (PAM) refuses an expired account after the password: it closes.
    refused = refused or (r.returncode == 255 and not r.stdout.strip()
                          and re.search(r"Connection closed by \S+ port \d+", r.stderr) is not None)
    assert refused, f"expected the server to refuse the password: {_describe(r)}"


def assert_key_refused(r):
    assert r.returncode == 255 and "Permission denied" in r.stderr, f"expected the key to be refused: {_describe(r)}"


def test_password_login_then_replace(client, node):
    pool_id, node_id, ip, port = node
    user = unique_user("pw")
    client.create_node_user(pool_id, node_id, models.BatchNodeUserCreateOptions(name=user, password="First-pass-1", is_admin=False))
    try:
        assert_login_ok(ssh_password(ip, port, user, "First-pass-1"))
        assert_password_refused(ssh_password(ip, port, user, "Not-the-pass-1"))

        expiry = utcnow() + datetime.timedelta(days=3)
        client.replace_node_user(pool_id, node_id, user, models.BatchNodeUserReplaceOptions(password="Second-pass-2", expiry_time=expiry))
        assert_login_ok(ssh_password(ip, port, user, "Second-pass-2"))
        assert_password_refused(ssh_password(ip, port, user, "First-pass-1"))
    finally:
        client.delete_node_user(pool_id, node_id, user)


def test_key_only_replace(client, node, tmp_path):
    pool_id, node_id, ip, port = node
    key_path, public_key = generate_ssh_key(tmp_path)
    other_path, _ = generate_ssh_key(tmp_path)
    user = unique_user("key")
    client.create_node_user(pool_id, node_id, models.BatchNodeUserCreateOptions(name=user, password="Key-pass-1"))
    try:
        assert_login_ok(ssh_password(ip, port, user, "Key-pass-1"))
        assert_key_refused(ssh_key(ip, port, user, key_path))

        # Replace with only a key: the key logs in, the password is gone.
        client.replace_node_user(pool_id, node_id, user, models.BatchNodeUserReplaceOptions(ssh_public_key=public_key))
        assert_login_ok(ssh_key(ip, port, user, key_path))
        assert_key_refused(ssh_key(ip, port, user, other_path))
        assert_password_refused(ssh_password(ip, port, user, "Key-pass-1"))

        # Replace with only a password: the key is gone.
        client.replace_node_user(pool_id, node_id, user, models.BatchNodeUserReplaceOptions(password="Key-pass-2"))
        assert_login_ok(ssh_password(ip, port, user, "Key-pass-2"))
        assert_key_refused(ssh_key(ip, port, user, key_path))
    finally:
        client.delete_node_user(pool_id, node_id, user)


def test_create_with_key(client, node, tmp_path):
    pool_id, node_id, ip, port = node
    key_path, public_key = generate_ssh_key(tmp_path)
    user = unique_user("ck")
    client.create_node_user(pool_id, node_id, models.BatchNodeUserCreateOptions(name=user, ssh_public_key=public_key))
    try:
        assert_login_ok(ssh_key(ip, port, user, key_path))
    finally:
        client.delete_node_user(pool_id, node_id, user)


def test_delete_stops_login(client, node, tmp_path):
    pool_id, node_id, ip, port = node
    key_path, public_key = generate_ssh_key(tmp_path)
    user = unique_user("del")
    client.create_node_user(
        pool_id, node_id, models.BatchNodeUserCreateOptions(name=user, password="Del-pass-1", ssh_public_key=public_key)
    )
    assert_login_ok(ssh_password(ip, port, user, "Del-pass-1"))
    assert_login_ok(ssh_key(ip, port, user, key_path))
    client.delete_node_user(pool_id, node_id, user)
    assert_password_refused(ssh_password(ip, port, user, "Del-pass-1"))
    assert_key_refused(ssh_key(ip, port, user, key_path))


def test_past_expiry_stops_login(client, node):
    """The seed's own example sets an expiryTime in the past: 200, and the account cannot log in."""
    pool_id, node_id, ip, port = node
    user = unique_user("exp")
    client.create_node_user(pool_id, node_id, models.BatchNodeUserCreateOptions(name=user, password="Exp-pass-1"))
    try:
        assert_login_ok(ssh_password(ip, port, user, "Exp-pass-1"))
        past = datetime.datetime(2016, 11, 27, 0, 45, 48, tzinfo=datetime.timezone.utc)
        client.replace_node_user(pool_id, node_id, user, models.BatchNodeUserReplaceOptions(password="Exp-pass-2", expiry_time=past))
        assert_password_refused(ssh_password(ip, port, user, "Exp-pass-2"))
    finally:
        client.delete_node_user(pool_id, node_id, user)
