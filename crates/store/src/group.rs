//! Group commit: the single writer of a backend.
//!
//! Callers append to a shared queue; the writer takes the whole queue at once, commits it as one
//! transaction and answers every change in it. A caller wakes the writer only when it is parked,
//! so under load (the writer busy syncing) submitting costs a lock and a push, no wake-up.

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
                    for done in dones {
                        done(outcome.clone());
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
