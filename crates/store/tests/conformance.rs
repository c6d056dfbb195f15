//! The suite every backend must pass.

use bluebatch_store::{Backend, GroupCommit, Op, SqliteBackend};
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

fn conformance(b: &mut dyn Backend) {
    b.commit(&[
        put("pool/a/p1", "1"),
        put("node/a/p1/n1", "2"),
        put("node/a/p10/n1", "3"),
    ])
    .unwrap();
    b.commit(&[put("user/a/p1/n1/alice", "4"), put("user/a/p1/n1/bob", "5")])
        .unwrap();
    // Replace, then delete one key.
    b.commit(&[
        put("pool/a/p1", "1b"),
        Op::Delete {
            key: "user/a/p1/n1/bob".into(),
        },
    ])
    .unwrap();
    let all = b.load_all().unwrap();
    assert_eq!(all[0], ("node/a/p1/n1".to_string(), b"2".to_vec()));
    assert!(all.contains(&("pool/a/p1".to_string(), b"1b".to_vec())));
    assert_eq!(
        keys(b),
        [
            "node/a/p1/n1",
            "node/a/p10/n1",
            "pool/a/p1",
            "user/a/p1/n1/alice"
        ]
    );
    // A prefix delete takes exactly that prefix, not a sibling that shares its characters.
    b.commit(&[Op::DeletePrefix {
        prefix: "node/a/p1/".into(),
    }])
    .unwrap();
    assert_eq!(
        keys(b),
        ["node/a/p10/n1", "pool/a/p1", "user/a/p1/n1/alice"]
    );
    // A failing transaction applies nothing.
    let bad = [
        put("pool/a/p2", "x"),
        Op::DeletePrefix {
            prefix: "no-slash".into(),
        },
    ];
    assert!(b.commit(&bad).is_err());
    assert_eq!(
        keys(b),
        ["node/a/p10/n1", "pool/a/p1", "user/a/p1/n1/alice"]
    );
    // Binary values survive.
    b.commit(&[Op::Put {
        key: "bin".into(),
        value: vec![0, 255, 10],
    }])
    .unwrap();
    assert!(
        b.load_all()
            .unwrap()
            .contains(&("bin".to_string(), vec![0, 255, 10]))
    );
}

#[test]
fn sqlite_in_memory_conforms() {
    conformance(&mut SqliteBackend::in_memory().unwrap());
}

#[test]
fn sqlite_file_conforms_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    conformance(&mut SqliteBackend::open(&path).unwrap());
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
