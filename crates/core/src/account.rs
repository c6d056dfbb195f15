//! What a node enforces for one of its accounts: the view the node fabric pushes to nodes.

use time::OffsetDateTime;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAccount {
    pub name: String,
    pub is_admin: bool,
    /// crypt(3) hash (`$6$…`), never the password itself. `None`: password login refused.
    pub password_hash: Option<String>,
    /// One OpenSSH public key line (`type base64 [comment]`), already validated.
    /// `None`: public-key login refused.
    pub ssh_public_key: Option<String>,
    /// Login is refused from this instant on (service clock). For Linux nodes this is 00:00 UTC
    /// of the day after the requested expiry (day precision, docs/contract.md §6).
    pub login_refused_from: OffsetDateTime,
}

impl NodeAccount {
    pub fn is_expired_at(&self, now: OffsetDateTime) -> bool {
        now >= self.login_refused_from
    }
}
