//! `bluebatch serve`: the Batch API and the nodes' SSH endpoints in one process.

use crate::fabric::SshFabric;
use bluebatch_core::ServiceClock;
use bluebatch_node::{SshConfig, SshNodes};
use bluebatch_service::{Config, Service};
use bluebatch_store::{Backend, MemBackend, SqliteBackend};
use bluebatch_wire::{Accounts, App, DEV_ACCOUNT, DEV_KEY, WireConfig};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Address to listen on for the Batch API.
    #[arg(long, default_value = "127.0.0.1", env = "BLUEBATCH_HOST")]
    host: IpAddr,
    /// Port for the Batch API (0 picks a free one).
    #[arg(long, default_value_t = 8521, env = "BLUEBATCH_PORT")]
    port: u16,
    /// Directory for the durable state (state.db) and the nodes' files (host keys, homes).
    #[arg(long, default_value = "bluebatch-data", env = "BLUEBATCH_DATA_DIR")]
    data_dir: PathBuf,
    /// Keep everything in memory (nothing survives a restart).
    #[arg(long)]
    in_memory: bool,
    /// Where the state lives: the embedded SQLite file in --data-dir (default), or a
    /// PostgreSQL database shared by any number of replicas, postgres://[USER@]HOST[:PORT]/DB
    /// [?sslmode=disable|prefer|require|verify-ca|verify-full&sslrootcert=CA.pem]. The password
    /// comes from --store-password-file, else PGPASSWORD, else PGPASSFILE (or ~/.pgpass), never
    /// from the URL. Needs --nodes agents.
    #[arg(long, env = "BLUEBATCH_STORE", value_name = "URL")]
    store: Option<String>,
    /// File holding the PostgreSQL password (its first line).
    #[arg(long, value_name = "FILE")]
    store_password_file: Option<PathBuf>,
    /// Connections to PostgreSQL this replica keeps open at most.
    #[arg(long, default_value_t = 16, value_name = "N", value_parser = clap::value_parser!(u32).range(2..=1000))]
    store_connections: u32,
    /// With --store postgres://…: make the database's accounts exactly this replica's (its
    /// --accounts-file, and the development account unless --no-dev-account), replacing stored
    /// keys (a key rotation) and removing accounts not named; every running replica follows.
    /// Without it, the file and the development account only add accounts the database lacks.
    #[arg(long, requires = "store")]
    replace_stored_accounts: bool,
    /// This replica's name in the database's leases (default: host name, pid and a random
    /// suffix).
    #[arg(long, value_name = "NAME")]
    replica_id: Option<String>,
    /// JSON file of accounts: {"accounts":[{"name":"myaccount","keys":["<base64>", …]}]}.
    /// Keys never go on the command line. Also read from BLUEBATCH_ACCOUNTS as name:key,name:key.
    /// An optional "bearer" section configures bearer tokens (see bluebatch_wire::bearer).
    #[arg(long, env = "BLUEBATCH_ACCOUNTS_FILE")]
    accounts_file: Option<PathBuf>,
    /// JSON file of pools and node users to create at start-up (see README, "Seed file").
    #[arg(long, env = "BLUEBATCH_SEED")]
    seed: Option<PathBuf>,
    /// Do not create the well-known development account.
    #[arg(long)]
    no_dev_account: bool,
    /// Accept any api-version (like Azurite's --skipApiVersionCheck).
    #[arg(long)]
    accept_any_api_version: bool,
    /// Milliseconds each node state change takes (creating → starting → idle, reboot, …).
    #[arg(long, default_value_t = 100)]
    node_step_ms: u64,
    /// Largest accepted request body, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    max_body_bytes: usize,
    /// Nodes per pool at most.
    #[arg(long, default_value_t = 10_000)]
    max_nodes_per_pool: u32,
    /// Address the nodes' SSH endpoints listen on.
    #[arg(long, default_value = "127.0.0.1")]
    ssh_bind: IpAddr,
    /// Address Get Remote Login Settings reports (defaults to --ssh-bind).
    #[arg(long)]
    remote_login_ip: Option<IpAddr>,
    /// Port range of the nodes' SSH endpoints, FIRST-LAST (kept outside the kernel's ephemeral
    /// range 32768–60999 by default).
    #[arg(long, default_value = "20000-29999")]
    ssh_ports: String,
    /// Numbers for the nodes' SSH sessions when bluebatch runs as root, FIRST-LAST: a uid for
    /// each user of each node and a gid for each node, kept across restarts, with no passwd or
    /// group entry. Not root: sessions run as bluebatch's own user.
    #[arg(
        long,
        default_value = "2000000000-2000099999",
        value_name = "FIRST-LAST"
    )]
    session_uids: String,
    /// Supplementary gid that admin (isAdmin) users' sessions get (a bare number, no group
    /// entry); default: the first of --session-uids, which no node or user is given.
    #[arg(long, value_name = "GID")]
    admin_gid: Option<u32>,
    /// Failed SSH logins from one source address to one node, within --failed-login-window,
    /// after which that node refuses every login from that address (even with the right
    /// password or key) for --failed-login-window. 0 turns the lockout off.
    #[arg(long, default_value_t = 10, value_name = "N")]
    max_failed_logins: u32,
    /// How long failed SSH logins are counted, and how long a locked-out source stays refused:
    /// a number with a unit (500ms, 60s, 5m, 1h; no unit = seconds).
    #[arg(long, default_value = "60s", value_parser = parse_window, value_name = "DURATION")]
    failed_login_window: Duration,
    /// A node closes an SSH connection that has not logged in within this time (as OpenSSH's
    /// LoginGraceTime), counted from the TCP accept: 500ms, 30s, 2m, … (no unit = seconds).
    #[arg(long, default_value = "30s", value_parser = parse_window, value_name = "DURATION")]
    ssh_login_grace_time: Duration,
    /// SSH connections not logged in yet that a node holds at once, as OpenSSH's MaxStartups
    /// START:RATE:FULL: past START a new one is closed at once (before the banner) with a
    /// probability rising from RATE % to 100 % at FULL; a plain N closes every one past N.
    #[arg(long, default_value = "32:30:128", value_name = "START:RATE:FULL")]
    ssh_max_startups: bluebatch_node::MaxStartups,
    /// SSH connections not logged in yet from one source address (IPv6: one /64) to one node
    /// at once, as OpenSSH's PerSourceMaxStartups: more from that address are closed at once,
    /// other addresses still get in. "none" turns the cap off.
    #[arg(long, default_value = "10", value_parser = parse_per_source, value_name = "N|none")]
    ssh_per_source_max_startups: PerSource,
    /// Logged-in SSH connections per node at once (each with up to 10 channels, as OpenSSH's
    /// MaxSessions); a login past it is refused with "too many sessions on this node".
    #[arg(long, default_value_t = 32, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    ssh_max_sessions: u32,
    /// SSH connections not logged in yet across every node of this server together (each holds
    /// two descriptors); more are closed at once, before the banner.
    #[arg(long, default_value_t = 2048, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    ssh_max_startups_total: u32,
    /// SSH connections not logged in yet from one source address (IPv6: one /64) across every
    /// node of this server; more from that address are closed at once. "none" turns it off.
    #[arg(long, default_value = "64", value_parser = parse_per_source, value_name = "N|none")]
    ssh_per_source_max_startups_total: PerSource,
    /// HTTP(S) connections open at once, per listener. At the bound a new connection closes the
    /// one that has used the largest share of its deadline among those waiting for a request
    /// head, idle, or stalled; connections working on a request are kept.
    #[arg(long, default_value_t = 4096, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: u64,
    /// HTTP(S) connections open at once from one source address, per listener; more from that
    /// address are closed at once while other addresses are served. "none" turns the cap off.
    #[arg(long, default_value = "256", value_parser = parse_http_per_source, value_name = "N|none")]
    max_connections_per_source: usize,
    /// An HTTP(S) connection that has not sent a complete request head within this time (from
    /// the accept, the TLS handshake included, or from the first byte after an idle time) is
    /// closed: 500ms, 15s, 1m, … (no unit = seconds).
    #[arg(long, default_value = "15s", value_parser = parse_window, value_name = "DURATION")]
    http_head_timeout: Duration,
    /// An idle keep-alive HTTP(S) connection (no request since the last answer) is closed after
    /// this time.
    #[arg(long, default_value = "120s", value_parser = parse_window, value_name = "DURATION")]
    http_idle_timeout: Duration,
    /// A request body that makes no progress for this time fails with 400 InvalidRequestBody
    /// (and the connection closes); a connection whose client does not read the answer for
    /// this time is closed.
    #[arg(long, default_value = "30s", value_parser = parse_window, value_name = "DURATION")]
    http_stall_timeout: Duration,
    /// Largest request head (request line and header fields), in bytes; a larger one is
    /// answered 400 InvalidHeaderValue.
    #[arg(long, default_value_t = 32 << 10, value_name = "BYTES", value_parser = clap::value_parser!(u64).range(1024..=(1 << 20)))]
    max_header_bytes: u64,
    /// Header fields in one request at most; more are answered 400 InvalidHeaderValue.
    #[arg(long, default_value_t = 100, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=10_000))]
    max_headers: u64,
    #[command(flatten)]
    tls: crate::tls::TlsArgs,
    /// Where pools' nodes come from: `embedded` (SSH endpoints in this process), `agents`
    /// (hosts joined with `bluebatch agent`; see `bluebatch join-token create`) or `sandbox` (a
    /// small Linux machine per Linux node, made by this server: root on Linux only, with
    /// openssh-server, sudo, iproute2, util-linux, passwd and procps). A pool's metadata item
    /// `bluebatch.nodes` wins over this for that pool (`sandbox` only with --nodes sandbox).
    #[arg(long, default_value = "embedded", env = "BLUEBATCH_NODES", value_parser = parse_nodes, value_name = "embedded|agents|sandbox")]
    nodes: bluebatch_protocol::NodeSource,
    /// How long a joined host may go without polling before its nodes go `unknown` (they come
    /// back when it polls again): 30s, 2m, … (no unit = seconds).
    #[arg(long, default_value = "60s", env = "BLUEBATCH_AGENT_GRACE", value_parser = parse_window, value_name = "DURATION")]
    agent_grace: Duration,
    /// With --nodes sandbox: the sshd every sandboxed node runs (under /usr: a node sees this
    /// host's /usr only).
    #[arg(long, default_value = "/usr/sbin/sshd", value_name = "PATH")]
    sandbox_sshd: PathBuf,
    /// With --nodes sandbox: `UsePAM` of the nodes' sshd (an account's expiry is written for
    /// it: pam_unix refuses from the expiry day, sshd without PAM from the day after).
    #[arg(long, default_value = "yes", value_parser = ["yes", "no"], value_name = "yes|no")]
    sandbox_use_pam: String,
}

/// `--nodes`: embedded, agents or sandbox.
fn parse_nodes(s: &str) -> Result<bluebatch_protocol::NodeSource, String> {
    bluebatch_protocol::NodeSource::parse(s.trim())
        .ok_or_else(|| format!("{s:?}: one of embedded, agents, sandbox"))
}

/// `--max-connections-per-source`: a count, or `none` (0: no cap).
fn parse_http_per_source(s: &str) -> Result<usize, String> {
    match s.trim() {
        "none" => Ok(0),
        n => match n.parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("{s:?}: a number of at least 1, or none")),
        },
    }
}

/// `--ssh-per-source-max-startups`: a count, or no cap.
#[derive(Clone, Copy, Debug)]
struct PerSource(Option<usize>);

fn parse_per_source(s: &str) -> Result<PerSource, String> {
    match s.trim() {
        "none" => Ok(PerSource(None)),
        n => match n.parse::<usize>() {
            Ok(n) if n > 0 => Ok(PerSource(Some(n))),
            _ => Err(format!("{s:?}: a number of at least 1, or none")),
        },
    }
}

/// `500ms`, `60s`, `5m`, `1h` or a bare number of seconds; more than zero.
fn parse_window(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(digits);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: a number with a unit such as 60s, 5m, 1h"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => return Err(format!("{s:?}: the unit is one of ms, s, m, h")),
    };
    if d.is_zero() {
        return Err("the window must be longer than zero".into());
    }
    Ok(d)
}

fn load_accounts(args: &ServeArgs) -> Result<Accounts, String> {
    let accounts = if args.no_dev_account {
        Accounts::default()
    } else {
        Accounts::dev()
    };
    if let Some(path) = &args.accounts_file {
        #[derive(serde::Deserialize)]
        struct File {
            accounts: Vec<Entry>,
        }
        #[derive(serde::Deserialize)]
        struct Entry {
            name: String,
            keys: Vec<String>,
        }
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let file: File =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        for a in file.accounts {
            accounts.add(&a.name, &a.keys)?;
        }
    }
    if let Ok(list) = std::env::var("BLUEBATCH_ACCOUNTS") {
        for item in list.split(',').filter(|s| !s.trim().is_empty()) {
            let (name, key) = item
                .split_once(':')
                .ok_or("BLUEBATCH_ACCOUNTS is name:key,name:key")?;
            accounts.add(name.trim(), &[key.trim().to_string()])?;
        }
    }
    if accounts.names().is_empty() {
        return Err("no accounts: drop --no-dev-account or give --accounts-file".into());
    }
    Ok(accounts)
}

/// `--ssh-ports FIRST-LAST` (of `serve` and of `agent`): a range of ports, none of them 0.
pub(crate) fn parse_ports(s: &str) -> Result<std::ops::RangeInclusive<u16>, String> {
    let (a, b) = s.split_once('-').ok_or("--ssh-ports is FIRST-LAST")?;
    let (a, b): (u16, u16) = (
        a.trim()
            .parse()
            .map_err(|_| "--ssh-ports: bad first port")?,
        b.trim().parse().map_err(|_| "--ssh-ports: bad last port")?,
    );
    if a == 0 || a > b {
        return Err("--ssh-ports: FIRST must be 1..=LAST".into());
    }
    Ok(a..=b)
}

fn parse_uids(s: &str) -> Result<std::ops::RangeInclusive<u32>, String> {
    let (a, b) = s.split_once('-').ok_or("--session-uids is FIRST-LAST")?;
    let bad = |_| "--session-uids: FIRST and LAST are numbers";
    let (a, b): (u32, u32) = (
        a.trim().parse().map_err(bad)?,
        b.trim().parse().map_err(bad)?,
    );
    if a == 0 || a > b || b == u32::MAX {
        return Err("--session-uids: FIRST must be 1..=LAST, LAST below 4294967295".into());
    }
    Ok(a..=b)
}

pub async fn run(args: ServeArgs) -> Result<(), String> {
    let started = std::time::Instant::now();
    let sandbox = args.nodes == bluebatch_protocol::NodeSource::Sandbox;
    if sandbox {
        // Before anything is made (not even the data directory): what is missing, exit code 2.
        let opts = crate::sandbox::preflight::PreflightOpts {
            sshd: args.sandbox_sshd.clone(),
        };
        if let Err(e) = crate::sandbox::preflight::check(&opts) {
            eprintln!("bluebatch: {e}");
            std::process::exit(2);
        }
        let dir = if args.in_memory {
            std::env::temp_dir()
        } else {
            args.data_dir.clone()
        };
        if let Err(e) = crate::sandbox::preflight::check_data_dir(&dir) {
            eprintln!("bluebatch: {e}");
            std::process::exit(2);
        }
    }
    let accounts = load_accounts(&args)?;
    let bearer = bluebatch_wire::bearer::Bearer::load(args.accounts_file.as_deref(), &accounts)?;
    // In memory, the nodes' files still need a place: a directory removed at exit.
    let temp;
    // One server per data directory: the lock is held until this process ends.
    let _dir_lock;
    let data_dir = if args.in_memory {
        temp = tempfile::tempdir().map_err(|e| e.to_string())?;
        crate::datadir::prepare(temp.path())?;
        temp.path().to_path_buf()
    } else {
        crate::datadir::prepare(&args.data_dir)?;
        _dir_lock = crate::datadir::lock(&args.data_dir)?;
        crate::datadir::protect_store(&args.data_dir)?;
        args.data_dir.clone()
    };
    let shared = shared_store(&args)?;
    let backend = match (&shared, args.in_memory) {
        (Some(_), _) => None,
        (None, true) => Some(Ok(Box::new(MemBackend::new()) as Box<dyn Backend>)),
        (None, false) => Some(
            SqliteBackend::open(&data_dir.join("state.db"))
                .map(|b| Box::new(b) as Box<dyn Backend>),
        ),
    }
    .transpose()
    .map_err(|e| e.to_string())?;
    if !args.in_memory && shared.is_none() {
        crate::datadir::protect_store(&data_dir)?;
    }

    let clock = Arc::new(ServiceClock::new());
    let ssh = SshNodes::new(
        SshConfig {
            bind_ip: args.ssh_bind,
            port_range: parse_ports(&args.ssh_ports)?,
            data_dir: data_dir.join("nodes"),
            max_failed_logins: args.max_failed_logins,
            failed_login_window: args.failed_login_window,
            login_grace: args.ssh_login_grace_time,
            max_startups: args.ssh_max_startups,
            per_source_max_startups: args.ssh_per_source_max_startups.0,
            max_sessions_per_node: args.ssh_max_sessions as usize,
            max_startups_total: args.ssh_max_startups_total as usize,
            per_source_max_startups_total: args.ssh_per_source_max_startups_total.0,
            session_uids: parse_uids(&args.session_uids)?,
            admin_gid: args.admin_gid,
            ..SshConfig::default()
        },
        clock.clone(),
    );
    let config = Config {
        max_nodes_per_pool: args.max_nodes_per_pool,
        node_step: Duration::from_millis(args.node_step_ms),
        remote_login_ip: args.remote_login_ip.unwrap_or(args.ssh_bind).to_string(),
        default_nodes: args.nodes,
        agent_grace: args.agent_grace,
        sandbox_nodes: sandbox,
        ..Config::default()
    };
    let fabric = Arc::new(SshFabric(ssh.clone()));
    let (service, accounts) = match (backend, &shared) {
        (Some(backend), _) => (
            Service::start(backend, clock, fabric, config).await?,
            accounts,
        ),
        (None, Some((opts, _))) => {
            let store = bluebatch_pgstore::PgStore::connect(opts, args.store_connections as usize)
                .await
                .map_err(|e| format!("store {opts}: {e}"))?;
            let service =
                Service::start_shared(Arc::new(store), replica_id(&args), clock, fabric, config)
                    .await
                    .map_err(|e| format!("store {opts}: {e}"))?;
            // The accounts live in the database; this replica's file or dev account seed them.
            let all = Accounts::default();
            for (name, keys) in service
                .seed_accounts(accounts.entries(), args.replace_stored_accounts)
                .await
                .map_err(|e| format!("store {opts}: seeding the accounts: {e}"))?
            {
                all.add(&name, &keys)?;
            }
            (service, all)
        }
        (None, None) => unreachable!("a store is chosen above"),
    };
    if let Some(seed) = &args.seed {
        crate::seed::apply(&service, seed, &|a| accounts.keys(a).is_some()).await?;
    }
    // HTTPS material first: the control endpoints hand out its CA fingerprint.
    let tls = crate::tls::prepare(&args.tls, &data_dir)?;
    let app_service_shutdown = service.clone();
    if let Some(mut changed) = service.accounts_changed() {
        // Accounts another replica's file added reach this one without a restart.
        let (svc, live) = (service.clone(), accounts.clone());
        tokio::spawn(async move {
            while changed.changed().await.is_ok() {
                for refused in live.replace(&svc.stored_accounts()) {
                    tracing::warn!("an account in the store is not usable: {refused}");
                }
            }
        });
    }
    let app = Arc::new(App {
        service,
        config: WireConfig {
            ca_fingerprint: tls.as_ref().map(|t| t.ca_fingerprint.clone()),
            accounts,
            accept_any_api_version: args.accept_any_api_version,
            max_body_bytes: args.max_body_bytes,
            bearer: bearer.map(Arc::new),
            limits: bluebatch_wire::HttpLimits {
                max_connections: args.max_connections as usize,
                max_connections_per_source: args.max_connections_per_source,
                head_timeout: args.http_head_timeout,
                idle_timeout: args.http_idle_timeout,
                stall_timeout: args.http_stall_timeout,
                max_head_bytes: args.max_header_bytes as usize,
                max_headers: args.max_headers as usize,
            },
            ..WireConfig::default()
        },
    });
    let listener = tokio::net::TcpListener::bind((args.host, args.port))
        .await
        .map_err(|e| format!("listening on {}:{}: {e}", args.host, args.port))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    println!("bluebatch listening on http://{addr}");
    println!("console: http://{addr}{}/", bluebatch_wire::console::PREFIX);
    if !args.no_dev_account {
        println!("account name: {DEV_ACCOUNT}");
        println!("account key:  {DEV_KEY}");
        // Signs the development account in once, within ten minutes, without typing the key.
        println!(
            "console sign-in (once, 10 min): http://{addr}{}",
            bluebatch_wire::console::one_time_sign_in_path(DEV_ACCOUNT)
        );
    }
    if let Some((_, shown)) = &shared {
        println!("store: {shown}");
    } else if args.in_memory {
        println!("store: in memory (nothing survives a restart)");
    } else {
        println!("store: {}", data_dir.join("state.db").display());
    }
    if let Some(b) = &app.config.bearer {
        println!("bearer tokens: {}", b.describe());
    }
    print_nodes_banner(&args, addr);
    let manager = if sandbox {
        let exe = std::env::current_exe().map_err(|e| format!("the bluebatch binary: {e}"))?;
        let opts = crate::sandbox::manager::Options {
            dir: data_dir.join("sandbox"),
            exe,
            sshd: args.sandbox_sshd.clone(),
            use_pam: args.sandbox_use_pam == "yes",
            join_within: crate::sandbox::manager::JOIN_WITHIN,
        };
        Some(crate::sandbox::manager::Manager::start(app.clone(), opts).await?)
    } else {
        None
    };
    let (stop_https, stopped) = tokio::sync::watch::channel(());
    let https = crate::tls::start(&args.tls, tls, args.host, &app, stopped).await?;
    tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "ready");
    bluebatch_wire::serve(listener, app, async move {
        shutdown_signal().await;
        drop(stop_https);
        // Open console tabs' event streams end, so they do not hold the shutdown.
        bluebatch_wire::console::events::close_all();
    })
    .await
    .map_err(|e| e.to_string())?;
    if let Some(https) = https {
        https
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
    }
    if let Some(m) = manager {
        // Every machine stops (their directories stay for the next start).
        m.shutdown().await;
    }
    // Another replica takes the background work over at once.
    app_service_shutdown.shutdown().await;
    ssh.shutdown().await;
    Ok(())
}

/// `--store`: `None` for the embedded SQLite store, else the PostgreSQL options and how the
/// banner shows them (never with a password).
fn shared_store(
    args: &ServeArgs,
) -> Result<Option<(bluebatch_pgstore::PgOptions, String)>, String> {
    let Some(url) = args.store.as_deref().map(str::trim) else {
        return Ok(None);
    };
    if url.is_empty() || url == "sqlite" {
        return Ok(None);
    }
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(format!(
            "--store: {:?} is not a PostgreSQL URL (postgres://[USER@]HOST[:PORT]/DB); leave it out for the embedded store",
            url.chars().take(40).collect::<String>()
        ));
    }
    if args.in_memory {
        return Err("--in-memory and --store postgres://… exclude each other".into());
    }
    if args.nodes != bluebatch_protocol::NodeSource::Agents {
        return Err(
            "--store postgres://… needs --nodes agents: embedded nodes live inside one process, \
             while replicas share hosts joined with `bluebatch agent` (or `bluebatch agent \
             --simulate N` for light simulated nodes)"
                .into(),
        );
    }
    let opts = bluebatch_pgstore::PgOptions::parse(url, args.store_password_file.as_deref())?;
    let shown = format!("{opts} (PostgreSQL, shared by every replica)");
    Ok(Some((opts, shown)))
}

/// This replica's name in leases: given, or host name, pid and a random suffix.
fn replica_id(args: &ServeArgs) -> String {
    if let Some(id) = &args.replica_id {
        return id.clone();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "replica".into());
    let suffix: u32 = rand::random();
    format!("{host}-{}-{suffix:08x}", std::process::id())
}

/// Where pools' nodes come from, and with agents how hosts join.
fn print_nodes_banner(args: &ServeArgs, addr: std::net::SocketAddr) {
    use bluebatch_protocol::NodeSource;
    let (what, detail) = match args.nodes {
        NodeSource::Embedded => (
            "embedded",
            format!(
                "SSH endpoints in this process on {} ports {}",
                args.ssh_bind, args.ssh_ports
            ),
        ),
        NodeSource::Agents => ("agents", "hosts joined with `bluebatch agent`".to_string()),
        NodeSource::Sandbox => (
            "sandbox",
            "a small Linux machine per node: own network, mount and PID namespaces, a real \
             sshd on port 22 of 198.19.x.x; a node admin is root on this host"
                .to_string(),
        ),
    };
    let choices = if args.nodes == NodeSource::Sandbox {
        "embedded|agents|sandbox"
    } else {
        "embedded|agents (sandbox needs --nodes sandbox)"
    };
    println!(
        "nodes: {what} ({detail}); a pool's metadata item bluebatch.nodes={choices} chooses for \
         that pool"
    );
    if args.nodes == NodeSource::Sandbox {
        println!(
            "sandbox: nodes' sshd {} (UsePAM {}), their files in {}; Windows pools get embedded \
             nodes",
            args.sandbox_sshd.display(),
            args.sandbox_use_pam,
            if args.in_memory {
                "a temporary directory".to_string()
            } else {
                args.data_dir.join("sandbox").display().to_string()
            }
        );
    }
    if args.nodes == NodeSource::Agents {
        println!(
            "agents: create a join token with `bluebatch join-token create --url http://{addr} \
             [--pool POOL] > token`, then on the host `bluebatch agent --server URL \
             --join-token-file token`; a host silent for {}s has its nodes go unknown",
            args.agent_grace.as_secs_f64()
        );
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}
