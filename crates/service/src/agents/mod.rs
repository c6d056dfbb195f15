//! The hub: the service's side of agent-backed nodes (hosts joined with `bluebatch agent`).
//!
//! - **Join**: an operator creates a join token (`ID.SECRET`, stored as the SHA-256 of the secret,
//!   scoped to an account and optionally a pool, expiring, usable once); an agent exchanges it
//!   for a node credential: `HOST.EXPIRES.HMAC` (HMAC-SHA256 with a service secret kept in the
//!   store), renewed through the long poll once past half its life. Nothing here logs a secret.
//! - **Desired state**: computed from the store's truth on every poll (every node a host backs,
//!   with its whole account set and revision); the cursor is a digest of it, so any replica and
//!   any restart answer the same cursor for the same state.
//! - **Acknowledgements**: an ack moves the node's applied revision forward durably (never back)
//!   and wakes the writes waiting for it; an ack with failures answers them `InternalError`.
//! - **Liveness**: a host that neither polls nor acknowledges for `Config::agent_grace` has its
//!   nodes `unknown`; its next call puts them back in the state they had.
//!
//! The parts, one a file: `tokens` (join tokens and the join itself), `credential` (the node
//! credential and its secret), `capacity` (a host's slots: which nodes it backs, which are free;
//! the pools' assignment of nodes to hosts lives in `crate::pools`), `hosts` (what a host reports
//! and what an operator does with it), `poll` (desired state, cursor, long poll), `ack`
//! (acknowledgements and what waiting writes see) and `liveness` (grace time, `unknown` and back).

mod ack;
mod capacity;
mod credential;
mod hosts;
mod liveness;
mod poll;
mod tokens;

pub(crate) use ack::{AckSeen, FailedRecord, apply_failed};
pub(crate) use capacity::HostEntry;

use crate::state::{NodeEntry, State};
use bluebatch_core::error::{BatchError, Code};
use bluebatch_protocol::ProviderKind;
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::watch;

/// Store keys of the hub's records.
pub(crate) const TOKEN_PREFIX: &str = "agent/token/";
pub(crate) const HOST_PREFIX: &str = "agent/host/";
pub(crate) const SECRET_RECORD: &str = "meta/agent-secret";

/// The most nodes one host backs (`bluebatch agent --simulate N`).
pub const MAX_HOST_SLOTS: u32 = 10_000;
/// The longest a join token lives.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(366 * 86_400);

/// A join token just created: `token` is the secret, shown once.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinTokenCreated {
    pub id: String,
    /// `ID.SECRET`: what the agent joins with.
    pub token: String,
    pub pool: Option<String>,
    pub expires: OffsetDateTime,
}

impl std::fmt::Debug for JoinTokenCreated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinTokenCreated")
            .field("id", &self.id)
            .field("token", &"<secret>")
            .field("pool", &self.pool)
            .field("expires", &self.expires)
            .finish()
    }
}

/// A join token as listed (never its secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinTokenView {
    pub id: String,
    pub pool: Option<String>,
    pub expires: OffsetDateTime,
    pub used: bool,
}

/// A joined host as `bluebatch host list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostView {
    pub id: String,
    pub account: String,
    pub hostname: String,
    pub provider: ProviderKind,
    pub address: String,
    pub ssh_port: Option<u16>,
    pub slots: u32,
    /// (pool id, node id) of every node the host backs.
    pub nodes: Vec<(String, String)>,
    pub drained: bool,
    /// Polling now, or within the grace time.
    pub connected: bool,
    /// Wall-clock time of its last call.
    pub last_seen: Option<OffsetDateTime>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct TokenRecord {
    pub id: String,
    pub account: String,
    #[serde(default)]
    pub pool: Option<String>,
    /// Hex SHA-256 of the secret.
    pub hash: String,
    #[serde(with = "time::serde::rfc3339")]
    pub expires: OffsetDateTime,
    #[serde(default)]
    pub used: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct HostRecord {
    pub id: String,
    pub account: String,
    /// The pool the host's join token was scoped to (it backs only that pool).
    #[serde(default)]
    pub pool: Option<String>,
    pub hostname: String,
    pub provider: ProviderKind,
    pub slots: u32,
    pub address: String,
    #[serde(default)]
    pub ssh_port: Option<u16>,
    #[serde(default)]
    pub reserved_names: Vec<String>,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub drained: bool,
    #[serde(with = "time::serde::rfc3339")]
    pub joined: OffsetDateTime,
    /// Expiry of the newest credential handed out.
    #[serde(with = "time::serde::rfc3339")]
    pub credential_expires: OffsetDateTime,
    /// When the newest credential was handed out by a renewal: for a while after (a quarter of
    /// its life, at most 10 minutes) every poll answer repeats it, as an answer may be lost.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub renewed_at: Option<OffsetDateTime>,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct SecretRecord {
    pub key: String,
}

/// A node a host backs: (account, pool key, node id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NodeRef {
    pub account: String,
    pub pool: String,
    pub node: String,
}

#[derive(Default)]
pub(crate) struct HubState {
    pub secret: Vec<u8>,
    pub tokens: BTreeMap<String, TokenRecord>,
    pub hosts: BTreeMap<String, HostEntry>,
}

/// Wake-ups, outside the state lock's data (lock order: state, then these).
#[derive(Default)]
pub(crate) struct Hub {
    notify: Mutex<HashMap<String, watch::Sender<u64>>>,
    acks: Mutex<HashMap<String, watch::Sender<AckSeen>>>,
    /// Per host: what this process answered last to a poll that takes deltas.
    answered: Mutex<HashMap<String, poll::Answered>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn auth_failed(detail: &str) -> BatchError {
    BatchError::new(Code::AuthenticationFailed).with("AuthenticationErrorDetail", detail)
}

fn invalid(property: &str, reason: &str) -> BatchError {
    BatchError::property(Code::InvalidPropertyValue, property, reason)
}

fn not_found(what: &str) -> BatchError {
    BatchError::new(Code::ResourceNotFound).message(format!("The specified {what} does not exist."))
}

const ALNUM: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

fn random_alnum(n: usize) -> String {
    let mut rng = rand::rng();
    (0..n)
        .map(|_| ALNUM[rng.random_range(0..ALNUM.len())] as char)
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl State {
    /// The node a host's slot backs.
    pub(crate) fn node_of(&self, r: &NodeRef) -> Option<(&crate::state::PoolEntry, &NodeEntry)> {
        let p = self.pool(&r.account, &r.pool)?;
        Some((p, p.nodes.get(&r.node)?))
    }
}

#[cfg(test)]
mod send_tests {
    use super::*;
    use crate::Service;
    use bluebatch_protocol::{AckRequest, HostReport, JoinRequest};

    fn is_send<T: Send>(_: &T) {}

    #[allow(dead_code, unused_must_use)]
    fn futures_are_send(svc: Service, req: JoinRequest, ack: AckRequest, rep: HostReport) {
        is_send(&svc.join(req));
        is_send(&svc.desired("h", None, Duration::ZERO));
        is_send(&svc.ack("h", ack));
        is_send(&svc.hello("h", rep));
        is_send(&svc.create_join_token("a", None, Duration::ZERO));
        is_send(&svc.revoke_join_token("a", "i"));
        is_send(&svc.drain_host("a", "h"));
        is_send(&svc.revoke_host("a", "h"));
    }
}
