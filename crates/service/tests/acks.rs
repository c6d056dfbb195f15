//! What the service tells its node provider and when it answers: a user write answers after the
//! node's acknowledgement, or `OperationTimedOut` after `ack_timeout` with the change recorded
//! (a later acknowledgement, a later read and a restart all converge on it); reboot, reimage and
//! removal tell the provider their steps in order. Real time with short timeouts: the store's
//! writer is an OS thread, so tokio's paused clock would jump past a deadline while a commit is
//! in flight.

mod common;

use bluebatch_core::error::Code;
use bluebatch_core::model::{NodeState, Os, Pool};
use bluebatch_service::{Config, NodeFabric};
use common::*;
use serde_json::json;
use std::time::Duration;
use tokio::time::Instant;

fn with_timeout(ack_timeout: Duration) -> Config {
    Config {
        ack_timeout,
        ..config()
    }
}

/// Waits until the provider has been handed `revision` for the node.
async fn handed(h: &Harness, key: &str, revision: u64) {
    let until = Instant::now() + Duration::from_secs(10);
    while h.nodes.handed(key) < revision {
        assert!(
            Instant::now() < until,
            "revision {revision} never handed to {key}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The accounts the store holds for the node, as the node should enforce them.
fn stored_accounts(h: &Harness, pool: &str, node: &str) -> Vec<bluebatch_core::NodeAccount> {
    h.stored(pool, node)
        .values()
        .map(|u| u.to_account())
        .collect()
}

#[tokio::test]
async fn a_withheld_ack_answers_operation_timed_out_and_the_change_stays_recorded() {
    deadline(async {
        let timeout = Duration::from_millis(300);
        let h = Harness::on_disk(with_timeout(timeout), AckMode::AtOnce).await;
        let n = h.pool("p1", Os::Linux, 1).await.remove(0);
        let key = h.key_of(&n);
        h.add("p1", &n, json!({"name": "alice", "password": "pw"}))
            .await
            .unwrap();
        assert_eq!(h.nodes.applied_revision(&key), Some(1));
        let acked_accounts = h.nodes.accounts(&key);

        h.nodes.set_mode(AckMode::Withhold);
        for (what, write) in [("update", 2), ("add", 3), ("delete", 4)] {
            let started = Instant::now();
            let r = match what {
                "update" => h
                    .update("p1", &n, "alice", json!({"sshPublicKey": KEY1}))
                    .await
                    .map(|_| ()),
                "add" => h.add("p1", &n, json!({"name": "bob"})).await.map(|_| ()),
                _ => h.delete("p1", &n, "alice").await,
            };
            let took = started.elapsed();
            let e = r.expect_err(what);
            assert_eq!(e.code, Code::OperationTimedOut, "{what}");
            assert!(
                e.message.as_deref().unwrap_or("").contains("recorded"),
                "{what}: the message says the change is recorded: {e:?}"
            );
            assert!(
                took >= timeout,
                "{what} answered after {took:?}, before the timeout"
            );
            assert!(
                took < timeout + Duration::from_secs(3),
                "{what} took {took:?}"
            );
            // Recorded: the store has the change, at the revision handed to the node.
            assert_eq!(h.revision("p1", &n), write, "{what}");
            assert_eq!(h.nodes.handed(&key), write, "{what}");
            // The node has not applied it.
            assert_eq!(h.nodes.applied_revision(&key), Some(1), "{what}");
            assert_eq!(h.nodes.accounts(&key), acked_accounts, "{what}");
        }
        let stored = h.stored("p1", &n);
        assert_eq!(
            stored.keys().collect::<Vec<_>>(),
            ["bob"],
            "alice deleted, bob added"
        );
        let view = h.svc.node_users(ACCOUNT, "p1", &n).unwrap();
        assert_eq!(
            view.applied_revision,
            Some(1),
            "the inspect view shows the lag"
        );

        // The node acknowledges later: it converges on the store.
        h.nodes.release(&key);
        let view = h.svc.node_users(ACCOUNT, "p1", &n).unwrap();
        assert_eq!(view.applied_revision, Some(4));
        assert_eq!(view.applied, stored_accounts(&h, "p1", &n));

        // A restart reads what was recorded and hands the node the whole set at that revision.
        let port = h.svc.get_node(ACCOUNT, "p1", &n).unwrap().node.ssh_port;
        assert!(port.is_some());
        let h = h.restart(AckMode::AtOnce).await;
        assert_eq!(h.stored("p1", &n), stored);
        assert_eq!(h.revision("p1", &n), 4);
        let told = h.nodes.told_about(&key);
        assert_in_order(
            &told,
            &[
                Told::State(key.clone(), NodeState::Idle),
                Told::Start(key.clone(), port),
                Told::Apply(key.clone(), 4, stored_accounts(&h, "p1", &n)),
            ],
        );
        assert_eq!(h.nodes.applied_revision(&key), Some(4));
        assert_eq!(h.nodes.accounts(&key), stored_accounts(&h, "p1", &n));
    })
    .await
}

#[tokio::test]
async fn a_later_acknowledged_write_covers_the_unacknowledged_ones_before_it() {
    deadline(async {
        let h =
            Harness::in_memory(with_timeout(Duration::from_millis(200)), AckMode::Withhold).await;
        let n = h.pool("p1", Os::Linux, 1).await.remove(0);
        let key = h.key_of(&n);
        let e = h
            .add("p1", &n, json!({"name": "alice", "password": "pw"}))
            .await;
        assert_eq!(code(e), Code::OperationTimedOut);
        let e = h.add("p1", &n, json!({"name": "bob"})).await;
        assert_eq!(code(e), Code::OperationTimedOut);
        assert_eq!(h.nodes.applied_revision(&key), None);
        // A read shows both, as recorded.
        assert_eq!(h.stored("p1", &n).len(), 2);
        h.nodes.set_mode(AckMode::AtOnce);
        h.update("p1", &n, "bob", json!({"sshPublicKey": KEY2}))
            .await
            .unwrap();
        assert_eq!(h.nodes.applied_revision(&key), Some(3));
        assert_eq!(h.nodes.accounts(&key), stored_accounts(&h, "p1", &n));
        assert_eq!(h.nodes.accounts(&key).len(), 2);
    })
    .await
}

#[tokio::test]
async fn a_delayed_ack_within_the_timeout_answers_only_after_the_ack() {
    deadline(async {
        let timeout = Duration::from_secs(1);
        let h = Harness::in_memory(with_timeout(timeout), AckMode::Withhold).await;
        let n = h.pool("p1", Os::Linux, 1).await.remove(0);
        let key = h.key_of(&n);

        // The test acknowledges by hand while the write waits.
        let svc = h.svc.clone();
        let node = n.clone();
        let write = tokio::spawn(async move {
            let body = bluebatch_core::users::parse_add_user(br#"{"name":"alice"}"#).unwrap();
            let r = svc.add_user(at("p1", &node), body, None).await;
            (r, Instant::now())
        });
        handed(&h, &key, 1).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !write.is_finished(),
            "the write answered before the node acknowledged"
        );
        assert_eq!(h.stored("p1", &n).len(), 1, "recorded while it waits");
        let released = Instant::now();
        h.nodes.release(&key);
        let (r, answered) = write.await.unwrap();
        r.expect("acknowledged within the timeout");
        assert!(answered >= released, "answered before the acknowledgement");
        assert!(answered - released < timeout);

        // The provider acknowledges on its own, 300 ms after it is handed the change.
        let delay = Duration::from_millis(300);
        h.nodes.set_mode(AckMode::After(delay));
        for what in ["update", "delete"] {
            let started = Instant::now();
            match what {
                "update" => h
                    .update("p1", &n, "alice", json!({"password": "pw"}))
                    .await
                    .map(|_| ()),
                _ => h.delete("p1", &n, "alice").await,
            }
            .unwrap_or_else(|e| panic!("{what}: {e:?}"));
            let answered = Instant::now();
            let rev = h.revision("p1", &n);
            let acked = h.nodes.acked_at(&key, rev).expect("acknowledged");
            assert!(
                answered >= acked,
                "{what} answered before the acknowledgement"
            );
            assert!(
                answered - started >= delay,
                "{what} took {:?}",
                answered - started
            );
            assert!(
                answered - started < delay + Duration::from_secs(5),
                "{what} took {:?}",
                answered - started
            );
            assert_eq!(h.nodes.accounts(&key), stored_accounts(&h, "p1", &n));
        }

        // An acknowledgement later than the timeout: OperationTimedOut, then the node converges.
        h.nodes
            .set_mode(AckMode::After(Duration::from_millis(2_500)));
        let started = Instant::now();
        let e = h.add("p1", &n, json!({"name": "carol"})).await;
        assert_eq!(code(e), Code::OperationTimedOut);
        assert!(started.elapsed() >= timeout);
        let rev = h.revision("p1", &n);
        let until = Instant::now() + Duration::from_secs(10);
        while h.nodes.applied_revision(&key) != Some(rev) {
            assert!(
                Instant::now() < until,
                "the late acknowledgement never came"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(h.nodes.accounts(&key), stored_accounts(&h, "p1", &n));
        assert_eq!(h.nodes.accounts(&key)[0].name, "carol");
    })
    .await
}

#[tokio::test]
async fn a_write_waiting_for_its_ack_holds_up_no_other_request() {
    deadline(async {
        let timeout = Duration::from_secs(1);
        let h = Harness::in_memory(with_timeout(timeout), AckMode::AtOnce).await;
        let ids = h.pool("p1", Os::Linux, 2).await;
        let (a, b) = (h.key_of(&ids[0]), h.key_of(&ids[1]));
        h.nodes.hold(&a);
        let spawn_add = |name: &'static str| {
            let (svc, node) = (h.svc.clone(), ids[0].clone());
            tokio::spawn(async move {
                let body = bluebatch_core::users::parse_add_user(
                    json!({"name": name}).to_string().as_bytes(),
                )
                .unwrap();
                svc.add_user(at("p1", &node), body, None).await
            })
        };
        let first = spawn_add("alice");
        handed(&h, &a, 1).await;
        // Meanwhile: reads, a write to another node, another write to the same node.
        let started = Instant::now();
        assert_eq!(h.stored("p1", &ids[0]).len(), 1);
        h.add("p1", &ids[1], json!({"name": "bob"})).await.unwrap();
        assert!(started.elapsed() < timeout, "the other node's write waited");
        assert_eq!(h.nodes.applied_revision(&b), Some(1));
        let second = spawn_add("carol");
        handed(&h, &a, 2).await;
        assert!(!first.is_finished() && !second.is_finished());
        h.nodes.release(&a);
        first.await.unwrap().expect("alice acknowledged");
        second.await.unwrap().expect("carol acknowledged");
        assert_eq!(h.nodes.accounts(&a), stored_accounts(&h, "p1", &ids[0]));
        assert_eq!(h.nodes.accounts(&a).len(), 2);
    })
    .await
}

#[tokio::test]
async fn nodes_are_told_creating_then_started_then_starting_and_idle() {
    deadline(async {
        let h = Harness::in_memory(config(), AckMode::AtOnce).await;
        let n = h.pool("p1", Os::Linux, 1).await.remove(0);
        let key = h.key_of(&n);
        let port = h.svc.get_node(ACCOUNT, "p1", &n).unwrap().node.ssh_port;
        assert!(port.is_some(), "the started endpoint's port is recorded");
        assert_in_order(
            &h.nodes.told_about(&key),
            &[
                Told::State(key.clone(), NodeState::Creating),
                Told::Start(key.clone(), None),
                Told::State(key.clone(), NodeState::Starting),
                Told::State(key.clone(), NodeState::Idle),
            ],
        );
        let (ip, login_port, _) = h.svc.remote_login_settings(ACCOUNT, "p1", &n).unwrap();
        assert_eq!((ip.as_str(), Some(login_port)), ("127.0.0.1", port));
    })
    .await
}

#[tokio::test]
async fn reboot_tells_the_provider_its_state_then_stop_then_start_and_keeps_users() {
    deadline(async {
        // Steps of 800 ms, so the node is still rebooting when the test looks.
        let h = Harness::in_memory(
            Config {
                node_step: Duration::from_millis(800),
                ..config()
            },
            AckMode::AtOnce,
        )
        .await;
        let n = h.pool("p1", Os::Linux, 1).await.remove(0);
        let key = h.key_of(&n);
        h.add("p1", &n, json!({"name": "alice", "password": "pw"}))
            .await
            .unwrap();
        let (users, rev) = (h.stored("p1", &n), h.revision("p1", &n));
        let port = h.svc.get_node(ACCOUNT, "p1", &n).unwrap().node.ssh_port;
        h.nodes.clear_told();

        h.svc.reboot_node(ACCOUNT, "p1", &n).await.unwrap();
        // Answered once the endpoint went down and came back on its port.
        assert_eq!(
            h.nodes.told_about(&key)[..3],
            [
                Told::State(key.clone(), NodeState::Rebooting),
                Told::Stop(key.clone()),
                Told::Start(key.clone(), port),
            ]
        );
        assert_eq!(
            h.svc.get_node(ACCOUNT, "p1", &n).unwrap().node.state,
            NodeState::Rebooting
        );
        assert_eq!(
            code(h.add("p1", &n, json!({"name": "bob"})).await),
            Code::NodeBeingRebooted
        );
        assert_eq!(
            code(h.svc.reboot_node(ACCOUNT, "p1", &n).await),
            Code::NodeBeingRebooted
        );
        h.wait_state("p1", &n, NodeState::Idle).await;
        let told = h.nodes.told_about(&key);
        assert_eq!(
            told.last(),
            Some(&Told::State(key.clone(), NodeState::Idle))
        );
        assert!(
            told.iter()
                .all(|t| !matches!(t, Told::Apply(..) | Told::Reimage(_) | Told::Remove(_))),
            "a reboot changes no account and removes nothing: {told:?}"
        );
        assert_eq!((h.stored("p1", &n), h.revision("p1", &n)), (users, rev));
        assert_eq!(h.nodes.accounts(&key), stored_accounts(&h, "p1", &n));
        h.add("p1", &n, json!({"name": "bob"})).await.unwrap();
    })
    .await
}

#[tokio::test]
async fn reimage_drops_every_account_then_stops_reimages_and_starts_the_node() {
    deadline(async {
        let h = Harness::in_memory(
            Config {
                node_step: Duration::from_millis(800),
                ..config()
            },
            AckMode::AtOnce,
        )
        .await;
        let n = h.pool("p1", Os::Linux, 1).await.remove(0);
        let key = h.key_of(&n);
        for name in ["alice", "bob"] {
            h.add("p1", &n, json!({"name": name, "password": "pw"}))
                .await
                .unwrap();
        }
        let rev = h.revision("p1", &n);
        let port = h.svc.get_node(ACCOUNT, "p1", &n).unwrap().node.ssh_port;
        h.nodes.clear_told();

        h.svc.reimage_node(ACCOUNT, "p1", &n).await.unwrap();
        assert_eq!(
            h.nodes.told_about(&key)[..5],
            [
                Told::State(key.clone(), NodeState::Reimaging),
                Told::Apply(key.clone(), rev + 1, Vec::new()),
                Told::Stop(key.clone()),
                Told::Reimage(key.clone()),
                Told::Start(key.clone(), port),
            ]
        );
        assert!(h.stored("p1", &n).is_empty(), "a fresh image has no users");
        assert_eq!(h.revision("p1", &n), rev + 1);
        assert!(h.nodes.accounts(&key).is_empty());
        assert_eq!(
            code(h.add("p1", &n, json!({"name": "carol"})).await),
            Code::NodeBeingReimaged
        );
        h.wait_state("p1", &n, NodeState::Idle).await;
        assert_eq!(
            h.nodes.told_about(&key).last(),
            Some(&Told::State(key.clone(), NodeState::Idle))
        );
        h.add("p1", &n, json!({"name": "alice"})).await.unwrap();
        assert_eq!(h.revision("p1", &n), rev + 2);
        assert_eq!(h.nodes.accounts(&key), stored_accounts(&h, "p1", &n));
    })
    .await
}

#[tokio::test]
async fn a_removed_node_is_told_leaving_pool_then_removed_and_no_other_node_is() {
    deadline(async {
        let h = Harness::in_memory(config(), AckMode::AtOnce).await;
        let ids = h.pool("p1", Os::Linux, 2).await;
        let (k0, k1) = (h.key_of(&ids[0]), h.key_of(&ids[1]));
        h.add("p1", &ids[0], json!({"name": "alice"}))
            .await
            .unwrap();
        let any = |_: &Pool| Ok(());
        h.svc
            .remove_nodes(ACCOUNT, "p1", &ids[..1], &any)
            .await
            .unwrap();
        let left = h.wait_idle("p1", 1).await;
        assert_eq!(left, ids[1..]);
        assert_in_order(
            &h.nodes.told_about(&k0),
            &[
                Told::State(k0.clone(), NodeState::LeavingPool),
                Told::Remove(k0.clone()),
            ],
        );
        assert!(
            !h.nodes
                .told_about(&k1)
                .iter()
                .any(|t| matches!(t, Told::Remove(_) | Told::State(_, NodeState::LeavingPool))),
            "the other node stays"
        );
        assert_eq!(
            code(h.svc.node_users(ACCOUNT, "p1", &ids[0])),
            Code::NodeNotFound
        );
        assert_eq!(
            code(h.add("p1", &ids[0], json!({"name": "bob"})).await),
            Code::NodeNotFound
        );

        // Deleting the pool removes its last node, then the pool.
        h.svc.delete_pool(ACCOUNT, "p1", &any).await.unwrap();
        let until = Instant::now() + Duration::from_secs(10);
        while h.svc.get_pool(ACCOUNT, "p1").is_ok() {
            assert!(Instant::now() < until, "the pool was never deleted");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_in_order(
            &h.nodes.told_about(&k1),
            &[
                Told::State(k1.clone(), NodeState::LeavingPool),
                Told::Remove(k1.clone()),
            ],
        );
    })
    .await
}

#[tokio::test]
async fn the_request_timeout_bounds_the_wait_below_the_services() {
    deadline(async {
        // The service would wait 20 s; the request asks for 300 ms and gets it.
        let h = Harness::in_memory(with_timeout(Duration::from_secs(20)), AckMode::AtOnce).await;
        let n = h.pool("p1", Os::Linux, 1).await.remove(0);
        h.nodes.set_mode(AckMode::Withhold);
        let body = bluebatch_core::users::parse_add_user(br#"{"name":"carol"}"#).unwrap();
        let mut addr = at("p1", &n);
        addr.timeout = Some(Duration::from_millis(300));
        let started = Instant::now();
        let e = h
            .svc
            .add_user(addr, body, None)
            .await
            .expect_err("withheld");
        let took = started.elapsed();
        assert_eq!(e.code, Code::OperationTimedOut);
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(5),
            "answered after {took:?}: the request's timeout did not bound the wait"
        );
        // A request timeout above the service's is capped by it.
        let h2 =
            Harness::in_memory(with_timeout(Duration::from_millis(300)), AckMode::AtOnce).await;
        let n2 = h2.pool("p1", Os::Linux, 1).await.remove(0);
        h2.nodes.set_mode(AckMode::Withhold);
        let body = bluebatch_core::users::parse_add_user(br#"{"name":"dave"}"#).unwrap();
        let mut addr = at("p1", &n2);
        addr.timeout = Some(Duration::from_secs(30));
        let started = Instant::now();
        let e = h2
            .svc
            .add_user(addr, body, None)
            .await
            .expect_err("withheld");
        assert_eq!(e.code, Code::OperationTimedOut);
        assert!(started.elapsed() < Duration::from_secs(5));
    })
    .await;
}
