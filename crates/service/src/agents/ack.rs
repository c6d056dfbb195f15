//! Acknowledgements: a host's report of the revision each node enforces, and what the writes
//! waiting for it see.

use super::{Hub, NodeRef, auth_failed, lock};
use crate::state::{node_key, node_record};
use crate::{Service, put_json};
use bluebatch_core::error::{BatchError, Code, Result};
use bluebatch_core::model::NodeState;
use bluebatch_protocol::{AckAnswer, AckRequest, UserFailure};
use std::collections::{BTreeSet, HashMap};
use tokio::sync::watch;

/// What the waiting writes of a node see.
#[derive(Debug, Clone, Default)]
pub(crate) struct AckSeen {
    pub applied: Option<u64>,
    /// The newest revision acknowledged with failures, with the node's reasons.
    pub failed: Option<(u64, Vec<UserFailure>)>,
}

impl Hub {
    /// A receiver of the node's acknowledgements, starting from `applied`.
    pub fn ack_watch(&self, key: &str, applied: Option<u64>) -> watch::Receiver<AckSeen> {
        lock(&self.acks)
            .entry(key.to_string())
            .or_insert_with(|| {
                watch::channel(AckSeen {
                    applied,
                    failed: None,
                })
                .0
            })
            .subscribe()
    }

    /// Records an acknowledgement (never moving the applied revision back).
    pub(crate) fn acked(
        &self,
        key: &str,
        applied: Option<u64>,
        failed: Option<(u64, Vec<UserFailure>)>,
    ) {
        let mut m = lock(&self.acks);
        let tx = m.entry(key.to_string()).or_insert_with(|| {
            watch::channel(AckSeen {
                applied,
                failed: None,
            })
            .0
        });
        tx.send_modify(|seen| {
            if applied > seen.applied {
                seen.applied = applied;
            }
            if let Some((rev, list)) = failed {
                if seen.failed.as_ref().is_none_or(|(r, _)| rev >= *r) {
                    seen.failed = Some((rev, list));
                }
            } else if seen
                .failed
                .as_ref()
                .is_some_and(|(r, _)| seen.applied.is_some_and(|a| a >= *r))
            {
                seen.failed = None;
            }
        });
    }

    /// An acknowledgement not yet recorded (this replica's before its commit, or another
    /// replica's notice): moves the applied revision of a node someone here watches (the writes
    /// waiting for it), creating nothing; its failures are left to the record.
    pub(crate) fn acked_early(&self, key: &str, applied: u64) {
        if let Some(tx) = lock(&self.acks).get(key) {
            tx.send_if_modified(|seen| {
                let newer = seen.applied.is_none_or(|a| a < applied);
                if newer {
                    seen.applied = Some(applied);
                }
                newer
            });
        }
    }

    pub fn failures(&self, key: &str) -> Vec<UserFailure> {
        lock(&self.acks)
            .get(key)
            .and_then(|tx| tx.borrow().failed.as_ref().map(|(_, l)| l.clone()))
            .unwrap_or_default()
    }

    pub fn forget_node(&self, key: &str) {
        lock(&self.acks).remove(key);
    }
}

/// Store keys of a node's last failed acknowledgement (shared store only: what the writes
/// waiting on other replicas see).
pub(crate) const FAILED_PREFIX: &str = "agent/failed/";

#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct FailedRecord {
    pub revision: u64,
    pub failures: Vec<UserFailure>,
}

/// The most failures of one acknowledgement kept, and the longest reason (characters).
const MAX_FAILURES: usize = 10_000;
const MAX_REASON: usize = 1024;
/// The most failures an error message names.
const SHOWN_FAILURES: usize = 5;

/// The answer a write gets when its node's provider failed to apply it; the failure of the
/// write's own user (`first`) is named first, however many others there are.
pub(crate) fn apply_failed(failures: &[UserFailure], first: Option<&str>) -> BatchError {
    let mut ordered: Vec<&UserFailure> = failures.iter().collect();
    ordered.sort_by_key(|f| Some(f.name.as_str()) != first);
    let mut reasons: Vec<String> = ordered
        .iter()
        .take(SHOWN_FAILURES)
        .map(|f| format!("{}: {}", f.name, f.reason))
        .collect();
    if failures.len() > SHOWN_FAILURES {
        reasons.push(format!("and {} more", failures.len() - SHOWN_FAILURES));
    }
    BatchError::new(Code::InternalError).message(format!(
        "The node could not apply the change ({}). The change is recorded; the node retries it.",
        reasons.join("; ")
    ))
}

fn is_waiting_for_ack(s: NodeState) -> bool {
    matches!(
        s,
        NodeState::Starting | NodeState::Rebooting | NodeState::Reimaging
    )
}

impl Service {
    /// Records what the host's provider enforces. Acks of nodes the host does not back, or of
    /// revisions never asked for, are refused; older revisions (replays) change nothing.
    pub async fn ack(&self, host: &str, ack: AckRequest) -> Result<AckAnswer> {
        self.mark_seen(host, false).await?;
        // The writes waiting for these nodes answer now, before the gate (on a shared store it
        // waits for every replica's commits): the node enforces the revision, which is what
        // their answer says. The record of it is bookkeeping that follows (if its commit fails,
        // this call fails and the agent acknowledges again). Other replicas' waiting writes
        // are told the same, alongside.
        // (On a shared store only: there the record waits for every replica's commits. On the
        // embedded store it commits at once, and the answer keeps following it.)
        let early = if self.shared().is_some() {
            self.enforced_acks(host, &ack)
        } else {
            Vec::new()
        };
        for (key, applied) in &early {
            self.inner.hub.acked_early(key, *applied);
        }
        let announce = async {
            if let Some(sh) = self.shared()
                && !early.is_empty()
            {
                let notice = bluebatch_store::AckNotice {
                    replica: sh.replica.clone(),
                    acks: early.clone(),
                };
                sh.backend.announce_acks(&notice).await;
            }
        };
        let (answer, ()) = tokio::join!(self.record_ack(host, ack), announce);
        answer
    }

    /// The acknowledgements of `ack` that say a node of `host` enforces a revision it was
    /// asked for (no failures, the node's current image, nothing [`Service::record_ack`]
    /// refuses), as the cache knows the node now:
    /// what may wake the writes waiting for it. [`Service::record_ack`] decides the rest.
    fn enforced_acks(&self, host: &str, ack: &AckRequest) -> Vec<(String, u64)> {
        let st = self.lock();
        let Some(h) = st.hub.hosts.get(host) else {
            return Vec::new();
        };
        let refs = self.refs_of(host, h, ack.nodes.iter().map(|a| a.key.as_str()));
        ack.nodes
            .iter()
            .zip(refs)
            .filter_map(|(a, r)| {
                let r = r?;
                let n = st.pool(&r.account, &r.pool)?.nodes.get(&r.node)?;
                (a.failures.is_empty()
                    && a.revision <= n.node.users_revision
                    && a.image == n.node.image
                    && a.ssh_port != Some(0)
                    && n.node.applied_revision.is_none_or(|r| r < a.revision))
                .then(|| (a.key.clone(), a.revision))
            })
            .collect()
    }

    /// Each key's node, found through the slot the poll's view names (one lookup); a key the
    /// view does not know (an ack to a replica that did not answer the poll) through a map of
    /// the host's every node, built once. (The fabric key lower-cases the pool id, as the
    /// slot's pool key is.)
    fn refs_of<'k>(
        &self,
        host: &str,
        h: &super::capacity::HostEntry,
        keys: impl Iterator<Item = &'k str>,
    ) -> Vec<Option<NodeRef>> {
        let mut by_key: Option<HashMap<String, NodeRef>> = None;
        keys.map(|key| {
            let viewed = self
                .inner
                .hub
                .slot_of(host, key)
                .and_then(|slot| h.slots.get(&slot))
                .filter(|r| node_key(&r.account, &r.pool, &r.node) == key)
                .cloned();
            viewed.or_else(|| {
                by_key
                    .get_or_insert_with(|| {
                        h.slots
                            .values()
                            .map(|r| (node_key(&r.account, &r.pool, &r.node), r.clone()))
                            .collect()
                    })
                    .get(key)
                    .cloned()
            })
        })
        .collect()
    }

    /// Records the acknowledgements under the gate (durable), and wakes what they concern.
    async fn record_ack(&self, host: &str, ack: AckRequest) -> Result<AckAnswer> {
        let _gate = self.gate().await?;
        let now = self.now();
        let mut refused = Vec::new();
        let mut woken = Vec::new();
        let mut pools = BTreeSet::new();
        let pending = {
            let mut st = self.lock();
            let h = st
                .hub
                .hosts
                .get(host)
                .ok_or_else(|| auth_failed("The node credential is not valid."))?;
            let refs = self.refs_of(host, h, ack.nodes.iter().map(|a| a.key.as_str()));
            let found: Vec<(bluebatch_protocol::NodeAck, Option<NodeRef>)> =
                ack.nodes.into_iter().zip(refs).collect();
            let mut ops = Vec::new();
            for (a, r) in found {
                let Some(r) = &r else {
                    refused.push(a.key);
                    continue;
                };
                let Some(p) = st.pool_mut(&r.account, &r.pool) else {
                    refused.push(a.key);
                    continue;
                };
                let (pool_id, os) = (p.pool.id.clone(), p.pool.os);
                let Some(n) = p.nodes.get_mut(&r.node) else {
                    refused.push(a.key);
                    continue;
                };
                if a.revision > n.node.users_revision
                    || a.image > n.node.image
                    || a.ssh_port == Some(0)
                {
                    refused.push(a.key);
                    continue;
                }
                if a.image < n.node.image {
                    // From before the node's reimage: superseded.
                    continue;
                }
                let mut changed = false;
                if let Some(port) = a.ssh_port
                    && os == bluebatch_core::model::Os::Linux
                    && n.node.ssh_port != Some(port)
                {
                    n.node.ssh_port = Some(port);
                    changed = true;
                }
                if !a.failures.is_empty() {
                    tracing::warn!(
                        node = %a.key,
                        revision = a.revision,
                        failed = a.failures.len(),
                        "node could not apply its accounts"
                    );
                    // Kept for the waiting writes and the control endpoint: bounded, as the
                    // agent's reasons are a tool's messages.
                    let failures: Vec<UserFailure> = a
                        .failures
                        .into_iter()
                        .take(MAX_FAILURES)
                        .map(|f| UserFailure {
                            name: f.name.chars().take(256).collect(),
                            reason: f.reason.chars().take(MAX_REASON).collect(),
                        })
                        .collect();
                    if self.shared().is_some() {
                        // Writes waiting on other replicas see the failure through the store.
                        ops.push(put_json(
                            format!("{FAILED_PREFIX}{}", a.key),
                            &FailedRecord {
                                revision: a.revision,
                                failures: failures.clone(),
                            },
                        ));
                    }
                    woken.push((a.key.clone(), None, Some((a.revision, failures))));
                } else if n.node.applied_revision.is_none_or(|r| r < a.revision) {
                    n.node.applied_revision = Some(a.revision);
                    changed = true;
                    if self.shared().is_some() && !self.inner.hub.failures(&a.key).is_empty() {
                        ops.push(bluebatch_store::Op::Delete {
                            key: format!("{FAILED_PREFIX}{}", a.key),
                        });
                    }
                    woken.push((a.key.clone(), Some(a.revision), None));
                }
                if changed {
                    n.node.last_modified = now;
                    ops.push(put_json(
                        node_record(&r.account, &pool_id, &r.node),
                        &n.node,
                    ));
                }
                if is_waiting_for_ack(n.node.state) {
                    pools.insert((r.account.clone(), r.pool.clone()));
                }
            }
            (!ops.is_empty()).then(|| self.submit(ops))
        };
        // On a shared store before the commit, as in [`Service::ack`] (these include the
        // failures, and what the cache did not know before the gate caught it up).
        let shared = self.shared().is_some();
        if shared {
            for (key, applied, failed) in woken.drain(..) {
                self.inner.hub.acked(&key, applied, failed);
            }
        }
        if let Some(p) = pending {
            p.durable().await?;
        }
        for (key, applied, failed) in woken {
            self.inner.hub.acked(&key, applied, failed);
        }
        for (account, pkey) in pools {
            self.schedule(&account, &pkey);
        }
        Ok(AckAnswer { refused })
    }
}
