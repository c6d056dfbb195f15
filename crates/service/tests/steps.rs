//! Each node between states moves on after its own step: one node's pending timer does not cut
//! another node's reboot or reimage short, a node whose reimage is still at work stays
//! `reimaging` (and refuses users) until its own step has passed after that work, and pools still
//! go creating → starting → idle a step each, and carry on after a restart. Real time: the
//! store's writer is an OS thread.

mod common;

use bluebatch_core::NodeAccount;
use bluebatch_core::error::Code;
use bluebatch_core::model::{AllocationState, NodeState, Os};
use bluebatch_service::{BoxFuture, Config, NodeFabric};
use common::*;
use serde_json::json;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

const STEP: Duration = Duration::from_millis(400);

fn slow_steps() -> Config {
    Config {
        node_step: STEP,
        ..config()
    }
}

fn state_of(h: &Harness, pool: &str, node: &str) -> NodeState {
    h.svc
        .get_node(ACCOUNT, pool, node)
        .expect("Get Node")
        .node
        .state
}

/// Samples the node every 10 ms from now until it leaves `state` (at most `STEP` × 5); the time
/// it was last seen in `state`, measured from `since`.
async fn seen_in_state_until(
    h: &Harness,
    pool: &str,
    node: &str,
    state: NodeState,
    since: Instant,
) -> Duration {
    let until = Instant::now() + STEP * 5;
    let mut last = Instant::now();
    loop {
        let now = Instant::now();
        let s = state_of(h, pool, node);
        if s != state {
            assert_eq!(s, NodeState::Idle, "node {node} left {state:?} for {s:?}");
            return last - since;
        }
        last = now;
        assert!(
            Instant::now() < until,
            "node {node} still {state:?} after {:?}",
            STEP * 5
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn user(name: &str) -> serde_json::Value {
    json!({"name": name, "password": "Passw0rd!longenough"})
}

/// The reproduction: B rebooted, then A 60 % of a step later; B's timer fires while A is
/// rebooting, and A must stay `rebooting` for its whole step (and refuse users). Likewise for a
/// reimage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_nodes_timer_does_not_cut_a_reboot_or_reimage_short() {
    deadline(async {
        let h = Harness::in_memory(slow_steps(), AckMode::AtOnce).await;
        let ids = h.pool("p", Os::Linux, 2).await;
        let (a, b) = (ids[0].as_str(), ids[1].as_str());
        for (how, state, refusal) in [
            ("reboot", NodeState::Rebooting, Code::NodeBeingRebooted),
            ("reimage", NodeState::Reimaging, Code::NodeBeingReimaged),
        ] {
            let restart = |node: &str| {
                let (svc, node) = (h.svc.clone(), node.to_string());
                async move {
                    match how {
                        "reboot" => svc.reboot_node(ACCOUNT, "p", &node).await,
                        _ => svc.reimage_node(ACCOUNT, "p", &node).await,
                    }
                }
            };
            restart(b)
                .await
                .unwrap_or_else(|e| panic!("{how} B: {e:?}"));
            tokio::time::sleep(STEP * 6 / 10).await;
            let asked = Instant::now();
            restart(a)
                .await
                .unwrap_or_else(|e| panic!("{how} A: {e:?}"));
            // B's timer fires 40 % of a step into A's step: A refuses users after it.
            tokio::time::sleep(STEP * 6 / 10).await;
            assert_eq!(state_of(&h, "p", a), state, "A right after B's timer");
            let refused = h
                .add("p", a, user("during"))
                .await
                .expect_err("Add User during the node's own restart");
            assert_eq!(refused.code, refusal, "{how}");
            let last = seen_in_state_until(&h, "p", a, state, asked).await;
            assert!(
                last >= STEP * 9 / 10,
                "A ({how}) was {state:?} only {last:?} after its {how}, the step is {STEP:?}"
            );
            h.wait_idle("p", 2).await;
        }
    })
    .await;
}

/// A provider whose reimage work takes `delay` (files of a big home, say).
struct SlowReimage {
    inner: Arc<TestNodes>,
    delay: Duration,
}

impl NodeFabric for SlowReimage {
    fn start_node<'a>(
        &'a self,
        key: &'a str,
        preferred_port: Option<u16>,
    ) -> BoxFuture<'a, io::Result<SocketAddr>> {
        self.inner.start_node(key, preferred_port)
    }
    fn stop_node<'a>(&'a self, key: &'a str) -> BoxFuture<'a, ()> {
        self.inner.stop_node(key)
    }
    fn remove_node<'a>(&'a self, key: &'a str) -> BoxFuture<'a, ()> {
        self.inner.remove_node(key)
    }
    fn reimage_node<'a>(&'a self, key: &'a str) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            tokio::time::sleep(self.delay).await;
            self.inner.reimage_node(key).await
        })
    }
    fn apply(&self, key: &str, revision: u64, accounts: std::sync::Arc<[NodeAccount]>) -> u64 {
        self.inner.apply(key, revision, accounts)
    }
    fn acknowledged<'a>(&'a self, key: &'a str, revision: u64) -> BoxFuture<'a, ()> {
        self.inner.acknowledged(key, revision)
    }
    fn applied_revision(&self, key: &str) -> Option<u64> {
        self.inner.applied_revision(key)
    }
    fn accounts(&self, key: &str) -> Vec<NodeAccount> {
        self.inner.accounts(key)
    }
    fn set_state(&self, key: &str, state: NodeState) {
        self.inner.set_state(key, state)
    }
}

/// A reimage whose work outlasts a step, while another node's timer fires: the node stays
/// `reimaging` (refusing users) through the work and for a step after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_is_not_idle_while_its_own_reimage_is_still_at_work() {
    deadline(async {
        let nodes = TestNodes::new(AckMode::AtOnce);
        let fabric = Arc::new(SlowReimage {
            inner: nodes.clone(),
            delay: STEP * 3 / 2,
        });
        let h = Harness::in_memory_through(slow_steps(), nodes, fabric).await;
        let ids = h.pool("p", Os::Linux, 2).await;
        let (a, b) = (ids[0].clone(), ids[1].clone());
        h.svc.reboot_node(ACCOUNT, "p", &b).await.expect("reboot B");
        tokio::time::sleep(STEP / 5).await;
        let svc = h.svc.clone();
        let a2 = a.clone();
        let reimage = tokio::spawn(async move { svc.reimage_node(ACCOUNT, "p", &a2).await });
        let asked = Instant::now();
        while state_of(&h, "p", &a) == NodeState::Idle {
            assert!(asked.elapsed() < STEP, "the reimage did not begin");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // B's timer fires 0.8 step in; sample A until its request has answered.
        while !reimage.is_finished() {
            assert_eq!(
                state_of(&h, "p", &a),
                NodeState::Reimaging,
                "A while its reimage is at work"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let answered = Instant::now();
        reimage.await.expect("the reimage task").expect("reimage A");
        let refused = h
            .add("p", &a, user("during"))
            .await
            .expect_err("Add User right after the reimage answered");
        assert_eq!(refused.code, Code::NodeBeingReimaged);
        let last = seen_in_state_until(&h, "p", &a, NodeState::Reimaging, answered).await;
        assert!(
            last >= STEP * 9 / 10,
            "A was reimaging only {last:?} after its reimage answered, the step is {STEP:?}"
        );
        h.wait_idle("p", 2).await;
        assert!(h.stored("p", &a).is_empty(), "the reimage wiped A's users");
    })
    .await;
}

/// Allocation still takes a step per state with other nodes' timers pending: a resize while a
/// node reboots brings the new nodes creating → starting → idle, a step each, and the pool back
/// to steady.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocation_steps_still_take_a_step_each() {
    deadline(async {
        let h = Harness::in_memory(slow_steps(), AckMode::AtOnce).await;
        let ids = h.pool("p", Os::Linux, 1).await;
        h.svc
            .reboot_node(ACCOUNT, "p", &ids[0])
            .await
            .expect("reboot");
        tokio::time::sleep(STEP / 2).await;
        let resized = Instant::now();
        let resize = bluebatch_core::pools::Resize {
            target_dedicated: 2,
            target_low_priority: 0,
            resize_timeout: None,
        };
        h.svc
            .resize_pool(ACCOUNT, "p", resize, &|_| Ok(()))
            .await
            .expect("resize");
        let new = loop {
            let (nodes, _) = h
                .svc
                .list_nodes(ACCOUNT, "p", &|_| true, None, 100)
                .expect("List Nodes");
            if let Some(n) = nodes.into_iter().find(|n| n.node.id != ids[0]) {
                break n.node.id;
            }
            assert!(resized.elapsed() < STEP, "no new node");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let creating = seen_in_state_until_any(&h, &new, NodeState::Creating, resized).await;
        assert!(creating >= STEP * 9 / 10, "creating only {creating:?}");
        let started = Instant::now();
        let starting = seen_in_state_until_any(&h, &new, NodeState::Starting, started).await;
        assert!(starting >= STEP * 8 / 10, "starting only {starting:?}");
        h.wait_idle("p", 2).await;
        assert_eq!(
            h.svc
                .get_pool(ACCOUNT, "p")
                .expect("Get Pool")
                .pool
                .allocation_state,
            AllocationState::Steady
        );
    })
    .await;
}

/// Like [`seen_in_state_until`] but any next state is fine.
async fn seen_in_state_until_any(
    h: &Harness,
    node: &str,
    state: NodeState,
    since: Instant,
) -> Duration {
    let until = Instant::now() + STEP * 5;
    let mut last = Instant::now();
    loop {
        let now = Instant::now();
        if state_of(h, "p", node) != state {
            return last - since;
        }
        last = now;
        assert!(Instant::now() < until, "node {node} still {state:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// After a restart, a node stored `rebooting` still comes back `idle`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_still_moves_a_rebooting_node_on() {
    deadline(async {
        let h = Harness::on_disk(slow_steps(), AckMode::AtOnce).await;
        let ids = h.pool("p", Os::Linux, 2).await;
        h.svc
            .reboot_node(ACCOUNT, "p", &ids[0])
            .await
            .expect("reboot");
        h.svc
            .reimage_node(ACCOUNT, "p", &ids[1])
            .await
            .expect("reimage");
        let h = h.restart(AckMode::AtOnce).await;
        let back = Instant::now();
        assert_eq!(state_of(&h, "p", &ids[0]), NodeState::Rebooting);
        assert_eq!(state_of(&h, "p", &ids[1]), NodeState::Reimaging);
        h.wait_idle("p", 2).await;
        assert!(back.elapsed() >= STEP * 9 / 10, "idle before a step passed");
    })
    .await;
}

/// Remove Nodes while another node reboots: the removed node stays `leavingpool` for its step
/// (the rebooting node's timer fires meanwhile), then goes, and the pool is steady again; a
/// deleted pool still goes once its nodes have left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_node_leaves_after_its_own_step() {
    deadline(async {
        let h = Harness::in_memory(slow_steps(), AckMode::AtOnce).await;
        let ids = h.pool("p", Os::Linux, 2).await;
        let (a, b) = (ids[0].clone(), ids[1].clone());
        h.svc.reboot_node(ACCOUNT, "p", &a).await.expect("reboot A");
        tokio::time::sleep(STEP * 6 / 10).await;
        let removed = Instant::now();
        h.svc
            .remove_nodes(ACCOUNT, "p", std::slice::from_ref(&b), &|_| Ok(()))
            .await
            .expect("Remove Nodes");
        let until = removed + STEP * 5;
        let mut last = removed;
        loop {
            let now = Instant::now();
            match h.svc.get_node(ACCOUNT, "p", &b) {
                Ok(v) => assert_eq!(v.node.state, NodeState::LeavingPool),
                Err(e) => {
                    assert_eq!(e.code, Code::NodeNotFound);
                    break;
                }
            }
            last = now;
            assert!(now < until, "B never left");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let leaving = last - removed;
        assert!(
            leaving >= STEP * 9 / 10,
            "B was leavingpool only {leaving:?}, the step is {STEP:?}"
        );
        h.wait_idle("p", 1).await;
        h.svc
            .delete_pool(ACCOUNT, "p", &|_| Ok(()))
            .await
            .expect("Delete Pool");
        let until = Instant::now() + STEP * 5;
        while h.svc.get_pool(ACCOUNT, "p").is_ok() {
            assert!(Instant::now() < until, "the deleted pool never went");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// A reimage request dropped while it is at work (its client gone) still leaves the node to
/// take its step: it comes back `idle`, with no users.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reimage_dropped_midway_still_ends_idle() {
    deadline(async {
        let nodes = TestNodes::new(AckMode::AtOnce);
        let fabric = Arc::new(SlowReimage {
            inner: nodes.clone(),
            delay: STEP * 2,
        });
        let h = Harness::in_memory_through(slow_steps(), nodes, fabric).await;
        let ids = h.pool("p", Os::Linux, 2).await;
        let (a, b) = (ids[0].clone(), ids[1].clone());
        h.add("p", &a, user("gone")).await.expect("Add User");
        let svc = h.svc.clone();
        let a2 = a.clone();
        let reimage = tokio::spawn(async move { svc.reimage_node(ACCOUNT, "p", &a2).await });
        let asked = Instant::now();
        while state_of(&h, "p", &a) != NodeState::Reimaging {
            assert!(asked.elapsed() < STEP, "the reimage did not begin");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(STEP / 2).await;
        reimage.abort();
        assert!(
            reimage.await.expect_err("aborted").is_cancelled(),
            "the reimage was dropped midway"
        );
        // Another node's step comes and goes meanwhile.
        h.svc.reboot_node(ACCOUNT, "p", &b).await.expect("reboot B");
        h.wait_idle("p", 2).await;
        assert!(h.stored("p", &a).is_empty(), "the reimage wiped A's users");
    })
    .await;
}
