//! The `cachectl` binary: parses process flags, loads the configuration, starts telemetry and
//! hands off to the library. Everything else lives in `cachectl-server`.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use tokio_util_shutdown::shutdown_token;

/// cachectl: a control plane for CDN cache refresh and prefetch.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the service.
    Serve {
        /// The configuration file (TOML). Keys can be overridden by CACHECTL_<SECTION>__<KEY>.
        #[arg(long, short, env = "CACHECTL_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Apply the store's migrations (SQLite or PostgreSQL) and exit.
    Migrate {
        /// The configuration file (TOML); only `[store]` is used.
        #[arg(long, short, env = "CACHECTL_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Check a configuration file and exit.
    CheckConfig {
        /// The configuration file (TOML).
        #[arg(long, short, env = "CACHECTL_CONFIG")]
        config: Option<PathBuf>,
    },
}

fn init_telemetry() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CACHECTL_LOG").unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_writer(std::io::stderr).init();
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => {
            let settings = cachectl_server::config::Config::load(config.as_deref())?.validate()?;
            println!("configuration ok: {} accounts, {} edge nodes", settings.accounts.len(), settings.nodes.len());
            Ok(())
        }
        Command::Migrate { config } => {
            init_telemetry();
            let settings = cachectl_server::config::Config::load(config.as_deref())?.validate()?;
            cachectl_server::migrate(&settings.store_url).await?;
            println!("store migrated: {}", cachectl_server::redact_url(&settings.store_url));
            Ok(())
        }
        Command::Serve { config } => {
            init_telemetry();
            let settings = cachectl_server::config::Config::load(config.as_deref())?.validate()?;
            let app = cachectl_server::Application::build(settings).await.context("starting cachectl")?;
            let shutdown = shutdown_token();
            app.run_until_stopped(shutdown).await
        }
    }
}

mod tokio_util_shutdown {
    //! SIGINT/SIGTERM to one cancellation token.
    use tokio_util::sync::CancellationToken;

    pub fn shutdown_token() -> CancellationToken {
        let token = CancellationToken::new();
        let trigger = token.clone();
        tokio::spawn(async move {
            let ctrl_c = tokio::signal::ctrl_c();
            #[cfg(unix)]
            let term = async {
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(mut s) => {
                        s.recv().await;
                    }
                    Err(_) => std::future::pending::<()>().await,
                }
            };
            #[cfg(not(unix))]
            let term = std::future::pending::<()>();
            tokio::select! {
                _ = ctrl_c => {}
                () = term => {}
            }
            tracing::info!("Shutdown signal received; draining.");
            trigger.cancel();
        });
        token
    }
}
