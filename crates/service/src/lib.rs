//! bluebatch-service: the single owner of bluebatch's state.
//!
//! The wire layer hands it typed, validated commands; it applies the Batch rules (bluebatch-core)
//! under one lock, writes the change through the store's group commit, pushes node-user changes
//! to the node fabric, and answers once the change is durable and the node has acknowledged it.
//! Reads are served from memory.

mod agents;
mod fabric;
mod lifecycle;
mod logins;
mod nodes;
mod pools;
mod precheck;
mod sandbox;
mod shared;
mod state;
mod users;

pub use agents::{HostView, JoinTokenCreated, JoinTokenView, MAX_HOST_SLOTS, MAX_TOKEN_TTL};
pub use bluebatch_protocol::NodeSource;
pub use fabric::{BoxFuture, LoginLockout, LoginRecord, NodeFabric};
pub use nodes::{AppliedUsers, NodeView, NodeWritten};
pub use pools::Precondition;
pub use pools::{PoolView, PoolWritten};
pub use sandbox::SandboxDemand;
pub use shared::LEASE_TTL;
pub use users::{UserAddr, Written};

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
    /// Where the nodes of a pool without a `bluebatch.nodes` metadata item come from.
    pub default_nodes: NodeSource,
    /// How long a joined host may go without polling before its nodes are `unknown`.
    pub agent_grace: Duration,
    /// How long a node credential lives (renewed through the long poll past half its life).
    pub credential_ttl: Duration,
    /// The service has sandboxed nodes (`serve --nodes sandbox` runs their manager): pools may
    /// ask for them. Without it a pool asking for sandbox nodes is refused.
    pub sandbox_nodes: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_nodes_per_pool: 10_000,
            max_users_per_node: 1_000,
            node_step: Duration::from_millis(100),
            remote_login_ip: "127.0.0.1".into(),
            ack_timeout: Duration::from_secs(30),
            default_nodes: NodeSource::Embedded,
            agent_grace: Duration::from_secs(60),
            credential_ttl: Duration::from_secs(24 * 3600),
            sandbox_nodes: false,
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
    /// The embedded store's writer (`None` on a shared store).
    store: Option<GroupCommit>,
    /// The shared store (PostgreSQL) and this replica's cache of it.
    shared: Option<shared::Shared>,
    clock: Arc<ServiceClock>,
    nodes: Arc<dyn NodeFabric>,
    config: Config,
    /// When each node between states takes its next step (see lifecycle.rs).
    due: lifecycle::Due,
    /// Wake-ups of agents' long polls and of writes waiting for agent nodes.
    hub: agents::Hub,
    /// Moves on every change of the state (see [`Service::capacity_changed`]).
    capacity: tokio::sync::watch::Sender<u64>,
}

/// A commit the caller must await (outside the state lock) before answering.
#[must_use]
enum Pending {
    Local(
        bluebatch_store::Ticket,
        oneshot::Receiver<bluebatch_store::Result<()>>,
    ),
    Shared(shared::SharedCommit),
}

impl Pending {
    async fn durable(self) -> Result<(), BatchError> {
        match self {
            Pending::Local(ticket, rx) => {
                // Outside the state lock: when no commit is in flight this task commits its
                // change (and whatever queued before it) right here, blocking this worker for
                // one transaction and its sync (~0.1-0.2 ms of fdatasync on the embedded store).
                // That is cheaper than any hand-off (a wake of the writer thread and a wake back,
                // or `spawn_blocking`), and at most one worker is ever blocked so: while a
                // commit is in flight, later changes return here at once and wait for the
                // committer (which hands them to the store's writer thread).
                ticket.commit();
                match rx.await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => fatal_store_error(&e.to_string()),
                    Err(_) => fatal_store_error("the writer dropped the change"),
                }
            }
            // A failed commit on a shared store is the request's error: the replica reads the
            // database's state again before it answers anything else.
            Pending::Shared(c) => c.durable().await,
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
                store: Some(GroupCommit::start(backend)),
                shared: None,
                clock,
                nodes,
                config,
                due: Default::default(),
                hub: Default::default(),
                capacity: tokio::sync::watch::Sender::new(0),
            }),
        };
        svc.ensure_agent_secret().await;
        svc.recover().await;
        svc.start_host_sweeper();
        Ok(svc)
    }

    /// Starts a replica on a store shared with other replicas (PostgreSQL): reads the whole
    /// state, then follows other replicas' commits and competes for the background lease.
    /// Nodes come from joined hosts only (embedded nodes live in one process).
    pub async fn start_shared(
        backend: Arc<dyn bluebatch_store::SharedBackend>,
        replica: String,
        clock: Arc<ServiceClock>,
        nodes: Arc<dyn NodeFabric>,
        config: Config,
    ) -> Result<Self, String> {
        let snap = backend.snapshot().await.map_err(|e| e.to_string())?;
        let state = State::load(snap.records)?;
        if let Some(nanos) = state.clock_offset_nanos {
            clock.set_offset(time::Duration::nanoseconds(nanos));
        }
        let svc = Service {
            inner: Arc::new(Inner {
                state: Mutex::new(state),
                store: None,
                shared: Some(shared::Shared::new(backend, snap.rev, replica)),
                clock,
                nodes,
                config,
                due: Default::default(),
                hub: Default::default(),
                capacity: tokio::sync::watch::Sender::new(0),
            }),
        };
        svc.ensure_agent_secret().await;
        if svc.lock().hub.secret.is_empty() {
            // Without it every node credential would be refused: better not to start.
            return Err("the database did not take the agents' credential secret".into());
        }
        svc.start_shared_tasks();
        svc.start_host_sweeper();
        Ok(svc)
    }

    /// Every `agent_grace / 4` (at most a second), hosts silent past the grace go `unknown`.
    /// Holds the service weakly: it ends with the service.
    fn start_host_sweeper(&self) {
        let weak = Arc::downgrade(&self.inner);
        let tick = (self.inner.config.agent_grace / 4)
            .clamp(Duration::from_millis(20), Duration::from_secs(1));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(tick).await;
                let Some(inner) = weak.upgrade() else { return };
                Service { inner }.sweep_hosts().await;
            }
        });
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
        let _gate = self.gate().await?;
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
        // Agents shift shadow's expiry by the offset: their long polls answer.
        self.inner.hub.notify_all();
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
        // Memory took the change already: the sandboxed nodes' manager may look at it.
        self.capacity_moved();
        self.submit_quiet(ops)
    }

    /// [`Service::submit`] of a change that cannot move the sandboxed nodes' capacity (what
    /// [`Service::sandbox_demand`] and [`Service::idle_sandbox_hosts`] read: pools, nodes,
    /// hosts), such as a node user's: the manager is not woken for it.
    fn submit_quiet(&self, ops: Vec<Op>) -> Pending {
        self.submit_quiet_within(ops, Duration::ZERO)
    }

    /// [`Service::submit_quiet`] of a change that may wait up to `patience` to share its
    /// commit with others (see [`bluebatch_store::GroupCommit::enqueue_within`]).
    fn submit_quiet_within(&self, ops: Vec<Op>, patience: Duration) -> Pending {
        if let Some(sh) = &self.inner.shared {
            return Pending::Shared(sh.submit(Arc::downgrade(&self.inner), ops));
        }
        let (tx, rx) = oneshot::channel();
        let ticket = self
            .inner
            .store
            .as_ref()
            .expect("a service has one store")
            .enqueue_within(
                ops,
                Box::new(move |r| {
                    let _ = tx.send(r);
                }),
                patience,
            );
        Pending::Local(ticket, rx)
    }

    /// Hands a Linux node's provider the node's whole account set at `revision` (under the state
    /// lock, in revision order); the sessions it ends end in [`Service::enforced`], out of the
    /// lock. Windows nodes have no endpoint: the store is their whole truth.
    /// A node backed by a joined host (`host`) reads its whole account set from the store on its
    /// host's next poll: the poll is woken and the write waits for the node's acknowledgement.
    /// `changed` is the one account the write changed, for an embedded Linux node (its name, and
    /// its account now or `None` when removed): a node at the revision before takes that change
    /// alone, without a snapshot of every account.
    #[allow(clippy::too_many_arguments)] // the node's facts, read under the lock by the caller
    fn apply_to_node(
        &self,
        os: Os,
        host: Option<&str>,
        applied: Option<u64>,
        key: &str,
        revision: u64,
        users: &std::collections::BTreeMap<String, NodeUser>,
        changed: (&str, Option<bluebatch_core::NodeAccount>),
    ) -> Ack {
        if let Some(host) = host {
            self.inner.hub.notify_node(host, key);
            return if os == Os::Linux {
                Ack::Agent {
                    rx: self.inner.hub.ack_watch(key, applied),
                    revision,
                    user: None,
                }
            } else {
                Ack::Given
            };
        }
        if os != Os::Linux {
            return Ack::Given;
        }
        let (name, account) = changed;
        let fabric = &self.inner.nodes;
        let one = revision
            .checked_sub(1)
            .and_then(|base| fabric.apply_one_deferred(key, base, revision, name, account));
        let now = one.unwrap_or_else(|| fabric.apply_deferred(key, revision, snapshot_of(users)));
        if now >= revision {
            Ack::Given
        } else {
            Ack::Awaited {
                key: key.to_string(),
                revision,
            }
        }
    }

    /// Out of the state lock, after [`Service::apply_to_node`] of an embedded Linux node (`key`,
    /// and when its apply started): ends the sessions the change ended, and records how long the
    /// change took to be in force.
    fn enforced(&self, applied: Option<(String, std::time::Instant)>) {
        if let Some((key, started)) = applied {
            self.inner.nodes.enforce(&key);
            bluebatch_metrics::global()
                .node_apply(bluebatch_metrics::NodeKind::Embedded, started.elapsed());
        }
    }

    /// Waits (outside the state lock, once the change is durable) for the node's
    /// acknowledgement, up to the request's `timeout` and at most `ack_timeout`; past it,
    /// `OperationTimedOut`. An agent node that failed to apply the revision answers
    /// `InternalError` with its reasons.
    async fn acknowledged(&self, ack: Ack, timeout: Option<Duration>) -> Result<(), BatchError> {
        let limit = timeout.map_or(self.inner.config.ack_timeout, |t| {
            t.min(self.inner.config.ack_timeout)
        });
        match ack {
            Ack::Given => Ok(()),
            Ack::Awaited { key, revision } => {
                let wait = self.inner.nodes.acknowledged(&key, revision);
                tokio::time::timeout(limit, wait)
                    .await
                    .map_err(|_| not_acknowledged())
            }
            Ack::Agent {
                mut rx,
                revision,
                user,
            } => {
                let wait = async move {
                    let seen: Option<agents::AckSeen> = rx
                        .wait_for(|s| {
                            s.applied.is_some_and(|a| a >= revision)
                                || s.failed.as_ref().is_some_and(|(r, _)| *r >= revision)
                        })
                        .await
                        .ok()
                        .map(|s| s.clone());
                    match seen {
                        Some(s) if s.applied.is_some_and(|a| a >= revision) => Ok(()),
                        Some(s) => {
                            let failures = s.failed.as_ref().map_or(&[][..], |(_, l)| l.as_slice());
                            // The node enforces this write's user even though another of its
                            // users failed: the write is done.
                            if let Some(u) = &user
                                && !failures.iter().any(|f| f.name == *u)
                            {
                                Ok(())
                            } else {
                                Err(agents::apply_failed(failures, user.as_deref()))
                            }
                        }
                        // The node left its pool meanwhile: it will never acknowledge.
                        None => std::future::pending().await,
                    }
                };
                // Called once the write is durable: from then to the agent's acknowledgement.
                let committed = std::time::Instant::now();
                let acked = tokio::time::timeout(limit, wait)
                    .await
                    .map_err(|_| not_acknowledged())?;
                if acked.is_ok() {
                    bluebatch_metrics::global()
                        .node_apply(bluebatch_metrics::NodeKind::Agent, committed.elapsed());
                }
                acked
            }
        }
    }
}

/// Whether a node acknowledged a change when it was handed it.
enum Ack {
    Given,
    Awaited {
        key: String,
        revision: u64,
    },
    /// A node backed by a joined host: its acknowledgements, the revision awaited and the user
    /// the write is about (a failure of another user does not fail it).
    Agent {
        rx: tokio::sync::watch::Receiver<agents::AckSeen>,
        revision: u64,
        user: Option<String>,
    },
}

impl Ack {
    fn for_user(self, name: &str) -> Self {
        match self {
            Ack::Agent { rx, revision, .. } => Ack::Agent {
                rx,
                revision,
                user: Some(name.to_string()),
            },
            other => other,
        }
    }
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

/// A node's whole account set, sorted by name (Linux user keys are the names).
pub(crate) fn snapshot_of(
    users: &std::collections::BTreeMap<String, NodeUser>,
) -> Arc<[bluebatch_core::NodeAccount]> {
    users.values().map(NodeUser::to_account).collect()
}
