//! bluebatch-service: the single owner of bluebatch's state.
//!
//! The wire layer hands it typed, validated commands; it applies the Batch rules (bluebatch-core)
//! under one lock, writes the change through the store's group commit, pushes node-user changes
//! to the node fabric, and answers once the change is durable and the node has acknowledged it.
//! Reads are served from memory.

mod fabric;
mod lifecycle;
mod nodes;
mod pools;
mod state;
mod users;

pub use fabric::{BoxFuture, LoginLockout, NodeFabric};
pub use nodes::{AppliedUsers, NodeView};
pub use pools::PoolView;
pub use pools::Precondition;
pub use users::{UserAddr, Written};

use bluebatch_core::AccountChange;
use bluebatch_core::error::{BatchError, Code};
use bluebatch_core::model::{NodeUser, Os};
use bluebatch_core::{Clock, ServiceClock};
use bluebatch_store::{Backend, GroupCommit, Op};
use state::State;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::oneshot;

#[derive(Debug, Clone)]
pub struct Config {
    pub max_nodes_per_pool: u32,
    pub max_users_per_node: usize,
    /// Duration of each step of a node's life (creating → starting → idle, rebooting → idle, …).
    pub node_step: Duration,
    /// The address Get Remote Login Settings reports for Linux nodes.
    pub remote_login_ip: String,
    /// How long a user write waits, once durable, for the node to acknowledge its revision
    /// before it answers `OperationTimedOut` (the change stays recorded either way).
    pub ack_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_nodes_per_pool: 10_000,
            max_users_per_node: 1_000,
            node_step: Duration::from_millis(100),
            remote_login_ip: "127.0.0.1".into(),
            ack_timeout: Duration::from_secs(30),
        }
    }
}

/// Cheap to clone; every clone is the same service.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    store: GroupCommit,
    clock: Arc<ServiceClock>,
    nodes: Arc<dyn NodeFabric>,
    config: Config,
    /// When each node between states takes its next step (see lifecycle.rs).
    due: lifecycle::Due,
}

/// A commit the caller must await (outside the state lock) before answering.
#[must_use]
struct Pending(oneshot::Receiver<bluebatch_store::Result<()>>);

impl Pending {
    async fn durable(self) -> Result<(), BatchError> {
        match self.0.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => fatal_store_error(&e.to_string()),
            Err(_) => fatal_store_error("the writer dropped the change"),
        }
    }
}

/// Memory is ahead of the disk once a commit fails, so the only safe answer is to stop: a restart
/// reloads exactly what was committed (and acknowledged). Nothing unacknowledged survives.
fn fatal_store_error(what: &str) -> ! {
    tracing::error!("store commit failed, stopping: {what}");
    std::process::exit(70)
}

impl Service {
    /// Loads every record from `backend`, starts the group-commit writer, brings up every node's
    /// endpoint with its stored accounts, and resumes nodes that were between states.
    pub async fn start<B: Backend>(
        mut backend: B,
        clock: Arc<ServiceClock>,
        nodes: Arc<dyn NodeFabric>,
        config: Config,
    ) -> Result<Self, String> {
        let records = backend.load_all().map_err(|e| e.to_string())?;
        let state = State::load(records)?;
        // The clock first: nodes enforce expiry against it from the moment they start.
        if let Some(nanos) = state.clock_offset_nanos {
            clock.set_offset(time::Duration::nanoseconds(nanos));
            if nanos != 0 {
                tracing::info!(
                    offset_seconds = nanos / 1_000_000_000,
                    "service clock offset restored"
                );
            }
        }
        let svc = Service {
            inner: Arc::new(Inner {
                state: Mutex::new(state),
                store: GroupCommit::start(backend),
                clock,
                nodes,
                config,
                due: Default::default(),
            }),
        };
        svc.recover().await;
        Ok(svc)
    }

    pub fn clock(&self) -> &Arc<ServiceClock> {
        &self.inner.clock
    }

    /// Moves the service clock forward by `by` and stores the new offset; answers once it is
    /// durable (like every write), with the offset.
    pub async fn advance_clock(&self, by: time::Duration) -> Result<time::Duration, BatchError> {
        self.write_clock(|c| c.advance(by)).await
    }

    /// Puts the service clock back to the wall clock (offset zero), durably.
    pub async fn reset_clock(&self) -> Result<time::Duration, BatchError> {
        self.write_clock(|c| c.set_offset(time::Duration::ZERO))
            .await
    }

    async fn write_clock(
        &self,
        change: impl FnOnce(&ServiceClock),
    ) -> Result<time::Duration, BatchError> {
        let (offset, pending) = {
            // Under the state lock, so the store records offsets in the order memory took them.
            let _st = self.lock();
            change(&self.inner.clock);
            let offset = self.inner.clock.offset();
            let nanos = offset.whole_nanoseconds().clamp(0, i64::MAX as i128) as i64;
            let op = put_json(
                state::CLOCK_RECORD.to_string(),
                &state::ClockRecord {
                    offset_nanos: nanos,
                },
            );
            (offset, self.submit(vec![op]))
        };
        pending.durable().await?;
        Ok(offset)
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    pub fn fabric(&self) -> &Arc<dyn NodeFabric> {
        &self.inner.nodes
    }

    fn now(&self) -> time::OffsetDateTime {
        self.inner.clock.now()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a bug; the state itself is still consistent because
        // every mutation is applied before anything can fail, so keep serving.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `ops` for the store; call while holding the state lock so the store sees changes
    /// in the order memory did.
    fn submit(&self, ops: Vec<Op>) -> Pending {
        let (tx, rx) = oneshot::channel();
        self.inner.store.submit(
            ops,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        Pending(rx)
    }

    /// Pushes one account change to a Linux node's provider (under the state lock, in revision
    /// order). Windows nodes have no endpoint: the store is their whole truth.
    fn apply_to_node(&self, os: Os, key: &str, revision: u64, change: AccountChange) -> Ack {
        if os != Os::Linux || self.inner.nodes.apply(key, revision, change) >= revision {
            Ack::Given
        } else {
            Ack::Awaited {
                key: key.to_string(),
                revision,
            }
        }
    }

    /// Waits (outside the state lock, once the change is durable) for the node's
    /// acknowledgement, up to the request's `timeout` and at most `ack_timeout`; past it,
    /// `OperationTimedOut`.
    async fn acknowledged(&self, ack: Ack, timeout: Option<Duration>) -> Result<(), BatchError> {
        let Ack::Awaited { key, revision } = ack else {
            return Ok(());
        };
        let wait = self.inner.nodes.acknowledged(&key, revision);
        let limit = timeout.map_or(self.inner.config.ack_timeout, |t| {
            t.min(self.inner.config.ack_timeout)
        });
        tokio::time::timeout(limit, wait)
            .await
            .map_err(|_| not_acknowledged())
    }
}

/// Whether a node acknowledged a change when it was handed it.
enum Ack {
    Given,
    Awaited { key: String, revision: u64 },
}

/// The answer when a node did not acknowledge in time: the change is recorded regardless and the
/// node converges to it.
fn not_acknowledged() -> BatchError {
    BatchError::new(Code::OperationTimedOut).message(
        "The node did not acknowledge the change in time. The change is recorded and will be applied when the node converges.",
    )
}

fn put_json<T: serde::Serialize>(key: String, value: &T) -> Op {
    Op::Put {
        key,
        value: serde_json::to_vec(value).expect("model types always serialize"),
    }
}

fn pool_not_found() -> BatchError {
    BatchError::new(Code::PoolNotFound)
}

fn node_not_found() -> BatchError {
    BatchError::new(Code::NodeNotFound)
}

pub(crate) fn accounts_of(
    users: &std::collections::BTreeMap<String, NodeUser>,
) -> Vec<bluebatch_core::NodeAccount> {
    users.values().map(NodeUser::to_account).collect()
}
