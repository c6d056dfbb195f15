//! The node provider seam: the one interface between the service and whatever hosts the nodes
//! (the embedded SSH provider today, remote node agents later).
//!
//! The service owns the truth (the store); a provider enforces it on its nodes. What the service
//! tells a provider, and when:
//! - **accounts**: after every user change of a node, the node's **whole** account set with its
//!   users revision, in revision order ([`NodeFabric::apply`]); after a restart the whole set at
//!   the stored revision. A provider reconciles the snapshot and acknowledges a
//!   revision once the node enforces it (at once, as `apply`'s answer, or later through
//!   [`NodeFabric::acknowledged`]). A provider may instead take the change of the one account a
//!   write changed, when its node is exactly at the revision before
//!   ([`NodeFabric::apply_one_deferred`]; any doubt and it gets the whole set). A user write answers only
//!   after the acknowledgement; past the service's `ack_timeout` it answers `OperationTimedOut`
//!   and the change stays recorded, so a node that acknowledges later has converged.
//! - **state**: every Batch state a node takes, as it takes it ([`NodeFabric::set_state`]), which
//!   decides whether the node takes logins.
//! - **lifecycle**: start (a node leaving `creating`, every node after a restart), stop and start
//!   (reboot), stop, reimage and start (reimage), remove (the node left its pool).
//!
//! `apply`, `set_state` and the reads are called under the service's state lock: they must not
//! block. The lifecycle calls are awaited outside it.

use bluebatch_core::NodeAccount;
use bluebatch_core::model::NodeState;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use time::OffsetDateTime;

/// A source a node refuses for too many failed logins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginLockout {
    pub source: IpAddr,
    pub failures: u32,
    /// Wall-clock time (not the service clock) from which the source may log in again.
    pub refused_until: OffsetDateTime,
}

/// One authentication outcome on a node's login endpoint (its login activity). Never a password
/// or key material; a key as its SHA256 fingerprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginRecord {
    /// The entry's number on its node, one more for each next outcome: what is new since a
    /// reader last looked.
    pub seq: u64,
    /// The service clock's time of the decision.
    pub time: OffsetDateTime,
    /// The user name the client gave (`None`: the connection ended before it gave one).
    pub user: Option<String>,
    pub source: IpAddr,
    /// `password`, `publickey`, `keyboard-interactive` or `none`.
    pub method: String,
    pub accepted: bool,
    /// Why it was refused (`None` when accepted).
    pub reason: Option<String>,
    /// `SHA256:…` of the key of a public-key login.
    pub key_fingerprint: Option<String>,
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

pub trait NodeFabric: Send + Sync + 'static {
    /// Brings up the node's login endpoint, on `preferred_port` when it is free.
    fn start_node<'a>(
        &'a self,
        key: &'a str,
        preferred_port: Option<u16>,
    ) -> BoxFuture<'a, io::Result<SocketAddr>>;
    /// Takes the endpoint down and ends every session; the node's files stay.
    fn stop_node<'a>(&'a self, key: &'a str) -> BoxFuture<'a, ()>;
    /// The node left its pool: stop it and delete everything it had.
    fn remove_node<'a>(&'a self, key: &'a str) -> BoxFuture<'a, ()>;
    /// A fresh image: new host identity, empty home.
    fn reimage_node<'a>(&'a self, key: &'a str) -> BoxFuture<'a, io::Result<()>>;
    /// Hands the node its whole account set (sorted by name) at users revision `revision`; a
    /// snapshot older than what the node has applied was superseded and is ignored. Returns the
    /// revision the node has applied now: `revision` or later when it acknowledges at once, less
    /// when the acknowledgement comes later (see [`NodeFabric::acknowledged`]). Called under the
    /// state lock, in revision order; must not block.
    fn apply(&self, key: &str, revision: u64, accounts: Arc<[NodeAccount]>) -> u64;
    /// [`NodeFabric::apply`], except that the sessions of accounts removed or expired end only
    /// in the [`NodeFabric::enforce`] that the caller makes once out of the state lock (ending
    /// sessions is no work for under it). The node refuses new logins of a removed account as
    /// soon as this returns.
    fn apply_deferred(&self, key: &str, revision: u64, accounts: Arc<[NodeAccount]>) -> u64 {
        self.apply(key, revision, accounts)
    }
    /// [`NodeFabric::apply_deferred`] of a change of one account at `revision` (`Some`: add or
    /// replace the account `name`; `None`: remove it), for a node that has applied exactly
    /// revision `base` (so it has the whole set of `base`; the change makes it `revision`'s).
    /// Returns what `apply_deferred` would, or `None` when the provider does not take it (the
    /// node is at another revision, or the provider takes whole sets only: the default): the
    /// caller then hands the node the whole set. Called under the state lock; must not block.
    fn apply_one_deferred(
        &self,
        _key: &str,
        _base: u64,
        _revision: u64,
        _name: &str,
        _account: Option<NodeAccount>,
    ) -> Option<u64> {
        None
    }
    /// Ends the node's sessions of accounts it no longer has or that are expired now (after
    /// [`NodeFabric::apply_deferred`]; never blocks).
    fn enforce(&self, _key: &str) {}
    /// Resolves once the node has applied `revision` or a later one: the acknowledgement of a
    /// change that [`NodeFabric::apply`] did not acknowledge at once. The service bounds the
    /// wait (it may drop the future at any point); a node that never acknowledges never resolves.
    fn acknowledged<'a>(&'a self, key: &'a str, revision: u64) -> BoxFuture<'a, ()>;
    /// The revision the node has applied (acknowledged), if it has applied any.
    fn applied_revision(&self, key: &str) -> Option<u64>;
    /// The accounts the node enforces.
    fn accounts(&self, key: &str) -> Vec<NodeAccount>;
    /// Tells the node its Batch state, which decides whether it takes logins (and whether its
    /// sessions end). In memory; called under the service's state lock, in the order of the
    /// changes.
    fn set_state(&self, _key: &str, _state: NodeState) {}
    /// The state the node was last told, if any, and whether it takes logins in it.
    fn login_state(&self, _key: &str) -> Option<(NodeState, bool)> {
        None
    }
    /// The sources the node refuses right now for too many failed logins.
    fn login_lockouts(&self, _key: &str) -> Vec<LoginLockout> {
        Vec::new()
    }
    /// The node's last authentication outcomes, newest first (none by default: a provider that
    /// keeps no login activity).
    fn login_activity(&self, _key: &str) -> Vec<LoginRecord> {
        Vec::new()
    }
    /// The `seq` of the node's newest login outcome (0: none): cheap, for pollers.
    fn last_login_seq(&self, _key: &str) -> u64 {
        0
    }
}
