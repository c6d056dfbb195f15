//! `--seed FILE`: pools (with their nodes) and node users declared at start-up, so a CI job can
//! start a ready world in one command.
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
//!
//! The whole file is checked before anything is created: an error names the file, the pool, the
//! user and the property. The seed is applied at every start, against what the data directory
//! holds:
//! - a pool the store lacks is created; a pool it has is **kept as stored** (the API may have
//!   resized it since), with a warning listing the seeded properties that differ;
//! - a user is added on every node that lacks it; where it exists with the seed's password, key,
//!   isAdmin and (when the seed gives one) expiryTime it is kept, otherwise it is **updated** to
//!   the seed (password, key and expiry replaced as by Update User; a changed isAdmin deletes and
//!   adds it again), so the seed's credentials always log in;
//! - nothing is deleted: pools and users that left the seed stay until deleted through the API.
//!
//! One info line per pool and per user says what happened (created, kept, updated).

use bluebatch_core::crypt::{hash_password, verify_password};
use bluebatch_core::error::{BatchError, Code};
use bluebatch_core::model::{NodeState, NodeUser, Os};
use bluebatch_core::pools::{NewPool, parse_add_pool};
use bluebatch_core::users::{UserBody, check_os_rules, parse_add_user};
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

/// `property "password": InvalidPropertyValue: … (reason)` from a Batch error.
fn describe(e: &BatchError) -> String {
    let value = |k: &str| {
        e.values
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    let mut s = String::new();
    if let Some(p) = value("PropertyName") {
        s.push_str(&format!("property \"{p}\": "));
    }
    s.push_str(e.code.as_str());
    s.push_str(": ");
    s.push_str(e.text());
    if let Some(r) = value("Reason") {
        s.push_str(&format!(" ({r})"));
    }
    s
}

/// A seed pool, checked.
struct Planned {
    account: String,
    new: NewPool,
    users: Vec<UserBody>,
}

/// What seeding did to one user across the pool's nodes.
#[derive(Default)]
struct Tally {
    created: usize,
    kept: usize,
    updated: usize,
}

/// Checks the whole file; errors name the pool (id, or its index when the id is unusable), the
/// user and the property.
fn plan(text: &str, max_nodes: u32, known: &dyn Fn(&str) -> bool) -> Result<Vec<Planned>, String> {
    let seed: SeedFile = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for (i, p) in seed.pools.into_iter().enumerate() {
        let pool_name = match p.pool.get("id").and_then(Value::as_str) {
            Some(id) => format!("pool \"{id}\""),
            None => format!("pools[{i}]"),
        };
        if !known(&p.account) {
            return Err(format!(
                "{pool_name}: unknown account \"{}\" (give it with --accounts-file or BLUEBATCH_ACCOUNTS)",
                p.account
            ));
        }
        let new = parse_add_pool(p.pool.to_string().as_bytes(), max_nodes)
            .map_err(|e| format!("{pool_name}: {}", describe(&e)))?;
        let mut users = Vec::new();
        for (j, u) in p.users.iter().enumerate() {
            let user_name = match u.get("name").and_then(Value::as_str) {
                Some(n) => format!("user \"{n}\""),
                None => format!("users[{j}]"),
            };
            let body = parse_add_user(u.to_string().as_bytes())
                .and_then(|b| check_os_rules(new.os, &b).map(|()| b))
                .map_err(|e| format!("{pool_name}, {user_name}: {}", describe(&e)))?;
            users.push(body);
        }
        out.push(Planned {
            account: p.account,
            new,
            users,
        });
    }
    Ok(out)
}

pub async fn apply(
    service: &Service,
    path: &Path,
    known: &dyn Fn(&str) -> bool,
) -> Result<(), String> {
    let shown = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| format!("seed {shown}: {e}"))?;
    let max = service.config().max_nodes_per_pool;
    let planned = plan(&text, max, known).map_err(|e| format!("seed {shown}: {e}"))?;
    for p in planned {
        let account = p.account.as_str();
        let id = p.new.id.clone();
        let at_pool = |e: &dyn std::fmt::Display| format!("seed {shown}: pool \"{id}\": {e}");
        let seeded_spec = p.new.spec.clone();
        let os = p.new.os;
        match service.add_pool(account, p.new).await {
            Ok(()) => tracing::info!(account, pool = %id, "seed: pool created"),
            Err(e) if e.code == Code::PoolExists => {
                let stored = service
                    .get_pool(account, &id)
                    .map_err(|e| at_pool(&describe(&e)))?;
                let differ: Vec<&str> = seeded_spec
                    .iter()
                    .filter(|(k, v)| stored.pool.spec.get(*k) != Some(*v))
                    .map(|(k, _)| k.as_str())
                    .collect();
                if differ.is_empty() {
                    tracing::info!(account, pool = %id, "seed: pool kept (already stored)");
                } else {
                    tracing::warn!(
                        account,
                        pool = %id,
                        differ = %differ.join(","),
                        "seed: pool kept as stored although the seed differs; delete the pool \
                         (or `bluebatch reset`) to create it from the seed"
                    );
                }
            }
            Err(e) => return Err(at_pool(&describe(&e))),
        }
        if p.users.is_empty() {
            continue;
        }
        let nodes = wait_idle(service, account, &id)
            .await
            .map_err(|e| at_pool(&e))?;
        for u in &p.users {
            let name = u.name.clone().unwrap_or_default();
            let mut tally = Tally::default();
            for node in &nodes {
                seed_user(service, (account, &id, node), os, u, &mut tally)
                    .await
                    .map_err(|e| {
                        format!(
                            "seed {shown}: pool \"{id}\", user \"{name}\", node {node}: {}",
                            describe(&e)
                        )
                    })?;
            }
            tracing::info!(
                account,
                pool = %id,
                user = %name,
                created = tally.created,
                kept = tally.kept,
                updated = tally.updated,
                "seed: user on {} node(s)",
                nodes.len()
            );
        }
    }
    Ok(())
}

/// Whether the stored user is what the seed declares (no secret leaves this function).
fn same_as_seed(stored: &NodeUser, seed: &UserBody) -> bool {
    let password = match (&seed.password, &stored.password_hash) {
        (None, None) => true,
        (Some(p), Some(h)) => verify_password(p, h),
        _ => false,
    };
    let key = seed.ssh_public_key.as_deref().map(str::trim)
        == stored.ssh_public_key.as_deref().map(str::trim);
    let expiry = seed.expiry_time.is_none_or(|t| t == stored.expiry_time);
    password && key && expiry && seed.is_admin == stored.is_admin
}

async fn seed_user(
    service: &Service,
    (account, pool, node): (&str, &str, &str),
    os: Os,
    u: &UserBody,
    tally: &mut Tally,
) -> Result<(), BatchError> {
    let name = u.name.clone().unwrap_or_default();
    let at = || UserAddr {
        account,
        pool,
        node,
        timeout: None,
    };
    let stored = service
        .node_users(account, pool, node)?
        .stored
        .into_iter()
        .find(|s| match os {
            Os::Linux => s.name == name,
            Os::Windows => s.name.eq_ignore_ascii_case(&name),
        });
    let hash = || u.password.as_deref().map(hash_password);
    match stored {
        None => {
            service.add_user(at(), u.clone(), hash()).await?;
            tally.created += 1;
        }
        Some(s) if same_as_seed(&s, u) => tally.kept += 1,
        Some(s) if s.is_admin == u.is_admin => {
            let body = UserBody {
                name: None,
                ..u.clone()
            };
            service.update_user(at(), &s.name, body, hash()).await?;
            tally.updated += 1;
        }
        Some(s) => {
            // isAdmin cannot change through Update User: delete and add again.
            service.delete_user(at(), &s.name).await?;
            service.add_user(at(), u.clone(), hash()).await?;
            tally.updated += 1;
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
            .map_err(|e| describe(&e))?;
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

#[cfg(test)]
mod tests {
    use super::plan;

    const POOL: &str = r#""vmSize": "STANDARD_D2S_V3", "targetDedicatedNodes": 1,
        "virtualMachineConfiguration": {"imageReference": {"publisher": "Canonical",
        "offer": "0001-com-ubuntu-server-jammy", "sku": "22_04-lts"},
        "nodeAgentSKUId": "batch.node.ubuntu 22.04"}"#;

    fn err(text: &str) -> String {
        match plan(text, 100, &|a| a == "bluebatchdev") {
            Ok(_) => panic!("accepted: {text}"),
            Err(e) => e,
        }
    }

    #[test]
    fn errors_name_pool_user_and_property() {
        let e = err(&format!(
            r#"{{"pools": [{{"pool": {{"id": "ci", {POOL}}}, "users": [{{"name": "bob", "password": 5}}]}}]}}"#
        ));
        assert!(e.contains("pool \"ci\""), "{e}");
        assert!(e.contains("user \"bob\""), "{e}");
        assert!(e.contains("property \"password\""), "{e}");
        let e = err(r#"{"pools": [{"pool": {"id": "ci", "targetDedicatedNodes": 1}}]}"#);
        assert!(e.contains("pool \"ci\""), "{e}");
        assert!(e.contains("property \"vmSize\""), "{e}");
        let e = err(&format!(
            r#"{{"pools": [{{"account": "other", "pool": {{"id": "ci", {POOL}}}}}]}}"#
        ));
        assert!(e.contains("unknown account \"other\""), "{e}");
        let e = err(&format!(
            r#"{{"pools": [{{"pool": {{"id": "ci", {POOL}}}, "users": [{{"password": "x"}}]}}]}}"#
        ));
        assert!(e.contains("users[0]"), "{e}");
        assert!(e.contains("property \"name\""), "{e}");
    }
}
