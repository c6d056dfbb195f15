//! Console sign-in sessions and their CSRF tokens, kept in memory (a restart signs everyone out).
//!
//! A session is made by signing in with an account's name and key (checked as Shared Key checks
//! account keys: the decoded key bytes, compared in constant time) or by a one-time sign-in token
//! printed at start-up. Its id (32 random bytes, base64url) travels in the `bb_console` cookie;
//! its CSRF token (32 more random bytes) in a hidden `csrf` field of every form that changes
//! something. A session unused for [`IDLE`] ends; at most [`MAX_SESSIONS`] live at once (the
//! least recently used goes first).

use crate::accounts::Accounts;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rand::RngCore;
use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

/// The session cookie's name.
pub const COOKIE: &str = "bb_console";
/// A session unused this long ends.
pub const IDLE: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at most; the least recently used is dropped for a new one.
pub const MAX_SESSIONS: usize = 1024;
/// How long a one-time sign-in token printed at start-up stays usable.
pub const ONCE_TTL: Duration = Duration::from_secs(600);

#[derive(Clone, Debug)]
pub struct Session {
    pub account: String,
    pub csrf: String,
    last_used: Instant,
}

#[derive(Default)]
struct Store {
    sessions: HashMap<String, Session>,
    /// One-time sign-in tokens: token → (account, expires).
    once: HashMap<String, (String, Instant)>,
}

/// One store per process: the HTTP and HTTPS listeners share their sessions.
static STORE: LazyLock<Mutex<Store>> = LazyLock::new(Mutex::default);

fn store() -> std::sync::MutexGuard<'static, Store> {
    STORE.lock().unwrap_or_else(|p| p.into_inner())
}

/// 32 random bytes from the thread's CSPRNG, base64url without padding (43 characters).
pub fn random_token() -> String {
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    URL_SAFE_NO_PAD.encode(b)
}

/// Constant-time equality of two byte strings (the length is not secret).
pub fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether `key` (base64, as the portal shows it) is one of `account`'s keys.
pub fn key_matches(accounts: &Accounts, account: &str, key: &str) -> bool {
    let Some(keys) = accounts.keys(account) else {
        return false;
    };
    let Ok(given) = STANDARD.decode(key.trim()) else {
        return false;
    };
    // Every key is compared, so the time does not tell which one matched.
    keys.iter()
        .fold(false, |hit, k| same(k.bytes(), &given) | hit)
}

/// A new session for `account`: its id (for the cookie).
pub fn create(account: &str) -> String {
    let id = random_token();
    let mut st = store();
    let now = Instant::now();
    st.sessions
        .retain(|_, s| now.duration_since(s.last_used) < IDLE);
    while st.sessions.len() >= MAX_SESSIONS {
        let oldest = st
            .sessions
            .iter()
            .min_by_key(|(_, s)| s.last_used)
            .map(|(k, _)| k.clone());
        match oldest {
            Some(k) => st.sessions.remove(&k),
            None => break,
        };
    }
    st.sessions.insert(
        id.clone(),
        Session {
            account: account.to_string(),
            csrf: random_token(),
            last_used: now,
        },
    );
    id
}

/// The live session `id`, marked used now.
pub fn lookup(id: &str) -> Option<Session> {
    let mut st = store();
    let now = Instant::now();
    let s = st.sessions.get_mut(id)?;
    if now.duration_since(s.last_used) >= IDLE {
        st.sessions.remove(id);
        return None;
    }
    s.last_used = now;
    Some(s.clone())
}

pub fn remove(id: &str) {
    store().sessions.remove(id);
}

/// A one-time sign-in token for `account`, usable once within [`ONCE_TTL`].
pub fn one_time(account: &str) -> String {
    let token = random_token();
    let mut st = store();
    let now = Instant::now();
    st.once.retain(|_, (_, exp)| *exp > now);
    st.once
        .insert(token.clone(), (account.to_string(), now + ONCE_TTL));
    token
}

/// Spends a one-time token: the account it signs in, if it was live.
pub fn redeem(token: &str) -> Option<String> {
    let mut st = store();
    let (account, expires) = st.once.remove(token)?;
    (expires > Instant::now()).then_some(account)
}

/// The value of cookie `name` in a `Cookie` header.
pub fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header
        .split(';')
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_43_url_safe_chars_and_differ() {
        let a = random_token();
        assert_eq!(a.len(), 43);
        assert!(
            a.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert_ne!(a, random_token());
    }

    #[test]
    fn one_time_tokens_work_once() {
        let t = one_time("acct");
        assert_eq!(redeem(&t).as_deref(), Some("acct"));
        assert_eq!(redeem(&t), None);
    }

    #[test]
    fn keys_compare_decoded() {
        let a = Accounts::dev();
        assert!(key_matches(&a, crate::DEV_ACCOUNT, crate::DEV_KEY));
        assert!(!key_matches(&a, crate::DEV_ACCOUNT, "AAAA"));
        assert!(!key_matches(&a, "nobody", crate::DEV_KEY));
    }

    #[test]
    fn cookies_are_found_by_name() {
        assert_eq!(cookie("a=1; bb_console=xyz; c=2", COOKIE), Some("xyz"));
        assert_eq!(cookie("bb_consolex=1", COOKIE), None);
    }
}
