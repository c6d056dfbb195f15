//! Batch accounts known to the server: a name and one or two base64 keys each.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit};
use sha2::Sha256;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// The well-known development account printed at start-up (as Azurite's devstoreaccount1).
pub const DEV_ACCOUNT: &str = "bluebatchdev";
pub const DEV_KEY: &str =
    "msn4CXagmnuee1CykUmurwWY6CRu19fKDokfMNT5AJ+LT4lM+P8MqEYH0USzDq3pUGzaJUiEfj51equ/VeT60Q==";

/// Clones share the accounts: [`Accounts::replace`] on one (a replica learning accounts another
/// added to the shared store) is seen by every clone.
#[derive(Clone, Default)]
pub struct Accounts {
    keys: Arc<RwLock<KeyMap>>,
}

/// Account name → its decoded keys (primary first).
type KeyMap = HashMap<String, Arc<[AccountKey]>>;

/// One decoded account key with its keyed HMAC-SHA256 state, computed once when the key is
/// loaded: a signature check clones the state instead of deriving the inner and outer pads
/// (two SHA-256 blocks) again for every request.
#[derive(Clone)]
pub struct AccountKey {
    raw: Vec<u8>,
    mac: Hmac<Sha256>,
}

impl AccountKey {
    fn new(raw: Vec<u8>) -> Self {
        let mac =
            <Hmac<Sha256> as KeyInit>::new_from_slice(&raw).expect("HMAC takes any key length");
        Self { raw, mac }
    }

    /// The decoded key.
    pub fn bytes(&self) -> &[u8] {
        &self.raw
    }

    /// A fresh HMAC-SHA256 keyed with this key (nothing fed yet).
    pub fn mac(&self) -> Hmac<Sha256> {
        self.mac.clone()
    }
}

/// Account names as Azure allows them: 3 to 24 lower-case letters and digits.
pub fn valid_account_name(name: &str) -> bool {
    (3..=24).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

impl Accounts {
    pub fn dev() -> Self {
        let a = Self::default();
        a.add(DEV_ACCOUNT, &[DEV_KEY.to_string()])
            .expect("the development key is valid base64");
        a
    }

    /// Adds an account with its (primary, secondary…) base64 keys.
    pub fn add(&self, name: &str, keys: &[String]) -> Result<(), String> {
        if !valid_account_name(name) {
            return Err(format!(
                "account name {name:?}: use 3 to 24 lower-case letters and digits"
            ));
        }
        let decoded = keys
            .iter()
            .map(|k| {
                STANDARD
                    .decode(k.trim())
                    .map_err(|_| format!("the key of account {name} is not base64"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if decoded.is_empty() || decoded.iter().any(Vec::is_empty) {
            return Err(format!("account {name} needs at least one non-empty key"));
        }
        let keys: Vec<AccountKey> = decoded.into_iter().map(AccountKey::new).collect();
        self.write().insert(name.to_string(), keys.into());
        Ok(())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, KeyMap> {
        self.keys.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, KeyMap> {
        self.keys.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn keys(&self, name: &str) -> Option<Arc<[AccountKey]>> {
        self.read().get(name).cloned()
    }

    /// Replaces every account at once with `entries` (name, base64 keys); an invalid entry is
    /// skipped with its reason returned.
    pub fn replace(&self, entries: &[(String, Vec<String>)]) -> Vec<String> {
        let fresh = Accounts::default();
        let mut refused = Vec::new();
        for (name, keys) in entries {
            if let Err(e) = fresh.add(name, keys) {
                refused.push(e);
            }
        }
        let map = std::mem::take(&mut *fresh.write());
        *self.write() = map;
        refused
    }

    /// Every account with its keys in base64, in name order (to seed a shared store).
    pub fn entries(&self) -> Vec<(String, Vec<String>)> {
        let mut out: Vec<(String, Vec<String>)> = self
            .read()
            .iter()
            .map(|(n, ks)| {
                (
                    n.clone(),
                    ks.iter().map(|k| STANDARD.encode(k.bytes())).collect(),
                )
            })
            .collect();
        out.sort();
        out
    }

    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.read().keys().cloned().collect();
        names.sort();
        names
    }
}
