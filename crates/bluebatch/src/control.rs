//! The control CLI: `bluebatch clock …`, `bluebatch node …`, `bluebatch reset`, talking to a
//! running server's `/_bluebatch` endpoints with the account's Shared Key.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bluebatch_wire::http::{HeaderMap, HeaderValue, Method};
use bluebatch_wire::sharedkey::{Signed, authorization};
use bluebatch_wire::{DEV_ACCOUNT, DEV_KEY};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

#[derive(Args)]
pub struct Target {
    /// The server's URL.
    #[arg(
        long,
        env = "BLUEBATCH_URL",
        default_value = "http://127.0.0.1:8521",
        global = true
    )]
    url: String,
    /// The account to act as (its key comes from BLUEBATCH_KEY; the development account's key is
    /// built in).
    #[arg(long, env = "BLUEBATCH_ACCOUNT", default_value = DEV_ACCOUNT, global = true)]
    account: String,
}

#[derive(Subcommand)]
pub enum ClockCmd {
    /// Print the service clock.
    Show,
    /// Move the service clock forward, e.g. `2d`, `36h`, `1d12h30m`, `90s`.
    Advance { by: String },
}

#[derive(Subcommand)]
pub enum NodeCmd {
    /// Put a node into any ComputeNodeState (idle, starting, rebooting, unusable, …).
    SetState {
        pool: String,
        node: String,
        state: String,
    },
    /// Show a node's users as stored and as the node applies them (never passwords).
    Users { pool: String, node: String },
}

pub async fn run(
    target: &Target,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<(), String> {
    let key = match std::env::var("BLUEBATCH_KEY") {
        Ok(k) => k,
        Err(_) if target.account == DEV_ACCOUNT => DEV_KEY.to_string(),
        Err(_) => {
            return Err(format!(
                "set BLUEBATCH_KEY to the key of account {}",
                target.account
            ));
        }
    };
    let key = STANDARD
        .decode(key.trim())
        .map_err(|_| "BLUEBATCH_KEY is not base64")?;
    let body = body.map(|b| b.to_string());
    let path = format!("/_bluebatch{path}");
    let mut headers = HeaderMap::new();
    let date = bluebatch_core::timefmt::rfc1123(time::OffsetDateTime::now_utc());
    headers.insert(
        "ocp-date",
        HeaderValue::from_str(&date).expect("a date is a header value"),
    );
    if let Some(b) = &body {
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.insert("content-length", HeaderValue::from(b.len()));
    }
    let auth = authorization(
        &Signed {
            method: &method,
            raw_path: &path,
            raw_query: "",
            headers: &headers,
        },
        &target.account,
        &key,
    );
    let client = reqwest::Client::new();
    let mut req = client
        .request(
            reqwest::Method::from_bytes(method.as_str().as_bytes()).expect("a valid method"),
            format!("{}{path}", target.url.trim_end_matches('/')),
        )
        .header("authorization", auth);
    for (k, v) in &headers {
        req = req.header(k.as_str(), v.as_bytes());
    }
    if let Some(b) = body {
        req = req.body(b);
    }
    let resp = req
        .send()
        .await
        .map_err(|e| format!("{}: {e}", target.url))?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    let pretty = serde_json::from_str::<Value>(&text)
        .map(|v| serde_json::to_string_pretty(&v).unwrap_or(text.clone()))
        .unwrap_or(text);
    if status.is_success() {
        println!("{pretty}");
        Ok(())
    } else {
        Err(format!("{status}\n{pretty}"))
    }
}

pub async fn clock(target: &Target, cmd: ClockCmd) -> Result<(), String> {
    match cmd {
        ClockCmd::Show => run(target, Method::GET, "/clock", None).await,
        ClockCmd::Advance { by } => {
            run(
                target,
                Method::POST,
                "/clock/advance",
                Some(json!({ "by": by })),
            )
            .await
        }
    }
}

pub async fn node(target: &Target, cmd: NodeCmd) -> Result<(), String> {
    let enc = bluebatch_wire::percent::encode;
    match cmd {
        NodeCmd::SetState { pool, node, state } => {
            let path = format!("/pools/{}/nodes/{}/state", enc(&pool), enc(&node));
            run(target, Method::PUT, &path, Some(json!({ "state": state }))).await
        }
        NodeCmd::Users { pool, node } => {
            let path = format!("/pools/{}/nodes/{}/users", enc(&pool), enc(&node));
            run(target, Method::GET, &path, None).await
        }
    }
}
