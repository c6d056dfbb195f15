//! The suite every store backend must pass, shared by the backends' own tests: the embedded
//! SQLite store (`tests/conformance.rs`), and the shared stores ([`MemShared`](crate::MemShared)
//! here, PostgreSQL in `bluebatch-pgstore`) through [`BlockingKv`].

use crate::{Backend, Locked, Op, Result, SharedBackend};

fn put(k: &str, v: &str) -> Op {
    Op::Put {
        key: k.into(),
        value: v.as_bytes().to_vec(),
    }
}

fn keys(b: &mut dyn Backend) -> Vec<String> {
    b.load_all().unwrap().into_iter().map(|(k, _)| k).collect()
}

/// Records put, replaced, deleted and prefix-deleted, read back in key order; a failing
/// transaction applies nothing; binary values survive. Panics on the first difference.
pub fn backend_suite(b: &mut dyn Backend) {
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

/// A shared store seen as a [`Backend`] (each commit one revision, under the write lock), run
/// on a runtime of its own: so the one suite checks every backend.
pub struct BlockingKv<S> {
    pub store: S,
    rt: tokio::runtime::Runtime,
}

impl<S: SharedBackend> BlockingKv<S> {
    /// `connect` runs on the adapter's runtime (a store's tasks live there).
    pub fn new<F: std::future::Future<Output = S>>(connect: impl FnOnce() -> F) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime");
        let store = rt.block_on(connect());
        BlockingKv { store, rt }
    }
}

impl<S: SharedBackend> Backend for BlockingKv<S> {
    fn load_all(&mut self) -> Result<Vec<(String, Vec<u8>)>> {
        Ok(self.rt.block_on(self.store.snapshot())?.records)
    }

    fn commit(&mut self, ops: &[Op]) -> Result<()> {
        self.rt.block_on(async {
            let locked: Box<dyn Locked> = self.store.lock().await?;
            locked.commit(ops.to_vec()).await.map(drop)
        })
    }
}
