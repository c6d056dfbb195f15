//! Shared Key signing as the Azure SDKs do it (docs/contract.md §4), for the load generator.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

pub struct Signer {
    pub account: String,
    key: Vec<u8>,
}

impl Signer {
    pub fn new(account: &str, base64_key: &str) -> Result<Self, String> {
        let key = STANDARD
            .decode(base64_key.trim())
            .map_err(|_| "the account key is not base64".to_string())?;
        Ok(Signer {
            account: account.to_string(),
            key,
        })
    }

    /// The string to sign for a request that carries `ocp-date` and no other signed header than
    /// Content-Length and Content-Type. `query` is the raw query string (without `?`).
    pub fn string_to_sign(
        &self,
        method: &str,
        path: &str,
        query: &str,
        content_length: &str,
        content_type: &str,
        ocp_date: &str,
    ) -> String {
        let mut s = String::with_capacity(256);
        s.push_str(method);
        s.push('\n');
        // content-encoding, content-language
        s.push_str("\n\n");
        s.push_str(content_length);
        s.push('\n');
        // content-md5
        s.push('\n');
        s.push_str(content_type);
        s.push('\n');
        // date, if-modified-since, if-match, if-none-match, if-unmodified-since, range
        s.push_str("\n\n\n\n\n\n");
        s.push_str("ocp-date:");
        s.push_str(ocp_date);
        s.push('\n');
        s.push('/');
        s.push_str(&self.account);
        s.push_str(path);
        let mut params: Vec<(String, String)> = query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (n, v) = p.split_once('=').unwrap_or((p, ""));
                (pct_decode(n), pct_decode(v))
            })
            .filter(|(_, v)| !v.is_empty())
            .collect();
        params.sort();
        for (n, v) in params {
            s.push('\n');
            s.push_str(&n);
            s.push(':');
            s.push_str(&v);
        }
        s
    }

    pub fn sign(&self, string_to_sign: &str) -> String {
        let mut mac =
            <Hmac<Sha256> as KeyInit>::new_from_slice(&self.key).expect("HMAC takes any key");
        mac.update(string_to_sign.as_bytes());
        STANDARD.encode(mac.finalize().into_bytes())
    }

    pub fn authorization(&self, string_to_sign: &str) -> String {
        format!("SharedKey {}:{}", self.account, self.sign(string_to_sign))
    }
}

/// Decodes `%XX` escapes and `+`; malformed escapes are kept as they are.
pub fn pct_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `Wed, 25 Nov 2026 12:00:00 GMT` for the current wall-clock second.
pub fn http_date_now() -> String {
    let f = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    time::OffsetDateTime::now_utc()
        .format(f)
        .expect("formatting a UTC date cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_test_vector() {
        let s = Signer::new(
            "testaccount",
            "Ymx1ZWJhdGNoLWNvbnRyYWN0LXRlc3QtdmVjdG9yLWs=",
        )
        .unwrap();
        let sts = s.string_to_sign(
            "PUT",
            "/pools/pool1/nodes/tvm-1/users/alice",
            "api-version=2023-11-01.18.0&timeout=30",
            "64",
            "application/json; odata=minimalmetadata",
            "Wed, 25 Nov 2026 12:00:00 GMT",
        );
        assert_eq!(s.sign(&sts), "EXRKCrceoZphQQOEB8/qRFmHxFg76KlI20OR6up1hOg=");
        let sts = s.string_to_sign(
            "DELETE",
            "/pools/pool1/nodes/tvm-1/users/alice",
            "api-version=2025-06-01&timeOut=30",
            "0",
            "",
            "Wed, 25 Nov 2026 12:00:00 GMT",
        );
        assert_eq!(s.sign(&sts), "CQr4zoSSQ47ud3Mk3+gqSZSI1YB2sgLxf3+xvRcyXCo=");
    }

    #[test]
    fn decodes_query_parts() {
        assert_eq!(pct_decode("%24skiptoken"), "$skiptoken");
        assert_eq!(pct_decode("a+b%20c"), "a b c");
        assert_eq!(pct_decode("100%"), "100%");
    }
}
