//! Login checks against the node's applied accounts: password (crypt hash) and public key, both
//! refused once the account is expired at the service clock's current time, while the node's
//! state takes no logins, or while the source is locked out for too many failed logins. Every
//! decision is logged once, at info, on the `bluebatch::ssh` target (never a password or key
//! material; a key shows as its SHA256 fingerprint).

use std::net::IpAddr;

use bluebatch_core::NodeAccount;
use bluebatch_core::crypt::verify_password;
use bluebatch_core::model::NodeState;
use bluebatch_core::sshkey::fingerprint;
use russh::keys::PublicKey;
use time::OffsetDateTime;

use crate::Inner;
use crate::logins::LoginRecord;
use crate::node::{ConnCtl, Node, TARGET};

/// A `$6$` hash of nothing anyone knows, verified when the account is unknown or has no
/// password, so every refusal costs the same work.
const DUMMY_HASH: &str = "$6$saltsaltsaltsalt$Bc.BD/U.Fc2QI8UskxRAIgpyMqhy8JgtBeAC6EHbOEAb3Iag1Ku/hDrlrb.D3FoCa0RK5LSp3AwyeSdVbvjOa.";

/// How a client asked to log in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Method {
    Password,
    PublicKey,
    KeyboardInteractive,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Password => "password",
            Method::PublicKey => "publickey",
            Method::KeyboardInteractive => "keyboard-interactive",
        }
    }
}

/// Why a login was refused (for the log only: the client is told nothing but "denied").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    UnknownUser,
    Expired,
    WrongPassword,
    NoPassword,
    NoSuchKey,
    LockedOut,
    NodeState(NodeState),
    MethodNotOffered,
    /// The connection is being ended (node stopping, account removed meanwhile).
    Closing,
    /// The node has its maximum of sessions (the connection is ended, the client told why).
    SessionsFull,
}

impl Refusal {
    pub fn reason(self) -> String {
        match self {
            Refusal::UnknownUser => "unknown user".into(),
            Refusal::Expired => "account expired".into(),
            Refusal::WrongPassword => "wrong password".into(),
            Refusal::NoPassword => "account has no password".into(),
            Refusal::NoSuchKey => "no such key for this account".into(),
            Refusal::LockedOut => "source locked out after too many failed logins".into(),
            Refusal::NodeState(s) => format!("node state {}", s.as_str()),
            Refusal::MethodNotOffered => "method not offered".into(),
            Refusal::Closing => "connection closing".into(),
            Refusal::SessionsFull => "too many sessions on this node".into(),
        }
    }

    /// The reason as the node's login activity gives it ([`crate::logins`]): short, stable
    /// words a person or a script reads (the log line keeps [`Refusal::reason`]).
    pub fn activity_reason(self) -> String {
        match self {
            Refusal::UnknownUser => "unknown user".into(),
            Refusal::Expired => "expired".into(),
            Refusal::WrongPassword => "wrong password".into(),
            Refusal::NoPassword => "no password".into(),
            Refusal::NoSuchKey => "key not accepted".into(),
            Refusal::LockedOut => "source held back".into(),
            Refusal::NodeState(s) => format!("node state {}", s.as_str()),
            Refusal::MethodNotOffered => "method not offered".into(),
            Refusal::Closing => "connection closing".into(),
            Refusal::SessionsFull => "sessions full".into(),
        }
    }

    /// Whether it counts towards the source's failed-login lockout: wrong credentials do; a
    /// refusal for the node's state or for the lockout itself does not.
    fn counts(self) -> bool {
        !matches!(
            self,
            Refusal::LockedOut
                | Refusal::NodeState(_)
                | Refusal::MethodNotOffered
                | Refusal::Closing
                | Refusal::SessionsFull
        )
    }
}

pub(crate) type Verdict = Result<(), Refusal>;

/// What every method checks first: the node's state, then the source's lockout.
pub(crate) fn gate(node: &Node, peer: IpAddr) -> Verdict {
    if let Some(state) = node.login_refusal() {
        return Err(Refusal::NodeState(state));
    }
    if node.refused(peer) {
        return Err(Refusal::LockedOut);
    }
    Ok(())
}

/// The account `user` may log in with `password` at `now`. Runs the hash off the async workers;
/// the work is the same whatever the refusal.
pub(crate) async fn check_password(
    node: &Node,
    user: &str,
    password: &str,
    now: OffsetDateTime,
) -> Verdict {
    let account = node.account(user);
    let precheck = match &account {
        None => Err(Refusal::UnknownUser),
        Some(a) if a.is_expired_at(now) => Err(Refusal::Expired),
        Some(a) if a.password_hash.is_none() => Err(Refusal::NoPassword),
        Some(_) => Ok(()),
    };
    let hash = account
        .and_then(|a| a.password_hash)
        .filter(|_| precheck.is_ok())
        .unwrap_or_else(|| DUMMY_HASH.to_string());
    let password = password.to_string();
    let verified = tokio::task::spawn_blocking(move || verify_password(&password, &hash))
        .await
        .unwrap_or(false);
    precheck?;
    if verified {
        Ok(())
    } else {
        Err(Refusal::WrongPassword)
    }
}

/// The account `user` may log in with `key` at `now` (key data compared, comment ignored).
pub(crate) fn check_key(node: &Node, user: &str, key: &PublicKey, now: OffsetDateTime) -> Verdict {
    match node.account(user) {
        None => Err(Refusal::UnknownUser),
        Some(a) if a.is_expired_at(now) => Err(Refusal::Expired),
        Some(a) if account_has_key(&a, key) => Ok(()),
        Some(_) => Err(Refusal::NoSuchKey),
    }
}

/// Password and publickey logins: gate, then the credentials.
pub(crate) async fn password(
    inner: &Inner,
    node: &Node,
    peer: IpAddr,
    user: &str,
    pw: &str,
) -> Verdict {
    gate(node, peer)?;
    check_password(node, user, pw, inner.clock.now()).await
}

pub(crate) fn key(
    inner: &Inner,
    node: &Node,
    peer: IpAddr,
    user: &str,
    key: &PublicKey,
) -> Verdict {
    gate(node, peer)?;
    check_key(node, user, key, inner.clock.now())
}

/// The outcome of one authentication request: a login registers the connection as `user`
/// (refused after all if the account went away meanwhile); a refusal counts towards the
/// source's lockout when it should. Logs the decision once. Returns whether to accept (also for
/// a refusal for the session bound, see below).
#[allow(clippy::too_many_arguments)]
pub(crate) fn settle(
    inner: &Inner,
    node: &Node,
    conn_id: u64,
    ctl: &ConnCtl,
    peer: IpAddr,
    user: &str,
    method: Method,
    key: Option<&PublicKey>,
    verdict: Verdict,
) -> bool {
    let verdict = verdict.and_then(|()| {
        if ctl.is_killed() {
            Err(Refusal::Closing)
        } else {
            node.login(conn_id, user, inner.clock.now())
                .map_err(|blocked| match blocked {
                    crate::node::LoginBlocked::AccountGone => Refusal::Expired,
                    crate::node::LoginBlocked::SessionsFull => Refusal::SessionsFull,
                })
        }
    });
    let fp = key.and_then(key_fingerprint);
    match verdict {
        Ok(()) => {
            ctl.set_logged_in();
            node.logins.record(LoginRecord {
                seq: 0,
                time: inner.clock.now(),
                user: Some(user.to_string()),
                source: peer,
                method: method.as_str(),
                accepted: true,
                reason: None,
                key_fingerprint: fp.clone(),
            });
            tracing::info!(
                target: TARGET,
                node = %node.key,
                user,
                source = %peer,
                method = method.as_str(),
                key = fp.as_deref(),
                "ssh login accepted"
            );
            true
        }
        Err(refusal) => {
            refused(inner, node, peer, user, method, fp.as_deref(), refusal);
            if refusal.counts() {
                node.record_failure(
                    peer,
                    inner.config.max_failed_logins,
                    inner.config.failed_login_window,
                );
            }
            // Right credentials, but the node has its maximum of sessions: the connection is
            // ended already (no channel opens on it). Accepting lets the handler's
            // `auth_succeeded` send the disconnect naming why at once, which the client shows,
            // instead of a bare "Permission denied" that would read as a wrong password.
            refusal == Refusal::SessionsFull
        }
    }
}

/// Logs a refusal and records it in the node's login activity (also for one that is not
/// counted: a key offered without a signature, a method not offered).
pub(crate) fn refused(
    inner: &Inner,
    node: &Node,
    peer: IpAddr,
    user: &str,
    method: Method,
    key_fingerprint: Option<&str>,
    refusal: Refusal,
) {
    tracing::info!(
        target: TARGET,
        node = %node.key,
        user,
        source = %peer,
        method = method.as_str(),
        key = key_fingerprint,
        reason = %refusal.reason(),
        "ssh login refused"
    );
    node.logins.record(LoginRecord {
        seq: 0,
        time: inner.clock.now(),
        user: Some(user.to_string()),
        source: peer,
        method: method.as_str(),
        accepted: false,
        reason: Some(refusal.activity_reason()),
        key_fingerprint: key_fingerprint.map(str::to_string),
    });
}

/// `SHA256:…` of a key, as `ssh-keygen -l` shows it.
pub(crate) fn key_fingerprint(key: &PublicKey) -> Option<String> {
    key.to_openssh().ok().and_then(|line| fingerprint(&line))
}

fn account_has_key(account: &NodeAccount, key: &PublicKey) -> bool {
    account
        .ssh_public_key
        .as_deref()
        .and_then(|line| PublicKey::from_openssh(line.trim()).ok())
        .is_some_and(|own| own.key_data() == key.key_data())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bluebatch_core::crypt::hash_password;
    use time::Duration;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIATH2UG4oZA4dXeC2/bj+8MSApmRKzbhr9+496qi8wYa";

    fn account(hash: Option<String>, key: Option<&str>, expires_in: Duration) -> NodeAccount {
        NodeAccount {
            name: "alice".into(),
            is_admin: false,
            password_hash: hash,
            ssh_public_key: key.map(str::to_string),
            login_refused_from: OffsetDateTime::now_utc() + expires_in,
        }
    }

    fn node_with(a: NodeAccount) -> Node {
        let node = Node::new("n".into());
        node.apply(
            1,
            crate::AccountChange::Upsert(a),
            OffsetDateTime::now_utc(),
        );
        node
    }

    #[tokio::test]
    async fn password_checks_hash_and_expiry() {
        let now = OffsetDateTime::now_utc();
        let node = node_with(account(Some(hash_password("pw1")), None, Duration::days(1)));
        assert_eq!(check_password(&node, "alice", "pw1", now).await, Ok(()));
        assert_eq!(
            check_password(&node, "alice", "pw2", now).await,
            Err(Refusal::WrongPassword)
        );
        assert_eq!(
            check_password(&node, "bob", "pw1", now).await,
            Err(Refusal::UnknownUser)
        );
        assert_eq!(
            check_password(&node, "alice", "pw1", now + Duration::days(2)).await,
            Err(Refusal::Expired)
        );
        let node = node_with(account(None, None, Duration::days(1)));
        assert_eq!(
            check_password(&node, "alice", "12345", now).await,
            Err(Refusal::NoPassword),
            "dummy hash never admits"
        );
    }

    #[test]
    fn key_compares_key_data_not_comment() {
        let now = OffsetDateTime::now_utc();
        let node = node_with(account(
            None,
            Some(&format!("{KEY} someone@somewhere")),
            Duration::days(1),
        ));
        let offered = PublicKey::from_openssh(&format!("{KEY} other-comment")).unwrap();
        assert_eq!(check_key(&node, "alice", &offered, now), Ok(()));
        assert_eq!(
            check_key(&node, "alice", &offered, now + Duration::days(2)),
            Err(Refusal::Expired)
        );
        assert_eq!(
            check_key(&node, "bob", &offered, now),
            Err(Refusal::UnknownUser)
        );
        let node = node_with(account(None, None, Duration::days(1)));
        assert_eq!(
            check_key(&node, "alice", &offered, now),
            Err(Refusal::NoSuchKey)
        );
    }
}
