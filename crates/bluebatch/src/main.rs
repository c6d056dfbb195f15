//! `bluebatch`: the Azure Batch emulator and control plane.

mod agent;
mod cli;
mod control;
mod datadir;
mod fabric;
mod hosts;
mod sandbox;
mod seed;
mod serve;
mod tls;
mod token;

use clap::{Parser, Subcommand, ValueEnum};
use std::io::IsTerminal;

/// jemalloc: glibc's malloc and free were about 11 % of an Update User's CPU; with jemalloc the
/// server's CPU per request is 15–25 % lower (docs/performance.md, sixth pass).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "bluebatch",
    version,
    about = "Azure Batch data-plane emulator with real SSH nodes",
    after_help = "\
Client commands (pool, node, ssh, env, clock, reset, join-token, host) talk to a running
server: --url and --account may stand before or after the subcommand; the account key comes
from BLUEBATCH_KEY (the development account's key is built in). For an https --url,
BLUEBATCH_CA_FILE names the PEM CA certificate(s) to trust (e.g. DATA_DIR/tls/ca.pem).

Logs go to stderr. BLUEBATCH_LOG sets the filter (tracing EnvFilter syntax; default
\"info,russh=warn\", e.g. BLUEBATCH_LOG=debug or BLUEBATCH_LOG=warn,bluebatch_node=info)."
)]
struct Cli {
    #[command(flatten)]
    target: control::Target,
    /// Log format on stderr: `text` (colour only when stderr is a terminal and NO_COLOR is
    /// unset) or `json` (one JSON object per line).
    #[arg(
        long,
        value_enum,
        default_value_t = LogFormat::Text,
        env = "BLUEBATCH_LOG_FORMAT",
        global = true
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the Batch API (pools, compute nodes, node users) and the nodes' SSH endpoints.
    Serve(Box<serve::ServeArgs>),
    /// Mint a bearer token for local development (printed on stdout), signed with the HS256
    /// secret or an RS256 private key.
    Token(token::TokenArgs),
    /// Pools of a running server (through the Batch API).
    Pool {
        #[command(subcommand)]
        cmd: cli::PoolCmd,
    },
    /// Compute nodes of a running server: list them, set a node's state, inspect its users.
    Node {
        #[command(subcommand)]
        cmd: control::NodeCmd,
    },
    /// Log in to a node over SSH (runs `ssh -p PORT USER@IP [CMD]` from the node's remote login
    /// settings), or print that command with --print.
    Ssh(cli::SshArgs),
    /// Print `export AZURE_BATCH_ACCOUNT=… AZURE_BATCH_ENDPOINT=… AZURE_BATCH_ACCESS_KEY=…` for
    /// the running server (use with `eval "$(bluebatch env)"`), and a Python snippet.
    Env(cli::EnvArgs),
    /// Show, move or reset the service clock of a running server (emulator control; stored, so
    /// it survives a restart).
    Clock {
        #[command(subcommand)]
        cmd: control::ClockCmd,
    },
    /// Forget every pool, node and user of the account on a running server.
    Reset,
    /// Make this host compute-node capacity of a service: join with a join token, then keep
    /// the accounts the Batch API sets as real accounts of this host (or, with --simulate N,
    /// serve N simulated SSH nodes). `bluebatch agent uninstall` removes what it created.
    Agent(Box<agent::AgentArgs>),
    /// Join tokens for `bluebatch agent` (create, list, revoke) on a running server.
    JoinToken {
        #[command(subcommand)]
        cmd: hosts::JoinTokenCmd,
    },
    /// Hosts that joined with `bluebatch agent`: list, drain, revoke.
    Host {
        #[command(subcommand)]
        cmd: hosts::HostCmd,
    },
    /// PID 1 of a sandboxed node (started by `serve --nodes sandbox` only).
    #[command(hide = true, name = "sandbox-init")]
    SandboxInit(Box<sandbox::init::InitArgs>),
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BLUEBATCH_LOG")
        .unwrap_or_else(|_| "info,russh=warn".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
        LogFormat::Text => {
            let colour = std::io::stderr().is_terminal()
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
            builder.with_ansi(colour).init()
        }
    }
}

fn main() -> std::process::ExitCode {
    // First, while this is the only thread: the join token leaves the environment, so that no
    // process the agent starts inherits it.
    agent::take_join_token_env();
    // Hidden: a node's `sftp` subsystem (started by the node as the session's account).
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == bluebatch_node::sftp::SUBCOMMAND)
    {
        return bluebatch_node::sftp::serve_stdio();
    }
    let cli = Cli::parse();
    // A sandboxed node's PID 1: single-threaded (no runtime), its own log.
    let command = match cli.command {
        Command::SandboxInit(args) => return sandbox::init::run(*args),
        command => command,
    };
    init_logs(cli.log_format);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    let target = &cli.target;
    let result = match command {
        Command::SandboxInit(_) => Err("sandbox-init runs before the runtime".to_string()),
        Command::Serve(args) => rt.block_on(serve::run(*args)),
        Command::Token(args) => token::run(args, target.explicit_account()),
        Command::Pool { cmd } => rt.block_on(cli::pool(target, cmd)),
        Command::Node { cmd } => rt.block_on(control::node(target, cmd)),
        Command::Ssh(args) => rt.block_on(cli::ssh(target, args)),
        Command::Env(args) => rt.block_on(cli::env(target, args)),
        Command::Clock { cmd } => rt.block_on(control::clock(target, cmd)),
        Command::JoinToken { cmd } => rt.block_on(hosts::join_token(target, cmd)),
        Command::Host { cmd } => rt.block_on(hosts::host(target, cmd)),
        Command::Agent(args) => agent::run(*args, &rt),
        Command::Reset => rt.block_on(control::run(
            target,
            bluebatch_wire::http::Method::POST,
            "/reset",
            None,
        )),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bluebatch: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
