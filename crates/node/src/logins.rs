//! A node's login activity: the last [`KEPT`] authentication outcomes of its SSH endpoint, kept
//! in memory (forgotten when the node leaves its pool or the process ends), for the emulator's
//! control endpoint and its console. An entry holds the service clock's time, the user name the
//! client gave, its source address, the method, the outcome and, for a refusal, the reason; a
//! key as its SHA256 fingerprint. Never a password or key material.
//!
//! What is recorded: every password or public-key authentication accepted or refused (a key a
//! client offers and the account does not have included, since that is where a removed key is
//! refused), a method not offered, and a connection closed before the SSH banner because the
//! node's state takes no logins (method `none`, no user). What is not: the `none` probe every
//! client sends first, and connections shed by the startup caps before any SSH conversation
//! (a flood would push every real login out; they are counted in the log instead).

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Mutex;

use time::OffsetDateTime;

/// Outcomes kept per node; the oldest goes first.
pub const KEPT: usize = 256;

/// User names longer than this (in bytes) are cut, at a character boundary: a client may send
/// any name, and the log is bounded by its entries' size as well as their count.
const MAX_USER_BYTES: usize = 64;

/// One authentication outcome on a node. Recorded: every password or public-key attempt
/// accepted or refused (also a key offered that the account does not have), a method not
/// offered, a connection closed before the banner for the node's state (method `none`, no
/// user). Not recorded: the `none` probe, connections shed by the startup caps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginRecord {
    /// The entry's number on its node: 1 for the node's first outcome, one more for each next
    /// (kept when older entries go), so that a reader sees what is new since it last looked.
    pub seq: u64,
    /// The service clock's time of the decision.
    pub time: OffsetDateTime,
    /// The user name the client gave; `None` when the connection ended before it could give one.
    pub user: Option<String>,
    /// The client's address.
    pub source: IpAddr,
    /// `password`, `publickey`, `keyboard-interactive` or `none`.
    pub method: &'static str,
    pub accepted: bool,
    /// Why it was refused: `unknown user`, `wrong password`, `no password`,
    /// `expired`, `key not accepted`, `source held back`, `sessions full`, `node state …`,
    /// `method not offered`, `connection closing`. `None` when accepted.
    pub reason: Option<String>,
    /// `SHA256:…` of the key, for a public-key login.
    pub key_fingerprint: Option<String>,
}

/// The ring of a node's last [`KEPT`] outcomes.
#[derive(Default)]
pub(crate) struct LoginLog {
    entries: Mutex<Ring>,
}

#[derive(Default)]
struct Ring {
    last_seq: u64,
    entries: VecDeque<LoginRecord>,
}

impl LoginLog {
    /// Keeps `entry`, numbered next (its `seq` is set here).
    pub fn record(&self, mut entry: LoginRecord) {
        if let Some(user) = entry.user.as_mut() {
            cut(user, MAX_USER_BYTES);
        }
        let mut ring = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        ring.last_seq += 1;
        entry.seq = ring.last_seq;
        if ring.entries.len() >= KEPT {
            ring.entries.pop_front();
        }
        ring.entries.push_back(entry);
    }

    /// The number of the node's newest outcome (0: none yet): whether anything is new, without
    /// a copy of the entries.
    pub fn last_seq(&self) -> u64 {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last_seq
    }

    /// Every kept outcome, newest first.
    pub fn newest_first(&self) -> Vec<LoginRecord> {
        let ring = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        ring.entries.iter().rev().cloned().collect()
    }
}

fn cut(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn entry(user: &str) -> LoginRecord {
        LoginRecord {
            seq: 0,
            time: OffsetDateTime::UNIX_EPOCH,
            user: Some(user.into()),
            source: IpAddr::V4(Ipv4Addr::LOCALHOST),
            method: "password",
            accepted: false,
            reason: Some("wrong password".into()),
            key_fingerprint: None,
        }
    }

    #[test]
    fn keeps_the_last_256_newest_first() {
        let log = LoginLog::default();
        for i in 0..300 {
            log.record(entry(&format!("u{i}")));
        }
        let all = log.newest_first();
        assert_eq!(all.len(), KEPT);
        assert_eq!(all[0].user.as_deref(), Some("u299"));
        assert_eq!(all[0].seq, 300);
        assert_eq!(all[KEPT - 1].user.as_deref(), Some("u44"));
        assert_eq!(all[KEPT - 1].seq, 45);
        assert_eq!(log.last_seq(), 300);
    }

    #[test]
    fn long_user_names_are_cut_at_a_character_boundary() {
        let log = LoginLog::default();
        log.record(entry(&"é".repeat(200)));
        let user = log.newest_first()[0].user.clone().unwrap();
        assert_eq!(user.len(), MAX_USER_BYTES);
        assert!(user.chars().all(|c| c == 'é'));
    }
}
