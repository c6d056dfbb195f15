//! The crypt hashes of user writes, on threads of their own.
//!
//! A SHA-512-crypt hash costs about a millisecond of CPU. Handed to tokio's blocking pool one by
//! one (`spawn_blocking`), each hash wakes whichever idle pool thread comes next, and the pool
//! grows to as many threads as hashes in flight; measured in isolation that gave about 8 % fewer
//! hashes a second than plain threads hashing in a loop. Here a fixed set of threads takes the
//! hashes from one queue: a thread that ends a hash starts the next queued one at once, without
//! a round through the async runtime.

use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex, OnceLock};

type Job = (String, tokio::sync::oneshot::Sender<String>);

static QUEUE: OnceLock<Sender<Job>> = OnceLock::new();

/// Threads hashing at once: four per CPU, 8 to 64. The kernel shares a CPU among runnable
/// threads alike, and the hashes compete with the runtime's workers, the store's writer and,
/// on a shared machine, everyone else's threads; on two CPUs 8 or 16 threads hashed 3–5 % more
/// a second than two (`docs/performance.md`, eighth pass).
fn threads() -> usize {
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    (4 * cpus).clamp(8, 64)
}

fn queue() -> &'static Sender<Job> {
    QUEUE.get_or_init(|| {
        let (tx, rx) = channel::<Job>();
        // Shared by the threads alone: once none is left (none started, or all gone), the
        // receiver goes with them and a hash answers `None` instead of waiting forever.
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads() {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("bb-hash-{i}"))
                .spawn(move || hash_jobs(&rx));
            if spawned.is_err() {
                tracing::warn!("could not start a password-hashing thread");
            }
        }
        tx
    })
}

/// One hashing thread: takes a job at a time (the lock is held only to take it) until the
/// queue closes. A panicking hash fails its own request only (its answer is dropped).
fn hash_jobs(rx: &Mutex<Receiver<Job>>) {
    loop {
        let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
        let Ok((password, answer)) = job else { return };
        let hashed = std::panic::catch_unwind(|| bluebatch_core::crypt::hash_password(&password));
        if let Ok(h) = hashed {
            let _ = answer.send(h);
        }
    }
}

/// The crypt hash of `password`, computed on a hashing thread; `None` if none is running.
pub(crate) async fn hash_password(password: String) -> Option<String> {
    let (answer, hashed) = tokio::sync::oneshot::channel();
    queue().send((password, answer)).ok()?;
    hashed.await.ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bluebatch_core::crypt::verify_password;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn more_hashes_than_threads_at_once_each_answer_its_own_password() {
        let n = threads() * 3;
        let tasks: Vec<_> = (0..n)
            .map(|i| tokio::spawn(async move { (i, hash_password(format!("pw-{i}")).await) }))
            .collect();
        let mut seen = std::collections::HashSet::new();
        for t in tasks {
            let (i, h) = t.await.unwrap();
            let h = h.expect("a hashing thread answers");
            assert!(verify_password(&format!("pw-{i}"), &h), "{i}");
            assert!(!verify_password(&format!("pw-{}", i + 1), &h), "{i}");
            assert!(seen.insert(h), "a salt repeated");
        }
        let named = std::fs::read_dir("/proc/self/task")
            .map(|d| {
                d.filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
                    .filter(|c| c.starts_with("bb-hash-"))
                    .count()
            })
            .unwrap_or(threads());
        assert_eq!(named, threads(), "a fixed set of hashing threads");
    }
}
