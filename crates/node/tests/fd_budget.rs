//! An idle node costs one descriptor (its listening socket) and nothing else: 10,000 nodes must
//! fit in a 20,000-descriptor limit. Its own test binary, so no other test's sockets and pipes
//! are counted.

mod support;

use support::Fixture;

const NODES: usize = 500;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_nodes_cost_one_descriptor_each() {
    let f = Fixture::new();
    // The first start sets up what is shared (sweeper, session account lookup).
    f.start("warmup").await;
    let before = open_fds();
    for i in 0..NODES {
        f.start(&format!("acct.pool1.tvm-{i:05}")).await;
    }
    let during = open_fds();
    assert!(
        during <= before + NODES + 16,
        "{NODES} idle nodes opened {} descriptors",
        during - before
    );
    f.nodes.shutdown().await;
    let after = open_fds();
    assert!(
        after <= before,
        "descriptors left after shutdown: {after} > {before}"
    );
}
