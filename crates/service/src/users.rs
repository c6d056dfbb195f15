//! Node-user operations: Add, Update (replace-all), Delete.

use crate::state::{node_key, node_record, user_key, user_record};
use crate::{Service, put_json};
use bluebatch_core::error::{BatchError, Code, Result};
use bluebatch_core::model::{NodeUser, Os, new_etag};
use bluebatch_core::users::{
    UserBody, check_node_state_for_users, check_os_rules, default_expiry, login_refused_from,
};
use bluebatch_store::Op;
use std::time::Duration;

/// What a successful write reports: the resource's new ETag and Last-Modified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub etag: String,
    pub last_modified: time::OffsetDateTime,
    /// The pool id and user name as stored (case kept), for the resource's URL.
    pub pool_id: String,
    pub user_name: String,
}

/// Where a user lives, and how long a write of it waits for the node.
pub struct UserAddr<'a> {
    pub account: &'a str,
    pub pool: &'a str,
    pub node: &'a str,
    /// The request's `timeout`: how long the write waits for the node's acknowledgement once it
    /// is durable (at most the service's `ack_timeout`; `None`: that).
    pub timeout: Option<Duration>,
}

/// How long an Add or Update User that carries a new password hash may wait for the password
/// writes hashing behind it to share its commit's sync (`GroupCommit::enqueue_within`).
/// Measured with `bluebatch-bench --only update-password`: 2 ms took the row from 0.83-0.85 to
/// 0.89-0.91 of the hash ceiling (three rounds each; docs/performance.md, ninth pass).
const HASHED_WRITE_PATIENCE: Duration = Duration::from_millis(2);

impl Service {
    /// Add User. `password_hash` is the crypt hash of `body.password` (hashed by the caller off
    /// the async workers).
    pub async fn add_user(
        &self,
        at: UserAddr<'_>,
        body: UserBody,
        password_hash: Option<String>,
    ) -> Result<Written> {
        self.write_user(at, None, body, password_hash).await
    }

    /// Update User: replaces every updatable property; `isAdmin` keeps its value.
    pub async fn update_user(
        &self,
        at: UserAddr<'_>,
        name: &str,
        body: UserBody,
        password_hash: Option<String>,
    ) -> Result<Written> {
        self.write_user(at, Some(name), body, password_hash).await
    }

    async fn write_user(
        &self,
        at: UserAddr<'_>,
        update: Option<&str>,
        body: UserBody,
        password_hash: Option<String>,
    ) -> Result<Written> {
        let _gate = self.gate().await?;
        let now = self.now();
        // A write that spent about a millisecond of CPU on its hash, with other password writes
        // hashing behind it, can wait a fraction of that to share its sync with theirs; a lone
        // one (nothing hashing) commits at once.
        let patience = if password_hash.is_some() && bluebatch_core::crypt::hashes_under_way() > 0 {
            HASHED_WRITE_PATIENCE
        } else {
            Duration::ZERO
        };
        // Built before the lock: nothing else under it depends on them.
        let etag = new_etag(now);
        let expiry = body.expiry_time.unwrap_or_else(|| default_expiry(now));
        let (pending, written, acked, applied) = {
            let mut st = self.lock();
            let mut found = st.node_mut(at.account, at.pool, at.node)?;
            let os = found.0;
            let name = match update {
                Some(n) => n.to_string(),
                None => body.name.clone().unwrap_or_default(),
            };
            let ukey = user_key(os, &name);
            if update.is_some() && !found.2.users.contains_key(&ukey) {
                return Err(BatchError::new(Code::NodeUserNotFound));
            }
            check_os_rules(os, &body)?;
            if update.is_none() && found.2.node.host.is_some() {
                let host = found.2.node.host.clone();
                if Service::reserved_on(&st, host.as_deref(), &name, os == Os::Windows) {
                    let why = format!(
                        "The user name {name} is reserved on this node: the host has an account of that name that bluebatch does not manage."
                    );
                    return Err(BatchError::property(
                        Code::InvalidPropertyValue,
                        "name",
                        why.clone(),
                    )
                    .message(why));
                }
                // Only an Add on a joined host's node looks it up twice (`reserved_on` reads
                // the whole state).
                found = st.node_mut(at.account, at.pool, at.node)?;
            }
            let (_, pool_id, entry) = found;
            check_node_state_for_users(entry.node.state)?;
            let existing = entry.users.get(&ukey);
            let is_admin = match (update, existing) {
                (Some(_), Some(u)) => u.is_admin,
                (Some(_), None) => return Err(BatchError::new(Code::NodeUserNotFound)),
                (None, Some(_)) => return Err(BatchError::new(Code::NodeUserExists)),
                (None, None) => {
                    if entry.users.len() >= self.inner.config.max_users_per_node {
                        return Err(BatchError::new(Code::OperationNotValidOnNode).message(
                            format!(
                                "The node already has the maximum of {} user accounts.",
                                self.inner.config.max_users_per_node
                            ),
                        ));
                    }
                    body.is_admin
                }
            };
            let revision = entry.node.users_revision + 1;
            let user = NodeUser {
                // An update keeps the name as it was created (Windows names match any case).
                name: existing.map_or(name, |u| u.name.clone()),
                is_admin,
                password_hash,
                ssh_public_key: body.ssh_public_key,
                expiry_time: expiry,
                login_refused_from: login_refused_from(os, expiry),
                revision,
                etag: etag.clone(),
                last_modified: now,
            };
            let user_op = put_json(user_record(at.account, &pool_id, at.node, &ukey), &user);
            let user_name = user.name.clone();
            let embedded = entry.node.host.is_none() && os == Os::Linux;
            // The one account an embedded node changes (it takes it alone when it can).
            let account = embedded.then(|| user.to_account());
            entry.users.insert(ukey, user);
            let key = node_key(at.account, &pool_id, at.node);
            let started = std::time::Instant::now();
            let acked = self.apply_to_node(
                os,
                entry.node.host.as_deref(),
                entry.node.applied_revision,
                &key,
                revision,
                &entry.users,
                (&user_name, account),
            );
            entry.node.users_revision = revision;
            if matches!(acked, crate::Ack::Given) {
                entry.node.applied_revision = Some(revision);
            }
            // The user's record alone: it carries the node's new revision (see
            // `state::raise_users_revision`); an embedded node's applied revision is not stored
            // (it applies again at start-up). A user write moves no pool's or host's capacity.
            let pending = self.submit_quiet_within(vec![user_op], patience);
            (
                pending,
                (pool_id, user_name),
                acked,
                embedded.then_some((key, started)),
            )
        };
        // Out of the lock: the sessions of an account gone or expired end before the answer.
        self.enforced(applied);
        let (pool_id, user_name) = written;
        let acked = acked.for_user(&user_name);
        pending.durable().await?;
        self.acknowledged(acked, at.timeout).await?;
        Ok(Written {
            etag,
            last_modified: now,
            pool_id,
            user_name,
        })
    }

    pub async fn delete_user(&self, at: UserAddr<'_>, name: &str) -> Result<()> {
        let _gate = self.gate().await?;
        let (pending, acked, applied) = {
            let mut st = self.lock();
            let (os, pool_id, entry) = st.node_mut(at.account, at.pool, at.node)?;
            let ukey = user_key(os, name);
            if !entry.users.contains_key(&ukey) {
                return Err(BatchError::new(Code::NodeUserNotFound));
            }
            check_node_state_for_users(entry.node.state)?;
            let revision = entry.node.users_revision + 1;
            let key = node_key(at.account, &pool_id, at.node);
            let removed = entry
                .users
                .remove(&ukey)
                .map(|u| u.name)
                .unwrap_or_default();
            let embedded = entry.node.host.is_none() && os == Os::Linux;
            let started = std::time::Instant::now();
            let acked = self
                .apply_to_node(
                    os,
                    entry.node.host.as_deref(),
                    entry.node.applied_revision,
                    &key,
                    revision,
                    &entry.users,
                    (&removed, None),
                )
                .for_user(&removed);
            entry.node.users_revision = revision;
            if matches!(acked, crate::Ack::Given) {
                entry.node.applied_revision = Some(revision);
            }
            let pending = self.submit_quiet(vec![
                Op::Delete {
                    key: user_record(at.account, &pool_id, at.node, &ukey),
                },
                put_json(node_record(at.account, &pool_id, at.node), &entry.node),
            ]);
            (pending, acked, embedded.then_some((key, started)))
        };
        // Out of the lock: the removed account's sessions end before the answer.
        self.enforced(applied);
        pending.durable().await?;
        self.acknowledged(acked, at.timeout).await
    }
}
