//! The `gitlab-registry-operator` command line: `run`, `crds`, `apply`, `plan`, `export` and
//! `sim`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use gitlab_registry_operator::cleanup::parse_duration;
use gitlab_registry_operator::controller::context::{DefaultConnection, OperatorConfig};
use gitlab_registry_operator::controller::runtime::{self, RuntimeOptions};
use gitlab_registry_operator::controller::tenancy::AccessPolicyFile;
use gitlab_registry_operator::crd;
use secrecy::SecretString;

#[derive(Parser)]
#[command(
    name = "gitlab-registry-operator",
    version,
    about = "Keeps GitLab container virtual registries, upstreams and tag cleanups in line with Kubernetes objects"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controllers, in a cluster or with a kubeconfig (KUBECONFIG).
    Run(Box<RunArgs>),
    /// Print the CustomResourceDefinitions of all three kinds as YAML (`---`-separated).
    Crds {
        /// Write one file per kind into this directory (as kept in `crds/`) instead of printing.
        #[arg(long, value_name = "DIR")]
        output_dir: Option<PathBuf>,
    },
    /// Reconcile the manifests in the given files and directories against GitLab, once, without
    /// a cluster. Without a GitLab URL, runs against the embedded simulator with demo data.
    /// Exits non-zero when any object is not Ready.
    Apply(StandaloneArgs),
    /// Show what `apply` would change, field by field, sending only GET requests. Exit code:
    /// 0 no change, 2 changes, 1 error.
    Plan(StandaloneArgs),
    /// Print (or write, one file per object, to a directory) the manifests that describe what
    /// GitLab holds for one top-level group: its virtual registries, upstreams (with Secrets
    /// whose password is a placeholder) and the GitLab cleanup policies enabled on its
    /// projects. `plan -f` of the result reports no change. Without a GitLab URL, exports the
    /// embedded simulator's demo data.
    Export(ExportArgs),
    /// Serve the GitLab API simulator (for tests and demos); prints its base URL.
    Sim(gitlab_registry_operator::sim::cli::SimArgs),
}

#[derive(Args)]
struct StandaloneArgs {
    /// Manifest files or directories (multi-document YAML; Secrets among them).
    #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
    paths: Vec<PathBuf>,
    #[command(flatten)]
    gitlab: GitLabArgs,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Send upstream credentials even when GitLab already holds the declared username
    /// (standalone mode keeps no record of the password GitLab holds).
    #[arg(long)]
    resend_credentials: bool,
    /// Approve a cleanup's deletions over limits.maxDeletionPercent by the fingerprint the
    /// output lists (repeatable); like the annotation gitlabregistry.io/approve-deletion.
    #[arg(long = "approve", value_name = "FINGERPRINT")]
    approve: Vec<String>,
    #[command(flatten)]
    access: AccessArgs,
}

/// Tenancy: who may use the default GitLab connection for what.
#[derive(Args)]
struct AccessArgs {
    /// YAML rules of which namespaces may use the default GitLab connection for which groups
    /// and projects (`rules: [{namespaces, groups, projects}]`); objects outside them get
    /// Ready=False, reason NotPermitted. Without it, everything is allowed. `run` re-reads the
    /// file when it changes.
    #[arg(long, value_name = "FILE")]
    access_policy: Option<PathBuf>,
}

#[derive(Args)]
struct ExportArgs {
    /// Top-level GitLab group: full path (`my-org`) or numeric id.
    #[arg(long)]
    group: String,
    /// Namespace to put in every manifest (default: none, so `kubectl apply` uses the current one).
    #[arg(long)]
    namespace: Option<String>,
    /// Write one file per object into this directory instead of printing one YAML stream.
    #[arg(short = 'o', long = "output-dir", value_name = "DIR")]
    output_dir: Option<PathBuf>,
    #[command(flatten)]
    gitlab: GitLabArgs,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    gitlab: GitLabArgs,
    /// How often every object is reconciled even without a change (drift correction).
    #[arg(long, default_value = "10m", value_parser = parse_duration_arg)]
    resync: Duration,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Elect a leader through a Lease; only the leader reconciles.
    #[arg(long)]
    leader_election: bool,
    /// Namespace of the Lease (default: POD_NAMESPACE, else `default`).
    #[arg(long, env = "POD_NAMESPACE")]
    leader_election_namespace: Option<String>,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long)]
    watch_namespace: Option<String>,
    /// At most this many reconciles of one kind at a time (0: unlimited); bounds GitLab
    /// request bursts and memory when many objects change at once.
    #[arg(long, default_value_t = runtime::DEFAULT_MAX_CONCURRENT_RECONCILES)]
    max_concurrent_reconciles: u16,
    #[command(flatten)]
    access: AccessArgs,
    #[command(flatten)]
    logging: LogArgs,
}

/// The default GitLab connection.
#[derive(Args)]
struct GitLabArgs {
    /// GitLab base URL, e.g. https://gitlab.example.com.
    #[arg(long, env = "GITLAB_URL")]
    gitlab_url: Option<url::Url>,
    /// GitLab access token (api scope, Maintainer on the groups). Only from the environment.
    #[arg(
        long = "gitlab-token",
        env = "GITLAB_TOKEN",
        hide_env_values = true,
        hide = true
    )]
    gitlab_token: Option<String>,
    /// Extra CA certificates (PEM) for a self-managed GitLab with a private CA.
    #[arg(long)]
    gitlab_ca_file: Option<PathBuf>,
    /// Client-side limit of GitLab requests per second (per GitLab host).
    #[arg(long)]
    gitlab_requests_per_second: Option<f64>,
}

#[derive(Args)]
struct LogArgs {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn parse_duration_arg(input: &str) -> Result<Duration, String> {
    parse_duration(input).map_err(|error| error.to_string())
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
}

impl GitLabArgs {
    fn operator_config(&self, resync: Duration) -> Result<OperatorConfig, String> {
        let default_gitlab = match (&self.gitlab_url, &self.gitlab_token) {
            (Some(url), Some(token)) => Some(DefaultConnection {
                url: url.clone(),
                token: SecretString::from(token.clone()),
            }),
            (Some(_), None) => return Err("--gitlab-url is set but GITLAB_TOKEN is not".into()),
            (None, Some(_)) => {
                return Err("GITLAB_TOKEN is set but --gitlab-url (GITLAB_URL) is not".into());
            }
            (None, None) => None,
        };
        let gitlab_ca_pem = self.ca_pem()?;
        Ok(OperatorConfig {
            default_gitlab,
            gitlab_ca_pem,
            gitlab_requests_per_second: self.gitlab_requests_per_second,
            resync,
            access_policy: None,
        })
    }
}

/// GitLab URL with token and extra CA certificates of a standalone command; no URL: `None`
/// (the embedded simulator).
type StandaloneConnection = (Option<(url::Url, SecretString)>, Option<Vec<u8>>);

impl GitLabArgs {
    /// Logging (only with RUST_LOG) and the connection of a standalone command; a bad
    /// connection setting is reported and is the exit code.
    fn start_standalone(&self) -> Result<StandaloneConnection, ExitCode> {
        if std::env::var_os("RUST_LOG").is_some() {
            init_logging(LogFormat::Text);
        }
        self.standalone_connection().map_err(|message| {
            eprintln!("error: {message}");
            ExitCode::from(1)
        })
    }

    fn standalone_connection(&self) -> Result<StandaloneConnection, String> {
        let gitlab = match (&self.gitlab_url, &self.gitlab_token) {
            (Some(url), Some(token)) => Some((url.clone(), SecretString::from(token.clone()))),
            (Some(_), None) => return Err("--gitlab-url is set but GITLAB_TOKEN is not".into()),
            (None, _) => None,
        };
        Ok((gitlab, self.ca_pem()?))
    }

    /// The contents of `--gitlab-ca-file`, if given.
    fn ca_pem(&self) -> Result<Option<Vec<u8>>, String> {
        self.gitlab_ca_file
            .as_ref()
            .map(|path| {
                std::fs::read(path)
                    .map_err(|error| format!("--gitlab-ca-file {}: {error}", path.display()))
            })
            .transpose()
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crds { output_dir } => print_or_write_crds(output_dir.as_deref()),
        Command::Apply(args) => standalone(args, gitlab_registry_operator::sync::Mode::Apply),
        Command::Plan(args) => standalone(args, gitlab_registry_operator::sync::Mode::Plan),
        Command::Export(args) => export(args),
        Command::Sim(args) => {
            init_logging(LogFormat::Text);
            match tokio_runtime().block_on(gitlab_registry_operator::sim::cli::run(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("error: {error}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run(args) => {
            init_logging(args.logging.log_format);
            let mut config = match args.gitlab.operator_config(args.resync) {
                Ok(config) => config,
                Err(message) => {
                    eprintln!("error: {message}");
                    return ExitCode::from(2);
                }
            };
            match &args.access.access_policy {
                Some(path) => match AccessPolicyFile::load(path) {
                    Ok(file) => config.access_policy = Some(std::sync::Arc::new(file)),
                    Err(error) => {
                        eprintln!("error: --access-policy: {error}");
                        return ExitCode::from(2);
                    }
                },
                None => tracing::warn!(
                    "no --access-policy: every namespace may use the default GitLab connection for any group and project its token reaches"
                ),
            }
            if config.default_gitlab.is_none() {
                tracing::warn!(
                    "no default GitLab connection (--gitlab-url and GITLAB_TOKEN): objects need spec.gitlab"
                );
            }
            let options = RuntimeOptions {
                metrics_addr: args.metrics_addr,
                leader_election: args.leader_election,
                leader_election_namespace: args.leader_election_namespace,
                leader_election_identity: None,
                max_concurrent_reconciles: args.max_concurrent_reconciles,
                watch_namespace: args.watch_namespace,
            };
            match tokio_runtime().block_on(runtime::run(config, options)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    tracing::error!(%error, "gitlab-registry-operator stopped");
                    eprintln!("error: {error}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn standalone(args: StandaloneArgs, mode: gitlab_registry_operator::sync::Mode) -> ExitCode {
    use gitlab_registry_operator::standalone;
    let (gitlab, extra_ca_pem) = match args.gitlab.start_standalone() {
        Ok(connection) => connection,
        Err(code) => return code,
    };
    let access_policy = match &args.access.access_policy {
        Some(path) => match AccessPolicyFile::load(path) {
            Ok(file) => Some((*file.current()).clone()),
            Err(error) => {
                eprintln!("error: --access-policy: {error}");
                return ExitCode::from(1);
            }
        },
        None => None,
    };
    let options = standalone::Options {
        paths: args.paths,
        mode,
        gitlab,
        extra_ca_pem,
        resend_credentials: args.resend_credentials,
        approved_deletions: args
            .approve
            .iter()
            .flat_map(|value| gitlab_registry_operator::cleanup::parse_approvals(value))
            .collect(),
        access_policy,
    };
    let report = match tokio_runtime().block_on(standalone::execute(&options)) {
        Ok(report) => report,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(1);
        }
    };
    match args.output {
        Output::Json => match serde_json::to_string_pretty(&report) {
            Ok(json) => println!("{json}"),
            Err(error) => {
                eprintln!("error: {error}");
                return ExitCode::from(1);
            }
        },
        Output::Table => {
            for note in &report.notes {
                println!("note: {note}");
            }
            if !report.notes.is_empty() {
                println!();
            }
            print!("{}", standalone::render_table(&report));
        }
    }
    if mode.writes() {
        if report.all_ready() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        }
    } else if report.needs_fixing() {
        ExitCode::from(1)
    } else if report.changes_anything() {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    }
}

fn export(args: ExportArgs) -> ExitCode {
    use gitlab_registry_operator::standalone::{self, export};
    let (gitlab, extra_ca_pem) = match args.gitlab.start_standalone() {
        Ok(connection) => connection,
        Err(code) => return code,
    };
    let options = standalone::ExportOptions {
        group: args.group,
        namespace: args.namespace,
        gitlab,
        extra_ca_pem,
    };
    let (exported, provenance) =
        match tokio_runtime().block_on(standalone::execute_export(&options)) {
            Ok(result) => result,
            Err(error) => {
                eprintln!("error: {error}");
                return ExitCode::from(1);
            }
        };
    for warning in &exported.warnings {
        eprintln!("warning: {warning}");
    }
    match &args.output_dir {
        None => print!("{}", export::render_stream(&exported, &provenance)),
        Some(dir) => match export::write_files(&exported, &provenance, dir) {
            Ok(written) => {
                for other in export::files_not_written(dir, &written) {
                    eprintln!(
                        "warning: {} is not part of this export, and `plan -f {}` reads it too",
                        other.display(),
                        dir.display()
                    );
                }
                eprintln!(
                    "wrote {} manifests to {}; check them with: gitlab-registry-operator plan -f {}",
                    written.len(),
                    dir.display(),
                    dir.display()
                );
            }
            Err(error) => {
                eprintln!("error: {error}");
                return ExitCode::from(1);
            }
        },
    }
    ExitCode::SUCCESS
}

fn tokio_runtime() -> tokio::runtime::Runtime {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            std::process::exit(1);
        }
    }
}

fn print_or_write_crds(output_dir: Option<&Path>) -> ExitCode {
    let Some(dir) = output_dir else {
        return match crd::all_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("error: cannot render the CRDs as YAML: {error}");
                ExitCode::FAILURE
            }
        };
    };
    for (file, definition) in crd::all() {
        let path = dir.join(file);
        let written = crd::to_yaml(&definition)
            .map_err(|error| error.to_string())
            .and_then(|yaml| std::fs::write(&path, yaml).map_err(|error| error.to_string()));
        if let Err(error) = written {
            eprintln!("error: cannot write {}: {error}", path.display());
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
