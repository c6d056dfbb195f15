//! `bluebatch agent`: makes this host compute-node capacity of a bluebatch service.
//!
//! First start: the join token (`--join-token-file`, or `BLUEBATCH_JOIN_TOKEN`; never the
//! command line) is exchanged at the service for a node credential, kept in the state directory
//! with the host id and the pinned CA fingerprint; later starts reuse them (no token) and say
//! hello. Then, forever: long-poll the host's whole desired state, enforce it through the
//! provider, acknowledge what is enforced. A lost connection, a restarted service or a restarted
//! agent all end the same way: the next answer is the whole stored state, applied again.

mod client;
mod linux;
mod pin;
mod provider;
mod sandbox;
mod simulate;
mod state;

use bluebatch_core::model::NodeState;
use bluebatch_protocol::{
    AckRequest, DesiredState, HostReport, JoinRequest, MAX_WAIT_SECONDS, NodeAck, ProviderKind,
};
use clap::{Args, Subcommand};
use client::{CallError, Client};
use provider::Provider;
use state::{Identity, StateDir};
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The poll's wait, before its ±20 % jitter.
const POLL_WAIT: Duration = Duration::from_secs(30);
/// Acknowledgements per request (the service takes bodies up to 1 MiB).
const ACKS_PER_REQUEST: usize = 2000;

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AgentArgs {
    #[command(subcommand)]
    cmd: Option<AgentCmd>,
    /// URL of the service (any replica): `http://…`, or `https://…` with the CA fingerprint
    /// pinned at join.
    #[arg(long, env = "BLUEBATCH_AGENT_SERVER")]
    server: Option<String>,
    /// File holding the join token on its first line and the service's CA fingerprint
    /// (`sha256:…`, for HTTPS) on its second: the output of `bluebatch join-token create`.
    /// Needed at the first start only. BLUEBATCH_JOIN_TOKEN may hold the same text instead.
    #[arg(long)]
    join_token_file: Option<PathBuf>,
    /// Where the agent keeps its identity (host id, node credential, pin) and what it applied.
    #[arg(
        long,
        default_value = "/var/lib/bluebatch-agent",
        env = "BLUEBATCH_AGENT_STATE_DIR"
    )]
    state_dir: PathBuf,
    /// The port of this host's sshd, reported for remote login (default: `port` of `sshd -T`,
    /// else 22).
    #[arg(long)]
    ssh_port: Option<u16>,
    /// The address the node reports as `ipAddress` and for remote login (default: the local
    /// address of the agent's connection to the service).
    #[arg(long)]
    advertise_address: Option<IpAddr>,
    /// The host's sshd configuration, read with `sshd -T -f FILE` for its port and whether it
    /// uses PAM (which decides the day written as an account's expiry).
    #[arg(long, default_value = "/etc/ssh/sshd_config")]
    sshd_config: PathBuf,
    /// An existing group whose membership makes an account an administrator (`isAdmin`),
    /// instead of the managed `bluebatch-admin` group and its sudoers drop-in.
    #[arg(long)]
    admin_group: Option<String>,
    /// Serve N simulated SSH nodes (the embedded nodes of `bluebatch serve`) from this process
    /// instead of real accounts on this host, for Linux and Windows pools alike (1..=10000).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10000))]
    simulate: Option<u32>,
    /// With --simulate: the ports the simulated nodes take, one each (FIRST-LAST).
    #[arg(long, default_value = "20000-29999")]
    ssh_ports: String,
    /// With --simulate: the address the simulated nodes listen on (default: the advertised
    /// address).
    #[arg(long)]
    ssh_bind: Option<IpAddr>,
    /// The agent of a sandboxed node of `bluebatch serve --nodes sandbox` (started there by the
    /// node's init, never by hand): the linux provider, reported as provider `sandbox`, whose
    /// reboot and reimage restart the node's processes. Needs --advertise-address.
    #[arg(
        long,
        hide = true,
        conflicts_with = "simulate",
        requires = "advertise_address"
    )]
    sandbox: bool,
}

#[derive(Subcommand)]
enum AgentCmd {
    /// Remove every account this agent created on the host, its managed groups and the sudoers
    /// drop-in (or a simulated host's nodes), and forget the host's identity. Accounts the
    /// agent did not create are never touched. (Also run `bluebatch host revoke HOST` at the
    /// service.)
    Uninstall(UninstallArgs),
}

#[derive(Args)]
struct UninstallArgs {
    #[arg(
        long,
        default_value = "/var/lib/bluebatch-agent",
        env = "BLUEBATCH_AGENT_STATE_DIR"
    )]
    state_dir: PathBuf,
}

/// The join token and the pin, from the file or the environment.
struct JoinSecret {
    token: String,
    pin: Option<String>,
}

/// The environment variable that may hold the join token (never the command line).
const JOIN_TOKEN_ENV: &str = "BLUEBATCH_JOIN_TOKEN";

/// `BLUEBATCH_JOIN_TOKEN` as this process started with it, once [`take_join_token_env`] took it
/// out of the environment.
static JOIN_TOKEN_FROM_ENV: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();

/// Takes `BLUEBATCH_JOIN_TOKEN` out of this process's environment (keeping its value for the
/// agent), so that no child process inherits it: not the shadow tools, not `sshd -T`, not the
/// sessions of simulated nodes. Call at the very start of `main`, before any other thread exists.
pub fn take_join_token_env() {
    let value = std::env::var(JOIN_TOKEN_ENV).ok();
    if std::env::var_os(JOIN_TOKEN_ENV).is_some() {
        // SAFETY: called first thing in `main`, before the tokio runtime or any other thread
        // exists: nothing reads or writes the environment meanwhile.
        unsafe { std::env::remove_var(JOIN_TOKEN_ENV) };
    }
    let _ = JOIN_TOKEN_FROM_ENV.set(value);
}

fn read_join_secret(file: Option<&PathBuf>) -> Result<JoinSecret, String> {
    let text = match file {
        Some(path) => {
            use std::os::unix::fs::PermissionsExt;
            let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(file = %path.display(),
                    "the join-token file is readable by others than its owner (chmod 600 it)");
            }
            std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?
        }
        None => JOIN_TOKEN_FROM_ENV
            .get()
            .cloned()
            .unwrap_or_else(|| std::env::var(JOIN_TOKEN_ENV).ok())
            .ok_or_else(|| {
                "this host has not joined yet: give the join token with --join-token-file FILE \
                 (or BLUEBATCH_JOIN_TOKEN)"
                    .to_string()
            })?,
    };
    parse_join_secret(&text)
}

/// The text of a join-token file: the token (`ID.SECRET`) on the first line, the CA fingerprint
/// (or `-`: no HTTPS) on the second, if any.
fn parse_join_secret(text: &str) -> Result<JoinSecret, String> {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let token = lines.next().ok_or("the join token is empty")?.to_string();
    if !token.contains('.') || token.chars().any(char::is_whitespace) {
        return Err("the join token is not ID.SECRET (the first line `bluebatch join-token create` printed)".into());
    }
    let pin = match lines.next() {
        None | Some("-") => None,
        Some(line) => Some(pin::parse_fingerprint(line)?),
    };
    Ok(JoinSecret { token, pin })
}

fn hostname() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

fn jittered(base: Duration) -> Duration {
    let f: f64 = rand::random_range(0.8..1.2);
    base.mul_f64(f)
}

/// Exponential backoff from 1 s to 30 s, jittered.
struct Backoff(u32);

impl Backoff {
    fn next(&mut self) -> Duration {
        let secs = (1u64 << self.0.min(5)).min(30);
        self.0 += 1;
        jittered(Duration::from_secs(secs))
    }
    fn reset(&mut self) {
        self.0 = 0;
    }
}

pub fn run(args: AgentArgs, rt: &tokio::runtime::Runtime) -> Result<(), String> {
    if let Some(AgentCmd::Uninstall(u)) = args.cmd {
        return rt.block_on(uninstall(u));
    }
    if args.sandbox {
        // Before anything is made: outside a sandboxed node, "every process" is the host's.
        sandbox::check_inside(std::path::Path::new("/proc"))?;
    }
    let server = args
        .server
        .clone()
        .ok_or("--server URL is required (the service the host joins)")?;
    let mode = if args.simulate.is_some() {
        0o711
    } else {
        0o700
    };
    let state = StateDir::open(&args.state_dir, Some(mode))?;
    let _lock = state.lock()?;
    match args.simulate {
        Some(n) => rt.block_on(async {
            let bind_from = |addr: IpAddr| args.ssh_bind.unwrap_or(addr);
            let ports = crate::serve::parse_ports(&args.ssh_ports)?;
            let setup = Setup::new(&args, &server, &state, ProviderKind::Simulate).await?;
            let provider = simulate::Simulate::new(n, bind_from(setup.address), ports, &state);
            setup.run(provider).await
        }),
        None => rt.block_on(async {
            let provider = linux::open(&args, &state).await?;
            let kind = if args.sandbox {
                ProviderKind::Sandbox
            } else {
                ProviderKind::Linux
            };
            let setup = Setup::new(&args, &server, &state, kind).await?;
            setup.run(provider).await
        }),
    }
}

/// What the agent knows before it speaks to the service.
struct Setup {
    client: Client,
    state: StateDir,
    stored: Option<Identity>,
    secret: Option<JoinSecret>,
    address: IpAddr,
    advertised: bool,
    ssh_port_flag: Option<u16>,
}

impl Setup {
    async fn new(
        args: &AgentArgs,
        server: &str,
        state: &StateDir,
        kind: ProviderKind,
    ) -> Result<Self, String> {
        let stored = state.identity()?;
        if let Some(id) = &stored
            && id.provider != kind
        {
            return Err(format!(
                "{} joined as a {} host; run the agent {} or use another --state-dir",
                state.dir.display(),
                provider_name(id.provider),
                match id.provider {
                    ProviderKind::Simulate => "with --simulate N",
                    ProviderKind::Linux => "without --simulate or --sandbox",
                    ProviderKind::Sandbox => "with --sandbox",
                }
            ));
        }
        let secret = match &stored {
            Some(id) => {
                if args.join_token_file.is_some() {
                    tracing::info!(host = %id.host_id,
                        "already joined: the join token is not needed and not used");
                }
                None
            }
            None => Some(read_join_secret(args.join_token_file.as_ref())?),
        };
        let pin = stored
            .as_ref()
            .and_then(|id| id.pin.clone())
            .or_else(|| secret.as_ref().and_then(|s| s.pin.clone()));
        let client = Client::new(server, pin.as_deref())?;
        let (address, advertised) = match args.advertise_address {
            Some(a) => (a, true),
            None => {
                let mut backoff = Backoff(0);
                loop {
                    match client.local_address().await {
                        Ok(a) => break (a, false),
                        Err(e) => {
                            let pause = backoff.next();
                            tracing::warn!(error = %e, retry_in = ?pause,
                                "cannot reach the service to learn this host's address");
                            tokio::time::sleep(pause).await;
                        }
                    }
                }
            }
        };
        Ok(Setup {
            client,
            state: state.clone(),
            stored,
            secret,
            address,
            advertised,
            ssh_port_flag: args.ssh_port,
        })
    }

    fn report<P: Provider>(&self, provider: &P) -> HostReport {
        HostReport {
            hostname: hostname(),
            provider: provider.kind(),
            slots: provider.slots(),
            address: self.address.to_string(),
            ssh_port: self
                .ssh_port_flag
                .or(provider.ssh_port())
                .filter(|_| has_sshd(provider.kind())),
            reserved_names: provider.reserved_names(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }

    /// Joins (first start) or says hello (later starts), retrying while the service is away.
    async fn identify<P: Provider>(&mut self, provider: &P) -> Result<Identity, String> {
        let report = self.report(provider);
        let mut backoff = Backoff(0);
        if let Some(id) = self.stored.clone() {
            self.client.set_credential(&id.credential);
            loop {
                match self.client.hello(&report).await {
                    Ok(_) => {
                        tracing::info!(host = %id.host_id, account = %id.account,
                            address = %report.address, "reconnected with the stored identity");
                        return Ok(id);
                    }
                    Err(e) if e.is_auth() => return Err(refused_credential(&id, &self.state, &e)),
                    Err(CallError::Refused {
                        status,
                        code,
                        message,
                    }) if status < 500 => {
                        return Err(format!(
                            "the service refused this host: {status} {code}: {message}"
                        ));
                    }
                    Err(e) => {
                        let pause = backoff.next();
                        tracing::warn!(error = %e, retry_in = ?pause, "the service is not reachable");
                        tokio::time::sleep(pause).await;
                    }
                }
            }
        }
        let secret = self.secret.take().ok_or("no join token")?;
        let body = JoinRequest {
            token: secret.token,
            host: report,
        };
        let joined = loop {
            match self.client.join(&body).await {
                Ok(r) => break r,
                Err(CallError::Refused {
                    status,
                    code,
                    message,
                }) if status < 500 => {
                    return Err(format!(
                        "the service refused the join token: {status} {code}: {message} \
                         (create a new one with `bluebatch join-token create`)"
                    ));
                }
                Err(CallError::Tls(e)) => {
                    return Err(format!(
                        "not joining: the service's certificate does not match the CA \
                         fingerprint of the join-token file ({e})"
                    ));
                }
                Err(e) => {
                    let pause = backoff.next();
                    tracing::warn!(error = %e, retry_in = ?pause, "the service is not reachable");
                    tokio::time::sleep(pause).await;
                }
            }
        };
        let id = Identity {
            host_id: joined.host_id,
            credential: joined.credential,
            credential_expires: joined.credential_expires,
            account: joined.account,
            pin: secret.pin,
            provider: body.host.provider,
            slots: body.host.slots,
            grace_seconds: joined.grace_seconds,
        };
        self.state.save_identity(&id)?;
        self.client.set_credential(&id.credential);
        tracing::info!(host = %id.host_id, account = %id.account, address = %body.host.address,
            slots = id.slots, "joined; identity saved in the state directory");
        Ok(id)
    }

    async fn run<P: Provider>(mut self, mut provider: P) -> Result<(), String> {
        let mut id = self.identify(&provider).await?;
        let mut last_report = self.report(&provider);
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .map_err(|e| format!("SIGTERM handler: {e}"))?;
        let result = tokio::select! {
            r = self.poll_loop(&mut provider, &mut id, &mut last_report) => r,
            _ = tokio::signal::ctrl_c() => Ok(()),
            _ = terminate.recv() => Ok(()),
        };
        tracing::info!("agent stopping");
        provider.shutdown().await;
        result
    }

    async fn poll_loop<P: Provider>(
        &mut self,
        provider: &mut P,
        id: &mut Identity,
        last_report: &mut HostReport,
    ) -> Result<(), String> {
        let mut cursor: Option<String> = None;
        // The whole state of the last answer (deltas are merged into it), and whether the
        // service takes `delta=1` (an older one refuses the parameter).
        let mut held: Option<Held> = None;
        let mut take_delta = true;
        let mut acked: HashMap<String, (NodeAck, u64)> = HashMap::new();
        let mut failing = Backoff(0);
        let mut retrying = false;
        let mut lost = Backoff(0);
        let mut reconnected = false;
        loop {
            let wait = if retrying {
                failing.next()
            } else {
                jittered(POLL_WAIT)
            }
            .min(Duration::from_secs(MAX_WAIT_SECONDS));
            let ds = match self
                .client
                .desired(cursor.as_deref(), wait, take_delta)
                .await
            {
                Ok(ds) => ds,
                Err(e) if e.is_auth() => return Err(refused_credential(id, &self.state, &e)),
                Err(CallError::Refused {
                    status: 400, code, ..
                }) if take_delta && code == "UnsupportedQueryParameter" => {
                    tracing::info!("the service answers whole states only (no delta polls)");
                    take_delta = false;
                    continue;
                }
                Err(e) => {
                    let pause = lost.next();
                    tracing::warn!(error = %e, retry_in = ?pause,
                        "lost the service; will reconnect and converge");
                    cursor = None;
                    acked.clear();
                    reconnected = true;
                    tokio::time::sleep(pause).await;
                    continue;
                }
            };
            lost.reset();
            if let Some(cred) = &ds.credential {
                self.renew(id, cred);
            }
            if reconnected {
                reconnected = false;
                tracing::info!("connected to the service again");
                self.hello_if_changed(provider, last_report).await;
            }
            let must_apply = ds.changed || cursor.is_none() || retrying;
            // What to enforce: a whole answer as it is; a delta merged into the state held,
            // enforced as the change it is when the provider takes changes (and nothing else of
            // the host moved: same clock offset, nothing to retry), else as the merged state.
            let (acks, removed) = if ds.delta {
                let (sent, gone) = (ds.nodes.len(), ds.removed.len());
                let step = match merge(&mut held, cursor.as_deref(), ds) {
                    Ok(step) => step,
                    Err(why) => {
                        // Never guess: ask for the whole state at once.
                        tracing::warn!(reason = %why,
                            "a delta answer did not fit the state held; asking for the whole state");
                        held = None;
                        cursor = None;
                        continue;
                    }
                };
                let h = held.as_ref().expect("merged");
                tracing::debug!(
                    nodes = sent,
                    removed = gone,
                    held = h.nodes.len(),
                    "merged a delta answer"
                );
                if !must_apply {
                    continue;
                }
                let changes = if step.offset_moved || retrying || cursor.is_none() {
                    None
                } else {
                    provider
                        .apply_changes(h.offset, &step.nodes, &step.removed)
                        .await
                };
                match changes {
                    Some(acks) => {
                        tracing::debug!(
                            changed = step.nodes.len(),
                            removed = step.removed.len(),
                            "enforced a change"
                        );
                        (acks, Some(step.removed))
                    }
                    None => {
                        tracing::debug!(nodes = h.nodes.len(), "enforced the whole state");
                        (provider.apply(&h.whole()).await, None)
                    }
                }
            } else {
                let acks = if must_apply {
                    tracing::debug!(nodes = ds.nodes.len(), "enforced the whole state");
                    Some(provider.apply(&ds).await)
                } else {
                    None
                };
                held = Some(Held::from(ds));
                match acks {
                    Some(acks) => (acks, None),
                    None => continue,
                }
            };
            let h = held.as_ref().expect("held");
            let failed: Vec<&NodeAck> = acks.iter().filter(|a| !a.failures.is_empty()).collect();
            for a in &failed {
                let users: Vec<&str> = a.failures.iter().map(|f| f.name.as_str()).collect();
                tracing::warn!(node = %a.key, revision = a.revision, users = %users.join(","),
                    reason = %a.failures[0].reason, "not applied; will retry");
            }
            retrying = !failed.is_empty();
            if !retrying {
                failing.reset();
            }
            match self
                .send_acks(h, acks, removed.as_deref(), &mut acked)
                .await
            {
                Ok(()) => cursor = Some(h.cursor.clone()),
                Err(e) if e.is_auth() => return Err(refused_credential(id, &self.state, &e)),
                Err(e) => {
                    let pause = lost.next();
                    tracing::warn!(error = %e, retry_in = ?pause,
                        "the acknowledgement was not delivered; will reconnect and converge");
                    cursor = None;
                    acked.clear();
                    reconnected = true;
                    tokio::time::sleep(pause).await;
                    continue;
                }
            }
            if has_sshd(provider.kind()) {
                self.hello_if_changed(provider, last_report).await;
            }
        }
    }

    /// Acknowledges what changed since the last delivered acknowledgement (with the boot it
    /// was given for), and every node the service waits for (starting, rebooting, reimaging).
    /// `removed`: the acknowledgements are of a change only, which removed these nodes (`None`:
    /// of the whole state `held`).
    async fn send_acks(
        &self,
        held: &Held,
        acks: Vec<NodeAck>,
        removed: Option<&[String]>,
        acked: &mut HashMap<String, (NodeAck, u64)>,
    ) -> Result<(), CallError> {
        let boot_of = |key: &str| held.nodes.get(key).map_or(0, |n| n.boot);
        let fresh: Vec<NodeAck> = acks
            .into_iter()
            .filter(|a| {
                let waited = held.nodes.get(a.key.as_str()).is_some_and(|n| {
                    matches!(
                        n.state,
                        NodeState::Starting | NodeState::Rebooting | NodeState::Reimaging
                    )
                });
                waited
                    || acked
                        .get(&a.key)
                        .is_none_or(|(was, boot)| was != a || *boot != boot_of(&a.key))
            })
            .collect();
        for chunk in fresh.chunks(ACKS_PER_REQUEST) {
            let answer = self
                .client
                .ack(&AckRequest {
                    nodes: chunk.to_vec(),
                })
                .await?;
            for key in &answer.refused {
                tracing::warn!(node = %key, "the service did not take this node's acknowledgement");
            }
            for a in chunk {
                if !answer.refused.contains(&a.key) {
                    acked.insert(a.key.clone(), (a.clone(), boot_of(&a.key)));
                }
            }
        }
        match removed {
            Some(keys) => {
                for k in keys {
                    acked.remove(k);
                }
            }
            None => acked.retain(|k, _| held.nodes.contains_key(k.as_str())),
        }
        Ok(())
    }

    fn renew(&self, id: &mut Identity, credential: &str) {
        if credential == id.credential {
            return;
        }
        id.credential = credential.to_string();
        self.client.set_credential(credential);
        match self.state.save_identity(id) {
            Ok(()) => tracing::info!(host = %id.host_id, "node credential renewed and saved"),
            Err(e) => tracing::error!(error = %e, "the renewed node credential could not be saved"),
        }
    }

    /// Tells the service when the host's address, sshd port or reserved names changed.
    async fn hello_if_changed<P: Provider>(&mut self, provider: &P, last: &mut HostReport) {
        if !self.advertised
            && let Ok(a) = self.client.local_address().await
        {
            self.address = a;
        }
        let now = self.report(provider);
        if now == *last {
            return;
        }
        match self.client.hello(&now).await {
            Ok(_) => {
                tracing::info!(address = %now.address, ssh_port = ?now.ssh_port,
                    reserved = now.reserved_names.len(), "told the service what changed on this host");
                *last = now;
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not tell the service what changed on this host")
            }
        }
    }
}

/// The whole state the agent holds: the last whole answer with every delta since merged in,
/// by node key, with the sum of its nodes' digests (so a delta is checked against the answer's
/// cursor at the cost of the nodes it carries, not of the host's).
struct Held {
    cursor: String,
    offset: i64,
    drained: bool,
    changed: bool,
    sum: bluebatch_protocol::Cursor,
    nodes: HashMap<String, bluebatch_protocol::NodeDesired>,
    /// The key of the node in each slot.
    slots: HashMap<u32, String>,
}

impl From<DesiredState> for Held {
    fn from(ds: DesiredState) -> Self {
        let mut h = Held {
            cursor: ds.cursor,
            offset: ds.clock_offset_seconds,
            drained: ds.drained,
            changed: ds.changed,
            sum: Default::default(),
            nodes: HashMap::with_capacity(ds.nodes.len()),
            slots: HashMap::with_capacity(ds.nodes.len()),
        };
        for n in ds.nodes {
            h.sum.node(&n.fields());
            h.slots.insert(n.slot, n.key.clone());
            h.nodes.insert(n.key.clone(), n);
        }
        h
    }
}

impl Held {
    /// The whole state, in slot order.
    fn whole(&self) -> DesiredState {
        let mut nodes: Vec<bluebatch_protocol::NodeDesired> =
            self.nodes.values().cloned().collect();
        nodes.sort_by_key(|n| n.slot);
        DesiredState {
            cursor: self.cursor.clone(),
            changed: self.changed,
            nodes,
            clock_offset_seconds: self.offset,
            drained: self.drained,
            credential: None,
            delta: false,
            removed: Vec::new(),
        }
    }
}

/// What a merged delta changed.
#[derive(Debug)]
struct Merged {
    /// The nodes the delta carried (each whole), and the keys it removed.
    nodes: Vec<bluebatch_protocol::NodeDesired>,
    removed: Vec<String>,
    /// The service clock's offset differs from the state held before: every node's expiry
    /// moved, not only those carried.
    offset_moved: bool,
}

/// Merges a delta answer into `held` (the state of the cursor `after` the poll sent): the
/// delta's nodes put in, its removed keys taken out. Refused — and nothing guessed; `held` is
/// then not to be used again — when the delta is not of `held`, removes a node `held` does not
/// have, puts two nodes in one slot, or the result's digest is not the answer's cursor.
fn merge(
    held: &mut Option<Held>,
    after: Option<&str>,
    delta: DesiredState,
) -> Result<Merged, String> {
    let Some(h) = held.as_mut() else {
        return Err("no whole state is held".into());
    };
    if after != Some(h.cursor.as_str()) {
        return Err("the delta is not of the state held".into());
    }
    for key in &delta.removed {
        let Some(n) = h.nodes.remove(key) else {
            return Err(format!("node {key} is removed but was not held"));
        };
        h.sum.remove(&n.fields().digest());
        if h.slots.get(&n.slot) == Some(key) {
            h.slots.remove(&n.slot);
        }
    }
    for n in &delta.nodes {
        if let Some(was) = h.nodes.remove(&n.key) {
            h.sum.remove(&was.fields().digest());
            if h.slots.get(&was.slot) == Some(&was.key) {
                h.slots.remove(&was.slot);
            }
        }
    }
    for n in &delta.nodes {
        if h.slots.insert(n.slot, n.key.clone()).is_some() {
            return Err("two nodes in one slot".into());
        }
        h.sum.node(&n.fields());
        h.nodes.insert(n.key.clone(), n.clone());
    }
    let cursor = h.sum.finish(delta.clock_offset_seconds, delta.drained);
    if cursor != delta.cursor {
        return Err("the merged state's digest is not the answer's cursor".into());
    }
    let offset_moved = h.offset != delta.clock_offset_seconds;
    h.cursor = delta.cursor;
    h.offset = delta.clock_offset_seconds;
    h.drained = delta.drained;
    h.changed = delta.changed;
    Ok(Merged {
        nodes: delta.nodes,
        removed: delta.removed,
        offset_moved,
    })
}

/// Whether the host's nodes are logged in by one sshd of the host (whose port is reported).
fn has_sshd(p: ProviderKind) -> bool {
    matches!(p, ProviderKind::Linux | ProviderKind::Sandbox)
}

fn provider_name(p: ProviderKind) -> &'static str {
    match p {
        ProviderKind::Linux => "linux",
        ProviderKind::Simulate => "simulated",
        ProviderKind::Sandbox => "sandbox",
    }
}

fn refused_credential(id: &Identity, state: &StateDir, e: &CallError) -> String {
    format!(
        "the service refused host {}'s node credential ({e}): the host was revoked, or the \
         credential expired while the agent was away. To join again, delete {} and start the \
         agent with a new join token",
        id.host_id,
        state.identity_path().display()
    )
}

async fn uninstall(args: UninstallArgs) -> Result<(), String> {
    if !args.state_dir.exists() {
        println!(
            "{}: no such state directory, nothing to remove",
            args.state_dir.display()
        );
        return Ok(());
    }
    let state = StateDir::open(&args.state_dir, None)?;
    let _lock = state.lock()?;
    let stored = state.identity()?;
    match stored.as_ref().map(|id| id.provider) {
        Some(ProviderKind::Simulate) => {
            let nodes = state.dir.join("nodes");
            if nodes.exists() {
                std::fs::remove_dir_all(&nodes).map_err(|e| format!("{}: {e}", nodes.display()))?;
            }
            println!("removed the simulated nodes ({})", nodes.display());
        }
        _ => {
            let removed = linux::uninstall(&state).await?;
            println!("{removed}");
        }
    }
    for path in [state.identity_path(), state.nodes_path()] {
        match std::fs::remove_file(&path) {
            Ok(()) => println!("removed {}", path.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {e}", path.display())),
        }
    }
    if let Some(id) = stored {
        println!(
            "host {} forgot its identity; revoke it at the service: bluebatch host revoke {}",
            id.host_id, id.host_id
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_token_files_parse() {
        let pin = format!("sha256:{}", "0f".repeat(32));
        let s = parse_join_secret(&format!("abcdef.0123456789abcdef0123456789abcdef\n{pin}\n"))
            .unwrap();
        assert_eq!(s.token, "abcdef.0123456789abcdef0123456789abcdef");
        assert_eq!(s.pin.as_deref(), Some(pin.as_str()));
        let s = parse_join_secret("  abcdef.secret \r\n-\n").unwrap();
        assert_eq!((s.token.as_str(), s.pin), ("abcdef.secret", None));
        assert!(parse_join_secret("abcdef.secret").unwrap().pin.is_none());
        assert!(parse_join_secret("").is_err());
        assert!(parse_join_secret("no-dot-here\n").is_err());
        assert!(parse_join_secret("abc.def ghi\n").is_err());
        assert!(parse_join_secret("abcdef.secret\nnot-a-fingerprint\n").is_err());
    }

    fn node(slot: u32, key: &str, revision: u64) -> bluebatch_protocol::NodeDesired {
        bluebatch_protocol::NodeDesired {
            slot,
            key: key.into(),
            pool_id: "p".into(),
            node_id: key.into(),
            os: bluebatch_core::model::Os::Linux,
            state: NodeState::Idle,
            revision,
            boot: 0,
            image: 0,
            accounts: vec![],
        }
    }

    fn state(nodes: Vec<bluebatch_protocol::NodeDesired>, delta: bool) -> DesiredState {
        DesiredState {
            cursor: bluebatch_protocol::cursor_of(&nodes, 0, false),
            changed: true,
            nodes,
            clock_offset_seconds: 0,
            drained: false,
            credential: None,
            delta,
            removed: vec![],
        }
    }

    /// `merge` into a copy of `held`: the merged whole state (in slot order) or the refusal.
    fn merged(
        held: &DesiredState,
        after: Option<&str>,
        delta: DesiredState,
    ) -> Result<(DesiredState, Merged), String> {
        let mut h = Some(Held::from(held.clone()));
        let m = merge(&mut h, after, delta)?;
        Ok((h.unwrap().whole(), m))
    }

    #[test]
    fn a_delta_merges_into_the_held_state_or_is_refused() {
        let held = state(
            vec![node(0, "a", 1), node(1, "b", 1), node(2, "c", 1)],
            false,
        );
        let c0 = held.cursor.clone();
        // b changed, c removed, d added.
        let whole = state(
            vec![node(0, "a", 1), node(1, "b", 2), node(3, "d", 0)],
            false,
        );
        let mut delta = state(vec![node(1, "b", 2), node(3, "d", 0)], true);
        delta.cursor = whole.cursor.clone();
        delta.removed = vec!["c".into()];
        let (got, m) = merged(&held, Some(&c0), delta.clone()).unwrap();
        assert_eq!(got, whole);
        // The change is what the delta carried, nothing more.
        assert_eq!(m.nodes, delta.nodes);
        assert_eq!(m.removed, vec!["c".to_string()]);
        assert!(!m.offset_moved);
        // A node moved to the slot another one left, in the same delta.
        let moved = state(vec![node(0, "a", 1), node(2, "b", 2)], false);
        let mut d2 = state(vec![node(2, "b", 2)], true);
        d2.cursor = moved.cursor.clone();
        d2.removed = vec!["c".into()];
        assert_eq!(merged(&held, Some(&c0), d2).unwrap().0, moved);
        // Not of the state held, nothing held, a removed node not held, a wrong digest.
        assert!(merged(&held, Some("other"), delta.clone()).is_err());
        assert!(merged(&held, None, delta.clone()).is_err());
        assert!(merge(&mut None, Some(&c0), delta.clone()).is_err());
        let mut bad = delta.clone();
        bad.removed.push("zz".into());
        assert!(merged(&held, Some(&c0), bad).is_err());
        let mut bad = delta.clone();
        bad.removed.clear();
        assert!(
            merged(&held, Some(&c0), bad).is_err(),
            "c would be invented"
        );
        let mut bad = delta.clone();
        bad.nodes.pop();
        assert!(merged(&held, Some(&c0), bad).is_err(), "d would be lost");
        let mut bad = delta;
        bad.nodes.push(node(0, "e", 0));
        assert!(
            merged(&held, Some(&c0), bad).is_err(),
            "two nodes in slot 0"
        );
    }

    #[test]
    fn backoff_grows_to_thirty_seconds_and_resets() {
        let mut b = Backoff(0);
        let first = b.next();
        assert!(first >= Duration::from_millis(800) && first <= Duration::from_millis(1200));
        for _ in 0..10 {
            b.next();
        }
        let late = b.next();
        assert!(
            late >= Duration::from_secs(24) && late <= Duration::from_secs(36),
            "{late:?}"
        );
        b.reset();
        assert!(b.next() <= Duration::from_millis(1200));
    }
}
