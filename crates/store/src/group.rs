//! Group commit: the single writer of a backend.
//!
//! Callers append to a shared queue; the writer takes the whole queue at once, commits it as one
//! transaction and answers every change in it. A caller wakes the writer only when it is parked,
//! so under load (the writer busy syncing) submitting costs a lock and a push, no wake-up.
//!
//! The first failed commit stops the writer for good: that change and every change queued or
//! submitted after it fail, and the backend is never written again. After a failed `write` or
//! `fsync` the disk's state is unknown (a later `fsync` may succeed without the earlier pages
//! having reached the disk), so no later commit could be answered as durable.

use crate::{Backend, Op, Result, StoreError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;

/// Called once with the outcome of the transaction that carried the change.
pub type Done = Box<dyn FnOnce(Result<()>) + Send>;

#[derive(Default)]
struct Queue {
    items: Vec<(Vec<Op>, Done)>,
    /// The writer is waiting for work.
    parked: bool,
    /// Every handle is gone: drain and stop.
    closed: bool,
    /// A commit failed: every change from then on fails with this.
    failed: Option<StoreError>,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Closes the queue when the last handle goes.
struct Closer(Arc<Shared>);

impl Drop for Closer {
    fn drop(&mut self) {
        self.0.lock().closed = true;
        self.0.wake.notify_one();
    }
}

/// Handle to the writer thread. Changes are committed in the order they are submitted.
#[derive(Clone)]
pub struct GroupCommit {
    shared: Arc<Shared>,
    _closer: Arc<Closer>,
}

impl GroupCommit {
    /// Starts the writer thread that owns `backend`.
    pub fn start<B: Backend>(mut backend: B) -> Self {
        let shared = Arc::new(Shared::default());
        let writer = shared.clone();
        thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || {
                loop {
                    let batch = {
                        let mut q = writer.lock();
                        while q.items.is_empty() {
                            if q.closed {
                                return;
                            }
                            q.parked = true;
                            q = writer.wake.wait(q).unwrap_or_else(|p| p.into_inner());
                        }
                        q.parked = false;
                        std::mem::take(&mut q.items)
                    };
                    let (ops, dones): (Vec<Vec<Op>>, Vec<Done>) = batch.into_iter().unzip();
                    let ops: Vec<Op> = ops.into_iter().flatten().collect();
                    let outcome = backend.commit(&ops);
                    let failed = outcome.as_ref().err().map(|e| {
                        StoreError(format!("the store stopped after a failed commit ({e})"))
                    });
                    for done in dones {
                        done(outcome.clone());
                    }
                    if let Some(stopped) = failed {
                        // No later change reaches the backend: fail what is queued, and (in
                        // `submit`) whatever comes after.
                        let queued = {
                            let mut q = writer.lock();
                            q.failed = Some(stopped.clone());
                            std::mem::take(&mut q.items)
                        };
                        for (_, done) in queued {
                            done(Err(stopped.clone()));
                        }
                        return;
                    }
                }
            })
            .expect("spawning the store writer thread");
        Self {
            _closer: Arc::new(Closer(shared.clone())),
            shared,
        }
    }

    /// Queues `ops` as one unit; `done` runs on the writer thread once they are durable (or not).
    pub fn submit(&self, ops: Vec<Op>, done: Done) {
        let mut q = self.shared.lock();
        if let Some(e) = q.failed.clone() {
            drop(q);
            done(Err(e));
            return;
        }
        if q.closed {
            drop(q);
            done(Err(StoreError("the store writer has stopped".into())));
            return;
        }
        q.items.push((ops, done));
        if q.parked {
            q.parked = false;
            self.shared.wake.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::time::Duration;

    /// Fails its second commit, and counts every commit it is asked for.
    struct FailsSecond(Arc<AtomicUsize>);

    impl Backend for FailsSecond {
        fn load_all(&mut self) -> Result<Vec<(String, Vec<u8>)>> {
            Ok(Vec::new())
        }
        fn commit(&mut self, _ops: &[Op]) -> Result<()> {
            match self.0.fetch_add(1, Ordering::SeqCst) {
                1 => Err(StoreError("disk I/O error".into())),
                _ => Ok(()),
            }
        }
    }

    fn put(k: &str) -> Vec<Op> {
        vec![Op::Put {
            key: k.into(),
            value: Vec::new(),
        }]
    }

    fn commit(g: &GroupCommit, k: &str) -> Result<()> {
        let (tx, rx) = mpsc::channel();
        g.submit(put(k), Box::new(move |r| tx.send(r).unwrap()));
        rx.recv_timeout(Duration::from_secs(5))
            .expect("the writer answers")
    }

    #[test]
    fn after_a_failed_commit_nothing_is_committed_again() {
        let commits = Arc::new(AtomicUsize::new(0));
        let g = GroupCommit::start(FailsSecond(commits.clone()));
        assert_eq!(commit(&g, "a"), Ok(()));
        assert!(commit(&g, "b").is_err());
        // The backend would succeed now; the writer must not ask it.
        for k in ["c", "d"] {
            let e = commit(&g, k).unwrap_err();
            assert!(e.0.contains("failed commit"), "{e}");
        }
        assert_eq!(commits.load(Ordering::SeqCst), 2);
    }
}
