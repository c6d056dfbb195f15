//! Operations of the published Batch API that bluebatch does not serve answer 501
//! `NotImplemented` naming the operation; paths that name nothing stay 400 `InvalidUri`; a wrong
//! method on a published path is 405. Like those two, the 501 is decided by the route alone:
//! before api-version and authentication (CONTRACT §1's order).

mod common;

use common::{ACCOUNT, Client, Resp, Server};
use std::time::Duration;

async fn within<F: std::future::Future<Output = ()>>(f: F) {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .expect("the test did not finish within 60 s");
}

fn assert_not_served(r: &Resp, operation: &str, what: &str) {
    let body = String::from_utf8_lossy(&r.body);
    assert_eq!(r.status, 501, "{what}: {body}");
    let request_id = r.header("request-id").expect("request-id").to_string();
    if r.body.is_empty() {
        return; // HEAD
    }
    assert_eq!(r.code(), "NotImplemented", "{what}: {body}");
    assert_eq!(
        r.value("Operation").as_deref(),
        Some(operation),
        "{what}: {body}"
    );
    let message = r.json()["message"]["value"].as_str().unwrap().to_string();
    assert!(
        message.contains(operation) && message.contains("bluebatch"),
        "{what}: {message}"
    );
    assert!(
        message.contains(&format!("RequestId:{request_id}")),
        "{message}"
    );
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("application/json"),
        "{what}"
    );
}

const SAMPLE: &[(&str, &str, &str)] = &[
    ("POST", "/jobs", "Job_Add"),
    ("GET", "/jobs", "Job_List"),
    ("GET", "/jobs/j", "Job_Get"),
    ("GET", "/jobs/j/tasks", "Task_List"),
    ("POST", "/jobs/j/addtaskcollection", "Task_AddCollection"),
    ("GET", "/jobs/j/tasks/t/subtasksinfo", "Task_ListSubtasks"),
    (
        "GET",
        "/jobs/j/tasks/t/files/wd%2Fstdout.txt",
        "File_GetFromTask",
    ),
    (
        "DELETE",
        "/jobs/j/tasks/t/files/wd/a/b.txt",
        "File_DeleteFromTask",
    ),
    ("GET", "/jobschedules", "JobSchedule_List"),
    ("HEAD", "/jobschedules/s", "JobSchedule_Exists"),
    ("GET", "/certificates", "Certificate_List"),
    (
        "GET",
        "/certificates(thumbprintAlgorithm=sha1,thumbprint=0123456789abcdef)",
        "Certificate_Get",
    ),
    ("GET", "/applications", "Application_List"),
    ("GET", "/supportedimages", "Account_ListSupportedImages"),
    ("GET", "/nodecounts", "Account_ListPoolNodeCounts"),
    ("GET", "/poolusagemetrics", "Pool_ListUsageMetrics"),
    ("GET", "/lifetimepoolstats", "Pool_GetAllLifetimeStatistics"),
    ("PATCH", "/pools/p", "Pool_Patch"),
    ("POST", "/pools/p/enableautoscale", "Pool_EnableAutoScale"),
    ("POST", "/pools/p/stopresize", "Pool_StopResize"),
    ("POST", "/pools/p/updateproperties", "Pool_UpdateProperties"),
    ("GET", "/pools/p/nodes/n/files", "File_ListFromComputeNode"),
    (
        "HEAD",
        "/pools/p/nodes/n/files/startup/stdout.txt",
        "File_GetPropertiesFromComputeNode",
    ),
    (
        "GET",
        "/pools/p/nodes/n/extensions",
        "ComputeNodeExtension_List",
    ),
    (
        "GET",
        "/pools/p/nodes/n/rdp",
        "ComputeNode_GetRemoteDesktop",
    ),
    (
        "POST",
        "/pools/p/nodes/n/uploadbatchservicelogs",
        "ComputeNode_UploadBatchServiceLogs",
    ),
    ("POST", "/pools/p/nodes/n/start", "ComputeNode_Start"),
    (
        "POST",
        "/pools/p/nodes/n/deallocate",
        "ComputeNode_Deallocate",
    ),
];

#[tokio::test]
async fn published_operations_not_served_answer_501_naming_them() {
    within(async {
        let srv = Server::start();
        let c = srv.client();
        for (method, path, op) in SAMPLE {
            let mut req = c.req(method, path);
            if *method == "POST" || *method == "PATCH" {
                req = req.json(&serde_json::json!({"id": "j"}));
            }
            assert_not_served(&req.send().await, op, &format!("{method} {path}"));
        }
        // Every api-version the SDKs send, and the query parameters of those operations.
        for v in ["2024-02-01.19.0", "2025-06-01", "2022-10-01.16.0"] {
            let r = c
                .req("GET", "/jobs/j/tasks")
                .query(&format!(
                    "api-version={v}&$filter=state%20eq%20'active'&maxresults=10"
                ))
                .send()
                .await;
            assert_not_served(&r, "Task_List", v);
        }
    })
    .await;
}

#[tokio::test]
async fn the_501_comes_from_the_route_before_version_and_credentials() {
    within(async {
        let srv = Server::start();
        let c = srv.client();
        let stranger = Client::new(&srv.url, ACCOUNT, "d3Jvbmcta2V5LXdyb25nLWtleQ==");
        // No api-version, no credentials, wrong key: the route decides first, as for 405 and
        // InvalidUri (it names a public operation and reveals nothing of the account).
        let r = c.req("POST", "/jobs").query("").unsigned().send().await;
        assert_not_served(&r, "Job_Add", "unsigned, no api-version");
        let r = stranger.req("GET", "/certificates").send().await;
        assert_not_served(&r, "Certificate_List", "wrong key");
        let r = c
            .req("GET", "/jobs")
            .query("api-version=1999-01-01.0.0")
            .send()
            .await;
        assert_not_served(&r, "Job_List", "unknown api-version");

        // Not in the published API: InvalidUri, as before.
        for path in [
            "/nonsense",
            "/jobs/j/nonsense",
            "/certificates(thumbprint=x)",
            "/pools/p/nodes/n/logs",
        ] {
            let r = c.req("GET", path).send().await;
            assert_eq!(
                (r.status, r.code().as_str()),
                (400, "InvalidUri"),
                "{path}: {:?}",
                String::from_utf8_lossy(&r.body)
            );
        }
        // A published path with a method no operation has there: 405.
        for (method, path) in [
            ("PUT", "/jobs"),
            ("GET", "/jobs/j/terminate"),
            ("POST", "/nodecounts"),
            ("DELETE", "/pools/p/nodes/n"),
        ] {
            let r = c.req(method, path).send().await;
            assert_eq!(
                (r.status, r.code().as_str()),
                (405, "UnsupportedHttpVerb"),
                "{method} {path}"
            );
        }
        // Served operations are unchanged.
        let r = c.req("GET", "/pools").send().await;
        assert_eq!(r.status, 200);
    })
    .await;
}
