//! `bluebatch`: the Azure Batch emulator and control plane.

mod fabric;

mod serve;

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
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bluebatch: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
