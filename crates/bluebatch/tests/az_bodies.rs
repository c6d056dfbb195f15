//! The bodies the az CLI 2.91 (azure-batch 15.0.0b1) sends, at the HTTP level: integers and
//! booleans as JSON strings (`"targetDedicatedNodes": "1"`), and the Disable Scheduling option
//! wrapped once in an object of its own name. Accepted and applied; anything else stays a 400
//! naming the property.

mod common;

use common::{Client, Resp, Server};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// Every test is bounded: a hang fails instead of blocking.
async fn within<F: std::future::Future<Output = ()>>(f: F) {
    tokio::time::timeout(Duration::from_secs(90), f)
        .await
        .expect("the test did not finish within 90 s");
}

fn body(r: &Resp) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}

/// `az batch pool create --id {id} --vm-size standard_d2s_v3 --target-dedicated-nodes {n}
/// --image canonical:0001-com-ubuntu-server-jammy:22_04-lts --node-agent-sku-id "batch.node.ubuntu 22.04"`
fn az_pool(id: &str, dedicated: Value) -> Value {
    json!({
        "id": id,
        "vmSize": "standard_d2s_v3",
        "virtualMachineConfiguration": {
            "imageReference": {"publisher": "canonical", "offer": "0001-com-ubuntu-server-jammy",
                               "sku": "22_04-lts"},
            "nodeAgentSKUId": "batch.node.ubuntu 22.04"
        },
        "targetDedicatedNodes": dedicated
    })
}

/// Waits until the pool has `dedicated` + `low` nodes, all idle; returns the node list.
async fn wait_nodes(c: &Client, pool: &str, dedicated: usize, low: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = c.req("GET", &format!("/pools/{pool}/nodes")).send().await;
        assert_eq!(r.status, 200, "{}", body(&r));
        let list = r.json()["value"].as_array().unwrap().clone();
        let d = list.iter().filter(|n| n["isDedicated"] == true).count();
        let l = list.iter().filter(|n| n["isDedicated"] == false).count();
        if (d, l) == (dedicated, low) && list.iter().all(|n| n["state"] == "idle") {
            return list;
        }
        assert!(
            Instant::now() < deadline,
            "the pool never reached {dedicated}+{low} idle nodes: {list:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn assert_wrong_type(r: &Resp, property: &str, what: &str) {
    assert_eq!(
        (r.status, r.code().as_str()),
        (400, "InvalidRequestBody"),
        "{what}: {}",
        body(r)
    );
    assert_eq!(
        r.value("PropertyName").as_deref(),
        Some(property),
        "{what}: {}",
        body(r)
    );
}

const NOT_INTEGERS: [&str; 6] = ["1.5", "abc", "1e3", " 1", "", "0x1"];

#[tokio::test]
async fn pool_create_and_resize_with_node_counts_as_strings() {
    within(async {
        let srv = Server::start();
        let c = srv.client();
        let r = c
            .req("POST", "/pools")
            .json(&az_pool("azpool", json!("1")))
            .send()
            .await;
        assert_eq!(r.status, 201, "{}", body(&r));
        wait_nodes(&c, "azpool", 1, 0).await;
        let p = c.req("GET", "/pools/azpool").send().await.json();
        assert_eq!(
            (&p["targetDedicatedNodes"], &p["currentDedicatedNodes"]),
            (&json!(1), &json!(1)),
            "{p}"
        );

        // az batch pool resize --pool-id azpool --target-dedicated-nodes 3 --target-low-priority-nodes 1
        let r = c
            .req("POST", "/pools/azpool/resize")
            .json(&json!({"targetDedicatedNodes": "3", "targetLowPriorityNodes": "1"}))
            .send()
            .await;
        assert_eq!(r.status, 202, "{}", body(&r));
        wait_nodes(&c, "azpool", 3, 1).await;
        let p = c.req("GET", "/pools/azpool").send().await.json();
        assert_eq!(p["targetDedicatedNodes"], 3, "{p}");
        assert_eq!(p["targetLowPriorityNodes"], 1, "{p}");
        assert_eq!(p["currentLowPriorityNodes"], 1, "{p}");

        // Other integer and boolean properties: read as their values and returned typed.
        let mut v = az_pool("azpool2", json!("0"));
        v["taskSlotsPerNode"] = json!("2");
        v["enableInterNodeCommunication"] = json!("true");
        v["enableAutoScale"] = json!("false");
        let r = c.req("POST", "/pools").json(&v).send().await;
        assert_eq!(r.status, 201, "{}", body(&r));
        let p = c.req("GET", "/pools/azpool2").send().await.json();
        assert_eq!(p["taskSlotsPerNode"], 2, "{p}");
        assert_eq!(p["enableInterNodeCommunication"], true, "{p}");
        assert_eq!(p["enableAutoScale"], false, "{p}");
        assert_eq!(p["targetDedicatedNodes"], 0, "{p}");
        // A string still goes through the value rules.
        let r = c
            .req("POST", "/pools")
            .json(&az_pool("azneg", json!("-1")))
            .send()
            .await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (400, "InvalidPropertyValue"),
            "{}",
            body(&r)
        );
        let r = c
            .req("POST", "/pools/azpool/resize")
            .json(&json!({"targetDedicatedNodes": "100000"}))
            .send()
            .await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (400, "InvalidPropertyValue"),
            "{}",
            body(&r)
        );
    })
    .await;
}

#[tokio::test]
async fn strings_that_are_not_decimal_integers_stay_400() {
    within(async {
        let srv = Server::start();
        let c = srv.client();
        c.ready_pool("p", "linux", 1).await;
        for bad in NOT_INTEGERS {
            let r = c
                .req("POST", "/pools")
                .json(&az_pool("bad", json!(bad)))
                .send()
                .await;
            assert_wrong_type(&r, "targetDedicatedNodes", &format!("add {bad:?}"));
            let r = c
                .req("POST", "/pools/p/resize")
                .json(&json!({"targetDedicatedNodes": 1, "targetLowPriorityNodes": bad}))
                .send()
                .await;
            assert_wrong_type(&r, "targetLowPriorityNodes", &format!("resize {bad:?}"));
        }
        let mut v = az_pool("bad", json!("1"));
        v["taskSlotsPerNode"] = json!("two");
        let r = c.req("POST", "/pools").json(&v).send().await;
        assert_wrong_type(&r, "taskSlotsPerNode", "taskSlotsPerNode");
        for bad in [json!("True"), json!("yes"), json!(1), json!("")] {
            let mut v = az_pool("bad", json!("1"));
            v["enableAutoScale"] = bad.clone();
            let r = c.req("POST", "/pools").json(&v).send().await;
            assert_wrong_type(&r, "enableAutoScale", &format!("{bad}"));
        }
        // Nothing was created or resized by the refused bodies.
        let r = c.req("GET", "/pools/bad").send().await;
        assert_eq!(r.status, 404);
        let p = c.req("GET", "/pools/p").send().await.json();
        assert_eq!(
            (&p["targetDedicatedNodes"], &p["targetLowPriorityNodes"]),
            (&json!(1), &json!(0))
        );
    })
    .await;
}

#[tokio::test]
async fn node_user_is_admin_as_a_string_and_strict_otherwise() {
    within(async {
        let srv = Server::start();
        let c = srv.client();
        let nodes = c.ready_pool("p", "linux", 1).await;
        let users = format!("/pools/p/nodes/{}/users", nodes[0]);
        // az batch node user create --is-admin sends the boolean as given.
        for (name, admin) in [("adm", "true"), ("plain", "false")] {
            let r = c
                .req("POST", &users)
                .json(&json!({"name": name, "isAdmin": admin, "password": "pw-1"}))
                .send()
                .await;
            assert_eq!(r.status, 201, "{name}: {}", body(&r));
        }
        let applied = c
            .control("GET", &format!("/pools/p/nodes/{}/users", nodes[0]))
            .send()
            .await;
        assert_eq!(applied.status, 200, "{}", body(&applied));
        let text = body(&applied);
        let list: Value = serde_json::from_str(&text).unwrap();
        let admin_of = |name: &str| {
            list.as_array()
                .or_else(|| list["users"].as_array())
                .or_else(|| list["value"].as_array())
                .and_then(|a| a.iter().find(|u| u["name"] == name))
                .map(|u| u["isAdmin"].clone())
        };
        assert_eq!(admin_of("adm"), Some(json!(true)), "{text}");
        assert_eq!(admin_of("plain"), Some(json!(false)), "{text}");
        for (bad, what) in [
            (json!({"name": "x", "isAdmin": "TRUE"}), "isAdmin TRUE"),
            (json!({"name": "x", "isAdmin": "1"}), "isAdmin \"1\""),
            (json!({"name": "x", "isAdmin": 1}), "isAdmin 1"),
        ] {
            let r = c.req("POST", &users).json(&bad).send().await;
            assert_wrong_type(&r, "isAdmin", what);
        }
        // Node-user bodies stay strict about unknown properties.
        let r = c
            .req("POST", &users)
            .json(&json!({"name": "x", "uid": "0"}))
            .send()
            .await;
        assert_wrong_type(&r, "uid", "unknown property on add");
        let r = c
            .req("PUT", &format!("{users}/adm"))
            .json(&json!({"password": "pw-2", "isAdmin": "true"}))
            .send()
            .await;
        assert_wrong_type(&r, "isAdmin", "isAdmin on update");
    })
    .await;
}

#[tokio::test]
async fn disable_scheduling_option_wrapped_once_is_accepted() {
    within(async {
        let srv = Server::start();
        let c = srv.client();
        let nodes = c.ready_pool("p", "linux", 1).await;
        let node = format!("/pools/p/nodes/{}", nodes[0]);
        let state = |v: Value| (v["state"].clone(), v["schedulingState"].clone());

        // Doubly wrapped, or wrapped beside another property: refused, nothing changes.
        for (bad, property) in [
            (
                json!({"nodeDisableSchedulingOption": {"nodeDisableSchedulingOption":
                    {"nodeDisableSchedulingOption": "taskcompletion"}}}),
                "nodeDisableSchedulingOption",
            ),
            (
                json!({"nodeDisableSchedulingOption": {"nodeDisableSchedulingOption": "requeue",
                    "extra": 1}}),
                "extra",
            ),
        ] {
            let r = c
                .req("POST", &format!("{node}/disablescheduling"))
                .json(&bad)
                .send()
                .await;
            assert_wrong_type(&r, property, &bad.to_string());
        }
        let r = c
            .req("POST", &format!("{node}/disablescheduling"))
            .json(&json!({"nodeDisableSchedulingOption": {"nodeDisableSchedulingOption": "later"}}))
            .send()
            .await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (400, "InvalidPropertyValue"),
            "{}",
            body(&r)
        );
        assert_eq!(
            state(c.req("GET", &node).send().await.json()),
            (json!("idle"), json!("enabled"))
        );

        // az batch node scheduling disable --node-disable-scheduling-option taskcompletion
        let r = c
            .req("POST", &format!("{node}/disablescheduling"))
            .json(
                &json!({"nodeDisableSchedulingOption": {"nodeDisableSchedulingOption": "taskcompletion"}}),
            )
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", body(&r));
        assert_eq!(
            state(c.req("GET", &node).send().await.json()),
            (json!("offline"), json!("disabled"))
        );
        let r = c
            .req("POST", &format!("{node}/enablescheduling"))
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", body(&r));
        // The plain form, as azure-batch 15.1 sends it, still works.
        let r = c
            .req("POST", &format!("{node}/disablescheduling"))
            .json(&json!({"nodeDisableSchedulingOption": "requeue"}))
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", body(&r));
        // Reboot's option is not wrapped by any client: a wrapped one stays refused.
        let r = c
            .req("POST", &format!("{node}/reboot"))
            .json(&json!({"nodeRebootOption": {"nodeRebootOption": "requeue"}}))
            .send()
            .await;
        assert_wrong_type(&r, "nodeRebootOption", "wrapped reboot option");
    })
    .await;
}

/// `az batch pool create … --target-low-priority-nodes 1 --task-slots-per-node 2
/// --enable-inter-node-communication --resize-timeout PT10M --metadata a=b
/// --start-task-command-line /bin/true --start-task-max-task-retry-count 2
/// --start-task-wait-for-success --os-disk-size 64 --max-batch-instance-percent 20`, as sent.
#[tokio::test]
async fn az_pool_create_with_more_options_is_stored_typed() {
    within(async {
        let srv = Server::start();
        let c = srv.client();
        let sent = json!({"id": "p2", "vmSize": "standard_d2s_v3",
            "virtualMachineConfiguration": {
                "imageReference": {"publisher": "canonical",
                    "offer": "0001-com-ubuntu-server-jammy", "sku": "22_04-lts"},
                "nodeAgentSKUId": "batch.node.ubuntu 22.04", "osDisk": {"diskSizeGB": "64"}},
            "resizeTimeout": "PT10M00S", "targetDedicatedNodes": "2", "targetLowPriorityNodes": "1",
            "enableInterNodeCommunication": true,
            "startTask": {"commandLine": "/bin/true", "maxTaskRetryCount": "2", "waitForSuccess": true},
            "upgradePolicy": {"mode": "automatic",
                "automaticOSUpgradePolicy": {"enableAutomaticOSUpgrade": true},
                "rollingUpgradePolicy": {"maxBatchInstancePercent": "20"}},
            "taskSlotsPerNode": "2", "metadata": [{"name": "a", "value": "b"}]});
        let r = c.req("POST", "/pools").json(&sent).send().await;
        assert_eq!(r.status, 201, "{}", body(&r));
        wait_nodes(&c, "p2", 2, 1).await;
        let p = c.req("GET", "/pools/p2").send().await.json();
        assert_eq!(p["taskSlotsPerNode"], 2, "{p}");
        assert_eq!(
            p["virtualMachineConfiguration"]["osDisk"]["diskSizeGB"], 64,
            "{p}"
        );
        assert_eq!(p["startTask"]["maxTaskRetryCount"], 2, "{p}");
        assert_eq!(p["startTask"]["waitForSuccess"], true, "{p}");
        assert_eq!(
            p["upgradePolicy"]["rollingUpgradePolicy"]["maxBatchInstancePercent"], 20,
            "{p}"
        );
        assert_eq!(p["metadata"], json!([{"name": "a", "value": "b"}]), "{p}");
    })
    .await;
}
