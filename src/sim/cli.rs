//! The `sim` command: serve the GitLab simulator until SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;
use tokio::net::TcpListener;

use super::{Error, Result, Seed, SimConfig, serve};

/// Serve the GitLab API simulator (virtual registries, upstreams, container registry).
#[derive(Debug, Clone, clap::Args)]
pub struct SimArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8929")]
    pub listen: SocketAddr,
    /// The token clients must send as PRIVATE-TOKEN (or Bearer).
    #[arg(long, env = "SIM_TOKEN", hide_env_values = true)]
    pub token: SecretString,
    /// Accept localhost and private-network upstream urls (GitLab refuses them by default).
    #[arg(long)]
    pub allow_local_network: bool,
    /// Delay every API answer by this many milliseconds.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Seed file (JSON or YAML); default: the demo data.
    #[arg(long)]
    pub seed: Option<PathBuf>,
}

/// Runs the simulator as `args` say; returns after SIGTERM or Ctrl-C.
pub async fn run(args: SimArgs) -> Result<()> {
    let seed = match &args.seed {
        Some(path) => Seed::from_file(path)?,
        None => Seed::demo(),
    };
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|source| Error::Bind {
            address: args.listen.to_string(),
            source,
        })?;
    let address = listener.local_addr().map_err(|source| Error::Bind {
        address: args.listen.to_string(),
        source,
    })?;
    println!("GitLab simulator listening on http://{address} (API: http://{address}/api/v4)");
    let config = SimConfig {
        token: args.token,
        allow_local_network: args.allow_local_network,
        latency: Duration::from_millis(args.latency_ms),
        ..SimConfig::default()
    };
    serve(config, seed, listener, stop_signal()).await
}

async fn stop_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: SimArgs,
    }

    #[test]
    fn arguments_parse_with_defaults() {
        let wrapper = Wrapper::parse_from(["sim", "--token", "t", "--latency-ms", "5"]);
        assert_eq!(wrapper.args.listen.to_string(), "127.0.0.1:8929");
        assert_eq!(wrapper.args.latency_ms, 5);
        assert!(!wrapper.args.allow_local_network);
        assert!(wrapper.args.seed.is_none());
    }
}
