"""azure-batch 15.1.0 (unmodified) against bluebatch: pools, nodes and node users.

These tests encode Azure's documented behaviour and docs/contract.md; a failure is a server
bug unless the contract says otherwise.
"""
from __future__ import annotations

import datetime
import time

import pytest
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
)
from azure.batch import models

from sdkutil import (
    VM_SIZE,
    assert_batch_error,
    cloud_service_pool,
    delete_pool_quietly,
    error_code,
    error_values,
    generate_ssh_key,
    linux_pool,
    make_pool,
    unique,
    unique_user,
    utcnow,
    wait_node_state,
    wait_nodes,
    windows_vm_pool,
)

UNKNOWN_NODE = "tvmps_" + "0" * 64 + "_d"


# --------------------------------------------------------------------------------------------
# The acceptance flow
# --------------------------------------------------------------------------------------------


def test_linux_user_flow(server, client, tmp_path):
    pool_id = unique("flow")
    _, public_key = generate_ssh_key(tmp_path)

    # Create a Linux pool of two dedicated nodes.
    client.create_pool(linux_pool(pool_id, nodes=2))
    try:
        pool = client.get_pool(pool_id)
        assert pool.id == pool_id
        assert pool.vm_size.lower() == VM_SIZE.lower()
        assert pool.state == models.BatchPoolState.ACTIVE
        assert pool.url == f"{server.url}/pools/{pool_id}"
        assert pool.target_dedicated_nodes == 2
        assert pool.virtual_machine_configuration.node_agent_sku_id == "batch.node.ubuntu 22.04"
        assert pool.etag and pool.last_modified and pool.creation_time

        # Both nodes become idle.
        nodes = wait_nodes(client, pool_id, 2)
        assert len({n.id for n in nodes}) == 2
        for n in nodes:
            assert n.id
            assert n.url == f"{server.url}/pools/{pool_id}/nodes/{n.id}"
            assert n.state == models.BatchNodeState.IDLE
            assert n.scheduling_state == models.SchedulingState.ENABLED
            assert n.ip_address
            assert n.affinity_id == f"TVM:{n.id}"
            assert n.vm_size.lower() == VM_SIZE.lower()
            assert n.is_dedicated is True
            assert n.state_transition_time is not None
            assert n.allocation_time is not None
        pool = client.get_pool(pool_id)
        assert pool.allocation_state == models.AllocationState.STEADY
        assert pool.current_dedicated_nodes == 2

        node_id = nodes[0].id
        node = client.get_node(pool_id, node_id)
        assert node.id == node_id and node.affinity_id == f"TVM:{node_id}"

        # Create a user with a password.
        user = unique_user("flow")
        client.create_node_user(
            pool_id, node_id, models.BatchNodeUserCreateOptions(name=user, password="Flow-pass-1", is_admin=False)
        )

        # Replace it: new password and an explicit expiry.
        expiry = (utcnow() + datetime.timedelta(days=3)).replace(microsecond=0)
        client.replace_node_user(
            pool_id, node_id, user, models.BatchNodeUserReplaceOptions(password="Flow-pass-2", expiry_time=expiry)
        )

        # Replace it again with only an SSH public key (password removed, expiry now + 1 day).
        client.replace_node_user(pool_id, node_id, user, models.BatchNodeUserReplaceOptions(ssh_public_key=public_key))

        # Remote login settings.
        settings = client.get_node_remote_login_settings(pool_id, node_id)
        assert settings.remote_login_ip_address
        assert isinstance(settings.remote_login_port, int) and 0 < settings.remote_login_port < 65536

        # Delete the user; it is gone afterwards.
        client.delete_node_user(pool_id, node_id, user)
        with pytest.raises(ResourceNotFoundError) as ei:
            client.replace_node_user(pool_id, node_id, user, models.BatchNodeUserReplaceOptions(password="x-1"))
        assert_batch_error(ei, 404, "NodeUserNotFound")
    finally:
        # Delete the pool and see it go.
        poller = client.begin_delete_pool(pool_id, polling_interval=1)
    try:
        client_pool = client.get_pool(pool_id)
        assert client_pool.state == models.BatchPoolState.DELETING
    except ResourceNotFoundError as e:
        assert error_code(e) == "PoolNotFound"
    poller.result(timeout=60)
    assert poller.done()
    with pytest.raises(ResourceNotFoundError) as ei:
        client.get_pool(pool_id)
    assert_batch_error(ei, 404, "PoolNotFound")


# --------------------------------------------------------------------------------------------
# Shared pools for the error cases
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def linux_node(server):
    client = server.client
    pool_id = unique("lx")
    nodes = make_pool(client, linux_pool(pool_id, nodes=1), 1)
    yield pool_id, nodes[0].id
    delete_pool_quietly(client, pool_id)


@pytest.fixture(scope="module")
def windows_node(server):
    client = server.client
    pool_id = unique("win")
    nodes = make_pool(client, windows_vm_pool(pool_id, nodes=1), 1)
    yield pool_id, nodes[0].id
    delete_pool_quietly(client, pool_id)


# --------------------------------------------------------------------------------------------
# Windows rules
# --------------------------------------------------------------------------------------------


def test_windows_rejects_ssh_key(client, windows_node, tmp_path):
    pool_id, node_id = windows_node
    _, public_key = generate_ssh_key(tmp_path)
    with pytest.raises(HttpResponseError) as ei:
        client.create_node_user(
            pool_id,
            node_id,
            models.BatchNodeUserCreateOptions(name=unique_user("w"), password="Win-pass-1", ssh_public_key=public_key),
        )
    assert_batch_error(ei, 400, "InvalidPropertyValue")


def test_windows_replace_rejects_ssh_key_and_requires_password(client, windows_node, tmp_path):
    pool_id, node_id = windows_node
    _, public_key = generate_ssh_key(tmp_path)
    user = unique_user("w")
    client.create_node_user(pool_id, node_id, models.BatchNodeUserCreateOptions(name=user, password="Win-pass-1"))

    with pytest.raises(HttpResponseError) as ei:
        client.replace_node_user(
            pool_id, node_id, user, models.BatchNodeUserReplaceOptions(password="Win-pass-2", ssh_public_key=public_key)
        )
    assert_batch_error(ei, 400, "InvalidPropertyValue")

    # No password on a Windows node: MissingRequiredProperty.
    expiry = utcnow() + datetime.timedelta(days=2)
    with pytest.raises(HttpResponseError) as ei:
        client.replace_node_user(pool_id, node_id, user, models.BatchNodeUserReplaceOptions(expiry_time=expiry))
    assert_batch_error(ei, 400, "MissingRequiredProperty")

    # With a password it is accepted.
    client.replace_node_user(pool_id, node_id, user, models.BatchNodeUserReplaceOptions(password="Win-pass-3"))
    client.delete_node_user(pool_id, node_id, user)


def test_windows_create_requires_password(client, windows_node):
    pool_id, node_id = windows_node
    with pytest.raises(HttpResponseError) as ei:
        client.create_node_user(pool_id, node_id, models.BatchNodeUserCreateOptions(name=unique_user("w")))
    assert_batch_error(ei, 400, "MissingRequiredProperty")


def test_cloud_service_pool_is_windows(server, tmp_path):
    # cloudServiceConfiguration left the REST API in 2024-07-01; the az CLI (azure-batch 15.0.0b1)
    # still speaks 2024-02-01.19.0, so use that version here.
    client = server.make_client(api_version="2024-02-01.19.0")
    pool_id = unique("cs")
    _, public_key = generate_ssh_key(tmp_path)
    try:
        nodes = make_pool(client, cloud_service_pool(pool_id, nodes=1), 1)
        node_id = nodes[0].id
        with pytest.raises(HttpResponseError) as ei:
            client.create_node_user(
                pool_id,
                node_id,
                models.BatchNodeUserCreateOptions(name=unique_user("c"), password="Cs-pass-1", ssh_public_key=public_key),
            )
        assert_batch_error(ei, 400, "InvalidPropertyValue")
        user = unique_user("c")
        client.create_node_user(pool_id, node_id, models.BatchNodeUserCreateOptions(name=user, password="Cs-pass-1"))
        with pytest.raises(HttpResponseError) as ei:
            client.replace_node_user(pool_id, node_id, user, models.BatchNodeUserReplaceOptions())
        assert_batch_error(ei, 400, "MissingRequiredProperty")
    finally:
        delete_pool_quietly(client, pool_id)
        client.close()


# --------------------------------------------------------------------------------------------
# Not found / conflicts / authentication
# --------------------------------------------------------------------------------------------


def test_replace_unknown_user(client, linux_node):
    pool_id, node_id = linux_node
    with pytest.raises(ResourceNotFoundError) as ei:
        client.replace_node_user(pool_id, node_id, unique_user("nobody"), models.BatchNodeUserReplaceOptions(password="p-1"))
    assert_batch_error(ei, 404, "NodeUserNotFound")
    with pytest.raises(ResourceNotFoundError) as ei:
        client.delete_node_user(pool_id, node_id, unique_user("nobody"))
    assert_batch_error(ei, 404, "NodeUserNotFound")


def test_unknown_node(client, linux_node):
    pool_id, _ = linux_node
    with pytest.raises(ResourceNotFoundError) as ei:
        client.replace_node_user(pool_id, UNKNOWN_NODE, "someone", models.BatchNodeUserReplaceOptions(password="p-1"))
    assert_batch_error(ei, 404, "NodeNotFound")
    with pytest.raises(ResourceNotFoundError) as ei:
        client.create_node_user(pool_id, UNKNOWN_NODE, models.BatchNodeUserCreateOptions(name="someone", password="p-1"))
    assert_batch_error(ei, 404, "NodeNotFound")
    with pytest.raises(ResourceNotFoundError) as ei:
        client.get_node(pool_id, UNKNOWN_NODE)
    assert_batch_error(ei, 404, "NodeNotFound")
    with pytest.raises(ResourceNotFoundError) as ei:
        client.get_node_remote_login_settings(pool_id, UNKNOWN_NODE)
    assert_batch_error(ei, 404, "NodeNotFound")


def test_unknown_pool(client):
    pool_id = unique("nopool")
    with pytest.raises(ResourceNotFoundError) as ei:
        client.get_pool(pool_id)
    assert_batch_error(ei, 404, "PoolNotFound")
    with pytest.raises(ResourceNotFoundError) as ei:
        client.replace_node_user(pool_id, UNKNOWN_NODE, "someone", models.BatchNodeUserReplaceOptions(password="p-1"))
    assert_batch_error(ei, 404, "PoolNotFound")
    with pytest.raises(ResourceNotFoundError) as ei:
        client.create_node_user(pool_id, UNKNOWN_NODE, models.BatchNodeUserCreateOptions(name="someone", password="p-1"))
    assert_batch_error(ei, 404, "PoolNotFound")
    with pytest.raises(ResourceNotFoundError) as ei:
        list(client.list_nodes(pool_id))
    assert_batch_error(ei, 404, "PoolNotFound")


def test_pool_exists(client, linux_node):
    pool_id, _ = linux_node
    assert client.pool_exists(pool_id) is True
    # azure-batch 15.1.0 raises ResourceNotFoundError for the 404 (its BatchExceptionPolicy fires
    # before pool_exists can return False); either way the server must answer 404.
    try:
        assert client.pool_exists(unique("nopool")) is False
    except ResourceNotFoundError as e:
        assert e.status_code == 404


def test_duplicate_user(client, linux_node):
    pool_id, node_id = linux_node
    user = unique_user("dup")
    client.create_node_user(pool_id, node_id, models.BatchNodeUserCreateOptions(name=user, password="Dup-pass-1"))
    try:
        with pytest.raises(ResourceExistsError) as ei:
            client.create_node_user(pool_id, node_id, models.BatchNodeUserCreateOptions(name=user, password="Dup-pass-2"))
        assert_batch_error(ei, 409, "NodeUserExists")
    finally:
        client.delete_node_user(pool_id, node_id, user)


def test_invalid_user_properties(client, linux_node, tmp_path):
    """sshPublicKey must be one OpenSSH public key line; empty strings are invalid (docs/contract.md §6)."""
    pool_id, node_id = linux_node
    key_path, public_key = generate_ssh_key(tmp_path)
    with open(key_path, encoding="ascii") as f:
        private_key = f.read()
    user = unique_user("inv")
    client.create_node_user(pool_id, node_id, models.BatchNodeUserCreateOptions(name=user, password="Inv-pass-1"))
    try:
        for bad in ("not a key", private_key, public_key + "\n" + public_key, ""):
            with pytest.raises(HttpResponseError) as ei:
                client.replace_node_user(pool_id, node_id, user, models.BatchNodeUserReplaceOptions(ssh_public_key=bad))
            assert_batch_error(ei, 400, "InvalidPropertyValue")
            assert private_key not in ei.value.response.text()
        with pytest.raises(HttpResponseError) as ei:
            client.replace_node_user(pool_id, node_id, user, models.BatchNodeUserReplaceOptions(password=""))
        assert_batch_error(ei, 400, "InvalidPropertyValue")
        with pytest.raises(HttpResponseError) as ei:
            client.create_node_user(
                pool_id, node_id, models.BatchNodeUserCreateOptions(name=unique_user("inv"), ssh_public_key="ssh-ed25519 !!!")
            )
        assert_batch_error(ei, 400, "InvalidPropertyValue")
        # The failed replaces changed nothing: the user still exists and a valid replace works.
        client.replace_node_user(pool_id, node_id, user, models.BatchNodeUserReplaceOptions(ssh_public_key=public_key))
    finally:
        client.delete_node_user(pool_id, node_id, user)


def test_duplicate_pool(client, linux_node):
    pool_id, _ = linux_node
    with pytest.raises(ResourceExistsError) as ei:
        client.create_pool(linux_pool(pool_id.upper(), nodes=0))
    assert_batch_error(ei, 409, "PoolExists")


def test_wrong_key_is_refused(server):
    import base64
    import os

    other_key = base64.b64encode(os.urandom(64)).decode()
    assert other_key != server.key
    bad = server.make_client(key=other_key)
    try:
        with pytest.raises(HttpResponseError) as ei:
            bad.get_pool(unique("any"))
        assert not isinstance(ei.value, ResourceNotFoundError), "authentication must be checked before lookups"
        assert_batch_error(ei, 403, "AuthenticationFailed")
        assert "AuthenticationErrorDetail" in error_values(ei.value)
        with pytest.raises(HttpResponseError) as ei:
            bad.create_pool(linux_pool(unique("never"), nodes=0))
        assert_batch_error(ei, 403, "AuthenticationFailed")
    finally:
        bad.close()


def test_unknown_account_is_refused(server):
    bad = server.make_client(account=server.account + "x")
    try:
        with pytest.raises(HttpResponseError) as ei:
            list(bad.list_pools())
        assert_batch_error(ei, 403, "AuthenticationFailed")
    finally:
        bad.close()


def test_other_api_versions_are_accepted(server, linux_node):
    """Real clients pin older versions: az CLI 2024-02-01.19.0, JS SDK 2022-10-01.16.0."""
    pool_id, node_id = linux_node
    for version in ("2024-02-01.19.0", "2023-11-01.18.0", "2022-10-01.16.0"):
        c = server.make_client(api_version=version)
        try:
            assert c.get_pool(pool_id).id == pool_id
            user = unique_user("v")
            c.create_node_user(pool_id, node_id, models.BatchNodeUserCreateOptions(name=user, password="Ver-pass-1"))
            c.replace_node_user(pool_id, node_id, user, models.BatchNodeUserReplaceOptions(password="Ver-pass-2"), service_timeout=10)
            c.delete_node_user(pool_id, node_id, user)
        finally:
            c.close()


# --------------------------------------------------------------------------------------------
# Pool and node operations the SDK drives with long-running pollers
# --------------------------------------------------------------------------------------------


def test_list_pools_and_filters(client, linux_node):
    pool_id, node_id = linux_node
    ids = [p.id for p in client.list_pools()]
    assert pool_id in ids
    filtered = [p.id for p in client.list_pools(filter=f"id eq '{pool_id}'")]
    assert filtered == [pool_id]
    # Paging through odata.nextLink with maxresults=1.
    paged = [p.id for p in client.list_pools(max_results=1)]
    assert sorted(paged) == sorted(ids)
    idle = [n.id for n in client.list_nodes(pool_id, filter="state eq 'idle'")]
    assert node_id in idle


def test_resize_and_remove_nodes(client):
    pool_id = unique("rs")
    try:
        make_pool(client, linux_pool(pool_id, nodes=1), 1)
        client.begin_resize_pool(
            pool_id, models.BatchPoolResizeOptions(target_dedicated_nodes=3), polling_interval=1
        ).result(timeout=60)
        nodes = wait_nodes(client, pool_id, 3)
        pool = client.get_pool(pool_id)
        assert pool.allocation_state == models.AllocationState.STEADY
        assert pool.target_dedicated_nodes == 3 and pool.current_dedicated_nodes == 3

        victim = nodes[0].id
        client.begin_remove_nodes(
            pool_id, models.BatchNodeRemoveOptions(node_ids=[victim]), polling_interval=1
        ).result(timeout=60)
        remaining = wait_nodes(client, pool_id, 2)
        assert victim not in {n.id for n in remaining}
        with pytest.raises(ResourceNotFoundError) as ei:
            client.get_node(pool_id, victim)
        assert_batch_error(ei, 404, "NodeNotFound")
        pool = client.get_pool(pool_id)
        assert pool.target_dedicated_nodes == 2 and pool.current_dedicated_nodes == 2
    finally:
        delete_pool_quietly(client, pool_id)


def test_scheduling_reboot_and_reimage(client):
    pool_id = unique("life")
    try:
        node_id = make_pool(client, linux_pool(pool_id, nodes=1), 1)[0].id
        user = unique_user("life")
        client.create_node_user(pool_id, node_id, models.BatchNodeUserCreateOptions(name=user, password="Life-pass-1"))

        # Disable scheduling: an idle node goes offline (azure-batch 15.1 needs an options object).
        client.disable_node_scheduling(
            pool_id, node_id, models.BatchNodeDisableSchedulingOptions(node_disable_scheduling_option="requeue")
        )
        node = client.get_node(pool_id, node_id)
        assert node.scheduling_state == models.SchedulingState.DISABLED
        assert node.state == models.BatchNodeState.OFFLINE
        with pytest.raises(ResourceExistsError) as ei:
            client.disable_node_scheduling(
                pool_id, node_id, models.BatchNodeDisableSchedulingOptions(node_disable_scheduling_option="requeue")
            )
        assert_batch_error(ei, 409, "NodeAlreadyInTargetSchedulingState")
        # User operations need idle/running.
        with pytest.raises(ResourceExistsError) as ei:
            client.replace_node_user(pool_id, node_id, user, models.BatchNodeUserReplaceOptions(password="Life-pass-2"))
        assert_batch_error(ei, 409, "OperationInvalidForCurrentState")
        client.enable_node_scheduling(pool_id, node_id)
        node = client.get_node(pool_id, node_id)
        assert node.scheduling_state == models.SchedulingState.ENABLED
        assert node.state == models.BatchNodeState.IDLE

        # Reboot keeps users.
        client.begin_reboot_node(pool_id, node_id, {"nodeRebootOption": "requeue"}, polling_interval=1).result(timeout=60)
        wait_node_state(client, pool_id, node_id, (models.BatchNodeState.IDLE,))
        client.replace_node_user(pool_id, node_id, user, models.BatchNodeUserReplaceOptions(password="Life-pass-3"))

        # Reimage removes them (our decision, docs/contract.md §5).
        client.begin_reimage_node(pool_id, node_id, {"nodeReimageOption": "requeue"}, polling_interval=1).result(timeout=60)
        wait_node_state(client, pool_id, node_id, (models.BatchNodeState.IDLE,))
        with pytest.raises(ResourceNotFoundError) as ei:
            client.replace_node_user(pool_id, node_id, user, models.BatchNodeUserReplaceOptions(password="Life-pass-4"))
        assert_batch_error(ei, 404, "NodeUserNotFound")
    finally:
        delete_pool_quietly(client, pool_id)


def test_response_headers(client, linux_node):
    """Writes carry ETag, Last-Modified (RFC 1123) and DataServiceId; client-request-id echoes."""
    pool_id, node_id = linux_node
    seen = {}

    def capture(pipeline_response, _deserialized, headers):
        seen["status"] = pipeline_response.http_response.status_code
        seen["headers"] = headers
        seen["raw"] = dict(pipeline_response.http_response.headers)

    user = unique_user("hdr")
    client.create_node_user(
        pool_id, node_id, models.BatchNodeUserCreateOptions(name=user, password="Hdr-pass-1"), cls=capture
    )
    assert seen["status"] == 201
    assert seen["headers"]["request-id"]
    assert seen["headers"]["ETag"] and seen["headers"]["Last-Modified"] is not None
    assert seen["headers"]["DataServiceId"].endswith(f"/pools/{pool_id}/nodes/{node_id}/users/{user}")

    client.replace_node_user(
        pool_id,
        node_id,
        user,
        models.BatchNodeUserReplaceOptions(password="Hdr-pass-2"),
        headers={"return-client-request-id": "true", "client-request-id": "9c4b3f0e-1f8e-4a6b-9d51-5f0c2b7d3a11"},
        cls=capture,
    )
    assert seen["status"] == 200
    assert seen["headers"]["client-request-id"] == "9c4b3f0e-1f8e-4a6b-9d51-5f0c2b7d3a11"
    assert seen["headers"]["ETag"] and seen["headers"]["Last-Modified"] is not None

    client.delete_node_user(pool_id, node_id, user, cls=capture)
    assert seen["status"] == 200
    assert seen["headers"]["request-id"]
