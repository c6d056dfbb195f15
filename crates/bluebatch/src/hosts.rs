//! Operator commands for agent capacity, against a running server's control endpoints (the same
//! --url, --account and BLUEBATCH_KEY as `pool list`): `bluebatch join-token create|list|revoke`
//! and `bluebatch host list|drain|revoke`.

use crate::cli::{ok_json, table, text};
use crate::control::{Target, send};
use bluebatch_wire::http::Method;
use clap::Subcommand;
use serde_json::{Map, Value, json};

#[derive(Subcommand)]
pub enum JoinTokenCmd {
    /// Create a join token for `bluebatch agent`: prints the token (ID.SECRET, a secret) on the
    /// first line and the fingerprint of the service's CA certificate (`sha256:…`, for the agent
    /// to pin; `-` when the service serves no HTTPS) on the second. Those two lines, saved to a
    /// file (mode 0600), are the agent's --join-token-file. A token is usable once.
    #[command(after_help = "\
Example:
  bluebatch join-token create --pool pool1 --ttl 2h > token && chmod 600 token
  bluebatch agent --server https://batch.example:8522 --join-token-file token")]
    Create {
        /// Only this pool may use the host that joins with the token (default: any pool of the
        /// account whose nodes come from agents).
        #[arg(long)]
        pool: Option<String>,
        /// How long the token can be used: a number and a unit (w, d, h, m, s), e.g. `30m`,
        /// `2h`, `1d12h`. Default: 24h.
        #[arg(long, value_name = "DURATION")]
        ttl: Option<String>,
    },
    /// List the account's join tokens: id, pool scope, expiry, whether it was used (never the
    /// secret).
    List {
        /// Print the tokens as the control endpoint returns them (JSON) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a join token that was not used yet (a host that joined with it stays: revoke the
    /// host for that).
    Revoke {
        /// The token's id (the part before the dot).
        id: String,
    },
}

#[derive(Subcommand)]
pub enum HostCmd {
    /// List the hosts that joined the account: id, hostname, provider, address, SSH port,
    /// nodes backed out of slots, drained, connected, last poll.
    List {
        /// Print the hosts as the control endpoint returns them (JSON) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Drain a host: it backs no new pools; the nodes it backs stay until their pools release
    /// them (shrink, Remove Nodes, pool deletion).
    Drain {
        /// The host's id (see `bluebatch host list`).
        host: String,
    },
    /// Revoke a host: its node credential stops working at once and its nodes leave their
    /// pools. The agent must join again with a new token to come back.
    Revoke {
        /// The host's id (see `bluebatch host list`).
        host: String,
    },
}

/// One control request; the JSON answer, or the Batch error as text.
async fn call(
    target: &Target,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<Value, String> {
    let answer = send(target, method, &format!("/_bluebatch{path}"), "", body).await?;
    ok_json(&answer)
}

fn pretty(v: &Value) -> Result<(), String> {
    println!(
        "{}",
        serde_json::to_string_pretty(v).map_err(|e| e.to_string())?
    );
    Ok(())
}

fn items(v: &Value) -> &[Value] {
    v["value"].as_array().map(Vec::as_slice).unwrap_or(&[])
}

pub async fn join_token(target: &Target, cmd: JoinTokenCmd) -> Result<(), String> {
    let enc = bluebatch_wire::percent::encode;
    match cmd {
        JoinTokenCmd::Create { pool, ttl } => {
            let mut body = Map::new();
            if let Some(p) = pool {
                body.insert("pool".into(), json!(p));
            }
            if let Some(t) = ttl {
                body.insert("ttl".into(), json!(t));
            }
            let v = call(
                target,
                Method::POST,
                "/join-tokens",
                Some(Value::Object(body)),
            )
            .await?;
            let token = v["token"]
                .as_str()
                .ok_or_else(|| format!("the server's answer has no token: {v}"))?;
            println!("{token}");
            match v["caFingerprint"].as_str() {
                Some(fp) => println!("{fp}"),
                None => {
                    println!("-");
                    eprintln!(
                        "note: the service serves no HTTPS (no --tls): the agent will talk to it \
                         over plain HTTP, with no certificate to pin"
                    );
                }
            }
            eprintln!(
                "join token {} for {}, usable once until {}; save both lines (mode 0600) as the \
                 agent's --join-token-file",
                text(&v["id"]),
                match v["pool"].as_str() {
                    Some(p) => format!("pool {p}"),
                    None => "any agents pool of the account".into(),
                },
                text(&v["expires"]),
            );
            Ok(())
        }
        JoinTokenCmd::List { json } => {
            let v = call(target, Method::GET, "/join-tokens", None).await?;
            if json {
                return pretty(&v);
            }
            let rows: Vec<Vec<String>> = items(&v)
                .iter()
                .map(|t| {
                    vec![
                        text(&t["id"]),
                        text(&t["pool"]),
                        text(&t["expires"]),
                        yes_no(&t["used"]),
                    ]
                })
                .collect();
            print!("{}", table(&["ID", "POOL", "EXPIRES", "USED"], &rows));
            Ok(())
        }
        JoinTokenCmd::Revoke { id } => {
            call(
                target,
                Method::DELETE,
                &format!("/join-tokens/{}", enc(&id)),
                None,
            )
            .await?;
            println!("join token {id} revoked");
            Ok(())
        }
    }
}

fn yes_no(v: &Value) -> String {
    match v.as_bool() {
        Some(true) => "yes".into(),
        Some(false) => "no".into(),
        None => "-".into(),
    }
}

pub async fn host(target: &Target, cmd: HostCmd) -> Result<(), String> {
    let enc = bluebatch_wire::percent::encode;
    match cmd {
        HostCmd::List { json } => {
            let v = call(target, Method::GET, "/hosts", None).await?;
            if json {
                return pretty(&v);
            }
            let rows: Vec<Vec<String>> = items(&v)
                .iter()
                .map(|h| {
                    let used = h["nodes"].as_array().map_or(0, Vec::len);
                    vec![
                        text(&h["id"]),
                        text(&h["hostname"]),
                        text(&h["provider"]),
                        text(&h["address"]),
                        text(&h["sshPort"]),
                        format!("{used}/{}", text(&h["slots"])),
                        yes_no(&h["drained"]),
                        yes_no(&h["connected"]),
                        text(&h["lastSeen"]),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &[
                        "ID",
                        "HOSTNAME",
                        "PROVIDER",
                        "ADDRESS",
                        "SSH",
                        "NODES",
                        "DRAINED",
                        "CONNECTED",
                        "LAST SEEN"
                    ],
                    &rows
                )
            );
            Ok(())
        }
        HostCmd::Drain { host } => {
            let v = call(
                target,
                Method::POST,
                &format!("/hosts/{}/drain", enc(&host)),
                None,
            )
            .await?;
            let backing = v["nodes"].as_array().map_or(0, Vec::len);
            println!(
                "host {host} drained: it takes no new pools; {backing} node(s) stay until their \
                 pools release them"
            );
            Ok(())
        }
        HostCmd::Revoke { host } => {
            call(
                target,
                Method::POST,
                &format!("/hosts/{}/revoke", enc(&host)),
                None,
            )
            .await?;
            println!(
                "host {host} revoked: its credential is refused and its nodes left their pools"
            );
            Ok(())
        }
    }
}
