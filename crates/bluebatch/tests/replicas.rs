//! Two `bluebatch serve --store postgres://…` replicas on one database behave as one service,
//! request by request: a write acknowledged by one is read on the other at once, ETags and
//! `If-Match` hold across them, two concurrent Add User of one name on two replicas end in one
//! 201 and one 409, concurrent Update User ends in exactly one request's state (checked over the
//! real OpenSSH client), an `odata.nextLink` of one continues on the other, and a write on one
//! answers only once the agent polling the other applied it. `--store` without `--nodes agents`
//! is refused, and so is a pool asking for embedded nodes.
//!
//! Needs `BLUEBATCH_TEST_PG` (a PostgreSQL 15 cluster: scripts/pg.sh); without it each test
//! prints a loud skip and passes, except under CI=true.

mod common;

use common::replicas::*;
use common::*;
use serde_json::json;
use std::collections::HashSet;
use std::time::Duration;

/// The deadline of each request.
const T: Duration = Duration::from_secs(20);

fn etag(r: &Resp) -> String {
    r.header("etag")
        .unwrap_or_else(|| panic!("no ETag: {:?}", r.headers))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_on_one_replica_is_read_on_the_other_and_etags_hold_across_them() {
    let Some(rs) = Replicas::start(2) else { return };
    let (a, b) = (rs.at(0), rs.at(1));
    for r in &rs.replicas {
        let line = r
            .banner_line("store: ")
            .expect("a store: line in the banner");
        assert!(line.starts_with("store: postgres://"), "{line}");
        assert!(line.contains(&rs.db.name), "{line}");
        let ready = wait_ready(&r.url, 200, T).await;
        assert_eq!(ready.json()["status"], "ready", "{}", text(&ready));
    }
    // A token made on A, the agent joined to B: the token is in the database.
    let (_dir, _agent) = rs.agent(0, 1, 4, "32100-32199").await;

    for round in 0..5 {
        let id = format!("ryw{round}");
        let (w, r) = if round % 2 == 0 { (a, b) } else { (b, a) };
        let resp = w
            .req("POST", "/pools")
            .json(&pool_body(&id, 0))
            .send_within(T)
            .await;
        assert_eq!(resp.status, 201, "{}", text(&resp));
        // Read at once on the other replica: there, and in its list.
        let got = r.req("GET", &format!("/pools/{id}")).send_within(T).await;
        assert_eq!(got.status, 200, "{id} on the other replica: {}", text(&got));
        assert_eq!(got.json()["id"], id.as_str());
        let ids = list_across(&[r], "/pools", 100).await;
        assert!(
            ids.contains(&id),
            "{id} listed on the other replica: {ids:?}"
        );
        // And deleted on the reader, gone on the writer at once.
        let del = r
            .req("DELETE", &format!("/pools/{id}"))
            .send_within(T)
            .await;
        assert_eq!(del.status, 202, "{}", text(&del));
        let after = w.req("GET", &format!("/pools/{id}")).send_within(T).await;
        assert!(
            after.status == 404 || after.json()["state"] == "deleting",
            "{id} after its delete on the other replica: {} {}",
            after.status,
            text(&after)
        );
    }

    // A pool of agent nodes made on A reaches steady on both.
    let resp = a
        .req("POST", "/pools")
        .json(&pool_body("p", 2))
        .send_within(T)
        .await;
    assert_eq!(resp.status, 201, "{}", text(&resp));
    let nodes_b = steady_nodes(b, "p", 2, Duration::from_secs(40)).await;
    let nodes_a = steady_nodes(a, "p", 2, T).await;
    assert_eq!(
        nodes_a.iter().collect::<HashSet<_>>(),
        nodes_b.iter().collect::<HashSet<_>>()
    );

    // ETags: one pool, the same ETag from both replicas.
    let ga = a.req("GET", "/pools/p").send_within(T).await;
    let gb = b.req("GET", "/pools/p").send_within(T).await;
    assert_eq!((ga.status, gb.status), (200, 200));
    let e1 = etag(&ga);
    assert_eq!(etag(&gb), e1, "one pool, one ETag on every replica");
    // If-None-Match with A's ETag on B: not modified.
    let nm = b
        .req("GET", "/pools/p")
        .header("if-none-match", &e1)
        .send_within(T)
        .await;
    assert_eq!(nm.status, 304, "{}", text(&nm));
    // A's ETag honoured by If-Match on B (Resize Pool: a conditional write).
    let rb = b
        .req("POST", "/pools/p/resize")
        .header("if-match", &e1)
        .json(&json!({"targetDedicatedNodes": 3}))
        .send_within(T)
        .await;
    assert_eq!(rb.status, 202, "{}", text(&rb));
    steady_nodes(a, "p", 3, Duration::from_secs(40)).await;
    let ga = a.req("GET", "/pools/p").send_within(T).await;
    assert_eq!(ga.json()["targetDedicatedNodes"], 3, "A sees B's write");
    let e2 = etag(&ga);
    assert_ne!(e2, e1);
    assert_eq!(ga.json()["eTag"].as_str(), Some(e2.trim_matches('"')));
    // The stale ETag now fails on A and on B: 412 ConditionNotMet, nothing changed.
    for c in [a, b] {
        let stale = c
            .req("POST", "/pools/p/resize")
            .header("if-match", &e1)
            .json(&json!({"targetDedicatedNodes": 1}))
            .send_within(T)
            .await;
        assert_eq!(stale.status, 412, "{}", text(&stale));
        assert_eq!(stale.code(), "ConditionNotMet", "{}", text(&stale));
    }
    let gb = b.req("GET", "/pools/p").send_within(T).await;
    assert_eq!(gb.json()["targetDedicatedNodes"], 3, "{}", text(&gb));
    assert_eq!(etag(&gb), e2);
    // The current ETag, read on A, holds on A; B sees that write too.
    let ra = a
        .req("POST", "/pools/p/resize")
        .header("if-match", &e2)
        .json(&json!({"targetDedicatedNodes": 2}))
        .send_within(T)
        .await;
    assert_eq!(ra.status, 202, "{}", text(&ra));
    steady_nodes(b, "p", 2, Duration::from_secs(40)).await;
    // Delete Pool with a stale ETag: 412 on either replica; the pool stays.
    let d = b
        .req("DELETE", "/pools/p")
        .header("if-match", &e2)
        .send_within(T)
        .await;
    assert_eq!(d.status, 412, "{}", text(&d));
    assert_eq!(d.code(), "ConditionNotMet");
    let g = a.req("GET", "/pools/p").send_within(T).await;
    assert_eq!(g.status, 200, "{}", text(&g));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_user_writes_on_two_replicas_end_in_one_requests_state() {
    require_ssh();
    let Some(rs) = Replicas::start(2) else { return };
    let (a, b) = (rs.at(0), rs.at(1));
    let (_dir, _agent) = rs.agent(1, 0, 1, "32200-32299").await;
    add_pool(a, "race", 1).await;
    let node = steady_nodes(b, "race", 1, Duration::from_secs(40)).await[0].clone();
    let users = format!("/pools/race/nodes/{node}/users");

    // Add User of one name on both at once: one 201, one 409 NodeUserExists, every round.
    for round in 0..12 {
        let name = format!("u{round}");
        let body = json!({"name": name, "password": format!("pw-{round}"), "isAdmin": false});
        let (ra, rb) = tokio::join!(
            a.req("POST", &users).json(&body).send_within(T),
            b.req("POST", &users).json(&body).send_within(T),
        );
        let mut st = [ra.status, rb.status];
        st.sort();
        assert_eq!(
            st,
            [201, 409],
            "round {round}: {} / {}",
            text(&ra),
            text(&rb)
        );
        let loser = if ra.status == 409 { &ra } else { &rb };
        assert_eq!(loser.code(), "NodeUserExists", "{}", text(loser));
    }

    // Update User of one user on both at once: both answer 200 and exactly one request's
    // password logs in afterwards (the real OpenSSH client), from either replica's view.
    let port = a.ssh_port("race", &node).await;
    assert_eq!(b.ssh_port("race", &node).await, port);
    let path = Client::user_path("race", &node, "u0");
    let mut n = 0;
    for round in 0..4 {
        let (pa, pb) = (format!("a-{round}-pw"), format!("b-{round}-pw"));
        let (ra, rb) = tokio::join!(
            a.req("PUT", &path)
                .json(&json!({"password": pa}))
                .send_within(T),
            b.req("PUT", &path)
                .json(&json!({"password": pb}))
                .send_within(T),
        );
        assert_eq!(
            (ra.status, rb.status),
            (200, 200),
            "{} / {}",
            text(&ra),
            text(&rb)
        );
        n += 1;
        let la = ssh_password_login(port, "u0", &pa, &loopback_source(n)).await;
        n += 1;
        let lb = ssh_password_login(port, "u0", &pb, &loopback_source(n)).await;
        assert!(
            la ^ lb,
            "round {round}: exactly one password logs in (A's: {la}, B's: {lb})"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_next_link_of_one_replica_continues_on_the_other() {
    let Some(rs) = Replicas::start(2) else { return };
    let (a, b) = (rs.at(0), rs.at(1));
    let (_dir, _agent) = rs.agent(0, 1, 5, "32300-32399").await;
    let mut want = HashSet::new();
    for i in 0..7 {
        let id = format!("page{i}");
        let r = rs
            .req("POST", "/pools")
            .json(&pool_body(&id, 0))
            .send_within(T)
            .await;
        assert_eq!(r.status, 201, "{}", text(&r));
        want.insert(id);
    }
    for (order, page) in [(vec![a, b], 2), (vec![b, a], 3), (vec![a, b, b], 1)] {
        let ids = list_across(&order, "/pools", page).await;
        let got: HashSet<String> = ids.iter().cloned().collect();
        assert_eq!(got.len(), ids.len(), "a pool listed twice: {ids:?}");
        assert_eq!(got, want, "every pool once, page {page}");
    }

    add_pool(b, "nodes", 5).await;
    let nodes: HashSet<String> = steady_nodes(a, "nodes", 5, Duration::from_secs(40))
        .await
        .into_iter()
        .collect();
    want.insert("nodes".into());
    for (order, page) in [(vec![a, b], 1), (vec![b, a], 2)] {
        let ids = list_across(&order, "/pools/nodes/nodes", page).await;
        let got: HashSet<String> = ids.iter().cloned().collect();
        assert_eq!(got.len(), ids.len(), "a node listed twice: {ids:?}");
        assert_eq!(got, nodes, "every node once, page {page}");
    }
    // With $filter too: the filter travels in the link.
    let mut query = format!("api-version={V}&maxresults=1&$filter=state%20eq%20'idle'");
    let mut seen = Vec::new();
    for n in 0..20 {
        let c = if n % 2 == 0 { a } else { b };
        let r = c
            .req("GET", "/pools/nodes/nodes")
            .query(&query)
            .send_within(T)
            .await;
        assert_eq!(r.status, 200, "{}", text(&r));
        let v = r.json();
        seen.extend(
            v["value"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x["id"].as_str().unwrap().to_string()),
        );
        match v["odata.nextLink"].as_str() {
            None => break,
            Some(next) => query = next.split_once('?').unwrap().1.to_string(),
        }
    }
    assert_eq!(seen.iter().cloned().collect::<HashSet<_>>(), nodes);
    assert_eq!(seen.len(), nodes.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_on_one_replica_answers_once_the_agent_polling_the_other_applied_it() {
    require_ssh();
    let Some(rs) = Replicas::start(2) else { return };
    let (a, b) = (rs.at(0), rs.at(1));
    // The agent polls B only; every write goes to A.
    let (_dir, _agent) = rs.agent(0, 1, 2, "32400-32499").await;
    add_pool(a, "ack", 2).await;
    let nodes = steady_nodes(a, "ack", 2, Duration::from_secs(40)).await;
    let mut n = 0;
    for (i, node) in nodes.iter().enumerate() {
        let port = a.ssh_port("ack", node).await;
        let users = format!("/pools/ack/nodes/{node}/users");
        let name = format!("ack{i}");
        let r = a
            .req("POST", &users)
            .json(&json!({"name": name, "password": "first-pw-1"}))
            .send_within(T)
            .await;
        assert_eq!(r.status, 201, "{}", text(&r));
        // Acknowledged means applied: the login works at once, no retry.
        n += 1;
        assert!(
            ssh_password_login(port, &name, "first-pw-1", &loopback_source(n)).await,
            "Add User answered 201 on A before the agent (polling B) applied it"
        );
        let path = Client::user_path("ack", node, &name);
        for round in 0..3 {
            let pw = format!("next-pw-{round}");
            let r = a
                .req("PUT", &path)
                .json(&json!({"password": pw}))
                .send_within(T)
                .await;
            assert_eq!(r.status, 200, "{}", text(&r));
            n += 1;
            assert!(
                ssh_password_login(port, &name, &pw, &loopback_source(n)).await,
                "Update User answered 200 on A before the agent applied it"
            );
        }
        n += 1;
        assert!(
            !ssh_password_login(port, &name, "first-pw-1", &loopback_source(n)).await,
            "the replaced password still logs in"
        );
        let r = a.req("DELETE", &path).send_within(T).await;
        assert_eq!(r.status, 200, "{}", text(&r));
        n += 1;
        assert!(
            !ssh_password_login(port, &name, "next-pw-2", &loopback_source(n)).await,
            "Delete User answered 200 on A before the agent removed the account"
        );
    }
    // And the other way round: a write on B for the agent of B, read on A.
    let r = b
        .req("POST", &format!("/pools/ack/nodes/{}/users", nodes[0]))
        .json(&json!({"name": "viab", "password": "via-b-pw"}))
        .send_within(T)
        .await;
    assert_eq!(r.status, 201, "{}", text(&r));
    let port = a.ssh_port("ack", &nodes[0]).await;
    n += 1;
    assert!(ssh_password_login(port, "viab", "via-b-pw", &loopback_source(n)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_store_takes_agent_nodes_only_and_a_database_down_is_a_clear_error() {
    let Some(db) = TestDb::create() else { return };
    // Without --nodes agents (the default is embedded), or with embedded or sandbox nodes: a
    // failure exit naming --nodes agents; the same with BLUEBATCH_STORE.
    for (args, env) in [
        (vec!["--store", db.url.as_str()], vec![]),
        (
            vec!["--store", db.url.as_str(), "--nodes", "embedded"],
            vec![],
        ),
        (
            vec!["--store", db.url.as_str(), "--nodes", "sandbox"],
            vec![],
        ),
        (vec![], vec![("BLUEBATCH_STORE", db.url.as_str())]),
        (
            vec!["--nodes", "embedded"],
            vec![("BLUEBATCH_STORE", db.url.as_str())],
        ),
    ] {
        let (code, stderr) = serve_exits(&args, &env);
        // Refused before anything is served: a failure exit (the binary's is 1), not a signal.
        assert!(
            matches!(code, Some(c) if c != 0),
            "{args:?} {env:?}: exit {code:?}: {stderr}"
        );
        assert!(
            stderr.contains("--nodes agents"),
            "{args:?} {env:?}: {stderr}"
        );
    }

    // A database that is not there: a clear error naming it, and an exit (no hang).
    let port = free_port();
    let down = format!("postgres://postgres@127.0.0.1:{port}/nothing");
    let (code, stderr) = serve_exits(&["--store", &down, "--nodes", "agents"], &[]);
    assert_ne!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains(&port.to_string()),
        "the error names the database's address: {stderr}"
    );
    // A password in the URL is refused, and never echoed.
    let with_pw = format!("postgres://bob:sekrit-pw@127.0.0.1:{port}/nothing");
    let (code, stderr) = serve_exits(&["--store", &with_pw, "--nodes", "agents"], &[]);
    assert_ne!(code, Some(0), "{stderr}");
    assert!(
        !stderr.contains("sekrit-pw"),
        "the password echoed: {stderr}"
    );

    // A replica of the store: a pool asking for embedded (or sandbox) nodes is refused 400, one
    // asking for agents is taken.
    let rs = Replicas::start_on(db, 1, &[]);
    let c = rs.at(0);
    for value in ["embedded", "sandbox"] {
        let mut body = pool_body(&format!("meta-{value}"), 1);
        body["metadata"] = json!([{"name": "bluebatch.nodes", "value": value}]);
        let r = c.req("POST", "/pools").json(&body).send_within(T).await;
        assert_eq!(r.status, 400, "{value}: {}", text(&r));
        assert_eq!(r.code(), "InvalidPropertyValue", "{}", text(&r));
        let g = c
            .req("GET", &format!("/pools/meta-{value}"))
            .send_within(T)
            .await;
        assert_eq!(g.status, 404, "a refused pool is not made: {}", text(&g));
    }
    let mut body = pool_body("meta-agents", 0);
    body["metadata"] = json!([{"name": "bluebatch.nodes", "value": "agents"}]);
    let r = c.req("POST", "/pools").json(&body).send_within(T).await;
    assert_eq!(r.status, 201, "{}", text(&r));
    // Health is liveness, readiness says the database answers.
    let h = reqwest::Client::new()
        .get(format!("{}/_bluebatch/health", rs.url(0)))
        .timeout(T)
        .send()
        .await
        .unwrap();
    assert_eq!(h.status().as_u16(), 200);
    wait_ready(rs.url(0), 200, T).await;
}

/// The accounts live in the database: a replica started later with an accounts file of its own
/// adds its account, and the replicas already running authenticate it without a restart; the
/// database's keys win over a later file's.
#[tokio::test]
async fn an_account_one_replica_seeds_is_served_by_every_replica_at_once() {
    let Some(mut reps) = Replicas::start(2) else {
        return;
    };
    let key = "c2Vjb25kIGFjY291bnQga2V5IGZvciB0aGUgcmVwbGljYSB0ZXN0cw==";
    let other = Client::new(&reps.replicas[0].url, "otheraccount", key);
    let r = other.req("GET", "/pools").send().await;
    assert_eq!((r.status, r.code().as_str()), (403, "AuthenticationFailed"));
    // A third replica with a file naming a new account (and the dev account with another key,
    // which the database's key outlives).
    let file = reps.dir.path().join("accounts.json");
    std::fs::write(
        &file,
        json!({"accounts": [
            {"name": "otheraccount", "keys": [key]},
            {"name": ACCOUNT, "keys": ["d3Jvbmcga2V5IG9mIGEgbGF0ZXIgZmlsZQ=="]},
        ]})
        .to_string(),
    )
    .unwrap();
    reps.extra = vec![
        "--no-dev-account".into(),
        "--accounts-file".into(),
        file.to_str().unwrap().into(),
    ];
    let third = reps.add();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    for i in [0, 1, third] {
        let c = Client::new(&reps.replicas[i].url, "otheraccount", key);
        loop {
            let r = c.req("GET", "/pools").send().await;
            if r.status == 200 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "replica {i} never took the new account: {}",
                r.status
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The development account keeps the key the database had first, on every replica.
        let r = reps.at(i).req("GET", "/pools").send().await;
        assert_eq!(r.status, 200, "replica {i}: the dev account's stored key");
    }
}
