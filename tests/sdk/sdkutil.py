"""Helpers shared by the real-client tests (azure-batch 15.1.0 against bluebatch).

Notes on azure-batch 15.1.0 behaviour the helpers work around (see CLIENTS.md):
- `begin_reboot_node`, `begin_reimage_node` and `disable_node_scheduling` raise
  `ValueError("No value for given attribute")` client-side when called without a non-empty
  options object (the generated builder serialises a `None` content-type), so we always pass one.
- `BatchNodeRebootOptions` / `BatchNodeReimageOptions` are not exported from `azure.batch.models`;
  plain dicts with the REST property names serialise to the same body.
- `pool_exists` raises `ResourceNotFoundError` on 404 (the SDK's `BatchExceptionPolicy` raises on
  every non-2xx before the operation can return False).
"""
from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import time
import uuid

import pytest
from azure.core.exceptions import HttpResponseError
from azure.batch import models

LINUX_IMAGE = dict(publisher="Canonical", offer="0001-com-ubuntu-server-jammy", sku="22_04-lts", version="latest")
LINUX_AGENT = "batch.node.ubuntu 22.04"
WINDOWS_IMAGE = dict(publisher="MicrosoftWindowsServer", offer="WindowsServer", sku="2022-datacenter", version="latest")
WINDOWS_AGENT = "batch.node.windows amd64"
VM_SIZE = "STANDARD_D2S_V3"

NODE_WAIT_SECONDS = 30
POLL_INTERVAL = 0.5


def unique(prefix: str) -> str:
    """A pool id / user name that no other test uses (pool ids: letters, digits, '-', '_')."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def unique_user(prefix: str = "u") -> str:
    # Linux user names: [A-Za-z_][A-Za-z0-9_.-]{0,31}; Windows: at most 20 characters.
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def error_code(exc: HttpResponseError):
    """The Batch error code as the SDK exposes it.

    azure-batch parses the body with its BatchErrorFormat into `exc.error` (`.code`,
    `.message` = message.value, `.details` from `values`), and also deserialises it into
    `exc.model` (a `BatchError`: `.code`, `.message.value`, `.error_values`).
    """
    if exc.error is not None and exc.error.code:
        return exc.error.code
    model = getattr(exc, "model", None)
    return getattr(model, "code", None)


def assert_batch_error(exc_info, status: int, code: str):
    exc = exc_info.value
    body = ""
    try:
        body = exc.response.text()
    except Exception:  # noqa: BLE001
        pass
    assert exc.status_code == status, f"expected HTTP {status} {code}, got {exc.status_code}: {body}"
    assert error_code(exc) == code, f"expected Batch error code {code!r}, got {error_code(exc)!r}: {body}"
    # Azure's error bodies carry a message object; the SDK surfaces message.value as .message.
    assert exc.error is not None and exc.error.message, f"error body lacks message.value: {body}"
    # The message ends with "RequestId:<request-id header>" and "Time:..." lines (docs/contract.md §3).
    request_id = exc.response.headers.get("request-id")
    assert request_id, "error response lacks a request-id header"
    assert f"\nRequestId:{request_id}\n" in exc.error.message, f"message lacks RequestId line: {exc.error.message!r}"
    assert "\nTime:" in exc.error.message, f"message lacks Time line: {exc.error.message!r}"


def error_values(exc: HttpResponseError) -> dict:
    """The `values` of a Batch error as {key: value} (exposed by the SDK as error.details)."""
    return {d.code: d.message for d in (exc.error.details if exc.error else [])}


def linux_pool(pool_id: str, nodes: int = 1) -> models.BatchPoolCreateOptions:
    return models.BatchPoolCreateOptions(
        id=pool_id,
        vm_size=VM_SIZE,
        virtual_machine_configuration=models.VirtualMachineConfiguration(
            image_reference=models.BatchVmImageReference(**LINUX_IMAGE),
            node_agent_sku_id=LINUX_AGENT,
        ),
        target_dedicated_nodes=nodes,
    )


def windows_vm_pool(pool_id: str, nodes: int = 1) -> models.BatchPoolCreateOptions:
    return models.BatchPoolCreateOptions(
        id=pool_id,
        vm_size=VM_SIZE,
        virtual_machine_configuration=models.VirtualMachineConfiguration(
            image_reference=models.BatchVmImageReference(**WINDOWS_IMAGE),
            node_agent_sku_id=WINDOWS_AGENT,
        ),
        target_dedicated_nodes=nodes,
    )


def cloud_service_pool(pool_id: str, nodes: int = 1) -> models.BatchPoolCreateOptions:
    # azure-batch 15.1 has no model for cloudServiceConfiguration (removed from the REST API
    # in 2024-07-01); a raw mapping serialises as given.
    return models.BatchPoolCreateOptions(
        {
            "id": pool_id,
            "vmSize": "standard_d2_v2",
            "cloudServiceConfiguration": {"osFamily": "6"},
            "targetDedicatedNodes": nodes,
        }
    )


def wait_nodes(client, pool_id: str, count: int, states=("idle",), timeout: float = NODE_WAIT_SECONDS):
    """Poll list_nodes until exactly `count` nodes are all in one of `states`."""
    deadline = time.monotonic() + timeout
    nodes = []
    while True:
        nodes = list(client.list_nodes(pool_id))
        if len(nodes) == count and all(n.state in states for n in nodes):
            return nodes
        if time.monotonic() > deadline:
            seen = [(n.id, n.state) for n in nodes]
            pytest.fail(f"pool {pool_id}: wanted {count} node(s) in {states} within {timeout}s, saw {seen}")
        time.sleep(POLL_INTERVAL)


def wait_node_state(client, pool_id: str, node_id: str, states, timeout: float = NODE_WAIT_SECONDS):
    deadline = time.monotonic() + timeout
    while True:
        node = client.get_node(pool_id, node_id)
        if node.state in states:
            return node
        if time.monotonic() > deadline:
            pytest.fail(f"node {pool_id}/{node_id}: wanted state in {states} within {timeout}s, last {node.state}")
        time.sleep(POLL_INTERVAL)


def make_pool(client, options: models.BatchPoolCreateOptions, nodes: int):
    client.create_pool(options)
    return wait_nodes(client, options.id, nodes)


def delete_pool_quietly(client, pool_id: str):
    try:
        client.begin_delete_pool(pool_id, polling_interval=1)
    except HttpResponseError:
        pass


def generate_ssh_key(directory) -> tuple[str, str]:
    """Generate an ed25519 key pair with ssh-keygen; returns (private key path, public key line)."""
    if shutil.which("ssh-keygen") is None:
        pytest.fail("ssh-keygen is not installed (apt-get install openssh-client)")
    path = os.path.join(str(directory), f"id_ed25519_{uuid.uuid4().hex[:6]}")
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bluebatch-sdk-test", "-f", path],
        check=True,
        stdin=subprocess.DEVNULL,
        timeout=30,
    )
    with open(path + ".pub", encoding="ascii") as f:
        public = f.read().strip()
    return path, public
