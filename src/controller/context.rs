//! What every reconcile shares: the Kubernetes client, the GitLab client pool, the group
//! upstream listings, the reflector stores of the other kinds (and waiting for their first
//! lists), the Upstreams' latest connection tests, the event recorder, metrics and the
//! operator's settings.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::Store;
use secrecy::SecretString;
use url::Url;

use super::metrics::Metrics;
use crate::crd::{CleanupPolicy, Upstream, VirtualRegistry};
use crate::gitlab::{ClientConfig, GitLabClient, RequestObserver};
use crate::sync::listing::UpstreamListings;
use crate::sync::registry::{REGISTRY_VIEW_MAX_AGE, RegistryViews};

/// Settings from the command line.
#[derive(Clone, Debug)]
pub struct OperatorConfig {
    /// The default GitLab connection (`--gitlab-url` + `GITLAB_TOKEN`), if configured.
    pub default_gitlab: Option<DefaultConnection>,
    /// Extra CA certificates (PEM) for self-managed GitLab.
    pub gitlab_ca_pem: Option<Vec<u8>>,
    /// Client-side GitLab request rate per host.
    pub gitlab_requests_per_second: Option<f64>,
    /// Every object is reconciled at least this often (drift correction).
    pub resync: Duration,
    /// `--access-policy`: who may use the default connection for what; `None` allows all.
    pub access_policy: Option<Arc<super::tenancy::AccessPolicyFile>>,
}

/// The operator-wide GitLab connection.
#[derive(Clone, Debug)]
pub struct DefaultConnection {
    pub url: Url,
    pub token: SecretString,
}

impl Default for OperatorConfig {
    fn default() -> Self {
        Self {
            default_gitlab: None,
            gitlab_ca_pem: None,
            gitlab_requests_per_second: None,
            resync: Duration::from_secs(600),
            access_policy: None,
        }
    }
}

/// The listings a controller with this resync keeps: at most half a resync old, so one
/// listing serves a group's resync wave (reconciles due at the same time) and the next wave
/// lists again. Drift made in GitLab is therefore seen at most 1.5 resyncs after it happened.
pub fn upstream_listings(resync: Duration) -> UpstreamListings {
    UpstreamListings::new(resync / 2)
}

/// The registry views of a `run` process with this resync: a view stands in for a read for
/// [`REGISTRY_VIEW_MAX_AGE`] at most, and never as long as half a resync, so every resync
/// reads every registry.
pub fn registry_views(resync: Duration) -> RegistryViews {
    RegistryViews::new(REGISTRY_VIEW_MAX_AGE.min(resync / 2))
}

/// GitLab clients, one per (url, token source), so connection pools and rate limiters are
/// shared between objects that use the same GitLab.
#[derive(Default)]
pub struct GitLabClients {
    clients: Mutex<HashMap<String, GitLabClient>>,
}

impl GitLabClients {
    /// The client for `key` (which must change when the token changes), built on first use.
    pub fn get_or_create(
        &self,
        key: &str,
        build: impl FnOnce() -> crate::gitlab::Result<GitLabClient>,
    ) -> crate::gitlab::Result<GitLabClient> {
        let mut clients = self
            .clients
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(client) = clients.get(key) {
            return Ok(client.clone());
        }
        let client = build()?;
        clients.insert(key.to_owned(), client.clone());
        Ok(client)
    }
}

pub struct Context {
    pub client: kube::Client,
    pub config: OperatorConfig,
    pub gitlab: GitLabClients,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub registries: Store<VirtualRegistry>,
    pub upstreams: Store<Upstream>,
    /// The CleanupPolicy store, for the ownership of GitLab cleanup policies; `None` when
    /// not shared with the context (then a policy contends with no other).
    pub policies: Option<Store<CleanupPolicy>>,
    /// Group upstream listings shared by the Upstream reconciles of a resync wave, at most
    /// half a resync old: one list per group per resync instead of one GET per Upstream.
    pub upstream_listings: UpstreamListings,
    /// What this process last saw of each registry, for the reruns that follow shortly after
    /// a reconcile (Upstreams getting their ids one after the other).
    pub registry_views: RegistryViews,
    /// The latest connection test of each Upstream, which status records only when its
    /// result changes.
    pub last_connectivity_checks: super::upstream::LastConnectivityChecks,
    /// The images Pods run (`keepInUse`); `None` when Pods are not watched.
    pub pods: Option<super::cleanup_policy::PodImages>,
    /// Whether the stores reconciles read hold their first full list.
    stores_listed: tokio::sync::watch::Sender<bool>,
    /// Consecutive failures per object, for backoff; cleared on success.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    pub fn new(
        client: kube::Client,
        config: OperatorConfig,
        metrics: Arc<Metrics>,
        registries: Store<VirtualRegistry>,
        upstreams: Store<Upstream>,
    ) -> Self {
        let reporter = Reporter {
            controller: super::FIELD_MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            upstream_listings: upstream_listings(config.resync),
            registry_views: registry_views(config.resync),
            config,
            gitlab: GitLabClients::default(),
            metrics,
            registries,
            upstreams,
            last_connectivity_checks: Default::default(),
            pods: None,
            policies: None,
            stores_listed: tokio::sync::watch::Sender::new(false),
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Tells the reconciles that the stores they read (VirtualRegistries, Upstreams) hold
    /// their first full list. `run` says so once the reflectors are ready.
    pub fn stores_listed(&self) {
        self.stores_listed.send_replace(true);
    }

    /// Waits until [`Context::stores_listed`]. Before that, an object still on its way looks
    /// missing: a registry would go `UpstreamNotFound` for a moment and an Upstream would
    /// pick another registry to be created through. (A watch channel, not each reconcile
    /// awaiting `Store::wait_until_ready`: a store wakes only the last of its waiters.)
    pub async fn stores_synced(&self) {
        let mut listed = self.stores_listed.subscribe();
        // The sender lives as long as the context.
        let _ = listed.wait_for(|listed| *listed).await;
    }

    /// Lets cleanups see the images Pods run (`keepInUse`).
    pub fn with_pods(mut self, pods: super::cleanup_policy::PodImages) -> Self {
        self.pods = Some(pods);
        self
    }

    /// Lets GitLab-run cleanup policies see each other (one owner per project's policy).
    pub fn with_policies(mut self, policies: Store<CleanupPolicy>) -> Self {
        self.policies = Some(policies);
        self
    }

    /// A client configuration with the operator's CA, rate and metrics settings.
    pub fn client_config(&self, url: Url, token: SecretString) -> ClientConfig {
        let mut config = ClientConfig::new(url, token);
        // A longer wait than this is handed back as RateLimited and becomes a requeue, so a
        // worker is never held by one object's Retry-After.
        config.max_retry_after = Duration::from_secs(10);
        config.extra_ca_pem = self.config.gitlab_ca_pem.clone();
        config.requests_per_second = self.config.gitlab_requests_per_second;
        config.metrics = Some(self.metrics.clone() as Arc<dyn RequestObserver>);
        config
    }

    /// Records a failure of `object` and returns how many happened in a row.
    pub fn record_failure(&self, object: &str) -> u32 {
        let mut failures = self
            .failures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = failures.entry(object.to_owned()).or_insert(0);
        *count += 1;
        *count
    }

    pub fn record_success(&self, object: &str) {
        let mut failures = self
            .failures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        failures.remove(object);
    }
}
