//! Batch accounts known to the server: a name and one or two base64 keys each.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use std::collections::HashMap;

/// The well-known development account printed at start-up (as Azurite's devstoreaccount1).
pub const DEV_ACCOUNT: &str = "bluebatchdev";
pub const DEV_KEY: &str =
    "msn4CXagmnuee1CykUmurwWY6CRu19fKDokfMNT5AJ+LT4lM+P8MqEYH0USzDq3pUGzaJUiEfj51equ/VeT60Q==";

#[derive(Clone, Default)]
pub struct Accounts {
    keys: HashMap<String, Vec<Vec<u8>>>,
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
        let mut a = Self::default();
        a.add(DEV_ACCOUNT, &[DEV_KEY.to_string()])
            .expect("the development key is valid base64");
        a
    }

    /// Adds an account with its (primary, secondary…) base64 keys.
    pub fn add(&mut self, name: &str, keys: &[String]) -> Result<(), String> {
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
        self.keys.insert(name.to_string(), decoded);
        Ok(())
    }

    pub fn keys(&self, name: &str) -> Option<&[Vec<u8>]> {
        self.keys.get(name).map(Vec::as_slice)
    }

    /// Every account with its keys in base64, in name order (to seed a shared store).
    pub fn entries(&self) -> Vec<(String, Vec<String>)> {
        let mut out: Vec<(String, Vec<String>)> = self
            .keys
            .iter()
            .map(|(n, ks)| (n.clone(), ks.iter().map(|k| STANDARD.encode(k)).collect()))
            .collect();
        out.sort();
        out
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }
}
