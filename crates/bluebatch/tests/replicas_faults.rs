//! Replicas on PostgreSQL losing things: the replica holding the `background` lease SIGKILLed in
//! the middle of a pool's allocation (another finishes it), a replica SIGKILLed under write load
//! (every acknowledged write is there afterwards), and the database restarted under load
//! (requests meanwhile answer 503 ServerBusy, never a 200 that is not durable; readiness says
//! 503 then 200 by itself; every acknowledged write is there afterwards).
//!
//! Needs `BLUEBATCH_TEST_PG` (scripts/pg.sh); the database restart uses a cluster of its own.
//! Without it each test prints a loud skip and passes, except under CI=true.

mod common;

use common::replicas::*;
use common::*;
use serde_json::json;
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(20);

/// One write of a load: which replica took it and what it answered (`None`: no answer).
#[derive(Debug, Clone)]
struct Outcome {
    id: String,
    replica: usize,
    status: Option<u16>,
    code: String,
    /// When the request was sent, from the start of the load.
    sent: Duration,
}

/// Adds pools `{prefix}{n}` (no nodes) on the replicas at `urls` in turn until `stop`; every
/// request's outcome (each at most 10 s).
async fn pool_writer(
    urls: Vec<String>,
    prefix: String,
    stop: Arc<AtomicBool>,
    t0: Instant,
) -> Vec<Outcome> {
    let clients: Vec<Client> = urls.iter().map(|u| Client::new(u, ACCOUNT, KEY)).collect();
    let mut out = Vec::new();
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let replica = n % clients.len();
        let id = format!("{prefix}{n}");
        n += 1;
        let sent = t0.elapsed();
        let r = clients[replica]
            .req("POST", "/pools")
            .json(&pool_body(&id, 0))
            .try_send_within(Duration::from_secs(10))
            .await;
        let (status, code) = match &r {
            Ok(r) => (
                Some(r.status),
                if r.status >= 400 {
                    serde_json::from_slice::<serde_json::Value>(&r.body)
                        .ok()
                        .and_then(|v| v["code"].as_str().map(str::to_string))
                        .unwrap_or_default()
                } else {
                    String::new()
                },
            ),
            Err(_) => (None, String::new()),
        };
        out.push(Outcome {
            id,
            replica,
            status,
            code,
            sent,
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    out
}

/// Every pool id of the account as `c` lists them (all pages).
async fn pool_ids(c: &Client) -> HashSet<String> {
    list_across(&[c], "/pools", 1000)
        .await
        .into_iter()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_background_holder_killed_mid_allocation_another_replica_finishes_the_pool() {
    // Slow steps, so the allocation is still going when its replica dies.
    let Some(db) = TestDb::create() else { return };
    let mut rs = Replicas::start_on(db, 1, &["--node-step-ms", "1500"]);
    // A alone takes the background lease; B started after it cannot take it while A renews.
    let first = rs.db.wait_lease("background", None, T).await;
    let b = rs.add();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        rs.db.lease_holder("background").as_deref(),
        Some(first.as_str()),
        "the lease stays with its live holder"
    );
    let dir = tempfile::tempdir().unwrap();
    let _agent = within(T, "the agent to start", async {
        SimAgent::join(
            rs.at(b),
            rs.url(b),
            &dir.path().join("agent"),
            4,
            "32500-32599",
        )
        .await
    })
    .await;

    // The pool is made on A (the lease holder), which dies in the middle of its allocation.
    let r = rs
        .at(0)
        .req("POST", "/pools")
        .json(&pool_body("alloc", 3))
        .send_within(T)
        .await;
    assert_eq!(r.status, 201, "{}", text(&r));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let p = rs.at(b).req("GET", "/pools/alloc").send_within(T).await;
    let nodes = rs
        .at(b)
        .req("GET", "/pools/alloc/nodes")
        .send_within(T)
        .await;
    let mid = p.json()["allocationState"] == "resizing"
        || nodes.json()["value"]
            .as_array()
            .is_none_or(|l| l.len() < 3 || l.iter().any(|n| n["state"] != "idle"));
    assert!(
        mid,
        "the allocation had already ended before the kill: {} {}",
        text(&p),
        text(&nodes)
    );
    let killed_at = Instant::now();
    rs.kill(0);

    // B takes the lease once A's runs out, and finishes the allocation.
    let second = rs.db.wait_lease("background", Some(&first), T).await;
    let took = killed_at.elapsed();
    assert!(
        took < Duration::from_secs(12),
        "the background lease moved after {took:?}"
    );
    eprintln!("background lease: {first} -> {second} after {took:?}");
    let ids = steady_nodes(rs.at(b), "alloc", 3, Duration::from_secs(60)).await;
    assert_eq!(ids.len(), 3);
    // The background work keeps going on B: a resize finishes too.
    let r = rs
        .at(b)
        .req("POST", "/pools/alloc/resize")
        .json(&json!({"targetDedicatedNodes": 1}))
        .send_within(T)
        .await;
    assert_eq!(r.status, 202, "{}", text(&r));
    steady_nodes(rs.at(b), "alloc", 1, Duration::from_secs(60)).await;
    // A comes back: it sees the same state and does not take the lease from B.
    rs.restart(0);
    steady_nodes(rs.at(0), "alloc", 1, T).await;
    assert_eq!(
        rs.db.lease_holder("background").as_deref(),
        Some(second.as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_under_write_load_loses_no_acknowledged_write() {
    let Some(mut rs) = Replicas::start(2) else {
        return;
    };
    let urls: Vec<String> = rs.replicas.iter().map(|r| r.url.clone()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let writers: Vec<_> = (0..3)
        .map(|w| {
            tokio::spawn(pool_writer(
                urls.clone(),
                format!("kill{w}-"),
                stop.clone(),
                t0,
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    rs.kill(0);
    let killed = t0.elapsed();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for w in writers {
        all.extend(within(T, "the writers to stop", w).await.unwrap());
    }

    let acked: Vec<&Outcome> = all.iter().filter(|o| o.status == Some(201)).collect();
    let on_a_before = acked
        .iter()
        .filter(|o| o.replica == 0 && o.sent < killed)
        .count();
    assert!(
        on_a_before >= 5,
        "too few writes acknowledged by A before its kill ({on_a_before}) for the check to mean anything"
    );
    // B answered every one of its requests 201, before and after A died.
    for o in &all {
        if o.replica == 1 {
            assert_eq!(o.status, Some(201), "{o:?}");
        } else {
            assert!(
                o.status.is_none() || o.status == Some(201),
                "A answered {o:?}"
            );
        }
    }
    let present = pool_ids(rs.at(1)).await;
    for o in &acked {
        assert!(present.contains(&o.id), "acknowledged but lost: {o:?}");
    }
    // A comes back on the same database and lists the same.
    rs.restart(0);
    let present_a = pool_ids(rs.at(0)).await;
    assert_eq!(present_a, present, "both replicas list the same pools");
    // And nothing written but not acknowledged became two pools: each id at most once.
    let ids = list_across(&[rs.at(0), rs.at(1)], "/pools", 7).await;
    assert_eq!(ids.len(), present.len(), "a pool listed twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_restarted_under_load_answers_server_busy_then_resumes_losing_nothing() {
    let Some(cluster) = PgCluster::start() else {
        return;
    };
    let db = TestDb::create_on(&cluster.url());
    let rs = Replicas::start_on(db, 2, &[]);
    for r in &rs.replicas {
        wait_ready(&r.url, 200, T).await;
    }
    let r = rs
        .at(0)
        .req("POST", "/pools")
        .json(&pool_body("before", 0))
        .send_within(T)
        .await;
    assert_eq!(r.status, 201, "{}", text(&r));

    let urls: Vec<String> = rs.replicas.iter().map(|r| r.url.clone()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let writers: Vec<_> = (0..2)
        .map(|w| {
            tokio::spawn(pool_writer(
                urls.clone(),
                format!("pg{w}-"),
                stop.clone(),
                t0,
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // The database goes away (immediate shutdown: connections cut as in a crash).
    cluster.stop();
    let down_at = t0.elapsed();
    for r in &rs.replicas {
        let ready = wait_ready(&r.url, 503, T).await;
        assert_eq!(ready.code(), "ServerBusy", "{}", text(&ready));
        // Liveness stays up.
        let h = reqwest::Client::new()
            .get(format!("{}/_bluebatch/health", r.url))
            .timeout(T)
            .send()
            .await
            .unwrap();
        assert_eq!(h.status().as_u16(), 200);
    }
    // Reads and writes meanwhile: 503 ServerBusy, never a 200 the database does not have.
    for c in &rs.clients {
        for (m, path) in [("GET", "/pools/before"), ("GET", "/pools")] {
            let r = c.req(m, path).send_within(T).await;
            assert_eq!(
                r.status,
                503,
                "{m} {path} with the database down: {}",
                text(&r)
            );
            assert_eq!(r.code(), "ServerBusy", "{}", text(&r));
        }
        let r = c
            .req("POST", "/pools")
            .json(&pool_body("during", 0))
            .send_within(T)
            .await;
        assert_eq!(r.status, 503, "{}", text(&r));
        assert_eq!(r.code(), "ServerBusy", "{}", text(&r));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    // It comes back: both replicas resume by themselves.
    cluster.start_again();
    let up_at = t0.elapsed();
    for r in &rs.replicas {
        wait_ready(&r.url, 200, Duration::from_secs(30)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for w in writers {
        all.extend(within(T, "the writers to stop", w).await.unwrap());
    }

    for o in &all {
        match o.status {
            Some(201) => {}
            Some(503) => assert_eq!(o.code, "ServerBusy", "{o:?}"),
            other => panic!("an answer other than 201 or 503 ServerBusy: {other:?} {o:?}"),
        }
    }
    let busy = all.iter().filter(|o| o.status == Some(503)).count();
    assert!(
        busy > 0,
        "no request met the outage ({down_at:?}..{up_at:?})"
    );
    let after: Vec<&Outcome> = all
        .iter()
        .filter(|o| o.sent > up_at + Duration::from_secs(1))
        .collect();
    assert!(
        after.iter().any(|o| o.status == Some(201)),
        "no write succeeded after the database came back: {after:?}"
    );
    // Every acknowledged write is there, on both replicas.
    for c in &rs.clients {
        let present = pool_ids(c).await;
        assert!(present.contains("before"));
        for o in all.iter().filter(|o| o.status == Some(201)) {
            assert!(
                present.contains(&o.id),
                "acknowledged but lost on {}: {o:?}",
                c.base
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_sigtermed_under_load_answers_what_it_took_and_its_agent_moves_on() {
    let Some(mut rs) = Replicas::start(2) else {
        return;
    };
    let urls: Vec<String> = rs.replicas.iter().map(|r| r.url.clone()).collect();
    let (proxy, via_proxy) = start_proxy(&urls);
    let _proxy = KillOnDrop(proxy);
    // The agent polls through the proxy: its long polls are open on both replicas.
    let dir = tempfile::tempdir().unwrap();
    let _agent = within(T, "the agent to start", async {
        SimAgent::join(
            rs.at(1),
            &via_proxy,
            &dir.path().join("agent"),
            2,
            "32600-32699",
        )
        .await
    })
    .await;
    let r = rs
        .at(1)
        .req("POST", "/pools")
        .json(&pool_body("drain", 2))
        .send_within(T)
        .await;
    assert_eq!(r.status, 201, "{}", text(&r));
    let nodes = steady_nodes(rs.at(1), "drain", 2, Duration::from_secs(40)).await;

    // Write load on A only, then SIGTERM A.
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let writers: Vec<_> = (0..3)
        .map(|w| {
            tokio::spawn(pool_writer(
                vec![urls[0].clone()],
                format!("term{w}-"),
                stop.clone(),
                t0,
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let term_at = t0.elapsed();
    let status = tokio::task::block_in_place(|| rs.replicas[0].terminate(Duration::from_secs(30)));
    let exited = t0.elapsed() - term_at;
    assert!(
        status.success(),
        "the replica's exit after SIGTERM: {status}"
    );
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for w in writers {
        all.extend(within(T, "the writers to stop", w).await.unwrap());
    }
    eprintln!("SIGTERM to exit: {exited:?}");

    // Every request A had before SIGTERM got an answer (201, or 503 ServerBusy handed back).
    let before: Vec<&Outcome> = all
        .iter()
        .filter(|o| o.sent + Duration::from_millis(50) < term_at)
        .collect();
    assert!(
        before.len() >= 5,
        "too little load before SIGTERM: {before:?}"
    );
    for o in &before {
        match o.status {
            Some(201) => {}
            Some(503) => assert_eq!(o.code, "ServerBusy", "{o:?}"),
            other => panic!("a request taken before SIGTERM ended with {other:?}: {o:?}"),
        }
    }
    // After it: answered as well, or no connection at all (nothing half-done).
    for o in &all {
        assert!(matches!(o.status, None | Some(201) | Some(503)), "{o:?}");
    }
    let present = pool_ids(rs.at(1)).await;
    for o in all.iter().filter(|o| o.status == Some(201)) {
        assert!(present.contains(&o.id), "acknowledged but lost: {o:?}");
    }

    // The agent's polls moved to B: a write there is applied (acknowledged means applied).
    let r = rs
        .at(1)
        .req("POST", &format!("/pools/drain/nodes/{}/users", nodes[0]))
        .json(&json!({"name": "after", "password": "after-term-pw"}))
        .send_within(Duration::from_secs(40))
        .await;
    assert_eq!(r.status, 201, "{}", text(&r));
    // And through the proxy, which now finds B only, every request is answered.
    let c = Client::new(&via_proxy, ACCOUNT, KEY);
    for _ in 0..6 {
        let r = c.req("GET", "/pools/drain").send_within(T).await;
        assert_eq!(r.status, 200, "{}", text(&r));
    }
}
