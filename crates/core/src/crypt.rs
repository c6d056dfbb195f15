//! Password hashing as crypt(3) writes it, so the same string serves the embedded SSH node and
//! `/etc/shadow` on a real node. SHA-512-crypt (`$6$`) with a 16-character salt: glibc and
//! libxcrypt truncate longer salts, so sha-crypt's default 22-character salt never verifies there.

use rand::RngCore;
use sha_crypt::{PasswordHasher, PasswordVerifier, ShaCrypt};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Passwords hashed by [`hash_password`] in this process.
static HASHED: AtomicU64 = AtomicU64::new(0);

/// How many passwords [`hash_password`] hashed in this process so far (a request refused
/// before its hash leaves it unchanged).
pub fn passwords_hashed() -> u64 {
    HASHED.load(Relaxed)
}

/// Hashes `password` with a fresh 12-byte (16 crypt-base64 characters) salt.
/// About 2–3 ms of CPU: call it off the async runtime's worker threads.
pub fn hash_password(password: &str) -> String {
    HASHED.fetch_add(1, Relaxed);
    let mut salt = [0u8; 12];
    rand::rng().fill_bytes(&mut salt);
    ShaCrypt::SHA512
        .hash_password_with_salt(password.as_bytes(), &salt)
        .expect("sha512-crypt with a 12-byte salt cannot fail")
        .to_string()
}

/// Constant-time check of `password` against a `$5$`/`$6$` crypt hash; any other or malformed
/// hash (including the locked markers `*` and `!`) never verifies.
pub fn verify_password(password: &str, hash: &str) -> bool {
    ShaCrypt::SHA512
        .verify_password(password.as_bytes(), hash)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_has_sixteen_char_salt_and_verifies() {
        let h = hash_password("s3cret!");
        assert!(h.starts_with("$6$"), "{h}");
        let salt = h
            .trim_start_matches("$6$")
            .trim_start_matches("rounds=5000$");
        let salt = salt.split('$').next().unwrap();
        assert_eq!(salt.len(), 16, "{h}");
        assert!(verify_password("s3cret!", &h));
        assert!(!verify_password("s3cret", &h));
        assert!(!verify_password("s3cret!", "*"));
        assert!(!verify_password("s3cret!", "!$6$x$y"));
    }

    #[test]
    fn verifies_a_glibc_hash() {
        // Made by glibc: python3 -c 'import crypt; print(crypt.crypt("12345", "$6$saltsaltsaltsalt"))'
        let h = "$6$saltsaltsaltsalt$Bc.BD/U.Fc2QI8UskxRAIgpyMqhy8JgtBeAC6EHbOEAb3Iag1Ku/hDrlrb.D3FoCa0RK5LSp3AwyeSdVbvjOa.";
        assert!(verify_password("12345", h));
        assert!(!verify_password("12346", h));
    }
}
