//! A joined host's slots: the nodes it backs, and which of its slots are free for a pool.

use super::{HostRecord, NodeRef};
use crate::state::pool_key;
use bluebatch_core::model::NodeSource;
use bluebatch_protocol::ProviderKind;
use std::collections::{BTreeMap, HashSet};
use time::OffsetDateTime;

/// Whether a host of this provider can back a node of a pool of this OS and node source: a
/// sandboxed node's host backs sandbox pools only, and a sandbox pool takes no other host; the
/// linux and sandbox providers back Linux nodes only.
pub(crate) fn provider_backs(
    provider: ProviderKind,
    os: bluebatch_core::model::Os,
    source: NodeSource,
) -> bool {
    (provider == ProviderKind::Sandbox) == (source == NodeSource::Sandbox)
        && (provider == ProviderKind::Simulate || os == bluebatch_core::model::Os::Linux)
}

pub(crate) struct HostEntry {
    pub rec: HostRecord,
    pub slots: BTreeMap<u32, NodeRef>,
    pub reserved: HashSet<String>,
    /// Wall-clock time of its last call (in memory; a restart starts the grace afresh).
    pub last_seen: Option<OffsetDateTime>,
    /// Wall-clock time other replicas last saw it (shared store; from the database).
    pub seen_elsewhere: Option<OffsetDateTime>,
    /// Long polls in flight.
    pub polls: u32,
    /// Its nodes were marked `unknown` for want of polls.
    pub away: bool,
}

impl HostEntry {
    pub fn new(rec: HostRecord) -> Self {
        let reserved = rec.reserved_names.iter().cloned().collect();
        HostEntry {
            rec,
            slots: BTreeMap::new(),
            reserved,
            last_seen: None,
            seen_elsewhere: None,
            polls: 0,
            away: false,
        }
    }

    /// Whether the host may take a new node of this pool (`source`: where the pool's nodes come
    /// from, `Agents` or `Sandbox`).
    pub fn takes(
        &self,
        account: &str,
        pool: &str,
        os: bluebatch_core::model::Os,
        source: NodeSource,
    ) -> bool {
        self.rec.account == account
            && !self.rec.drained
            && self.rec.pool.as_deref().is_none_or(|p| pool_key(p) == pool)
            && provider_backs(self.rec.provider, os, source)
    }

    /// How many of its slots back no node (O(log n) while slots fill from 0 up).
    pub fn free_count(&self) -> u32 {
        let taken = match self.slots.last_key_value() {
            Some((last, _)) if *last >= self.rec.slots => {
                self.slots.range(..self.rec.slots).count() as u32
            }
            _ => self.slots.len() as u32,
        };
        self.rec.slots.saturating_sub(taken)
    }

    /// The lowest slot that backs no node.
    pub fn first_free(&self) -> Option<u32> {
        let len = self.slots.len() as u32;
        let contiguous = self
            .slots
            .last_key_value()
            .is_none_or(|(last, _)| *last + 1 == len);
        let first = if contiguous {
            len
        } else {
            (0..).find(|s| !self.slots.contains_key(s))?
        };
        (first < self.rec.slots).then_some(first)
    }
}

#[cfg(test)]
mod slot_tests {
    use super::*;

    fn host(slots: u32, taken: &[u32]) -> HostEntry {
        let mut h = HostEntry::new(HostRecord {
            id: "h".into(),
            account: "a".into(),
            pool: None,
            hostname: String::new(),
            provider: ProviderKind::Simulate,
            slots,
            address: "127.0.0.1".into(),
            ssh_port: None,
            reserved_names: Vec::new(),
            version: String::new(),
            drained: false,
            joined: OffsetDateTime::UNIX_EPOCH,
            credential_expires: OffsetDateTime::UNIX_EPOCH,
            renewed_at: None,
        });
        for s in taken {
            h.slots.insert(
                *s,
                NodeRef {
                    account: "a".into(),
                    pool: "p".into(),
                    node: s.to_string(),
                },
            );
        }
        h
    }

    #[test]
    fn free_slots_are_found_with_and_without_gaps() {
        assert_eq!(
            (host(3, &[]).first_free(), host(3, &[]).free_count()),
            (Some(0), 3)
        );
        assert_eq!(host(3, &[0, 1]).first_free(), Some(2));
        assert_eq!(host(3, &[0, 2]).first_free(), Some(1));
        assert_eq!(host(3, &[1, 2]).first_free(), Some(0));
        assert_eq!(
            (host(2, &[0, 1]).first_free(), host(2, &[0, 1]).free_count()),
            (None, 0)
        );
        // Slots beyond a shrunk host's count are not free ones.
        assert_eq!(
            (host(1, &[3]).first_free(), host(1, &[3]).free_count()),
            (Some(0), 1)
        );
        assert_eq!(
            (host(1, &[0, 3]).first_free(), host(1, &[0, 3]).free_count()),
            (None, 0)
        );
    }
}
