//! Liveness: a host that neither polls nor acknowledges for the grace time has its nodes
//! `unknown`; its next call puts them back in the state they had.

use super::{NodeRef, auth_failed};
use crate::pools::set_node_state;
use crate::state::{State, node_record};
use crate::{Service, put_json};
use bluebatch_core::error::Result;
use bluebatch_core::model::NodeState;
use bluebatch_store::Op;
use std::collections::BTreeSet;
use time::OffsetDateTime;

/// (account, pool key).
type PoolRef = (String, String);

/// Ends a long poll's liveness count when dropped.
pub(super) struct Polling {
    svc: Service,
    host: String,
}

impl Drop for Polling {
    fn drop(&mut self) {
        let mut st = self.svc.lock();
        if let Some(h) = st.hub.hosts.get_mut(&self.host) {
            h.polls = h.polls.saturating_sub(1);
            h.last_seen = Some(OffsetDateTime::now_utc());
        }
    }
}

impl Service {
    pub(super) fn grace(&self) -> time::Duration {
        time::Duration::try_from(self.inner.config.agent_grace).unwrap_or(time::Duration::MINUTE)
    }

    /// Marks the host alive now; if its nodes were `unknown`, puts them back in the state they
    /// had. Returns the writes to make durable and the pools whose steps resume.
    fn seen(&self, st: &mut State, host: &str) -> Result<(Vec<Op>, Vec<PoolRef>)> {
        let now = self.now();
        let h = st
            .hub
            .hosts
            .get_mut(host)
            .ok_or_else(|| auth_failed("The node credential is not valid."))?;
        h.last_seen = Some(OffsetDateTime::now_utc());
        if !h.away {
            return Ok((Vec::new(), Vec::new()));
        }
        h.away = false;
        let refs: Vec<NodeRef> = h.slots.values().cloned().collect();
        let mut ops = Vec::new();
        let mut pools = BTreeSet::new();
        for r in refs {
            let Some(p) = st.pool_mut(&r.account, &r.pool) else {
                continue;
            };
            let pool_id = p.pool.id.clone();
            let Some(n) = p.nodes.get_mut(&r.node) else {
                continue;
            };
            if n.node.state != NodeState::Unknown {
                continue;
            }
            let back = n
                .node
                .state_before_unknown
                .take()
                .unwrap_or(NodeState::Idle);
            set_node_state(&mut n.node, back, now);
            ops.push(put_json(
                node_record(&r.account, &pool_id, &r.node),
                &n.node,
            ));
            pools.insert((r.account.clone(), r.pool.clone()));
        }
        tracing::info!(host, "host is back: its nodes leave unknown");
        Ok((ops, pools.into_iter().collect()))
    }

    pub(super) async fn mark_seen(&self, host: &str, poll: bool) -> Result<Option<Polling>> {
        // Bringing the host's nodes back from `unknown` is a write: on a shared store it takes
        // the gate (and a host that is not away writes nothing).
        let away = self.lock().hub.hosts.get(host).is_some_and(|h| h.away);
        let _gate = if away { Some(self.gate().await?) } else { None };
        let (pending, pools) = {
            let mut st = self.lock();
            let (ops, pools) = self.seen(&mut st, host)?;
            let guard = if poll {
                if let Some(h) = st.hub.hosts.get_mut(host) {
                    h.polls += 1;
                }
                Some(Polling {
                    svc: self.clone(),
                    host: host.to_string(),
                })
            } else {
                None
            };
            let pending = (!ops.is_empty()).then(|| self.submit(ops));
            ((pending, guard), pools)
        };
        let (pending, guard) = pending;
        if let Some(p) = pending {
            p.durable().await?;
        }
        for (account, pkey) in pools {
            self.schedule(&account, &pkey);
        }
        Ok(guard)
    }

    /// Marks the nodes of hosts silent for longer than the grace time `unknown`.
    pub(crate) async fn sweep_hosts(&self) {
        if let Some(sh) = self.shared() {
            // Other replicas see this replica's polls through the database; only the holder of
            // the background lease decides who is away, on every replica's sightings.
            let backend = sh.backend.clone();
            let seen: Vec<String> = {
                let st = self.lock();
                let recent = OffsetDateTime::now_utc() - time::Duration::seconds(2);
                st.hub
                    .hosts
                    .values()
                    .filter(|h| h.polls > 0 || h.last_seen.is_some_and(|t| t > recent))
                    .map(|h| h.rec.id.clone())
                    .collect()
            };
            if !seen.is_empty() {
                let _ = backend.hosts_seen(&seen).await;
            }
            let Ok(ages) = backend.host_ages().await else {
                return;
            };
            let wall = OffsetDateTime::now_utc();
            let mut st = self.lock();
            for (host, age) in ages {
                if let Some(h) = st.hub.hosts.get_mut(&host) {
                    // Kept apart from this replica's own sightings, which alone it reports.
                    h.seen_elsewhere = Some(wall - age);
                }
            }
            drop(st);
            if !self.runs_background() {
                return;
            }
        }
        let Ok(_gate) = self.gate().await else {
            return;
        };
        let wall = OffsetDateTime::now_utc();
        let grace = self.grace();
        let now = self.now();
        let pending = {
            let mut st = self.lock();
            let mut gone = Vec::new();
            for h in st.hub.hosts.values_mut() {
                let last = h.last_seen.max(h.seen_elsewhere);
                if h.away || h.polls > 0 || last.is_some_and(|t| wall - t <= grace) {
                    continue;
                }
                if last.is_none() {
                    // Never seen since this start: the grace starts now.
                    h.last_seen = Some(wall);
                    continue;
                }
                h.away = true;
                tracing::warn!(host = %h.rec.id, "host stopped polling: its nodes are unknown");
                gone.extend(h.slots.values().cloned());
            }
            let mut ops = Vec::new();
            for r in gone {
                let Some(p) = st.pool_mut(&r.account, &r.pool) else {
                    continue;
                };
                let pool_id = p.pool.id.clone();
                let Some(n) = p.nodes.get_mut(&r.node) else {
                    continue;
                };
                if matches!(n.node.state, NodeState::LeavingPool | NodeState::Unknown) {
                    continue;
                }
                n.node.state_before_unknown = Some(n.node.state);
                set_node_state(&mut n.node, NodeState::Unknown, now);
                ops.push(put_json(
                    node_record(&r.account, &pool_id, &r.node),
                    &n.node,
                ));
            }
            (!ops.is_empty()).then(|| self.submit(ops))
        };
        if let Some(p) = pending {
            let _ = p.durable().await;
        }
    }
}
