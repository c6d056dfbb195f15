//! The node fabric as the service sees it: whatever hosts the nodes (the embedded SSH provider,
//! later remote agents) applies account changes and acknowledges the revision it has applied.

use bluebatch_core::model::NodeState;
use bluebatch_core::{AccountChange, NodeAccount};
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use time::OffsetDateTime;

/// A source a node refuses for too many failed logins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginLockout {
    pub source: IpAddr,
    pub failures: u32,
    /// Wall-clock time (not the service clock) from which the source may log in again.
    pub refused_until: OffsetDateTime,
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
    /// Applies a change tagged with `revision`; returns the revision the node now has applied.
    fn apply(&self, key: &str, revision: u64, change: AccountChange) -> u64;
    fn applied_revision(&self, key: &str) -> Option<u64>;
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
}
