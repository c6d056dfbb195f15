"""Every `az batch` command bluebatch serves, run through the real az CLI (2.91, which bundles
azure-batch 15.0.0b1 and sends api-version 2024-02-01.19.0).

Each test checks three things: what az printed (its JSON and exit status), what az sent (the
capture proxy between az and the server), and the state through the API (the azure-batch 15.1
SDK client of the SDK suite) or over real OpenSSH.

Passwords reach az through `--json-file` (a 0600 file), never through its arguments; `--password`
sends the same body. The key of the account goes through AZURE_BATCH_ACCESS_KEY.
"""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from azure.core.exceptions import ResourceNotFoundError

from sdkutil import delete_pool_quietly, generate_ssh_key, linux_pool, make_pool, unique, unique_user, wait_nodes
from test_ssh_login import (
    assert_key_refused,
    assert_login_ok,
    assert_password_refused,
    ssh_key,
    ssh_password,
)


IMAGE = "canonical:0001-com-ubuntu-server-jammy:22_04-lts"
AGENT = "batch.node.ubuntu 22.04"
WAIT = 30


def _json_file(tmp_path, name: str, content: dict) -> str:
    """A 0600 file for `--json-file` (how the tests hand az a password without argv)."""
    path = tmp_path / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(content, f)
    return str(path)


def _control_users(server, pool_id: str, node_id: str) -> dict:
    """The node's users as stored and applied (`bluebatch node users`, the emulator control)."""
    binary = os.environ.get("BLUEBATCH_BIN") or str(Path(__file__).resolve().parents[2] / "target" / "debug" / "bluebatch")
    r = subprocess.run([binary, "node", "users", "--url", server.url, pool_id, node_id],
                       env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "BLUEBATCH_ACCOUNT": server.account},
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"bluebatch node users failed: {r.stderr}"
    return {u["name"]: u for u in json.loads(r.stdout)["users"]}


def _wait(predicate, what: str, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout}s")
        time.sleep(0.3)


# ---------------------------------------------------------------------------------------------
# Pools: the pool is created by az itself, with the exact command of the issue.


@pytest.fixture(scope="module")
def az_pool(az, server):
    client = server.client
    pool_id = unique("az")
    r = az("batch", "pool", "create", "--id", pool_id, "--vm-size", "standard_d2s_v3",
           "--target-dedicated-nodes", "1", "--image", IMAGE, "--node-agent-sku-id", AGENT)
    yield pool_id, r
    delete_pool_quietly(client, pool_id)


def test_pool_create_sends_a_string_count_and_gets_one_node(az_pool, client):
    pool_id, r = az_pool
    sent = r.only("POST", "/pools")
    # What az 2.91 sends: the count as a JSON string.
    assert sent["body"]["targetDedicatedNodes"] == "1", sent["body"]
    assert sent["body"]["virtualMachineConfiguration"] == {
        "imageReference": {"publisher": "canonical", "offer": "0001-com-ubuntu-server-jammy", "sku": "22_04-lts"},
        "nodeAgentSKUId": AGENT,
    }
    assert sent["status"] == 201, r.brief()
    r.ok()
    pool = client.get_pool(pool_id)
    assert pool.target_dedicated_nodes == 1
    nodes = wait_nodes(client, pool_id, 1)
    assert nodes[0].is_dedicated is True


def test_pool_show_and_list(az, az_pool):
    pool_id, _ = az_pool
    shown = az("batch", "pool", "show", "--pool-id", pool_id).ok()
    assert shown.only("GET", f"/pools/{pool_id}")["status"] == 200
    pool = shown.json
    assert pool["id"] == pool_id
    assert pool["vmSize"] == "standard_d2s_v3"
    assert pool["targetDedicatedNodes"] == 1
    assert pool["state"] == "active"
    assert pool["virtualMachineConfiguration"]["nodeAgentSkuId"] == AGENT

    listed = az("batch", "pool", "list").ok()
    assert pool_id in [p["id"] for p in listed.json]

    filtered = az("batch", "pool", "list", "--filter", f"id eq '{pool_id}'", "--select", "id,state").ok()
    sent = filtered.only("GET", "/pools")
    assert sent["query"]["$filter"] == f"id eq '{pool_id}'" and sent["query"]["$select"] == "id,state"
    assert [(p["id"], p["state"]) for p in filtered.json] == [(pool_id, "active")]
    assert "vmSize" not in filtered.json[0]


def test_pool_resize_to_three_dedicated_and_one_low_priority(az, az_pool, client):
    pool_id, _ = az_pool
    r = az("batch", "pool", "resize", "--pool-id", pool_id,
           "--target-dedicated-nodes", "3", "--target-low-priority-nodes", "1")
    sent = r.only("POST", f"/pools/{pool_id}/resize")
    assert sent["body"] == {"targetDedicatedNodes": "3", "targetLowPriorityNodes": "1"}
    assert sent["status"] == 202, r.brief()
    r.ok()
    pool = client.get_pool(pool_id)
    assert (pool.target_dedicated_nodes, pool.target_low_priority_nodes) == (3, 1)
    nodes = wait_nodes(client, pool_id, 4)
    assert sorted(n.is_dedicated for n in nodes) == [False, True, True, True]

    shown = az("batch", "pool", "show", "--pool-id", pool_id).ok().json
    assert (shown["targetDedicatedNodes"], shown["targetLowPriorityNodes"]) == (3, 1)
    assert (shown["currentDedicatedNodes"], shown["currentLowPriorityNodes"]) == (3, 1)
    assert shown["allocationState"] == "steady"


def test_pool_create_with_more_options_sent_as_strings(az, client):
    pool_id = unique("azopt")
    try:
        r = az("batch", "pool", "create", "--id", pool_id, "--vm-size", "standard_d2s_v3",
               "--target-dedicated-nodes", "0", "--target-low-priority-nodes", "1", "--task-slots-per-node", "2",
               "--resize-timeout", "PT10M", "--enable-inter-node-communication", "--image", IMAGE,
               "--node-agent-sku-id", AGENT, "--metadata", "team=ci", "--start-task-command-line", "/bin/true",
               "--start-task-max-task-retry-count", "2", "--start-task-wait-for-success", "--os-disk-size", "64")
        sent = r.only("POST", "/pools")
        body = sent["body"]
        assert body["taskSlotsPerNode"] == "2" and body["targetLowPriorityNodes"] == "1"
        assert body["resizeTimeout"] == "PT10M00S"
        assert body["startTask"] == {"commandLine": "/bin/true", "maxTaskRetryCount": "2", "waitForSuccess": True}
        assert body["virtualMachineConfiguration"]["osDisk"] == {"diskSizeGB": "64"}
        assert sent["status"] == 201, r.brief()
        r.ok()
        pool = client.get_pool(pool_id)
        assert pool.task_slots_per_node == 2
        assert pool.target_low_priority_nodes == 1
        assert pool.resize_timeout == datetime.timedelta(minutes=10)
        assert pool.enable_inter_node_communication is True
        assert [(m.name, m.value) for m in pool.metadata] == [("team", "ci")]
    finally:
        delete_pool_quietly(client, pool_id)


def test_pool_resize_abort_is_recognised_but_not_served(az, az_pool):
    pool_id, _ = az_pool
    r = az("batch", "pool", "resize", "--pool-id", pool_id, "--abort")
    sent = r.only("POST", f"/pools/{pool_id}/stopresize")
    assert (sent["status"], sent["code"]) == (501, "NotImplemented"), r.brief()
    assert r.returncode != 0
    assert "Pool_StopResize" in r.stderr


def test_pool_delete(az, client):
    pool_id = unique("azdel")
    make_pool(client, linux_pool(pool_id, nodes=1), 1)
    r = az("batch", "pool", "delete", "--pool-id", pool_id, "--yes")
    assert r.only("DELETE", f"/pools/{pool_id}")["status"] == 202, r.brief()
    r.ok()

    def gone():
        try:
            client.get_pool(pool_id)
            return False
        except ResourceNotFoundError:
            return True

    _wait(gone, f"pool {pool_id} deletion")
    missing = az("batch", "pool", "show", "--pool-id", pool_id)
    assert missing.returncode == 3, missing
    assert "PoolNotFound" in missing.stderr
    assert missing.only("GET", f"/pools/{pool_id}")["status"] == 404


# ---------------------------------------------------------------------------------------------
# Nodes and node users, on a pool made through the SDK (so these do not depend on pool create).


@pytest.fixture(scope="module")
def sdk_pool(server):
    client = server.client
    pool_id = unique("aznodes")
    nodes = make_pool(client, linux_pool(pool_id, nodes=2), 2)
    yield pool_id, sorted(n.id for n in nodes)
    delete_pool_quietly(client, pool_id)


@pytest.fixture(scope="module")
def node(server, sdk_pool):
    """(pool id, node id, ssh ip, ssh port) of the first node."""
    client = server.client
    pool_id, ids = sdk_pool
    rl = client.get_node_remote_login_settings(pool_id, ids[0])
    return pool_id, ids[0], rl.remote_login_ip_address, rl.remote_login_port


def test_node_list_and_show(az, client, sdk_pool):
    pool_id, ids = sdk_pool
    listed = az("batch", "node", "list", "--pool-id", pool_id).ok()
    assert listed.only("GET", f"/pools/{pool_id}/nodes")["status"] == 200
    assert sorted(n["id"] for n in listed.json) == ids
    assert {n["state"] for n in listed.json} == {"idle"}

    filtered = az("batch", "node", "list", "--pool-id", pool_id, "--filter", f"id eq '{ids[1]}'",
                  "--select", "id,state").ok()
    assert [(n["id"], n["state"]) for n in filtered.json] == [(ids[1], "idle")]

    shown = az("batch", "node", "show", "--pool-id", pool_id, "--node-id", ids[0]).ok()
    assert shown.only("GET", f"/pools/{pool_id}/nodes/{ids[0]}")["status"] == 200
    api = client.get_node(pool_id, ids[0])
    got = shown.json
    assert (got["id"], got["state"], got["schedulingState"], got["ipAddress"], got["isDedicated"]) == (
        api.id, "idle", "enabled", api.ip_address, True)
    ssh = [e for e in got["endpointConfiguration"]["inboundEndpoints"] if e["backendPort"] == 22]
    assert len(ssh) == 1


def test_scheduling_disable_taskcompletion_then_enable(az, client, node):
    pool_id, node_id, _, _ = node
    try:
        r = az("batch", "node", "scheduling", "disable", "--pool-id", pool_id, "--node-id", node_id,
               "--node-disable-scheduling-option", "taskcompletion")
        sent = r.only("POST", f"/pools/{pool_id}/nodes/{node_id}/disablescheduling")
        # az 2.91 (azure-batch 15.0.0b1's _patch.py) wraps the option in an object of the same name.
        assert sent["body"] == {"nodeDisableSchedulingOption": {"nodeDisableSchedulingOption": "taskcompletion"}}
        assert sent["status"] == 200, r.brief()
        r.ok()
        api = client.get_node(pool_id, node_id)
        assert (api.state, api.scheduling_state) == ("offline", "disabled")
        shown = az("batch", "node", "show", "--pool-id", pool_id, "--node-id", node_id).ok().json
        assert (shown["state"], shown["schedulingState"]) == ("offline", "disabled")

        # Disabling a disabled node is a conflict, as on Azure.
        twice = az("batch", "node", "scheduling", "disable", "--pool-id", pool_id, "--node-id", node_id)
        assert twice.returncode == 1 and "NodeAlreadyInTargetSchedulingState" in twice.stderr, twice

        enabled = az("batch", "node", "scheduling", "enable", "--pool-id", pool_id, "--node-id", node_id).ok()
        sent = enabled.only("POST", f"/pools/{pool_id}/nodes/{node_id}/enablescheduling")
        assert sent["raw_body"] == "" and sent["status"] == 200
        api = client.get_node(pool_id, node_id)
        assert (api.state, api.scheduling_state) == ("idle", "enabled")

        # Without an option az sends {}.
        plain = az("batch", "node", "scheduling", "disable", "--pool-id", pool_id, "--node-id", node_id).ok()
        assert plain.only("POST", f"/pools/{pool_id}/nodes/{node_id}/disablescheduling")["body"] == {}
        assert client.get_node(pool_id, node_id).state == "offline"
    finally:
        # The node's other tests need it idle.
        if client.get_node(pool_id, node_id).scheduling_state == "disabled":
            client.enable_node_scheduling(pool_id, node_id)
    assert client.get_node(pool_id, node_id).state == "idle"


def test_user_create_with_password_key_expiry_and_admin(az, server, node, tmp_path):
    pool_id, node_id, ip, port = node
    key_path, public_key = generate_ssh_key(tmp_path)
    user = unique_user("azc")
    expiry = "2030-01-01T00:00:00Z"
    spec = _json_file(tmp_path, "user.json", {"name": user, "password": "Az-create-1", "isAdmin": True,
                                              "expiryTime": expiry, "sshPublicKey": public_key})
    r = az("batch", "node", "user", "create", "--pool-id", pool_id, "--node-id", node_id, "--json-file", spec)
    sent = r.only("POST", f"/pools/{pool_id}/nodes/{node_id}/users")
    assert sent["body"] == {"name": user, "password": "Az-create-1", "isAdmin": True,
                            "expiryTime": expiry, "sshPublicKey": public_key}
    assert sent["status"] == 201, r.brief()
    r.ok()
    try:
        stored = _control_users(server, pool_id, node_id)[user]
        assert stored["isAdmin"] is True and stored["hasPassword"] is True and stored["appliedOnNode"] is True
        assert stored["expiryTime"] == expiry and stored["sshPublicKeyFingerprint"]
        assert_login_ok(ssh_password(ip, port, user, "Az-create-1"))
        assert_login_ok(ssh_key(ip, port, user, key_path))
    finally:
        az("batch", "node", "user", "delete", "--pool-id", pool_id, "--node-id", node_id,
           "--user-name", user, "--yes").ok()


def test_user_create_with_flags(az, server, node, tmp_path):
    """The flag form (no password): --is-admin is a real boolean, the expiry passes as given."""
    pool_id, node_id, ip, port = node
    key_path, public_key = generate_ssh_key(tmp_path)
    user = unique_user("azf")
    r = az("batch", "node", "user", "create", "--pool-id", pool_id, "--node-id", node_id, "--name", user,
           "--is-admin", "--expiry-time", "2030-06-01T00:00:00Z", "--ssh-public-key", public_key)
    sent = r.only("POST", f"/pools/{pool_id}/nodes/{node_id}/users")
    assert sent["body"] == {"name": user, "isAdmin": True, "expiryTime": "2030-06-01T00:00:00Z",
                            "sshPublicKey": public_key}
    assert sent["status"] == 201, r.brief()
    r.ok()
    try:
        stored = _control_users(server, pool_id, node_id)[user]
        assert (stored["isAdmin"], stored["hasPassword"]) == (True, False)
        assert_login_ok(ssh_key(ip, port, user, key_path))
    finally:
        az("batch", "node", "user", "delete", "--pool-id", pool_id, "--node-id", node_id,
           "--user-name", user, "--yes").ok()


def test_user_reset_new_password_logs_in_and_old_is_refused(az, server, node, tmp_path):
    pool_id, node_id, ip, port = node
    key_path, public_key = generate_ssh_key(tmp_path)
    user = unique_user("azr")
    create = _json_file(tmp_path, "create.json", {"name": user, "password": "Az-old-pass-1"})
    az("batch", "node", "user", "create", "--pool-id", pool_id, "--node-id", node_id, "--json-file", create).ok()
    try:
        assert_login_ok(ssh_password(ip, port, user, "Az-old-pass-1"))

        reset = _json_file(tmp_path, "reset.json", {"password": "Az-new-pass-2", "expiryTime": "2031-01-01T00:00:00Z"})
        r = az("batch", "node", "user", "reset", "--pool-id", pool_id, "--node-id", node_id,
               "--user-name", user, "--json-file", reset)
        sent = r.only("PUT", f"/pools/{pool_id}/nodes/{node_id}/users/{user}")
        assert sent["body"] == {"password": "Az-new-pass-2", "expiryTime": "2031-01-01T00:00:00Z"}
        assert sent["status"] == 200, r.brief()
        r.ok()
        assert_login_ok(ssh_password(ip, port, user, "Az-new-pass-2"))
        assert_password_refused(ssh_password(ip, port, user, "Az-old-pass-1"))
        assert _control_users(server, pool_id, node_id)[user]["expiryTime"] == "2031-01-01T00:00:00Z"

        # Reset with only a key (flags): Update replaces the account, so the password is gone.
        r = az("batch", "node", "user", "reset", "--pool-id", pool_id, "--node-id", node_id,
               "--user-name", user, "--ssh-public-key", public_key, "--expiry-time", "2031-02-01T00:00:00Z")
        sent = r.only("PUT", f"/pools/{pool_id}/nodes/{node_id}/users/{user}")
        assert sent["body"] == {"expiryTime": "2031-02-01T00:00:00Z", "sshPublicKey": public_key}
        r.ok()
        assert_login_ok(ssh_key(ip, port, user, key_path))
        assert_password_refused(ssh_password(ip, port, user, "Az-new-pass-2"))
    finally:
        az("batch", "node", "user", "delete", "--pool-id", pool_id, "--node-id", node_id,
           "--user-name", user, "--yes")


def test_user_delete_refuses_login(az, server, node, tmp_path):
    pool_id, node_id, ip, port = node
    key_path, public_key = generate_ssh_key(tmp_path)
    user = unique_user("azd")
    spec = _json_file(tmp_path, "user.json", {"name": user, "password": "Az-delete-1", "sshPublicKey": public_key})
    az("batch", "node", "user", "create", "--pool-id", pool_id, "--node-id", node_id, "--json-file", spec).ok()
    assert_login_ok(ssh_password(ip, port, user, "Az-delete-1"))

    r = az("batch", "node", "user", "delete", "--pool-id", pool_id, "--node-id", node_id,
           "--user-name", user, "--yes")
    sent = r.only("DELETE", f"/pools/{pool_id}/nodes/{node_id}/users/{user}")
    assert sent["status"] == 200, r.brief()
    r.ok()
    assert user not in _control_users(server, pool_id, node_id)
    assert_password_refused(ssh_password(ip, port, user, "Az-delete-1"))
    assert_key_refused(ssh_key(ip, port, user, key_path))

    again = az("batch", "node", "user", "delete", "--pool-id", pool_id, "--node-id", node_id,
               "--user-name", user, "--yes")
    assert again.returncode == 3 and "NodeUserNotFound" in again.stderr, again


def test_remote_login_settings_show(az, client, node):
    pool_id, node_id, ip, port = node
    r = az("batch", "node", "remote-login-settings", "show", "--pool-id", pool_id, "--node-id", node_id).ok()
    assert r.only("GET", f"/pools/{pool_id}/nodes/{node_id}/remoteloginsettings")["status"] == 200
    assert r.json == {"remoteLoginIpAddress": ip, "remoteLoginPort": port}
    ssh = [e for e in client.get_node(pool_id, node_id).endpoint_configuration.inbound_endpoints
           if e.backend_port == 22]
    assert [(e.public_ip_address, e.frontend_port) for e in ssh] == [(ip, port)]


def test_node_reboot(az, client, node):
    pool_id, node_id, _, _ = node
    before = client.get_node(pool_id, node_id).last_boot_time
    r = az("batch", "node", "reboot", "--pool-id", pool_id, "--node-id", node_id)
    sent = r.only("POST", f"/pools/{pool_id}/nodes/{node_id}/reboot")
    assert sent["raw_body"] == "" and sent["status"] == 202, r.brief()
    r.ok()
    after = _wait(lambda: (n := client.get_node(pool_id, node_id)).state == "idle" and n.last_boot_time > before
                  and n.last_boot_time, "reboot back to idle")

    r = az("batch", "node", "reboot", "--pool-id", pool_id, "--node-id", node_id, "--node-reboot-option", "terminate")
    sent = r.only("POST", f"/pools/{pool_id}/nodes/{node_id}/reboot")
    assert sent["body"] == {"nodeRebootOption": "terminate"} and sent["status"] == 202, r.brief()
    r.ok()
    _wait(lambda: (n := client.get_node(pool_id, node_id)).state == "idle" and n.last_boot_time > after,
          "second reboot back to idle")


def test_node_reimage_is_not_an_az_command(az):
    # az 2.91 has no `az batch node reimage` (the SDK and REST API have Reimage; tests/sdk covers it).
    r = az("batch", "node", "reimage", "--pool-id", "p", "--node-id", "n")
    assert r.returncode == 2 and "not recognized" in r.stderr, r
    assert r.exchanges == []


def test_node_delete(az, client, sdk_pool):
    pool_id, ids = sdk_pool
    victim = ids[1]
    r = az("batch", "node", "delete", "--pool-id", pool_id, "--node-list", victim,
           "--node-deallocation-option", "requeue", "--resize-timeout", "PT3M")
    sent = r.only("POST", f"/pools/{pool_id}/removenodes")
    assert sent["body"] == {"nodeList": [victim], "resizeTimeout": "PT03M00S", "nodeDeallocationOption": "requeue"}
    assert sent["status"] == 202, r.brief()
    r.ok()
    nodes = wait_nodes(client, pool_id, 1, states=("idle", "offline", "rebooting"))
    assert [n.id for n in nodes] == [ids[0]]
    assert client.get_pool(pool_id).target_dedicated_nodes == 1
