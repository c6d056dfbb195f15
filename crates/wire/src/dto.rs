//! JSON as Batch writes it: CloudPool, ComputeNode, remote login settings. Domain types stay in
//! bluebatch-core; these functions are the only place their wire shape is decided.

use crate::percent::encode_into;
use bluebatch_core::model::{AllocationState, Os, PoolState};
use bluebatch_core::timefmt::iso;
use bluebatch_service::{NodeView, PoolView};
use serde_json::{Map, Value, json};

pub fn pool_url(base: &str, pool_id: &str) -> String {
    url(base, &[("/pools/", pool_id)])
}

pub fn node_url(base: &str, pool_id: &str, node_id: &str) -> String {
    url(base, &[("/pools/", pool_id), ("/nodes/", node_id)])
}

pub fn user_url(base: &str, pool_id: &str, node_id: &str, user: &str) -> String {
    url(
        base,
        &[
            ("/pools/", pool_id),
            ("/nodes/", node_id),
            ("/users/", user),
        ],
    )
}

/// `base`, then each literal followed by its id percent-encoded, in one allocation.
fn url(base: &str, parts: &[(&str, &str)]) -> String {
    let len = parts
        .iter()
        .map(|(l, id)| l.len() + id.len())
        .sum::<usize>();
    let mut out = String::with_capacity(base.len() + len + 8);
    out.push_str(base);
    for (literal, id) in parts {
        out.push_str(literal);
        encode_into(&mut out, id);
    }
    out
}

fn pool_state(s: PoolState) -> &'static str {
    match s {
        PoolState::Active => "active",
        PoolState::Deleting => "deleting",
    }
}

fn allocation_state(s: AllocationState) -> &'static str {
    match s {
        AllocationState::Steady => "steady",
        AllocationState::Resizing => "resizing",
        AllocationState::Stopping => "stopping",
    }
}

/// A CloudPool: what Add was given, Azure's defaults for what it omitted, and the service's own
/// properties.
pub fn pool_json(base: &str, v: &PoolView) -> Map<String, Value> {
    let p = &v.pool;
    let mut o = Map::new();
    o.insert("id".into(), json!(p.id));
    if let Some(d) = p.spec.get("displayName") {
        o.insert("displayName".into(), d.clone());
    }
    o.insert("url".into(), json!(pool_url(base, &p.id)));
    o.insert("eTag".into(), json!(p.etag));
    o.insert("lastModified".into(), json!(iso(p.last_modified)));
    o.insert("creationTime".into(), json!(iso(p.creation_time)));
    o.insert("state".into(), json!(pool_state(p.state)));
    o.insert(
        "stateTransitionTime".into(),
        json!(iso(p.state_transition_time)),
    );
    o.insert(
        "allocationState".into(),
        json!(allocation_state(p.allocation_state)),
    );
    o.insert(
        "allocationStateTransitionTime".into(),
        json!(iso(p.allocation_state_transition_time)),
    );
    o.insert("vmSize".into(), json!(p.vm_size));
    if let Some(csc) = p.spec.get("cloudServiceConfiguration") {
        let mut csc = csc.clone();
        if let Some(m) = csc.as_object_mut() {
            let family = m.get("osFamily").cloned().unwrap_or(json!("*"));
            m.entry("targetOSVersion").or_insert(json!("*"));
            m.entry("currentOSVersion").or_insert(json!("*"));
            m.insert("osFamily".into(), family);
        }
        o.insert("cloudServiceConfiguration".into(), csc);
    }
    if let Some(vmc) = p.spec.get("virtualMachineConfiguration") {
        let mut vmc = vmc.clone();
        if let Some(img) = vmc.get_mut("imageReference").and_then(Value::as_object_mut)
            && !img.contains_key("virtualMachineImageId")
        {
            img.entry("version").or_insert(json!("latest"));
        }
        o.insert("virtualMachineConfiguration".into(), vmc);
    }
    let default = |o: &mut Map<String, Value>, k: &str, d: Value| {
        o.insert(k.into(), p.spec.get(k).cloned().unwrap_or(d));
    };
    default(&mut o, "resizeTimeout", json!("PT15M"));
    if !p.resize_errors.is_empty() {
        let errors: Vec<Value> = p
            .resize_errors
            .iter()
            .map(|e| json!({"code": e.code, "message": e.message}))
            .collect();
        o.insert("resizeErrors".into(), Value::Array(errors));
    }
    o.insert("currentDedicatedNodes".into(), json!(v.current_dedicated));
    o.insert(
        "currentLowPriorityNodes".into(),
        json!(v.current_low_priority),
    );
    o.insert("targetDedicatedNodes".into(), json!(p.target_dedicated));
    o.insert(
        "targetLowPriorityNodes".into(),
        json!(p.target_low_priority),
    );
    default(&mut o, "enableAutoScale", json!(false));
    default(&mut o, "enableInterNodeCommunication", json!(false));
    default(&mut o, "taskSlotsPerNode", json!(1));
    default(
        &mut o,
        "taskSchedulingPolicy",
        json!({"nodeFillType": "spread"}),
    );
    default(&mut o, "targetNodeCommunicationMode", json!("default"));
    o.insert("currentNodeCommunicationMode".into(), json!("classic"));
    // Everything else Add was given (start task, network, metadata, newer properties…).
    for (k, val) in &p.spec {
        if !o.contains_key(k)
            && !["id", "targetDedicatedNodes", "targetLowPriorityNodes"].contains(&k.as_str())
        {
            o.insert(k.clone(), val.clone());
        }
    }
    o
}

/// Text of a pool's filterable properties.
pub fn pool_field(v: &PoolView, field: &str) -> Option<String> {
    Some(match field {
        "id" => v.pool.id.clone(),
        "state" => pool_state(v.pool.state).into(),
        "allocationState" => allocation_state(v.pool.allocation_state).into(),
        "vmSize" => v.pool.vm_size.clone(),
        "displayName" => v.pool.spec.get("displayName")?.as_str()?.to_string(),
        _ => return None,
    })
}

pub const POOL_FILTER_FIELDS: &[&str] =
    &["id", "state", "allocationState", "vmSize", "displayName"];
pub const NODE_FILTER_FIELDS: &[&str] =
    &["id", "state", "schedulingState", "isDedicated", "ipAddress"];

pub fn node_field(v: &NodeView, field: &str) -> Option<String> {
    Some(match field {
        "id" => v.node.id.clone(),
        "state" => v.node.state.as_str().into(),
        "schedulingState" => scheduling(v).into(),
        "isDedicated" => v.node.is_dedicated.to_string(),
        "ipAddress" => v.node.ip_address.clone(),
        _ => return None,
    })
}

fn scheduling(v: &NodeView) -> &'static str {
    match v.node.scheduling_state {
        bluebatch_core::model::SchedulingState::Enabled => "enabled",
        bluebatch_core::model::SchedulingState::Disabled => "disabled",
    }
}

/// A ComputeNode.
pub fn node_json(base: &str, v: &NodeView, login_ip: &str) -> Map<String, Value> {
    let n = &v.node;
    let mut o = Map::new();
    o.insert("id".into(), json!(n.id));
    o.insert("url".into(), json!(node_url(base, &v.pool_id, &n.id)));
    o.insert("state".into(), json!(n.state.as_str()));
    o.insert("schedulingState".into(), json!(scheduling(v)));
    o.insert(
        "stateTransitionTime".into(),
        json!(iso(n.state_transition_time)),
    );
    if let Some(t) = n.last_boot_time {
        o.insert("lastBootTime".into(), json!(iso(t)));
    }
    o.insert("allocationTime".into(), json!(iso(n.allocation_time)));
    o.insert("ipAddress".into(), json!(n.ip_address));
    o.insert("affinityId".into(), json!(format!("TVM:{}", n.id)));
    o.insert("vmSize".into(), json!(v.vm_size));
    o.insert("totalTasksRun".into(), json!(0));
    o.insert("runningTasksCount".into(), json!(0));
    o.insert("runningTaskSlotsCount".into(), json!(0));
    o.insert("totalTasksSucceeded".into(), json!(0));
    o.insert("isDedicated".into(), json!(n.is_dedicated));
    if let (Os::Linux, Some(port)) = (v.os, n.ssh_port) {
        o.insert(
            "endpointConfiguration".into(),
            json!({"inboundEndpoints": [{
                "name": "SSHRule.0", "protocol": "tcp", "publicIPAddress": login_ip,
                "publicFQDN": login_ip, "frontendPort": port, "backendPort": 22
            }]}),
        );
    }
    o.insert(
        "nodeAgentInfo".into(),
        json!({"version": "1.9.0", "lastUpdateTime": iso(n.allocation_time)}),
    );
    if let Some(img) = &v.image_reference {
        let mut img = img.clone();
        if let Some(m) = img.as_object_mut() {
            m.entry("version").or_insert(json!("latest"));
        }
        o.insert(
            "virtualMachineInfo".into(),
            json!({ "imageReference": img }),
        );
    }
    o
}
