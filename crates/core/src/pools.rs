//! Pool rules: parsing and validating PoolAddParameter, PoolResizeParameter and
//! NodeRemoveParameter bodies, and telling a pool's node OS.

use crate::error::{BatchError, Code, Result};
use crate::model::Os;
use crate::users::parse_object;
use serde_json::{Map, Value};

/// A validated Add Pool body.
#[derive(Debug, Clone, PartialEq)]
pub struct NewPool {
    pub id: String,
    pub spec: Map<String, Value>,
    pub os: Os,
    pub cloud_service: bool,
    pub vm_size: String,
    pub target_dedicated: u32,
    pub target_low_priority: u32,
}

#[derive(Clone, Copy)]
enum Kind {
    Str,
    Int,
    Bool,
    Obj,
    Arr,
}

/// Top-level PoolAddParameter properties and their JSON types (from the OpenAPI definition).
/// Properties not listed (newer api-versions add some) are stored and returned as given.
const POOL_PROPERTIES: &[(&str, Kind)] = &[
    ("id", Kind::Str),
    ("displayName", Kind::Str),
    ("vmSize", Kind::Str),
    ("cloudServiceConfiguration", Kind::Obj),
    ("virtualMachineConfiguration", Kind::Obj),
    ("resizeTimeout", Kind::Str),
    ("targetDedicatedNodes", Kind::Int),
    ("targetLowPriorityNodes", Kind::Int),
    ("enableAutoScale", Kind::Bool),
    ("autoScaleFormula", Kind::Str),
    ("autoScaleEvaluationInterval", Kind::Str),
    ("enableInterNodeCommunication", Kind::Bool),
    ("networkConfiguration", Kind::Obj),
    ("startTask", Kind::Obj),
    ("certificateReferences", Kind::Arr),
    ("applicationPackageReferences", Kind::Arr),
    ("applicationLicenses", Kind::Arr),
    ("taskSlotsPerNode", Kind::Int),
    ("taskSchedulingPolicy", Kind::Obj),
    ("userAccounts", Kind::Arr),
    ("metadata", Kind::Arr),
    ("mountConfiguration", Kind::Arr),
    ("targetNodeCommunicationMode", Kind::Str),
    ("resourceTags", Kind::Obj),
];

fn kind_matches(kind: Kind, v: &Value) -> bool {
    match kind {
        Kind::Str => v.is_string(),
        Kind::Int => v.is_i64() || v.is_u64(),
        Kind::Bool => v.is_boolean(),
        Kind::Obj => v.is_object(),
        Kind::Arr => v.is_array(),
    }
}

fn wrong_type(name: &str) -> BatchError {
    BatchError::new(Code::InvalidRequestBody)
        .with("PropertyName", name)
        .with(
            "Reason",
            format!("the property '{name}' has the wrong JSON type"),
        )
}

fn invalid(name: &str, value: &str, reason: &str) -> BatchError {
    BatchError::new(Code::InvalidPropertyValue)
        .with("PropertyName", name)
        .with("PropertyValue", value.chars().take(256).collect::<String>())
        .with("Reason", reason)
}

/// Pool ids: letters, digits, hyphens and underscores, 1 to 64 characters.
pub fn valid_pool_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn node_count(map: &Map<String, Value>, name: &str, max_nodes: u32) -> Result<u32> {
    match map.get(name) {
        None | Some(Value::Null) => Ok(0),
        Some(v) => {
            let n = v.as_i64().ok_or_else(|| wrong_type(name))?;
            if n < 0 || n > i64::from(max_nodes) {
                return Err(invalid(
                    name,
                    &n.to_string(),
                    &format!("must be between 0 and {max_nodes}"),
                ));
            }
            Ok(n as u32)
        }
    }
}

/// `targetDedicatedNodes` and `targetLowPriorityNodes`, each and together within `max_nodes`.
fn node_targets(map: &Map<String, Value>, max_nodes: u32) -> Result<(u32, u32)> {
    let dedicated = node_count(map, "targetDedicatedNodes", max_nodes)?;
    let low_priority = node_count(map, "targetLowPriorityNodes", max_nodes)?;
    if dedicated + low_priority > max_nodes {
        return Err(invalid(
            "targetDedicatedNodes",
            &dedicated.to_string(),
            &format!("a pool has at most {max_nodes} nodes on this server"),
        ));
    }
    Ok((dedicated, low_priority))
}

pub fn parse_add_pool(bytes: &[u8], max_nodes: u32) -> Result<NewPool> {
    let mut map = parse_object(bytes)?;
    map.retain(|_, v| !v.is_null());
    for (name, kind) in POOL_PROPERTIES {
        if let Some(v) = map.get(*name)
            && !kind_matches(*kind, v)
        {
            return Err(wrong_type(name));
        }
    }
    let id = map
        .get("id")
        .and_then(Value::as_str)
        .ok_or_else(|| BatchError::missing("id"))?
        .to_string();
    if !valid_pool_id(&id) {
        return Err(invalid(
            "id",
            &id,
            "a pool id has 1 to 64 letters, digits, hyphens or underscores",
        ));
    }
    let vm_size = map
        .get("vmSize")
        .and_then(Value::as_str)
        .ok_or_else(|| BatchError::missing("vmSize"))?
        .to_string();
    if vm_size.is_empty() {
        return Err(invalid("vmSize", "", "vmSize must not be empty"));
    }
    let (os, cloud_service) = match (
        map.get("cloudServiceConfiguration"),
        map.get("virtualMachineConfiguration"),
    ) {
        (Some(_), Some(_)) => {
            return Err(BatchError::new(Code::InvalidPropertyValue)
                .with("PropertyName", "virtualMachineConfiguration")
                .with(
                    "Reason",
                    "give exactly one of cloudServiceConfiguration and virtualMachineConfiguration",
                ));
        }
        (None, None) => {
            return Err(BatchError::missing("virtualMachineConfiguration").with(
                "Reason",
                "give exactly one of cloudServiceConfiguration and virtualMachineConfiguration",
            ));
        }
        (Some(csc), None) => {
            match csc.get("osFamily") {
                Some(Value::String(_)) => {}
                None | Some(Value::Null) => {
                    return Err(BatchError::missing("cloudServiceConfiguration.osFamily"));
                }
                Some(_) => return Err(wrong_type("cloudServiceConfiguration.osFamily")),
            }
            (Os::Windows, true)
        }
        (None, Some(vmc)) => (vm_os(vmc)?, false),
    };
    let (target_dedicated, target_low_priority) = node_targets(&map, max_nodes)?;
    if let Some(n) = map.get("taskSlotsPerNode").and_then(Value::as_i64)
        && !(1..=256).contains(&n)
    {
        return Err(invalid(
            "taskSlotsPerNode",
            &n.to_string(),
            "must be between 1 and 256",
        ));
    }
    let auto_scale = map.get("enableAutoScale").and_then(Value::as_bool) == Some(true);
    if auto_scale && !map.contains_key("autoScaleFormula") {
        return Err(BatchError::missing("autoScaleFormula"));
    }
    let (target_dedicated, target_low_priority) = if auto_scale {
        (0, 0)
    } else {
        (target_dedicated, target_low_priority)
    };
    Ok(NewPool {
        id,
        spec: map,
        os,
        cloud_service,
        vm_size,
        target_dedicated,
        target_low_priority,
    })
}

/// A VM pool is Windows when its node agent SKU is `batch.node.windows …` or its image comes from
/// `MicrosoftWindowsServer`; otherwise Linux.
fn vm_os(vmc: &Value) -> Result<Os> {
    let sku = match vmc.get("nodeAgentSKUId") {
        Some(Value::String(s)) => s.as_str(),
        None | Some(Value::Null) => {
            return Err(BatchError::missing(
                "virtualMachineConfiguration.nodeAgentSKUId",
            ));
        }
        Some(_) => return Err(wrong_type("virtualMachineConfiguration.nodeAgentSKUId")),
    };
    let image = match vmc.get("imageReference") {
        Some(Value::Object(m)) => m,
        None | Some(Value::Null) => {
            return Err(BatchError::missing(
                "virtualMachineConfiguration.imageReference",
            ));
        }
        Some(_) => return Err(wrong_type("virtualMachineConfiguration.imageReference")),
    };
    let publisher = image.get("publisher").and_then(Value::as_str).unwrap_or("");
    let windows = sku.to_ascii_lowercase().starts_with("batch.node.windows")
        || publisher.eq_ignore_ascii_case("MicrosoftWindowsServer");
    Ok(if windows { Os::Windows } else { Os::Linux })
}

/// A validated PoolResizeParameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resize {
    pub target_dedicated: u32,
    pub target_low_priority: u32,
}

pub fn parse_resize(bytes: &[u8], max_nodes: u32) -> Result<Resize> {
    let map = parse_object(bytes)?;
    let allowed = [
        "targetDedicatedNodes",
        "targetLowPriorityNodes",
        "resizeTimeout",
        "nodeDeallocationOption",
    ];
    check_known(&map, &allowed)?;
    check_string(&map, "resizeTimeout")?;
    check_deallocation(&map)?;
    let (target_dedicated, target_low_priority) = node_targets(&map, max_nodes)?;
    Ok(Resize {
        target_dedicated,
        target_low_priority,
    })
}

pub const MAX_REMOVE_NODES: usize = 100;

pub fn parse_remove_nodes(bytes: &[u8]) -> Result<Vec<String>> {
    let map = parse_object(bytes)?;
    check_known(
        &map,
        &["nodeList", "resizeTimeout", "nodeDeallocationOption"],
    )?;
    check_string(&map, "resizeTimeout")?;
    check_deallocation(&map)?;
    let list = match map.get("nodeList") {
        None | Some(Value::Null) => return Err(BatchError::missing("nodeList")),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(wrong_type("nodeList")),
    };
    if list.is_empty() || list.len() > MAX_REMOVE_NODES {
        return Err(invalid(
            "nodeList",
            &list.len().to_string(),
            &format!("nodeList has 1 to {MAX_REMOVE_NODES} node ids"),
        ));
    }
    list.iter()
        .map(|v| {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| wrong_type("nodeList"))
        })
        .collect()
}

fn check_known(map: &Map<String, Value>, allowed: &[&str]) -> Result<()> {
    match map.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(BatchError::new(Code::InvalidRequestBody)
            .with("PropertyName", k.as_str())
            .with(
                "Reason",
                format!("the property '{k}' is not allowed in this request body"),
            )),
        None => Ok(()),
    }
}

fn check_string(map: &Map<String, Value>, name: &str) -> Result<()> {
    match map.get(name) {
        None | Some(Value::Null) | Some(Value::String(_)) => Ok(()),
        Some(_) => Err(wrong_type(name)),
    }
}

fn check_deallocation(map: &Map<String, Value>) -> Result<()> {
    check_string(map, "nodeDeallocationOption")?;
    if let Some(v) = map.get("nodeDeallocationOption").and_then(Value::as_str)
        && !["requeue", "terminate", "taskcompletion", "retaineddata"]
            .iter()
            .any(|o| o.eq_ignore_ascii_case(v))
    {
        return Err(invalid(
            "nodeDeallocationOption",
            v,
            "one of requeue, terminate, taskcompletion, retaineddata",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> Value {
        serde_json::json!({
            "id": "pool2", "vmSize": "standard_a1",
            "virtualMachineConfiguration": {
                "imageReference": {"publisher": "Canonical", "offer": "0001-com-ubuntu-server-focal", "sku": "20_04-lts"},
                "nodeAgentSKUId": "batch.node.ubuntu 20.04"},
            "resizeTimeout": "PT15M", "targetDedicatedNodes": 5, "targetLowPriorityNodes": 0,
            "taskSlotsPerNode": 3, "enableAutoScale": false, "enableInterNodeCommunication": true,
            "metadata": [{"name": "myproperty", "value": "myvalue"}]
        })
    }

    fn parse(v: &Value) -> Result<NewPool> {
        parse_add_pool(v.to_string().as_bytes(), 10_000)
    }

    #[test]
    fn parses_the_azure_example() {
        let p = parse(&example()).unwrap();
        assert_eq!(
            (p.id.as_str(), p.os, p.cloud_service),
            ("pool2", Os::Linux, false)
        );
        assert_eq!((p.target_dedicated, p.target_low_priority), (5, 0));
        assert_eq!(p.spec["metadata"][0]["name"], "myproperty");
    }

    #[test]
    fn tells_windows_pools() {
        let mut v = example();
        v["virtualMachineConfiguration"]["nodeAgentSKUId"] = "batch.node.windows amd64".into();
        assert_eq!(parse(&v).unwrap().os, Os::Windows);
        let v = serde_json::json!({"id": "w", "vmSize": "small", "cloudServiceConfiguration": {"osFamily": "6"}});
        let p = parse(&v).unwrap();
        assert_eq!((p.os, p.cloud_service), (Os::Windows, true));
    }

    #[test]
    fn refuses_bad_pools() {
        let code = |v: Value| parse(&v).unwrap_err().code;
        let mut v = example();
        v["id"] = "has space".into();
        assert_eq!(code(v), Code::InvalidPropertyValue);
        let mut v = example();
        v["id"] = "x".repeat(65).into();
        assert_eq!(code(v), Code::InvalidPropertyValue);
        let mut v = example();
        v.as_object_mut().unwrap().remove("vmSize");
        assert_eq!(code(v), Code::MissingRequiredProperty);
        let mut v = example();
        v["targetDedicatedNodes"] = (-1).into();
        assert_eq!(code(v), Code::InvalidPropertyValue);
        let mut v = example();
        v["targetDedicatedNodes"] = "5".into();
        assert_eq!(code(v), Code::InvalidRequestBody);
        let mut v = example();
        v["targetDedicatedNodes"] = 20_000.into();
        assert_eq!(code(v), Code::InvalidPropertyValue);
        let mut v = example();
        v["cloudServiceConfiguration"] = serde_json::json!({"osFamily": "6"});
        assert_eq!(code(v), Code::InvalidPropertyValue);
        let mut v = example();
        v.as_object_mut()
            .unwrap()
            .remove("virtualMachineConfiguration");
        assert_eq!(code(v), Code::MissingRequiredProperty);
        let mut v = example();
        v["startTask"] = "echo".into();
        assert_eq!(code(v), Code::InvalidRequestBody);
    }

    #[test]
    fn resize_and_remove_nodes_bodies() {
        let r = parse_resize(
            br#"{"targetDedicatedNodes":3,"resizeTimeout":"PT15M"}"#,
            100,
        )
        .unwrap();
        assert_eq!(
            r,
            Resize {
                target_dedicated: 3,
                target_low_priority: 0
            }
        );
        assert_eq!(
            parse_resize(br#"{"targetDedicatedNodes":-3}"#, 100)
                .unwrap_err()
                .code,
            Code::InvalidPropertyValue
        );
        assert_eq!(
            parse_resize(br#"{"bogus":1}"#, 100).unwrap_err().code,
            Code::InvalidRequestBody
        );
        assert_eq!(
            parse_remove_nodes(br#"{"nodeList":["a","b"]}"#).unwrap(),
            vec!["a", "b"]
        );
        assert_eq!(
            parse_remove_nodes(b"{}").unwrap_err().code,
            Code::MissingRequiredProperty
        );
        let many = serde_json::json!({"nodeList": vec!["n"; 101]}).to_string();
        assert_eq!(
            parse_remove_nodes(many.as_bytes()).unwrap_err().code,
            Code::InvalidPropertyValue
        );
        assert_eq!(
            parse_remove_nodes(br#"{"nodeList":[1]}"#).unwrap_err().code,
            Code::InvalidRequestBody
        );
    }
}
