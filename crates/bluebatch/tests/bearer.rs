//! Bearer tokens (HS256 and RS256), HTTPS with the generated or a given certificate, and
//! accounts kept apart under both Shared Key and bearer tokens.

mod common;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::{Client, Resp, Server, TlsServer, V, mint};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;

const TENANT: &str = "11111111-2222-3333-4444-555555555555";
/// A tenant whose tokens must name their account.
const TENANT2: &str = "contoso.onmicrosoft.com";
const SECRET: &str = "c2VjcmV0LWZvci1ibHVlYmF0Y2gtYmVhcmVyLXRlc3RzLTAxMjM0NTY3ODk=";
const ALPHA_KEY1: &str = "YWxwaGEtcHJpbWFyeS1rZXktMDEyMzQ1Njc4OQ==";
const ALPHA_KEY2: &str = "YWxwaGEtc2Vjb25kYXJ5LWtleS0wMTIzNDU2Nzg5";
const BETA_KEY: &str = "YmV0YS1wcmltYXJ5LWtleS0wMTIzNDU2Nzg5";

/// Accounts alpha (two keys) and beta; tenant TENANT maps to alpha, TENANT2 to none; HS256
/// secret in a file; RS256 keys: `rsa1.pem` in the JWKS as kid k1, `rsa2.pem` (PKCS#1) as a
/// PEM public key.
struct Setup {
    dir: tempfile::TempDir,
}

fn openssl(args: &[&str]) -> String {
    let out = Command::new("openssl").args(args).output().unwrap();
    assert!(out.status.success(), "openssl {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
        std::fs::write(p("secret"), format!("{SECRET}\n")).unwrap();
        openssl(&["genrsa", "-out", &p("rsa1.pem"), "2048"]);
        openssl(&["genrsa", "-traditional", "-out", &p("rsa2.pem"), "2048"]);
        openssl(&[
            "rsa",
            "-in",
            &p("rsa2.pem"),
            "-pubout",
            "-out",
            &p("rsa2.pub.pem"),
        ]);
        openssl(&["genrsa", "-out", &p("stranger.pem"), "2048"]);
        let modulus = openssl(&["rsa", "-in", &p("rsa1.pem"), "-noout", "-modulus"]);
        let hex = modulus.trim().strip_prefix("Modulus=").unwrap();
        let n: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let jwks = json!({"keys": [
            {"kty": "EC", "kid": "ec", "crv": "P-256", "x": "AA", "y": "AA"},
            {"kty": "RSA", "use": "sig", "kid": "k1", "n": URL_SAFE_NO_PAD.encode(&n), "e": "AQAB"},
        ]});
        std::fs::write(p("jwks.json"), jwks.to_string()).unwrap();
        let accounts = json!({
            "accounts": [
                {"name": "alpha", "keys": [ALPHA_KEY1, ALPHA_KEY2]},
                {"name": "beta", "keys": [BETA_KEY]},
            ],
            "bearer": {
                "tenants": [{"id": TENANT, "account": "alpha"}, {"id": TENANT2}],
                "hs256SecretFile": "secret",
                "jwksFile": "jwks.json",
                "rsaPublicKeyFile": "rsa2.pub.pem",
            },
        });
        std::fs::write(p("accounts.json"), accounts.to_string()).unwrap();
        Setup { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn accounts_file(&self) -> String {
        self.path("accounts.json").to_str().unwrap().to_string()
    }

    fn start(&self) -> TlsServer {
        let af = self.accounts_file();
        let data = self.path("data");
        Server::start_tls(&["--data-dir", data.to_str().unwrap(), "--accounts-file", &af])
    }

    /// `bluebatch token` with this setup's accounts file.
    fn token(&self, extra: &[&str]) -> String {
        let af = self.accounts_file();
        let mut args = vec!["--accounts-file", af.as_str()];
        args.extend_from_slice(extra);
        mint(&args, &[]).unwrap()
    }
}

fn https_client(srv: &TlsServer, account: &str, key: &str) -> Client {
    Client::with_ca(&srv.https, account, key, srv.ca.as_deref().unwrap())
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn claims() -> Value {
    json!({"aud": "https://batch.core.windows.net/", "iss": format!("https://sts.windows.net/{TENANT}/"),
           "iat": now(), "nbf": now(), "exp": now() + 3600, "sub": "tester"})
}

fn hs256(claims: &Value, secret: &[u8]) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

fn assert_refused(r: &Resp, token: &str, detail_has: &str) {
    let body = String::from_utf8_lossy(&r.body);
    assert_eq!(
        (r.status, r.code().as_str()),
        (401, "AuthenticationFailed"),
        "{body}"
    );
    let challenge = r.header("www-authenticate").unwrap_or_default();
    assert!(
        challenge.starts_with("Bearer authorization_uri=\"https://login.microsoftonline.com/")
            && challenge.contains("error=\"invalid_token\""),
        "{challenge}"
    );
    let detail = r.value("AuthenticationErrorDetail").unwrap();
    assert!(
        detail.contains(detail_has),
        "{detail:?} lacks {detail_has:?}"
    );
    // The token (or any of its parts) is never echoed.
    for part in token.split('.').filter(|p| p.len() > 8) {
        assert!(!body.contains(part), "the answer echoes the token: {body}");
    }
}

#[tokio::test]
async fn hs256_over_https_with_the_generated_certificate() {
    let setup = Setup::new();
    let srv = setup.start();
    let ca = srv.ca.clone().unwrap();
    assert_eq!(ca, setup.path("data/tls/ca.pem"));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(setup.path("data/tls/key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // No account claim: the tenant's default account (alpha).
    let token = setup.token(&[]);
    let c = https_client(&srv, "alpha", ALPHA_KEY1);
    let r = c.req("GET", "/pools").bearer(&token).send().await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert!(
        r.json()["odata.metadata"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{}/$metadata", srv.https))
    );
    for id in ["p1", "p2"] {
        let body = json!({"id": id, "vmSize": "STANDARD_D2S_V3",
            "virtualMachineConfiguration": {"imageReference": {"publisher": "Canonical",
            "offer": "0001-com-ubuntu-server-jammy", "sku": "22_04-lts"},
            "nodeAgentSKUId": "batch.node.ubuntu 22.04"}});
        let r = c
            .req("POST", "/pools")
            .json(&body)
            .bearer(&token)
            .send()
            .await;
        assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
        assert_eq!(
            r.header("dataserviceid").unwrap(),
            format!("{}/pools/{id}", srv.https)
        );
    }
    let r = c
        .req("GET", "/pools")
        .query(&format!("api-version={V}&maxresults=1"))
        .bearer(&token)
        .send()
        .await;
    assert!(
        r.json()["odata.nextLink"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{}/pools?", srv.https)),
        "{}",
        r.json()
    );
    // The certificate also covers localhost.
    let port = srv.https.rsplit(':').next().unwrap();
    let local = Client::with_ca(
        &format!("https://localhost:{port}"),
        "alpha",
        ALPHA_KEY1,
        &ca,
    );
    assert_eq!(
        local
            .req("GET", "/pools/p1")
            .bearer(&token)
            .send()
            .await
            .status,
        200
    );
    // The same service over HTTP, with Shared Key, writes http URLs.
    let plain = Client::new(&srv.server.url, "alpha", ALPHA_KEY1);
    let r = plain.req("GET", "/pools/p1").send().await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert!(
        r.json()["odata.metadata"]
            .as_str()
            .unwrap()
            .starts_with("http://")
    );
    // Shared Key works over HTTPS too.
    assert_eq!(c.req("GET", "/pools/p2").send().await.status, 200);
    // A client that does not trust the CA cannot connect.
    let untrusting = reqwest::Client::builder().build().unwrap();
    assert!(
        untrusting
            .get(format!("{}/pools", srv.https))
            .send()
            .await
            .is_err()
    );
    // And curl, told the exact CA file, can.
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "-o", "/dev/null", "-w"])
        .args(["%{http_code}", "--cacert"])
        .arg(&ca)
        .arg("-H")
        .arg(format!("Authorization: Bearer {token}"))
        .arg(format!("{}/pools?api-version={V}", srv.https))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "{out:?}");
}

#[tokio::test]
async fn rs256_from_the_jwks_and_the_pem_key() {
    let setup = Setup::new();
    let srv = setup.start();
    let c = https_client(&srv, "alpha", ALPHA_KEY1);
    let rsa1 = setup.path("rsa1.pem");
    let rsa2 = setup.path("rsa2.pem");
    let stranger = setup.path("stranger.pem");
    let tok = |key: &Path, extra: &[&str]| {
        let mut args = vec!["--rs256-key-file", key.to_str().unwrap()];
        args.extend_from_slice(extra);
        setup.token(&args)
    };
    // The JWKS key, chosen by kid, on a v2 issuer, naming beta.
    let t = tok(
        &rsa1,
        &[
            "--kid",
            "k1",
            "--issuer",
            &format!("https://login.microsoftonline.com/{TENANT}/v2.0"),
            "--account",
            "beta",
        ],
    );
    let r = c.req("GET", "/pools").bearer(&t).send().await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    // The PEM public key (its private key is PKCS#1), no kid.
    let t = tok(&rsa2, &[]);
    assert_eq!(c.req("GET", "/pools").bearer(&t).send().await.status, 200);
    // The JWKS key without a kid is tried too.
    let t = tok(&rsa1, &[]);
    assert_eq!(c.req("GET", "/pools").bearer(&t).send().await.status, 200);
    // A key the server does not know, with and without a known kid.
    let t = tok(&stranger, &["--kid", "k1"]);
    assert_refused(
        &c.req("GET", "/pools").bearer(&t).send().await,
        &t,
        "signature",
    );
    let t = tok(&stranger, &[]);
    assert_refused(
        &c.req("GET", "/pools").bearer(&t).send().await,
        &t,
        "signature",
    );
    // A kid no JWKS key has: only the PEM key (which has no kid) is tried.
    let t = tok(&rsa1, &["--kid", "k9"]);
    assert_refused(
        &c.req("GET", "/pools").bearer(&t).send().await,
        &t,
        "signature",
    );
    // An RS256 header on an HS256-signed token (algorithm confusion) fails the signature.
    let good = setup.token(&[]);
    let parts: Vec<&str> = good.split('.').collect();
    let forged = format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#),
        parts[1],
        parts[2]
    );
    assert_refused(
        &c.req("GET", "/pools").bearer(&forged).send().await,
        &forged,
        "signature",
    );
}

#[tokio::test]
async fn refused_tokens_answer_401_with_a_bearer_challenge() {
    let setup = Setup::new();
    let srv = setup.start();
    let c = https_client(&srv, "alpha", ALPHA_KEY1);
    let secret = SECRET.as_bytes();
    let with = |f: &dyn Fn(&mut Value)| {
        let mut cl = claims();
        f(&mut cl);
        hs256(&cl, secret)
    };
    let good = with(&|_| {});
    assert_eq!(
        c.req("GET", "/pools").bearer(&good).send().await.status,
        200
    );
    // Also accepted: the audience in an array; skew under five minutes.
    let t = with(&|c| {
        c["aud"] = json!(["https://example.com", "https://batch.core.windows.net/"]);
        c["exp"] = json!(now() - 200);
        c["nbf"] = json!(now() + 200);
    });
    assert_eq!(c.req("GET", "/pools").bearer(&t).send().await.status, 200);

    let payload = good.split('.').nth(1).unwrap().to_string();
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "wrong signature",
            hs256(&claims(), b"another-secret-that-is-long-enough-0123456789"),
            "signature",
        ),
        (
            "wrong audience",
            with(&|c| c["aud"] = json!("https://management.azure.com/")),
            "audience",
        ),
        (
            "wrong issuer",
            with(&|c| {
                c["iss"] = json!("https://sts.windows.net/99999999-0000-0000-0000-000000000000/")
            }),
            "issuer",
        ),
        (
            "expired",
            with(&|c| c["exp"] = json!(now() - 310)),
            "expired",
        ),
        (
            "not yet valid",
            with(&|c| c["nbf"] = json!(now() + 310)),
            "not valid yet",
        ),
        (
            "no expiry",
            with(&|c| {
                c.as_object_mut().unwrap().remove("exp");
            }),
            "exp",
        ),
        (
            "alg none",
            format!(
                "{}.{payload}.",
                URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#)
            ),
            "alg none",
        ),
        (
            "alg none with a signature",
            format!(
                "{}.{payload}.{}",
                URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#),
                good.split('.').nth(2).unwrap()
            ),
            "alg none",
        ),
        (
            "HS512",
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS512),
                &claims(),
                &EncodingKey::from_secret(secret),
            )
            .unwrap(),
            "HS512",
        ),
        (
            "unknown account",
            with(&|c| c["bluebatch_account"] = json!("gamma")),
            "does not exist",
        ),
        (
            "tenant without a default account",
            with(&|c| c["iss"] = json!(format!("https://sts.windows.net/{TENANT2}/"))),
            "names no Batch account",
        ),
        ("not a JWT", "not-a-jwt".to_string(), "not a JWT"),
        // Azure: the audience "should exactly match (including forward slash)".
        (
            "audience without its trailing slash",
            with(&|c| c["aud"] = json!("https://batch.core.windows.net")),
            "trailing slash",
        ),
        (
            "audience without its trailing slash, in an array",
            with(&|c| c["aud"] = json!(["https://example.com", "https://batch.core.windows.net"])),
            "trailing slash",
        ),
    ];
    for (what, token, detail) in &cases {
        let r = c.req("GET", "/pools").bearer(token).send().await;
        assert_refused(&r, token, detail);
        // The same over plain HTTP.
        let plain = Client::new(&srv.server.url, "alpha", ALPHA_KEY1);
        let r = plain.req("DELETE", "/pools/p1").bearer(token).send().await;
        assert_eq!(r.status, 401, "{what}");
    }
    // TENANT2 tokens that name their account are fine.
    let t = with(&|c| {
        c["iss"] = json!(format!("https://login.microsoftonline.com/{TENANT2}/v2.0"));
        c["bluebatch_account"] = json!("beta");
    });
    assert_eq!(c.req("GET", "/pools").bearer(&t).send().await.status, 200);
    // HEAD answers the same status and challenge, without a body.
    let r = c.req("HEAD", "/pools/p1").bearer(&cases[0].1).send().await;
    assert_eq!(r.status, 401);
    assert!(r.header("www-authenticate").unwrap().starts_with("Bearer "));
    // "Bearer" with no token is a refused token like the others: 401 with the challenge.
    for empty in ["Bearer  ", "Bearer ", "Bearer", "bearer"] {
        let r = c
            .req("GET", "/pools")
            .unsigned()
            .header("authorization", empty)
            .send()
            .await;
        assert_refused(&r, "", "no token");
        let offered = r.headers.get_all("www-authenticate").iter().count();
        assert_eq!(offered, 1, "{empty:?}: only the Bearer challenge");
    }
    // No credentials at all: both schemes are offered.
    let r = c.req("GET", "/pools").unsigned().send().await;
    assert_eq!(r.status, 401);
    let offered: Vec<&str> = r
        .headers
        .get_all("www-authenticate")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(offered.len(), 2, "{offered:?}");
    assert_eq!(offered[0], "SharedKey");
    assert!(offered[1].starts_with("Bearer authorization_uri="));
}

#[tokio::test]
async fn bearer_tokens_are_refused_when_not_configured() {
    let srv = Server::start();
    let t = hs256(&claims(), SECRET.as_bytes());
    let r = srv.client().req("GET", "/pools").bearer(&t).send().await;
    assert_refused(&r, &t, "not enabled");
}

#[tokio::test]
async fn accounts_never_see_each_others_pools() {
    let setup = Setup::new();
    let srv = setup.start();
    let alpha = https_client(&srv, "alpha", ALPHA_KEY1);
    let alpha2 = https_client(&srv, "alpha", ALPHA_KEY2);
    let beta = Client::new(&srv.server.url, "beta", BETA_KEY);
    let alpha_token = setup.token(&["--account", "alpha"]);
    let beta_token = setup.token(&["--account", "beta"]);

    alpha.ready_pool("apool", "linux", 1).await;
    // The secondary key verifies as well as the primary.
    assert_eq!(alpha2.req("GET", "/pools/apool").send().await.status, 200);
    let wrong = https_client(&srv, "alpha", BETA_KEY);
    assert_eq!(wrong.req("GET", "/pools/apool").send().await.status, 403);
    // beta's credentials of either kind to alpha's key: still beta.
    let beta_https = https_client(&srv, "beta", BETA_KEY);
    let nodes = alpha.req("GET", "/pools/apool/nodes").send().await.json();
    let node = nodes["value"][0]["id"].as_str().unwrap().to_string();
    let user = Client::user_path("apool", &node, "mallory");
    for (label, send) in [("shared key", false), ("bearer", true)] {
        let req = |m: &'static str, path: &str| {
            let r = beta_https.req(m, path);
            if send { r.bearer(&beta_token) } else { r }
        };
        for (m, path, body) in [
            ("GET", "/pools/apool".to_string(), None),
            ("DELETE", "/pools/apool".to_string(), None),
            ("GET", "/pools/apool/nodes".to_string(), None),
            (
                "POST",
                "/pools/apool/resize".to_string(),
                Some(json!({"targetDedicatedNodes": 0})),
            ),
            (
                "POST",
                format!("/pools/apool/nodes/{node}/users"),
                Some(json!({"name": "mallory", "password": "x"})),
            ),
            ("PUT", user.clone(), Some(json!({"password": "y"}))),
        ] {
            let mut r = req(m, &path);
            if let Some(b) = &body {
                r = r.json(b);
            }
            let r = r.send().await;
            assert_eq!(
                (r.status, r.code().as_str()),
                (404, "PoolNotFound"),
                "{label}: {m} {path}"
            );
        }
        let r = req("GET", "/pools").send().await;
        assert_eq!(r.json()["value"], json!([]), "{label}");
    }
    // beta can have a pool of the same id; each account sees its own.
    let r = beta.create_pool("apool", "linux", 0).await;
    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
    let r = beta.create_pool("bpool", "linux", 0).await;
    assert_eq!(r.status, 201);
    assert_eq!(
        alpha
            .req("GET", "/pools/bpool")
            .bearer(&alpha_token)
            .send()
            .await
            .code(),
        "PoolNotFound"
    );
    let r = alpha
        .req("DELETE", "/pools/bpool")
        .bearer(&alpha_token)
        .send()
        .await;
    assert_eq!((r.status, r.code().as_str()), (404, "PoolNotFound"));
    let ids = |v: Value| -> Vec<String> {
        let mut ids: Vec<String> = v["value"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["id"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    };
    let a = alpha.req("GET", "/pools").bearer(&alpha_token).send().await;
    assert_eq!(ids(a.json()), ["apool"]);
    let b = beta.req("GET", "/pools").send().await;
    assert_eq!(ids(b.json()), ["apool", "bpool"]);
    let a = alpha.req("GET", "/pools/apool").send().await.json();
    assert_eq!(a["targetDedicatedNodes"], 1);
    let b = beta_https
        .req("GET", "/pools/apool")
        .bearer(&beta_token)
        .send()
        .await
        .json();
    assert_eq!(b["targetDedicatedNodes"], 0);
}

#[tokio::test]
async fn token_command_and_a_given_certificate() {
    let setup = Setup::new();
    // Secrets from an environment variable or a file; never from the command line.
    let env_secret = [("MY_TOKEN_SECRET", SECRET)];
    let t = mint(
        &[
            "--hs256-secret-env",
            "MY_TOKEN_SECRET",
            "--tenant",
            TENANT,
            "--account",
            "beta",
            "--lifetime",
            "60",
        ],
        &env_secret,
    )
    .unwrap();
    let payload: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(t.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(payload["aud"], "https://batch.core.windows.net/");
    assert_eq!(payload["iss"], format!("https://sts.windows.net/{TENANT}/"));
    assert_eq!(payload["bluebatch_account"], "beta");
    assert_eq!(payload["tid"], TENANT);
    let exp = payload["exp"].as_i64().unwrap();
    assert!((exp - now() - 60).abs() <= 5, "{payload}");
    let e = mint(&["--tenant", TENANT], &[]).unwrap_err();
    assert!(e.contains("no signing key"), "{e}");
    let e = mint(
        &["--hs256-secret-env", "NOPE_NOT_SET", "--tenant", "t"],
        &[],
    )
    .unwrap_err();
    assert!(e.contains("NOPE_NOT_SET"), "{e}");
    std::fs::write(setup.path("short"), "short").unwrap();
    let short = setup.path("short");
    let e = mint(
        &[
            "--hs256-secret-file",
            short.to_str().unwrap(),
            "--tenant",
            "t",
        ],
        &[],
    )
    .unwrap_err();
    assert!(e.contains("shorter than 32"), "{e}");

    // The server's secret can come from an environment variable, too.
    let mut accounts: Value =
        serde_json::from_str(&std::fs::read_to_string(setup.path("accounts.json")).unwrap())
            .unwrap();
    let bearer = accounts["bearer"].as_object_mut().unwrap();
    bearer.remove("hs256SecretFile");
    bearer.insert("hs256SecretEnv".into(), json!("MY_TOKEN_SECRET"));
    std::fs::write(setup.path("env.json"), accounts.to_string()).unwrap();

    // First run: a generated certificate. Second run: the same files given as the user's own.
    let first = setup.start();
    let ca = setup.path("mine-ca.pem");
    std::fs::copy(first.ca.as_deref().unwrap(), &ca).unwrap();
    drop(first);
    let cert = setup.path("mine.crt");
    let key = setup.path("mine.key");
    std::fs::copy(setup.path("data/tls/cert.pem"), &cert).unwrap();
    std::fs::copy(setup.path("data/tls/key.pem"), &key).unwrap();
    std::fs::remove_dir_all(setup.path("data/tls")).unwrap();
    let env_file = setup.path("env.json");
    let mut child = Command::new(env!("CARGO_BIN_EXE_bluebatch"))
        .args(["serve", "--port", "0", "--tls-port", "0", "--data-dir"])
        .arg(setup.path("data"))
        .arg("--accounts-file")
        .arg(&env_file)
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .env("MY_TOKEN_SECRET", SECRET)
        .env("BLUEBATCH_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::BufRead;
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let https = loop {
        let line = lines.next().expect("bluebatch exited").unwrap();
        if let Some(u) = line.strip_prefix("bluebatch listening on https://") {
            break format!("https://{}", u.trim());
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let mut srv = Server {
        child,
        url: https.clone(),
    };
    let c = Client::with_ca(&https, "alpha", ALPHA_KEY1, &ca);
    let r = c.req("GET", "/pools").bearer(&t).send().await;
    srv.stop();
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert!(
        !setup.path("data/tls").exists(),
        "a given certificate generates nothing"
    );

    // A server whose secret variable is unset refuses to start.
    let out = Command::new(env!("CARGO_BIN_EXE_bluebatch"))
        .args(["serve", "--port", "0", "--in-memory", "--accounts-file"])
        .arg(&env_file)
        .env_remove("MY_TOKEN_SECRET")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("MY_TOKEN_SECRET"));
}
