//! What a user write stores: the user's record alone, which carries its node's new revision;
//! the node's revision read back after a restart is the one it had.

mod common;

use bluebatch_core::model::Os;
use common::*;
use serde_json::json;

/// Add and Update User store the user's record alone (it carries the node's new revision);
/// reading the records back gives the node the revision it had, and a revision no account
/// carries (a deletion) is in the node's record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_write_stores_its_record_alone_and_the_node_revision_survives_restarts() {
    deadline(async {
        let h = Harness::on_disk(config(), AckMode::AtOnce).await;
        let ids = h.pool("p", Os::Linux, 1).await;
        let node = &ids[0];
        let base = h.revision("p", node);
        for name in ["alice", "bob"] {
            h.add("p", node, json!({"name": name, "sshPublicKey": KEY1}))
                .await
                .expect("Add User");
        }
        for key in [KEY2, KEY1] {
            h.update("p", node, "alice", json!({"sshPublicKey": key}))
                .await
                .expect("Update User");
        }
        let r = h.revision("p", node);
        assert_eq!(r, base + 4, "four user writes, four revisions");
        let records = h.records();
        let node_rec = records
            .iter()
            .find(|(k, _)| k.starts_with("node/") && k.ends_with(&format!("/{node}")))
            .map(|(_, v)| v)
            .expect("the node's record");
        assert_eq!(
            node_rec["users_revision"], base,
            "a user write does not rewrite its node's record"
        );
        let alice = records
            .iter()
            .find(|(k, _)| k.starts_with("user/") && k.ends_with("/alice"))
            .map(|(_, v)| v)
            .expect("alice's record");
        assert_eq!(alice["revision"], r, "the user record carries the revision");

        let h = h.restart(AckMode::AtOnce).await;
        assert_eq!(h.revision("p", node), r, "read back from the accounts");
        assert_eq!(
            h.nodes.handed(&format!("{ACCOUNT}.p.{node}")),
            r,
            "the node is handed the revision it had"
        );
        h.delete("p", node, "bob").await.expect("Delete User");
        assert_eq!(h.revision("p", node), r + 1);
        let h = h.restart(AckMode::AtOnce).await;
        assert_eq!(
            h.revision("p", node),
            r + 1,
            "a deletion's revision, carried by no account, is in the node's record"
        );
        h.update("p", node, "alice", json!({"sshPublicKey": KEY2}))
            .await
            .expect("Update User");
        assert_eq!(h.revision("p", node), r + 2);
        assert_eq!(h.stored("p", node).len(), 1);
    })
    .await;
}
