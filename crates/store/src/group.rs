//! Group commit: the single writer of a backend.
//!
//! Callers append to a shared queue and only one committer at a time touches the backend: it
//! takes the whole queue at once, commits it as one transaction and answers every change in it.
//! When no commit is in flight, the caller that queued a change commits it on its own thread
//! ([`Ticket::commit`], leader-style: no hand-off to another thread for a lone request); changes
//! queued while a commit is in flight wait for it, and the committer hands what queued meanwhile
//! to the writer thread, which commits batch after batch until the queue is empty. So a lone
//! write costs its own commit and nothing else, and under load the throughput is not bounded by
//! the disk's sync rate.
//!
//! Ordering and durability are the same whoever commits: changes are committed in the order
//! they were queued (each commit takes the queue's head up to its end), and a change's `done`
//! runs only once the transaction that carried it returned.
//!
//! The first failed commit stops the store for good: that change and every change queued or
//! submitted after it fail, and the backend is never written again. After a failed `write` or
//! `fsync` the disk's state is unknown (a later `fsync` may succeed without the earlier pages
//! having reached the disk), so no later commit could be answered as durable.
//!
//! A change may be queued with some patience ([`GroupCommit::enqueue_within`]): a write that
//! already spent a millisecond of CPU on a password hash, with more such writes hashing behind
//! it, can wait a fraction of that to share a sync with them. A change queued without patience
//! commits everything queued at once. Only a backend that syncs waits.
//!
//! Maintenance (SQLite's checkpoint, [`Backend::maintenance_due`]) is never run in a change's
//! commit: the writer thread runs it once the queue is empty (or, under a load that never leaves
//! it empty, between two batches once it is long overdue), holding the backend like a commit, so
//! a failed checkpoint stops the store exactly as a failed commit does.

use crate::{Backend, Op, Result, StoreError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

/// Batches a leader of a backend that does not sync commits before it hands the rest on.
const INLINE_BATCHES: usize = 4;

/// Called once with the outcome of the transaction that carried the change.
pub type Done = Box<dyn FnOnce(Result<()>) + Send>;

#[derive(Default)]
struct Queue {
    items: Vec<(Vec<Op>, Done)>,
    /// Someone (a leader on its own thread, or the writer thread) owns the backend now; only it
    /// commits, and before it lets go it hands what is queued to the writer thread.
    busy: bool,
    /// The writer thread is asked to take over the backend (`busy` stays set for it).
    handoff: bool,
    /// Every handle is gone: stop.
    closed: bool,
    /// A commit failed: every change from then on fails with this.
    failed: Option<StoreError>,
    /// When the last committer let go of the backend (`None`: never committed yet).
    idle_since: Option<Instant>,
    /// How long the last commit took in the backend.
    last_commit: Duration,
    /// The earliest moment a queued change asked to be committed by (`None`: nothing queued).
    commit_by: Option<Instant>,
    /// The writer thread waits for `commit_by` (a change queued without patience wakes it).
    lingering: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    /// Touched only by whoever set `busy`, so never contended.
    backend: Mutex<Box<dyn Backend>>,
    /// The backend's commits wait for a disk ([`Backend::syncs`]).
    syncs: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn backend(&self) -> MutexGuard<'_, Box<dyn Backend>> {
        self.backend.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Commits `batch` as one transaction and answers it (caller holds `busy`). On failure the
    /// store stops: `failed` is set and everything queued fails; `false`.
    fn commit_batch(&self, batch: Vec<(Vec<Op>, Done)>) -> bool {
        let writes = batch.len();
        let (ops, dones): (Vec<Vec<Op>>, Vec<Done>) = batch.into_iter().unzip();
        let ops: Vec<Op> = if writes == 1 {
            ops.into_iter().next().unwrap_or_default()
        } else {
            ops.into_iter().flatten().collect()
        };
        let started = Instant::now();
        let outcome = self.backend().commit(&ops);
        let took = started.elapsed();
        self.lock().last_commit = took;
        bluebatch_metrics::global().commit(writes, took);
        match outcome {
            Ok(()) => {
                for done in dones {
                    done(Ok(()));
                }
                true
            }
            Err(e) => {
                for done in dones {
                    done(Err(e.clone()));
                }
                self.stop(StoreError(format!(
                    "the store stopped after a failed commit ({e})"
                )));
                false
            }
        }
    }

    /// No later change reaches the backend: fail what is queued, and (in `enqueue`) whatever
    /// comes after. `busy` stays set for good.
    fn stop(&self, stopped: StoreError) {
        let queued = {
            let mut q = self.lock();
            q.failed = Some(stopped.clone());
            std::mem::take(&mut q.items)
        };
        for (_, done) in queued {
            done(Err(stopped.clone()));
        }
    }

    /// Lets go of the backend (caller holds `busy`): to the writer thread when changes are
    /// queued or maintenance is due, else free for the next leader.
    fn release(&self, due: bool) {
        let mut q = self.lock();
        if q.items.is_empty() && !due {
            q.busy = false;
            q.idle_since = Some(Instant::now());
        } else {
            q.handoff = true;
            self.wake.notify_one();
        }
    }

    /// Commits what is queued on this thread if the writer is idle (the leader); otherwise the
    /// committer in flight hands it on, so returning is all there is to do.
    ///
    /// A backend that syncs is led inline only when the writer has been idle for more than
    /// twice its last commit: a lone change then costs its own commit and no hand-off, while a
    /// steady load (commits back to back) keeps its syncs on the writer thread, where they
    /// overlap with the callers' work instead of blocking a caller's thread each, and keep
    /// their batches whole. A backend that does not sync (in memory) commits in microseconds:
    /// its leader commits inline always, and what queued meanwhile too (a few batches at most).
    fn lead(&self) {
        let mut batch = {
            let mut q = self.lock();
            if q.busy || q.items.is_empty() {
                return;
            }
            let now = Instant::now();
            let idle = q
                .idle_since
                .is_none_or(|t| now.duration_since(t) > q.last_commit * 2);
            let waits = q.commit_by.is_some_and(|by| by > now);
            q.busy = true;
            if self.syncs && (!idle || waits) {
                q.handoff = true;
                self.wake.notify_one();
                return;
            }
            q.commit_by = None;
            std::mem::take(&mut q.items)
        };
        let mut rounds = 0;
        loop {
            if !self.commit_batch(batch) {
                return;
            }
            rounds += 1;
            if self.syncs || rounds == INLINE_BATCHES {
                break;
            }
            let mut q = self.lock();
            if q.items.is_empty() {
                break;
            }
            // Taken only to be committed at once: every change taken is answered.
            q.commit_by = None;
            batch = std::mem::take(&mut q.items);
        }
        let due = self.backend().maintenance_due();
        self.release(due);
    }

    /// Makes sure what is queued gets committed without this thread committing it.
    fn kick(&self) {
        let mut q = self.lock();
        if !q.busy && !q.items.is_empty() {
            q.busy = true;
            q.handoff = true;
            self.wake.notify_one();
        }
    }

    /// The writer thread: takes over the backend when handed it, commits until the queue is
    /// empty, runs maintenance when due, lets go.
    fn writer(&self) {
        loop {
            let mut q = self.lock();
            while !q.handoff {
                if q.closed {
                    return;
                }
                q = self.wake.wait(q).unwrap_or_else(|p| p.into_inner());
            }
            q.handoff = false;
            let mut batches = 0u32;
            loop {
                if q.items.is_empty() {
                    drop(q);
                    // Idle: the moment for maintenance, which queued changes wait behind.
                    let mut b = self.backend();
                    if b.maintenance_due()
                        && let Err(e) = b.maintain()
                    {
                        drop(b);
                        self.stop(StoreError(format!(
                            "the store stopped after a failed checkpoint ({e})"
                        )));
                        return;
                    }
                    drop(b);
                    q = self.lock();
                    if q.items.is_empty() {
                        q.busy = false;
                        q.idle_since = Some(Instant::now());
                        break;
                    }
                    continue;
                }
                // Changes queued with patience wait for company up to the first one's limit.
                if let Some(by) = q.commit_by
                    && let Some(wait) = by.checked_duration_since(Instant::now())
                    && !wait.is_zero()
                {
                    q.lingering = true;
                    q = self
                        .wake
                        .wait_timeout(q, wait)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                    q.lingering = false;
                    continue;
                }
                q.commit_by = None;
                let batch = std::mem::take(&mut q.items);
                drop(q);
                if !self.commit_batch(batch) {
                    return;
                }
                batches += 1;
                // A load that never empties the queue still gets its maintenance.
                if batches.is_multiple_of(64) {
                    let mut b = self.backend();
                    if b.maintenance_overdue()
                        && let Err(e) = b.maintain()
                    {
                        drop(b);
                        self.stop(StoreError(format!(
                            "the store stopped after a failed checkpoint ({e})"
                        )));
                        return;
                    }
                }
                q = self.lock();
            }
        }
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

/// Handle to the store's committer. Changes are committed in the order they are queued.
#[derive(Clone)]
pub struct GroupCommit {
    shared: Arc<Shared>,
    _closer: Arc<Closer>,
}

/// A queued change not committed yet: [`Ticket::commit`] commits it (and whatever queued
/// before it) on the calling thread when no commit is in flight; dropping the ticket instead
/// hands it to the writer thread. Either way `done` runs exactly once.
#[must_use = "a ticket commits its change when committed or dropped"]
pub struct Ticket {
    store: Option<GroupCommit>,
}

impl Ticket {
    /// Blocks for the commit (one transaction and its sync) when this thread leads it; returns
    /// at once when a commit is in flight (its committer hands this change on) or when the
    /// change was committed already. Then the change's `done` has run or will run elsewhere.
    pub fn commit(mut self) {
        if let Some(g) = self.store.take() {
            g.shared.lead();
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(g) = self.store.take() {
            g.shared.kick();
        }
    }
}

impl GroupCommit {
    /// Starts the writer thread of `backend`.
    pub fn start<B: Backend>(backend: B) -> Self {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            syncs: backend.syncs(),
            backend: Mutex::new(Box::new(backend)),
        });
        let writer = shared.clone();
        thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer.writer())
            .expect("spawning the store writer thread");
        Self {
            _closer: Arc::new(Closer(shared.clone())),
            shared,
        }
    }

    /// Queues `ops` as one unit, committed by whoever commits next (see [`Ticket`]); `done`
    /// runs once they are durable (or not). Call [`Ticket::commit`] where blocking for one
    /// commit is fine (not under a lock others need).
    pub fn enqueue(&self, ops: Vec<Op>, done: Done) -> Ticket {
        self.enqueue_within(ops, done, Duration::ZERO)
    }

    /// [`GroupCommit::enqueue`] of a change that may wait up to `patience` for other changes
    /// to share its commit (the caller expects them; a change queued without patience ends the
    /// wait). A backend that does not sync never waits.
    pub fn enqueue_within(&self, ops: Vec<Op>, done: Done, patience: Duration) -> Ticket {
        let mut q = self.shared.lock();
        if let Some(e) = q.failed.clone() {
            drop(q);
            done(Err(e));
            return Ticket { store: None };
        }
        if q.closed {
            drop(q);
            done(Err(StoreError("the store writer has stopped".into())));
            return Ticket { store: None };
        }
        let now = Instant::now();
        let by = if self.shared.syncs {
            now + patience
        } else {
            now
        };
        q.commit_by = Some(q.commit_by.map_or(by, |b| b.min(by)));
        if q.lingering && by <= now {
            self.shared.wake.notify_one();
        }
        q.items.push((ops, done));
        Ticket {
            store: Some(self.clone()),
        }
    }

    /// Queues `ops` as one unit for the writer thread; `done` runs there once they are durable
    /// (or not).
    pub fn submit(&self, ops: Vec<Op>, done: Done) {
        drop(self.enqueue(ops, done));
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

    /// Records which thread ran each commit and maintenance, and the keys in commit order.
    #[derive(Clone, Default)]
    struct Recorder {
        log: Arc<Mutex<Vec<(String, thread::ThreadId)>>>,
        batches: Arc<Mutex<Vec<usize>>>,
        due: Arc<std::sync::atomic::AtomicBool>,
        fail_maintain: bool,
        slow: Option<Duration>,
        /// Commits in memory (no sync): its leaders commit several batches inline.
        memory: bool,
    }

    impl Recorder {
        /// The keys committed, in commit order.
        fn keys(&self) -> Vec<String> {
            self.log
                .lock()
                .unwrap()
                .iter()
                .map(|(k, _)| k.clone())
                .collect()
        }
    }

    impl Backend for Recorder {
        fn load_all(&mut self) -> Result<Vec<(String, Vec<u8>)>> {
            Ok(Vec::new())
        }
        fn commit(&mut self, ops: &[Op]) -> Result<()> {
            if let Some(d) = self.slow {
                thread::sleep(d);
            }
            let mut log = self.log.lock().unwrap();
            for op in ops {
                if let Op::Put { key, .. } = op {
                    log.push((key.clone(), thread::current().id()));
                }
            }
            self.batches.lock().unwrap().push(ops.len());
            Ok(())
        }
        fn syncs(&self) -> bool {
            !self.memory
        }
        fn maintenance_due(&self) -> bool {
            self.due.load(Ordering::SeqCst)
        }
        fn maintain(&mut self) -> Result<()> {
            self.due.store(false, Ordering::SeqCst);
            self.log
                .lock()
                .unwrap()
                .push(("<maintain>".into(), thread::current().id()));
            if self.fail_maintain {
                Err(StoreError("checkpoint: disk I/O error".into()))
            } else {
                Ok(())
            }
        }
    }

    fn enqueue(g: &GroupCommit, k: &str) -> (Ticket, mpsc::Receiver<Result<()>>) {
        let (tx, rx) = mpsc::channel();
        let t = g.enqueue(put(k), Box::new(move |r| tx.send(r).unwrap()));
        (t, rx)
    }

    #[test]
    fn a_lone_change_is_committed_on_the_callers_thread_before_commit_returns() {
        let rec = Recorder::default();
        let g = GroupCommit::start(rec.clone());
        for k in ["a", "b", "c"] {
            // The writer idle for longer than twice its last commit.
            thread::sleep(Duration::from_millis(5));
            let (t, rx) = enqueue(&g, k);
            t.commit();
            // Done already: no other thread was involved.
            assert_eq!(rx.try_recv(), Ok(Ok(())));
        }
        let log = rec.log.lock().unwrap();
        assert_eq!(log.len(), 3);
        assert!(log.iter().all(|(_, t)| *t == thread::current().id()));
    }

    fn enqueue_patient(
        g: &GroupCommit,
        k: &str,
        patience: Duration,
    ) -> (Ticket, mpsc::Receiver<Result<()>>) {
        let (tx, rx) = mpsc::channel();
        let t = g.enqueue_within(put(k), Box::new(move |r| tx.send(r).unwrap()), patience);
        (t, rx)
    }

    const SOON: Duration = Duration::from_secs(1);

    #[test]
    fn changes_with_patience_share_one_commit_at_the_first_ones_limit() {
        let rec = Recorder::default();
        let g = GroupCommit::start(rec.clone());
        let patience = Duration::from_millis(600);
        let queued = Instant::now();
        let rxs: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|k| {
                let (t, rx) = enqueue_patient(&g, k, patience);
                t.commit();
                rx
            })
            .collect();
        // Nothing committed on the caller's thread although the writer was idle.
        assert_eq!(rxs[0].try_recv(), Err(mpsc::TryRecvError::Empty));
        for rx in &rxs {
            assert_eq!(rx.recv_timeout(patience + SOON), Ok(Ok(())));
        }
        assert!(queued.elapsed() >= patience - Duration::from_millis(50));
        assert_eq!(*rec.batches.lock().unwrap(), vec![3]);
        // No patience: committed at once, on the caller's thread.
        thread::sleep(Duration::from_millis(5));
        let (t, rx) = enqueue(&g, "d");
        t.commit();
        assert_eq!(rx.try_recv(), Ok(Ok(())));
        assert_eq!(*rec.batches.lock().unwrap(), vec![3, 1]);
    }

    #[test]
    fn a_change_without_patience_commits_the_waiting_ones_at_once_in_order() {
        let rec = Recorder::default();
        let g = GroupCommit::start(rec.clone());
        let patience = Duration::from_secs(30);
        let mut rxs = Vec::new();
        for k in ["a", "b", "c"] {
            let (t, rx) = enqueue_patient(&g, k, patience);
            t.commit();
            rxs.push(rx);
        }
        let (t, now) = enqueue(&g, "d");
        drop(t);
        assert_eq!(now.recv_timeout(SOON), Ok(Ok(())));
        for rx in &rxs {
            assert_eq!(rx.recv_timeout(SOON), Ok(Ok(())));
        }
        let keys = rec.keys();
        assert_eq!(keys, ["a", "b", "c", "d"]);
        assert_eq!(*rec.batches.lock().unwrap(), vec![4]);
    }

    #[test]
    fn a_backend_that_does_not_sync_never_waits() {
        let rec = Recorder {
            memory: true,
            ..Recorder::default()
        };
        let g = GroupCommit::start(rec.clone());
        for k in ["a", "b", "c"] {
            let (t, rx) = enqueue_patient(&g, k, Duration::from_secs(30));
            t.commit();
            assert_eq!(rx.try_recv(), Ok(Ok(())));
        }
    }

    #[test]
    fn a_dropped_ticket_is_committed_by_the_writer_thread() {
        let rec = Recorder::default();
        let g = GroupCommit::start(rec.clone());
        let (t, rx) = enqueue(&g, "a");
        drop(t);
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(Ok(())));
        let log = rec.log.lock().unwrap();
        assert_ne!(log[0].1, thread::current().id());
        // The old entry point still works the same way.
        drop(log);
        assert_eq!(commit(&g, "b"), Ok(()));
    }

    #[test]
    fn concurrent_changes_are_committed_in_queue_order_and_batched() {
        concurrent_changes(Recorder {
            slow: Some(Duration::from_millis(2)),
            ..Recorder::default()
        });
    }

    #[test]
    fn concurrent_changes_in_memory_are_all_answered_in_queue_order() {
        // Leaders commit up to INLINE_BATCHES batches each: none taken may go unanswered.
        for _ in 0..20 {
            concurrent_changes(Recorder {
                slow: Some(Duration::from_micros(200)),
                memory: true,
                ..Recorder::default()
            });
        }
    }

    fn concurrent_changes(rec: Recorder) {
        let g = GroupCommit::start(rec.clone());
        // The queue order, taken under one lock with the enqueue itself.
        let order = Arc::new(Mutex::new(Vec::new()));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let (g, order) = (g.clone(), order.clone());
                thread::spawn(move || {
                    for i in 0..25 {
                        let k = format!("t{t}-{i}");
                        let (ticket, rx) = {
                            let mut o = order.lock().unwrap();
                            o.push(k.clone());
                            enqueue(&g, &k)
                        };
                        ticket.commit();
                        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(Ok(())));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let committed = rec.keys();
        assert_eq!(committed, *order.lock().unwrap());
        let batches = rec.batches.lock().unwrap();
        assert!(
            batches.iter().any(|&n| n > 1),
            "no batch of several: {batches:?}"
        );
        assert!(batches.len() < 200);
    }

    #[test]
    fn maintenance_runs_on_the_writer_thread_never_in_a_callers_commit() {
        let rec = Recorder::default();
        let g = GroupCommit::start(rec.clone());
        rec.due.store(true, Ordering::SeqCst);
        let (t, rx) = enqueue(&g, "a");
        t.commit();
        assert_eq!(rx.try_recv(), Ok(Ok(())));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while rec.due.load(Ordering::SeqCst) {
            assert!(
                std::time::Instant::now() < deadline,
                "maintenance never ran"
            );
            thread::sleep(Duration::from_millis(1));
        }
        let log = rec.log.lock().unwrap();
        assert_eq!(log[0], ("a".into(), thread::current().id()));
        assert_eq!(log[1].0, "<maintain>");
        assert_ne!(log[1].1, thread::current().id());
    }

    #[test]
    fn a_failed_maintenance_stops_the_store() {
        let rec = Recorder {
            fail_maintain: true,
            ..Recorder::default()
        };
        let g = GroupCommit::start(rec.clone());
        rec.due.store(true, Ordering::SeqCst);
        assert_eq!(commit(&g, "a"), Ok(()));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while rec.due.load(Ordering::SeqCst) {
            assert!(
                std::time::Instant::now() < deadline,
                "maintenance never ran"
            );
            thread::sleep(Duration::from_millis(1));
        }
        // Whatever comes after the failed checkpoint fails and never reaches the backend (the
        // writer held the backend from the checkpoint's start and never lets go).
        let (t, rx) = enqueue(&g, "b");
        t.commit();
        let e = rx
            .recv_timeout(Duration::from_secs(5))
            .unwrap()
            .unwrap_err();
        assert!(e.0.contains("failed checkpoint"), "{e}");
        assert!(!rec.log.lock().unwrap().iter().any(|(k, _)| k == "b"));
    }
}
