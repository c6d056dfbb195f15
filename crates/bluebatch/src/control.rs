//! The control CLI: `bluebatch clock …`, `bluebatch node …`, `bluebatch reset`, talking to a
//! running server's `/_bluebatch` endpoints with the account's Shared Key; [`send`] signs any
//! request (the Batch API ones of `crate::cli` too).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bluebatch_wire::http::{HeaderMap, HeaderValue, Method};
use bluebatch_wire::sharedkey::{Signed, authorization};
use bluebatch_wire::{DEV_ACCOUNT, DEV_KEY};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

#[derive(Args)]
pub struct Target {
    /// URL of the running server, for the client commands (pool, node, ssh, env, clock, reset,
    /// join-token, host).
    #[arg(
        long,
        env = "BLUEBATCH_URL",
        default_value = "http://127.0.0.1:8521",
        global = true
    )]
    pub url: String,
    /// Account the client commands act as. Its key comes from the BLUEBATCH_KEY environment
    /// variable (never the command line); the development account's key is built in.
    /// (`bluebatch token`: the account the token acts for; without it, the tenant's default.)
    #[arg(long, env = "BLUEBATCH_ACCOUNT", global = true)]
    account: Option<String>,
}

impl Target {
    /// The account the client commands act as: `--account`, else the development account.
    pub fn account(&self) -> &str {
        self.account.as_deref().unwrap_or(DEV_ACCOUNT)
    }

    /// The account given on the command line or in the environment, if any.
    pub fn explicit_account(&self) -> Option<&str> {
        self.account.as_deref()
    }
}

#[derive(Subcommand)]
pub enum ClockCmd {
    /// Print the service clock (now and the offset from the wall clock).
    Show,
    /// Move the service clock forward. The offset is stored: it survives a restart.
    Advance {
        /// How far: a number and a unit (w, d, h, m, s), e.g. `2d`, `36h`, `1d12h30m`, `90s`.
        by: String,
    },
    /// Put the service clock back to the wall clock (offset 0), durably.
    Reset,
}

/// The ComputeNodeState values `node set-state` accepts.
pub fn node_states() -> Vec<&'static str> {
    bluebatch_core::model::NodeState::ALL
        .iter()
        .map(|s| s.as_str())
        .collect()
}

#[derive(Subcommand)]
pub enum NodeCmd {
    /// List a pool's compute nodes: id, state, scheduling, dedicated, SSH address (ip:port).
    List {
        /// Id of the pool.
        pool: String,
        /// Print the nodes as the Batch API returns them (JSON) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Put a node into any ComputeNodeState, as if the service had moved it there.
    SetState {
        /// Id of the pool.
        pool: String,
        /// Id of the compute node (see `bluebatch node list POOL`).
        node: String,
        /// The new state (case-insensitive).
        #[arg(value_parser = clap::builder::PossibleValuesParser::new(node_states()), ignore_case = true)]
        state: String,
    },
    /// Show a node's users as stored and as the node applies them (never passwords).
    Users {
        /// Id of the pool.
        pool: String,
        /// Id of the compute node (see `bluebatch node list POOL`).
        node: String,
    },
}

/// The account key: BLUEBATCH_KEY, or the built-in key of the development account.
pub fn key_text(target: &Target) -> Result<String, String> {
    match std::env::var("BLUEBATCH_KEY") {
        Ok(k) => Ok(k.trim().to_string()),
        Err(_) if target.account() == DEV_ACCOUNT => Ok(DEV_KEY.to_string()),
        Err(_) => Err(format!(
            "set BLUEBATCH_KEY to the key of account {}",
            target.account()
        )),
    }
}

/// A server's answer: status and body text.
pub struct Answer {
    pub status: u16,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> Option<Value> {
        serde_json::from_str(&self.body).ok()
    }

    /// `404 PoolNotFound: The specified pool does not exist.` for a Batch error, else the body.
    pub fn error(&self) -> String {
        match self.json() {
            Some(v) if v["code"].is_string() => {
                let message = v["message"]["value"]
                    .as_str()
                    .or(v["message"].as_str())
                    .unwrap_or("");
                format!(
                    "{} {}: {}",
                    self.status,
                    v["code"].as_str().unwrap_or_default(),
                    message.lines().next().unwrap_or("")
                )
            }
            _ => format!("{} {}", self.status, self.body.trim()),
        }
    }
}

/// Sends one request signed with the account's Shared Key. `path` is already percent-encoded,
/// `query` is the raw query string (may be empty).
pub async fn send(
    target: &Target,
    method: Method,
    path: &str,
    query: &str,
    body: Option<Value>,
) -> Result<Answer, String> {
    let key = STANDARD
        .decode(key_text(target)?)
        .map_err(|_| "BLUEBATCH_KEY is not base64")?;
    let body = body.map(|b| b.to_string());
    let mut headers = HeaderMap::new();
    let date = bluebatch_core::timefmt::rfc1123(time::OffsetDateTime::now_utc());
    headers.insert(
        "ocp-date",
        HeaderValue::from_str(&date).expect("a date is a header value"),
    );
    if let Some(b) = &body {
        headers.insert(
            "content-type",
            HeaderValue::from_static("application/json; odata=minimalmetadata"),
        );
        headers.insert("content-length", HeaderValue::from(b.len()));
    }
    let auth = authorization(
        &Signed {
            method: &method,
            raw_path: path,
            raw_query: query,
            headers: &headers,
        },
        target.account(),
        &key,
    );
    let mut builder = reqwest::Client::builder().timeout(std::time::Duration::from_secs(60));
    // An https --url: the CA certificate(s) to trust (e.g. the server's DATA_DIR/tls/ca.pem).
    if let Some(path) = std::env::var_os("BLUEBATCH_CA_FILE").filter(|p| !p.is_empty()) {
        let shown = std::path::Path::new(&path).display().to_string();
        let pem = std::fs::read(&path).map_err(|e| format!("BLUEBATCH_CA_FILE {shown}: {e}"))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("BLUEBATCH_CA_FILE {shown}: {e}"))?;
        if certs.is_empty() {
            return Err(format!(
                "BLUEBATCH_CA_FILE {shown}: no PEM certificate in it"
            ));
        }
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    let client = builder.build().map_err(|e| e.to_string())?;
    let mut url = format!("{}{path}", target.url.trim_end_matches('/'));
    if !query.is_empty() {
        url.push('?');
        url.push_str(query);
    }
    let mut req = client
        .request(
            reqwest::Method::from_bytes(method.as_str().as_bytes()).expect("a valid method"),
            url,
        )
        .header("authorization", auth);
    for (k, v) in &headers {
        req = req.header(k.as_str(), v.as_bytes());
    }
    if let Some(b) = body {
        req = req.body(b);
    }
    let resp = req.send().await.map_err(|e| {
        let hint = if target.url.starts_with("https:")
            && std::env::var_os("BLUEBATCH_CA_FILE").is_none()
        {
            "; for an https URL, set BLUEBATCH_CA_FILE to the CA certificate to trust (PEM)"
        } else {
            ""
        };
        format!(
            "no answer from {} ({}); is `bluebatch serve` running there? (--url, \
             BLUEBATCH_URL){hint}",
            target.url,
            causes(&e)
        )
    })?;
    let status = resp.status().as_u16();
    let body = resp.text().await.unwrap_or_default();
    Ok(Answer { status, body })
}

/// An error and its causes, `: `-separated (reqwest's own text leaves out why a TLS handshake
/// failed).
fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut at = e.source();
    while let Some(cause) = at {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        at = cause.source();
    }
    text
}

/// A control request (under `/_bluebatch`); prints the answer as pretty JSON.
pub async fn run(
    target: &Target,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<(), String> {
    let answer = send(target, method, &format!("/_bluebatch{path}"), "", body).await?;
    let text = &answer.body;
    let pretty = serde_json::from_str::<Value>(text)
        .map(|v| serde_json::to_string_pretty(&v).unwrap_or(text.clone()))
        .unwrap_or(text.clone());
    if (200..300).contains(&answer.status) {
        println!("{pretty}");
        Ok(())
    } else {
        Err(format!("{}\n{pretty}", answer.error()))
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
        ClockCmd::Reset => run(target, Method::POST, "/clock/reset", None).await,
    }
}

pub async fn node(target: &Target, cmd: NodeCmd) -> Result<(), String> {
    let enc = bluebatch_wire::percent::encode;
    match cmd {
        NodeCmd::List { pool, json } => crate::cli::node_list(target, &pool, json).await,
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
