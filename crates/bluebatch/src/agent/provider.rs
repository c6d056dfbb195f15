//! What every node provider of the agent does: say what the host offers, and enforce the
//! host's whole desired state, answering one acknowledgement per node; a provider that says so
//! also enforces a change of it (the nodes that changed, the nodes removed) without being
//! handed the rest.

use bluebatch_protocol::{DesiredState, NodeAck, NodeDesired, ProviderKind};

pub trait Provider {
    fn kind(&self) -> ProviderKind;
    /// How many nodes the host can back.
    fn slots(&self) -> u32;
    /// The host's sshd port (linux); `None` when every node has its own (simulated).
    fn ssh_port(&self) -> Option<u16>;
    /// User names the host has and does not manage (Add User of one is refused by the service).
    fn reserved_names(&self) -> Vec<String>;
    /// Enforces `state` — every node of it, and no node that is not in it — and answers what
    /// is enforced now, one acknowledgement per node of `state`. Must never block the caller's
    /// tokio worker for long (blocking work goes to `spawn_blocking`).
    async fn apply(&mut self, state: &DesiredState) -> Vec<NodeAck>;
    /// Enforces a change of the state last applied: `changed` (each node whole: new, or
    /// changed in any field) and the removal of the nodes `removed`, every other node staying
    /// as it is; the service clock's offset is `clock_offset_seconds` (unchanged since the last
    /// apply). Answers one acknowledgement per node of `changed`. `None`: this provider takes
    /// whole states only (the agent then calls [`Provider::apply`] with the merged state).
    async fn apply_changes(
        &mut self,
        clock_offset_seconds: i64,
        changed: &[NodeDesired],
        removed: &[String],
    ) -> Option<Vec<NodeAck>> {
        let _ = (clock_offset_seconds, changed, removed);
        None
    }
    /// The agent is stopping.
    async fn shutdown(&mut self);
}

/// The account names of a node, for logs (never their secrets).
pub fn names(accounts: &[bluebatch_protocol::DesiredAccount]) -> String {
    let names: Vec<&str> = accounts.iter().map(|a| a.name.as_str()).collect();
    names.join(",")
}
