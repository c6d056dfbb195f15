//! The domain model: pools, compute nodes and node users, as the service owns and stores them.
//! JSON DTOs for the wire live in the wire crate; these serialize only for the store.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use time::OffsetDateTime;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Os {
    Linux,
    Windows,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolState {
    Active,
    Deleting,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AllocationState {
    Steady,
    Resizing,
    Stopping,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    Idle,
    Rebooting,
    Reimaging,
    Running,
    Unusable,
    Creating,
    Starting,
    WaitingForStartTask,
    StartTaskFailed,
    Unknown,
    LeavingPool,
    Offline,
    Preempted,
}

impl NodeState {
    pub const ALL: [NodeState; 13] = [
        NodeState::Idle,
        NodeState::Rebooting,
        NodeState::Reimaging,
        NodeState::Running,
        NodeState::Unusable,
        NodeState::Creating,
        NodeState::Starting,
        NodeState::WaitingForStartTask,
        NodeState::StartTaskFailed,
        NodeState::Unknown,
        NodeState::LeavingPool,
        NodeState::Offline,
        NodeState::Preempted,
    ];

    /// The wire spelling (`waitingforstarttask`).
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Idle => "idle",
            NodeState::Rebooting => "rebooting",
            NodeState::Reimaging => "reimaging",
            NodeState::Running => "running",
            NodeState::Unusable => "unusable",
            NodeState::Creating => "creating",
            NodeState::Starting => "starting",
            NodeState::WaitingForStartTask => "waitingforstarttask",
            NodeState::StartTaskFailed => "starttaskfailed",
            NodeState::Unknown => "unknown",
            NodeState::LeavingPool => "leavingpool",
            NodeState::Offline => "offline",
            NodeState::Preempted => "preempted",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|st| st.as_str().eq_ignore_ascii_case(s))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SchedulingState {
    Enabled,
    Disabled,
}

/// Where a pool's nodes come from (the pool metadata item `bluebatch.nodes`, else the service's
/// default). Stored with the pool; pools stored before it existed are embedded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeSource {
    /// Light SSH endpoints inside the service process.
    #[default]
    Embedded,
    /// Hosts joined with `bluebatch agent`.
    Agents,
    /// A sandboxed machine per node.
    Sandbox,
}

impl NodeSource {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "embedded" => Some(Self::Embedded),
            "agents" => Some(Self::Agents),
            "sandbox" => Some(Self::Sandbox),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Embedded => "embedded",
            Self::Agents => "agents",
            Self::Sandbox => "sandbox",
        }
    }
}

/// An allocation the pool could not complete (Get Pool's `resizeErrors`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResizeError {
    pub code: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pool {
    /// As given, case preserved (unique case-insensitively).
    pub id: String,
    /// The PoolAddParameter as given (validated); Get returns it with defaults filled in.
    pub spec: Map<String, Value>,
    pub os: Os,
    /// `cloudServiceConfiguration` pools (no remote login settings).
    pub cloud_service: bool,
    pub vm_size: String,
    pub state: PoolState,
    pub allocation_state: AllocationState,
    pub target_dedicated: u32,
    pub target_low_priority: u32,
    pub etag: String,
    #[serde(with = "time::serde::rfc3339")]
    pub last_modified: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub creation_time: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub state_transition_time: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub allocation_state_transition_time: OffsetDateTime,
    /// Where the pool's nodes come from.
    #[serde(default)]
    pub source: NodeSource,
    /// What the last resize could not allocate (cleared by the next resize).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resize_errors: Vec<ResizeError>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub id: String,
    pub state: NodeState,
    pub scheduling_state: SchedulingState,
    #[serde(with = "time::serde::rfc3339")]
    pub state_transition_time: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub allocation_time: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub last_boot_time: Option<OffsetDateTime>,
    pub ip_address: String,
    pub is_dedicated: bool,
    /// The node's SSH port (Linux nodes), kept across restarts.
    pub ssh_port: Option<u16>,
    /// Revision of the node's accounts; every user change takes the next one.
    pub users_revision: u64,
    /// The users revision the node's provider has acknowledged (durable for agent nodes;
    /// `None`: never acknowledged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_revision: Option<u64>,
    /// The joined host backing the node (agent nodes), and which of its slots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<u32>,
    /// Counts the node's reboots and reimages (a provider acts when they grow).
    #[serde(default)]
    pub boot: u64,
    #[serde(default)]
    pub image: u64,
    /// While the node is `unknown` because its host stopped polling: the state it goes back to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_before_unknown: Option<NodeState>,
    pub etag: String,
    #[serde(with = "time::serde::rfc3339")]
    pub last_modified: OffsetDateTime,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeUser {
    pub name: String,
    pub is_admin: bool,
    /// crypt(3) hash only; the password itself is never stored.
    pub password_hash: Option<String>,
    pub ssh_public_key: Option<String>,
    /// As requested (or defaulted to now + 1 day).
    #[serde(with = "time::serde::rfc3339")]
    pub expiry_time: OffsetDateTime,
    /// What the node enforces: login refused from this instant (Linux: day precision).
    #[serde(with = "time::serde::rfc3339")]
    pub login_refused_from: OffsetDateTime,
    /// The node revision that last changed this user.
    pub revision: u64,
    pub etag: String,
    #[serde(with = "time::serde::rfc3339")]
    pub last_modified: OffsetDateTime,
}

impl NodeUser {
    pub fn to_account(&self) -> crate::NodeAccount {
        crate::NodeAccount {
            name: self.name.clone(),
            is_admin: self.is_admin,
            password_hash: self.password_hash.clone(),
            ssh_public_key: self.ssh_public_key.clone(),
            login_refused_from: self.login_refused_from,
        }
    }
}

/// A new ETag as Azure writes them (`0x8D…`, unquoted): 100 ns ticks since 1601 (FILETIME), made
/// strictly increasing within the process so two writes in one tick still differ.
pub fn new_etag(now: OffsetDateTime) -> String {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let ticks = (now.unix_timestamp_nanos() / 100 + 116_444_736_000_000_000)
        .clamp(0, u64::MAX as i128) as u64;
    let mut prev = LAST.load(Ordering::Relaxed);
    loop {
        let next = ticks.max(prev + 1);
        match LAST.compare_exchange_weak(prev, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return format!("0x8D{:013X}", next & 0x000F_FFFF_FFFF_FFFF),
            Err(p) => prev = p,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_look_like_azure_and_never_repeat() {
        let now = OffsetDateTime::now_utc();
        let a = new_etag(now);
        let b = new_etag(now);
        assert_ne!(a, b);
        assert!(a.starts_with("0x8D") && a.len() == 17, "{a}");
        assert!(a[2..].chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn records_stored_before_agent_nodes_still_load() {
        let node: Node = serde_json::from_str(
            r#"{"id":"n","state":"idle","scheduling_state":"enabled",
            "state_transition_time":"2026-01-01T00:00:00Z","allocation_time":"2026-01-01T00:00:00Z",
            "last_boot_time":null,"ip_address":"10.0.0.4","is_dedicated":true,"ssh_port":50001,
            "users_revision":7,"etag":"0x8D","last_modified":"2026-01-01T00:00:00Z"}"#,
        )
        .unwrap();
        assert_eq!(node.users_revision, 7);
        assert_eq!(
            (node.applied_revision, node.host.as_deref(), node.slot),
            (None, None, None)
        );
        assert_eq!(
            (node.boot, node.image, node.state_before_unknown),
            (0, 0, None)
        );
        let pool: Pool = serde_json::from_str(
            r#"{"id":"p","spec":{},"os":"linux","cloud_service":false,"vm_size":"s",
            "state":"active","allocation_state":"steady","target_dedicated":1,
            "target_low_priority":0,"etag":"0x8D","last_modified":"2026-01-01T00:00:00Z",
            "creation_time":"2026-01-01T00:00:00Z","state_transition_time":"2026-01-01T00:00:00Z",
            "allocation_state_transition_time":"2026-01-01T00:00:00Z"}"#,
        )
        .unwrap();
        assert_eq!(pool.source, NodeSource::Embedded);
        assert!(pool.resize_errors.is_empty());
        // And an embedded node is stored as before (no new keys).
        let text = serde_json::to_string(&node).unwrap();
        assert!(
            !text.contains("host") && !text.contains("applied_revision"),
            "{text}"
        );
    }

    #[test]
    fn node_states_round_trip() {
        for st in NodeState::ALL {
            assert_eq!(NodeState::parse(st.as_str()), Some(st));
            let json = serde_json::to_string(&st).unwrap();
            assert_eq!(json, format!("\"{}\"", st.as_str()));
        }
    }
}
