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
        let key = {
            let st = self.lock();
            let entry = st.pool(account, pool).ok_or_else(pool_not_found)?;
            let n = entry.nodes.get(node).ok_or_else(node_not_found)?;
            if n.node.host.is_some() {
                return Ok(Vec::new());
            }
            node_key(account, &entry.pool.id, node)
        };
        Ok(self.inner.nodes.login_activity(&key))
    }
}
