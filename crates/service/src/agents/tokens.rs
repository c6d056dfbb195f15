//! Join tokens (`ID.SECRET`, the secret stored as its SHA-256, scoped, expiring, usable once)
//! and the join that exchanges one for a host id and node credential.

use super::credential::{credential, whole_seconds};
use super::hosts::check_report;
use super::{
    HOST_PREFIX, HostEntry, HostRecord, JoinTokenCreated, JoinTokenView, MAX_TOKEN_TTL,
    TOKEN_PREFIX, TokenRecord, auth_failed, hex, invalid, not_found, random_alnum, unhex,
};
use crate::{Service, put_json};
use bluebatch_core::error::Result;
use bluebatch_protocol::{JoinRequest, JoinResponse};
use bluebatch_store::Op;
use sha2::{Digest, Sha256};
use std::time::Duration;
use time::OffsetDateTime;

fn sha256_hex(s: &str) -> String {
    hex(&Sha256::digest(s.as_bytes()))
}

/// Constant-time equality of two byte strings of the same length.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Service {
    pub async fn create_join_token(
        &self,
        account: &str,
        pool: Option<&str>,
        ttl: Duration,
    ) -> Result<JoinTokenCreated> {
        let _gate = self.gate().await?;
        if ttl.is_zero() || ttl > MAX_TOKEN_TTL {
            return Err(invalid("ttl", "A join token lives 1 second to 366 days."));
        }
        if let Some(p) = pool
            && (p.is_empty() || p.len() > 64 || p.contains('/'))
        {
            return Err(invalid("pool", "Not a pool id."));
        }
        let now = OffsetDateTime::now_utc();
        let expires = now + time::Duration::try_from(ttl).unwrap_or(time::Duration::DAY);
        let secret = random_alnum(32);
        let (created, pending) = {
            let mut st = self.lock();
            // Tokens a day past their expiry are of no use any more.
            let stale: Vec<String> = st
                .hub
                .tokens
                .values()
                .filter(|t| t.expires + time::Duration::DAY < now)
                .map(|t| t.id.clone())
                .collect();
            let mut ops: Vec<Op> = stale
                .iter()
                .map(|id| Op::Delete {
                    key: format!("{TOKEN_PREFIX}{id}"),
                })
                .collect();
            for id in &stale {
                st.hub.tokens.remove(id);
            }
            let id = loop {
                let id = random_alnum(6);
                if !st.hub.tokens.contains_key(&id) {
                    break id;
                }
            };
            let rec = TokenRecord {
                id: id.clone(),
                account: account.to_string(),
                pool: pool.map(str::to_string),
                hash: sha256_hex(&secret),
                expires,
                used: false,
            };
            ops.push(put_json(format!("{TOKEN_PREFIX}{id}"), &rec));
            st.hub.tokens.insert(id.clone(), rec);
            let created = JoinTokenCreated {
                token: format!("{id}.{secret}"),
                id,
                pool: pool.map(str::to_string),
                expires,
            };
            (created, self.submit(ops))
        };
        pending.durable().await?;
        tracing::info!(account, token = %created.id, pool = ?created.pool, "join token created");
        Ok(created)
    }

    pub fn list_join_tokens(&self, account: &str) -> Vec<JoinTokenView> {
        let st = self.lock();
        st.hub
            .tokens
            .values()
            .filter(|t| t.account == account)
            .map(|t| JoinTokenView {
                id: t.id.clone(),
                pool: t.pool.clone(),
                expires: t.expires,
                used: t.used,
            })
            .collect()
    }

    pub async fn revoke_join_token(&self, account: &str, id: &str) -> Result<()> {
        let _gate = self.gate().await?;
        let pending = {
            let mut st = self.lock();
            if st.hub.tokens.get(id).is_none_or(|t| t.account != account) {
                return Err(not_found("join token"));
            }
            st.hub.tokens.remove(id);
            self.submit(vec![Op::Delete {
                key: format!("{TOKEN_PREFIX}{id}"),
            }])
        };
        pending.durable().await?;
        tracing::info!(account, token = id, "join token revoked");
        Ok(())
    }

    /// Exchanges a join token for a host id and node credential. The token is checked in
    /// constant time, once (its use is durable before the answer), against its expiry.
    pub async fn join(&self, req: JoinRequest) -> Result<JoinResponse> {
        let _gate = self.gate().await?;
        const FORGED: &str = "The join token is not valid.";
        let (id, secret) = req
            .token
            .split_once('.')
            .ok_or_else(|| auth_failed(FORGED))?;
        if id.len() != 6 || !(16..=128).contains(&secret.len()) {
            return Err(auth_failed(FORGED));
        }
        check_report(&req.host)?;
        let now = OffsetDateTime::now_utc();
        let given = Sha256::digest(secret.as_bytes());
        let ttl = time::Duration::try_from(self.inner.config.credential_ttl)
            .unwrap_or(time::Duration::DAY);
        let (answer, pending) = {
            let mut st = self.lock();
            let Some(tok) = st.hub.tokens.get_mut(id) else {
                return Err(auth_failed(FORGED));
            };
            let stored = unhex(&tok.hash).unwrap_or_default();
            if !ct_eq(&stored, &given) {
                return Err(auth_failed(FORGED));
            }
            if tok.used {
                return Err(auth_failed("The join token was already used."));
            }
            if now >= tok.expires {
                return Err(auth_failed("The join token has expired."));
            }
            tok.used = true;
            let tok = tok.clone();
            let host_id = loop {
                let h = format!("host-{}", random_alnum(8));
                if !st.hub.hosts.contains_key(&h) {
                    break h;
                }
            };
            // Whole seconds, as the credential carries it.
            let expires = whole_seconds(now + ttl);
            let rec = HostRecord {
                id: host_id.clone(),
                account: tok.account.clone(),
                pool: tok.pool.clone(),
                hostname: req.host.hostname.clone(),
                provider: req.host.provider,
                slots: req.host.slots,
                address: req.host.address.clone(),
                ssh_port: req.host.ssh_port,
                reserved_names: req.host.reserved_names.clone(),
                version: req.host.version.clone(),
                drained: false,
                joined: now,
                credential_expires: expires,
                renewed_at: None,
            };
            let ops = vec![
                put_json(format!("{TOKEN_PREFIX}{id}"), &tok),
                put_json(format!("{HOST_PREFIX}{host_id}"), &rec),
            ];
            let mut entry = HostEntry::new(rec);
            entry.last_seen = Some(now);
            st.hub.hosts.insert(host_id.clone(), entry);
            let answer = JoinResponse {
                credential: credential(&st.hub.secret, &host_id, expires),
                host_id,
                credential_expires: expires,
                account: tok.account,
                grace_seconds: self.inner.config.agent_grace.as_secs(),
            };
            (answer, self.submit(ops))
        };
        pending.durable().await?;
        tracing::info!(
            host = %answer.host_id,
            account = %answer.account,
            slots = req.host.slots,
            provider = ?req.host.provider,
            "host joined"
        );
        self.fill_short_pools(&answer.account).await;
        Ok(answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_equality() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }
}
