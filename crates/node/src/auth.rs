//! Login checks against the node's applied accounts: password (crypt hash) and public key, both
//! refused once the account is expired at the service clock's current time.

use bluebatch_core::NodeAccount;
use bluebatch_core::crypt::verify_password;
use russh::keys::PublicKey;
use time::OffsetDateTime;

use crate::node::Node;

/// A `$6$` hash of nothing anyone knows, verified when the account is unknown or has no
/// password, so every refusal costs the same work.
const DUMMY_HASH: &str = "$6$saltsaltsaltsalt$Bc.BD/U.Fc2QI8UskxRAIgpyMqhy8JgtBeAC6EHbOEAb3Iag1Ku/hDrlrb.D3FoCa0RK5LSp3AwyeSdVbvjOa.";

/// The account `user` may log in with `password` at `now`. Runs the hash off the async workers.
pub(crate) async fn password_ok(
    node: &Node,
    user: &str,
    password: &str,
    now: OffsetDateTime,
) -> bool {
    let hash = node
        .account(user)
        .filter(|a| !a.is_expired_at(now))
        .and_then(|a| a.password_hash);
    let usable = hash.is_some();
    let hash = hash.unwrap_or_else(|| DUMMY_HASH.to_string());
    let password = password.to_string();
    let verified = tokio::task::spawn_blocking(move || verify_password(&password, &hash))
        .await
        .unwrap_or(false);
    usable && verified
}

/// The account `user` may log in with `key` at `now` (key data compared, comment ignored).
pub(crate) fn key_ok(node: &Node, user: &str, key: &PublicKey, now: OffsetDateTime) -> bool {
    node.account(user)
        .filter(|a| !a.is_expired_at(now))
        .is_some_and(|a| account_has_key(&a, key))
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
        assert!(password_ok(&node, "alice", "pw1", now).await);
        assert!(!password_ok(&node, "alice", "pw2", now).await);
        assert!(!password_ok(&node, "bob", "pw1", now).await);
        assert!(!password_ok(&node, "alice", "pw1", now + Duration::days(2)).await);
        let node = node_with(account(None, None, Duration::days(1)));
        assert!(
            !password_ok(&node, "alice", "12345", now).await,
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
        assert!(key_ok(&node, "alice", &offered, now));
        assert!(!key_ok(&node, "alice", &offered, now + Duration::days(2)));
        assert!(!key_ok(&node, "bob", &offered, now));
        let node = node_with(account(None, None, Duration::days(1)));
        assert!(!key_ok(&node, "alice", &offered, now));
    }
}
