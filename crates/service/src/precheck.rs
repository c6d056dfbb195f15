//! Read-only checks a write runs again under the lock, made first where the caller has costly
//! work to do before the write: a password's crypt hash (milliseconds of CPU) is computed only
//! for a request the write would not refuse anyway.

use crate::Service;
use crate::state::user_key;
use crate::users::UserAddr;
use bluebatch_core::error::{BatchError, Code, Result};
use bluebatch_core::model::Os;
use bluebatch_core::users::{UserBody, check_node_state_for_users, check_os_rules};

impl Service {
    /// What Add User (`update: None`) or Update User (`update: Some(name)`) of `body` at `at`
    /// would refuse in the current state, in the write's own order: the pool (404
    /// `PoolNotFound`), the node (404 `NodeNotFound`), the user of an update (404
    /// `NodeUserNotFound`), the body's rules for the pool's OS, a name the node's host reserves,
    /// the node's state (409), and for an add the user already there or the node full.
    ///
    /// Read-only and cheap (one look under the lock). The write checks all of it again, so a
    /// change between the two (a concurrent delete) still gets the right answer.
    pub fn check_user_target(
        &self,
        at: &UserAddr<'_>,
        update: Option<&str>,
        body: &UserBody,
    ) -> Result<()> {
        let st = self.lock();
        let entry = st
            .pool(at.account, at.pool)
            .ok_or_else(|| BatchError::new(Code::PoolNotFound))?;
        let os = entry.pool.os;
        let n = entry
            .nodes
            .get(at.node)
            .ok_or_else(|| BatchError::new(Code::NodeNotFound))?;
        let name = match update {
            Some(n) => n,
            None => body.name.as_deref().unwrap_or_default(),
        };
        let ukey = user_key(os, name);
        if update.is_some() && !n.users.contains_key(&ukey) {
            return Err(BatchError::new(Code::NodeUserNotFound));
        }
        check_os_rules(os, body)?;
        if update.is_none()
            && n.node.host.is_some()
            && Service::reserved_on(&st, n.node.host.as_deref(), name, os == Os::Windows)
        {
            let why = format!(
                "The user name {name} is reserved on this node: the host has an account of that name that bluebatch does not manage."
            );
            return Err(
                BatchError::property(Code::InvalidPropertyValue, "name", why.clone()).message(why),
            );
        }
        check_node_state_for_users(n.node.state)?;
        if update.is_none() {
            if n.users.contains_key(&ukey) {
                return Err(BatchError::new(Code::NodeUserExists));
            }
            if n.users.len() >= self.inner.config.max_users_per_node {
                return Err(
                    BatchError::new(Code::OperationNotValidOnNode).message(format!(
                        "The node already has the maximum of {} user accounts.",
                        self.inner.config.max_users_per_node
                    )),
                );
            }
        }
        Ok(())
    }
}
