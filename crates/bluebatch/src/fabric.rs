//! The embedded SSH provider plugged into the service's node fabric.

use bluebatch_core::NodeAccount;
use bluebatch_core::model::NodeState;
use bluebatch_node::SshNodes;
use bluebatch_service::{BoxFuture, LoginLockout, LoginRecord, NodeFabric};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

pub struct SshFabric(pub Arc<SshNodes>);

impl NodeFabric for SshFabric {
    fn start_node<'a>(
        &'a self,
        key: &'a str,
        port: Option<u16>,
    ) -> BoxFuture<'a, io::Result<SocketAddr>> {
        Box::pin(self.0.start_node(key, port))
    }
    fn stop_node<'a>(&'a self, key: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(self.0.stop_node(key))
    }
    fn remove_node<'a>(&'a self, key: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(self.0.remove_node(key))
    }
    fn reimage_node<'a>(&'a self, key: &'a str) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(self.0.reimage_node(key))
    }
    fn apply(&self, key: &str, revision: u64, accounts: Arc<[NodeAccount]>) -> u64 {
        // The whole set, taken by the node as it is (no copy, no delta).
        self.0.apply(
            key,
            revision,
            bluebatch_node::AccountChange::Snapshot(accounts),
        )
    }
    fn apply_deferred(&self, key: &str, revision: u64, accounts: Arc<[NodeAccount]>) -> u64 {
        self.0.apply_deferred(
            key,
            revision,
            bluebatch_node::AccountChange::Snapshot(accounts),
        )
    }
    fn apply_one_deferred(
        &self,
        key: &str,
        base: u64,
        revision: u64,
        name: &str,
        account: Option<NodeAccount>,
    ) -> Option<u64> {
        // One account changed in place on a node at `base`; the whole set otherwise.
        self.0
            .apply_one_deferred(key, base, revision, name, account)
    }
    fn enforce(&self, key: &str) {
        self.0.enforce(key)
    }
    fn acknowledged<'a>(&'a self, key: &'a str, revision: u64) -> BoxFuture<'a, ()> {
        // The embedded nodes apply a change within `apply` itself: an acknowledgement not given
        // then never comes.
        let applied = self.0.applied_revision(key).is_some_and(|r| r >= revision);
        Box::pin(async move {
            if !applied {
                std::future::pending::<()>().await
            }
        })
    }
    fn applied_revision(&self, key: &str) -> Option<u64> {
        self.0.applied_revision(key)
    }
    fn accounts(&self, key: &str) -> Vec<NodeAccount> {
        self.0.accounts(key)
    }
    fn set_state(&self, key: &str, state: NodeState) {
        self.0.set_state(key, state)
    }
    fn login_state(&self, key: &str) -> Option<(NodeState, bool)> {
        self.0
            .state(key)
            .map(|s| (s, bluebatch_node::accepts_logins(s)))
    }
    fn login_lockouts(&self, key: &str) -> Vec<LoginLockout> {
        self.0
            .login_lockouts(key)
            .into_iter()
            .map(|l| LoginLockout {
                source: l.source,
                failures: l.failures,
                refused_until: l.refused_until,
            })
            .collect()
    }
    fn last_login_seq(&self, key: &str) -> u64 {
        self.0.last_login_seq(key)
    }
    fn login_activity(&self, key: &str) -> Vec<LoginRecord> {
        self.0
            .login_activity(key)
            .into_iter()
            .map(|r| LoginRecord {
                seq: r.seq,
                time: r.time,
                user: r.user,
                source: r.source,
                method: r.method.to_string(),
                accepted: r.accepted,
                reason: r.reason,
                key_fingerprint: r.key_fingerprint,
            })
            .collect()
    }
}
