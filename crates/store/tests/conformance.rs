//! The suite every backend must pass (`bluebatch_store::conformance`), on the embedded SQLite
//! store and the in-process shared store; group commit.

use bluebatch_store::conformance::{BlockingKv, backend_suite};
use bluebatch_store::{Backend, GroupCommit, MemBackend, MemShared, Op, SqliteBackend};
use std::sync::mpsc;

fn put(k: &str, v: &str) -> Op {
    Op::Put {
        key: k.into(),
        value: v.as_bytes().to_vec(),
    }
}

fn keys(b: &mut dyn Backend) -> Vec<String> {
    b.load_all().unwrap().into_iter().map(|(k, _)| k).collect()
}

#[test]
fn memshared_conforms() {
    backend_suite(&mut BlockingKv::new(|| async { MemShared::new() }));
}

#[test]
fn memory_conforms() {
    backend_suite(&mut MemBackend::new());
}

#[test]
fn sqlite_in_memory_conforms() {
    backend_suite(&mut SqliteBackend::in_memory().unwrap());
}

#[test]
fn sqlite_file_conforms_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    backend_suite(&mut SqliteBackend::open(&path).unwrap());
    let mut again = SqliteBackend::open(&path).unwrap();
    assert_eq!(
        keys(&mut again),
        ["bin", "node/a/p10/n1", "pool/a/p1", "user/a/p1/n1/alice"]
    );
}

#[test]
fn group_commit_answers_every_change_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let gc = GroupCommit::start(SqliteBackend::open(&path).unwrap());
    let (tx, rx) = mpsc::channel();
    for i in 0..500 {
        let tx = tx.clone();
        gc.submit(
            vec![put("k", &i.to_string())],
            Box::new(move |r| tx.send((i, r)).unwrap()),
        );
    }
    let mut seen: Vec<i32> = (0..500)
        .map(|_| {
            let (i, r) = rx.recv().unwrap();
            r.unwrap();
            i
        })
        .collect();
    let order = seen.clone();
    seen.sort();
    assert_eq!(order, seen, "callbacks run in submission order");
    drop(gc);
    let mut b = SqliteBackend::open(&path).unwrap();
    assert_eq!(
        b.load_all().unwrap(),
        vec![("k".to_string(), b"499".to_vec())]
    );
}
