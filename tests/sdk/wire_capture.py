"""Research tool (not a test): run azure-batch operations against a local capture
server that answers as Azure does, and print each request exactly as received.

Usage: python wire_capture.py > capture.txt
It verifies each request's Shared Key signature with an independent
implementation of the algorithm in docs/contract.md §4.
"""
import base64
import datetime
import hashlib
import hmac
import json
import os
import sys
import threading
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from azure.core.credentials import AzureNamedKeyCredential
from azure.core.exceptions import HttpResponseError
from azure.batch import BatchClient, models

ACCOUNT = "capacct"
KEY = base64.b64encode(b"capture-key-capture-key-32bytes!").decode()
LOG = []
STATE = {"pool_get_calls": 0}

SIGNED = ["content-encoding", "content-language", "content-length", "content-md5",
          "content-type", "date", "if-modified-since", "if-match", "if-none-match",
          "if-unmodified-since", "range"]


def expected_signature(method, target, headers):
    """docs/contract.md §4, written independently of the SDK."""
    h = {k.lower(): v for k, v in headers.items()}
    parts = [method] + [h.get(n, "") for n in SIGNED]
    s = "\n".join(parts) + "\n"
    ocp = sorted((k.lower(), v) for k, v in headers.items() if "ocp-" in k.lower() and v)
    for k, v in ocp:
        s += f"{k}:{v}\n"
    path, _, query = target.partition("?")
    s += f"/{ACCOUNT}{path}"
    q = urllib.parse.parse_qs(query)
    for name in sorted(q):
        if q[name][0]:
            s += f"\n{name}:{q[name][0]}"
    sig = base64.b64encode(hmac.new(base64.b64decode(KEY), s.encode(), hashlib.sha256).digest()).decode()
    return sig, s


def rfc1123(dt=None):
    dt = dt or datetime.datetime.now(datetime.timezone.utc)
    return dt.strftime("%a, %d %b %Y %H:%M:%S GMT")


def batch_error(base, code, msg, values=None):
    rid = str(uuid.uuid4())
    body = {
        "odata.metadata": f"{base}/$metadata#Microsoft.Azure.Batch.Protocol.Entities.Container.errors/@Element",
        "code": code,
        "message": {"lang": "en-US", "value": f"{msg}\nRequestId:{rid}\nTime:2026-11-25T12:00:00.0000000Z"},
    }
    if values:
        body["values"] = [{"key": k, "value": v} for k, v in values]
    return body


NODE = {
    "id": "tvm-1", "url": None, "state": "idle", "schedulingState": "enabled",
    "stateTransitionTime": "2016-11-22T22:22:27.2236818Z", "lastBootTime": "2016-11-22T22:22:24.4634125Z",
    "allocationTime": "2016-11-22T19:32:02.8155319Z", "ipAddress": "127.0.0.1",
    "affinityId": "TVM:tvm-1", "vmSize": "standard_d2s_v3", "totalTasksRun": 0,
    "totalTasksSucceeded": 0, "runningTasksCount": 0, "runningTaskSlotsCount": 0, "isDedicated": True,
    "nodeAgentInfo": {"version": "1.2.0.0", "lastUpdateTime": "2016-11-22T22:22:24.4634125Z"},
}
POOL = {
    "id": "pool1", "eTag": "0x8D413091E739A56", "lastModified": "2016-11-22T18:55:25.2608598Z",
    "creationTime": "2016-11-22T18:55:24.2632496Z", "state": "active",
    "stateTransitionTime": "2016-11-22T18:55:24.2632496Z", "allocationState": "steady",
    "allocationStateTransitionTime": "2016-11-22T18:55:24.8154041Z", "vmSize": "standard_d2s_v3",
    "resizeTimeout": "PT15M", "currentDedicatedNodes": 1, "currentLowPriorityNodes": 0,
    "targetDedicatedNodes": 1, "targetLowPriorityNodes": 0, "enableAutoScale": False,
    "enableInterNodeCommunication": False, "taskSlotsPerNode": 1,
    "taskSchedulingPolicy": {"nodeFillType": "spread"},
    "virtualMachineConfiguration": {
        "imageReference": {"publisher": "Canonical", "offer": "0001-com-ubuntu-server-jammy",
                           "sku": "22_04-lts", "version": "latest"},
        "nodeAgentSKUId": "batch.node.ubuntu 22.04"},
}


class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def _handle(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        hdrs = list(self.headers.items())
        auth = self.headers.get("Authorization", "")
        sig, sts = expected_signature(self.command, self.path, dict(hdrs))
        ok = auth == f"SharedKey {ACCOUNT}:{sig}"
        LOG.append({"line": self.requestline, "headers": hdrs, "body": body.decode(),
                    "sig_ok": ok, "sts": sts})
        base = f"http://{self.headers['Host']}"
        path, _, query = self.path.partition("?")
        q = urllib.parse.parse_qs(query)
        status, payload, extra = self.route(self.command, path, q, base)
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("request-id", str(uuid.uuid4()))
        if self.headers.get("return-client-request-id", "").lower() == "true":
            self.send_header("client-request-id", self.headers.get("client-request-id", ""))
        for k, v in extra.items():
            self.send_header(k, v)
        if payload is not None:
            self.send_header("Content-Type", "application/json;odata=minimalmetadata")
        if self.command != "HEAD" or payload is not None:
            self.send_header("Content-Length", str(len(data)))
        else:
            self.send_header("Content-Length", "0")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _handle

    def route(self, m, path, q, base):
        w = {"ETag": "0x8D413091E739A56", "Last-Modified": rfc1123(), "DataServiceId": base + path}
        seg = path.strip("/").split("/")
        if path == "/pools" and m == "POST":
            return 201, None, w
        if path == "/pools" and m == "GET":
            if "$skiptoken" in q:
                return 200, {"odata.metadata": f"{base}/$metadata#pools", "value": [dict(POOL, id="pool2", url=base + "/pools/pool2")]}, {}
            return 200, {"odata.metadata": f"{base}/$metadata#pools",
                         "value": [dict(POOL, url=base + "/pools/pool1")],
                         "odata.nextLink": f"{base}/pools?api-version=2025-06-01&maxresults=1&$skiptoken=pool1%20x%2By"}, {}
        if len(seg) == 2 and seg[0] == "pools":
            pid = seg[1]
            if pid == "missing":
                if m == "HEAD":
                    return 404, None, {}
                return 404, batch_error(base, "PoolNotFound", "The specified pool does not exist."), {}
            if m == "HEAD":
                return 200, None, {"ETag": w["ETag"], "Last-Modified": w["Last-Modified"]}
            if m == "DELETE":
                STATE["pool_get_calls"] = 0
                return 202, None, {}
            if m == "GET":
                STATE["pool_get_calls"] += 1
                if pid == "deleting":
                    if STATE["pool_get_calls"] == 1:
                        return 200, dict(POOL, id=pid, state="deleting", url=base + path), {}
                    return 404, batch_error(base, "PoolNotFound", "The specified pool does not exist."), {}
                return 200, dict(POOL, id=pid, url=base + path, **{"odata.metadata": f"{base}/$metadata#pools/@Element"}), {"ETag": w["ETag"], "Last-Modified": w["Last-Modified"]}
        if len(seg) == 3 and seg[2] in ("resize", "removenodes"):
            return 202, None, w
        if len(seg) == 3 and seg[2] == "nodes":
            return 200, {"odata.metadata": f"{base}/$metadata#nodes", "value": [dict(NODE, url=base + path + "/tvm-1")]}, {}
        if len(seg) == 4 and seg[2] == "nodes":
            if seg[3] == "nosuchnode":
                return 404, batch_error(base, "NodeNotFound", "The specified node does not exist."), {}
            return 200, dict(NODE, url=base + path, **{"odata.metadata": f"{base}/$metadata#nodes/@Element"}), {"ETag": w["ETag"], "Last-Modified": w["Last-Modified"]}
        if len(seg) == 5 and seg[4] == "users" and m == "POST":
            if json.loads(self_body(LOG)).get("name") == "dup":
                return 409, batch_error(base, "NodeUserExists", "The specified node user already exists."), {}
            return 201, None, w
        if len(seg) == 6 and seg[4] == "users":
            if seg[5] == "ghost":
                return 404, batch_error(base, "NodeUserNotFound", "The node user does not exist.",
                                        [("UserName", "ghost")]), {}
            if m == "PUT":
                return 200, None, w
            if m == "DELETE":
                return 200, None, {}
        if len(seg) == 5 and seg[4] == "remoteloginsettings":
            return 200, {"remoteLoginIPAddress": "127.0.0.1", "remoteLoginPort": 50022}, {"ETag": w["ETag"], "Last-Modified": w["Last-Modified"]}
        if len(seg) == 5 and seg[4] in ("reboot", "reimage"):
            return 202, None, w
        if len(seg) == 5 and seg[4] in ("disablescheduling", "enablescheduling"):
            return 200, None, w
        return 400, batch_error(base, "InvalidUri", "The requested URI does not represent any resource on the server."), {}


def self_body(log):
    return log[-1]["body"] or "{}"


def main():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    port = srv.server_address[1]
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    c = BatchClient(url, AzureNamedKeyCredential(ACCOUNT, KEY))

    def run(label, fn):
        start = len(LOG)
        try:
            r = fn()
            res = f"returned {r!r}"[:600]
        except HttpResponseError as e:
            res = (f"raised {type(e).__name__} status={e.status_code} "
                   f"error.code={getattr(e.error, 'code', None)!r} "
                   f"error.message={getattr(e.error, 'message', None)!r} "
                   f"details={[(d.code, d.message) for d in (e.error.details if e.error else [])]!r} "
                   f"model.code={getattr(e.model, 'code', None)!r}")
        except Exception as e:  # noqa
            res = f"raised {type(e).__name__}: {e}"
        print(f"=== {label}\n--- result: {res}")
        for r in LOG[start:]:
            print(f"> {r['line']}")
            for k, v in r["headers"]:
                print(f">   {k}: {v}")
            if r["body"]:
                print(f">   BODY {r['body']}")
            print(f">   signature verified by CONTRACT algorithm: {r['sig_ok']}")
        print()

    vm = models.VirtualMachineConfiguration(
        image_reference=models.BatchVmImageReference(publisher="Canonical", offer="0001-com-ubuntu-server-jammy",
                                                     sku="22_04-lts", version="latest"),
        node_agent_sku_id="batch.node.ubuntu 22.04")
    run("create_pool", lambda: c.create_pool(models.BatchPoolCreateOptions(
        id="pool1", vm_size="STANDARD_D2S_V3", virtual_machine_configuration=vm, target_dedicated_nodes=2)))
    run("create_pool timeout=30", lambda: c.create_pool(models.BatchPoolCreateOptions(
        id="pool1", vm_size="STANDARD_D2S_V3", virtual_machine_configuration=vm), service_timeout=30))
    run("get_pool", lambda: (lambda p: (p.id, p.state, p.allocation_state, p.last_modified, p.creation_time))(c.get_pool("pool1")))
    run("get_pool select", lambda: c.get_pool("pool1", select=["id", "state"]).id)
    run("list_pools (2 pages)", lambda: [p.id for p in c.list_pools(max_results=1, filter="startswith(id,'po')")])
    run("pool_exists (200)", lambda: c.pool_exists("pool1"))
    run("pool_exists (404)", lambda: c.pool_exists("missing"))
    run("get_pool (404)", lambda: c.get_pool("missing"))
    run("begin_delete_pool + result()", lambda: c.begin_delete_pool("deleting", polling_interval=0).result())
    run("begin_resize_pool + result()", lambda: c.begin_resize_pool(
        "pool1", models.BatchPoolResizeOptions(target_dedicated_nodes=3), polling_interval=0).result())
    run("begin_remove_nodes + result()", lambda: c.begin_remove_nodes(
        "pool1", models.BatchNodeRemoveOptions(node_ids=["tvm-1"]), polling_interval=0).result())
    run("list_nodes", lambda: [(n.id, n.state, n.state_transition_time, n.is_dedicated) for n in c.list_nodes("pool1", filter="state eq 'idle'")])
    run("get_node", lambda: (lambda n: (n.id, n.state, n.scheduling_state, n.ip_address, n.affinity_id, n.last_boot_time))(c.get_node("pool1", "tvm-1")))
    run("get_node (404)", lambda: c.get_node("pool1", "nosuchnode"))
    run("create_node_user", lambda: c.create_node_user("pool1", "tvm-1", models.BatchNodeUserCreateOptions(
        name="alice", password="Secret-1", is_admin=False,
        expiry_time=datetime.datetime(2030, 1, 2, 3, 4, 5, 123456, tzinfo=datetime.timezone.utc))))
    run("create_node_user dup", lambda: c.create_node_user("pool1", "tvm-1", models.BatchNodeUserCreateOptions(name="dup", password="x")))
    run("replace_node_user", lambda: c.replace_node_user("pool1", "tvm-1", "alice", models.BatchNodeUserReplaceOptions(
        password="Secret-2", expiry_time=datetime.datetime(2030, 1, 2, tzinfo=datetime.timezone.utc))))
    run("replace_node_user key only", lambda: c.replace_node_user("pool1", "tvm-1", "alice", models.BatchNodeUserReplaceOptions(
        ssh_public_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDummy comment")))
    run("replace_node_user empty options", lambda: c.replace_node_user("pool1", "tvm-1", "alice", models.BatchNodeUserReplaceOptions()))
    run("replace_node_user (404 user)", lambda: c.replace_node_user("pool1", "tvm-1", "ghost", models.BatchNodeUserReplaceOptions(password="x")))
    run("replace_node_user name with space", lambda: c.replace_node_user("pool1", "tvm-1", "a b+c", models.BatchNodeUserReplaceOptions(password="x")))
    run("delete_node_user", lambda: c.delete_node_user("pool1", "tvm-1", "alice"))
    run("get_node_remote_login_settings", lambda: (lambda s: (s.remote_login_ip_address, s.remote_login_port))(c.get_node_remote_login_settings("pool1", "tvm-1")))
    run("begin_reboot_node + result()", lambda: c.begin_reboot_node("pool1", "tvm-1", polling_interval=0).result())
    run("begin_reboot_node with options", lambda: c.begin_reboot_node("pool1", "tvm-1", models._models.BatchNodeRebootOptions(node_reboot_kind="requeue"), polling_interval=0).result())
    run("begin_reboot_node with {}", lambda: c.begin_reboot_node("pool1", "tvm-1", {}, polling_interval=0).result())
    run("begin_reimage_node + result()", lambda: c.begin_reimage_node("pool1", "tvm-1", polling_interval=0).result())
    run("begin_reimage_node with options", lambda: c.begin_reimage_node("pool1", "tvm-1", models._models.BatchNodeReimageOptions(node_reimage_option="requeue"), polling_interval=0).result())
    run("disable_node_scheduling", lambda: c.disable_node_scheduling("pool1", "tvm-1"))
    run("disable_node_scheduling with options", lambda: c.disable_node_scheduling("pool1", "tvm-1", models.BatchNodeDisableSchedulingOptions(node_disable_scheduling_option="taskcompletion")))
    run("enable_node_scheduling", lambda: c.enable_node_scheduling("pool1", "tvm-1"))
    run("get_pool with return_client_request_id header", lambda: c.get_pool("pool1", headers={"return-client-request-id": "true"}).id)
    srv.shutdown()


if __name__ == "__main__":
    main()
