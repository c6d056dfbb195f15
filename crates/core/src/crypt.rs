//! Password hashing as crypt(3) writes it, so the same string serves the embedded SSH node and
//! `/etc/shadow` on a real node. SHA-512-crypt (`$6$`) with a 16-character salt: glibc and
//! libxcrypt truncate longer salts, so sha-crypt's default 22-character salt never verifies there.

use rand::RngCore;
use sha_crypt::{PasswordHasher, PasswordVerifier, ShaCrypt};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

/// Passwords hashed by [`hash_password`] in this process.
static HASHED: AtomicU64 = AtomicU64::new(0);

/// How many passwords [`hash_password`] hashed in this process so far (a request refused
/// before its hash leaves it unchanged).
pub fn passwords_hashed() -> u64 {
    HASHED.load(Relaxed)
}

/// Calls of [`hash_password`] running now.
static UNDER_WAY: AtomicUsize = AtomicUsize::new(0);

/// How many [`hash_password`] calls are running now in this process: a write whose hash just
/// ended knows whether other password writes are about to follow it.
pub fn hashes_under_way() -> usize {
    UNDER_WAY.load(Relaxed)
}

/// Counts one hash under way while it lives (a panicking hash too).
struct UnderWay;

impl Drop for UnderWay {
    fn drop(&mut self) {
        UNDER_WAY.fetch_sub(1, Relaxed);
    }
}

/// Hashes `password` with a fresh 12-byte (16 crypt-base64 characters) salt.
/// About 2–3 ms of CPU: call it off the async runtime's worker threads.
pub fn hash_password(password: &str) -> String {
    HASHED.fetch_add(1, Relaxed);
    UNDER_WAY.fetch_add(1, Relaxed);
    let _under_way = UnderWay;
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
    fn a_hash_is_counted_under_way_while_it_runs() {
        // Other tests of this binary may hash at the same time: only that it is counted while
        // it runs is checked (a hash takes a millisecond or more; this thread reads throughout).
        let seen = std::thread::scope(|s| {
            let h = s.spawn(|| hash_password("x"));
            let mut max = 0;
            while !h.is_finished() {
                max = max.max(hashes_under_way());
            }
            assert!(verify_password("x", &h.join().unwrap()));
            max
        });
        assert!(seen >= 1, "a running hash was never counted");
    }

    #[test]
    fn verifies_a_glibc_hash() {
        // Made by glibc: python3 -c 'import crypt; print(crypt.crypt("12345", "$6$saltsaltsaltsalt"))'
        let h = "$6$saltsaltsaltsalt$Bc.BD/U.Fc2QI8UskxRAIgpyMqhy8JgtBeAC6EHbOEAb3Iag1Ku/hDrlrb.D3FoCa0RK5LSp3AwyeSdVbvjOa.";
        assert!(verify_password("12345", h));
        assert!(!verify_password("12346", h));
    }
}
