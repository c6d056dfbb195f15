//! What every node provider of the agent does: say what the host offers, and enforce the
//! host's whole desired state (never deltas), answering one acknowledgement per node.

use bluebatch_protocol::{DesiredState, NodeAck, ProviderKind};

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
    /// The agent is stopping.
    async fn shutdown(&mut self);
}

/// The account names of a node, for logs (never their secrets).
pub fn names(accounts: &[bluebatch_protocol::DesiredAccount]) -> String {
    let names: Vec<&str> = accounts.iter().map(|a| a.name.as_str()).collect();
    names.join(",")
}
