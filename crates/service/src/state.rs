//! The in-memory state the service owns, and the store keys of its records.

use bluebatch_core::error::{BatchError, Code};
use bluebatch_core::model::{Node, NodeUser, Os, Pool};
use std::collections::{BTreeMap, HashMap};

#[derive(Default)]
pub struct State {
    pub accounts: HashMap<String, AccountState>,
    /// The service clock's stored offset, in nanoseconds (absent: never moved).
    pub clock_offset_nanos: Option<i64>,
    /// Join tokens, joined hosts and the credential secret.
    pub hub: crate::agents::HubState,
    /// Batch accounts and their keys, on a shared store (`account/NAME` records: every replica
    /// authenticates with the same ones).
    pub account_keys: BTreeMap<String, AccountRecord>,
}

/// The stored form of a Batch account (shared store only): its base64 keys.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AccountRecord {
    pub keys: Vec<String>,
}

/// The store key of the service clock's offset (one per server, not per account).
pub const CLOCK_RECORD: &str = "meta/clock";

/// The stored form of the service clock's offset.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClockRecord {
    pub offset_nanos: i64,
}

#[derive(Default)]
pub struct AccountState {
    /// Keyed by the lower-cased pool id (ids are unique case-insensitively).
    pub pools: BTreeMap<String, PoolEntry>,
}

pub struct PoolEntry {
    pub pool: Pool,
    pub nodes: PoolNodes,
}

/// A pool's nodes by id, with the count of dedicated ones kept as nodes come and go: Get Pool and
/// List Pools answer `currentDedicatedNodes` without walking every node (a 10 000-node pool took
/// about 200 µs a Get Pool). Reads go through `Deref`; the writes are the methods below, and a
/// node's `is_dedicated` never changes once it is in a pool.
#[derive(Default)]
pub struct PoolNodes {
    map: BTreeMap<String, NodeEntry>,
    dedicated: usize,
}

impl std::ops::Deref for PoolNodes {
    type Target = BTreeMap<String, NodeEntry>;
    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

impl PoolNodes {
    pub fn insert(&mut self, id: String, entry: NodeEntry) -> Option<NodeEntry> {
        self.dedicated += usize::from(entry.node.is_dedicated);
        let old = self.map.insert(id, entry);
        self.forget(old)
    }

    pub fn remove(&mut self, id: &str) -> Option<NodeEntry> {
        let old = self.map.remove(id);
        self.forget(old)
    }

    fn forget(&mut self, gone: Option<NodeEntry>) -> Option<NodeEntry> {
        if gone.as_ref().is_some_and(|e| e.node.is_dedicated) {
            self.dedicated -= 1;
        }
        gone
    }

    pub fn get_mut(&mut self, id: &str) -> Option<&mut NodeEntry> {
        self.map.get_mut(id)
    }

    pub fn values_mut(&mut self) -> std::collections::btree_map::ValuesMut<'_, String, NodeEntry> {
        self.map.values_mut()
    }

    /// How many of the nodes are dedicated (the rest are low-priority).
    pub fn dedicated(&self) -> usize {
        debug_assert_eq!(
            self.dedicated,
            self.map.values().filter(|n| n.node.is_dedicated).count(),
            "a node's is_dedicated changed while in its pool"
        );
        self.dedicated
    }
}

pub struct NodeEntry {
    pub node: Node,
    /// Keyed by [`user_key`].
    pub users: BTreeMap<String, NodeUser>,
}

impl PoolEntry {
    /// (dedicated, low priority) nodes currently in the pool.
    pub fn current_nodes(&self) -> (u32, u32) {
        let dedicated = self.nodes.dedicated() as u32;
        (dedicated, self.nodes.len() as u32 - dedicated)
    }
}

/// User names compare case-sensitively on Linux and case-insensitively on Windows.
/// A user write stores the user's record alone, not its node's: the account carries the
/// revision it was written in, and a node's `users_revision` is the highest of its stored one and
/// its accounts' (a revision that no account carries, a deletion or a reboot, is stored in the
/// node's record). So reading the records back always gives the revision the writer had.
pub fn raise_users_revision(node: &mut Node, revision: u64) {
    if revision > node.users_revision {
        node.users_revision = revision;
    }
}

pub fn user_key(os: Os, name: &str) -> String {
    match os {
        Os::Linux => name.to_string(),
        Os::Windows => name.to_lowercase(),
    }
}

pub fn pool_key(id: &str) -> String {
    id.to_ascii_lowercase()
}

/// [`pool_key`] without an allocation when `id` is lowercase already (a lookup's usual case).
fn pool_key_ref(id: &str) -> std::borrow::Cow<'_, str> {
    if id.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(id.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(id)
    }
}

// Store keys. '/' never occurs in account names, pool ids, node ids or user names.
pub fn pool_record(account: &str, pool: &str) -> String {
    format!("pool/{account}/{}", pool_key(pool))
}
pub fn node_record(account: &str, pool: &str, node: &str) -> String {
    joined("node/", &[account, "/", &pool_key_ref(pool), "/", node])
}
pub fn user_record(account: &str, pool: &str, node: &str, ukey: &str) -> String {
    joined(
        "user/",
        &[account, "/", &pool_key_ref(pool), "/", node, "/", ukey],
    )
}

/// `first` and `parts` in one allocation of the right size (the keys of every write).
fn joined(first: &str, parts: &[&str]) -> String {
    let mut s = String::with_capacity(first.len() + parts.iter().map(|p| p.len()).sum::<usize>());
    s.push_str(first);
    parts.iter().for_each(|p| s.push_str(p));
    s
}
pub fn pool_nodes_prefix(account: &str, pool: &str) -> String {
    format!("node/{account}/{}/", pool_key(pool))
}
pub fn pool_users_prefix(account: &str, pool: &str) -> String {
    format!("user/{account}/{}/", pool_key(pool))
}
pub fn node_users_prefix(account: &str, pool: &str, node: &str) -> String {
    format!("user/{account}/{}/{node}/", pool_key(pool))
}

/// The fabric's name for a node: filesystem-safe and unique across accounts.
pub fn node_key(account: &str, pool: &str, node: &str) -> String {
    joined(account, &[".", &pool_key_ref(pool), ".", node])
}

impl State {
    /// Rebuilds the state from every stored record (key order puts nodes before pools and
    /// users, so collect first and assemble after).
    pub fn load(records: Vec<(String, Vec<u8>)>) -> Result<Self, String> {
        let mut pools = Vec::new();
        let mut nodes = Vec::new();
        let mut users = Vec::new();
        let mut clock_offset_nanos = None;
        let mut hub = crate::agents::HubState::default();
        let mut account_keys = BTreeMap::new();
        for (k, v) in records {
            let parts: Vec<&str> = k.split('/').collect();
            let bad = |e: serde_json::Error| format!("corrupt record {k}: {e}");
            match parts.as_slice() {
                ["pool", account, _] => pools.push((
                    account.to_string(),
                    serde_json::from_slice::<Pool>(&v).map_err(bad)?,
                )),
                ["node", account, pool, _] => nodes.push((
                    account.to_string(),
                    pool.to_string(),
                    serde_json::from_slice::<Node>(&v).map_err(bad)?,
                )),
                ["user", account, pool, node, _] => users.push((
                    account.to_string(),
                    pool.to_string(),
                    node.to_string(),
                    serde_json::from_slice::<NodeUser>(&v).map_err(bad)?,
                )),
                ["meta", "clock"] => {
                    let r: ClockRecord = serde_json::from_slice(&v).map_err(bad)?;
                    clock_offset_nanos = Some(r.offset_nanos);
                }
                ["meta", "agent-secret"] => {
                    let r: crate::agents::SecretRecord = serde_json::from_slice(&v).map_err(bad)?;
                    hub.secret = (0..r.key.len() / 2)
                        .filter_map(|i| u8::from_str_radix(r.key.get(2 * i..2 * i + 2)?, 16).ok())
                        .collect();
                }
                ["agent", "token", _] => {
                    let r: crate::agents::TokenRecord = serde_json::from_slice(&v).map_err(bad)?;
                    hub.tokens.insert(r.id.clone(), r);
                }
                ["account", name] => {
                    let r: AccountRecord = serde_json::from_slice(&v).map_err(bad)?;
                    account_keys.insert(name.to_string(), r);
                }
                ["agent", "host", _] => {
                    let r: crate::agents::HostRecord = serde_json::from_slice(&v).map_err(bad)?;
                    hub.hosts
                        .insert(r.id.clone(), crate::agents::HostEntry::new(r));
                }
                _ => {} // other record kinds (future versions) are kept, not interpreted
            }
        }
        let mut state = State {
            clock_offset_nanos,
            hub,
            account_keys,
            ..State::default()
        };
        for (account, pool) in pools {
            state.accounts.entry(account).or_default().pools.insert(
                pool_key(&pool.id),
                PoolEntry {
                    pool,
                    nodes: PoolNodes::default(),
                },
            );
        }
        for (account, pool, node) in nodes {
            // A node backed by a joined host holds that host's slot.
            if let (Some(host), Some(slot)) = (&node.host, node.slot)
                && let Some(h) = state.hub.hosts.get_mut(host)
            {
                // Its nodes were left `unknown` for want of polls: its next call brings them back.
                if node.state_before_unknown.is_some() {
                    h.away = true;
                }
                h.slots.insert(
                    slot,
                    crate::agents::NodeRef {
                        account: account.clone(),
                        pool: pool.clone(),
                        node: node.id.clone(),
                    },
                );
            }
            if let Some(p) = state.pool_mut(&account, &pool) {
                p.nodes.insert(
                    node.id.clone(),
                    NodeEntry {
                        node,
                        users: BTreeMap::new(),
                    },
                );
            }
        }
        for (account, pool, node, user) in users {
            if let Some(p) = state.pool_mut(&account, &pool) {
                let os = p.pool.os;
                if let Some(n) = p.nodes.get_mut(&node) {
                    raise_users_revision(&mut n.node, user.revision);
                    n.users.insert(user_key(os, &user.name), user);
                }
            }
        }
        Ok(state)
    }

    pub fn pool(&self, account: &str, pool: &str) -> Option<&PoolEntry> {
        self.accounts.get(account)?.pools.get(&*pool_key_ref(pool))
    }

    pub fn pool_mut(&mut self, account: &str, pool: &str) -> Option<&mut PoolEntry> {
        self.accounts
            .get_mut(account)?
            .pools
            .get_mut(&*pool_key_ref(pool))
    }

    /// The node an operation addresses, with its pool's OS and id (as stored); the 404s in the
    /// contract's order (pool, then node).
    pub fn node_mut(
        &mut self,
        account: &str,
        pool: &str,
        node: &str,
    ) -> Result<(Os, String, &mut NodeEntry), BatchError> {
        let pool = self
            .pool_mut(account, pool)
            .ok_or_else(|| BatchError::new(Code::PoolNotFound))?;
        let (os, pool_id) = (pool.pool.os, pool.pool.id.clone());
        let entry = pool
            .nodes
            .get_mut(node)
            .ok_or_else(|| BatchError::new(Code::NodeNotFound))?;
        Ok((os, pool_id, entry))
    }
}

/// What applying a committed change to the cache touched (a replica catching up).
#[derive(Default)]
pub struct Touched {
    /// (account, pool key) of every pool whose pool or node records changed.
    pub pools: std::collections::BTreeSet<(String, String)>,
    /// Fabric keys of agent nodes whose record changed, with their host.
    pub agent_nodes: Vec<(String, String)>,
    /// Hosts whose record changed (or went).
    pub hosts: std::collections::BTreeSet<String>,
    /// The service clock's offset changed.
    pub clock: bool,
    /// The Batch accounts changed.
    pub accounts: bool,
    /// Failed acknowledgements: (fabric key, revision, the node's reasons).
    pub failures: Vec<(String, u64, Vec<bluebatch_protocol::UserFailure>)>,
}

impl State {
    /// Applies one committed change (made by another replica) to the cache, as
    /// [`State::load`] would have read it. Records of unknown kinds are ignored.
    pub fn apply(&mut self, op: &bluebatch_store::Op, touched: &mut Touched) -> Result<(), String> {
        use bluebatch_store::Op;
        match op {
            Op::Put { key, value } => self.put(key, value, touched),
            Op::Delete { key } => {
                self.remove(key, touched);
                Ok(())
            }
            Op::DeletePrefix { prefix } => {
                let parts: Vec<&str> = prefix.trim_end_matches('/').split('/').collect();
                match parts.as_slice() {
                    // An account's reset: every pool (its nodes, their users and host slots).
                    ["pool", account] => {
                        let pools: Vec<String> = self
                            .accounts
                            .get(*account)
                            .map(|a| a.pools.keys().cloned().collect())
                            .unwrap_or_default();
                        for pkey in pools {
                            self.remove(&format!("pool/{account}/{pkey}"), touched);
                        }
                    }
                    ["node", account] => {
                        let nodes: Vec<(String, String)> = self
                            .accounts
                            .get(*account)
                            .map(|a| {
                                a.pools
                                    .iter()
                                    .flat_map(|(k, p)| {
                                        p.nodes.keys().map(move |n| (k.clone(), n.clone()))
                                    })
                                    .collect()
                            })
                            .unwrap_or_default();
                        for (pkey, id) in nodes {
                            self.remove(&format!("node/{account}/{pkey}/{id}"), touched);
                        }
                    }
                    ["user", account] => {
                        if let Some(a) = self.accounts.get_mut(*account) {
                            for p in a.pools.values_mut() {
                                p.nodes.values_mut().for_each(|n| n.users.clear());
                            }
                        }
                    }
                    ["node", account, pool] => {
                        let ids: Vec<String> = self
                            .pool(account, pool)
                            .map(|p| p.nodes.keys().cloned().collect())
                            .unwrap_or_default();
                        for id in ids {
                            self.remove(&format!("node/{account}/{pool}/{id}"), touched);
                        }
                    }
                    ["user", account, pool] => {
                        if let Some(p) = self.pool_mut(account, pool) {
                            p.nodes.values_mut().for_each(|n| n.users.clear());
                        }
                    }
                    ["user", account, pool, node] => {
                        if let Some(n) = self
                            .pool_mut(account, pool)
                            .and_then(|p| p.nodes.get_mut(node))
                        {
                            n.users.clear();
                        }
                    }
                    _ => {}
                }
                Ok(())
            }
        }
    }

    fn put(&mut self, k: &str, v: &[u8], touched: &mut Touched) -> Result<(), String> {
        let parts: Vec<&str> = k.split('/').collect();
        let bad = |e: serde_json::Error| format!("corrupt record {k}: {e}");
        match parts.as_slice() {
            ["pool", account, pkey] => {
                let pool: Pool = serde_json::from_slice(v).map_err(bad)?;
                let acct = self.accounts.entry(account.to_string()).or_default();
                match acct.pools.get_mut(*pkey) {
                    Some(e) => e.pool = pool,
                    None => {
                        acct.pools.insert(
                            pkey.to_string(),
                            PoolEntry {
                                pool,
                                nodes: PoolNodes::default(),
                            },
                        );
                    }
                }
                touched
                    .pools
                    .insert((account.to_string(), pkey.to_string()));
            }
            ["node", account, pkey, id] => {
                let node: Node = serde_json::from_slice(v).map_err(bad)?;
                let old = self
                    .pool(account, pkey)
                    .and_then(|p| p.nodes.get(*id))
                    .map(|n| (n.node.host.clone(), n.node.slot));
                let was_away_mark = self
                    .pool(account, pkey)
                    .and_then(|p| p.nodes.get(*id))
                    .is_some_and(|n| n.node.state_before_unknown.is_some());
                if let Some((Some(host), Some(slot))) = &old
                    && (node.host.as_ref() != Some(host) || node.slot != Some(*slot))
                    && let Some(h) = self.hub.hosts.get_mut(host)
                    && h.slots.get(slot).is_some_and(|r| r.node == *id)
                {
                    h.slots.remove(slot);
                }
                if let (Some(host), Some(slot)) = (&node.host, node.slot)
                    && let Some(h) = self.hub.hosts.get_mut(host)
                {
                    // Another replica's sweep marked the host away (its nodes keep the state
                    // they had before, as State::load reads it), or the host came back (its
                    // nodes lose that mark). A node put in `unknown` by hand (the emulator
                    // control) says nothing of its host.
                    if node.state_before_unknown.is_some() {
                        h.away = true;
                    } else if was_away_mark {
                        h.away = false;
                    }
                    h.slots.insert(
                        slot,
                        crate::agents::NodeRef {
                            account: account.to_string(),
                            pool: pkey.to_string(),
                            node: id.to_string(),
                        },
                    );
                }
                let Some(p) = self.pool_mut(account, pkey) else {
                    return Ok(());
                };
                if let Some(host) = &node.host {
                    touched
                        .agent_nodes
                        .push((node_key(account, &p.pool.id, id), host.clone()));
                }
                match p.nodes.get_mut(id) {
                    Some(e) => {
                        // Never behind the accounts it holds (see `raise_users_revision`).
                        let mut node = node;
                        for u in e.users.values() {
                            raise_users_revision(&mut node, u.revision);
                        }
                        e.node = node;
                    }
                    None => {
                        p.nodes.insert(
                            id.to_string(),
                            NodeEntry {
                                node,
                                users: BTreeMap::new(),
                            },
                        );
                    }
                }
                touched
                    .pools
                    .insert((account.to_string(), pkey.to_string()));
            }
            ["user", account, pkey, id, _] => {
                let user: NodeUser = serde_json::from_slice(v).map_err(bad)?;
                if let Some(p) = self.pool_mut(account, pkey) {
                    let os = p.pool.os;
                    let pool_id = p.pool.id.clone();
                    if let Some(n) = p.nodes.get_mut(id) {
                        raise_users_revision(&mut n.node, user.revision);
                        n.users.insert(user_key(os, &user.name), user);
                        // The node's revision moved with it: its agent has something to apply.
                        if let Some(host) = &n.node.host {
                            touched
                                .agent_nodes
                                .push((node_key(account, &pool_id, id), host.clone()));
                            touched
                                .pools
                                .insert((account.to_string(), pkey.to_string()));
                        }
                    }
                }
            }
            ["meta", "clock"] => {
                let r: ClockRecord = serde_json::from_slice(v).map_err(bad)?;
                self.clock_offset_nanos = Some(r.offset_nanos);
                touched.clock = true;
            }
            ["meta", "agent-secret"] => {
                let r: crate::agents::SecretRecord = serde_json::from_slice(v).map_err(bad)?;
                self.hub.secret = crate::agents::unhex(&r.key).unwrap_or_default();
            }
            ["agent", "token", _] => {
                let r: crate::agents::TokenRecord = serde_json::from_slice(v).map_err(bad)?;
                self.hub.tokens.insert(r.id.clone(), r);
            }
            ["account", name] => {
                let r: AccountRecord = serde_json::from_slice(v).map_err(bad)?;
                self.account_keys.insert(name.to_string(), r);
                touched.accounts = true;
            }
            ["agent", "failed", key] => {
                let r: crate::agents::FailedRecord = serde_json::from_slice(v).map_err(bad)?;
                touched
                    .failures
                    .push((key.to_string(), r.revision, r.failures));
            }
            ["agent", "host", _] => {
                let r: crate::agents::HostRecord = serde_json::from_slice(v).map_err(bad)?;
                touched.hosts.insert(r.id.clone());
                match self.hub.hosts.get_mut(&r.id) {
                    Some(h) => {
                        h.reserved = r.reserved_names.iter().cloned().collect();
                        h.rec = r;
                    }
                    None => {
                        self.hub
                            .hosts
                            .insert(r.id.clone(), crate::agents::HostEntry::new(r));
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn remove(&mut self, k: &str, touched: &mut Touched) {
        let parts: Vec<&str> = k.split('/').collect();
        match parts.as_slice() {
            ["pool", account, pkey] => {
                if let Some(acct) = self.accounts.get_mut(*account)
                    && let Some(p) = acct.pools.remove(*pkey)
                {
                    for n in p.nodes.values() {
                        self.release_slot(&n.node, account, pkey, touched);
                    }
                }
                touched
                    .pools
                    .insert((account.to_string(), pkey.to_string()));
            }
            ["node", account, pkey, id] => {
                let Some(p) = self.pool_mut(account, pkey) else {
                    return;
                };
                if let Some(n) = p.nodes.remove(id) {
                    self.release_slot(&n.node, account, pkey, touched);
                }
                touched
                    .pools
                    .insert((account.to_string(), pkey.to_string()));
            }
            ["user", account, pkey, id, ukey] => {
                if let Some(n) = self
                    .pool_mut(account, pkey)
                    .and_then(|p| p.nodes.get_mut(id))
                {
                    n.users.remove(*ukey);
                }
            }
            ["meta", "clock"] => {
                self.clock_offset_nanos = None;
                touched.clock = true;
            }
            ["agent", "token", id] => {
                self.hub.tokens.remove(*id);
            }
            ["account", name] => {
                self.account_keys.remove(*name);
                touched.accounts = true;
            }
            ["agent", "host", id] => {
                self.hub.hosts.remove(*id);
                touched.hosts.insert(id.to_string());
            }
            _ => {}
        }
    }

    /// A removed node's host slot is free again.
    fn release_slot(&mut self, node: &Node, account: &str, pkey: &str, touched: &mut Touched) {
        if let (Some(host), Some(slot)) = (&node.host, node.slot) {
            if let Some(h) = self.hub.hosts.get_mut(host)
                && h.slots.get(&slot).is_some_and(|r| r.node == node.id)
            {
                h.slots.remove(&slot);
            }
            touched
                .agent_nodes
                .push((node_key(account, pkey, &node.id), host.clone()));
            touched.hosts.insert(host.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_keys_and_node_keys_name_the_pool_in_lowercase() {
        assert_eq!(
            node_record("acct", "Pool-1", "tvm-1"),
            "node/acct/pool-1/tvm-1"
        );
        assert_eq!(node_record("acct", "p", "n"), "node/acct/p/n");
        assert_eq!(
            user_record("acct", "Pool-1", "tvm-1", "alice"),
            "user/acct/pool-1/tvm-1/alice"
        );
        assert_eq!(node_key("acct", "Pool-1", "tvm-1"), "acct.pool-1.tvm-1");
        assert_eq!(node_key("acct", "p", "n"), "acct.p.n");
        assert_eq!(
            node_users_prefix("acct", "Pool-1", "tvm-1"),
            "user/acct/pool-1/tvm-1/"
        );
    }

    #[test]
    fn a_pools_dedicated_count_follows_its_nodes() {
        let now = time::OffsetDateTime::UNIX_EPOCH;
        let entry = |dedicated| NodeEntry {
            node: crate::pools::new_node(dedicated, now),
            users: BTreeMap::new(),
        };
        let mut nodes = PoolNodes::default();
        nodes.insert("a".into(), entry(true));
        nodes.insert("b".into(), entry(true));
        nodes.insert("c".into(), entry(false));
        assert_eq!((nodes.dedicated(), nodes.len()), (2, 3));
        // Replacing a node under the same id counts the new one only.
        nodes.insert("a".into(), entry(false));
        assert_eq!((nodes.dedicated(), nodes.len()), (1, 3));
        assert!(nodes.remove("b").is_some());
        assert!(nodes.remove("b").is_none(), "removing twice counts once");
        assert_eq!((nodes.dedicated(), nodes.len()), (0, 2));
        nodes.remove("a");
        nodes.remove("c");
        assert_eq!((nodes.dedicated(), nodes.len()), (0, 0));
    }
}
