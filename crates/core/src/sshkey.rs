//! Validation of an OpenSSH public key line (`type base64 [comment]`), limited to the key types
//! the node's SSH server verifies, so a 200 never promises a key the node cannot honour.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// Why a value is not an acceptable public key; the text goes into the Batch error's `Reason`.
pub fn validate_public_key(line: &str) -> Result<(), String> {
    let trimmed = line.trim_end_matches(['\r', '\n']);
    if trimmed.contains(['\n', '\r']) {
        if trimmed.contains("PRIVATE KEY") {
            return Err("this is a private key; give the public key (the .pub file)".into());
        }
        if trimmed.contains("BEGIN SSH2 PUBLIC KEY") {
            return Err(
                "this is an RFC 4716 (SSH2) public key; convert it with ssh-keygen -i -f".into(),
            );
        }
        return Err("the value must be a single OpenSSH public key line".into());
    }
    if trimmed.contains("PRIVATE KEY") {
        return Err("this is a private key; give the public key (the .pub file)".into());
    }
    // A NUL or terminal escape would end up in authorized_keys and in logs and terminals.
    if trimmed.chars().any(|c| c.is_control() && c != '\t') {
        return Err("the key line contains control characters".into());
    }
    if trimmed.starts_with("PuTTY-User-Key-File") {
        return Err("this is a PuTTY key; export it in OpenSSH format".into());
    }
    if trimmed.contains("BEGIN SSH2 PUBLIC KEY") {
        return Err(
            "this is an RFC 4716 (SSH2) public key; convert it with ssh-keygen -i -f".into(),
        );
    }
    let mut parts = trimmed.split_ascii_whitespace();
    let (Some(kind), Some(b64)) = (parts.next(), parts.next()) else {
        return Err("expected an OpenSSH public key line: <type> <base64> [comment]".into());
    };
    let supported = [
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
    ];
    if !supported.contains(&kind) {
        return Err(format!(
            "key type '{}' is not supported; use ssh-ed25519, ssh-rsa (2048 bits or more) or ecdsa-sha2-nistp256/384/521",
            kind.chars().take(40).collect::<String>()
        ));
    }
    let blob = STANDARD
        .decode(b64)
        .map_err(|_| "the key data is not valid base64".to_string())?;
    let mut r = Reader(&blob);
    let bad = || "the key data is malformed".to_string();
    let inner = r.string().ok_or_else(bad)?;
    if inner != kind.as_bytes() {
        return Err("the key data does not match the key type".into());
    }
    match kind {
        "ssh-ed25519" => {
            if r.string().ok_or_else(bad)?.len() != 32 {
                return Err(bad());
            }
        }
        "ssh-rsa" => {
            let e = r.string().ok_or_else(bad)?;
            let n = r.string().ok_or_else(bad)?;
            if e.is_empty() || n.is_empty() {
                return Err(bad());
            }
            let n = strip_leading_zeros(n);
            let bits = n.len() * 8 - n[0].leading_zeros() as usize;
            if bits < 2048 {
                return Err(format!(
                    "RSA keys must have at least 2048 bits (this one has {bits})"
                ));
            }
        }
        _ => {
            let curve = r.string().ok_or_else(bad)?;
            if !kind.ends_with(std::str::from_utf8(curve).unwrap_or("?")) {
                return Err("the key data does not match the key type".into());
            }
            let point = r.string().ok_or_else(bad)?;
            if point.first() != Some(&4) {
                return Err(bad());
            }
        }
    }
    if !r.0.is_empty() {
        return Err(bad());
    }
    Ok(())
}

fn strip_leading_zeros(mut n: &[u8]) -> &[u8] {
    while n.len() > 1 && n[0] == 0 {
        n = &n[1..];
    }
    n
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn string(&mut self) -> Option<&'a [u8]> {
        let len = u32::from_be_bytes(self.0.get(..4)?.try_into().ok()?) as usize;
        let s = self.0.get(4..4usize.checked_add(len)?)?;
        self.0 = &self.0[4 + len..];
        Some(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl user@host";

    #[test]
    fn accepts_ed25519_with_or_without_comment() {
        assert!(validate_public_key(ED).is_ok());
        assert!(validate_public_key(&ED[..ED.rfind(' ').unwrap()]).is_ok());
        assert!(validate_public_key(&format!("{ED}\n")).is_ok());
    }

    #[test]
    fn refuses_what_is_not_a_public_key() {
        let cases = [
            ("", "expected"),
            ("ssh-ed25519", "expected"),
            ("ssh-dss AAAAB3NzaC1kc3M=", "not supported"),
            ("ssh-ed25519 !!!notbase64", "base64"),
            (
                "ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl",
                "does not match",
            ),
            (
                "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----",
                "private key",
            ),
            (
                "---- BEGIN SSH2 PUBLIC KEY ----\nAAAA\n---- END SSH2 PUBLIC KEY ----",
                "RFC 4716",
            ),
            ("PuTTY-User-Key-File-3: ssh-ed25519", "PuTTY"),
            (&format!("{ED}\u{0}"), "control"),
            (&format!("{ED}\u{1b}[2J"), "control"),
            (&format!("{ED}\n{ED}"), "single"),
            (
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9",
                "malformed",
            ),
        ];
        for (key, why) in cases {
            let err = validate_public_key(key).unwrap_err();
            assert!(err.contains(why), "{key:?}: {err}");
        }
    }

    #[test]
    fn refuses_short_rsa() {
        // ssh-rsa blob with e=65537 and a 1024-bit modulus.
        let mut blob = Vec::new();
        for part in [&b"ssh-rsa"[..], &[1, 0, 1], &[0xc0; 128]] {
            blob.extend_from_slice(&(part.len() as u32).to_be_bytes());
            blob.extend_from_slice(part);
        }
        let line = format!("ssh-rsa {}", STANDARD.encode(&blob));
        assert!(validate_public_key(&line).unwrap_err().contains("1024"));
    }
}

/// The key's fingerprint as `ssh-keygen -l` prints it (`SHA256:` + unpadded base64).
pub fn fingerprint(line: &str) -> Option<String> {
    use sha2::{Digest, Sha256};
    let b64 = line.split_ascii_whitespace().nth(1)?;
    let blob = STANDARD.decode(b64).ok()?;
    let digest = Sha256::digest(&blob);
    Some(format!(
        "SHA256:{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
    ))
}

#[cfg(test)]
mod fingerprint_tests {
    #[test]
    fn matches_ssh_keygen() {
        // What `ssh-keygen -lf` prints for this key.
        let key =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl me";
        assert_eq!(
            super::fingerprint(key).unwrap(),
            "SHA256:+DiY3wvvV6TuJJhbpZisF/zLDA0zPMSvHdkr4UvCOqU"
        );
    }
}
