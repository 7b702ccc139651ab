//! The `run` command's process: one kube client, the controllers of all kinds with shared
//! reflector stores and GitLab client pool, the metrics and health server, Lease leader
//! election (only the leader reconciles; losing the lease ends the process so a standby takes
//! over), and a graceful stop on SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use futures::{StreamExt, TryStreamExt as _};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Config as ControllerConfig;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, WatchStreamExt as _, reflector, watcher};
use kube::{Api, Client, ResourceExt};

use super::context::{Context, OperatorConfig};
use super::metrics::Metrics;
use super::{cleanup_policy, registry, tenancy, triggers, upstream};
use crate::crd::{CleanupPolicy, Upstream, VirtualRegistry};

/// Settings of `run` besides the operator config.
#[derive(Clone, Debug)]
pub struct RuntimeOptions {
    pub metrics_addr: SocketAddr,
    pub leader_election: bool,
    pub leader_election_namespace: Option<String>,
    /// This instance's name in the Lease (default: POD_NAME, else host and process id).
    pub leader_election_identity: Option<String>,
    pub watch_namespace: Option<String>,
    /// At most this many reconciles of one kind at a time (0: unlimited). Bounds the burst of
    /// GitLab requests and memory when many objects change at once (start-up, a resync).
    pub max_concurrent_reconciles: u16,
}

/// The default of `--max-concurrent-reconciles`.
pub const DEFAULT_MAX_CONCURRENT_RECONCILES: u16 = 16;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot reach Kubernetes: {0}. Run inside a cluster, or point KUBECONFIG at a kubeconfig whose current context works (`kubectl get ns` should succeed)"
    )]
    NoCluster(String),
    #[error(
        "the gitlabregistry.io CRDs are not installed in this cluster. Install them with `gitlab-registry-operator crds | kubectl apply -f -` (or the Helm chart)"
    )]
    CrdsMissing,
    #[error("cannot serve metrics and health on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("leader election: {0}")]
    LeaderElection(String),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("a shared reflector store has no subscriber channel")]
    SharedStore,
}

/// Readiness shared with `/readyz`.
#[derive(Default)]
pub struct Health {
    ready: AtomicBool,
}

impl Health {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
struct ServerState {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

/// `/metrics`, `/healthz` (alive) and `/readyz` (caches synced, or standing by for the lease).
pub fn health_router(metrics: Arc<Metrics>, health: Arc<Health>) -> Router {
    Router::new()
        .route("/metrics", get(serve_metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(serve_readiness))
        .with_state(ServerState { metrics, health })
}

async fn serve_metrics(State(state): State<ServerState>) -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

async fn serve_readiness(State(state): State<ServerState>) -> (StatusCode, &'static str) {
    if state.health.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "caches not synced yet")
    }
}

/// Objects a slow subscriber may fall behind by before the watch waits for it.
const SUBSCRIBER_BUFFER: usize = 1024;

/// Name of the Lease the replicas compete for.
pub const LEASE_NAME: &str = "gitlab-registry-operator";

/// Waits until this instance holds the Lease. The receiver turns false if the lease is lost;
/// dropping it releases the lease (so a stopping leader hands over at once).
pub async fn acquire_lease(
    client: Client,
    namespace: &str,
    identity: &str,
) -> Result<tokio::sync::watch::Receiver<bool>, Error> {
    let manager = kube_lease_manager::LeaseManagerBuilder::new(client, LEASE_NAME)
        .with_namespace(namespace)
        .with_identity(identity)
        .with_duration(15)
        .with_grace(5)
        .build()
        .await
        .map_err(|error| Error::LeaderElection(error.to_string()))?;
    let (mut leader, _task) = manager.watch().await;
    leader
        .wait_for(|is_leader| *is_leader)
        .await
        .map_err(|error| Error::LeaderElection(error.to_string()))?;
    Ok(leader)
}

/// Runs until SIGTERM/SIGINT (then drains and returns `Ok`) or until the lease is lost.
pub async fn run(config: OperatorConfig, options: RuntimeOptions) -> Result<(), Error> {
    run_until(config, options, shutdown_signal()).await
}

/// Runs until `shutdown` completes (then drains in-flight reconciles and returns `Ok`) or
/// until the lease is lost. Tests and embedders stop it with their own future.
pub async fn run_until(
    config: OperatorConfig,
    options: RuntimeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let client = Client::try_default()
        .await
        .map_err(|error| Error::NoCluster(error.to_string()))?;
    run_with_client(client, config, options, shutdown).await
}

/// As [`run_until`], talking to Kubernetes through `client`: another identity than the
/// kubeconfig's (the e2e test runs as the chart's ServiceAccount), or a test's API server.
pub async fn run_with_client(
    client: Client,
    config: OperatorConfig,
    options: RuntimeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let shutdown = futures::FutureExt::shared(Box::pin(shutdown));
    check_crds_installed(&client, options.watch_namespace.as_deref()).await?;

    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(Health::default());
    let listener = tokio::net::TcpListener::bind(options.metrics_addr)
        .await
        .map_err(|source| Error::Bind {
            addr: options.metrics_addr,
            source,
        })?;
    tracing::info!(addr = %options.metrics_addr, "serving /metrics, /healthz and /readyz");
    let server = axum::serve(listener, health_router(metrics.clone(), health.clone()));
    tokio::spawn(async move {
        if let Err(error) = server.await {
            tracing::error!(%error, "metrics server stopped");
        }
    });

    let mut lost_lease = None;
    if options.leader_election {
        let namespace = options
            .leader_election_namespace
            .clone()
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .unwrap_or_else(|| "default".into());
        let identity = options
            .leader_election_identity
            .clone()
            .or_else(|| std::env::var("POD_NAME").ok())
            .unwrap_or_else(|| format!("{}-{}", hostname(), std::process::id()));
        // A standby is healthy and ready: it only waits for the lease.
        health.set_ready(true);
        tracing::info!(%identity, %namespace, "waiting for the lease {LEASE_NAME}");
        let leader = tokio::select! {
            leader = acquire_lease(client.clone(), &namespace, &identity) => leader?,
            () = shutdown.clone() => return Ok(()),
        };
        tracing::info!(%identity, "acquired the lease: reconciling");
        health.set_ready(false);
        lost_lease = Some(leader);
    }

    let registries_api: Api<VirtualRegistry> =
        scoped_api(&client, options.watch_namespace.as_deref());
    let upstreams_api: Api<Upstream> = scoped_api(&client, options.watch_namespace.as_deref());
    let secrets_api: Api<PartialObjectMeta<Secret>> =
        scoped_api(&client, options.watch_namespace.as_deref());
    // Secrets are watched for their identity only (metadata, stripped to name and version),
    // once for both controllers: a reconcile GETs the one Secret it reads. A full watch
    // would hold every Secret of the cluster (Helm releases: hundreds of KB each) twice.
    let (_secret_store, secret_writer) = reflector::store_shared(SUBSCRIBER_BUFFER);
    let registry_secret_changes = secret_writer.subscribe().ok_or(Error::SharedStore)?;
    let upstream_secret_changes = secret_writer.subscribe().ok_or(Error::SharedStore)?;
    let secret_task = tokio::spawn(
        watcher(secrets_api, watcher::Config::default())
            .default_backoff()
            .modify(triggers::keep_only_identity)
            .reflect_shared(secret_writer)
            .for_each(|_| std::future::ready(())),
    );

    // Each kind's own stream fills the store the other kind reads, and passes only the events
    // its controller must act on (see `triggers`).
    // Shared stores: a subscriber sees an object only after the store holds it, so a
    // registry triggered by an Upstream's new id reads that id from the Upstream store (two
    // separate watches could deliver the trigger before the store caught up).
    let (registry_store, registry_writer) = reflector::store_shared(SUBSCRIBER_BUFFER);
    let (upstream_store, upstream_writer) = reflector::store_shared(SUBSCRIBER_BUFFER);
    let registry_changes = registry_writer.subscribe().ok_or(Error::SharedStore)?;
    // Tenancy: a deleted owner, or one whose claims moved, hands its GitLab object to the
    // next contender; a changed access policy reconciles the objects whose verdict changed.
    let default_url = config.default_gitlab.as_ref().map(|d| d.url.clone());
    let registry_triggers = tenancy::Triggers::<VirtualRegistry>::new();
    let upstream_triggers = tenancy::Triggers::<Upstream>::new();
    let policy_triggers = tenancy::Triggers::<CleanupPolicy>::new();
    let upstream_changes = upstream_writer.subscribe().ok_or(Error::SharedStore)?;
    let registry_events = watcher(
        registries_api.clone(),
        watcher::Config::default().any_semantic(),
    )
    .default_backoff()
    .reflect_shared(registry_writer)
    .inspect_ok(
        tenancy::HandoverObserver::new(
            registry_store.clone(),
            default_url.clone(),
            registry_triggers.sender.clone(),
        )
        .into_fn(),
    )
    .applied_objects()
    .predicate_filter(triggers::spec_or_intent, Default::default());
    let upstream_events = watcher(
        upstreams_api.clone(),
        watcher::Config::default().any_semantic(),
    )
    .default_backoff()
    .reflect_shared(upstream_writer)
    .inspect_ok(
        tenancy::HandoverObserver::new(
            upstream_store.clone(),
            default_url.clone(),
            upstream_triggers.sender.clone(),
        )
        .into_fn(),
    )
    .applied_objects()
    .predicate_filter(triggers::spec_or_intent, Default::default());
    let controller_config =
        ControllerConfig::default().concurrency(options.max_concurrent_reconciles);
    let registry_controller = Controller::for_stream(registry_events, registry_store.clone())
        .with_config(controller_config.clone())
        .reconcile_on(registry_triggers.receiver);
    let upstream_controller = Controller::for_stream(upstream_events, upstream_store.clone())
        .with_config(controller_config.clone())
        .reconcile_on(upstream_triggers.receiver);
    // Pods, as their images only, for keepInUse; a run before the first full list deletes
    // nothing. Listed in pages (the default 500): a list "from any version" is served in one
    // piece, every Pod of the cluster decoded at once.
    let pods_api: Api<Pod> = scoped_api(&client, options.watch_namespace.as_deref());
    let pod_images = cleanup_policy::PodImages::default();
    let pod_task = tokio::spawn({
        let pod_images = pod_images.clone();
        watcher(pods_api, watcher::Config::default())
            .default_backoff()
            .for_each(move |event| {
                if let Ok(event) = event {
                    pod_images.apply(event);
                }
                std::future::ready(())
            })
    });

    let policies_api: Api<CleanupPolicy> = scoped_api(&client, options.watch_namespace.as_deref());
    let (policy_store, policy_writer) = reflector::store();
    let policy_events = watcher(policies_api, watcher::Config::default().any_semantic())
        .default_backoff()
        .reflect(policy_writer)
        .inspect_ok(
            tenancy::HandoverObserver::new(
                policy_store.clone(),
                default_url.clone(),
                policy_triggers.sender.clone(),
            )
            .into_fn(),
        )
        .applied_objects()
        .predicate_filter(triggers::spec_or_intent, Default::default());
    let policy_controller = Controller::for_stream(policy_events, policy_store.clone())
        .with_config(controller_config)
        .reconcile_on(policy_triggers.receiver)
        .graceful_shutdown_on(shutdown.clone());

    let context = Arc::new(
        Context::new(
            client.clone(),
            config,
            metrics.clone(),
            registry_store.clone(),
            upstream_store.clone(),
        )
        .with_pods(pod_images)
        .with_policies(policy_store.clone()),
    );
    let policy_watch = tokio::spawn(tenancy::watch_access_policy(
        context.clone(),
        tenancy::TriggerSenders {
            registries: registry_triggers.sender,
            upstreams: upstream_triggers.sender,
            policies: policy_triggers.sender,
        },
    ));

    // An Upstream change (a new GitLab id, above all) requeues the registries that list it.
    let registries_listing = registry_store.clone();
    let registry_controller = registry_controller
        .watches_shared_stream(
            triggers::changed_only(upstream_changes, triggers::upstream_identity),
            move |upstream: Arc<Upstream>| {
                let namespace = upstream.namespace();
                let name = upstream.name_any();
                registries_listing
                    .state()
                    .iter()
                    .filter(|registry| {
                        registry.namespace() == namespace
                            && registry.spec.upstreams.iter().any(|u| u.name == name)
                    })
                    .map(|registry| ObjectRef::from_obj(registry.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .watches_shared_stream(
            triggers::changed_only(registry_secret_changes, triggers::secret_version),
            {
                let registries = registry_store.clone();
                move |secret: Arc<PartialObjectMeta<Secret>>| {
                    triggers::readers_of(&registries.state(), &secret, triggers::registry_reads)
                }
            },
        )
        .graceful_shutdown_on(shutdown.clone());
    // A registry change (its GitLab id, above all) requeues the upstreams it lists; a Secret
    // change requeues the upstreams whose credentials or token it holds.
    let upstream_controller = upstream_controller
        .watches_shared_stream(
            triggers::changed_only(registry_changes, triggers::registry_identity),
            |registry: Arc<VirtualRegistry>| {
                let namespace = registry.namespace().unwrap_or_default();
                registry
                    .spec
                    .upstreams
                    .iter()
                    .map(|u| ObjectRef::<Upstream>::new(&u.name).within(&namespace))
                    .collect::<Vec<_>>()
            },
        )
        .watches_shared_stream(
            triggers::changed_only(upstream_secret_changes, triggers::secret_version),
            {
                let upstreams = upstream_store.clone();
                move |secret: Arc<PartialObjectMeta<Secret>>| {
                    triggers::readers_of(&upstreams.state(), &secret, triggers::upstream_reads)
                }
            },
        )
        .graceful_shutdown_on(shutdown.clone());

    // Awaited here, in the task that drives the watches, and handed to the reconciles
    // through the context: a store wakes only the last of its waiters.
    let readiness = {
        let health = health.clone();
        let context = context.clone();
        let (registries, upstreams, policies) = (
            registry_store.clone(),
            upstream_store.clone(),
            policy_store.clone(),
        );
        async move {
            if registries.wait_until_ready().await.is_ok()
                && upstreams.wait_until_ready().await.is_ok()
            {
                context.stores_listed();
                if policies.wait_until_ready().await.is_ok() {
                    tracing::info!("caches synced");
                    health.set_ready(true);
                }
            }
        }
    };
    let registries = registry_controller
        .run(registry::reconcile, registry::error_policy, context.clone())
        .for_each(|result| async move { log_result(result) });
    let upstreams = upstream_controller
        .run(upstream::reconcile, upstream::error_policy, context.clone())
        .for_each(|result| async move { log_result(result) });
    let policies = policy_controller
        .run(
            cleanup_policy::reconcile,
            cleanup_policy::error_policy,
            context.clone(),
        )
        .for_each(|result| async move { log_result(result) });
    let controllers = async {
        tokio::join!(registries, upstreams, policies, readiness);
        pod_task.abort();
        policy_watch.abort();
        secret_task.abort();
    };
    match lost_lease {
        None => controllers.await,
        Some(mut leader) => {
            tokio::select! {
                () = controllers => {}
                _ = leader.wait_for(|is_leader| !*is_leader) => {
                    return Err(Error::LeaderElection("lost the lease: stopping so that another replica takes over".into()));
                }
            }
        }
    }
    tracing::info!("stopped");
    Ok(())
}

fn log_result<T: std::fmt::Debug, E: std::fmt::Display>(result: Result<T, E>) {
    match result {
        Ok(object) => tracing::debug!(?object, "reconciled"),
        Err(error) => tracing::debug!(%error, "reconcile failed"),
    }
}

fn scoped_api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    }
}

/// A cheap request that fails with 404 when the CRDs are missing.
async fn check_crds_installed(client: &Client, namespace: Option<&str>) -> Result<(), Error> {
    let api: Api<VirtualRegistry> = scoped_api(client, namespace);
    match api.list(&kube::api::ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Err(Error::CrdsMissing),
        Err(error) => Err(Error::NoCluster(error.to_string())),
    }
}

/// SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = terminate.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_else(|_| "gitlab-registry-operator".into())
}

/// The default resync interval as accepted on the command line.
pub const DEFAULT_RESYNC: Duration = Duration::from_secs(600);

#[cfg(test)]
mod tests {
    use super::*;

    async fn serve(metrics: Arc<Metrics>, health: Arc<Health>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move {
            let _ = axum::serve(listener, health_router(metrics, health)).await;
        });
        format!("http://{address}")
    }

    #[tokio::test]
    async fn health_readiness_and_metrics_over_http() {
        let metrics = Arc::new(Metrics::default());
        let health = Arc::new(Health::default());
        let base = serve(metrics.clone(), health.clone()).await;
        let http = reqwest::Client::new();

        let alive = http
            .get(format!("{base}/healthz"))
            .send()
            .await
            .expect("answers");
        assert_eq!(alive.status(), 200);
        let not_ready = http
            .get(format!("{base}/readyz"))
            .send()
            .await
            .expect("answers");
        assert_eq!(
            not_ready.status(),
            503,
            "not ready before the caches synced"
        );
        health.set_ready(true);
        let ready = http
            .get(format!("{base}/readyz"))
            .send()
            .await
            .expect("answers");
        assert_eq!(ready.status(), 200);

        metrics.reconcile_started("VirtualRegistry");
        let exposition = http
            .get(format!("{base}/metrics"))
            .send()
            .await
            .expect("answers");
        assert!(
            exposition.headers()["content-type"]
                .to_str()
                .unwrap_or_default()
                .starts_with("application/openmetrics-text")
        );
        let text = exposition.text().await.expect("text");
        assert!(
            text.contains("gitlab_registry_operator_reconciles_total{kind=\"VirtualRegistry\"} 1"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "OpenMetrics ends with EOF");
    }
}
