//! `bluebatch`: the Azure Batch emulator and control plane.

mod control;
mod fabric;
mod seed;
mod serve;
mod tls;
mod token;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "bluebatch",
    version,
    about = "Azure Batch data-plane emulator with real SSH nodes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the Batch API (pools, compute nodes, node users) and the nodes' SSH endpoints.
    Serve(serve::ServeArgs),
    /// Mint a bearer token for local development (printed on stdout), signed with the HS256
    /// secret or an RS256 private key.
    Token(token::TokenArgs),
    /// Show or move the service clock of a running server (emulator control).
    Clock {
        #[command(flatten)]
        target: control::Target,
        #[command(subcommand)]
        cmd: control::ClockCmd,
    },
    /// Node controls of a running server: set a node's state, inspect its users.
    Node {
        #[command(flatten)]
        target: control::Target,
        #[command(subcommand)]
        cmd: control::NodeCmd,
    },
    /// Forget every pool, node and user of the account on a running server.
    Reset {
        #[command(flatten)]
        target: control::Target,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BLUEBATCH_LOG")
                .unwrap_or_else(|_| "info,russh=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    let result = match cli.command {
        Command::Serve(args) => rt.block_on(serve::run(args)),
        Command::Token(args) => token::run(args),
        Command::Clock { target, cmd } => rt.block_on(control::clock(&target, cmd)),
        Command::Node { target, cmd } => rt.block_on(control::node(&target, cmd)),
        Command::Reset { target } => rt.block_on(control::run(
            &target,
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
