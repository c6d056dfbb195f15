//! Group commit: the single writer of a backend.

use crate::{Backend, Op, Result, StoreError};
use std::sync::mpsc;
use std::thread;

/// Called once with the outcome of the transaction that carried the change.
pub type Done = Box<dyn FnOnce(Result<()>) + Send>;

/// Handle to the writer thread. Changes are committed in the order they are submitted.
#[derive(Clone)]
pub struct GroupCommit {
    tx: mpsc::Sender<(Vec<Op>, Done)>,
}

/// Upper bound of changes per transaction, to keep one transaction's latency bounded.
const MAX_BATCH: usize = 4096;

impl GroupCommit {
    /// Starts the writer thread that owns `backend`.
    pub fn start<B: Backend>(mut backend: B) -> Self {
        let (tx, rx) = mpsc::channel::<(Vec<Op>, Done)>();
        thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    while batch.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(next) => batch.push(next),
                            Err(_) => break,
                        }
                    }
                    let ops: Vec<Op> = batch.iter().flat_map(|(ops, _)| ops.clone()).collect();
                    let outcome = backend.commit(&ops);
                    for (_, done) in batch {
                        done(outcome.clone());
                    }
                }
            })
            .expect("spawning the store writer thread");
        Self { tx }
    }

    /// Queues `ops` as one unit; `done` runs on the writer thread once they are durable (or not).
    pub fn submit(&self, ops: Vec<Op>, done: Done) {
        if let Err(mpsc::SendError((_, done))) = self.tx.send((ops, done)) {
            done(Err(StoreError("the store writer has stopped".into())));
        }
    }
}
