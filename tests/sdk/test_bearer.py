"""azure-batch 15.1.0 (unmodified) with a token credential, over HTTPS.

The server runs with `--tls` (a certificate generated into its data directory) and an accounts
file whose "bearer" section takes HS256 tokens from `bluebatch token`. The client trusts the
certificate through the exact variable the server prints (REQUESTS_CA_BUNDLE).
"""
from __future__ import annotations

import datetime
import json
import os
import queue
import re
import signal
import subprocess
import threading
import time

import pytest
from azure.core.credentials import AccessToken, AzureNamedKeyCredential
from azure.core.exceptions import ClientAuthenticationError, ResourceNotFoundError
from azure.batch import BatchClient, models

from conftest import STARTUP_SECONDS, _binary, _pump
from sdkutil import (
    assert_batch_error,
    error_values,
    generate_ssh_key,
    linux_pool,
    unique,
    unique_user,
    utcnow,
    wait_nodes,
)

TENANT = "72f988bf-0000-4000-8000-2d7cd011db47"
SECRET_VAR = "BLUEBATCH_SDK_TEST_TOKEN_SECRET"
SECRET = "sdk-test-secret-" + "0123456789abcdef" * 3
ALPHA_KEY = "YWxwaGEtc2RrLXRlc3Qta2V5LTAxMjM0NTY3ODk="
BETA_KEY = "YmV0YS1zZGstdGVzdC1rZXktMDEyMzQ1Njc4OQ=="


class BlueBatchToken:
    """A TokenCredential (azure-core protocol) whose tokens come from `bluebatch token`."""

    def __init__(self, tls, account: str | None = None, extra: list[str] | None = None):
        self.tls = tls
        self.account = account
        self.extra = extra or []
        self.scopes: list[tuple[str, ...]] = []

    def get_token(self, *scopes, claims=None, tenant_id=None, enable_cae=False, **kwargs) -> AccessToken:
        self.scopes.append(scopes)
        argv = [str(_binary()), "token", "--accounts-file", str(self.tls.accounts_file), *self.extra]
        if self.account:
            argv += ["--account", self.account]
        env = dict(os.environ, **{SECRET_VAR: SECRET})
        out = subprocess.run(argv, check=True, capture_output=True, env=env, timeout=30)
        return AccessToken(out.stdout.decode().strip(), int(time.time()) + 3600)


class StaticToken:
    def __init__(self, token: str):
        self.token = token

    def get_token(self, *scopes, **kwargs) -> AccessToken:
        return AccessToken(self.token, int(time.time()) + 3600)


class TlsServer:
    def __init__(self, url, https, ca, accounts_file, log_path):
        self.url, self.https, self.ca, self.accounts_file, self.log_path = url, https, ca, accounts_file, log_path


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    binary = _binary()
    if not binary.exists():
        pytest.fail(f"bluebatch binary not found at {binary} (build it, or set BLUEBATCH_BIN)")
    work = tmp_path_factory.mktemp("bluebatch-tls")
    accounts_file = work / "accounts.json"
    accounts_file.write_text(json.dumps({
        "accounts": [{"name": "alpha", "keys": [ALPHA_KEY]}, {"name": "beta", "keys": [BETA_KEY]}],
        "bearer": {"tenants": [{"id": TENANT, "account": "alpha"}], "hs256SecretEnv": SECRET_VAR},
    }))
    log_path = work / "server.log"
    log = open(log_path, "w", encoding="utf-8")
    argv = [str(binary), "serve", "--port", "0", "--tls", "--tls-port", "0", "--node-step-ms", "20",
            "--data-dir", str(work / "data"), "--accounts-file", str(accounts_file)]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, cwd=str(work),
                            env=dict(os.environ, **{SECRET_VAR: SECRET}), start_new_session=True)
    lines: "queue.Queue[str | None]" = queue.Queue()
    pump = threading.Thread(target=_pump, args=(proc.stdout, log, lines), daemon=True)
    pump.start()
    url = https = ca = None
    deadline = time.monotonic() + STARTUP_SECONDS
    try:
        while url is None or https is None or ca is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"bluebatch did not announce its URLs and CA within {STARTUP_SECONDS}s; log: {log_path}")
            try:
                line = lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                proc.wait(timeout=5)
                pytest.fail(f"bluebatch exited (status {proc.returncode}); log:\n{log_path.read_text(errors='replace')}")
            if m := re.search(r"bluebatch listening on (https?://\S+)$", line):
                if m.group(1).startswith("https://"):
                    https = m.group(1)
                else:
                    url = m.group(1)
            elif m := re.search(r"export REQUESTS_CA_BUNDLE=(\S+)$", line):
                ca = m.group(1)
        yield TlsServer(url, https, ca, accounts_file, log_path)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        pump.join(timeout=5)
        log.close()


@pytest.fixture
def trusted(tls, monkeypatch):
    """Trust the generated certificate exactly as the server's start-up lines say."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", tls.ca)
    return tls


def test_user_flow_with_a_token_over_https(trusted, tmp_path):
    credential = BlueBatchToken(trusted)
    client = BatchClient(trusted.https, credential)
    pool_id = unique("bearer")
    _, public_key = generate_ssh_key(tmp_path)
    client.create_pool(linux_pool(pool_id, nodes=1))
    try:
        pool = client.get_pool(pool_id)
        assert pool.url == f"{trusted.https}/pools/{pool_id}"
        node_id = wait_nodes(client, pool_id, 1)[0].id
        user = unique_user("tok")
        client.create_node_user(pool_id, node_id, models.BatchNodeUserCreateOptions(name=user, password="Tok-pass-1"))
        expiry = (utcnow() + datetime.timedelta(days=2)).replace(microsecond=0)
        client.replace_node_user(
            pool_id, node_id, user, models.BatchNodeUserReplaceOptions(password="Tok-pass-2", expiry_time=expiry)
        )
        client.replace_node_user(pool_id, node_id, user, models.BatchNodeUserReplaceOptions(ssh_public_key=public_key))
        # The token's tenant maps to alpha: alpha's Shared Key (over HTTPS too) sees the same pool.
        shared = BatchClient(trusted.https, AzureNamedKeyCredential("alpha", ALPHA_KEY))
        assert shared.get_pool(pool_id).id == pool_id
        # beta, by token or by key, does not.
        for other in (
            BatchClient(trusted.https, BlueBatchToken(trusted, account="beta")),
            BatchClient(trusted.https, AzureNamedKeyCredential("beta", BETA_KEY)),
        ):
            with pytest.raises(ResourceNotFoundError) as ei:
                other.replace_node_user(pool_id, node_id, user, models.BatchNodeUserReplaceOptions(password="x-1"))
            assert_batch_error(ei, 404, "PoolNotFound")
            assert pool_id not in {p.id for p in other.list_pools()}
    finally:
        client.begin_delete_pool(pool_id, polling_interval=1)
    # The SDK asked for Batch's scope.
    assert credential.scopes and all(s == ("https://batch.core.windows.net//.default",) for s in credential.scopes)


def test_refused_token(trusted):
    wrong_audience = BlueBatchToken(trusted, extra=["--audience", "https://management.azure.com/"])
    for credential, detail in ((wrong_audience, "audience"), (StaticToken("a.b.c"), "base64url")):
        client = BatchClient(trusted.https, credential)
        with pytest.raises(ClientAuthenticationError) as ei:
            client.get_pool("whatever")
        assert_batch_error(ei, 401, "AuthenticationFailed")
        challenge = ei.value.response.headers.get("WWW-Authenticate", "")
        assert challenge.startswith('Bearer authorization_uri="https://login.microsoftonline.com/'), challenge
        assert 'error="invalid_token"' in challenge
        assert detail in error_values(ei.value).get("AuthenticationErrorDetail", "")


def test_untrusted_certificate_is_refused(tls, monkeypatch):
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    client = BatchClient(tls.https, StaticToken("a.b.c"))
    with pytest.raises(Exception) as ei:
        client.get_pool("whatever")
    assert "CERTIFICATE_VERIFY_FAILED" in repr(ei.value) or "SSL" in repr(ei.value), repr(ei.value)
