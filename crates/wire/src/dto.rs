//! JSON as Batch writes it: CloudPool, ComputeNode, remote login settings. Domain types stay in
//! bluebatch-core; these functions are the only place their wire shape is decided.

use crate::percent::encode_into;
use bluebatch_core::model::{AllocationState, Os, PoolState};
use bluebatch_core::timefmt::iso;
use bluebatch_service::{NodeView, PoolView};
use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};
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
    match serde_json::to_value(NodeJson::new(base, v, login_ip)) {
        Ok(Value::Object(o)) => o,
        _ => unreachable!("a node serializes as an object"),
    }
}

/// A ComputeNode serialized straight from the domain types, without building generic JSON
/// values first (Get Node's answer; [`node_json`] is the same object as a map). Keys in Azure's
/// order; with `select`, only the properties named.
pub struct NodeJson<'a> {
    base: &'a str,
    v: &'a NodeView,
    login_ip: &'a str,
    /// `odata.metadata`, written first when set (a single entity's answer).
    metadata: Option<&'a str>,
    select: Option<Vec<&'a str>>,
}

impl<'a> NodeJson<'a> {
    pub fn new(base: &'a str, v: &'a NodeView, login_ip: &'a str) -> Self {
        Self {
            base,
            v,
            login_ip,
            metadata: None,
            select: None,
        }
    }

    /// As an entity answer: `odata.metadata` first, then the properties `$select` names (all
    /// without it).
    pub fn element(mut self, metadata: &'a str, select: Option<&'a str>) -> Self {
        self.metadata = Some(metadata);
        self.select = select.map(|s| s.split(',').map(str::trim).collect());
        self
    }
}

impl Serialize for NodeJson<'_> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let (v, n) = (self.v, &self.v.node);
        let mut m = ser.serialize_map(None)?;
        if let Some(md) = self.metadata {
            m.serialize_entry("odata.metadata", md)?;
        }
        let wanted = |k: &str| self.select.as_ref().is_none_or(|keep| keep.contains(&k));
        macro_rules! entry {
            ($k:literal, $v:expr) => {
                if wanted($k) {
                    m.serialize_entry($k, &$v)?;
                }
            };
        }
        entry!("id", n.id);
        entry!("url", node_url(self.base, &v.pool_id, &n.id));
        entry!("state", n.state.as_str());
        entry!("schedulingState", scheduling(v));
        entry!("stateTransitionTime", iso(n.state_transition_time));
        if let Some(t) = n.last_boot_time {
            entry!("lastBootTime", iso(t));
        }
        entry!("allocationTime", iso(n.allocation_time));
        entry!("ipAddress", n.ip_address);
        entry!("affinityId", format_args!("TVM:{}", n.id));
        entry!("vmSize", v.vm_size);
        entry!("totalTasksRun", 0);
        entry!("runningTasksCount", 0);
        entry!("runningTaskSlotsCount", 0);
        entry!("totalTasksSucceeded", 0);
        entry!("isDedicated", n.is_dedicated);
        if let (Os::Linux, Some(port)) = (v.os, n.ssh_port) {
            entry!(
                "endpointConfiguration",
                EndpointConfiguration {
                    inbound_endpoints: [InboundEndpoint {
                        name: "SSHRule.0",
                        protocol: "tcp",
                        public_ip_address: self.login_ip,
                        public_fqdn: self.login_ip,
                        frontend_port: port,
                        backend_port: 22,
                    }],
                }
            );
        }
        entry!(
            "nodeAgentInfo",
            NodeAgentInfo {
                version: "1.9.0",
                last_update_time: iso(n.allocation_time),
            }
        );
        if let Some(img) = &v.image_reference {
            entry!(
                "virtualMachineInfo",
                VirtualMachineInfo {
                    image_reference: ImageReference(img),
                }
            );
        }
        m.end()
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EndpointConfiguration<'a> {
    inbound_endpoints: [InboundEndpoint<'a>; 1],
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct InboundEndpoint<'a> {
    name: &'a str,
    protocol: &'a str,
    #[serde(rename = "publicIPAddress")]
    public_ip_address: &'a str,
    #[serde(rename = "publicFQDN")]
    public_fqdn: &'a str,
    frontend_port: u16,
    backend_port: u16,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct NodeAgentInfo<'a> {
    version: &'a str,
    last_update_time: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct VirtualMachineInfo<'a> {
    image_reference: ImageReference<'a>,
}

/// The pool's image reference with `version` (`latest`) last when it named none.
struct ImageReference<'a>(&'a Value);

impl Serialize for ImageReference<'_> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let Some(o) = self.0.as_object() else {
            return self.0.serialize(ser);
        };
        let mut m = ser.serialize_map(None)?;
        for (k, val) in o {
            m.serialize_entry(k, val)?;
        }
        if !o.contains_key("version") {
            m.serialize_entry("version", "latest")?;
        }
        m.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(os: Os, image: Option<Value>, boot: bool) -> NodeView {
        let boot = if boot {
            r#""2026-11-25T10:00:01.5Z""#
        } else {
            "null"
        };
        let node = serde_json::from_str(&format!(
            r#"{{"id":"tvm-1 a","state":"idle","scheduling_state":"enabled",
            "state_transition_time":"2026-11-25T10:00:02.1234567Z",
            "allocation_time":"2026-11-25T10:00:00Z","last_boot_time":{boot},
            "ip_address":"10.0.0.4","is_dedicated":true,"ssh_port":50001,
            "users_revision":7,"etag":"0x8D","last_modified":"2026-11-25T10:00:00Z"}}"#
        ))
        .unwrap();
        NodeView {
            node,
            pool_id: "p/1".into(),
            os,
            vm_size: "standard_a1".into(),
            image_reference: image,
        }
    }

    const BASE: &str = "https://acct.local";

    #[test]
    fn a_node_is_written_in_azures_shape_and_order() {
        let img = json!({"publisher": "canonical", "offer": "ubuntu", "sku": "22_04-lts"});
        let v = view(Os::Linux, Some(img), true);
        let md = "https://acct.local/$metadata#nodes/@Element";
        let got = serde_json::to_string(&NodeJson::new(BASE, &v, "127.0.0.1").element(md, None));
        let want = concat!(
            r#"{"odata.metadata":"https://acct.local/$metadata#nodes/@Element","#,
            r#""id":"tvm-1 a","url":"https://acct.local/pools/p%2F1/nodes/tvm-1%20a","#,
            r#""state":"idle","schedulingState":"enabled","#,
            r#""stateTransitionTime":"2026-11-25T10:00:02.1234567Z","#,
            r#""lastBootTime":"2026-11-25T10:00:01.5Z","allocationTime":"2026-11-25T10:00:00Z","#,
            r#""ipAddress":"10.0.0.4","affinityId":"TVM:tvm-1 a","vmSize":"standard_a1","#,
            r#""totalTasksRun":0,"runningTasksCount":0,"runningTaskSlotsCount":0,"#,
            r#""totalTasksSucceeded":0,"isDedicated":true,"#,
            r#""endpointConfiguration":{"inboundEndpoints":[{"name":"SSHRule.0","protocol":"tcp","#,
            r#""publicIPAddress":"127.0.0.1","publicFQDN":"127.0.0.1","frontendPort":50001,"#,
            r#""backendPort":22}]},"#,
            r#""nodeAgentInfo":{"version":"1.9.0","lastUpdateTime":"2026-11-25T10:00:00Z"},"#,
            r#""virtualMachineInfo":{"imageReference":{"publisher":"canonical","offer":"ubuntu","#,
            r#""sku":"22_04-lts","version":"latest"}}}"#
        );
        assert_eq!(got.unwrap(), want);
        // The map of a list's entry is the same object without the metadata.
        let mut whole: Map<String, Value> = serde_json::from_str(want).unwrap();
        whole.shift_remove("odata.metadata");
        let map = node_json(BASE, &v, "127.0.0.1");
        assert_eq!(
            serde_json::to_string(&map).unwrap(),
            serde_json::to_string(&whole).unwrap()
        );
    }

    #[test]
    fn optional_parts_and_select_are_honoured() {
        // Windows: no SSH endpoint; no boot yet; an image that names its version keeps it.
        let img = json!({"virtualMachineImageId": "/x", "version": "1.2"});
        let v = view(Os::Windows, Some(img), false);
        let o = node_json(BASE, &v, "127.0.0.1");
        assert!(!o.contains_key("endpointConfiguration") && !o.contains_key("lastBootTime"));
        assert_eq!(
            o["virtualMachineInfo"]["imageReference"],
            json!({"virtualMachineImageId": "/x", "version": "1.2"})
        );
        let v = view(Os::Linux, None, false);
        assert!(!node_json(BASE, &v, "h").contains_key("virtualMachineInfo"));
        let sel = NodeJson::new(BASE, &v, "h").element("m", Some("state, id,nosuch"));
        assert_eq!(
            serde_json::to_string(&sel).unwrap(),
            r#"{"odata.metadata":"m","id":"tvm-1 a","state":"idle"}"#
        );
    }
}
