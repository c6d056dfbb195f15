//! Pool rules: parsing and validating PoolAddParameter, PoolResizeParameter and
//! NodeRemoveParameter bodies, and telling a pool's node OS.

use crate::error::{BatchError, Code, Result};
use crate::model::Os;
use crate::users::{BOOLEAN, INTEGER, bool_value, int_prop, int_value, parse_object};
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

/// Integer and boolean properties nested in PoolAddParameter (from Azure's OpenAPI definitions
/// and azure-batch 15.1's models; `[]` marks an array). These are stored as given, like the rest
/// of the nested configuration, except that a JSON string holding a decimal integer, or
/// `"true"`/`"false"`, is stored as the integer or boolean, as Azure returns it (the az CLI sends
/// `"osDisk": {"diskSizeGB": "64"}` and `"startTask": {"maxTaskRetryCount": "2"}`).
const POOL_NESTED_TYPED: &[(&str, Kind)] = &[
    (
        "networkConfiguration.enableAcceleratedNetworking",
        Kind::Bool,
    ),
    (
        "networkConfiguration.endpointConfiguration.inboundNATPools[].backendPort",
        Kind::Int,
    ),
    (
        "networkConfiguration.endpointConfiguration.inboundNATPools[].frontendPortRangeStart",
        Kind::Int,
    ),
    (
        "networkConfiguration.endpointConfiguration.inboundNATPools[].frontendPortRangeEnd",
        Kind::Int,
    ),
    (
        "networkConfiguration.endpointConfiguration.inboundNATPools[].networkSecurityGroupRules[].priority",
        Kind::Int,
    ),
    ("startTask.maxTaskRetryCount", Kind::Int),
    ("startTask.waitForSuccess", Kind::Bool),
    (
        "startTask.containerSettings.containerHostBatchBindMounts[].isReadOnly",
        Kind::Bool,
    ),
    (
        "upgradePolicy.automaticOSUpgradePolicy.disableAutomaticRollback",
        Kind::Bool,
    ),
    (
        "upgradePolicy.automaticOSUpgradePolicy.enableAutomaticOSUpgrade",
        Kind::Bool,
    ),
    (
        "upgradePolicy.automaticOSUpgradePolicy.osRollingUpgradeDeferral",
        Kind::Bool,
    ),
    (
        "upgradePolicy.automaticOSUpgradePolicy.useRollingUpgradePolicy",
        Kind::Bool,
    ),
    (
        "upgradePolicy.rollingUpgradePolicy.enableCrossZoneUpgrade",
        Kind::Bool,
    ),
    (
        "upgradePolicy.rollingUpgradePolicy.maxBatchInstancePercent",
        Kind::Int,
    ),
    (
        "upgradePolicy.rollingUpgradePolicy.maxUnhealthyInstancePercent",
        Kind::Int,
    ),
    (
        "upgradePolicy.rollingUpgradePolicy.maxUnhealthyUpgradedInstancePercent",
        Kind::Int,
    ),
    (
        "upgradePolicy.rollingUpgradePolicy.prioritizeUnhealthyInstances",
        Kind::Bool,
    ),
    (
        "upgradePolicy.rollingUpgradePolicy.rollbackFailedInstancesOnPolicyBreach",
        Kind::Bool,
    ),
    ("userAccounts[].linuxUserConfiguration.uid", Kind::Int),
    ("userAccounts[].linuxUserConfiguration.gid", Kind::Int),
    (
        "virtualMachineConfiguration.dataDisks[].diskSizeGB",
        Kind::Int,
    ),
    ("virtualMachineConfiguration.dataDisks[].lun", Kind::Int),
    (
        "virtualMachineConfiguration.diskEncryptionConfiguration.customerManagedKey.rotationToLatestKeyVersionEnabled",
        Kind::Bool,
    ),
    (
        "virtualMachineConfiguration.extensions[].autoUpgradeMinorVersion",
        Kind::Bool,
    ),
    (
        "virtualMachineConfiguration.extensions[].enableAutomaticUpgrade",
        Kind::Bool,
    ),
    ("virtualMachineConfiguration.osDisk.diskSizeGB", Kind::Int),
    (
        "virtualMachineConfiguration.osDisk.writeAcceleratorEnabled",
        Kind::Bool,
    ),
    (
        "virtualMachineConfiguration.securityProfile.encryptionAtHost",
        Kind::Bool,
    ),
    (
        "virtualMachineConfiguration.securityProfile.proxyAgentSettings.enabled",
        Kind::Bool,
    ),
    (
        "virtualMachineConfiguration.securityProfile.uefiSettings.secureBootEnabled",
        Kind::Bool,
    ),
    (
        "virtualMachineConfiguration.securityProfile.uefiSettings.vTpmEnabled",
        Kind::Bool,
    ),
    (
        "virtualMachineConfiguration.windowsConfiguration.enableAutomaticUpdates",
        Kind::Bool,
    ),
];

/// Stores a string at `path` in `map` (see [`POOL_NESTED_TYPED`]) as its integer or boolean
/// when it reads as one; leaves every other value as given.
fn store_typed(map: &mut Map<String, Value>, path: &[&str], kind: Kind) {
    let Some((segment, rest)) = path.split_first() else {
        return;
    };
    let (name, array) = match segment.strip_suffix("[]") {
        Some(n) => (n, true),
        None => (*segment, false),
    };
    let Some(child) = map.get_mut(name) else {
        return;
    };
    let targets: Vec<&mut Value> = match child {
        Value::Array(items) if array => items.iter_mut().collect(),
        _ if array => Vec::new(),
        _ => vec![child],
    };
    for target in targets {
        if rest.is_empty() {
            if target.is_string()
                && let Some(t) = typed(kind, target)
            {
                *target = t;
            }
        } else if let Some(m) = target.as_object_mut() {
            store_typed(m, rest, kind);
        }
    }
}

/// The value of a property of this kind as Azure reads it (integers and booleans also from
/// strings: [`int_value`], [`bool_value`]); `None` when it has the wrong type.
fn typed(kind: Kind, v: &Value) -> Option<Value> {
    match kind {
        Kind::Str => v.is_string().then(|| v.clone()),
        Kind::Int => int_value(v).map(Value::from),
        Kind::Bool => bool_value(v).map(Value::Bool),
        Kind::Obj => v.is_object().then(|| v.clone()),
        Kind::Arr => v.is_array().then(|| v.clone()),
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

fn wrong_kind(name: &str, kind: Kind) -> BatchError {
    match kind {
        Kind::Int => crate::users::wrong_type(name, INTEGER),
        Kind::Bool => crate::users::wrong_type(name, BOOLEAN),
        _ => wrong_type(name),
    }
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
    match int_prop(map, name)? {
        None => Ok(0),
        Some(n) => {
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
    // Type-check the known properties; "3" and "true" are stored as 3 and true, as Azure
    // returns them.
    for (name, kind) in POOL_PROPERTIES {
        if let Some(v) = map.get_mut(*name) {
            *v = typed(*kind, v).ok_or_else(|| wrong_kind(name, *kind))?;
        }
    }
    for (path, kind) in POOL_NESTED_TYPED {
        let segments: Vec<&str> = path.split('.').collect();
        store_typed(&mut map, &segments, *kind);
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
    /// The timeout of this resize as given (an ISO 8601 duration, checked like Add Pool's);
    /// `None`: Azure's default, 15 minutes.
    pub resize_timeout: Option<String>,
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
        resize_timeout: map
            .get("resizeTimeout")
            .and_then(Value::as_str)
            .map(str::to_string),
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

/// The node-deallocation options of Reboot and Reimage (`nodeRebootOption`, `nodeReimageOption`).
pub const NODE_DEALLOCATION_OPTIONS: &[&str] =
    &["requeue", "terminate", "taskcompletion", "retaineddata"];
/// The options of Disable Scheduling (`nodeDisableSchedulingOption`).
pub const DISABLE_SCHEDULING_OPTIONS: &[&str] = &["requeue", "terminate", "taskcompletion"];

/// The optional body of Reboot, Reimage and Disable Scheduling: empty, or an object with at most
/// the one option `property`, whose value is one of `allowed` (any case) or null. Returns the
/// option given, if any.
///
/// With `nested`, the option may also come wrapped once in an object of the same name:
/// azure-batch 15.0.0b1 (bundled in the az CLI 2.91) wraps the caller's
/// `{"nodeDisableSchedulingOption": "taskcompletion"}` into
/// `{"nodeDisableSchedulingOption": {"nodeDisableSchedulingOption": "taskcompletion"}}`.
/// Deeper nesting is `InvalidRequestBody`.
pub fn parse_node_option(
    bytes: &[u8],
    property: &str,
    allowed: &[&str],
    nested: bool,
) -> Result<Option<String>> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let map = parse_object(bytes)?;
    check_known(&map, &[property])?;
    let value = match map.get(property) {
        Some(Value::Object(inner)) if nested => {
            check_known(inner, &[property])?;
            match inner.get(property) {
                Some(Value::Object(_)) | Some(Value::Array(_)) => {
                    return Err(BatchError::new(Code::InvalidRequestBody)
                        .with("PropertyName", property)
                        .with(
                            "Reason",
                            format!(
                                "the property '{property}' must be a string (one level of \
                                 wrapping in an object of the same name is accepted, no more)"
                            ),
                        ));
                }
                v => v,
            }
        }
        v => v,
    };
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if allowed.iter().any(|a| a.eq_ignore_ascii_case(s)) => {
            Ok(Some(s.to_ascii_lowercase()))
        }
        Some(Value::String(s)) => Err(invalid(
            property,
            &s.chars().take(64).collect::<String>(),
            &format!("one of {}", allowed.join(", ")),
        )),
        Some(_) => Err(crate::users::wrong_type(property, "a string")),
    }
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
        && !NODE_DEALLOCATION_OPTIONS
            .iter()
            .any(|o| o.eq_ignore_ascii_case(v))
    {
        return Err(invalid(
            "nodeDeallocationOption",
            v,
            &format!("one of {}", NODE_DEALLOCATION_OPTIONS.join(", ")),
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
    fn reads_integers_and_booleans_sent_as_strings() {
        // What the az CLI 2.91 sends: node counts (and other integers) as JSON strings.
        let mut v = example();
        v["targetDedicatedNodes"] = "1".into();
        v["targetLowPriorityNodes"] = "2".into();
        v["taskSlotsPerNode"] = "4".into();
        v["enableInterNodeCommunication"] = "false".into();
        v["enableAutoScale"] = "false".into();
        let p = parse(&v).unwrap();
        assert_eq!((p.target_dedicated, p.target_low_priority), (1, 2));
        // Stored typed, as Azure returns them.
        assert_eq!(p.spec["taskSlotsPerNode"], 4);
        assert_eq!(p.spec["enableInterNodeCommunication"], false);
        assert_eq!(p.spec["enableAutoScale"], false);
        let mut v = example();
        v["taskSlotsPerNode"] = "0".into();
        assert_eq!(parse(&v).unwrap_err().code, Code::InvalidPropertyValue);
        let mut v = example();
        v["enableAutoScale"] = "true".into();
        assert_eq!(parse(&v).unwrap_err().code, Code::MissingRequiredProperty);
    }

    #[test]
    fn nested_integers_and_booleans_sent_as_strings_are_stored_typed() {
        // What the az CLI sends for --os-disk-size, --start-task-max-task-retry-count,
        // --max-batch-instance-percent.
        let mut v = example();
        v["virtualMachineConfiguration"]["osDisk"] = serde_json::json!({"diskSizeGB": "64"});
        v["virtualMachineConfiguration"]["dataDisks"] =
            serde_json::json!([{"lun": "1", "diskSizeGB": 10}, {"lun": "x"}]);
        v["startTask"] = serde_json::json!({"commandLine": "/bin/true", "maxTaskRetryCount": "2", "waitForSuccess": "true"});
        v["upgradePolicy"] = serde_json::json!({"mode": "automatic",
            "rollingUpgradePolicy": {"maxBatchInstancePercent": "20"}});
        let p = parse(&v).unwrap();
        let vmc = &p.spec["virtualMachineConfiguration"];
        assert_eq!(vmc["osDisk"]["diskSizeGB"], 64);
        assert_eq!(vmc["dataDisks"][0]["lun"], 1);
        assert_eq!(vmc["dataDisks"][0]["diskSizeGB"], 10);
        // Not a decimal integer: stored as given, as the rest of the nested configuration.
        assert_eq!(vmc["dataDisks"][1]["lun"], "x");
        assert_eq!(p.spec["startTask"]["maxTaskRetryCount"], 2);
        assert_eq!(p.spec["startTask"]["waitForSuccess"], true);
        assert_eq!(p.spec["startTask"]["commandLine"], "/bin/true");
        assert_eq!(
            p.spec["upgradePolicy"]["rollingUpgradePolicy"]["maxBatchInstancePercent"],
            20
        );
    }

    #[test]
    fn node_options_and_their_one_level_of_nesting() {
        let p = "nodeDisableSchedulingOption";
        let opt = |b: &str, nested| {
            parse_node_option(b.as_bytes(), p, DISABLE_SCHEDULING_OPTIONS, nested)
        };
        assert_eq!(opt("", true).unwrap(), None);
        assert_eq!(opt("{}", true).unwrap(), None);
        assert_eq!(
            opt(r#"{"nodeDisableSchedulingOption":"TaskCompletion"}"#, true).unwrap(),
            Some("taskcompletion".into())
        );
        let wrapped =
            r#"{"nodeDisableSchedulingOption":{"nodeDisableSchedulingOption":"taskcompletion"}}"#;
        assert_eq!(opt(wrapped, true).unwrap(), Some("taskcompletion".into()));
        assert_eq!(
            opt(r#"{"nodeDisableSchedulingOption":{}}"#, true).unwrap(),
            None
        );
        // Not where the option is not wrapped by any client, nor twice, nor with other keys.
        assert_eq!(
            opt(wrapped, false).unwrap_err().code,
            Code::InvalidRequestBody
        );
        let twice = r#"{"nodeDisableSchedulingOption":{"nodeDisableSchedulingOption":{"nodeDisableSchedulingOption":"requeue"}}}"#;
        let e = opt(twice, true).unwrap_err();
        assert_eq!(
            (e.code, e.values[0].1.as_str()),
            (Code::InvalidRequestBody, p)
        );
        let e = opt(r#"{"nodeDisableSchedulingOption":{"x":"requeue"}}"#, true).unwrap_err();
        assert_eq!(
            (e.code, e.values[0].1.as_str()),
            (Code::InvalidRequestBody, "x")
        );
        let e = opt(
            r#"{"nodeDisableSchedulingOption":{"nodeDisableSchedulingOption":"later"}}"#,
            true,
        )
        .unwrap_err();
        assert_eq!(e.code, Code::InvalidPropertyValue);
        assert_eq!(
            opt(r#"{"other":1}"#, true).unwrap_err().code,
            Code::InvalidRequestBody
        );
        assert_eq!(
            opt(r#"{"nodeDisableSchedulingOption":3}"#, true)
                .unwrap_err()
                .code,
            Code::InvalidRequestBody
        );
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
        for bad in ["1.5", "abc", "1e3", " 1", "", "5 "] {
            let mut v = example();
            v["targetDedicatedNodes"] = bad.into();
            let e = parse(&v).unwrap_err();
            assert_eq!(
                (e.code, e.values[0].1.as_str()),
                (Code::InvalidRequestBody, "targetDedicatedNodes"),
                "{bad:?}"
            );
        }
        let mut v = example();
        v["enableAutoScale"] = "no".into();
        assert_eq!(code(v), Code::InvalidRequestBody);
        let mut v = example();
        v["targetDedicatedNodes"] = "-1".into();
        assert_eq!(code(v), Code::InvalidPropertyValue);
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
                target_low_priority: 0,
                resize_timeout: Some("PT15M".into()),
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
        // The az CLI's resize body.
        assert_eq!(
            parse_resize(
                br#"{"targetDedicatedNodes":"3","targetLowPriorityNodes":"1"}"#,
                100
            )
            .unwrap(),
            Resize {
                target_dedicated: 3,
                target_low_priority: 1,
                resize_timeout: None,
            }
        );
        for bad in ["1.5", "abc", "1e3", " 1", ""] {
            let body = serde_json::json!({ "targetLowPriorityNodes": bad }).to_string();
            let e = parse_resize(body.as_bytes(), 100).unwrap_err();
            assert_eq!(
                (e.code, e.values[0].1.as_str()),
                (Code::InvalidRequestBody, "targetLowPriorityNodes"),
                "{bad:?}"
            );
        }
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
