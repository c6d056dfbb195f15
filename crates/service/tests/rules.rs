//! The node-user rules of the service, through its public interface: a test node provider (which
//! records what it is told), a real SQLite store and the service's own clock. No binary, no HTTP.

mod common;

use bluebatch_core::Clock;
use bluebatch_core::error::Code;
use bluebatch_core::model::{NodeState, Os};
use bluebatch_service::NodeFabric;
use common::*;
use serde_json::json;
use time::macros::datetime;
use time::{Duration, OffsetDateTime, Time};

/// 00:00 UTC of the day after the one holding `t`: where Linux day precision ends an account.
fn next_midnight(t: OffsetDateTime) -> OffsetDateTime {
    t.replace_time(Time::MIDNIGHT) + Duration::days(1)
}

#[tokio::test]
async fn update_user_replaces_every_updatable_property_and_keeps_is_admin() {
    deadline(async {
        let h = Harness::in_memory(config(), AckMode::AtOnce).await;
        let n = h.pool("p1", Os::Linux, 1).await.remove(0);
        let key = h.key_of(&n);
        let added = h
            .add(
                "p1",
                &n,
                json!({"name": "alice", "isAdmin": true, "password": "first",
                       "sshPublicKey": KEY1, "expiryTime": "2031-05-06T07:08:09Z"}),
            )
            .await
            .unwrap();
        let u = &h.stored("p1", &n)["alice"];
        assert!(u.is_admin);
        assert!(bluebatch_core::crypt::verify_password(
            "first",
            u.password_hash.as_deref().unwrap()
        ));
        assert_eq!(u.ssh_public_key.as_deref(), Some(KEY1));
        assert_eq!(u.expiry_time, datetime!(2031-05-06 07:08:09 UTC));

        // Only a key: the password and the expiry are replaced too (removed, now + 1 day).
        let before = h.clock.now();
        let w = h
            .update("p1", &n, "alice", json!({"sshPublicKey": KEY2}))
            .await
            .unwrap();
        let after = h.clock.now();
        assert_ne!(w.etag, added.etag, "an update takes a new ETag");
        let u = h.stored("p1", &n)["alice"].clone();
        assert!(u.is_admin, "isAdmin is not updatable and keeps its value");
        assert_eq!(u.password_hash, None, "an omitted password is removed");
        assert_eq!(u.ssh_public_key.as_deref(), Some(KEY2));
        assert!(
            u.expiry_time >= before + Duration::days(1)
                && u.expiry_time <= after + Duration::days(1),
            "an omitted expiry is now + 1 day: {} not in [{before}, {after}] + 1 day",
            u.expiry_time
        );
        // The node is told the replaced account, not a merge.
        let told = h.nodes.told_about(&key);
        let Some(Told::Apply(_, rev, all)) = told.last() else {
            panic!("the update was not handed to the node: {told:?}");
        };
        assert_eq!(*rev, h.revision("p1", &n));
        assert_eq!(*all, vec![u.to_account()]);
        assert_eq!(h.nodes.accounts(&key), vec![u.to_account()]);

        // Only a password: the key goes.
        h.update("p1", &n, "alice", json!({"password": "second"}))
            .await
            .unwrap();
        let u = h.stored("p1", &n)["alice"].clone();
        assert!(bluebatch_core::crypt::verify_password(
            "second",
            u.password_hash.as_deref().unwrap()
        ));
        assert_eq!(u.ssh_public_key, None, "an omitted key is removed");
        assert!(u.is_admin);

        // `{}`: no password, no key, expiry now + 1 day; still an admin.
        h.update("p1", &n, "alice", json!({})).await.unwrap();
        let u = h.stored("p1", &n)["alice"].clone();
        assert_eq!(
            (u.password_hash.as_deref(), u.ssh_public_key.as_deref()),
            (None, None)
        );
        assert!(u.is_admin);
        assert_eq!(h.nodes.accounts(&key), vec![u.to_account()]);
        assert_eq!(
            u.revision,
            h.revision("p1", &n),
            "the user carries its node revision"
        );
    })
    .await
}

#[tokio::test]
async fn omitted_expiry_is_a_day_later_and_linux_keeps_days_windows_the_instant() {
    deadline(async {
        let h = Harness::in_memory(config(), AckMode::AtOnce).await;
        let lin = h.pool("lin", Os::Linux, 1).await.remove(0);
        let win = h.pool("win", Os::Windows, 1).await.remove(0);

        for (pool, node, os) in [("lin", &lin, Os::Linux), ("win", &win, Os::Windows)] {
            let before = h.clock.now();
            h.add(pool, node, json!({"name": "d", "password": "pw"}))
                .await
                .unwrap();
            let after = h.clock.now();
            let u = h.stored(pool, node)["d"].clone();
            assert!(
                u.expiry_time >= before + Duration::days(1)
                    && u.expiry_time <= after + Duration::days(1),
                "{os:?}: default expiry {}",
                u.expiry_time
            );
            let refused = match os {
                Os::Linux => next_midnight(u.expiry_time),
                Os::Windows => u.expiry_time,
            };
            assert_eq!(u.login_refused_from, refused, "{os:?}");

            h.add(
                pool,
                node,
                json!({"name": "e", "password": "pw", "expiryTime": "2031-05-06T07:08:09Z"}),
            )
            .await
            .unwrap();
            let u = h.stored(pool, node)["e"].clone();
            assert_eq!(
                u.expiry_time,
                datetime!(2031-05-06 07:08:09 UTC),
                "kept as asked"
            );
            let refused = match os {
                Os::Linux => datetime!(2031-05-07 00:00:00 UTC),
                Os::Windows => datetime!(2031-05-06 07:08:09 UTC),
            };
            assert_eq!(u.login_refused_from, refused, "{os:?}");
        }
        // The Linux node enforces exactly what is stored.
        let key = h.key_of(&lin);
        let stored: Vec<_> = h
            .stored("lin", &lin)
            .values()
            .map(|u| u.to_account())
            .collect();
        assert_eq!(h.nodes.accounts(&key), stored);
    })
    .await
}

#[tokio::test]
async fn not_found_comes_in_the_order_pool_node_user_and_before_every_other_rule() {
    deadline(async {
        let h = Harness::in_memory(config(), AckMode::AtOnce).await;
        let n = h.pool("p1", Os::Linux, 1).await.remove(0);
        let w = h.pool("w1", Os::Windows, 1).await.remove(0);
        h.add("p1", &n, json!({"name": "alice"})).await.unwrap();
        let body = json!({"name": "bob", "password": "pw"});

        // A missing pool hides a missing node; a missing node hides a missing user.
        assert_eq!(
            code(h.add("nopool", "nonode", body.clone()).await),
            Code::PoolNotFound
        );
        assert_eq!(
            code(h.add("nopool", &n, body.clone()).await),
            Code::PoolNotFound
        );
        assert_eq!(
            code(h.update("nopool", "nonode", "x", json!({})).await),
            Code::PoolNotFound
        );
        assert_eq!(
            code(h.delete("nopool", "nonode", "x").await),
            Code::PoolNotFound
        );
        assert_eq!(
            code(h.add("p1", "nonode", body.clone()).await),
            Code::NodeNotFound
        );
        assert_eq!(
            code(h.update("p1", "nonode", "x", json!({})).await),
            Code::NodeNotFound
        );
        assert_eq!(
            code(h.delete("p1", "nonode", "x").await),
            Code::NodeNotFound
        );
        assert_eq!(
            code(h.update("p1", &n, "x", json!({})).await),
            Code::NodeUserNotFound
        );
        assert_eq!(code(h.delete("p1", &n, "x").await), Code::NodeUserNotFound);
        // A node of another pool is not found through this one.
        assert_eq!(
            code(h.add("p1", &w, body.clone()).await),
            Code::NodeNotFound
        );
        // Linux names are case-sensitive.
        assert_eq!(
            code(h.delete("p1", &n, "Alice").await),
            Code::NodeUserNotFound
        );
        // Pool ids are not.
        h.update("P1", &n, "alice", json!({})).await.unwrap();

        // The user lookup comes before the OS rules and the state.
        assert_eq!(
            code(h.update("w1", &w, "x", json!({"sshPublicKey": KEY1})).await),
            Code::NodeUserNotFound
        );
        h.svc
            .set_node_state(ACCOUNT, "p1", &n, NodeState::Rebooting)
            .await
            .unwrap();
        assert_eq!(
            code(h.update("p1", &n, "x", json!({})).await),
            Code::NodeUserNotFound
        );
        assert_eq!(code(h.delete("p1", &n, "x").await), Code::NodeUserNotFound);
        // Wrong pool and a missing pool of another account.
        let other = bluebatch_service::UserAddr {
            account: "other",
            pool: "p1",
            node: &n,
            timeout: None,
        };
        let b = bluebatch_core::users::parse_add_user(br#"{"name":"z"}"#).unwrap();
        assert_eq!(
            code(h.svc.add_user(other, b, None).await),
            Code::PoolNotFound,
            "pools are per account"
        );
    })
    .await
}

#[tokio::test]
async fn each_node_state_answers_its_409_and_changes_nothing() {
    deadline(async {
        let h = Harness::in_memory(config(), AckMode::AtOnce).await;
        let n = h.pool("p1", Os::Linux, 1).await.remove(0);
        let key = h.key_of(&n);
        h.add("p1", &n, json!({"name": "alice", "password": "pw"}))
            .await
            .unwrap();
        let expected = |s: NodeState| match s {
            NodeState::Idle | NodeState::Running => None,
            NodeState::Creating => Some(Code::NodeBeingCreated),
            NodeState::Starting | NodeState::WaitingForStartTask => Some(Code::NodeBeingStarted),
            NodeState::Rebooting => Some(Code::NodeBeingRebooted),
            NodeState::Reimaging => Some(Code::NodeBeingReimaged),
            NodeState::Unusable => Some(Code::NodeStateUnusable),
            NodeState::Offline
            | NodeState::StartTaskFailed
            | NodeState::Unknown
            | NodeState::LeavingPool
            | NodeState::Preempted => Some(Code::OperationInvalidForCurrentState),
        };
        for state in NodeState::ALL {
            h.svc
                .set_node_state(ACCOUNT, "p1", &n, state)
                .await
                .unwrap();
            assert_eq!(
                h.nodes.told_about(&key).last(),
                Some(&Told::State(key.clone(), state)),
                "the node is told its state"
            );
            let Some(want) = expected(state) else {
                continue;
            };
            let (rev, stored) = (h.revision("p1", &n), h.stored("p1", &n));
            let applies = |h: &Harness| {
                h.nodes
                    .told_about(&key)
                    .iter()
                    .filter(|t| matches!(t, Told::Apply(..)))
                    .count()
            };
            let handed = applies(&h);
            for (what, r) in [
                (
                    "add",
                    h.add("p1", &n, json!({"name": "bob"})).await.map(|_| ()),
                ),
                (
                    "update",
                    h.update("p1", &n, "alice", json!({})).await.map(|_| ()),
                ),
                ("delete", h.delete("p1", &n, "alice").await),
            ] {
                let e = r.expect_err(&format!("{what} in {state:?}"));
                assert_eq!(e.code, want, "{what} in {state:?}");
                assert!(
                    e.values
                        .contains(&("NodeState".to_string(), state.as_str().to_string())),
                    "{what} in {state:?} names the state: {:?}",
                    e.values
                );
            }
            assert_eq!(h.revision("p1", &n), rev, "{state:?}: no revision taken");
            assert_eq!(h.stored("p1", &n), stored, "{state:?}: nothing stored");
            assert_eq!(applies(&h), handed, "{state:?}: nothing handed to the node");
        }
        // Idle and running take user changes.
        h.svc
            .set_node_state(ACCOUNT, "p1", &n, NodeState::Running)
            .await
            .unwrap();
        h.add("p1", &n, json!({"name": "bob"})).await.unwrap();
        h.update("p1", &n, "alice", json!({})).await.unwrap();
        h.delete("p1", &n, "bob").await.unwrap();
    })
    .await
}

#[tokio::test]
async fn an_existing_name_is_node_user_exists_after_the_state_check() {
    deadline(async {
        let h = Harness::in_memory(config(), AckMode::AtOnce).await;
        let n = h.pool("p1", Os::Linux, 1).await.remove(0);
        let w = h.pool("w1", Os::Windows, 1).await.remove(0);
        h.add("p1", &n, json!({"name": "alice"})).await.unwrap();
        let first = h.stored("p1", &n)["alice"].clone();
        let e = h
            .add("p1", &n, json!({"name": "alice", "password": "x"}))
            .await;
        assert_eq!(code(e), Code::NodeUserExists);
        assert_eq!(
            h.stored("p1", &n)["alice"],
            first,
            "the existing user is untouched"
        );
        // Linux names are case-sensitive: Alice is another user.
        h.add("p1", &n, json!({"name": "Alice"})).await.unwrap();
        assert_eq!(h.stored("p1", &n).len(), 2);
        // Windows names are not; an update keeps the name as created.
        h.add("w1", &w, json!({"name": "Bob", "password": "pw"}))
            .await
            .unwrap();
        assert_eq!(
            code(
                h.add("w1", &w, json!({"name": "BOB", "password": "pw"}))
                    .await
            ),
            Code::NodeUserExists
        );
        let up = h
            .update("w1", &w, "bob", json!({"password": "pw2"}))
            .await
            .unwrap();
        assert_eq!(up.user_name, "Bob");
        assert_eq!(h.stored("w1", &w).keys().collect::<Vec<_>>(), ["Bob"]);
        h.delete("w1", &w, "BOB").await.unwrap();
        assert!(h.stored("w1", &w).is_empty());
        // The state comes first.
        h.svc
            .set_node_state(ACCOUNT, "p1", &n, NodeState::Rebooting)
            .await
            .unwrap();
        assert_eq!(
            code(h.add("p1", &n, json!({"name": "alice"})).await),
            Code::NodeBeingRebooted
        );
    })
    .await
}

#[tokio::test]
async fn windows_needs_a_password_refuses_a_key_and_is_never_handed_to_the_provider() {
    deadline(async {
        // Withholding: a change handed to the provider would time out; Windows nodes have no
        // endpoint, so their writes answer at once.
        let h = Harness::in_memory(config(), AckMode::Withhold).await;
        let w = h.pool("w1", Os::Windows, 1).await.remove(0);
        let e = h.add("w1", &w, json!({"name": "u"})).await.unwrap_err();
        assert_eq!(e.code, Code::MissingRequiredProperty);
        assert!(
            e.values
                .contains(&("PropertyName".into(), "password".into()))
        );
        let e = h
            .add(
                "w1",
                &w,
                json!({"name": "u", "password": "pw", "sshPublicKey": KEY1}),
            )
            .await
            .unwrap_err();
        assert_eq!(e.code, Code::InvalidPropertyValue);
        assert!(
            e.values
                .contains(&("PropertyName".into(), "sshPublicKey".into()))
        );
        // The key is refused before a missing password is.
        let e = h
            .add("w1", &w, json!({"name": "u", "sshPublicKey": KEY1}))
            .await
            .unwrap_err();
        assert_eq!(e.code, Code::InvalidPropertyValue);
        assert!(h.stored("w1", &w).is_empty());

        let started = tokio::time::Instant::now();
        h.add("w1", &w, json!({"name": "u", "password": "pw"}))
            .await
            .unwrap();
        // Update replaces everything, so the password is required again.
        assert_eq!(
            code(h.update("w1", &w, "u", json!({})).await),
            Code::MissingRequiredProperty
        );
        assert_eq!(
            code(
                h.update(
                    "w1",
                    &w,
                    "u",
                    json!({"password": "p", "sshPublicKey": KEY1})
                )
                .await
            ),
            Code::InvalidPropertyValue
        );
        h.update("w1", &w, "u", json!({"password": "pw2"}))
            .await
            .unwrap();
        h.delete("w1", &w, "u").await.unwrap();
        assert!(
            started.elapsed() < h.config().ack_timeout,
            "Windows writes wait for no acknowledgement"
        );
        // The OS rules come before the state.
        h.svc
            .set_node_state(ACCOUNT, "w1", &w, NodeState::Creating)
            .await
            .unwrap();
        assert_eq!(
            code(h.add("w1", &w, json!({"name": "u"})).await),
            Code::MissingRequiredProperty
        );
        assert!(
            h.nodes.told().iter().all(|t| !t.key().ends_with(&w)),
            "a Windows node is never told anything: {:?}",
            h.nodes.told()
        );
    })
    .await
}

#[tokio::test]
async fn a_node_holds_at_most_1000_users() {
    deadline(async {
        let h = Harness::in_memory(config(), AckMode::AtOnce).await;
        let ids = h.pool("p1", Os::Linux, 2).await;
        assert_eq!(h.config().max_users_per_node, 1_000);
        for i in 0..1_000 {
            h.add("p1", &ids[0], json!({"name": format!("u{i}")}))
                .await
                .unwrap_or_else(|e| panic!("user {i}: {e:?}"));
        }
        let e = h
            .add("p1", &ids[0], json!({"name": "u1000"}))
            .await
            .unwrap_err();
        assert_eq!(e.code, Code::OperationNotValidOnNode);
        assert!(e.message.as_deref().unwrap_or("").contains("1000"), "{e:?}");
        assert_eq!(h.stored("p1", &ids[0]).len(), 1_000);
        assert_eq!(h.nodes.accounts(&h.key_of(&ids[0])).len(), 1_000);
        // An existing name is still NodeUserExists; updates still work at the limit.
        assert_eq!(
            code(h.add("p1", &ids[0], json!({"name": "u7"})).await),
            Code::NodeUserExists
        );
        h.update("p1", &ids[0], "u7", json!({"password": "pw"}))
            .await
            .unwrap();
        // The limit is per node.
        h.add("p1", &ids[1], json!({"name": "u1000"}))
            .await
            .unwrap();
        // A delete makes room for one.
        h.delete("p1", &ids[0], "u0").await.unwrap();
        h.add("p1", &ids[0], json!({"name": "u1000"}))
            .await
            .unwrap();
        assert_eq!(
            code(h.add("p1", &ids[0], json!({"name": "u1001"})).await),
            Code::OperationNotValidOnNode
        );
    })
    .await
}

#[tokio::test]
async fn the_service_clock_moves_expiry_decisions_and_survives_a_restart() {
    deadline(async {
        let h = Harness::on_disk(config(), AckMode::AtOnce).await;
        let n = h.pool("p1", Os::Linux, 1).await.remove(0);
        let wall = OffsetDateTime::now_utc();
        let offset = h.svc.advance_clock(Duration::days(10)).await.unwrap();
        assert_eq!(offset, Duration::days(10));
        h.add("p1", &n, json!({"name": "alice", "password": "pw"}))
            .await
            .unwrap();
        let u = h.stored("p1", &n)["alice"].clone();
        let d = u.expiry_time - (wall + Duration::days(11));
        assert!(
            d >= Duration::ZERO && d < Duration::minutes(5),
            "the default expiry is the service clock's now + 1 day: {} (wall {wall})",
            u.expiry_time
        );
        assert_eq!(u.login_refused_from, next_midnight(u.expiry_time));
        assert!(
            u.last_modified - wall >= Duration::days(10),
            "lastModified is service time"
        );
        let key = h.key_of(&n);
        assert_eq!(h.nodes.accounts(&key), vec![u.to_account()]);

        // The offset is stored: after a restart the clock and its expiry decisions stay moved.
        let h = h.restart(AckMode::AtOnce).await;
        assert_eq!(h.clock.offset(), Duration::days(10));
        h.update("p1", &n, "alice", json!({})).await.unwrap();
        let u = h.stored("p1", &n)["alice"].clone();
        assert!(
            u.expiry_time - wall >= Duration::days(11),
            "{}",
            u.expiry_time
        );
        // Reset puts it back to the wall clock.
        h.svc.reset_clock().await.unwrap();
        h.update("p1", &n, "alice", json!({})).await.unwrap();
        let u = h.stored("p1", &n)["alice"].clone();
        assert!(
            u.expiry_time - wall < Duration::days(2),
            "{}",
            u.expiry_time
        );
    })
    .await
}
