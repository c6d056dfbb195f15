//! What a host reports of itself (at join and on every start), and what an operator does with
//! joined hosts: list, drain, revoke; and the host's own account names the API refuses.

use super::capacity::provider_backs;
use super::{
    HOST_PREFIX, HostEntry, HostView, MAX_HOST_SLOTS, NodeRef, auth_failed, invalid, not_found,
};
use crate::pools::set_node_state;
use crate::state::{State, node_record};
use crate::{Service, put_json};
use bluebatch_core::error::Result;
use bluebatch_core::model::NodeState;
use bluebatch_protocol::{HostReport, HostReportAnswer, ProviderKind};
use bluebatch_store::Op;
use std::collections::BTreeSet;
use std::net::IpAddr;
use time::OffsetDateTime;

pub(super) fn check_report(r: &HostReport) -> Result<()> {
    if r.slots == 0 || r.slots > MAX_HOST_SLOTS {
        return Err(invalid(
            "host.slots",
            &format!("A host backs 1 to {MAX_HOST_SLOTS} nodes."),
        ));
    }
    if r.provider != ProviderKind::Simulate && r.slots != 1 {
        return Err(invalid(
            "host.slots",
            "A host with the linux or sandbox provider backs one node.",
        ));
    }
    // The node's `ipAddress` and the address SSH clients are sent to: an IP a client can
    // reach, never a name (it would be resolved by every client differently), an address with
    // a port or zone, the unspecified address, a multicast or the broadcast address.
    let shown: String = r.address.chars().take(64).collect();
    match r.address.parse::<IpAddr>() {
        Err(_) => {
            return Err(invalid(
                "host.address",
                &format!(
                    "{shown:?} is not an IP address: a host reports the IPv4 or IPv6 address                      clients reach it at (no name, port or zone), e.g. 198.18.0.5."
                ),
            ));
        }
        Ok(ip)
            if ip.is_unspecified()
                || ip.is_multicast()
                || ip == IpAddr::V4(std::net::Ipv4Addr::BROADCAST) =>
        {
            return Err(invalid(
                "host.address",
                &format!(
                    "{shown:?} is not an address clients can reach the host at (unspecified,                      multicast or broadcast)."
                ),
            ));
        }
        Ok(_) => {}
    }
    if r.ssh_port == Some(0) {
        return Err(invalid("host.sshPort", "A TCP port is 1 to 65535."));
    }
    // Shown by `bluebatch host list` on an operator's terminal: no control characters.
    for (property, value) in [("host.hostname", &r.hostname), ("host.version", &r.version)] {
        if value.len() > 255 || value.chars().any(char::is_control) {
            return Err(invalid(
                property,
                "At most 255 bytes, with no control characters.",
            ));
        }
    }
    if r.reserved_names.len() > 100_000 || r.reserved_names.iter().any(|n| n.len() > 256) {
        return Err(invalid(
            "host.reservedNames",
            "At most 100000 names of at most 256 bytes.",
        ));
    }
    Ok(())
}

impl Service {
    pub async fn hello(&self, host: &str, report: HostReport) -> Result<HostReportAnswer> {
        let _gate = self.gate().await?;
        check_report(&report)?;
        self.mark_seen(host, false).await?;
        let mut released = BTreeSet::new();
        let (account, pending) = {
            let mut st = self.lock();
            let now = self.now();
            let h = st
                .hub
                .hosts
                .get_mut(host)
                .ok_or_else(|| auth_failed("The node credential is not valid."))?;
            h.rec.hostname = report.hostname;
            h.rec.provider = report.provider;
            h.rec.slots = report.slots;
            h.rec.address = report.address;
            h.rec.ssh_port = report.ssh_port;
            h.reserved = report.reserved_names.iter().cloned().collect();
            h.rec.reserved_names = report.reserved_names;
            h.rec.version = report.version;
            let rec = h.rec.clone();
            let refs: Vec<(u32, NodeRef)> = h.slots.iter().map(|(s, r)| (*s, r.clone())).collect();
            let mut ops = vec![put_json(format!("{HOST_PREFIX}{host}"), &rec)];
            for (slot, r) in refs {
                let Some(p) = st.pool_mut(&r.account, &r.pool) else {
                    continue;
                };
                let pool_id = p.pool.id.clone();
                let fits = provider_backs(rec.provider, p.pool.os, p.pool.source);
                let Some(n) = p.nodes.get_mut(&r.node) else {
                    continue;
                };
                // The host came back smaller (fewer slots) or with a provider that cannot back
                // the node (a linux host backs no Windows node, a sandboxed node's host only
                // sandbox pools): the nodes it can no longer back leave their pools, which look
                // for other hosts (as when a host is revoked).
                if slot >= rec.slots || !fits {
                    if n.node.state != NodeState::LeavingPool {
                        set_node_state(&mut n.node, NodeState::LeavingPool, now);
                        ops.push(put_json(
                            node_record(&r.account, &pool_id, &r.node),
                            &n.node,
                        ));
                    }
                    released.insert((r.account.clone(), r.pool.clone()));
                    continue;
                }
                let port = match rec.provider {
                    ProviderKind::Linux | ProviderKind::Sandbox => rec.ssh_port,
                    ProviderKind::Simulate => n.node.ssh_port,
                };
                if n.node.ip_address != rec.address || n.node.ssh_port != port {
                    n.node.ip_address = rec.address.clone();
                    n.node.ssh_port = port;
                    n.node.etag = bluebatch_core::model::new_etag(now);
                    n.node.last_modified = now;
                    ops.push(put_json(
                        node_record(&r.account, &pool_id, &r.node),
                        &n.node,
                    ));
                }
            }
            (rec.account, self.submit(ops))
        };
        pending.durable().await?;
        self.inner.hub.notify(host);
        for (account, pkey) in released {
            self.refill_pool(&account, &pkey).await;
        }
        self.fill_short_pools(&account).await;
        Ok(HostReportAnswer {
            host_id: host.to_string(),
        })
    }

    fn host_view(&self, st: &State, h: &HostEntry) -> HostView {
        let grace = self.grace();
        let now = OffsetDateTime::now_utc();
        HostView {
            id: h.rec.id.clone(),
            account: h.rec.account.clone(),
            hostname: h.rec.hostname.clone(),
            provider: h.rec.provider,
            address: h.rec.address.clone(),
            ssh_port: h.rec.ssh_port,
            slots: h.rec.slots,
            nodes: h
                .slots
                .values()
                .filter_map(|r| {
                    st.node_of(r)
                        .map(|(p, _)| (p.pool.id.clone(), r.node.clone()))
                })
                .collect(),
            drained: h.rec.drained,
            connected: !h.away
                && (h.polls > 0
                    || h.last_seen
                        .max(h.seen_elsewhere)
                        .is_some_and(|t| now - t <= grace)),
            last_seen: h.last_seen.max(h.seen_elsewhere),
        }
    }

    /// (connected, known) joined hosts of every account, as `GET /_bluebatch/hosts` counts
    /// them (`connected` as there; known: joined and not revoked), for the metrics scrape.
    pub fn agents_connected_and_known(&self) -> (u64, u64) {
        let st = self.lock();
        let grace = self.grace();
        let now = OffsetDateTime::now_utc();
        let connected = st
            .hub
            .hosts
            .values()
            .filter(|h| {
                !h.away
                    && (h.polls > 0
                        || h.last_seen
                            .max(h.seen_elsewhere)
                            .is_some_and(|t| now - t <= grace))
            })
            .count();
        (connected as u64, st.hub.hosts.len() as u64)
    }

    pub fn list_hosts(&self, account: &str) -> Vec<HostView> {
        let st = self.lock();
        st.hub
            .hosts
            .values()
            .filter(|h| h.rec.account == account)
            .map(|h| self.host_view(&st, h))
            .collect()
    }

    /// The host takes no new pools; its nodes stay until their pools let them go.
    pub async fn drain_host(&self, account: &str, host: &str) -> Result<HostView> {
        let _gate = self.gate().await?;
        let (view, pending) = {
            let mut st = self.lock();
            let h = st
                .hub
                .hosts
                .get_mut(host)
                .filter(|h| h.rec.account == account)
                .ok_or_else(|| not_found("host"))?;
            h.rec.drained = true;
            let op = put_json(format!("{HOST_PREFIX}{host}"), &h.rec);
            let st = &*st;
            (
                self.host_view(st, &st.hub.hosts[host]),
                self.submit(vec![op]),
            )
        };
        pending.durable().await?;
        self.inner.hub.notify(host);
        tracing::info!(account, host, "host drained");
        Ok(view)
    }

    /// The host's credential stops working at once and its nodes leave their pools (which
    /// then look for other hosts to meet their targets).
    pub async fn revoke_host(&self, account: &str, host: &str) -> Result<()> {
        let _gate = self.gate().await?;
        let now = self.now();
        let (pending, pools) = {
            let mut st = self.lock();
            if st
                .hub
                .hosts
                .get(host)
                .is_none_or(|h| h.rec.account != account)
            {
                return Err(not_found("host"));
            }
            let h = st.hub.hosts.remove(host).expect("checked above");
            let mut ops = vec![Op::Delete {
                key: format!("{HOST_PREFIX}{host}"),
            }];
            let mut pools = BTreeSet::new();
            for r in h.slots.values() {
                let Some(p) = st.pool_mut(&r.account, &r.pool) else {
                    continue;
                };
                let pool_id = p.pool.id.clone();
                if let Some(n) = p.nodes.get_mut(&r.node)
                    && n.node.state != NodeState::LeavingPool
                {
                    set_node_state(&mut n.node, NodeState::LeavingPool, now);
                    ops.push(put_json(
                        node_record(&r.account, &pool_id, &r.node),
                        &n.node,
                    ));
                }
                pools.insert((r.account.clone(), r.pool.clone()));
            }
            (self.submit(ops), pools)
        };
        pending.durable().await?;
        self.inner.hub.forget_host(host);
        tracing::info!(account, host, "host revoked");
        for (account, pkey) in pools {
            self.refill_pool(&account, &pkey).await;
        }
        Ok(())
    }

    /// Whether `name` is an account the node's host has and does not manage.
    pub(crate) fn reserved_on(st: &State, host: Option<&str>, name: &str, windows: bool) -> bool {
        let Some(h) = host.and_then(|h| st.hub.hosts.get(h)) else {
            return false;
        };
        if windows {
            h.reserved.iter().any(|r| r.eq_ignore_ascii_case(name))
        } else {
            h.reserved.contains(name)
        }
    }
}
