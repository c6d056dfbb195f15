//! The node protocol: one contract between the service and every node provider that lives in
//! another process (`bluebatch agent` with the linux or the simulated provider).
//!
//! ```text
//! API write ─▶ store: user row + node revision + 1 ─▶ wait until the node's applied revision ≥ it
//! agent ──GET  /_bluebatch/agent/desired?after=CURSOR&wait=30s──▶ the host's whole desired state
//! agent ──POST /_bluebatch/agent/ack {nodes:[{key, revision, results}]}──▶ applied revision
//! ```
//! - Desired state is the **whole** account set of every node a host backs, with each node's
//!   revision; the cursor is a digest of the set of the nodes' digests ([`Cursor`]).
//! - An agent that polls with `delta=1` may get a **delta** instead ([`DesiredState::delta`]):
//!   the nodes that changed since `after` and the keys of those removed, when `after` is the
//!   cursor this very server process answered last for the host (another replica, a restart or
//!   any other cursor gets the whole state). The agent merges it into the whole state it holds,
//!   checks the merged state against the cursor, and enforces only what changed.
//! - `after` is the `cursor` of the last answer the agent applied: the service answers at once
//!   when the host's desired state differs from it, else at the end of `wait` with
//!   `changed: false` (a long poll, like GCE metadata's `wait_for_change`). Any replica answers
//!   any agent.
//! - Identity: a join token `ID.SECRET` (created by an operator, stored hashed, scoped, expiring,
//!   usable once) is exchanged at [`JOIN_PATH`] for a node credential, sent on every later call as
//!   `Authorization: BluebatchNode CREDENTIAL`, and renewed through [`DesiredState::credential`].
//!
//! Every body is JSON with camelCase names; unknown properties are refused, so a newer peer's
//! addition is an error rather than silently ignored.

use bluebatch_core::model::{NodeState, Os};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

/// `POST`: [`JoinRequest`] → [`JoinResponse`]. No other authentication: the token is it.
pub const JOIN_PATH: &str = "/_bluebatch/agent/join";
/// `POST` with the node credential: [`HostReport`] → [`HostReportAnswer`]. Sent at every agent
/// start (and whenever the host's address, sshd port or reserved names change).
pub const HELLO_PATH: &str = "/_bluebatch/agent/hello";
/// `GET ?after=CURSOR&wait=SECONDS[&delta=1]` with the node credential → [`DesiredState`].
pub const DESIRED_PATH: &str = "/_bluebatch/agent/desired";
/// The poll's query parameter by which an agent says it takes a delta answer
/// ([`DesiredState::delta`]): `delta=1`. A server that does not know it refuses the poll (400
/// `UnsupportedQueryParameter`); the agent then polls without it.
pub const DELTA_PARAM: &str = "delta";
/// `POST` with the node credential: [`AckRequest`] → [`AckAnswer`].
pub const ACK_PATH: &str = "/_bluebatch/agent/ack";
/// The `Authorization` scheme of a node credential.
pub const CREDENTIAL_SCHEME: &str = "BluebatchNode";
/// The longest `wait` the service honours (longer asks are cut to it).
pub const MAX_WAIT_SECONDS: u64 = 60;
/// The pool metadata item that chooses where a pool's nodes come from (wins over `--nodes`).
pub const NODES_METADATA: &str = "bluebatch.nodes";

/// Where a pool's nodes come from (the model's type: the pool stores it).
pub use bluebatch_core::model::NodeSource;

/// Which provider an agent runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// Real OS accounts on the host; the host's own sshd logs them in. One node per host.
    Linux,
    /// Light embedded SSH nodes served by the agent process (`--simulate N`): N nodes, for
    /// Linux and Windows pools alike.
    Simulate,
    /// A sandboxed node made by `bluebatch serve --nodes sandbox`: the linux provider inside a
    /// small Linux machine of its own (own network, mount and PID namespaces, its own sshd).
    /// One node per host; such a host backs only sandbox pools.
    Sandbox,
}

/// What a host says about itself: at join, and at every agent start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostReport {
    /// The host's name (informational; the service names hosts by their id).
    pub hostname: String,
    pub provider: ProviderKind,
    /// How many nodes the host can back: 1 for the linux provider, N for `--simulate N`.
    pub slots: u32,
    /// The address the node reports as `ipAddress` and for remote login (`--advertise-address`,
    /// else the local address of the agent's connection to the service).
    pub address: String,
    /// The port of the host's sshd (linux), absent for simulated nodes (each has its own port,
    /// reported per node in the acknowledgement).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_port: Option<u16>,
    /// User names the host already has and does not manage: Add User of one of them is refused.
    #[serde(default)]
    pub reserved_names: Vec<String>,
    /// The agent's version (informational).
    #[serde(default)]
    pub version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JoinRequest {
    /// `ID.SECRET`, as `bluebatch join-token create` printed it.
    pub token: String,
    pub host: HostReport,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JoinResponse {
    /// The service's name for this host (`bluebatch host list`).
    pub host_id: String,
    /// The node credential: a secret, kept by the agent with mode 0600, never logged.
    pub credential: String,
    #[serde(with = "time::serde::rfc3339")]
    pub credential_expires: OffsetDateTime,
    /// The account whose capacity the host became.
    pub account: String,
    /// How long the service waits for a poll before it marks the host's nodes `unknown`.
    pub grace_seconds: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostReportAnswer {
    pub host_id: String,
}

/// The whole desired state of a host: every node it backs right now. A slot missing from
/// `nodes` backs no node: the provider removes every account it manages there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DesiredState {
    /// Opaque; send it back as `after` to wait for the next change.
    pub cursor: String,
    /// `false`: the wait ended with nothing new (`nodes` is then still the whole state).
    pub changed: bool,
    pub nodes: Vec<NodeDesired>,
    /// The service clock's offset from the wall clock, in seconds: providers that enforce expiry
    /// with the host's own clock (shadow) shift their expiry by it.
    pub clock_offset_seconds: i64,
    /// The host is drained: it takes no new pools (informational for the agent).
    #[serde(default)]
    pub drained: bool,
    /// A renewed node credential: use it from now on (the old one keeps working until it
    /// expires).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
    /// `true` (only to a poll that sent [`DELTA_PARAM`], and only when its `after` is the cursor
    /// this server answered last for the host): `nodes` holds only the nodes that differ from
    /// the state `after` names (new or changed, each whole), and `removed` the keys of the nodes
    /// no longer in it. `cursor` is still the digest of the whole state. `false`: `nodes` is the
    /// whole state.
    #[serde(default, skip_serializing_if = "is_false")]
    pub delta: bool,
    /// With `delta`: the keys of the nodes of the state `after` names that are gone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// One node a host backs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeDesired {
    /// Which of the host's slots backs the node (0-based, < `slots`).
    pub slot: u32,
    /// The node's key in acknowledgements (unique in the service).
    pub key: String,
    pub pool_id: String,
    pub node_id: String,
    pub os: Os,
    /// The node's Batch state (a provider may refuse logins in states that take none).
    pub state: NodeState,
    /// The node's users revision: acknowledge it once `accounts` is enforced.
    pub revision: u64,
    /// Counts the node's reboots: when it grows, end every session of managed accounts.
    pub boot: u64,
    /// Counts the node's reimages: when it grows, wipe every managed account and home (and give
    /// a simulated node a new host key) before applying `accounts`.
    pub image: u64,
    /// The whole account set, sorted by name.
    pub accounts: Vec<DesiredAccount>,
}

/// The fields of one node that name its desired state in the cursor (its accounts are named by
/// its revision: every change of them takes the next one, a reimage too).
#[derive(Debug, Clone, Copy)]
pub struct NodeFields<'a> {
    pub key: &'a str,
    pub pool_id: &'a str,
    pub node_id: &'a str,
    pub state: NodeState,
    pub os: Os,
    pub slot: u32,
    pub revision: u64,
    pub boot: u64,
    pub image: u64,
}

/// The digest of one node's fields (SHA-256): what a delta compares, and what the cursor sums.
pub type NodeDigest = [u8; 32];

impl NodeFields<'_> {
    fn feed(&self, h: &mut Sha256) {
        for part in [self.key, self.pool_id, self.node_id, self.state.as_str()] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        h.update([(self.os == Os::Linux) as u8]);
        for v in [u64::from(self.slot), self.revision, self.boot, self.image] {
            h.update(v.to_le_bytes());
        }
    }

    /// A digest of this node alone (what a delta compares and the cursor sums).
    pub fn digest(&self) -> NodeDigest {
        let mut h = Sha256::new();
        self.feed(&mut h);
        h.finalize().into()
    }
}

impl NodeDesired {
    pub fn fields(&self) -> NodeFields<'_> {
        NodeFields {
            key: &self.key,
            pool_id: &self.pool_id,
            node_id: &self.node_id,
            state: self.state,
            os: self.os,
            slot: self.slot,
            revision: self.revision,
            boot: self.boot,
            image: self.image,
        }
    }
}

/// The cursor of a whole desired state: a digest of the set of its nodes' digests (their sum,
/// as two 128-bit lanes, and their count), the clock offset and the drained flag. What the
/// service answers as [`DesiredState::cursor`], and what an agent checks a merged delta
/// against. The order of the nodes does not matter (each node's digest names its slot), and a
/// node's digest can be taken out again ([`Cursor::remove`]): a change of one node costs one
/// node's digest, on the service and on the agent, whatever the host's size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cursor {
    low: u128,
    high: u128,
    count: u64,
}

fn lanes(d: &NodeDigest) -> (u128, u128) {
    let mut low = [0u8; 16];
    let mut high = [0u8; 16];
    low.copy_from_slice(&d[..16]);
    high.copy_from_slice(&d[16..]);
    (u128::from_le_bytes(low), u128::from_le_bytes(high))
}

impl Cursor {
    pub fn node(&mut self, f: &NodeFields<'_>) {
        self.add(&f.digest());
    }
    /// Puts a node's digest in.
    pub fn add(&mut self, d: &NodeDigest) {
        let (l, h) = lanes(d);
        self.low = self.low.wrapping_add(l);
        self.high = self.high.wrapping_add(h);
        self.count = self.count.wrapping_add(1);
    }
    /// Takes a node's digest (put in before) out.
    pub fn remove(&mut self, d: &NodeDigest) {
        let (l, h) = lanes(d);
        self.low = self.low.wrapping_sub(l);
        self.high = self.high.wrapping_sub(h);
        self.count = self.count.wrapping_sub(1);
    }
    pub fn finish(&self, clock_offset_seconds: i64, drained: bool) -> String {
        let mut h = Sha256::new();
        h.update(b"bluebatch cursor 2");
        h.update(self.low.to_le_bytes());
        h.update(self.high.to_le_bytes());
        h.update(self.count.to_le_bytes());
        h.update(clock_offset_seconds.to_le_bytes());
        h.update([drained as u8]);
        let mut s = String::with_capacity(32);
        for b in &h.finalize()[..16] {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }
}

/// The cursor of `nodes` (in any order).
pub fn cursor_of(nodes: &[NodeDesired], clock_offset_seconds: i64, drained: bool) -> String {
    let mut c = Cursor::default();
    for n in nodes {
        c.node(&n.fields());
    }
    c.finish(clock_offset_seconds, drained)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DesiredAccount {
    pub name: String,
    pub is_admin: bool,
    /// crypt(3) hash; `None`: password login refused (shadow `*`). The password itself never
    /// leaves the service.
    #[serde(default)]
    pub password_hash: Option<String>,
    /// One validated OpenSSH public key line; `None`: key login refused.
    #[serde(default)]
    pub ssh_public_key: Option<String>,
    /// Login is refused from this instant of the service clock (Linux: 00:00 UTC of the day
    /// after the expiry's date).
    #[serde(with = "time::serde::rfc3339")]
    pub login_refused_from: OffsetDateTime,
}

impl DesiredAccount {
    pub fn from_account(a: &bluebatch_core::NodeAccount) -> Self {
        Self {
            name: a.name.clone(),
            is_admin: a.is_admin,
            password_hash: a.password_hash.clone(),
            ssh_public_key: a.ssh_public_key.clone(),
            login_refused_from: a.login_refused_from,
        }
    }
    pub fn to_account(&self) -> bluebatch_core::NodeAccount {
        bluebatch_core::NodeAccount {
            name: self.name.clone(),
            is_admin: self.is_admin,
            password_hash: self.password_hash.clone(),
            ssh_public_key: self.ssh_public_key.clone(),
            login_refused_from: self.login_refused_from,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AckRequest {
    pub nodes: Vec<NodeAck>,
}

/// What a provider enforces on one node now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeAck {
    pub key: String,
    /// The revision now enforced. With a failed user, the revision attempted (the service then
    /// answers the waiting write with the failure; the agent retries with backoff).
    pub revision: u64,
    /// The image (reimage count) now in place.
    pub image: u64,
    /// The node's SSH port, when it differs from the host's (simulated nodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_port: Option<u16>,
    /// One entry per account that failed; an empty list means every account is enforced.
    #[serde(default)]
    pub failures: Vec<UserFailure>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UserFailure {
    pub name: String,
    /// The host's reason (a tool's exit status and message, never a secret).
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AckAnswer {
    /// Keys of acknowledgements the service did not take (not this host's node, or a revision
    /// it never asked for); the rest were recorded.
    #[serde(default)]
    pub refused: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(slot: u32, key: &str, revision: u64) -> NodeDesired {
        NodeDesired {
            slot,
            key: key.into(),
            pool_id: "p".into(),
            node_id: key.into(),
            os: Os::Linux,
            state: NodeState::Idle,
            revision,
            boot: 0,
            image: 0,
            accounts: vec![],
        }
    }

    #[test]
    fn the_cursor_names_the_set_of_nodes_and_takes_a_node_out_again() {
        let (a, b, c) = (node(0, "a", 1), node(1, "b", 1), node(2, "c", 1));
        let whole = cursor_of(&[a.clone(), b.clone(), c.clone()], 0, false);
        assert_eq!(
            whole,
            cursor_of(&[c.clone(), a.clone(), b.clone()], 0, false)
        );
        assert_ne!(whole, cursor_of(&[a.clone(), b.clone()], 0, false));
        assert_ne!(
            whole,
            cursor_of(&[a.clone(), b.clone(), c.clone()], 1, false)
        );
        assert_ne!(
            whole,
            cursor_of(&[a.clone(), b.clone(), c.clone()], 0, true)
        );
        // Any field of a node moves it: revision, slot.
        assert_ne!(
            whole,
            cursor_of(&[a.clone(), b.clone(), node(2, "c", 2)], 0, false)
        );
        assert_ne!(
            whole,
            cursor_of(&[a.clone(), b.clone(), node(3, "c", 1)], 0, false)
        );
        // The same node twice is not the node once.
        assert_ne!(
            cursor_of(std::slice::from_ref(&a), 0, false),
            cursor_of(&[a.clone(), a.clone()], 0, false)
        );
        // Taking b out and putting its change in is the changed state's cursor.
        let mut sum = Cursor::default();
        for n in [&a, &b, &c] {
            sum.node(&n.fields());
        }
        assert_eq!(sum.finish(0, false), whole);
        sum.remove(&b.fields().digest());
        let b2 = node(1, "b", 2);
        sum.add(&b2.fields().digest());
        assert_eq!(sum.finish(0, false), cursor_of(&[a, b2, c], 0, false));
        assert_eq!(Cursor::default().finish(0, false).len(), 32);
    }

    #[test]
    fn names_are_camel_case_and_unknown_fields_refused() {
        let ack = AckRequest {
            nodes: vec![NodeAck {
                key: "k".into(),
                revision: 3,
                image: 0,
                ssh_port: None,
                failures: vec![],
            }],
        };
        let text = serde_json::to_string(&ack).unwrap();
        assert_eq!(
            text,
            r#"{"nodes":[{"key":"k","revision":3,"image":0,"failures":[]}]}"#
        );
        assert!(serde_json::from_str::<AckRequest>(r#"{"nodes":[],"x":1}"#).is_err());
        assert_eq!(NodeSource::parse("agents"), Some(NodeSource::Agents));
        assert_eq!(NodeSource::parse("Agents"), None);
        assert_eq!(
            serde_json::to_string(&ProviderKind::Sandbox).unwrap(),
            r#""sandbox""#
        );
        assert_eq!(
            serde_json::from_str::<ProviderKind>(r#""sandbox""#).unwrap(),
            ProviderKind::Sandbox
        );
    }
}
