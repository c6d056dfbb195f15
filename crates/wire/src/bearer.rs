//! Bearer tokens as Microsoft Entra ID issues them for Azure Batch (`Authorization: Bearer <JWT>`),
//! verified for real. Called only from [`crate::auth::authenticate`].
//!
//! What a token must carry to be accepted:
//!
//! - a signature: `RS256` with a key from the configured JWKS file or PEM public key, or `HS256`
//!   with the configured secret (for local development). `alg: none` and every other algorithm
//!   are refused, and each algorithm is checked only against its own kind of key;
//! - `aud` exactly `https://batch.core.windows.net/`, trailing slash included (Azure Batch refuses
//!   the audience without it), as a string or in an array;
//! - `iss` of a configured tenant: `https://sts.windows.net/{tenant}/` (v1 tokens) or
//!   `https://login.microsoftonline.com/{tenant}/v2.0` (v2 tokens), or one of the tenant's own
//!   `issuers`;
//! - `exp` (required) and `nbf` (when present), with at most 5 minutes of clock skew either way,
//!   against the wall clock;
//! - an account: the token's account claim (`bluebatch_account` unless `accountClaim` says
//!   otherwise) or else the default `account` of the token's tenant. The account must exist on
//!   this server. Real Entra tokens name no account (Azure takes it from the host name), so for
//!   them the tenant's default account is the mapping.
//!
//! Configuration is the `"bearer"` section of the accounts file (`--accounts-file`):
//!
//! ```json
//! {"accounts": [{"name": "myaccount", "keys": ["<base64>", "<base64>"]}],
//!  "bearer": {
//!    "tenants": [{"id": "<tenant id or domain>", "account": "myaccount", "issuers": []}],
//!    "hs256SecretFile": "token-secret",
//!    "hs256SecretEnv": "BLUEBATCH_TOKEN_SECRET",
//!    "jwksFile": "jwks.json",
//!    "rsaPublicKeyFile": "signer.pub.pem",
//!    "accountClaim": "bluebatch_account",
//!    "authorizationUri": "https://login.microsoftonline.com/<tenant>/oauth2/authorize"}}
//! ```
//!
//! Every key is optional except `tenants`; at least one of the HS256 secret (file or environment
//! variable, not both) and the RS256 keys (JWKS file, PEM public key, or both) must be given.
//! Relative paths are relative to the accounts file. The HS256 secret is the file's bytes (or the
//! variable's value) without surrounding whitespace, at least 32 bytes.

use crate::accounts::Accounts;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bluebatch_core::error::{BatchError, Code};
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use time::OffsetDateTime;

/// The audience a Batch token must carry, exactly (Azure Batch: "should exactly match
/// (including forward slash)"); `https://batch.core.windows.net` without the slash is refused.
pub const AUDIENCE: &str = "https://batch.core.windows.net/";
/// Every accepted audience (only [`AUDIENCE`]).
pub const AUDIENCES: [&str; 1] = [AUDIENCE];
/// Clock skew allowed on `exp` and `nbf`, in seconds.
pub const MAX_SKEW_SECS: i64 = 300;
/// The claim naming the Batch account a token acts for, unless configured otherwise.
pub const DEFAULT_ACCOUNT_CLAIM: &str = "bluebatch_account";
/// Shortest accepted HS256 secret, in bytes.
pub const MIN_SECRET_BYTES: usize = 32;
/// Longest accepted token (Entra tokens are a few KiB).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// The v1 and v2 issuers of an Entra tenant.
pub fn tenant_issuers(tenant: &str) -> [String; 2] {
    [
        format!("https://sts.windows.net/{tenant}/"),
        format!("https://login.microsoftonline.com/{tenant}/v2.0"),
    ]
}

/// The `"bearer"` section of the accounts file, as written.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BearerFile {
    #[serde(default)]
    pub tenants: Vec<TenantEntry>,
    pub hs256_secret_file: Option<PathBuf>,
    pub hs256_secret_env: Option<String>,
    pub jwks_file: Option<PathBuf>,
    pub rsa_public_key_file: Option<PathBuf>,
    pub account_claim: Option<String>,
    pub authorization_uri: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TenantEntry {
    /// The tenant id (a GUID or a domain such as contoso.onmicrosoft.com).
    pub id: String,
    /// The account a token from this tenant acts for when it names none.
    pub account: Option<String>,
    /// Issuers accepted for this tenant besides its two Entra issuers.
    #[serde(default)]
    pub issuers: Vec<String>,
}

impl BearerFile {
    /// Reads the `"bearer"` section of an accounts file (`None` when it has none); relative paths
    /// in it become relative to the file's directory.
    pub fn read(accounts_file: &Path) -> Result<Option<Self>, String> {
        let at = |e: &dyn std::fmt::Display| format!("{}: {e}", accounts_file.display());
        let text = std::fs::read_to_string(accounts_file).map_err(|e| at(&e))?;
        let mut doc: Map<String, Value> = serde_json::from_str(&text).map_err(|e| at(&e))?;
        let Some(section) = doc.remove("bearer") else {
            return Ok(None);
        };
        let mut file: BearerFile =
            serde_json::from_value(section).map_err(|e| at(&format!("\"bearer\": {e}")))?;
        let dir = accounts_file.parent().unwrap_or(Path::new("."));
        for p in [
            &mut file.hs256_secret_file,
            &mut file.jwks_file,
            &mut file.rsa_public_key_file,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
        Ok(Some(file))
    }

    /// The HS256 secret, when one is configured.
    pub fn hs256_secret(&self) -> Result<Option<Vec<u8>>, String> {
        match (&self.hs256_secret_file, &self.hs256_secret_env) {
            (Some(_), Some(_)) => {
                Err("\"bearer\": give hs256SecretFile or hs256SecretEnv, not both".into())
            }
            (Some(path), None) => read_secret_file(path).map(Some),
            (None, Some(var)) => secret_from_env(var).map(Some),
            (None, None) => Ok(None),
        }
    }

    pub fn account_claim(&self) -> &str {
        self.account_claim
            .as_deref()
            .unwrap_or(DEFAULT_ACCOUNT_CLAIM)
    }
}

/// An HS256 secret from a file: its bytes without surrounding whitespace.
pub fn read_secret_file(path: &Path) -> Result<Vec<u8>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    check_secret(trim(&bytes).to_vec(), &path.display().to_string())
}

/// An HS256 secret from an environment variable.
pub fn secret_from_env(var: &str) -> Result<Vec<u8>, String> {
    let value = std::env::var_os(var)
        .ok_or_else(|| format!("the environment variable {var} (the HS256 secret) is not set"))?;
    check_secret(
        trim(value.as_encoded_bytes()).to_vec(),
        &format!("the environment variable {var}"),
    )
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    &b[start..end]
}

fn check_secret(secret: Vec<u8>, from: &str) -> Result<Vec<u8>, String> {
    if secret.len() < MIN_SECRET_BYTES {
        return Err(format!(
            "the HS256 secret in {from} is shorter than {MIN_SECRET_BYTES} bytes \
             (make one with: head -c 48 /dev/urandom | base64)"
        ));
    }
    Ok(secret)
}

/// One RS256 verification key, with the `kid` it answers to (none for a PEM key).
struct RsaKey {
    kid: Option<String>,
    key: DecodingKey,
}

/// The bearer-token verifier: keys, issuers and the account mapping.
pub struct Bearer {
    hs256: Option<DecodingKey>,
    rsa: Vec<RsaKey>,
    /// issuer → the default account of its tenant.
    issuers: HashMap<String, Option<String>>,
    account_claim: String,
    authorization_uri: String,
}

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bearer")
            .field("hs256", &self.hs256.is_some())
            .field("rsa_keys", &self.rsa.len())
            .field("issuers", &self.issuers)
            .finish()
    }
}

fn refused(detail: impl Into<String>) -> BatchError {
    // 401 with the code AuthenticationFailed (docs/contract.md §3).
    BatchError::new(Code::AuthenticationRequired).with("AuthenticationErrorDetail", detail)
}

impl Bearer {
    /// Builds the verifier from the file's section and checks that every default account exists.
    pub fn new(file: &BearerFile, accounts: &Accounts) -> Result<Self, String> {
        let hs256 = file.hs256_secret()?.map(|s| DecodingKey::from_secret(&s));
        let mut rsa = Vec::new();
        if let Some(path) = &file.jwks_file {
            rsa.extend(read_jwks(path)?);
        }
        if let Some(path) = &file.rsa_public_key_file {
            let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let key = DecodingKey::from_rsa_pem(&pem)
                .map_err(|e| format!("{}: not an RSA public key in PEM ({e})", path.display()))?;
            rsa.push(RsaKey { kid: None, key });
        }
        if hs256.is_none() && rsa.is_empty() {
            return Err(
                "\"bearer\": configure hs256SecretFile, hs256SecretEnv, jwksFile or \
                        rsaPublicKeyFile"
                    .into(),
            );
        }
        if file.tenants.is_empty() {
            return Err("\"bearer\": list at least one tenant in \"tenants\"".into());
        }
        let mut issuers = HashMap::new();
        for t in &file.tenants {
            if t.id.is_empty() || t.id.contains(['/', ' ']) {
                return Err(format!("\"bearer\": bad tenant id {:?}", t.id));
            }
            if let Some(a) = &t.account
                && accounts.keys(a).is_none()
            {
                return Err(format!(
                    "\"bearer\": tenant {} maps to account {a}, which is not configured",
                    t.id
                ));
            }
            for iss in tenant_issuers(&t.id).into_iter().chain(t.issuers.clone()) {
                if issuers.insert(iss.clone(), t.account.clone()).is_some() {
                    return Err(format!("\"bearer\": the issuer {iss} is listed twice"));
                }
            }
        }
        let authorization_uri = file.authorization_uri.clone().unwrap_or_else(|| {
            format!(
                "https://login.microsoftonline.com/{}/oauth2/authorize",
                file.tenants[0].id
            )
        });
        if authorization_uri.contains(['"', '\\']) || !authorization_uri.is_ascii() {
            return Err("\"bearer\": authorizationUri must be plain ASCII without quotes".into());
        }
        Ok(Self {
            hs256,
            rsa,
            issuers,
            account_claim: file.account_claim().to_string(),
            authorization_uri,
        })
    }

    /// Reads the accounts file's `"bearer"` section, if it has one, into a verifier.
    pub fn load(accounts_file: Option<&Path>, accounts: &Accounts) -> Result<Option<Self>, String> {
        let Some(path) = accounts_file else {
            return Ok(None);
        };
        match BearerFile::read(path)? {
            None => Ok(None),
            Some(file) => Self::new(&file, accounts).map(Some),
        }
    }

    /// One line for the start-up banner.
    pub fn describe(&self) -> String {
        let mut algs = Vec::new();
        if !self.rsa.is_empty() {
            algs.push(format!("RS256 ({} keys)", self.rsa.len()));
        }
        if self.hs256.is_some() {
            algs.push("HS256".to_string());
        }
        let mut issuers: Vec<&str> = self.issuers.keys().map(String::as_str).collect();
        issuers.sort_unstable();
        format!("{}; issuers {}", algs.join(", "), issuers.join(", "))
    }

    /// The `WWW-Authenticate` challenge: with `error="invalid_token"` when a token was refused.
    pub fn challenge(&self, invalid_token: bool) -> String {
        challenge(&self.authorization_uri, invalid_token)
    }

    /// Verifies a token (signature, audience, issuer, lifetime against the wall clock `now`) and
    /// returns the account it acts for. Refusals are 401 `AuthenticationFailed` whose
    /// `AuthenticationErrorDetail` says what was wrong; the token itself is never echoed.
    pub fn verify(
        &self,
        token: &str,
        accounts: &Accounts,
        now: OffsetDateTime,
    ) -> Result<String, BatchError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(refused("The token is too long."));
        }
        let segments: Vec<&str> = token.split('.').collect();
        let [head, _, signature] = segments[..] else {
            return Err(refused(
                "The token is not a JWT (header.payload.signature).",
            ));
        };
        let header: Map<String, Value> = URL_SAFE_NO_PAD
            .decode(head)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| refused("The token's header is not base64url-encoded JSON."))?;
        let alg = header.get("alg").and_then(Value::as_str).unwrap_or("");
        let kid = header.get("kid").and_then(Value::as_str);
        if alg.eq_ignore_ascii_case("none") || signature.is_empty() {
            return Err(refused("Unsigned tokens (alg none) are not accepted."));
        }
        let (algorithm, keys): (Algorithm, Vec<&DecodingKey>) = match alg {
            "RS256" => {
                if self.rsa.is_empty() {
                    return Err(refused(
                        "RS256 tokens are not accepted: this server has no RS256 key configured.",
                    ));
                }
                // A token's kid selects among the JWKS keys; PEM keys have none and always apply.
                let keys = self
                    .rsa
                    .iter()
                    .filter(|k| match (kid, &k.kid) {
                        (Some(want), Some(have)) => want == have,
                        _ => true,
                    })
                    .map(|k| &k.key)
                    .collect();
                (Algorithm::RS256, keys)
            }
            "HS256" => match &self.hs256 {
                Some(k) => (Algorithm::HS256, vec![k]),
                None => {
                    return Err(refused(
                        "HS256 tokens are not accepted: this server has no HS256 secret configured.",
                    ));
                }
            },
            "" => return Err(refused("The token's header has no alg.")),
            other => {
                let shown: String = other
                    .chars()
                    .filter(char::is_ascii_alphanumeric)
                    .take(10)
                    .collect();
                return Err(refused(format!(
                    "The token's algorithm {shown} is not accepted; use RS256 (or HS256 where configured)."
                )));
            }
        };
        if keys.is_empty() {
            return Err(refused("No configured key has the token's key id (kid)."));
        }

        // The signature only; the claims are checked below against `now`.
        let mut validation = Validation::new(algorithm);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        let mut claims = None;
        for key in keys {
            match jsonwebtoken::decode::<Map<String, Value>>(token, key, &validation) {
                Ok(data) => {
                    claims = Some(data.claims);
                    break;
                }
                Err(e) if matches!(e.kind(), jsonwebtoken::errors::ErrorKind::InvalidSignature) => {
                }
                Err(_) => {
                    return Err(refused(
                        "The token is malformed (its payload or signature does not decode).",
                    ));
                }
            }
        }
        let claims = claims.ok_or_else(|| {
            refused("The token's signature does not verify with any configured key.")
        })?;

        let audience_ok = match claims.get("aud") {
            Some(Value::String(a)) => AUDIENCES.contains(&a.as_str()),
            Some(Value::Array(list)) => list
                .iter()
                .any(|a| a.as_str().is_some_and(|a| AUDIENCES.contains(&a))),
            _ => false,
        };
        if !audience_ok {
            return Err(refused(
                "The token's audience (aud) is not https://batch.core.windows.net/ (it must match \
                 exactly, including the trailing slash).",
            ));
        }
        let tenant_account = claims
            .get("iss")
            .and_then(Value::as_str)
            .and_then(|iss| self.issuers.get(iss))
            .ok_or_else(|| {
                refused("The token's issuer (iss) is not one of this server's configured tenants.")
            })?;
        let now = now.unix_timestamp();
        let time = |name: &str| -> Result<Option<i64>, BatchError> {
            match claims.get(name) {
                None => Ok(None),
                Some(v) => v
                    .as_i64()
                    .or_else(|| v.as_f64().map(|f| f as i64))
                    .map(Some)
                    .ok_or_else(|| refused(format!("The token's {name} is not a number."))),
            }
        };
        let exp = time("exp")?.ok_or_else(|| refused("The token has no expiry (exp)."))?;
        if now > exp.saturating_add(MAX_SKEW_SECS) {
            return Err(refused("The token has expired (exp is in the past)."));
        }
        if let Some(nbf) = time("nbf")?
            && now < nbf.saturating_sub(MAX_SKEW_SECS)
        {
            return Err(refused(
                "The token is not valid yet (nbf is in the future).",
            ));
        }
        let account = match claims.get(&self.account_claim) {
            Some(Value::String(a)) => a.clone(),
            Some(_) => {
                return Err(refused(format!(
                    "The token's {} claim is not a string.",
                    self.account_claim
                )));
            }
            None => tenant_account.clone().ok_or_else(|| {
                refused(format!(
                    "The token names no Batch account ({} claim) and its tenant has no default account.",
                    self.account_claim
                ))
            })?,
        };
        if accounts.keys(&account).is_none() {
            return Err(refused(
                "The Batch account the token acts for does not exist on this server.",
            ));
        }
        Ok(account)
    }
}

/// A `WWW-Authenticate: Bearer` challenge naming where to get a token.
pub fn challenge(authorization_uri: &str, invalid_token: bool) -> String {
    if invalid_token {
        format!("Bearer authorization_uri=\"{authorization_uri}\", error=\"invalid_token\"")
    } else {
        format!("Bearer authorization_uri=\"{authorization_uri}\"")
    }
}

/// The RS256 keys of a JWKS file (`{"keys": [...]}`); keys for other algorithms or for
/// encryption are skipped.
fn read_jwks(path: &Path) -> Result<Vec<RsaKey>, String> {
    let at = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let text = std::fs::read_to_string(path).map_err(|e| at(&e))?;
    let doc: Value = serde_json::from_str(&text).map_err(|e| at(&e))?;
    let list = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or_else(|| at(&"a JWKS is {\"keys\": [...]}"))?;
    let mut keys = Vec::new();
    for v in list {
        if v.get("kty").and_then(Value::as_str) != Some("RSA") {
            continue;
        }
        let jwk: Jwk = serde_json::from_value(v.clone()).map_err(|e| at(&e))?;
        if matches!(jwk.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature)
            || v.get("alg")
                .and_then(Value::as_str)
                .is_some_and(|a| a != "RS256")
            || !matches!(jwk.algorithm, AlgorithmParameters::RSA(_))
        {
            continue;
        }
        let key = DecodingKey::from_jwk(&jwk).map_err(|e| at(&e))?;
        keys.push(RsaKey {
            kid: jwk.common.key_id.clone(),
            key,
        });
    }
    if keys.is_empty() {
        return Err(at(&"the JWKS has no RSA signing key"));
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-test";
    const TENANT: &str = "11111111-2222-3333-4444-555555555555";

    fn verifier() -> (Bearer, Accounts) {
        let accounts = Accounts::dev();
        accounts
            .add("other", &["b3RoZXIta2V5".to_string()])
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), SECRET).unwrap();
        let file = BearerFile {
            tenants: vec![TenantEntry {
                id: TENANT.into(),
                account: Some("bluebatchdev".into()),
                issuers: vec![],
            }],
            hs256_secret_file: Some(dir.path().join("secret")),
            ..BearerFile::default()
        };
        (Bearer::new(&file, &accounts).unwrap(), accounts)
    }

    fn token(claims: Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap()
    }

    fn claims(now: i64) -> Value {
        json!({"aud": AUDIENCES[0], "iss": format!("https://sts.windows.net/{TENANT}/"),
               "nbf": now - 10, "exp": now + 3600})
    }

    fn detail(e: BatchError) -> String {
        assert_eq!((e.status(), e.code.as_str()), (401, "AuthenticationFailed"));
        e.values
            .into_iter()
            .find(|(k, _)| k == "AuthenticationErrorDetail")
            .unwrap()
            .1
    }

    #[test]
    fn accepts_and_maps_accounts() {
        let (b, accounts) = verifier();
        let now = OffsetDateTime::now_utc();
        let t = now.unix_timestamp();
        assert_eq!(
            b.verify(&token(claims(t)), &accounts, now).unwrap(),
            "bluebatchdev"
        );
        let mut c = claims(t);
        c["bluebatch_account"] = json!("other");
        c["aud"] = json!(["x", AUDIENCE]);
        c["iss"] = json!(format!("https://login.microsoftonline.com/{TENANT}/v2.0"));
        assert_eq!(b.verify(&token(c), &accounts, now).unwrap(), "other");
        // Within the five minutes of skew.
        let mut c = claims(t);
        c["exp"] = json!(t - 200);
        c["nbf"] = json!(t + 200);
        assert!(b.verify(&token(c), &accounts, now).is_ok());
    }

    #[test]
    fn refusals_say_why() {
        let (b, accounts) = verifier();
        let now = OffsetDateTime::now_utc();
        let t = now.unix_timestamp();
        let case = |f: &dyn Fn(&mut Value)| {
            let mut c = claims(t);
            f(&mut c);
            detail(b.verify(&token(c), &accounts, now).unwrap_err())
        };
        assert!(case(&|c| c["aud"] = json!("https://management.azure.com/")).contains("aud"));
        // Without the trailing slash, as a string or in an array.
        assert!(case(&|c| c["aud"] = json!("https://batch.core.windows.net")).contains("slash"));
        assert!(case(&|c| c["aud"] = json!(["https://batch.core.windows.net"])).contains("slash"));
        assert!(case(&|c| c["iss"] = json!("https://sts.windows.net/other/")).contains("iss"));
        assert!(case(&|c| c["exp"] = json!(t - 301)).contains("expired"));
        assert!(case(&|c| c["nbf"] = json!(t + 301)).contains("not valid yet"));
        assert!(case(&|c| c["bluebatch_account"] = json!("nobody")).contains("does not exist"));
        assert!(
            case(&|c| {
                c.as_object_mut().unwrap().remove("exp");
            })
            .contains("no expiry")
        );
        let wrong = encode(
            &Header::new(Algorithm::HS256),
            &claims(t),
            &EncodingKey::from_secret(b"another secret another secret another"),
        )
        .unwrap();
        assert!(detail(b.verify(&wrong, &accounts, now).unwrap_err()).contains("signature"));
        let good = token(claims(t));
        let payload = good.split('.').nth(1).unwrap();
        let none = format!(
            "{}.{payload}.",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#)
        );
        assert!(detail(b.verify(&none, &accounts, now).unwrap_err()).contains("alg none"));
        let none_signed = format!(
            "{}.{payload}.c2ln",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"None"}"#)
        );
        assert!(detail(b.verify(&none_signed, &accounts, now).unwrap_err()).contains("alg none"));
        let rs = format!(
            "{}.{payload}.c2ln",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256"}"#)
        );
        assert!(detail(b.verify(&rs, &accounts, now).unwrap_err()).contains("RS256"));
        assert!(detail(b.verify("abc", &accounts, now).unwrap_err()).contains("not a JWT"));
        // The detail never carries the token.
        let d = detail(b.verify(&wrong, &accounts, now).unwrap_err());
        assert!(!d.contains(payload));
    }

    #[test]
    fn configuration_errors() {
        let accounts = Accounts::dev();
        let e = Bearer::new(&BearerFile::default(), &accounts).unwrap_err();
        assert!(e.contains("hs256SecretFile"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("short"), b"short\n").unwrap();
        let file = BearerFile {
            tenants: vec![TenantEntry {
                id: TENANT.into(),
                account: None,
                issuers: vec![],
            }],
            hs256_secret_file: Some(dir.path().join("short")),
            ..BearerFile::default()
        };
        assert!(
            Bearer::new(&file, &accounts)
                .unwrap_err()
                .contains("shorter")
        );
        let path = dir.path().join("accounts.json");
        std::fs::write(
            &path,
            r#"{"accounts": [], "bearer": {"tenants": [{"id": "t", "account": "missing"}],
                "hs256SecretFile": "s"}}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("s"), SECRET).unwrap();
        let read = BearerFile::read(&path).unwrap().unwrap();
        assert_eq!(
            read.hs256_secret_file.as_deref(),
            Some(&*dir.path().join("s"))
        );
        assert!(
            Bearer::new(&read, &accounts)
                .unwrap_err()
                .contains("missing")
        );
    }
}
