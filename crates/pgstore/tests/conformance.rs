//! The PostgreSQL store against a real PostgreSQL: `BLUEBATCH_TEST_PG` is a base URL
//! (`scripts/pg.sh url`; a password, if any, from PGPASSWORD). Each test makes its own database
//! and drops it. Without BLUEBATCH_TEST_PG the tests say SKIPPED and pass, unless CI=true.

use bluebatch_pgstore::{PgHost, PgOptions, PgStore, SCHEMA_VERSION};
use bluebatch_store::{Change, Op, SharedBackend};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

fn put(k: &str, v: &str) -> Op {
    Op::Put {
        key: k.into(),
        value: v.as_bytes().to_vec(),
    }
}

fn skip(why: &str) -> bool {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{why} (CI=true: required)");
    }
    eprintln!("SKIPPED ({why})");
    true
}

fn base() -> Option<PgOptions> {
    let Ok(url) = std::env::var("BLUEBATCH_TEST_PG") else {
        skip("no BLUEBATCH_TEST_PG");
        return None;
    };
    Some(PgOptions::parse(&url, None).expect("BLUEBATCH_TEST_PG parses"))
}

async fn deadline<T>(secs: u64, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("the test's deadline passed")
}

fn conn_string(o: &PgOptions, password: Option<&str>) -> String {
    let host = match &o.host {
        PgHost::Tcp(h) => h.clone(),
        PgHost::Unix(d) => d.display().to_string(),
    };
    let mut s = format!(
        "host={host} port={} user={} dbname={} connect_timeout=10",
        o.port, o.user, o.dbname
    );
    if let Some(p) = password
        .map(str::to_string)
        .or_else(|| std::env::var("PGPASSWORD").ok())
    {
        s.push_str(&format!(" password={p}"));
    }
    s
}

/// Runs `f` on a fresh database of its own (skipped without `BLUEBATCH_TEST_PG`), failing when it
/// has not finished within `secs` s.
async fn with_db<F: Future<Output = ()>>(secs: u64, f: impl FnOnce(TestDb) -> F) {
    let Some(base) = base() else { return };
    deadline(secs, async { f(TestDb::new(&base).await).await }).await
}

/// A plain client (no TLS) for set-up and checks.
async fn client(o: &PgOptions) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(&conn_string(o, None), tokio_postgres::NoTls)
        .await
        .expect("admin connection");
    tokio::spawn(conn);
    c
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A database of its own, dropped at the end (best effort).
struct TestDb {
    base: PgOptions,
    name: String,
}

impl TestDb {
    async fn new(base: &PgOptions) -> TestDb {
        Self::owned_by(base, None).await
    }

    async fn owned_by(base: &PgOptions, owner: Option<&str>) -> TestDb {
        let name = format!(
            "bbtest_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let c = client(base).await;
        let owner = owner.map(|o| format!(" OWNER {o}")).unwrap_or_default();
        c.batch_execute(&format!("CREATE DATABASE {name}{owner}"))
            .await
            .expect("create database");
        TestDb {
            base: base.clone(),
            name,
        }
    }

    fn opts(&self) -> PgOptions {
        self.base.with_dbname(&self.name)
    }

    async fn store(&self) -> PgStore {
        PgStore::connect(&self.opts(), 4).await.expect("connect")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let cs = conn_string(&self.base, None);
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let Ok(Ok((c, conn))) = tokio::time::timeout(
                    Duration::from_secs(10),
                    tokio_postgres::connect(&cs, tokio_postgres::NoTls),
                )
                .await
                else {
                    return;
                };
                tokio::spawn(conn);
                let _ = tokio::time::timeout(
                    Duration::from_secs(20),
                    c.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")),
                )
                .await;
            });
        })
        .join();
    }
}

async fn commit(s: &PgStore, ops: Vec<Op>) -> bluebatch_store::Result<u64> {
    let l = s.lock().await?;
    l.commit(ops).await
}

async fn keys(s: &PgStore) -> Vec<String> {
    s.snapshot()
        .await
        .unwrap()
        .records
        .into_iter()
        .map(|(k, _)| k)
        .collect()
}

/// The key/value semantics every backend has (crates/store/tests/conformance.rs), through
/// lock/commit and snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_put_replace_delete_prefix_in_key_order() {
    with_db(60, |db| async move {
        let s = db.store().await;
        assert_eq!(s.head().await.unwrap(), 0);
        assert_eq!(s.snapshot().await.unwrap().records, vec![]);
        assert_eq!(
            commit(
                &s,
                vec![
                    put("pool/a/p1", "1"),
                    put("node/a/p1/n1", "2"),
                    put("node/a/p10/n1", "3"),
                ]
            )
            .await
            .unwrap(),
            1
        );
        commit(
            &s,
            vec![put("user/a/p1/n1/alice", "4"), put("user/a/p1/n1/bob", "5")],
        )
        .await
        .unwrap();
        commit(
            &s,
            vec![
                put("pool/a/p1", "1b"),
                Op::Delete {
                    key: "user/a/p1/n1/bob".into(),
                },
            ],
        )
        .await
        .unwrap();
        let snap = s.snapshot().await.unwrap();
        assert_eq!(snap.rev, 3);
        assert_eq!(snap.records[0], ("node/a/p1/n1".to_string(), b"2".to_vec()));
        assert!(
            snap.records
                .contains(&("pool/a/p1".to_string(), b"1b".to_vec()))
        );
        assert_eq!(
            keys(&s).await,
            [
                "node/a/p1/n1",
                "node/a/p10/n1",
                "pool/a/p1",
                "user/a/p1/n1/alice"
            ]
        );
        // A prefix delete takes exactly that prefix, not a sibling that shares its characters.
        commit(
            &s,
            vec![Op::DeletePrefix {
                prefix: "node/a/p1/".into(),
            }],
        )
        .await
        .unwrap();
        assert_eq!(
            keys(&s).await,
            ["node/a/p10/n1", "pool/a/p1", "user/a/p1/n1/alice"]
        );
        // A failing transaction applies nothing (and logs nothing).
        let bad = vec![
            put("pool/a/p2", "x"),
            Op::DeletePrefix {
                prefix: "no-slash".into(),
            },
        ];
        assert!(commit(&s, bad).await.is_err());
        assert_eq!(
            keys(&s).await,
            ["node/a/p10/n1", "pool/a/p1", "user/a/p1/n1/alice"]
        );
        assert_eq!(s.head().await.unwrap(), 4);
        // Binary values, odd keys, records of every kind, values that are not JSON under typed
        // keys: all come back exactly, in byte order.
        let odd = [
            ("bin", vec![0u8, 255, 10]),
            ("meta/clock", b"{\"t\":1}".to_vec()),
            ("account/Ab", b"{\"keys\":[]}".to_vec()),
            ("agent/token/x", b"t".to_vec()),
            ("pool/a/nonjson", b"not json \x00".to_vec()),
            ("pool/a/p1/extra", b"4 segments".to_vec()),
            ("node//x/y", b"empty segment".to_vec()),
            (
                "user/a/p1/n1/\u{e9}",
                "{\"name\":\"\u{e9}\\u0000\"}".as_bytes().to_vec(),
            ),
            ("Zed", b"capital".to_vec()),
        ];
        commit(
            &s,
            odd.iter()
                .map(|(k, v)| Op::Put {
                    key: k.to_string(),
                    value: v.clone(),
                })
                .collect(),
        )
        .await
        .unwrap();
        let snap = s.snapshot().await.unwrap();
        for (k, v) in &odd {
            assert!(snap.records.contains(&(k.to_string(), v.clone())), "{k}");
        }
        let got: Vec<&String> = snap.records.iter().map(|(k, _)| k).collect();
        let mut sorted = got.clone();
        sorted.sort();
        assert_eq!(got, sorted, "snapshot in byte order");
        // A prefix delete reaches every table: records and typed rows alike.
        commit(
            &s,
            vec![
                Op::DeletePrefix {
                    prefix: "pool/a/".into(),
                },
                Op::DeletePrefix {
                    prefix: "user/".into(),
                },
            ],
        )
        .await
        .unwrap();
        let k = keys(&s).await;
        assert!(
            !k.iter()
                .any(|k| k.starts_with("pool/a/") || k.starts_with("user/")),
            "{k:?}"
        );
        assert!(k.contains(&"node/a/p10/n1".to_string()) && k.contains(&"bin".to_string()));
        // Put then delete of one key in one commit: in order.
        commit(
            &s,
            vec![
                put("pool/b/q", "1"),
                Op::Delete {
                    key: "pool/b/q".into(),
                },
                put("meta/x", "1"),
                Op::Delete {
                    key: "meta/x".into(),
                },
                put("meta/x", "2"),
            ],
        )
        .await
        .unwrap();
        let snap = s.snapshot().await.unwrap();
        assert!(!snap.records.iter().any(|(k, _)| k == "pool/b/q"));
        assert!(
            snap.records
                .contains(&("meta/x".to_string(), b"2".to_vec()))
        );
        // A big commit (a pool of 1000 nodes with a user each), then its prefix delete.
        let mut big = vec![put("pool/big/p", "{}")];
        for i in 0..1000 {
            big.push(put(&format!("node/big/p/n{i:04}"), "{\"state\":\"idle\"}"));
            big.push(put(&format!("user/big/p/n{i:04}/u"), "{\"name\":\"u\"}"));
        }
        let t0 = Instant::now();
        commit(&s, big).await.unwrap();
        eprintln!("a commit of 2001 ops took {:?}", t0.elapsed());
        let n = s
            .snapshot()
            .await
            .unwrap()
            .records
            .iter()
            .filter(|(k, _)| k.contains("/big/"))
            .count();
        assert_eq!(n, 2001);
        commit(
            &s,
            vec![
                Op::DeletePrefix {
                    prefix: "node/big/p/".into(),
                },
                Op::DeletePrefix {
                    prefix: "user/big/".into(),
                },
                Op::Delete {
                    key: "pool/big/p".into(),
                },
            ],
        )
        .await
        .unwrap();
        // A reconnected store sees the same.
        let snap = s.snapshot().await.unwrap();
        assert_eq!(snap.rev, 9);
        let again = db.store().await;
        assert_eq!(again.snapshot().await.unwrap(), snap);
    })
    .await
}

/// Pools, nodes and users land in tables with real columns (queries, not scans of blobs), and
/// every upsert bumps the row version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_rows_have_columns_and_row_versions() {
    with_db(60, |db| async move {
        let s = db.store().await;
        let pool = r#"{"id":"P1","os":"linux","vm_size":"standard_d2s_v3","state":"active","allocation_state":"steady"}"#;
        let node = r#"{"id":"n1","state":"idle","scheduling_state":"enabled","users_revision":7,"applied_revision":5,"host":"h1"}"#;
        let user = r#"{"name":"Alice","is_admin":true,"expiry_time":"2030-01-02T03:04:05Z"}"#;
        commit(
            &s,
            vec![put("pool/acct/p1", pool), put("node/acct/p1/n1", node), put("user/acct/p1/n1/alice", user)],
        )
        .await
        .unwrap();
        commit(&s, vec![put("node/acct/p1/n1", node)]).await.unwrap();
        let c = client(&db.opts()).await;
        let r = c
            .query_one("SELECT id, os, state, allocation_state, vm_size, version FROM bb_pools WHERE account = 'acct' AND pool_key = 'p1'", &[])
            .await
            .unwrap();
        assert_eq!(r.get::<_, Option<String>>(0).as_deref(), Some("P1"));
        assert_eq!(r.get::<_, Option<String>>(1).as_deref(), Some("linux"));
        assert_eq!(r.get::<_, Option<String>>(2).as_deref(), Some("active"));
        assert_eq!(r.get::<_, Option<String>>(3).as_deref(), Some("steady"));
        assert_eq!(r.get::<_, Option<String>>(4).as_deref(), Some("standard_d2s_v3"));
        assert_eq!(r.get::<_, i64>(5), 1);
        let r = c
            .query_one("SELECT state, scheduling_state, host, users_revision, applied_revision, version, doc->>'id' FROM bb_nodes WHERE host = 'h1'", &[])
            .await
            .unwrap();
        assert_eq!(r.get::<_, Option<String>>(0).as_deref(), Some("idle"));
        assert_eq!(r.get::<_, Option<String>>(1).as_deref(), Some("enabled"));
        assert_eq!(r.get::<_, Option<i64>>(3), Some(7));
        assert_eq!(r.get::<_, Option<i64>>(4), Some(5));
        assert_eq!(r.get::<_, i64>(5), 2, "the second upsert bumped the row version");
        assert_eq!(r.get::<_, Option<String>>(6).as_deref(), Some("n1"));
        let r = c
            .query_one("SELECT name, is_admin, expiry_time = '2030-01-02T03:04:05Z'::timestamptz FROM bb_users", &[])
            .await
            .unwrap();
        assert_eq!(r.get::<_, Option<String>>(0).as_deref(), Some("Alice"));
        assert_eq!(r.get::<_, Option<bool>>(1), Some(true));
        assert_eq!(r.get::<_, Option<bool>>(2), Some(true));
        let n: i64 = c.query_one("SELECT count(*) FROM bb_records", &[]).await.unwrap().get(0);
        assert_eq!(n, 0, "typed keys are not in bb_records");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_come_in_order_and_none_once_pruned() {
    with_db(60, |db| async move {
        let s = db.store().await;
        assert_eq!(s.changes_since(0).await.unwrap(), Some(vec![]));
        commit(&s, vec![put("a", "1"), put("b", "2")])
            .await
            .unwrap();
        commit(
            &s,
            vec![
                Op::Delete { key: "a".into() },
                Op::DeletePrefix {
                    prefix: "c/".into(),
                },
            ],
        )
        .await
        .unwrap();
        let all = s.changes_since(0).await.unwrap().unwrap();
        assert_eq!(
            all,
            vec![
                Change {
                    rev: 1,
                    op: put("a", "1")
                },
                Change {
                    rev: 1,
                    op: put("b", "2")
                },
                Change {
                    rev: 2,
                    op: Op::Delete { key: "a".into() }
                },
                Change {
                    rev: 2,
                    op: Op::DeletePrefix {
                        prefix: "c/".into()
                    }
                },
            ]
        );
        assert_eq!(
            s.changes_since(1).await.unwrap().unwrap(),
            all[2..].to_vec()
        );
        assert_eq!(s.changes_since(2).await.unwrap(), Some(vec![]));
        assert_eq!(
            s.changes_since(3).await.unwrap(),
            None,
            "a cache ahead of the database reloads"
        );
        // An empty commit is no revision.
        assert_eq!(s.lock().await.unwrap().commit(vec![]).await.unwrap(), 2);
        assert_eq!(s.head().await.unwrap(), 2);
        s.set_change_retention(5);
        for i in 0..20 {
            commit(&s, vec![put("k", &i.to_string())]).await.unwrap();
        }
        assert_eq!(s.head().await.unwrap(), 22);
        assert_eq!(s.changes_since(0).await.unwrap(), None, "pruned");
        let recent = s.changes_since(19).await.unwrap().unwrap();
        assert_eq!(
            recent.iter().map(|c| c.rev).collect::<Vec<_>>(),
            vec![20, 21, 22]
        );
        assert_eq!(recent[2].op, put("k", "19"));
        // Inside the lock, the same.
        let mut l = s.lock().await.unwrap();
        assert_eq!(l.rev(), 22);
        assert_eq!(l.changes_since(21).await.unwrap().unwrap().len(), 1);
        assert_eq!(l.changes_since(0).await.unwrap(), None);
        let snap = l.snapshot().await.unwrap();
        assert_eq!(snap.rev, 22);
        assert!(snap.records.contains(&("k".to_string(), b"19".to_vec())));
        drop(l);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lock_excludes_a_second_locker_until_commit_or_drop() {
    with_db(60, |db| async move {
        let (a, b) = (db.store().await, db.store().await);
        let la = a.lock().await.unwrap();
        assert_eq!(la.rev(), 0);
        let b2 = b.clone();
        let waiter = tokio::spawn(async move {
            let l = b2.lock().await.unwrap();
            let rev = l.rev();
            (rev, l.commit(vec![put("from-b", "1")]).await.unwrap())
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!waiter.is_finished(), "the second locker waits");
        assert_eq!(la.commit(vec![put("from-a", "1")]).await.unwrap(), 1);
        let (seen, committed) = waiter.await.unwrap();
        assert_eq!(
            (seen, committed),
            (1, 2),
            "the second locker saw the first's revision"
        );
        // Dropping the lock without committing releases it and writes nothing.
        let la = a.lock().await.unwrap();
        let b2 = b.clone();
        let waiter = tokio::spawn(async move { b2.lock().await.unwrap().rev() });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiter.is_finished());
        drop(la);
        assert_eq!(waiter.await.unwrap(), 2);
        assert_eq!(b.head().await.unwrap(), 2);
        // A's pool still works after the dropped lock (its connection was rolled back or dropped).
        for _ in 0..6 {
            drop(a.lock().await.unwrap());
        }
        assert_eq!(commit(&a, vec![put("again", "1")]).await.unwrap(), 3);
    })
    .await
}

/// `lock_after` reads the changes along with the lock: a locker that waited while another store
/// committed sees that commit in its catch-up (the read is not from before the lock was
/// granted), from the revision it named or any later one, and its own commit follows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_after_reads_the_commits_made_while_it_waited() {
    with_db(60, |db| async move {
        let (a, b) = (db.store().await, db.store().await);
        assert_eq!(commit(&a, vec![put("k/0", "0")]).await.unwrap(), 1);
        let la = a.lock().await.unwrap();
        let b2 = b.clone();
        let waiter = tokio::spawn(async move {
            let mut l = b2.lock_after(1).await.unwrap();
            let rev = l.rev();
            let read = l.changes_since(1).await.unwrap();
            (rev, read, l.commit(vec![put("k/b", "b")]).await.unwrap())
        });
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(!waiter.is_finished(), "the second locker waits");
        assert_eq!(
            la.commit(vec![put("k/1", "1"), put("k/2", "2")])
                .await
                .unwrap(),
            2
        );
        let (rev, read, committed) = deadline(10, waiter).await.unwrap();
        assert_eq!(rev, 2, "the lock is granted at the first's revision");
        let read = read.expect("the log goes back to 1");
        assert_eq!(
            read,
            vec![
                Change {
                    rev: 2,
                    op: put("k/1", "1")
                },
                Change {
                    rev: 2,
                    op: put("k/2", "2")
                },
            ],
            "the catch-up holds what was committed while the locker waited"
        );
        assert_eq!(committed, 3);
        // Asked from a later revision than the one named: only what follows it.
        let mut l = b.lock_after(0).await.unwrap();
        assert_eq!(l.rev(), 3);
        let read = l.changes_since(2).await.unwrap().unwrap();
        assert_eq!(
            read,
            vec![Change {
                rev: 3,
                op: put("k/b", "b")
            }]
        );
        // Up to date: nothing.
        assert_eq!(l.changes_since(3).await.unwrap(), Some(vec![]));
        drop(l);
        let mut l = a.lock_after(3).await.unwrap();
        assert_eq!(l.changes_since(3).await.unwrap(), Some(vec![]));
        assert_eq!(l.commit(vec![put("k/a", "a")]).await.unwrap(), 4);
    })
    .await
}

/// A commit's NOTIFY carries its changes: another store's follower gets them in commit order
/// without reading the log; a commit too large to carry (or a lost notification) makes what
/// was pushed incomplete (`None`: read the log).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_carry_the_changes_or_say_they_do_not() {
    with_db(60, |db| async move {
        let (a, b) = (db.store().await, db.store().await);
        // b's listener settles; what it was pushed until now is dropped.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _ = b.take_pushed();
        commit(
            &a,
            vec![put("n/1", "one"), Op::Delete { key: "n/0".into() }],
        )
        .await
        .unwrap();
        commit(
            &a,
            vec![Op::DeletePrefix {
                prefix: "n/x/".into(),
            }],
        )
        .await
        .unwrap();
        let want = vec![
            Change {
                rev: 1,
                op: put("n/1", "one"),
            },
            Change {
                rev: 1,
                op: Op::Delete { key: "n/0".into() },
            },
            Change {
                rev: 2,
                op: Op::DeletePrefix {
                    prefix: "n/x/".into(),
                },
            },
        ];
        let deadline_at = Instant::now() + Duration::from_secs(10);
        let mut got = Vec::new();
        while got.len() < want.len() && Instant::now() < deadline_at {
            b.changed(Duration::from_millis(200)).await;
            got.extend(
                b.take_pushed()
                    .expect("every notification carried its changes"),
            );
        }
        assert_eq!(got, want);
        // A value of 10 kB does not fit a notification: the follower is told to read.
        let big = "x".repeat(10_000);
        commit(&a, vec![put("n/big", &big)]).await.unwrap();
        let deadline_at = Instant::now() + Duration::from_secs(10);
        loop {
            b.changed(Duration::from_millis(200)).await;
            match b.take_pushed() {
                None => break,
                Some(c) => assert!(c.is_empty(), "{c:?}"),
            }
            assert!(
                Instant::now() < deadline_at,
                "the large commit's wake-up came"
            );
        }
        // And the log holds it.
        let c = b.changes_since(2).await.unwrap().unwrap();
        assert_eq!(
            c,
            vec![Change {
                rev: 3,
                op: put("n/big", &big)
            }]
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stores_racing_200_commits_log_each_once() {
    with_db(120, |db| async move {
        let stores = [db.store().await, db.store().await];
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for (si, s) in stores.iter().enumerate() {
            for t in 0..4 {
                let s = s.clone();
                tasks.push(tokio::spawn(async move {
                    for i in 0..25 {
                        let l = s.lock().await.unwrap();
                        let key = format!("w/{si}/{t}/{i}");
                        l.commit(vec![put(&key, "x")]).await.unwrap();
                    }
                }));
            }
        }
        for t in tasks {
            t.await.unwrap();
        }
        eprintln!(
            "200 commits from 8 writers on 2 stores took {:?}",
            t0.elapsed()
        );
        assert_eq!(stores[0].head().await.unwrap(), 200);
        let changes = stores[1].changes_since(0).await.unwrap().unwrap();
        assert_eq!(changes.len(), 200);
        let revs: Vec<u64> = changes.iter().map(|c| c.rev).collect();
        assert_eq!(revs, (1..=200).collect::<Vec<_>>());
        let mut keys: Vec<String> = changes
            .into_iter()
            .map(|c| match c.op {
                Op::Put { key, .. } => key,
                other => panic!("{other:?}"),
            })
            .collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), 200);
        assert_eq!(stores[0].snapshot().await.unwrap().records.len(), 200);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_are_held_renewed_and_taken_after_expiry() {
    with_db(60, |db| async move {
        let (a, b) = (db.store().await, db.store().await);
        let ttl = Duration::from_millis(1500);
        assert!(a.claim_lease("background", "a", ttl).await.unwrap());
        assert!(!b.claim_lease("background", "b", ttl).await.unwrap());
        assert!(
            a.claim_lease("background", "a", ttl).await.unwrap(),
            "renewed"
        );
        assert!(
            b.claim_lease("other", "b", ttl).await.unwrap(),
            "another lease is apart"
        );
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert!(
            a.claim_lease("background", "a", ttl).await.unwrap(),
            "renewed again"
        );
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert!(
            !b.claim_lease("background", "b", ttl).await.unwrap(),
            "the renewal counts"
        );
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert!(
            b.claim_lease("background", "b", ttl).await.unwrap(),
            "expired: anyone's"
        );
        assert!(!a.claim_lease("background", "a", ttl).await.unwrap());
        a.release_lease("background", "a").await.unwrap();
        assert!(
            !a.claim_lease("background", "a", ttl).await.unwrap(),
            "a's release of b's lease does nothing"
        );
        b.release_lease("background", "b").await.unwrap();
        assert!(
            a.claim_lease("background", "a", ttl).await.unwrap(),
            "released: anyone's"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_connects_at_once_migrate_once() {
    with_db(90, |db| async move {
        let o = db.opts();
        let results = futures_util::future::join_all((0..4).map(|_| PgStore::connect(&o, 2))).await;
        for r in &results {
            assert!(r.is_ok(), "{:?}", r.as_ref().err());
        }
        let c = client(&o).await;
        let r = c
            .query_one("SELECT version, min_compatible FROM bb_schema", &[])
            .await
            .unwrap();
        assert_eq!(r.get::<_, i32>(0), SCHEMA_VERSION);
        let n: i64 = c
            .query_one("SELECT count(*) FROM bb_head", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1);
        let n: i64 = c
            .query_one("SELECT count(*) FROM bb_leases WHERE name = 'migrate'", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "the migration lease is released");
        // Each store works.
        for (i, s) in results.into_iter().enumerate() {
            commit(&s.unwrap(), vec![put(&format!("k{i}"), "v")])
                .await
                .unwrap();
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_one_version_ahead_is_accepted_two_ahead_refused() {
    with_db(60, |db| async move {
        drop(db.store().await);
        let c = client(&db.opts()).await;
        let set = |v: i32, min: i32| {
            format!("UPDATE bb_schema SET version = {v}, min_compatible = {min}")
        };
        c.batch_execute(&set(SCHEMA_VERSION + 1, SCHEMA_VERSION))
            .await
            .unwrap();
        let s = PgStore::connect(&db.opts(), 2)
            .await
            .expect("one ahead: a rolling upgrade");
        commit(&s, vec![put("k", "v")]).await.unwrap();
        let v: i32 = c
            .query_one("SELECT version FROM bb_schema", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            v,
            SCHEMA_VERSION + 1,
            "an older binary leaves a newer schema alone"
        );
        c.batch_execute(&set(SCHEMA_VERSION + 2, SCHEMA_VERSION))
            .await
            .unwrap();
        let err = PgStore::connect(&db.opts(), 2)
            .await
            .err()
            .expect("two ahead refused");
        assert!(err.contains("more than one version ahead"), "{err}");
        c.batch_execute(&set(SCHEMA_VERSION + 1, SCHEMA_VERSION + 1))
            .await
            .unwrap();
        let err = PgStore::connect(&db.opts(), 2)
            .await
            .err()
            .expect("min_compatible above ours refused");
        assert!(err.contains("no longer works"), "{err}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_down_at_connect_fails_clearly_without_hanging() {
    // Nothing listens on port 1 of the loopback.
    let e = |_: &str| None;
    let o = PgOptions::parse_with_env(
        "postgres://bb@127.0.0.1:1/state?sslmode=disable&connect_timeout=3",
        None,
        &e,
    )
    .unwrap();
    let t0 = Instant::now();
    let err = deadline(20, PgStore::connect(&o, 2))
        .await
        .err()
        .expect("refused");
    assert!(t0.elapsed() < Duration::from_secs(15));
    eprintln!("{err}");
    assert!(err.contains("127.0.0.1:1"), "{err}");
    assert!(err.to_lowercase().contains("refused"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_notified_between_two_waits_ends_the_next_wait_at_once() {
    with_db(60, |db| async move {
        let (a, b) = (db.store().await, db.store().await);
        tokio::time::sleep(Duration::from_millis(300)).await;
        // A follower: it waits, then reads what changed (and meanwhile nobody waits).
        b.changed(Duration::from_millis(100)).await;
        commit(&a, vec![put("k", "v")]).await.unwrap();
        // The NOTIFY reaches b while its follower is busy elsewhere.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let t0 = Instant::now();
        b.changed(Duration::from_secs(20)).await;
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "the wake-up that came between two waits was lost: {:?}",
            t0.elapsed()
        );
        // And it is used up: the next wait waits.
        let t0 = Instant::now();
        b.changed(Duration::from_millis(300)).await;
        assert!(t0.elapsed() >= Duration::from_millis(250));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_wakes_another_store_waiting_for_changes() {
    with_db(60, |db| async move {
        let (a, b) = (db.store().await, db.store().await);
        // Let b's listener settle.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t0 = Instant::now();
        let b2 = b.clone();
        let waiter = tokio::spawn(async move {
            b2.changed(Duration::from_secs(20)).await;
            b2.head().await.unwrap()
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        commit(&a, vec![put("k", "v")]).await.unwrap();
        assert_eq!(waiter.await.unwrap(), 1);
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "woken, not timed out"
        );
        // Without a commit, changed() ends at its max.
        let t0 = Instant::now();
        b.changed(Duration::from_millis(300)).await;
        assert!(t0.elapsed() >= Duration::from_millis(250));
        // ping and hosts seen.
        b.ping().await.unwrap();
        a.hosts_seen(&["h2".into(), "h1".into(), "h1".into()])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        b.hosts_seen(&["h2".into()]).await.unwrap();
        let mut ages = a.host_ages().await.unwrap();
        ages.sort();
        assert_eq!(ages.len(), 2);
        assert_eq!((ages[0].0.as_str(), ages[1].0.as_str()), ("h1", "h2"));
        assert!(ages[0].1 >= Duration::from_millis(250), "{ages:?}");
        assert!(ages[1].1 < ages[0].1, "{ages:?}");
    })
    .await
}

/// Acknowledgement notices reach every store on the database, whatever their size (split
/// under NOTIFY's payload limit), while another store holds the write lock, and without waking
/// the followers of commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_notices_reach_the_other_stores_while_the_write_lock_is_held() {
    with_db(60, |db| async move {
        let (a, b) = (db.store().await, db.store().await);
        let mut on_b = b.ack_notices().expect("PostgreSQL carries notices");
        let mut on_a = a.ack_notices().expect("PostgreSQL carries notices");
        tokio::time::sleep(Duration::from_millis(300)).await;
        // (What the listeners' start pushed: "read the log".)
        let _ = b.take_pushed();
        let held = b.lock().await.unwrap();
        let acks: Vec<(String, u64)> = (0..2000)
            .map(|i| (format!("acct.pool.tvm-{i:08}"), 1_000_000 + i))
            .collect();
        let notice = bluebatch_store::AckNotice {
            replica: "a".into(),
            acks: acks.clone(),
        };
        let t0 = Instant::now();
        a.announce_acks(&notice).await;
        let mut got = Vec::new();
        while got.len() < acks.len() {
            let n = tokio::time::timeout(Duration::from_secs(5), on_b.recv())
                .await
                .expect("the notices arrive")
                .expect("a notice");
            assert_eq!(n.replica, "a");
            got.extend(n.acks.iter().cloned());
        }
        assert_eq!(got, acks);
        assert!(t0.elapsed() < Duration::from_secs(5));
        // The announcer hears its own (the service skips them by replica name).
        let own = tokio::time::timeout(Duration::from_secs(5), on_a.recv())
            .await
            .expect("its own notice")
            .expect("a notice");
        assert_eq!(own.replica, "a");
        drop(held);
        // A notice is no commit: nothing to follow.
        assert_eq!(b.head().await.unwrap(), 0);
        assert_eq!(b.take_pushed(), Some(Vec::new()));
    })
    .await
}

fn write_mode(path: &Path, text: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The password from PGPASSFILE (only when 0600, as libpq) or a password file; never from the
/// URL. Needs a cluster where members of `bb_pw` give a password (scripts/pg.sh).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_password_comes_from_pgpassfile_or_a_password_file() {
    let Some(base) = base() else { return };
    deadline(60, async {
        let role = format!(
            "bbpw_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let pw = "s3cret:with\\colon";
        let admin = client(&base).await;
        admin
            .batch_execute(&format!(
                "CREATE ROLE {role} LOGIN PASSWORD 'pw-{role}' IN ROLE bb_pw"
            ))
            .await
            .expect("role (is this a scripts/pg.sh cluster with the bb_pw group?)");
        admin
            .batch_execute(&format!(
                "ALTER ROLE {role} PASSWORD '{}'",
                pw.replace('\'', "''")
            ))
            .await
            .unwrap();
        let db = TestDb::owned_by(&base, Some(&role)).await;
        let host = match &base.host {
            PgHost::Tcp(h) => h.clone(),
            PgHost::Unix(_) => return eprintln!("SKIPPED (a unix-socket BLUEBATCH_TEST_PG)"),
        };
        let url = format!(
            "postgres://{role}@{host}:{}/{}?sslmode=disable",
            base.port, db.name
        );
        let dir = tempfile::tempdir().unwrap();
        let none = |_: &str| None;
        // No password: refused by the server, and the message says where a password comes from.
        let o = PgOptions::parse_with_env(&url, None, &none).unwrap();
        let err = PgStore::connect(&o, 2).await.err().expect("no password");
        if err.contains("password") && err.contains("PGPASSWORD") {
            // as expected
        } else {
            panic!("{err}");
        }
        // PGPASSFILE, mode 0600, libpq's escapes.
        let pgpass = dir.path().join("pgpass");
        let escaped = pw.replace('\\', "\\\\").replace(':', "\\:");
        write_mode(
            &pgpass,
            &format!(
                "# mine\nother:*:*:*:wrong\n{host}:{}:{}:{role}:{escaped}\n",
                base.port, db.name
            ),
            0o600,
        );
        let p = pgpass.display().to_string();
        let env = |k: &str| (k == "PGPASSFILE").then(|| p.clone());
        let o = PgOptions::parse_with_env(&url, None, &env).unwrap();
        assert!(o.has_password());
        let s = PgStore::connect(&o, 2).await.expect("PGPASSFILE");
        commit(&s, vec![put("k", "v")]).await.unwrap();
        // Group-readable: ignored, as libpq does.
        write_mode(&pgpass, &std::fs::read_to_string(&pgpass).unwrap(), 0o640);
        let o = PgOptions::parse_with_env(&url, None, &env).unwrap();
        assert!(
            !o.has_password(),
            "a group-readable password file is ignored"
        );
        // A password file (the first line).
        let file = dir.path().join("pw");
        write_mode(&file, &format!("{pw}\nignored\n"), 0o600);
        let o = PgOptions::parse_with_env(&url, Some(&file), &none).unwrap();
        let s = PgStore::connect(&o, 2).await.expect("password file");
        assert_eq!(s.head().await.unwrap(), 1);
        // PGPASSWORD; a wrong one fails with the server's message.
        let env = |k: &str| (k == "PGPASSWORD").then(|| pw.to_string());
        PgStore::connect(&PgOptions::parse_with_env(&url, None, &env).unwrap(), 2)
            .await
            .expect("PGPASSWORD");
        let env = |k: &str| (k == "PGPASSWORD").then(|| "wrong".to_string());
        let err = PgStore::connect(&PgOptions::parse_with_env(&url, None, &env).unwrap(), 2)
            .await
            .err()
            .expect("wrong password");
        assert!(err.contains("password authentication failed"), "{err}");
        assert!(
            !err.contains("wrong"),
            "the password is not in the message: {err}"
        );
        // In the URL: refused before connecting.
        let bad = format!("postgres://{role}:{pw}@{host}:{}/{}", base.port, db.name);
        let err = PgOptions::parse(&bad, None).unwrap_err();
        assert!(!err.contains("s3cret"), "{err}");
        drop(s);
        drop(db);
        let _ = admin
            .batch_execute(&format!("DROP ROLE IF EXISTS {role}"))
            .await;
    })
    .await
}

/// A cluster of its own (scripts/pg.sh start DIR PORT), destroyed at the end.
struct OwnCluster {
    dir: PathBuf,
    script: PathBuf,
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let _ = std::process::Command::new(&self.script)
            .arg("destroy")
            .arg(&self.dir)
            .status();
    }
}

fn pg_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/pg.sh")
}

/// verify-full against a PostgreSQL with a certificate from a CA of the test's own: the right
/// CA and name connect; a wrong CA, or a name the certificate does not carry, are refused;
/// verify-ca ignores the name; require encrypts without a CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_verify_full_with_a_ca_file() {
    if !Path::new("/usr/lib/postgresql/15/bin/initdb").exists() {
        skip("no PostgreSQL 15 binaries for a TLS cluster of this test's own");
        return;
    }
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let tmp = tempfile::Builder::new()
        .prefix("bbpgtls")
        .tempdir_in("/tmp")
        .unwrap();
    {
        // The postgres user runs the cluster in it.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    }
    let mk_ca = |cn: &str| {
        let mut ca = CertificateParams::default();
        ca.distinguished_name.push(DnType::CommonName, cn);
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let cert = ca.self_signed(&key).unwrap();
        (ca, key, cert)
    };
    let (ca, ca_key, ca_cert) = mk_ca("bluebatch test CA");
    let (_, _, other_cert) = mk_ca("another CA");
    // The server's certificate names localhost only (not 127.0.0.1).
    let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    leaf.distinguished_name
        .push(DnType::CommonName, "localhost");
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_cert = leaf.signed_by(&leaf_key, &Issuer::new(ca, ca_key)).unwrap();
    let files = tmp.path().join("files");
    std::fs::create_dir(&files).unwrap();
    std::fs::write(files.join("server.crt"), leaf_cert.pem()).unwrap();
    std::fs::write(files.join("server.key"), leaf_key.serialize_pem()).unwrap();
    std::fs::write(files.join("ca.crt"), ca_cert.pem()).unwrap();
    std::fs::write(files.join("other.crt"), other_cert.pem()).unwrap();
    let cluster = OwnCluster {
        dir: tmp.path().join("pg"),
        script: pg_script(),
    };
    let port = 54600 + (std::process::id() % 200) as u16;
    let st = std::process::Command::new(&cluster.script)
        .arg("start")
        .arg(&cluster.dir)
        .arg(port.to_string())
        .env("PG_SSL_CERT", files.join("server.crt"))
        .env("PG_SSL_KEY", files.join("server.key"))
        .status()
        .unwrap();
    assert!(st.success(), "scripts/pg.sh start");
    let port: u16 = std::fs::read_to_string(cluster.dir.join("port"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let none = |_: &str| None;
    let url = |host: &str, q: &str| format!("postgres://postgres@{host}:{port}/postgres?{q}");
    let ca = files.join("ca.crt").display().to_string();
    let other = files.join("other.crt").display().to_string();
    deadline(60, async {
        let ok = |u: String| async move {
            let o = PgOptions::parse_with_env(&u, None, &none).unwrap();
            PgStore::connect(&o, 2).await
        };
        let s = ok(url("localhost", &format!("sslmode=verify-full&sslrootcert={ca}")))
            .await
            .expect("verify-full with the right CA and name");
        commit(&s, vec![put("k", "v")]).await.unwrap();
        // The connection really is TLS.
        let err = ok(url("localhost", &format!("sslmode=verify-full&sslrootcert={other}")))
            .await
            .err()
            .expect("a wrong CA is refused");
        assert!(err.to_lowercase().contains("certificate"), "{err}");
        let err = ok(url("127.0.0.1", &format!("sslmode=verify-full&sslrootcert={ca}")))
            .await
            .err()
            .expect("a name the certificate lacks is refused");
        assert!(err.to_lowercase().contains("certificate"), "{err}");
        ok(url("127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={ca}")))
            .await
            .expect("verify-ca checks the chain only");
        assert!(ok(url("127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={other}"))).await.is_err());
        ok(url("127.0.0.1", "sslmode=require")).await.expect("require: TLS, unverified");
        ok(url("127.0.0.1", "sslmode=prefer")).await.expect("prefer");
        ok(url("127.0.0.1", "sslmode=disable")).await.expect("disable");
        // The server saw TLS for verify-full's connections.
        let admin = client(&PgOptions::parse_with_env(&url("127.0.0.1", ""), None, &none).unwrap()).await;
        let n: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a ON a.pid = s.pid WHERE s.ssl AND a.application_name = 'bluebatch'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(n >= 1, "the store's connections are TLS");
        drop(s);
    })
    .await;
    drop(cluster);
}

fn own_cluster(name: &str, port: u16) -> Option<(tempfile::TempDir, OwnCluster, u16)> {
    if !Path::new("/usr/lib/postgresql/15/bin/initdb").exists() {
        skip("no PostgreSQL 15 binaries for a cluster of this test's own");
        return None;
    }
    let tmp = tempfile::Builder::new()
        .prefix(name)
        .tempdir_in("/tmp")
        .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    }
    let cluster = OwnCluster {
        dir: tmp.path().join("pg"),
        script: pg_script(),
    };
    let st = std::process::Command::new(&cluster.script)
        .arg("start")
        .arg(&cluster.dir)
        .arg(port.to_string())
        .status()
        .unwrap();
    assert!(st.success(), "scripts/pg.sh start");
    let port: u16 = std::fs::read_to_string(cluster.dir.join("port"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    Some((tmp, cluster, port))
}

fn pg(cluster: &OwnCluster, cmd: &str) {
    let st = std::process::Command::new(&cluster.script)
        .arg(cmd)
        .arg(&cluster.dir)
        .status()
        .unwrap();
    assert!(st.success(), "scripts/pg.sh {cmd}");
}

/// The database stopped (and killed) under a connected store: every operation fails promptly
/// with an error (never a hang, never a success), and the store works again by itself once the
/// database is back; nothing committed before is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_fails_promptly_while_the_database_is_down_and_resumes() {
    let Some((_tmp, cluster, port)) =
        own_cluster("bbpgrestart", 54800 + (std::process::id() % 100) as u16)
    else {
        return;
    };
    let none = |_: &str| None;
    let o = PgOptions::parse_with_env(
        &format!("postgres://postgres@127.0.0.1:{port}/postgres?sslmode=disable&connect_timeout=3"),
        None,
        &none,
    )
    .unwrap();
    deadline(120, async {
        let s = PgStore::connect(&o, 4).await.unwrap();
        commit(&s, vec![put("before", "1")]).await.unwrap();
        for how in ["stop", "kill"] {
            pg(&cluster, how);
            let t0 = Instant::now();
            assert!(s.ping().await.is_err(), "{how}: ping");
            assert!(s.head().await.is_err(), "{how}: head");
            assert!(s.lock().await.is_err(), "{how}: lock");
            assert!(s.snapshot().await.is_err(), "{how}: snapshot");
            assert!(
                s.claim_lease("background", "me", Duration::from_secs(5))
                    .await
                    .is_err()
            );
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "{how}: prompt failures"
            );
            pg(&cluster, "start");
            // Back by itself: the first operation may meet a connection from before.
            let t0 = Instant::now();
            loop {
                if s.ping().await.is_ok() {
                    break;
                }
                assert!(
                    t0.elapsed() < Duration::from_secs(20),
                    "{how}: the store came back"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let rev = commit(&s, vec![put(how, "1")]).await.unwrap();
            assert_eq!(s.head().await.unwrap(), rev);
        }
        let snap = s.snapshot().await.unwrap();
        let k: Vec<&str> = snap.records.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(k, ["before", "kill", "stop"]);
        // The listener is back too: a commit by another store wakes this one.
        let other = PgStore::connect(&o, 2).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let s2 = s.clone();
        let waiter = tokio::spawn(async move {
            let t0 = Instant::now();
            s2.changed(Duration::from_secs(20)).await;
            t0.elapsed()
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        commit(&other, vec![put("after", "1")]).await.unwrap();
        assert!(
            waiter.await.unwrap() < Duration::from_secs(5),
            "woken after the restart"
        );
    })
    .await;
    drop(cluster);
}

/// Writers of one store queue for the lock without each holding a pooled connection: reads
/// still answer at once while many writers wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_answer_while_many_writers_of_one_store_queue_for_the_lock() {
    with_db(60, |db| async move {
        let s = PgStore::connect(&db.opts(), 2).await.unwrap();
        let mut writers = Vec::new();
        for i in 0..10 {
            let s = s.clone();
            writers.push(tokio::spawn(async move {
                let l = s.lock().await.unwrap();
                tokio::time::sleep(Duration::from_millis(60)).await;
                l.commit(vec![put(&format!("w{i}"), "1")]).await.unwrap();
            }));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        for _ in 0..5 {
            let t0 = Instant::now();
            s.head().await.unwrap();
            assert!(
                t0.elapsed() < Duration::from_millis(300),
                "a read waited {:?}",
                t0.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        for w in writers {
            w.await.unwrap();
        }
        assert_eq!(s.head().await.unwrap(), 10);
    })
    .await
}
