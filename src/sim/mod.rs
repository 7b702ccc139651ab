//! A stateful, in-memory GitLab API simulator served over HTTP, used by integration tests,
//! the demo (`apply`/`plan` without a GitLab url) and the `sim` command.
//!
//! It owns the behaviour contract of `gitlab-api/`: the container virtual registry API and
//! the container registry API under `/api/v4` with GitLab's status codes, JSON shapes,
//! validations and error bodies (`SEMANTICS.md`), plus control endpoints under `/-/sim/`
//! (request counts, faults, seeding, state, clock) that need no token:
//!
//! | endpoint | effect |
//! | --- | --- |
//! | `GET /-/sim/requests`, `DELETE` | counts keyed `"<METHOD> <route template>"`; reset |
//! | `GET /-/sim/faults`, `POST` ([`FaultSpec`]), `DELETE` | inspect, add, clear faults |
//! | `POST /-/sim/seed` | add a [`Seed`] (JSON or YAML), all or nothing; `201` |
//! | `GET /-/sim/state` | the whole [`Snapshot`]; passwords only as `has_password` |
//! | `GET /-/sim/clock`, `POST {"now": ts \| null}` / `{"advance_seconds": n}` | "now" |
//! | `PUT /-/sim/repositories/:id/tags/:tag_name` `{digest, created_at, total_size}` | push / age a tag |
//!
//! Where GitLab's answer body is not meaningful (`PATCH` 200, tag `DELETE` 200, bulk delete
//! and repository delete 202) the body is the status number, as Grape renders
//! `status :ok`. Connection tests answer `200`.
//!
//! ```no_run
//! # async fn demo() -> gitlab_registry_operator::sim::Result<()> {
//! use gitlab_registry_operator::sim::{Seed, SimConfig, Simulator};
//! let sim = Simulator::start(SimConfig::default(), Seed::demo()).await?;
//! println!("{}", sim.api_url()); // http://127.0.0.1:PORT/api/v4
//! sim.shutdown().await;
//! # Ok(()) }
//! ```

pub mod cli;
pub mod connection;
pub mod faults;
mod routes;
pub mod seed;
pub mod state;
pub mod upstream_stub;
pub mod views;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use secrecy::SecretString;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use faults::{FaultAction, FaultSpec, Faults, OneShotFault};
pub use routes::API_PREFIX;
pub use seed::{Seed, SeedError};
pub use state::{AccessLevel, ApiError, Snapshot, State};

/// The token [`SimConfig::default`] accepts.
pub const DEFAULT_TOKEN: &str = "sim-token";

/// Errors starting or running the simulator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: String,
        source: std::io::Error,
    },
    #[error("the simulator's HTTP server failed: {0}")]
    Serve(std::io::Error),
    #[error(transparent)]
    Seed(#[from] SeedError),
    #[error("cannot build the HTTP client for upstream tests: {0}")]
    HttpClient(reqwest::Error),
}

impl Error {
    /// A stable CamelCase reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Bind { .. } => "ListenFailed",
            Error::Serve(_) => "ServeFailed",
            Error::Seed(error) => error.reason(),
            Error::HttpClient(_) => "HttpClientFailed",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How the simulator behaves.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The only accepted token (`PRIVATE-TOKEN` or `Authorization: Bearer`).
    pub token: SecretString,
    /// The token owner's role: writes need Maintainer (else `403`), except a single tag's
    /// delete, which needs Developer; reading tag protection rules needs Maintainer; a tag
    /// whose protection rule requires a higher role cannot be deleted (plain `403`).
    pub role: AccessLevel,
    /// A `read_api` token: writes answer `403 insufficient_scope`.
    pub read_only_token: bool,
    /// Accept localhost and private-network upstream urls (GitLab's admin switch).
    pub allow_local_network: bool,
    /// Delay before every API answer.
    pub latency: Duration,
    /// Answer connection tests from the built-in stub instead of the network.
    pub stub_upstreams: bool,
    /// Tag lists include the details fields (`digest`, `created_at`, ...), as GitLab does
    /// with the registry metadata database; off = the documented `name, path, location`.
    pub tag_list_details: bool,
    /// Time limit of one upstream connection test.
    pub upstream_timeout: Duration,
    /// Host shown in repository and tag `location`s.
    pub registry_host: String,
    /// Time between reading a registry's highest position and committing a new association
    /// (an upstream created through the registry, or associated with it), as in GitLab's
    /// transaction. GitLab's `UNIQUE (registry_id, position) DEFERRABLE INITIALLY DEFERRED`
    /// constraint then fails the later of two inserts that read the same position (INFERRED:
    /// `500`, an unhandled `RecordNotUnique`). Zero (the default): inserts are atomic.
    pub insert_commit_delay: Duration,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            token: SecretString::from(DEFAULT_TOKEN),
            role: AccessLevel::Maintainer,
            read_only_token: false,
            allow_local_network: false,
            latency: Duration::ZERO,
            stub_upstreams: false,
            tag_list_details: false,
            upstream_timeout: Duration::from_secs(5),
            registry_host: "registry.gitlab.example.com".into(),
            insert_commit_delay: Duration::ZERO,
        }
    }
}

impl SimConfig {
    /// The embedded demo (`apply`/`plan` without a GitLab url): default token, and
    /// connection tests answered by the built-in stub so no network is used.
    pub fn embedded_demo() -> Self {
        Self {
            stub_upstreams: true,
            ..Self::default()
        }
    }

    /// Default settings with the given token.
    pub fn with_token(token: impl Into<String>) -> Self {
        Self {
            token: SecretString::from(token.into()),
            ..Self::default()
        }
    }
}

/// State shared by all request handlers. Locks are never held across an `.await`.
pub(crate) struct Shared {
    pub(crate) config: SimConfig,
    state: Mutex<State>,
    faults: Mutex<Faults>,
    counts: Mutex<BTreeMap<String, u64>>,
    pub(crate) http: reqwest::Client,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn new(config: SimConfig, seed: &Seed) -> Result<Self> {
        let mut state = State::new();
        state.apply_seed(seed)?;
        let http = connection::http_client(config.upstream_timeout).map_err(Error::HttpClient)?;
        Ok(Self {
            config,
            state: Mutex::new(state),
            faults: Mutex::new(Faults::new()),
            counts: Mutex::new(BTreeMap::new()),
            http,
        })
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    pub(crate) fn faults(&self) -> MutexGuard<'_, Faults> {
        lock(&self.faults)
    }

    pub(crate) fn count_request(&self, method: &str, route: &str) {
        *lock(&self.counts)
            .entry(format!("{method} {route}"))
            .or_insert(0) += 1;
    }

    pub(crate) fn request_counts(&self) -> BTreeMap<String, u64> {
        lock(&self.counts).clone()
    }

    pub(crate) fn reset_request_counts(&self) {
        lock(&self.counts).clear();
    }
}

/// Serves the simulator on `listener` until `shutdown` completes (used by `sim`).
pub async fn serve(
    config: SimConfig,
    seed: Seed,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let shared = Arc::new(Shared::new(config, &seed)?);
    serve_shared(shared, listener, shutdown).await
}

async fn serve_shared(
    shared: Arc<Shared>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    axum::serve(listener, routes::router(shared))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(Error::Serve)
}

/// Starts simulators on loopback.
pub struct Simulator;

impl Simulator {
    /// Binds `127.0.0.1:0`, seeds the state and serves in the background.
    pub async fn start(config: SimConfig, seed: Seed) -> Result<SimHandle> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|source| Error::Bind {
                address: "127.0.0.1:0".into(),
                source,
            })?;
        let address = listener.local_addr().map_err(|source| Error::Bind {
            address: "127.0.0.1:0".into(),
            source,
        })?;
        let shared = Arc::new(Shared::new(config, &seed)?);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve_shared(shared.clone(), listener, async move {
            let _ = stopped.await;
        }));
        Ok(SimHandle {
            shared,
            address,
            stop: Some(stop),
            task: Some(task),
        })
    }
}

/// A running simulator. Dropping it stops the server.
pub struct SimHandle {
    shared: Arc<Shared>,
    address: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<()>>>,
}

impl SimHandle {
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// `http://127.0.0.1:PORT`; control endpoints live under `/-/sim/`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// `http://127.0.0.1:PORT/api/v4`.
    pub fn api_url(&self) -> String {
        format!("{}{API_PREFIX}", self.base_url())
    }

    pub fn config(&self) -> &SimConfig {
        &self.shared.config
    }

    /// Requests so far, keyed `"<METHOD> <route template>"`, e.g.
    /// `"GET /groups/:id/-/virtual_registries/container/registries"`.
    pub fn request_counts(&self) -> BTreeMap<String, u64> {
        self.shared.request_counts()
    }

    /// Requests so far for one method and route template.
    pub fn request_count(&self, method: &str, route: &str) -> u64 {
        self.request_counts()
            .get(&format!("{method} {route}"))
            .copied()
            .unwrap_or(0)
    }

    /// Requests so far that can change GitLab's state: every method other than GET/HEAD, except
    /// the upstream connection tests (`…/upstreams/test`, `…/upstreams/:id/test`), which GitLab
    /// takes as POSTs but which only probe the remote registry and store nothing.
    pub fn write_count(&self) -> u64 {
        self.request_counts()
            .iter()
            .filter(|(key, _)| {
                !key.starts_with("GET ") && !key.starts_with("HEAD ") && !key.ends_with("/test")
            })
            .map(|(_, count)| count)
            .sum()
    }

    pub fn reset_request_counts(&self) {
        self.shared.reset_request_counts();
    }

    /// A copy of the whole state.
    pub fn snapshot(&self) -> Snapshot {
        self.shared.state().snapshot()
    }

    /// Runs `change` on the state (drift, custom setups). Keep it short: requests wait.
    pub fn with_state<R>(&self, change: impl FnOnce(&mut State) -> R) -> R {
        change(&mut self.shared.state())
    }

    pub fn inject_fault(&self, spec: FaultSpec) {
        self.shared.faults().apply(spec);
    }

    pub fn clear_faults(&self) {
        self.shared.faults().clear();
    }

    /// Adds more seed data.
    pub fn seed(&self, seed: &Seed) -> Result<()> {
        Ok(self.shared.state().apply_seed(seed)?)
    }

    /// Freezes "now" (bulk delete hourly limit, `older_than`, policy `next_run_at`), or
    /// returns to the wall clock with `None`.
    pub fn set_clock(&self, now: Option<Timestamp>) {
        self.shared.state().set_clock(now);
    }

    pub fn advance_clock(&self, by: SignedDuration) -> Result<Timestamp, ApiError> {
        self.shared.state().advance_clock(by)
    }

    /// Stops the server and waits for it to finish.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
