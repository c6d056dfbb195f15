//! README claims about accounts, against the real binary: `--accounts-file` (both keys),
//! `BLUEBATCH_ACCOUNTS`, `--no-dev-account`; the emulator controls kept per account (reset,
//! node state, node users; the one service clock); bearer tokens over plain HTTP, with
//! `accountClaim` and a tenant's extra `issuers`.

mod common;

use common::{
    Client, KEY, Server, SshOutcome, have_ssh_client, loopback_source, pool_body,
    ssh_password_outcome, text, within,
};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use std::time::Duration;

const T: Duration = Duration::from_secs(10);
const ALPHA_KEY1: &str = "YWxwaGEtcHJpbWFyeS1rZXktMDEyMzQ1Njc4OQ==";
const ALPHA_KEY2: &str = "YWxwaGEtc2Vjb25kYXJ5LWtleS0wMTIzNDU2Nzg5";
const BETA_KEY: &str = "YmV0YS1wcmltYXJ5LWtleS0wMTIzNDU2Nzg5";
const GAMMA_KEY: &str = "Z2FtbWEtcHJpbWFyeS1rZXktMDEyMzQ1Njc4OQ==";
const SECRET: &str = "claims-suite-secret-of-at-least-32-bytes-0123456789";
const TENANT: &str = "99999999-8888-7777-6666-555555555555";
const EXTRA_ISSUER: &str = "https://issuer.example.test/custom/";

/// An accounts file in `dir` with alpha (two keys) and beta, and a bearer section when given.
fn accounts_file(dir: &std::path::Path, bearer: Option<Value>) -> String {
    let mut v = json!({"accounts": [
        {"name": "alpha", "keys": [ALPHA_KEY1, ALPHA_KEY2]},
        {"name": "beta", "keys": [BETA_KEY]},
    ]});
    if let Some(b) = bearer {
        std::fs::write(dir.join("secret"), SECRET).unwrap();
        v["bearer"] = b;
    }
    let path = dir.join("accounts.json");
    std::fs::write(&path, v.to_string()).unwrap();
    path.to_str().unwrap().to_string()
}

/// `--accounts-file` (both keys verify), `BLUEBATCH_ACCOUNTS=name:key,…` (with the file, and
/// alone), `--no-dev-account` (the well-known account is refused; with no other account the
/// server does not start).
#[tokio::test]
async fn accounts_file_environment_and_no_dev_account() {
    within(Duration::from_secs(60), "the test", async {
        let dir = tempfile::tempdir().unwrap();
        let af = accounts_file(dir.path(), None);
        let srv = Server::start_exact(
            &["--in-memory", "--accounts-file", &af],
            &[("BLUEBATCH_ACCOUNTS", &format!("gamma:{GAMMA_KEY}"))],
        );
        for (name, key) in [
            ("alpha", ALPHA_KEY1),
            ("alpha", ALPHA_KEY2),
            ("beta", BETA_KEY),
            ("gamma", GAMMA_KEY),
            ("bluebatchdev", KEY),
        ] {
            let r = Client::new(&srv.url, name, key)
                .req("GET", "/pools")
                .send_within(T)
                .await;
            assert_eq!(r.status, 200, "{name}: {}", text(&r));
        }
        let r = Client::new(&srv.url, "alpha", BETA_KEY)
            .req("GET", "/pools")
            .send_within(T)
            .await;
        assert_eq!((r.status, r.code().as_str()), (403, "AuthenticationFailed"));

        // Rotation: "rotate by editing the accounts file and restarting".
        drop(srv);
        std::fs::write(
            &af,
            json!({"accounts": [{"name": "alpha", "keys": [ALPHA_KEY2, GAMMA_KEY]}]}).to_string(),
        )
        .unwrap();
        let srv = Server::start_exact(&["--in-memory", "--accounts-file", &af], &[]);
        for (key, status) in [(ALPHA_KEY1, 403), (ALPHA_KEY2, 200), (GAMMA_KEY, 200)] {
            let r = Client::new(&srv.url, "alpha", key)
                .req("GET", "/pools")
                .send_within(T)
                .await;
            assert_eq!(r.status, status, "after the rotation: {}", text(&r));
        }
        drop(srv);

        // --no-dev-account: the development account is unknown, the others work.
        let srv = Server::start_exact(
            &["--in-memory", "--no-dev-account"],
            &[("BLUEBATCH_ACCOUNTS", &format!("gamma:{GAMMA_KEY}"))],
        );
        let r = srv.client().req("GET", "/pools").send_within(T).await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (403, "AuthenticationFailed"),
            "{}",
            text(&r)
        );
        let r = Client::new(&srv.url, "gamma", GAMMA_KEY)
            .req("GET", "/pools")
            .send_within(T)
            .await;
        assert_eq!(r.status, 200, "{}", text(&r));

        // --no-dev-account and nothing else: refused at start, saying why.
        let out = tokio::time::timeout(
            Duration::from_secs(20),
            tokio::process::Command::new(env!("CARGO_BIN_EXE_bluebatch"))
                .args(["serve", "--in-memory", "--port", "0", "--no-dev-account"])
                .env_remove("BLUEBATCH_ACCOUNTS")
                .env_remove("BLUEBATCH_ACCOUNTS_FILE")
                .stdin(std::process::Stdio::null())
                .output(),
        )
        .await
        .expect("serve without accounts did not exit")
        .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("no accounts"), "{err}");
    })
    .await;
}

async fn add_user(c: &Client, pool: &str, node: &str, name: &str, pw: &str) {
    let r = c
        .req("POST", &format!("/pools/{pool}/nodes/{node}/users"))
        .json(&json!({"name": name, "password": pw}))
        .send_within(T)
        .await;
    assert_eq!(r.status, 201, "{}", text(&r));
}

/// "`bluebatch reset` — forget every pool, node and user of the account", controls
/// "authenticated with the account's Shared Key", and "Each account sees only its own pools":
/// alpha's reset leaves beta's pools (one of the same id), nodes and users, in memory, on the
/// node over SSH and after a restart; alpha cannot set the state of, or read the users of,
/// beta's node through the controls (404 `PoolNotFound`, as in the Batch API). The service
/// clock is one clock ("the service clock dates everything"): any account's advance moves it
/// for every account.
#[tokio::test(flavor = "multi_thread")]
async fn controls_act_on_the_calling_account_only() {
    assert!(have_ssh_client(), "needs the OpenSSH client and sshpass");
    within(Duration::from_secs(120), "the test", async {
        let dir = tempfile::tempdir().unwrap();
        let af = accounts_file(dir.path(), None);
        let data = dir.path().join("data");
        let args = [
            "--data-dir",
            data.to_str().unwrap(),
            "--accounts-file",
            af.as_str(),
        ];
        let mut srv = Server::launch(&args);
        let alpha = Client::new(&srv.url, "alpha", ALPHA_KEY1);
        let beta = Client::new(&srv.url, "beta", BETA_KEY);
        let a_nodes = alpha.ready_pool("same", "linux", 1).await;
        alpha.ready_pool("alphaonly", "linux", 0).await;
        let b_nodes = beta.ready_pool("same", "linux", 1).await;
        let b_node = &b_nodes[0];
        add_user(&alpha, "same", &a_nodes[0], "ann", "Ann-pw-1").await;
        add_user(&beta, "same", b_node, "bob", "Bob-pw-1").await;
        let b_port = beta.ssh_port("same", b_node).await;

        // alpha cannot reach beta's node through the controls (beta's node id under alpha's
        // own pool of the same name, and under a pool alpha does not have).
        for path in [
            format!("/pools/same/nodes/{b_node}/users"),
            format!("/pools/same/nodes/{b_node}/state"),
        ] {
            let r = if path.ends_with("/state") {
                alpha
                    .control("PUT", &path)
                    .json(&json!({"state": "unusable"}))
                    .send_within(T)
                    .await
            } else {
                alpha.control("GET", &path).send_within(T).await
            };
            assert_eq!(
                (r.status, r.code().as_str()),
                (404, "NodeNotFound"),
                "{path}: {}",
                text(&r)
            );
        }
        let r = alpha
            .control("GET", &format!("/pools/betaonly/nodes/{b_node}/users"))
            .send_within(T)
            .await;
        assert_eq!((r.status, r.code().as_str()), (404, "PoolNotFound"));
        let v = beta
            .req("GET", &format!("/pools/same/nodes/{b_node}"))
            .send_within(T)
            .await
            .json();
        assert_eq!(v["state"], "idle", "beta's node untouched: {v}");

        // alpha resets: its pools are gone, beta's are all there.
        let r = alpha.control("POST", "/reset").send_within(T).await;
        assert_eq!(r.status, 200, "{}", text(&r));
        let list = alpha.req("GET", "/pools").send_within(T).await.json();
        assert_eq!(list["value"], json!([]), "{list}");
        check_beta(&beta, b_node).await;
        let ok = ssh_password_outcome(b_port, "bob", "Bob-pw-1", &loopback_source(8101), "echo in")
            .await;
        assert_eq!(ok.stdout("beta's user after alpha's reset").trim(), "in");

        // One service clock: alpha's advance is what beta sees.
        let before = beta.control("GET", "/clock").send_within(T).await.json();
        let r = alpha
            .control("POST", "/clock/advance")
            .json(&json!({"by": "2h"}))
            .send_within(T)
            .await;
        assert_eq!(r.status, 200, "{}", text(&r));
        let after = beta.control("GET", "/clock").send_within(T).await.json();
        assert_eq!(
            after["offsetSeconds"].as_i64().unwrap() - before["offsetSeconds"].as_i64().unwrap(),
            7200,
            "{before} → {after}"
        );

        // After a restart: still only beta's.
        srv.stop();
        let srv = Server::launch(&args);
        let alpha = Client::new(&srv.url, "alpha", ALPHA_KEY1);
        let beta = Client::new(&srv.url, "beta", BETA_KEY);
        let list = alpha.req("GET", "/pools").send_within(T).await.json();
        assert_eq!(list["value"], json!([]), "alpha's reset is durable: {list}");
        check_beta(&beta, b_node).await;
        let b_port = beta.ssh_port("same", b_node).await;
        let again =
            ssh_password_outcome(b_port, "bob", "Bob-pw-1", &loopback_source(8102), "echo in")
                .await;
        assert!(
            matches!(&again, SshOutcome::Accepted { code: 0, .. }),
            "{again:?}"
        );
        // "`bluebatch reset` does not touch the clock": beta's reset leaves the offset.
        let clock = alpha.control("GET", "/clock").send_within(T).await.json();
        assert!(clock["offsetSeconds"].as_i64().unwrap() >= 7200, "{clock}");
        let r = beta.control("POST", "/reset").send_within(T).await;
        assert_eq!(r.status, 200, "{}", text(&r));
        let kept = alpha.control("GET", "/clock").send_within(T).await.json();
        assert_eq!(kept["offsetSeconds"], clock["offsetSeconds"], "{kept}");
        let list = beta.req("GET", "/pools").send_within(T).await.json();
        assert_eq!(list["value"], json!([]), "{list}");
    })
    .await;
}

/// beta has its pool `same` and the user bob on its node, applied there.
async fn check_beta(c: &Client, b_node: &str) {
    let list = c.req("GET", "/pools").send_within(T).await.json();
    let ids: Vec<&str> = list["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["same"], "{list}");
    let v = c
        .control("GET", &format!("/pools/same/nodes/{b_node}/users"))
        .send_within(T)
        .await
        .json();
    assert_eq!(v["users"][0]["name"], "bob", "{v}");
    assert_eq!(v["users"][0]["appliedOnNode"], true, "{v}");
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn token(claims: Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn claims(iss: &str) -> Value {
    json!({"aud": "https://batch.core.windows.net/", "iss": iss,
           "iat": now(), "nbf": now(), "exp": now() + 3600, "sub": "claims"})
}

/// README: "bearer tokens are also accepted over plain HTTP"; "It acts for the account in its
/// `bluebatch_account` claim (`accountClaim` renames it) or else its tenant's `account`"; `iss`
/// "of a configured tenant (or one of its extra `issuers`)".
#[tokio::test]
async fn bearer_over_plain_http_with_account_claim_and_extra_issuers() {
    within(Duration::from_secs(60), "the test", async {
        let dir = tempfile::tempdir().unwrap();
        let af = accounts_file(
            dir.path(),
            Some(json!({
                "tenants": [{"id": TENANT, "account": "alpha", "issuers": [EXTRA_ISSUER]}],
                "hs256SecretFile": "secret",
                "accountClaim": "batch_acct",
            })),
        );
        let srv = Server::launch(&["--in-memory", "--accounts-file", &af]);
        assert!(srv.url.starts_with("http://"), "{}", srv.url);
        let c = srv.client();
        let alpha = Client::new(&srv.url, "alpha", ALPHA_KEY1);
        let beta = Client::new(&srv.url, "beta", BETA_KEY);
        let v1 = format!("https://sts.windows.net/{TENANT}/");
        let v2 = format!("https://login.microsoftonline.com/{TENANT}/v2.0");

        // Plain HTTP, a read and a write, the tenant's account.
        let t = token(claims(&v1));
        let r = c.req("GET", "/pools").bearer(&t).send_within(T).await;
        assert_eq!(r.status, 200, "{}", text(&r));
        let r = c
            .req("POST", "/pools")
            .bearer(&t)
            .json(&pool_body("by-token", 0))
            .send_within(T)
            .await;
        assert_eq!(r.status, 201, "{}", text(&r));
        assert!(
            r.header("dataserviceid").unwrap().starts_with("http://"),
            "URLs of a plain-HTTP request are http"
        );
        assert_eq!(
            alpha
                .req("GET", "/pools/by-token")
                .send_within(T)
                .await
                .status,
            200,
            "the tenant's account"
        );
        assert_eq!(
            beta.req("GET", "/pools/by-token")
                .send_within(T)
                .await
                .status,
            404
        );

        // accountClaim renames the claim: batch_acct names beta; bluebatch_account is then
        // just another claim (ignored), so the tenant's account applies.
        let mut named = claims(&v2);
        named["batch_acct"] = json!("beta");
        let r = c
            .req("POST", "/pools")
            .bearer(&token(named))
            .json(&pool_body("for-beta", 0))
            .send_within(T)
            .await;
        assert_eq!(r.status, 201, "{}", text(&r));
        assert_eq!(
            beta.req("GET", "/pools/for-beta")
                .send_within(T)
                .await
                .status,
            200
        );
        assert_eq!(
            alpha
                .req("GET", "/pools/for-beta")
                .send_within(T)
                .await
                .status,
            404
        );
        let mut old_name = claims(&v1);
        old_name["bluebatch_account"] = json!("beta");
        let r = c
            .req("POST", "/pools")
            .bearer(&token(old_name))
            .json(&pool_body("old-claim", 0))
            .send_within(T)
            .await;
        assert_eq!(r.status, 201, "{}", text(&r));
        assert_eq!(
            alpha
                .req("GET", "/pools/old-claim")
                .send_within(T)
                .await
                .status,
            200
        );
        assert_eq!(
            beta.req("GET", "/pools/old-claim")
                .send_within(T)
                .await
                .status,
            404
        );
        // The renamed claim naming an unknown account is refused.
        let mut unknown = claims(&v1);
        unknown["batch_acct"] = json!("nosuch");
        let r = c
            .req("GET", "/pools")
            .bearer(&token(unknown))
            .send_within(T)
            .await;
        assert_eq!((r.status, r.code().as_str()), (401, "AuthenticationFailed"));

        // The tenant's extra issuer is accepted and acts for the tenant's account; an issuer
        // nobody configured is refused with the Bearer challenge.
        let r = c
            .req("GET", "/pools/by-token")
            .bearer(&token(claims(EXTRA_ISSUER)))
            .send_within(T)
            .await;
        assert_eq!(r.status, 200, "{}", text(&r));
        for iss in [
            "https://issuer.example.test/other/",
            "https://issuer.example.test/custom",
            "https://sts.windows.net/00000000-0000-0000-0000-000000000000/",
        ] {
            let r = c
                .req("GET", "/pools")
                .bearer(&token(claims(iss)))
                .send_within(T)
                .await;
            assert_eq!(
                (r.status, r.code().as_str()),
                (401, "AuthenticationFailed"),
                "{iss}"
            );
            let challenge = r.header("www-authenticate").unwrap_or_default();
            assert!(challenge.contains("error=\"invalid_token\""), "{challenge}");
            assert!(
                r.value("AuthenticationErrorDetail")
                    .unwrap_or_default()
                    .contains("issuer"),
                "{}",
                text(&r)
            );
        }
    })
    .await;
}

/// "Shared Key freshness always uses the wall clock" (not the movable service clock): after
/// the service clock moves two days on, a request dated now is accepted and one dated at the
/// service clock's "now" is 403 `AuthenticationFailed` (stale date).
#[tokio::test]
async fn shared_key_freshness_follows_the_wall_clock_not_the_service_clock() {
    within(Duration::from_secs(30), "the test", async {
        let srv = Server::launch(&["--in-memory"]);
        let c = srv.client();
        let r = c
            .control("POST", "/clock/advance")
            .json(&json!({"by": "2d"}))
            .send_within(T)
            .await;
        assert_eq!(r.status, 200, "{}", text(&r));
        let service_now = time::OffsetDateTime::parse(
            r.json()["now"].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap();
        let f = time::macros::format_description!(
            "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
        );
        assert_eq!(c.req("GET", "/pools").send_within(T).await.status, 200);
        let r = c
            .req("GET", "/pools")
            .header("ocp-date", &service_now.format(f).unwrap())
            .send_within(T)
            .await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (403, "AuthenticationFailed"),
            "{}",
            text(&r)
        );
    })
    .await;
}

/// Client commands: "`--url`/`BLUEBATCH_URL` … and `--account`/`BLUEBATCH_ACCOUNT` … go before or
/// after the subcommand. The key comes only from `BLUEBATCH_KEY` (never the command line)".
#[tokio::test]
async fn the_cli_acts_for_another_account_with_its_key_from_the_environment() {
    within(Duration::from_secs(60), "the test", async {
        let dir = tempfile::tempdir().unwrap();
        let af = accounts_file(dir.path(), None);
        let srv = Server::launch(&["--in-memory", "--accounts-file", &af]);
        let alpha = Client::new(&srv.url, "alpha", ALPHA_KEY1);
        let r = alpha
            .req("POST", "/pools")
            .json(&pool_body("alphapool", 0))
            .send_within(T)
            .await;
        assert_eq!(r.status, 201, "{}", text(&r));
        let url = srv.url.as_str();
        for (args, env) in [
            (
                vec!["pool", "list"],
                vec![
                    ("BLUEBATCH_URL", url),
                    ("BLUEBATCH_ACCOUNT", "alpha"),
                    ("BLUEBATCH_KEY", ALPHA_KEY1),
                ],
            ),
            (
                vec!["--url", url, "--account", "alpha", "pool", "list"],
                vec![("BLUEBATCH_KEY", ALPHA_KEY2)],
            ),
            (
                vec!["pool", "list", "--url", url, "--account", "alpha"],
                vec![("BLUEBATCH_KEY", ALPHA_KEY1)],
            ),
        ] {
            let (ok, out, err) = cli(&args, &env).await;
            assert!(ok, "{args:?}: {err}");
            assert!(out.contains("alphapool"), "{args:?}: {out}");
        }
        // Without BLUEBATCH_KEY the account has no key (only the dev account's is built in).
        let (ok, out, err) = cli(&["pool", "list", "--url", url, "--account", "alpha"], &[]).await;
        assert!(!ok && !out.contains("alphapool"), "{out} {err}");
        // The dev account needs no key, and does not see alpha's pool.
        let (ok, out, err) = cli(&["pool", "list", "--url", url], &[]).await;
        assert!(ok, "{err}");
        assert!(!out.contains("alphapool"), "{out}");
    })
    .await;
}

/// The CLI's (success, stdout, stderr).
async fn cli(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = common::bluebatch_cli(args, env).await;
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// "a wrong signature … → 403 `AuthenticationFailed` with an `AuthenticationErrorDetail` that
/// says which (never the expected signature)": the answer holds neither the signature the right
/// key gives nor the key.
#[tokio::test]
async fn a_wrong_signature_answer_never_holds_the_expected_one() {
    within(Duration::from_secs(30), "the test", async {
        let srv = Server::launch(&["--in-memory"]);
        let right = srv.client();
        let wrong = Client::new(&srv.url, common::ACCOUNT, BETA_KEY);
        let date = common::http_date();
        let req = wrong.req("GET", "/pools").header("ocp-date", &date);
        let expected = right.authorization(&req.string_to_sign(common::ACCOUNT));
        let expected_sig = expected.rsplit(':').next().unwrap().to_string();
        let r = req.send_within(T).await;
        assert_eq!((r.status, r.code().as_str()), (403, "AuthenticationFailed"));
        let detail = r.value("AuthenticationErrorDetail").unwrap_or_default();
        assert!(detail.contains("signature"), "{detail}");
        let all = format!("{:?} {}", r.headers, text(&r));
        assert!(
            !all.contains(&expected_sig),
            "the expected signature leaked: {all}"
        );
        assert!(!all.contains(KEY), "the key leaked: {all}");
    })
    .await;
}
