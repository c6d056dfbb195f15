//! A node's login activity as the emulator's control endpoint and console show it: what its
//! provider recorded of the authentications on its login endpoint, read for the calling
//! account only (another account's pool is not found, as in the API).

use crate::state::node_key;
use crate::{LoginRecord, Service, node_not_found, pool_not_found};
use bluebatch_core::error::Result;

impl Service {
    /// The node's last authentication outcomes, newest first. Embedded SSH nodes keep their
    /// last 256; a node of a joined host (`bluebatch agent`) or any provider that keeps none
    /// answers an empty list.
    pub fn node_logins(&self, account: &str, pool: &str, node: &str) -> Result<Vec<LoginRecord>> {
        Ok(match self.embedded_key(account, pool, node)? {
            Some(key) => self.inner.nodes.login_activity(&key),
            None => Vec::new(),
        })
    }

    /// The `seq` of the node's newest login outcome, 0 when it has none (or is a joined host's):
    /// what a poller (the console's live updates) compares, without copying the list.
    pub fn node_last_login_seq(&self, account: &str, pool: &str, node: &str) -> Result<u64> {
        Ok(match self.embedded_key(account, pool, node)? {
            Some(key) => self.inner.nodes.last_login_seq(&key),
            None => 0,
        })
    }

    /// The node's provider key, `None` for a node of a joined host.
    fn embedded_key(&self, account: &str, pool: &str, node: &str) -> Result<Option<String>> {
        let st = self.lock();
        let entry = st.pool(account, pool).ok_or_else(pool_not_found)?;
        let n = entry.nodes.get(node).ok_or_else(node_not_found)?;
        Ok(n.node
            .host
            .is_none()
            .then(|| node_key(account, &entry.pool.id, node)))
    }
}
