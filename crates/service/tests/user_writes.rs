//! What a node user's write costs besides its own work: it does not wake the sandboxed nodes'
//! manager (a user moves no capacity), each write is one durable commit counted in the store's
//! metrics, and each write to an embedded node records the time until the change was in force.

mod common;

use bluebatch_core::model::Os;
use bluebatch_metrics::{NodeKind, global};
use common::*;
use serde_json::json;

/// One test, so the process-wide counters move only for what it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_writes_move_no_capacity_and_are_counted_as_commits_and_applies() {
    deadline(async {
        let h = Harness::on_disk(config(), AckMode::AtOnce).await;
        let ids = h.pool("p", Os::Linux, 1).await;
        let node = &ids[0];
        let mut watch = h.svc.capacity_changed();
        watch.borrow_and_update();
        let commits = global().commit_batch.count();
        let applies = global().apply_lag(NodeKind::Embedded).count();

        h.add(
            node_pool(),
            node,
            json!({"name": "alice", "sshPublicKey": KEY1}),
        )
        .await
        .expect("Add User");
        h.update(node_pool(), node, "alice", json!({"sshPublicKey": KEY1}))
            .await
            .expect("Update User");
        h.delete(node_pool(), node, "alice")
            .await
            .expect("Delete User");

        assert!(
            !watch.has_changed().unwrap(),
            "a node user's write woke the sandboxed nodes' manager"
        );
        let committed = global().commit_batch.count() - commits;
        // Three durable writes: at least one commit, at most one each (nothing else writes).
        assert!(
            (1..=3).contains(&committed),
            "{committed} commits for three writes"
        );
        assert_eq!(
            global().apply_lag(NodeKind::Embedded).count() - applies,
            3,
            "each write's apply to its embedded node is recorded"
        );
        // The writes are durable: a restart serves the last one (alice deleted, the node's
        // revision three further on).
        let revision = h.revision("p", node);
        let h = h.restart(AckMode::AtOnce).await;
        assert!(h.stored("p", node).is_empty());
        assert_eq!(h.revision("p", node), revision);

        // A pool's change does move it.
        watch = h.svc.capacity_changed();
        watch.borrow_and_update();
        h.pool("q", Os::Linux, 1).await;
        assert!(watch.has_changed().unwrap(), "Add Pool must move it");
    })
    .await;
}

fn node_pool() -> &'static str {
    "p"
}
