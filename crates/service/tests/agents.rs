//! Agent-backed nodes through the service API, with a fake agent that calls `join`, `desired`
//! and `ack` directly: waiting writes, failures, replays, capacity, tokens and credentials,
//! liveness, reserved names, restarts.

mod common;

use bluebatch_core::error::Code;
use bluebatch_core::model::{AllocationState, NodeState, Os};
use bluebatch_core::pools::{parse_add_pool, parse_resize};
use bluebatch_protocol::{
    AckRequest, DesiredState, HostReport, JoinRequest, NodeAck, ProviderKind, UserFailure,
};
use bluebatch_service::{Config, Service, UserAddr};
use common::*;
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

fn agents_config() -> Config {
    Config {
        ack_timeout: Duration::from_millis(800),
        ..config()
    }
}

fn report(provider: ProviderKind, slots: u32, reserved: &[&str]) -> HostReport {
    HostReport {
        hostname: "host-under-test".into(),
        provider,
        slots,
        address: "198.18.0.2".into(),
        ssh_port: (provider == ProviderKind::Linux).then_some(2222),
        reserved_names: reserved.iter().map(|s| s.to_string()).collect(),
        version: "test".into(),
    }
}

/// A failure the fake agent reports: (only this user, else every user; reason).
type Failing = (Option<String>, String);

/// A fake agent: its host id, credential and how it answers.
struct Agent {
    svc: Service,
    host: String,
    cred: String,
    /// Stop acknowledging (the agent is away or stuck).
    withhold: Arc<AtomicBool>,
    /// Acknowledge with this failure for every user instead.
    fail: Arc<Mutex<Option<Failing>>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

async fn create_token(svc: &Service, pool: Option<&str>) -> String {
    svc.create_join_token(ACCOUNT, pool, Duration::from_secs(600))
        .await
        .expect("create join token")
        .token
}

async fn join(svc: &Service, pool: Option<&str>, provider: ProviderKind, slots: u32) -> Agent {
    join_with(svc, pool, report(provider, slots, &[])).await
}

async fn join_with(svc: &Service, pool: Option<&str>, host: HostReport) -> Agent {
    let token = create_token(svc, pool).await;
    let joined = svc.join(JoinRequest { token, host }).await.expect("join");
    assert_eq!(joined.account, ACCOUNT);
    assert_eq!(
        svc.authenticate_node(&joined.credential).unwrap(),
        joined.host_id
    );
    Agent {
        svc: svc.clone(),
        host: joined.host_id,
        cred: joined.credential,
        withhold: Arc::new(AtomicBool::new(false)),
        fail: Arc::new(Mutex::new(None)),
        task: None,
    }
}

/// What a provider acknowledges for a snapshot: with `fail`, a failure for that user (or every
/// user) with that reason.
fn acks_for(d: &DesiredState, fail: Option<&Failing>) -> AckRequest {
    AckRequest {
        nodes: d
            .nodes
            .iter()
            .map(|n| NodeAck {
                key: n.key.clone(),
                revision: n.revision,
                image: n.image,
                ssh_port: Some(2200 + n.slot as u16),
                failures: match fail {
                    Some((only, reason)) => n
                        .accounts
                        .iter()
                        .filter(|a| only.as_ref().is_none_or(|o| *o == a.name))
                        .map(|a| UserFailure {
                            name: a.name.clone(),
                            reason: reason.to_string(),
                        })
                        .collect(),
                    None => Vec::new(),
                },
            })
            .collect(),
    }
}

impl Agent {
    /// Polls and acknowledges whatever it is given, like a real agent, until dropped.
    fn run(&mut self, wait: Duration) {
        let (svc, host) = (self.svc.clone(), self.host.clone());
        let (withhold, fail) = (self.withhold.clone(), self.fail.clone());
        self.task = Some(tokio::spawn(async move {
            let mut cursor: Option<String> = None;
            loop {
                let Ok(d) = svc.desired(&host, cursor.as_deref(), wait).await else {
                    return;
                };
                if withhold.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                let failure = fail.lock().unwrap().clone();
                let _ = svc.ack(&host, acks_for(&d, failure.as_ref())).await;
                // A failed apply is retried (with a short backoff here).
                if failure.is_some() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    cursor = None;
                } else {
                    cursor = Some(d.cursor);
                }
            }
        }));
    }

    async fn poll(&self, after: Option<&str>, wait: Duration) -> DesiredState {
        tokio::time::timeout(
            wait + Duration::from_secs(5),
            self.svc.desired(&self.host, after, wait),
        )
        .await
        .expect("the long poll answered in time")
        .expect("desired")
    }
}

async fn agents_pool(h: &Harness, id: &str, os: Os, dedicated: u32, extra: serde_json::Value) {
    let image = match os {
        Os::Linux => json!({
            "imageReference": {"publisher": "Canonical",
                "offer": "0001-com-ubuntu-server-jammy", "sku": "22_04-lts"},
            "nodeAgentSKUId": "batch.node.ubuntu 22.04"}),
        Os::Windows => json!({
            "imageReference": {"publisher": "MicrosoftWindowsServer",
                "offer": "WindowsServer", "sku": "2022-datacenter"},
            "nodeAgentSKUId": "batch.node.windows amd64"}),
    };
    let mut body = json!({
        "id": id, "vmSize": "standard_d2s_v3",
        "virtualMachineConfiguration": image,
        "targetDedicatedNodes": dedicated,
        "metadata": [{"name": "bluebatch.nodes", "value": "agents"}],
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let new = parse_add_pool(body.to_string().as_bytes(), 10_000).expect("a valid pool");
    h.svc.add_pool(ACCOUNT, new).await.expect("Add Pool");
}

fn with_timeout(pool: &str, node: &str, ms: u64) -> UserAddr<'static> {
    UserAddr {
        account: ACCOUNT,
        pool: Box::leak(pool.to_string().into_boxed_str()),
        node: Box::leak(node.to_string().into_boxed_str()),
        timeout: Some(Duration::from_millis(ms)),
    }
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < until, "{what}: not within 10 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn an_acknowledged_write_answers_and_the_snapshot_is_the_whole_account_set() {
    deadline(async {
        let h = Harness::in_memory(agents_config(), AckMode::AtOnce).await;
        let mut a = join(&h.svc, None, ProviderKind::Simulate, 2).await;
        a.run(Duration::from_secs(5));
        agents_pool(&h, "p1", Os::Linux, 2, json!({})).await;
        let nodes = h.wait_idle("p1", 2).await;
        let n = &nodes[0];
        let view = h.svc.get_node(ACCOUNT, "p1", n).unwrap();
        assert_eq!(view.node.host.as_deref(), Some(a.host.as_str()));
        assert_eq!(view.node.ip_address, "198.18.0.2");
        // The simulated node's own port, as its host acknowledged it.
        let (ip, port, _) = h.svc.remote_login_settings(ACCOUNT, "p1", n).unwrap();
        assert_eq!(ip, "198.18.0.2");
        assert_eq!(port, 2200 + view.node.slot.unwrap() as u16);

        // Each acknowledged write records its commit → acknowledgement time (process-wide:
        // other tests only add to it).
        let lags = bluebatch_metrics::global()
            .apply_lag(bluebatch_metrics::NodeKind::Agent)
            .count();
        h.add("p1", n, json!({"name": "ann", "password": "pw-1"}))
            .await
            .unwrap();
        h.add("p1", n, json!({"name": "bob", "sshPublicKey": KEY1}))
            .await
            .unwrap();
        h.delete("p1", n, "ann").await.unwrap();
        h.add(
            "p1",
            n,
            json!({"name": "cy", "password": "pw-2", "isAdmin": true}),
        )
        .await
        .unwrap();
        assert!(
            bluebatch_metrics::global()
                .apply_lag(bluebatch_metrics::NodeKind::Agent)
                .count()
                >= lags + 4
        );
        let d = a.poll(None, Duration::ZERO).await;
        let mine = d.nodes.iter().find(|x| x.node_id == *n).unwrap();
        assert_eq!(mine.revision, h.revision("p1", n));
        let names: Vec<&str> = mine.accounts.iter().map(|x| x.name.as_str()).collect();
        assert_eq!(
            names,
            ["bob", "cy"],
            "the whole set, sorted, without the deleted user"
        );
        let cy = &mine.accounts[1];
        assert!(cy.is_admin);
        assert!(cy.password_hash.as_deref().unwrap().starts_with("$6$"));
        let text = serde_json::to_string(&d).unwrap();
        assert!(!text.contains("pw-2"), "a password never reaches the agent");
        let users = h.svc.node_users(ACCOUNT, "p1", n).unwrap();
        assert_eq!(users.applied_revision, Some(mine.revision));
    })
    .await
}

#[tokio::test]
async fn a_withheld_ack_times_out_and_the_change_is_applied_when_the_agent_acknowledges() {
    deadline(async {
        let h = Harness::in_memory(agents_config(), AckMode::AtOnce).await;
        let mut a = join(&h.svc, None, ProviderKind::Linux, 1).await;
        a.run(Duration::from_secs(5));
        agents_pool(&h, "p1", Os::Linux, 1, json!({})).await;
        let n = h.wait_idle("p1", 1).await.remove(0);
        a.withhold.store(true, Ordering::SeqCst);
        let started = Instant::now();
        let body = bluebatch_core::users::parse_add_user(
            json!({"name": "late", "password": "pw"})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        let hash = hash_of(&body);
        let r = h
            .svc
            .add_user(with_timeout("p1", &n, 300), body, hash)
            .await;
        assert_eq!(code(r), Code::OperationTimedOut);
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert!(started.elapsed() < Duration::from_secs(3));
        // Kept: stored and in the desired state.
        assert!(h.stored("p1", &n).contains_key("late"));
        let rev = h.revision("p1", &n);
        let users = h.svc.node_users(ACCOUNT, "p1", &n).unwrap();
        assert!(users.applied_revision < Some(rev));
        a.withhold.store(false, Ordering::SeqCst);
        eventually("the agent acknowledged the kept change", || {
            h.svc
                .node_users(ACCOUNT, "p1", &n)
                .unwrap()
                .applied_revision
                == Some(rev)
        })
        .await;
        // The next write answers at once.
        h.add("p1", &n, json!({"name": "next", "password": "pw"}))
            .await
            .unwrap();
    })
    .await
}

#[tokio::test]
async fn a_failed_apply_answers_internal_error_and_keeps_the_revision_unapplied() {
    deadline(async {
        let h = Harness::in_memory(agents_config(), AckMode::AtOnce).await;
        let mut a = join(&h.svc, None, ProviderKind::Linux, 1).await;
        a.run(Duration::from_secs(5));
        agents_pool(&h, "p1", Os::Linux, 1, json!({})).await;
        let n = h.wait_idle("p1", 1).await.remove(0);
        *a.fail.lock().unwrap() = Some((None, "useradd exited with status 1".into()));
        let e = h
            .add("p1", &n, json!({"name": "ann", "password": "pw"}))
            .await
            .unwrap_err();
        assert_eq!(e.code, Code::InternalError);
        assert_eq!(e.status(), 500);
        assert!(
            e.text().contains("ann: useradd exited with status 1"),
            "{}",
            e.text()
        );
        let rev = h.revision("p1", &n);
        let users = h.svc.node_users(ACCOUNT, "p1", &n).unwrap();
        assert!(
            users.applied_revision < Some(rev),
            "a failure never moves the applied revision"
        );
        assert_eq!(
            users.failures,
            [(
                "ann".to_string(),
                "useradd exited with status 1".to_string()
            )]
        );
        assert!(h.stored("p1", &n).contains_key("ann"), "the write is kept");
        // While only ann fails, a write of another user that the node enforces answers 200;
        // one of ann answers 500 again.
        *a.fail.lock().unwrap() = Some((Some("ann".into()), "useradd exited with status 1".into()));
        h.add("p1", &n, json!({"name": "bob", "password": "pw"}))
            .await
            .unwrap();
        let e = h
            .update("p1", &n, "ann", json!({"password": "pw2"}))
            .await
            .unwrap_err();
        assert_eq!(e.code, Code::InternalError);
        let rev = h.revision("p1", &n);
        // The agent's retry succeeds: the node converges.
        *a.fail.lock().unwrap() = None;
        eventually("the retried revision was acknowledged", || {
            h.svc
                .node_users(ACCOUNT, "p1", &n)
                .unwrap()
                .applied_revision
                == Some(rev)
        })
        .await;
        eventually("the failure is cleared", || {
            h.svc
                .node_users(ACCOUNT, "p1", &n)
                .unwrap()
                .failures
                .is_empty()
        })
        .await;
    })
    .await
}

#[tokio::test]
async fn replayed_foreign_and_future_acks_never_move_the_applied_revision() {
    deadline(async {
        let h = Harness::in_memory(agents_config(), AckMode::AtOnce).await;
        let mut a = join(&h.svc, None, ProviderKind::Linux, 1).await;
        a.run(Duration::from_secs(5));
        agents_pool(&h, "p1", Os::Linux, 1, json!({})).await;
        let n = h.wait_idle("p1", 1).await.remove(0);
        let b = join(&h.svc, None, ProviderKind::Linux, 1).await;
        h.add("p1", &n, json!({"name": "ann", "password": "pw"}))
            .await
            .unwrap();
        let old = a.poll(None, Duration::ZERO).await;
        h.add("p1", &n, json!({"name": "bob", "password": "pw"}))
            .await
            .unwrap();
        let rev = h.revision("p1", &n);
        drop(a); // stops the agent's loop
        let a_host = h
            .svc
            .list_hosts(ACCOUNT)
            .into_iter()
            .find(|x| !x.nodes.is_empty())
            .unwrap()
            .id;
        // A replay of the older revision: taken, changes nothing.
        let answer = h.svc.ack(&a_host, acks_for(&old, None)).await.unwrap();
        assert!(answer.refused.is_empty());
        assert_eq!(
            h.svc
                .node_users(ACCOUNT, "p1", &n)
                .unwrap()
                .applied_revision,
            Some(rev)
        );
        // Another host acknowledging this node: refused.
        let answer = h.svc.ack(&b.host, acks_for(&old, None)).await.unwrap();
        assert_eq!(answer.refused, [old.nodes[0].key.clone()]);
        // A revision never asked for: refused.
        let mut future = acks_for(&old, None);
        future.nodes[0].revision = rev + 5;
        let answer = h.svc.ack(&a_host, future).await.unwrap();
        assert_eq!(answer.refused, [old.nodes[0].key.clone()]);
        assert_eq!(
            h.svc
                .node_users(ACCOUNT, "p1", &n)
                .unwrap()
                .applied_revision,
            Some(rev)
        );
    })
    .await
}

#[tokio::test]
async fn too_few_hosts_leave_the_pool_resizing_then_steady_with_resize_errors() {
    deadline(async {
        let h = Harness::in_memory(agents_config(), AckMode::AtOnce).await;
        let mut a = join(&h.svc, None, ProviderKind::Linux, 1).await;
        a.run(Duration::from_secs(5));
        agents_pool(&h, "p1", Os::Linux, 2, json!({"resizeTimeout": "PT1S"})).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let p = h.svc.get_pool(ACCOUNT, "p1").unwrap();
        assert_eq!(p.pool.allocation_state, AllocationState::Resizing);
        assert_eq!(p.current_dedicated, 1);
        assert!(p.pool.resize_errors.is_empty());
        eventually("the pool gave up at its resize timeout", || {
            h.svc.get_pool(ACCOUNT, "p1").unwrap().pool.allocation_state == AllocationState::Steady
        })
        .await;
        let p = h.svc.get_pool(ACCOUNT, "p1").unwrap();
        assert_eq!(p.current_dedicated, 1);
        assert_eq!(p.pool.resize_errors.len(), 1);
        assert_eq!(p.pool.resize_errors[0].code, "AllocationTimedout");
        // A host that joins later is taken: the pool reaches its target, without errors.
        let mut b = join(&h.svc, None, ProviderKind::Linux, 1).await;
        b.run(Duration::from_secs(5));
        h.wait_idle("p1", 2).await;
        assert!(
            h.svc
                .get_pool(ACCOUNT, "p1")
                .unwrap()
                .pool
                .resize_errors
                .is_empty()
        );
    })
    .await
}

#[tokio::test]
async fn a_host_joining_a_short_pool_is_taken_and_shrinking_releases_it() {
    deadline(async {
        let h = Harness::in_memory(agents_config(), AckMode::AtOnce).await;
        let mut a = join(&h.svc, None, ProviderKind::Linux, 1).await;
        a.run(Duration::from_secs(5));
        agents_pool(&h, "p1", Os::Linux, 2, json!({})).await;
        eventually("one node", || {
            h.svc.get_pool(ACCOUNT, "p1").unwrap().current_dedicated == 1
        })
        .await;
        assert_eq!(
            h.svc.get_pool(ACCOUNT, "p1").unwrap().pool.allocation_state,
            AllocationState::Resizing
        );
        let mut b = join(&h.svc, None, ProviderKind::Linux, 1).await;
        b.run(Duration::from_secs(5));
        let nodes = h.wait_idle("p1", 2).await;
        assert!(
            h.svc
                .get_pool(ACCOUNT, "p1")
                .unwrap()
                .pool
                .resize_errors
                .is_empty()
        );
        let hosts = h.svc.list_hosts(ACCOUNT);
        assert!(
            hosts.iter().all(|x| x.nodes.len() == 1 && x.connected),
            "{hosts:?}"
        );
        // Shrink to one: a host is free again and its desired state is empty.
        let resize = parse_resize(br#"{"targetDedicatedNodes":1}"#, 10_000).unwrap();
        h.svc
            .resize_pool(ACCOUNT, "p1", resize, &|_| Ok(()))
            .await
            .unwrap();
        h.wait_idle("p1", 1).await;
        let hosts = h.svc.list_hosts(ACCOUNT);
        let free: Vec<_> = hosts.iter().filter(|x| x.nodes.is_empty()).collect();
        assert_eq!(free.len(), 1, "{hosts:?}");
        let released = if free[0].id == a.host { &a } else { &b };
        assert!(released.poll(None, Duration::ZERO).await.nodes.is_empty());
        assert_eq!(nodes.len(), 2);
        // Deleting the pool frees the other one too.
        h.svc.delete_pool(ACCOUNT, "p1", &|_| Ok(())).await.unwrap();
        eventually("every host free", || {
            h.svc.list_hosts(ACCOUNT).iter().all(|x| x.nodes.is_empty())
        })
        .await;
    })
    .await
}

#[tokio::test]
async fn linux_hosts_back_only_linux_pools_and_scoped_hosts_only_their_pool() {
    deadline(async {
        let h = Harness::in_memory(agents_config(), AckMode::AtOnce).await;
        let mut linux = join(&h.svc, None, ProviderKind::Linux, 1).await;
        linux.run(Duration::from_secs(5));
        let mut scoped = join(&h.svc, Some("Mine"), ProviderKind::Simulate, 3).await;
        scoped.run(Duration::from_secs(5));
        agents_pool(
            &h,
            "win",
            Os::Windows,
            1,
            json!({"resizeTimeout": "PT0.3S"}),
        )
        .await;
        eventually("the Windows pool gave up", || {
            h.svc
                .get_pool(ACCOUNT, "win")
                .unwrap()
                .pool
                .allocation_state
                == AllocationState::Steady
        })
        .await;
        assert_eq!(h.svc.get_pool(ACCOUNT, "win").unwrap().current_dedicated, 0);
        // The scoped simulated host backs its own pool (any case), Windows included.
        agents_pool(&h, "mine", Os::Windows, 3, json!({})).await;
        let nodes = h.wait_idle("mine", 3).await;
        for n in &nodes {
            let v = h.svc.get_node(ACCOUNT, "mine", n).unwrap();
            assert_eq!(v.node.host.as_deref(), Some(scoped.host.as_str()));
        }
    })
    .await
}

#[tokio::test]
async fn join_tokens_are_single_use_expiring_and_checked() {
    deadline(async {
        let h = Harness::in_memory(agents_config(), AckMode::AtOnce).await;
        let created = h
            .svc
            .create_join_token(ACCOUNT, Some("p9"), Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(created.id.len(), 6);
        assert!(created.token.starts_with(&format!("{}.", created.id)));
        assert!(
            !format!("{created:?}").contains(&created.token[7..]),
            "Debug hides the secret"
        );
        let views = h.svc.list_join_tokens(ACCOUNT);
        assert_eq!(views.len(), 1);
        assert_eq!(views[0].pool.as_deref(), Some("p9"));
        assert!(h.svc.list_join_tokens("other").is_empty());
        let host = || report(ProviderKind::Linux, 1, &[]);
        let req = |token: &str| JoinRequest {
            token: token.to_string(),
            host: host(),
        };
        // Forged: a wrong secret, an unknown id, no dot.
        let wrong = format!("{}.{}", created.id, "x".repeat(32));
        for bad in [
            wrong.as_str(),
            "zzzzzz.abcdefghijklmnopqrstuvwxyz012345",
            "nodot",
        ] {
            let e = h.svc.join(req(bad)).await.unwrap_err();
            assert_eq!(e.code, Code::AuthenticationFailed, "{bad}");
            assert_eq!(e.status(), 403);
        }
        let joined = h.svc.join(req(&created.token)).await.unwrap();
        let e = h.svc.join(req(&created.token)).await.unwrap_err();
        assert_eq!(e.code, Code::AuthenticationFailed);
        assert!(format!("{e:?}").contains("already used"));
        assert!(h.svc.list_join_tokens(ACCOUNT)[0].used);
        // Scope: the host backs pool p9 only.
        let hosts = h.svc.list_hosts(ACCOUNT);
        assert_eq!(hosts[0].id, joined.host_id);
        // Expiry.
        let short = h
            .svc
            .create_join_token(ACCOUNT, None, Duration::from_millis(1100))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let e = h.svc.join(req(&short.token)).await.unwrap_err();
        assert_eq!(e.code, Code::AuthenticationFailed);
        assert!(format!("{e:?}").contains("expired"));
        // Revoked tokens are gone.
        let t = h
            .svc
            .create_join_token(ACCOUNT, None, Duration::from_secs(60))
            .await
            .unwrap();
        h.svc.revoke_join_token(ACCOUNT, &t.id).await.unwrap();
        assert_eq!(
            code(h.svc.join(req(&t.token)).await),
            Code::AuthenticationFailed
        );
        assert_eq!(
            code(h.svc.revoke_join_token(ACCOUNT, &t.id).await),
            Code::ResourceNotFound
        );
        // Bad TTLs and reports are refused before anything is stored.
        assert_eq!(
            code(h.svc.create_join_token(ACCOUNT, None, Duration::ZERO).await),
            Code::InvalidPropertyValue
        );
        let t = h
            .svc
            .create_join_token(ACCOUNT, None, Duration::from_secs(60))
            .await
            .unwrap();
        let mut bad = req(&t.token);
        bad.host.slots = 2;
        assert_eq!(code(h.svc.join(bad).await), Code::InvalidPropertyValue);
        let mut bad = req(&t.token);
        bad.host.address = "not-an-ip".into();
        assert_eq!(code(h.svc.join(bad).await), Code::InvalidPropertyValue);
        assert!(
            !h.svc
                .list_join_tokens(ACCOUNT)
                .iter()
                .find(|v| v.id == t.id)
                .unwrap()
                .used
        );
    })
    .await
}

#[tokio::test]
async fn credentials_of_revoked_hosts_and_forged_credentials_are_refused() {
    deadline(async {
        let h = Harness::in_memory(agents_config(), AckMode::AtOnce).await;
        let mut a = join(&h.svc, None, ProviderKind::Linux, 1).await;
        a.run(Duration::from_secs(5));
        agents_pool(&h, "p1", Os::Linux, 1, json!({"resizeTimeout": "PT0.5S"})).await;
        h.wait_idle("p1", 1).await;
        let b = join(&h.svc, None, ProviderKind::Linux, 1).await;
        // A credential edited to name another host fails its signature.
        let forged = a.cred.replacen(&a.host, &b.host, 1);
        assert_eq!(
            code(h.svc.authenticate_node(&forged)),
            Code::AuthenticationFailed
        );
        assert_eq!(
            code(h.svc.authenticate_node("garbage")),
            Code::AuthenticationFailed
        );
        let backing = h
            .svc
            .list_hosts(ACCOUNT)
            .into_iter()
            .find(|x| !x.nodes.is_empty())
            .unwrap();
        assert_eq!(backing.id, a.host);
        // A long poll waiting when its host is revoked ends at once with the refusal.
        let cursor = a.poll(None, Duration::ZERO).await.cursor;
        let (svc, host) = (h.svc.clone(), a.host.clone());
        let waiting = tokio::spawn(async move {
            svc.desired(&host, Some(&cursor), Duration::from_secs(30))
                .await
                .map(|_| ())
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        h.svc.revoke_host(ACCOUNT, &a.host).await.unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the waiting poll ended")
            .unwrap();
        assert_eq!(code(ended), Code::AuthenticationFailed);
        assert_eq!(
            code(h.svc.authenticate_node(&a.cred)),
            Code::AuthenticationFailed
        );
        assert_eq!(
            code(h.svc.desired(&a.host, None, Duration::ZERO).await),
            Code::AuthenticationFailed
        );
        // Its node left the pool; the pool took the other free host.
        eventually("the pool moved to host b", || {
            h.svc
                .list_hosts(ACCOUNT)
                .iter()
                .any(|x| x.id == b.host && x.nodes.len() == 1)
        })
        .await;
        assert_eq!(
            code(h.svc.revoke_host(ACCOUNT, &a.host).await),
            Code::ResourceNotFound
        );
        assert_eq!(
            code(h.svc.drain_host("other", &b.host).await),
            Code::ResourceNotFound
        );
    })
    .await
}

#[tokio::test]
async fn a_drained_host_takes_no_new_pool_but_keeps_its_nodes() {
    deadline(async {
        let h = Harness::in_memory(agents_config(), AckMode::AtOnce).await;
        let mut a = join(&h.svc, None, ProviderKind::Simulate, 4).await;
        a.run(Duration::from_secs(5));
        agents_pool(&h, "p1", Os::Linux, 1, json!({})).await;
        h.wait_idle("p1", 1).await;
        let view = h.svc.drain_host(ACCOUNT, &a.host).await.unwrap();
        assert!(view.drained);
        assert!(a.poll(None, Duration::ZERO).await.drained);
        agents_pool(&h, "p2", Os::Linux, 1, json!({"resizeTimeout": "PT0.3S"})).await;
        eventually("p2 gave up", || {
            h.svc.get_pool(ACCOUNT, "p2").unwrap().pool.allocation_state == AllocationState::Steady
        })
        .await;
        assert_eq!(h.svc.get_pool(ACCOUNT, "p2").unwrap().current_dedicated, 0);
        assert_eq!(h.svc.get_pool(ACCOUNT, "p1").unwrap().current_dedicated, 1);
    })
    .await
}

#[tokio::test]
async fn the_long_poll_answers_at_once_on_change_and_unchanged_at_the_end_of_its_wait() {
    deadline(async {
        let h = Harness::in_memory(agents_config(), AckMode::AtOnce).await;
        let mut a = join(&h.svc, None, ProviderKind::Linux, 1).await;
        a.run(Duration::from_secs(5));
        agents_pool(&h, "p1", Os::Linux, 1, json!({})).await;
        let n = h.wait_idle("p1", 1).await.remove(0);
        let first = a.poll(None, Duration::from_secs(30)).await;
        assert!(first.changed, "no cursor: the state at once");
        let started = Instant::now();
        let same = a
            .poll(Some(&first.cursor), Duration::from_millis(300))
            .await;
        assert!(!same.changed);
        assert_eq!(same.cursor, first.cursor);
        assert_eq!(same.nodes, first.nodes, "still the whole state");
        assert!(started.elapsed() >= Duration::from_millis(300));
        // A change wakes a waiting poll.
        let svc = a.svc.clone();
        let (host, cursor) = (a.host.clone(), first.cursor.clone());
        let waiting = tokio::spawn(async move {
            let t = Instant::now();
            let d = svc
                .desired(&host, Some(&cursor), Duration::from_secs(30))
                .await
                .unwrap();
            (d, t.elapsed())
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        h.add("p1", &n, json!({"name": "ann", "password": "pw"}))
            .await
            .unwrap();
        let (d, took) = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap();
        assert!(d.changed);
        assert!(took < Duration::from_secs(5));
        assert_eq!(d.nodes[0].accounts[0].name, "ann");
        // A moved service clock is news too (agents shift shadow's expiry by it).
        let before = a.poll(None, Duration::ZERO).await;
        h.svc.advance_clock(time::Duration::days(2)).await.unwrap();
        let after = a.poll(Some(&before.cursor), Duration::from_secs(5)).await;
        assert!(after.changed);
        assert!(after.clock_offset_seconds >= 2 * 86_400);
    })
    .await
}

#[tokio::test]
async fn a_silent_host_makes_its_nodes_unknown_and_they_come_back_when_it_polls() {
    deadline(async {
        let cfg = Config {
            agent_grace: Duration::from_millis(400),
            ..agents_config()
        };
        let h = Harness::in_memory(cfg, AckMode::AtOnce).await;
        let mut a = join(&h.svc, None, ProviderKind::Linux, 1).await;
        a.run(Duration::from_millis(100));
        agents_pool(&h, "p1", Os::Linux, 1, json!({})).await;
        let n = h.wait_idle("p1", 1).await.remove(0);
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(
            h.svc.get_node(ACCOUNT, "p1", &n).unwrap().node.state,
            NodeState::Idle
        );
        let host = a.host.clone();
        let keep = Agent {
            svc: a.svc.clone(),
            host: host.clone(),
            cred: a.cred.clone(),
            withhold: Arc::new(AtomicBool::new(false)),
            fail: Arc::new(Mutex::new(None)),
            task: None,
        };
        drop(a); // the agent stops polling
        h.wait_state("p1", &n, NodeState::Unknown).await;
        assert!(!h.svc.list_hosts(ACCOUNT)[0].connected);
        keep.poll(None, Duration::ZERO).await;
        assert_eq!(
            h.svc.get_node(ACCOUNT, "p1", &n).unwrap().node.state,
            NodeState::Idle
        );
    })
    .await
}

#[tokio::test]
async fn a_reserved_name_is_refused_before_any_write() {
    deadline(async {
        let h = Harness::in_memory(agents_config(), AckMode::AtOnce).await;
        let mut a = join_with(
            &h.svc,
            None,
            report(ProviderKind::Linux, 1, &["root", "ubuntu"]),
        )
        .await;
        a.run(Duration::from_secs(5));
        agents_pool(&h, "p1", Os::Linux, 1, json!({})).await;
        let n = h.wait_idle("p1", 1).await.remove(0);
        let rev = h.revision("p1", &n);
        let e = h
            .add("p1", &n, json!({"name": "ubuntu", "password": "pw"}))
            .await
            .unwrap_err();
        assert_eq!(e.code, Code::InvalidPropertyValue);
        assert_eq!(e.status(), 400);
        assert!(e.text().contains("reserved on this node"), "{}", e.text());
        assert_eq!(h.revision("p1", &n), rev, "nothing written");
        assert!(h.stored("p1", &n).is_empty());
        h.add("p1", &n, json!({"name": "Ubuntu", "password": "pw"}))
            .await
            .unwrap();
    })
    .await
}

#[tokio::test]
async fn reboot_and_reimage_count_up_and_end_idle_once_acknowledged() {
    deadline(async {
        let h = Harness::in_memory(agents_config(), AckMode::AtOnce).await;
        let mut a = join(&h.svc, None, ProviderKind::Linux, 1).await;
        a.run(Duration::from_secs(5));
        agents_pool(&h, "p1", Os::Linux, 1, json!({})).await;
        let n = h.wait_idle("p1", 1).await.remove(0);
        h.add("p1", &n, json!({"name": "ann", "password": "pw"}))
            .await
            .unwrap();
        a.withhold.store(true, Ordering::SeqCst);
        h.svc.reboot_node(ACCOUNT, "p1", &n).await.unwrap();
        let d = a.poll(None, Duration::ZERO).await;
        assert_eq!((d.nodes[0].boot, d.nodes[0].image), (1, 0));
        assert_eq!(d.nodes[0].accounts.len(), 1, "a reboot keeps the accounts");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            h.svc.get_node(ACCOUNT, "p1", &n).unwrap().node.state,
            NodeState::Rebooting,
            "not idle before the host acknowledged the new boot"
        );
        a.withhold.store(false, Ordering::SeqCst);
        h.wait_state("p1", &n, NodeState::Idle).await;
        h.svc.reimage_node(ACCOUNT, "p1", &n).await.unwrap();
        h.wait_state("p1", &n, NodeState::Idle).await;
        let d = a.poll(None, Duration::ZERO).await;
        assert_eq!((d.nodes[0].boot, d.nodes[0].image), (1, 1));
        assert!(d.nodes[0].accounts.is_empty(), "a fresh image has no users");
    })
    .await
}

#[tokio::test]
async fn after_a_restart_the_same_desired_state_is_served_and_agents_carry_on() {
    deadline(async {
        let h = Harness::on_disk(agents_config(), AckMode::AtOnce).await;
        let mut a = join(&h.svc, None, ProviderKind::Simulate, 2).await;
        a.run(Duration::from_secs(5));
        agents_pool(&h, "p1", Os::Linux, 2, json!({})).await;
        let n = h.wait_idle("p1", 2).await.remove(0);
        h.add("p1", &n, json!({"name": "ann", "sshPublicKey": KEY1}))
            .await
            .unwrap();
        let before = a.poll(None, Duration::ZERO).await;
        let (host, cred) = (a.host.clone(), a.cred.clone());
        drop(a);
        let h = h.restart(AckMode::AtOnce).await;
        assert_eq!(
            h.svc.authenticate_node(&cred).unwrap(),
            host,
            "the credential survives"
        );
        let after = h
            .svc
            .desired(&host, Some(&before.cursor), Duration::ZERO)
            .await
            .unwrap();
        assert!(!after.changed, "same state, same cursor");
        assert_eq!(after.nodes, before.nodes);
        assert_eq!(
            h.svc
                .node_users(ACCOUNT, "p1", &n)
                .unwrap()
                .applied_revision,
            Some(
                before
                    .nodes
                    .iter()
                    .find(|x| x.node_id == n)
                    .unwrap()
                    .revision
            )
        );
        // The agent carries on: writes wait for and get its acknowledgement.
        let mut a = Agent {
            svc: h.svc.clone(),
            host,
            cred,
            withhold: Arc::new(AtomicBool::new(false)),
            fail: Arc::new(Mutex::new(None)),
            task: None,
        };
        a.run(Duration::from_secs(5));
        h.add("p1", &n, json!({"name": "bob", "password": "pw"}))
            .await
            .unwrap();
        // The embedded provider was never told of agent nodes.
        assert!(h.nodes.told().is_empty(), "{:?}", h.nodes.told());
    })
    .await
}

#[tokio::test]
async fn a_pool_chooses_its_nodes_by_metadata() {
    deadline(async {
        let h = Harness::in_memory(agents_config(), AckMode::AtOnce).await;
        for (value, ok) in [
            ("sandbox", false),
            ("Agents", false),
            ("", false),
            ("embedded", true),
        ] {
            let body = json!({
                "id": format!("p-{value}"), "vmSize": "standard_d2s_v3",
                "virtualMachineConfiguration": {"imageReference": {"publisher": "Canonical",
                    "offer": "0001-com-ubuntu-server-jammy", "sku": "22_04-lts"},
                    "nodeAgentSKUId": "batch.node.ubuntu 22.04"},
                "targetDedicatedNodes": 1,
                "metadata": [{"name": "bluebatch.nodes", "value": value}],
            });
            let new = parse_add_pool(body.to_string().as_bytes(), 10_000).unwrap();
            let r = h.svc.add_pool(ACCOUNT, new).await;
            if ok {
                r.unwrap();
            } else {
                let e = r.unwrap_err();
                assert_eq!(e.code, Code::InvalidPropertyValue, "{value}");
                assert!(h.svc.get_pool(ACCOUNT, &format!("p-{value}")).is_err());
            }
        }
        // An embedded pool's nodes are the embedded provider's.
        h.wait_idle("p-embedded", 1).await;
        // With `agents` as the default, a pool without the item waits for hosts.
        let cfg = Config {
            default_nodes: bluebatch_service::NodeSource::Agents,
            ..agents_config()
        };
        let h = Harness::in_memory(cfg, AckMode::AtOnce).await;
        let id = h.pool_body_add("q").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let p = h.svc.get_pool(ACCOUNT, &id).unwrap();
        assert_eq!(p.pool.allocation_state, AllocationState::Resizing);
        assert_eq!(p.current_dedicated, 0);
        assert!(h.nodes.told().is_empty());
    })
    .await
}

trait AddPlain {
    async fn pool_body_add(&self, id: &str) -> String;
}

impl AddPlain for Harness {
    async fn pool_body_add(&self, id: &str) -> String {
        let body = json!({
            "id": id, "vmSize": "standard_d2s_v3",
            "virtualMachineConfiguration": {"imageReference": {"publisher": "Canonical",
                "offer": "0001-com-ubuntu-server-jammy", "sku": "22_04-lts"},
                "nodeAgentSKUId": "batch.node.ubuntu 22.04"},
            "targetDedicatedNodes": 1,
        });
        let new = parse_add_pool(body.to_string().as_bytes(), 10_000).unwrap();
        self.svc.add_pool(ACCOUNT, new).await.unwrap();
        id.to_string()
    }
}

#[tokio::test]
async fn nodes_left_unknown_across_a_restart_come_back_when_their_host_polls() {
    deadline(async {
        let cfg = Config {
            agent_grace: Duration::from_millis(300),
            ..agents_config()
        };
        let h = Harness::on_disk(cfg, AckMode::AtOnce).await;
        let mut a = join(&h.svc, None, ProviderKind::Linux, 1).await;
        a.run(Duration::from_millis(100));
        agents_pool(&h, "p1", Os::Linux, 1, json!({})).await;
        let n = h.wait_idle("p1", 1).await.remove(0);
        let host = a.host.clone();
        drop(a);
        h.wait_state("p1", &n, NodeState::Unknown).await;
        // Memory is ahead of the disk by one commit.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let h = h.restart(AckMode::AtOnce).await;
        assert_eq!(
            h.svc.get_node(ACCOUNT, "p1", &n).unwrap().node.state,
            NodeState::Unknown
        );
        h.svc.desired(&host, None, Duration::ZERO).await.unwrap();
        assert_eq!(
            h.svc.get_node(ACCOUNT, "p1", &n).unwrap().node.state,
            NodeState::Idle
        );
    })
    .await
}

#[tokio::test]
async fn the_credential_is_renewed_through_the_poll_past_half_its_life() {
    deadline(async {
        let cfg = Config {
            credential_ttl: Duration::from_secs(8),
            ..agents_config()
        };
        let h = Harness::in_memory(cfg, AckMode::AtOnce).await;
        let a = join(&h.svc, None, ProviderKind::Linux, 1).await;
        assert_eq!(a.poll(None, Duration::ZERO).await.credential, None);
        tokio::time::sleep(Duration::from_millis(4100)).await;
        let renewed = a
            .poll(None, Duration::ZERO)
            .await
            .credential
            .expect("renewed");
        assert_ne!(renewed, a.cred);
        assert_eq!(h.svc.authenticate_node(&renewed).unwrap(), a.host);
        // The same one is repeated for a while (an answer may be lost), then no more.
        assert_eq!(
            a.poll(None, Duration::ZERO).await.credential.as_deref(),
            Some(renewed.as_str())
        );
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert_eq!(a.poll(None, Duration::ZERO).await.credential, None);
        // The old one still works until it expires, then only the new one does.
        assert_eq!(h.svc.authenticate_node(&a.cred).unwrap(), a.host);
        tokio::time::sleep(Duration::from_millis(2900)).await;
        assert_eq!(
            code(h.svc.authenticate_node(&a.cred)),
            Code::AuthenticationFailed
        );
        assert_eq!(h.svc.authenticate_node(&renewed).unwrap(), a.host);
    })
    .await
}

#[tokio::test]
async fn one_simulated_host_backs_ten_thousand_nodes_through_one_poll() {
    deadline(async {
        let h = Harness::in_memory(agents_config(), AckMode::AtOnce).await;
        let mut a = join(&h.svc, None, ProviderKind::Simulate, 10_000).await;
        a.run(Duration::from_secs(5));
        let t = Instant::now();
        agents_pool(&h, "big", Os::Linux, 10_000, json!({})).await;
        let until = Instant::now() + Duration::from_secs(50);
        loop {
            let p = h.svc.get_pool(ACCOUNT, "big").unwrap();
            let (idle, _) = h
                .svc
                .list_nodes(
                    ACCOUNT,
                    "big",
                    &|v| v.node.state == NodeState::Idle,
                    None,
                    1,
                )
                .unwrap();
            if p.pool.allocation_state == AllocationState::Steady && p.current_dedicated == 10_000 {
                let (all, _) = h
                    .svc
                    .list_nodes(
                        ACCOUNT,
                        "big",
                        &|v| v.node.state != NodeState::Idle,
                        None,
                        1,
                    )
                    .unwrap();
                if all.is_empty() && !idle.is_empty() {
                    break;
                }
            }
            assert!(Instant::now() < until, "10,000 nodes not idle in time");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let ready = t.elapsed();
        let (nodes, _) = h
            .svc
            .list_nodes(ACCOUNT, "big", &|_| true, None, 3)
            .unwrap();
        let t = Instant::now();
        for n in &nodes {
            h.add(
                "big",
                &n.node.id,
                json!({"name": "ann", "sshPublicKey": KEY1}),
            )
            .await
            .unwrap();
        }
        let writes = t.elapsed() / 3;
        eprintln!("10,000 agent nodes idle in {ready:?}; a write answers in {writes:?}");
        assert!(writes < Duration::from_secs(3), "{writes:?} per write");
    })
    .await
}
