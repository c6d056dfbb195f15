//! `--seed FILE`: pools (with their nodes) and node users declared at start-up, so a CI job can
//! start a ready world in one command. Seeding is idempotent: pools and users that already exist
//! (from an earlier run with the same data directory) are left as they are.
//!
//! ```json
//! {"pools": [{"account": "bluebatchdev",
//!             "pool": {"id": "ci", "vmSize": "STANDARD_D2S_V3", "targetDedicatedNodes": 2,
//!                      "virtualMachineConfiguration": {"imageReference": {"publisher": "Canonical",
//!                        "offer": "0001-com-ubuntu-server-jammy", "sku": "22_04-lts"},
//!                        "nodeAgentSKUId": "batch.node.ubuntu 22.04"}},
//!             "users": [{"name": "ci", "password": "…", "sshPublicKey": "ssh-ed25519 …", "isAdmin": true}]}]}
//! ```
//! `account` defaults to the development account; `users` are added on every node of the pool.

use bluebatch_core::crypt::hash_password;
use bluebatch_core::error::Code;
use bluebatch_core::model::NodeState;
use bluebatch_core::pools::parse_add_pool;
use bluebatch_core::users::parse_add_user;
use bluebatch_service::{Service, UserAddr};
use bluebatch_wire::DEV_ACCOUNT;
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SeedFile {
    #[serde(default)]
    pools: Vec<SeedPool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SeedPool {
    #[serde(default = "dev_account")]
    account: String,
    pool: Value,
    #[serde(default)]
    users: Vec<Value>,
}

fn dev_account() -> String {
    DEV_ACCOUNT.to_string()
}

pub async fn apply(
    service: &Service,
    path: &Path,
    known: &dyn Fn(&str) -> bool,
) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let seed: SeedFile =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let max = service.config().max_nodes_per_pool;
    for p in seed.pools {
        let where_ =
            |e: &dyn std::fmt::Display| format!("{}: pool {}: {e}", path.display(), p.pool["id"]);
        if !known(&p.account) {
            return Err(where_(&format!("unknown account {}", p.account)));
        }
        let new = parse_add_pool(p.pool.to_string().as_bytes(), max).map_err(|e| where_(&e))?;
        let id = new.id.clone();
        match service.add_pool(&p.account, new).await {
            Ok(()) => {}
            Err(e) if e.code == Code::PoolExists => {}
            Err(e) => return Err(where_(&e)),
        }
        let users = p
            .users
            .iter()
            .map(|u| parse_add_user(u.to_string().as_bytes()).map_err(|e| where_(&e)))
            .collect::<Result<Vec<_>, _>>()?;
        if users.is_empty() {
            continue;
        }
        let nodes = wait_idle(service, &p.account, &id)
            .await
            .map_err(|e| where_(&e))?;
        for node in nodes {
            for u in &users {
                let hash = u.password.as_deref().map(hash_password);
                let at = UserAddr {
                    account: &p.account,
                    pool: &id,
                    node: &node,
                };
                match service.add_user(at, u.clone(), hash).await {
                    Ok(_) => {}
                    Err(e) if e.code == Code::NodeUserExists => {}
                    Err(e) => return Err(where_(&e)),
                }
            }
        }
    }
    Ok(())
}

/// Waits until every node of the pool is idle (or running); returns their ids.
async fn wait_idle(service: &Service, account: &str, pool: &str) -> Result<Vec<String>, String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (nodes, _) = service
            .list_nodes(account, pool, &|_| true, None, usize::MAX)
            .map_err(|e| e.to_string())?;
        if nodes
            .iter()
            .all(|n| matches!(n.node.state, NodeState::Idle | NodeState::Running))
        {
            return Ok(nodes.into_iter().map(|n| n.node.id).collect());
        }
        if Instant::now() > deadline {
            return Err("nodes did not become idle within 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
