//! The node credential (`HOST.EXPIRES.HMAC`), the service secret that signs it, and its renewal
//! through the long poll.

use super::{HOST_PREFIX, SECRET_RECORD, SecretRecord, auth_failed, hex, unhex};
use crate::{Service, put_json};
use bluebatch_core::error::Result;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use time::OffsetDateTime;

fn mac(secret: &[u8], payload: &str) -> Hmac<Sha256> {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(payload.as_bytes());
    mac
}

pub(super) fn whole_seconds(t: OffsetDateTime) -> OffsetDateTime {
    t.replace_nanosecond(0).unwrap_or(t)
}

pub(super) fn credential(secret: &[u8], host: &str, expires: OffsetDateTime) -> String {
    let payload = format!("{host}.{}", expires.unix_timestamp());
    let sig = hex(&mac(secret, &payload).finalize().into_bytes());
    format!("{payload}.{sig}")
}

/// The host a credential names, if its signature holds and it has not expired.
fn check_credential(secret: &[u8], cred: &str, now: OffsetDateTime) -> Option<String> {
    let mut parts = cred.split('.');
    let (host, exp, sig) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || host.is_empty() || secret.is_empty() {
        return None;
    }
    let sig = unhex(sig)?;
    mac(secret, &format!("{host}.{exp}"))
        .verify_slice(&sig)
        .ok()?;
    let exp = OffsetDateTime::from_unix_timestamp(exp.parse().ok()?).ok()?;
    (now < exp).then(|| host.to_string())
}

impl Service {
    /// Makes the credential secret on first start (stored, so every replica and restart share it).
    pub(crate) async fn ensure_agent_secret(&self) {
        let Ok(_gate) = self.gate().await else {
            return;
        };
        let pending = {
            let mut st = self.lock();
            if !st.hub.secret.is_empty() {
                return;
            }
            let mut key = [0u8; 32];
            rand::RngCore::fill_bytes(&mut rand::rng(), &mut key);
            st.hub.secret = key.to_vec();
            self.submit(vec![put_json(
                SECRET_RECORD.to_string(),
                &SecretRecord { key: hex(&key) },
            )])
        };
        let _ = pending.durable().await;
    }

    /// The host a node credential names; `AuthenticationFailed` for a forged or expired one, or
    /// one of a host that was revoked.
    pub fn authenticate_node(&self, credential: &str) -> Result<String> {
        let st = self.lock();
        check_credential(&st.hub.secret, credential, OffsetDateTime::now_utc())
            .filter(|h| st.hub.hosts.contains_key(h))
            .ok_or_else(|| auth_failed("The node credential is not valid."))
    }

    /// A fresh credential once the newest one handed out is past half its life; repeated in
    /// the answers of a short while after.
    pub(super) async fn renew_credential(&self, host: &str) -> Result<Option<String>> {
        let ttl = time::Duration::try_from(self.inner.config.credential_ttl)
            .unwrap_or(time::Duration::DAY);
        let now = OffsetDateTime::now_utc();
        let renew = self
            .lock()
            .hub
            .hosts
            .get(host)
            .is_some_and(|h| now + ttl / 2 >= h.rec.credential_expires);
        let _gate = if renew {
            Some(self.gate().await?)
        } else {
            None
        };
        let (cred, pending) = {
            let mut st = self.lock();
            let secret = st.hub.secret.clone();
            let Some(h) = st.hub.hosts.get_mut(host) else {
                return Err(auth_failed("The node credential is not valid."));
            };
            if now + ttl / 2 < h.rec.credential_expires {
                let window: time::Duration = (ttl / 4_i32).min(time::Duration::minutes(10));
                return Ok(h
                    .rec
                    .renewed_at
                    .is_some_and(|t| now < t + window)
                    .then(|| credential(&secret, host, h.rec.credential_expires)));
            }
            h.rec.renewed_at = Some(now);
            h.rec.credential_expires = whole_seconds(now + ttl);
            let cred = credential(&secret, host, h.rec.credential_expires);
            let op = put_json(format!("{HOST_PREFIX}{host}"), &h.rec);
            (cred, self.submit(vec![op]))
        };
        pending.durable().await?;
        Ok(Some(cred))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_verify_and_expire() {
        let secret = b"0123456789abcdef0123456789abcdef";
        let now = OffsetDateTime::now_utc();
        let c = credential(secret, "host-abc", now + time::Duration::HOUR);
        assert_eq!(
            check_credential(secret, &c, now).as_deref(),
            Some("host-abc")
        );
        assert_eq!(check_credential(b"other", &c, now), None);
        assert_eq!(
            check_credential(secret, &c, now + time::Duration::HOUR * 2),
            None
        );
        let forged = c.replace("host-abc", "host-abd");
        assert_eq!(check_credential(secret, &forged, now), None);
        assert_eq!(check_credential(secret, "a.b", now), None);
        assert_eq!(check_credential(secret, "a.1.zz", now), None);
    }
}
