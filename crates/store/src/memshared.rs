//! A [`SharedBackend`] in this process's memory: several services of one process share it as
//! replicas share PostgreSQL (the service's tests of replica behaviour, without a database).
//! Nothing survives the process.

use crate::shared::{AckNotice, BoxFuture, Change, Locked, SharedBackend, Snapshot};
use crate::{Op, Result, StoreError};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, OwnedMutexGuard};

#[derive(Clone, Default)]
pub struct MemShared {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    data: Mutex<Data>,
    write: Arc<tokio::sync::Mutex<()>>,
    changed: Notify,
    notices: std::sync::OnceLock<tokio::sync::broadcast::Sender<Arc<AckNotice>>>,
}

#[derive(Default)]
struct Data {
    rev: u64,
    records: BTreeMap<String, Vec<u8>>,
    log: Vec<Change>,
    /// The oldest revision the log no longer has (changes after it are all in `log`).
    pruned_to: u64,
    leases: HashMap<String, (String, Instant)>,
    seen: HashMap<String, Instant>,
    /// Refuse every call (a database that went away).
    down: bool,
}

impl MemShared {
    pub fn new() -> Self {
        Self::default()
    }

    fn data(&self) -> MutexGuard<'_, Data> {
        self.inner.data.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes every call fail until [`MemShared::set_down`]`(false)` (a database outage).
    pub fn set_down(&self, down: bool) {
        self.data().down = down;
    }

    /// Forgets the change log up to the head (replicas behind it read the snapshot).
    pub fn prune(&self) {
        let mut d = self.data();
        d.log.clear();
        d.pruned_to = d.rev;
    }

    fn notices(&self) -> &tokio::sync::broadcast::Sender<Arc<AckNotice>> {
        self.inner
            .notices
            .get_or_init(|| tokio::sync::broadcast::channel(1024).0)
    }

    fn check(&self) -> Result<()> {
        if self.data().down {
            return Err(StoreError("the database is down".into()));
        }
        Ok(())
    }
}

fn changes(d: &Data, after: u64) -> Option<Vec<Change>> {
    if after < d.pruned_to {
        return None;
    }
    Some(d.log.iter().filter(|c| c.rev > after).cloned().collect())
}

fn snapshot(d: &Data) -> Snapshot {
    Snapshot {
        rev: d.rev,
        records: d
            .records
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

fn apply(records: &mut BTreeMap<String, Vec<u8>>, op: &Op) {
    match op {
        Op::Put { key, value } => {
            records.insert(key.clone(), value.clone());
        }
        Op::Delete { key } => {
            records.remove(key);
        }
        Op::DeletePrefix { prefix } => records.retain(|k, _| !k.starts_with(prefix.as_str())),
    }
}

struct MemLocked {
    store: MemShared,
    _write: OwnedMutexGuard<()>,
}

impl Locked for MemLocked {
    fn rev(&self) -> u64 {
        self.store.data().rev
    }

    fn changes_since(&mut self, after: u64) -> BoxFuture<'_, Result<Option<Vec<Change>>>> {
        Box::pin(async move {
            self.store.check()?;
            Ok(changes(&self.store.data(), after))
        })
    }

    fn snapshot(&mut self) -> BoxFuture<'_, Result<Snapshot>> {
        Box::pin(async move {
            self.store.check()?;
            Ok(snapshot(&self.store.data()))
        })
    }

    fn commit(self: Box<Self>, ops: Vec<Op>) -> BoxFuture<'static, Result<u64>> {
        Box::pin(async move {
            self.store.check()?;
            // All or nothing, as every backend: a malformed op fails the whole commit first.
            if let Some(Op::DeletePrefix { prefix }) = ops
                .iter()
                .find(|op| matches!(op, Op::DeletePrefix { prefix } if !prefix.ends_with('/')))
            {
                return Err(StoreError(format!("prefix {prefix:?} must end with '/'")));
            }
            let rev = {
                let mut d = self.store.data();
                if ops.is_empty() {
                    return Ok(d.rev);
                }
                let rev = d.rev + 1;
                for op in &ops {
                    apply(&mut d.records, op);
                }
                d.log.extend(ops.into_iter().map(|op| Change { rev, op }));
                d.rev = rev;
                rev
            };
            self.store.inner.changed.notify_waiters();
            Ok(rev)
        })
    }
}

impl SharedBackend for MemShared {
    fn snapshot(&self) -> BoxFuture<'_, Result<Snapshot>> {
        Box::pin(async move {
            self.check()?;
            Ok(snapshot(&self.data()))
        })
    }

    fn head(&self) -> BoxFuture<'_, Result<u64>> {
        Box::pin(async move {
            self.check()?;
            Ok(self.data().rev)
        })
    }

    fn changes_since(&self, after: u64) -> BoxFuture<'_, Result<Option<Vec<Change>>>> {
        Box::pin(async move {
            self.check()?;
            Ok(changes(&self.data(), after))
        })
    }

    fn lock(&self) -> BoxFuture<'_, Result<Box<dyn Locked>>> {
        Box::pin(async move {
            self.check()?;
            let write = self.inner.write.clone().lock_owned().await;
            Ok(Box::new(MemLocked {
                store: self.clone(),
                _write: write,
            }) as Box<dyn Locked>)
        })
    }

    fn claim_lease<'a>(
        &'a self,
        name: &'a str,
        holder: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            self.check()?;
            let now = Instant::now();
            let mut d = self.data();
            let free = d
                .leases
                .get(name)
                .is_none_or(|(h, until)| h == holder || *until < now);
            if free {
                d.leases
                    .insert(name.to_string(), (holder.to_string(), now + ttl));
            }
            Ok(free)
        })
    }

    fn release_lease<'a>(&'a self, name: &'a str, holder: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check()?;
            let mut d = self.data();
            if d.leases.get(name).is_some_and(|(h, _)| h == holder) {
                d.leases.remove(name);
            }
            Ok(())
        })
    }

    fn changed(&self, max: Duration) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let _ = tokio::time::timeout(max, self.inner.changed.notified()).await;
        })
    }

    fn announce_acks<'a>(&'a self, notice: &'a AckNotice) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if self.check().is_ok() {
                let _ = self.notices().send(Arc::new(notice.clone()));
            }
        })
    }

    fn ack_notices(&self) -> Option<tokio::sync::broadcast::Receiver<Arc<AckNotice>>> {
        Some(self.notices().subscribe())
    }

    fn hosts_seen<'a>(&'a self, hosts: &'a [String]) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check()?;
            let now = Instant::now();
            let mut d = self.data();
            for h in hosts {
                d.seen.insert(h.clone(), now);
            }
            Ok(())
        })
    }

    fn host_ages(&self) -> BoxFuture<'_, Result<Vec<(String, Duration)>>> {
        Box::pin(async move {
            self.check()?;
            let now = Instant::now();
            Ok(self
                .data()
                .seen
                .iter()
                .map(|(h, t)| (h.clone(), now.saturating_duration_since(*t)))
                .collect())
        })
    }

    fn ping(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move { self.check() })
    }

    fn pool_nodes<'a>(
        &'a self,
        account: &'a str,
        pool_key: &'a str,
        after: Option<&'a str>,
        state: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Vec<u8>>>> {
        Box::pin(async move {
            self.check()?;
            let prefix = format!("node/{account}/{pool_key}/");
            let from = format!("{prefix}{}", after.unwrap_or(""));
            let d = self.data();
            Ok(d.records
                .range(from..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .filter(|(k, _)| after.is_none_or(|a| k[prefix.len()..] > *a))
                .filter(|(_, v)| {
                    state.is_none_or(|s| serde_json_state(v).is_some_and(|st| st == s))
                })
                .take(limit)
                .map(|(_, v)| v.clone())
                .collect())
        })
    }
}

/// The top-level `"state"` of a JSON node record.
fn serde_json_state(v: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(v).ok()?;
    value.get("state")?.as_str().map(str::to_string)
}
