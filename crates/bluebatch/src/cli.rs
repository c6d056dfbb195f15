//! Everyday client commands against a running server, through the real Batch API (Shared Key):
//! `bluebatch pool list`, `bluebatch node list POOL`, `bluebatch ssh POOL NODE USER [-- CMD]` and
//! `bluebatch env`.

use crate::control::{Answer, Target, key_text, send};
use bluebatch_wire::http::Method;
use clap::{Args, Subcommand};
use serde_json::Value;
use std::path::PathBuf;

/// The api-version the client commands speak.
const API_VERSION: &str = "2024-07-01.20.0";

#[derive(Subcommand)]
pub enum PoolCmd {
    /// List the account's pools: id, state, allocation state, dedicated and low-priority nodes
    /// (current/target), VM size.
    List {
        /// Print the pools as the Batch API returns them (JSON) instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
#[command(after_help = "\
Examples:
  bluebatch ssh pool1 tvmps_0001 alice                  # interactive login
  bluebatch ssh pool1 tvmps_0001 alice -i ~/.ssh/id_ed25519 -- uname -a
  bluebatch ssh pool1 tvmps_0001 alice --print          # print the ssh command instead

The node's host key is not checked by default (-o StrictHostKeyChecking=no
-o UserKnownHostsFile=/dev/null, like `vagrant ssh`): an emulated node gets a new host key
whenever it is created again, often on a port an earlier node had. --strict-host-keys turns that
off.")]
pub struct SshArgs {
    /// Id of the pool.
    pub pool: String,
    /// Id of the compute node (see `bluebatch node list POOL`).
    pub node: String,
    /// Name of the node user to log in as (created with Add User, `az batch node user create`, …).
    pub user: String,
    /// Private key file to log in with (passed to ssh as `-i FILE`, with IdentitiesOnly=yes).
    #[arg(short = 'i', long = "identity", value_name = "FILE")]
    pub identity: Option<PathBuf>,
    /// Extra ssh option, passed as `-o OPTION` (repeatable), e.g. `-o ConnectTimeout=5`.
    #[arg(short = 'o', value_name = "OPTION")]
    pub options: Vec<String>,
    /// Check the node's host key against known_hosts as ssh normally does.
    #[arg(long)]
    pub strict_host_keys: bool,
    /// Print the ssh command (one shell-quoted line) instead of running it.
    #[arg(long)]
    pub print: bool,
    /// Command to run on the node (everything after `--`); none opens a login shell.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Args)]
pub struct EnvArgs {
    /// Print only the Python snippet (azure-batch 15.x), reading the variables `env` exports.
    #[arg(long)]
    pub python: bool,
}

/// GET of a Batch API collection, following `odata.nextLink`.
async fn list_all(target: &Target, path: &str) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    let mut next = Some((path.to_string(), format!("api-version={API_VERSION}")));
    while let Some((path, query)) = next.take() {
        let answer = send(target, Method::GET, &path, &query, None).await?;
        let v = ok_json(&answer)?;
        if let Some(items) = v["value"].as_array() {
            out.extend(items.iter().cloned());
        }
        if let Some(link) = v["odata.nextLink"].as_str() {
            let url =
                reqwest::Url::parse(link).map_err(|e| format!("bad odata.nextLink {link}: {e}"))?;
            next = Some((
                url.path().to_string(),
                url.query().unwrap_or("").to_string(),
            ));
        }
    }
    Ok(out)
}

pub(crate) fn ok_json(answer: &Answer) -> Result<Value, String> {
    if !(200..300).contains(&answer.status) {
        return Err(answer.error());
    }
    answer
        .json()
        .ok_or_else(|| format!("{}: not JSON: {}", answer.status, answer.body))
}

/// Left-aligned columns, two spaces apart.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let last = cells.len() - 1;
        let mut s = String::new();
        for (i, c) in cells.into_iter().enumerate() {
            if i == last {
                s.push_str(&c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        out.push_str(&line(r.clone()));
    }
    out
}

pub(crate) fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

pub async fn pool(target: &Target, cmd: PoolCmd) -> Result<(), String> {
    let PoolCmd::List { json } = cmd;
    let pools = list_all(target, "/pools").await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&pools).map_err(|e| e.to_string())?
        );
        return Ok(());
    }
    let rows: Vec<Vec<String>> = pools
        .iter()
        .map(|p| {
            vec![
                text(&p["id"]),
                text(&p["state"]),
                text(&p["allocationState"]),
                format!(
                    "{}/{}",
                    text(&p["currentDedicatedNodes"]),
                    text(&p["targetDedicatedNodes"])
                ),
                format!(
                    "{}/{}",
                    text(&p["currentLowPriorityNodes"]),
                    text(&p["targetLowPriorityNodes"])
                ),
                text(&p["vmSize"]),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &[
                "ID",
                "STATE",
                "ALLOCATION",
                "DEDICATED",
                "LOW-PRIORITY",
                "VM SIZE"
            ],
            &rows
        )
    );
    Ok(())
}

/// The SSH address a node's list entry reports (`ip:port`), `-` for nodes without one.
fn ssh_address(n: &Value) -> String {
    n["endpointConfiguration"]["inboundEndpoints"]
        .as_array()
        .and_then(|eps| {
            eps.iter()
                .find(|e| e["backendPort"] == 22)
                .or_else(|| eps.first())
        })
        .and_then(|e| {
            let ip = e["publicIPAddress"].as_str()?;
            let port = e["frontendPort"].as_u64()?;
            Some(if ip.contains(':') {
                format!("[{ip}]:{port}")
            } else {
                format!("{ip}:{port}")
            })
        })
        .unwrap_or_else(|| "-".into())
}

pub async fn node_list(target: &Target, pool: &str, json: bool) -> Result<(), String> {
    let enc = bluebatch_wire::percent::encode;
    let nodes = list_all(target, &format!("/pools/{}/nodes", enc(pool))).await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&nodes).map_err(|e| e.to_string())?
        );
        return Ok(());
    }
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            vec![
                text(&n["id"]),
                text(&n["state"]),
                text(&n["schedulingState"]),
                match n["isDedicated"].as_bool() {
                    Some(true) => "yes".into(),
                    Some(false) => "no".into(),
                    None => "-".into(),
                },
                ssh_address(n),
            ]
        })
        .collect();
    print!(
        "{}",
        table(&["ID", "STATE", "SCHEDULING", "DEDICATED", "SSH"], &rows)
    );
    Ok(())
}

/// The `ssh` argv for a node's remote login settings.
pub fn ssh_argv(args: &SshArgs, ip: &str, port: u64) -> Vec<String> {
    let mut argv = vec!["ssh".to_string(), "-p".into(), port.to_string()];
    if !args.strict_host_keys {
        for o in [
            "StrictHostKeyChecking=no",
            "UserKnownHostsFile=/dev/null",
            "LogLevel=ERROR",
        ] {
            argv.push("-o".into());
            argv.push(o.into());
        }
    }
    if let Some(key) = &args.identity {
        argv.extend(["-o".into(), "IdentitiesOnly=yes".into(), "-i".into()]);
        argv.push(key.display().to_string());
    }
    for o in &args.options {
        argv.push("-o".into());
        argv.push(o.clone());
    }
    argv.push(format!("{}@{ip}", args.user));
    argv.extend(args.command.iter().cloned());
    argv
}

/// One word for a POSIX shell: as is when it is plainly safe, else single-quoted.
pub fn shell_quote(s: &str) -> String {
    let safe = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "@%+=:,./_-".contains(c));
    if safe {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

pub async fn ssh(target: &Target, args: SshArgs) -> Result<(), String> {
    let enc = bluebatch_wire::percent::encode;
    let path = format!(
        "/pools/{}/nodes/{}/remoteloginsettings",
        enc(&args.pool),
        enc(&args.node)
    );
    let answer = send(
        target,
        Method::GET,
        &path,
        &format!("api-version={API_VERSION}"),
        None,
    )
    .await?;
    let v = ok_json(&answer)
        .map_err(|e| format!("remote login settings of {}/{}: {e}", args.pool, args.node))?;
    let (Some(ip), Some(port)) = (
        v["remoteLoginIPAddress"].as_str(),
        v["remoteLoginPort"].as_u64(),
    ) else {
        return Err(format!("unexpected remote login settings: {v}"));
    };
    let argv = ssh_argv(&args, ip, port);
    if args.print {
        let line: Vec<String> = argv.iter().map(|a| shell_quote(a)).collect();
        println!("{}", line.join(" "));
        return Ok(());
    }
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new(&argv[0]).args(&argv[1..]).exec();
    Err(format!("running ssh: {err}"))
}

const PYTHON: &str = r#"import os
from azure.batch import BatchClient
from azure.core.credentials import AzureNamedKeyCredential

client = BatchClient(
    os.environ["AZURE_BATCH_ENDPOINT"],
    AzureNamedKeyCredential(os.environ["AZURE_BATCH_ACCOUNT"], os.environ["AZURE_BATCH_ACCESS_KEY"]),
)
for pool in client.list_pools():
    print(pool.id, pool.state, pool.current_dedicated_nodes)
"#;

pub async fn env(target: &Target, args: EnvArgs) -> Result<(), String> {
    if args.python {
        print!("{PYTHON}");
        return Ok(());
    }
    let key = key_text(target)?;
    // Check that the server answers and takes the key, so what is printed works.
    let answer = send(target, Method::GET, "/_bluebatch/clock", "", None).await?;
    ok_json(&answer).map_err(|e| format!("{}: {e}", target.url))?;
    let endpoint = target.url.trim_end_matches('/');
    println!(
        "export AZURE_BATCH_ACCOUNT={}",
        shell_quote(target.account())
    );
    println!("export AZURE_BATCH_ENDPOINT={}", shell_quote(endpoint));
    println!("export AZURE_BATCH_ACCESS_KEY={}", shell_quote(&key));
    println!("# eval \"$(bluebatch env)\" sets these; then, from Python (azure-batch 15.x):");
    for line in PYTHON.lines() {
        println!("{}", format!("#   {line}").trim_end());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("alice@127.0.0.1"), "alice@127.0.0.1");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn tables_align() {
        let t = table(&["ID", "STATE"], &[vec!["a-long-id".into(), "idle".into()]]);
        assert_eq!(t, "ID         STATE\na-long-id  idle\n");
    }
}
