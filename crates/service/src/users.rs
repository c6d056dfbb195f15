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
        let pending = {
            let mut st = self.lock();
            let (os, _, entry) = st.node_mut(at.account, at.pool, at.node)?;
            let name = match update {
                Some(n) => n.to_string(),
                None => body.name.clone().unwrap_or_default(),
            };
            let ukey = user_key(os, &name);
            if update.is_some() && !entry.users.contains_key(&ukey) {
                return Err(BatchError::new(Code::NodeUserNotFound));
            }
            check_os_rules(os, &body)?;
            if update.is_none() && entry.node.host.is_some() {
                let host = entry.node.host.clone();
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
            }
            let (os, pool_id, entry) = st.node_mut(at.account, at.pool, at.node)?;
            check_node_state_for_users(entry.node.state)?;
            let is_admin = match update {
                Some(_) => entry.users[&ukey].is_admin,
                None => {
                    if entry.users.contains_key(&ukey) {
                        return Err(BatchError::new(Code::NodeUserExists));
                    }
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
            let expiry = body.expiry_time.unwrap_or_else(|| default_expiry(now));
            let revision = entry.node.users_revision + 1;
            let user = NodeUser {
                // An update keeps the name as it was created (Windows names match any case).
                name: entry.users.get(&ukey).map_or(name, |u| u.name.clone()),
                is_admin,
                password_hash,
                ssh_public_key: body.ssh_public_key,
                expiry_time: expiry,
                login_refused_from: login_refused_from(os, expiry),
                revision,
                etag: new_etag(now),
                last_modified: now,
            };
            let key = node_key(at.account, &pool_id, at.node);
            let written = Written {
                etag: user.etag.clone(),
                last_modified: now,
                pool_id: pool_id.clone(),
                user_name: user.name.clone(),
            };
            let user_op = put_json(user_record(at.account, &pool_id, at.node, &ukey), &user);
            let user_name = user.name.clone();
            entry.users.insert(ukey, user);
            let acked = self
                .apply_to_node(
                    os,
                    entry.node.host.as_deref(),
                    entry.node.applied_revision,
                    &key,
                    revision,
                    &entry.users,
                )
                .for_user(&user_name);
            entry.node.users_revision = revision;
            if matches!(acked, crate::Ack::Given) {
                entry.node.applied_revision = Some(revision);
            }
            let ops = vec![
                user_op,
                put_json(node_record(at.account, &pool_id, at.node), &entry.node),
            ];
            (self.submit(ops), written, acked)
        };
        let (pending, written, acked) = pending;
        pending.durable().await?;
        self.acknowledged(acked, at.timeout).await?;
        Ok(written)
    }

    pub async fn delete_user(&self, at: UserAddr<'_>, name: &str) -> Result<()> {
        let _gate = self.gate().await?;
        let pending = {
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
            let acked = self
                .apply_to_node(
                    os,
                    entry.node.host.as_deref(),
                    entry.node.applied_revision,
                    &key,
                    revision,
                    &entry.users,
                )
                .for_user(&removed);
            entry.node.users_revision = revision;
            if matches!(acked, crate::Ack::Given) {
                entry.node.applied_revision = Some(revision);
            }
            let pending = self.submit(vec![
                Op::Delete {
                    key: user_record(at.account, &pool_id, at.node, &ukey),
                },
                put_json(node_record(at.account, &pool_id, at.node), &entry.node),
            ]);
            (pending, acked)
        };
        let (pending, acked) = pending;
        pending.durable().await?;
        self.acknowledged(acked, at.timeout).await
    }
}
