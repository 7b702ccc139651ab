//! Fault and abuse suite: nothing lost, nothing leaked, nothing wrongly deleted.
//!
//! Each test injects a fault (GitLab simulator faults, a mocked Kubernetes API server in
//! kube-rs's tower-test pattern, state changed behind the operator's back) and asserts the
//! outcome: conditions with their reasons, GitLab's state, and request counts bounded by the
//! client's retry budget. The README's "Fault and abuse suite" section maps each case of the
//! issue to these tests and to the tests of other files this suite relies on.
//!
//! Time is never waited for in minutes: an outage "for minutes" is a run of failing
//! reconciles whose requeue delays (computed by the controller's error policy) add up to
//! minutes, and a slow answer is a `delay` fault longer than the client's timeout.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use base64::Engine as _;
use gitlab_registry_operator::cleanup::{InUseIndex, RuleSpec};
use gitlab_registry_operator::controller::context::DefaultConnection;
use gitlab_registry_operator::controller::metrics::Metrics;
use gitlab_registry_operator::controller::{self, Context, OperatorConfig};
use gitlab_registry_operator::crd::cleanup_policy::RunOutcome;
use gitlab_registry_operator::crd::{self, Upstream, VirtualRegistry, validation};
use gitlab_registry_operator::gitlab::{ClientConfig, GitLabClient, PathOrId};
use gitlab_registry_operator::sim::seed::{
    SeedGroup, SeedProject, SeedProtectionRule, SeedRepository, SeedTag,
};
use gitlab_registry_operator::sim::upstream_stub::{StubBehaviour, UpstreamStub};
use gitlab_registry_operator::sim::{
    AccessLevel, FaultAction, FaultSpec, OneShotFault, Seed, SimConfig, SimHandle, Simulator,
};
use gitlab_registry_operator::standalone;
use gitlab_registry_operator::sync::cleanup::{
    CleanupReport, CleanupRun, CleanupTarget, InUse, RunLimits, Safety, run_cleanup,
};
use gitlab_registry_operator::sync::registry::{
    self, DesiredMember, DesiredRegistry, KnownRegistry, RegistryRequest, Resolution,
};
use gitlab_registry_operator::sync::upstream::{
    self, DesiredUpstream, KnownUpstream, UpstreamRequest,
};
use gitlab_registry_operator::sync::{Action, Mode};
use http::{Request, Response};
use jiff::{SignedDuration, Timestamp};
use kube::client::Body;
use kube::runtime::controller::Action as Requeue;
use kube::runtime::reflector::store;
use kube::runtime::watcher;
use secrecy::SecretString;
use serde_json::{Value, json};

/// Distinctive values, so that a leak anywhere is found by a plain substring search.
const TOKEN: &str = "glpat-faults-token-9f1c2d7e";
const REVOKED_TOKEN: &str = "glpat-revoked-token-77aa1e03";
const PASSWORD: &str = "upstream-pass-5be1c9d2";
const ROTATED_PASSWORD: &str = "upstream-pass-rotated-0c4f8a61";
const USERNAME: &str = "robot";

const NAMESPACE: &str = "team";
const FINALIZER: &str = "gitlabregistry.io/finalizer";
const GROUP: &str = "my-org";
const GROUP_ID: u64 = 100;
const RESYNC: Duration = Duration::from_secs(600);

const REGISTRIES: &str = "/groups/:id/-/virtual_registries/container/registries";
const REGISTRY_UPSTREAMS: &str = "/virtual_registries/container/registries/:id/upstreams";
const ASSOCIATIONS: &str = "/virtual_registries/container/registry_upstreams";
const GROUP_UPSTREAMS: &str = "/groups/:id/-/virtual_registries/container/upstreams";
const TAGS: &str = "/projects/:id/registry/repositories/:repository_id/tags";
const TAG: &str = "/projects/:id/registry/repositories/:repository_id/tags/:tag_name";

#[path = "support/harness.rs"]
mod harness;
#[path = "support/kube_api.rs"]
mod kube_api;

use harness::guarded;
use kube_api::{ApiServer, Seen};

fn secret(namespace: &str, name: &str, version: &str, data: &[(&str, &str)]) -> Value {
    let data: serde_json::Map<String, Value> = data
        .iter()
        .map(|(key, value)| {
            (
                (*key).to_owned(),
                json!(base64::engine::general_purpose::STANDARD.encode(value)),
            )
        })
        .collect();
    json!({"apiVersion": "v1", "kind": "Secret",
           "metadata": {"name": name, "namespace": namespace, "resourceVersion": version},
           "data": data})
}

fn status_patches(seen: &[Seen]) -> Vec<&Seen> {
    seen.iter()
        .filter(|s| s.method == "PATCH" && s.path.ends_with("/status"))
        .collect()
}

/// The status of the last status patch in `seen`.
fn last_status(seen: &[Seen]) -> Value {
    status_patches(seen)
        .last()
        .map(|patch| patch.body["status"].clone())
        .unwrap_or_else(|| panic!("a status patch in {seen:#?}"))
}

/// `(type, reason)` of every Event published: new ones are POSTed, repeats of the same
/// reason are PATCHed onto the first as a series by kube's recorder.
fn events(seen: &[Seen]) -> Vec<(String, String)> {
    seen.iter()
        .filter(|s| s.path.contains("/events"))
        .map(|s| {
            (
                s.body["type"].as_str().unwrap_or_default().to_owned(),
                s.body["reason"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// `(status, reason, message)` of condition `type_`.
fn condition(status: &Value, type_: &str) -> (String, String, String) {
    let found = status["conditions"]
        .as_array()
        .and_then(|list| list.iter().find(|c| c["type"] == type_))
        .unwrap_or_else(|| panic!("condition {type_} in {status}"));
    let text = |field: &str| found[field].as_str().unwrap_or_default().to_owned();
    (text("status"), text("reason"), text("message"))
}

// ---- one operator instance: a Context against the simulator and a mocked apiserver ------

struct Operator {
    api: ApiServer,
    ctx: Arc<Context>,
    registries: store::Writer<VirtualRegistry>,
    upstreams: store::Writer<Upstream>,
}

/// How many attempts the controller's GitLab client makes per request.
fn controller_attempts() -> u64 {
    let config = ClientConfig::new(
        "https://gitlab.example.com".parse().expect("url"),
        SecretString::from("x"),
    );
    u64::from(config.max_retries) + 1
}

impl Operator {
    /// An operator whose default connection (if `token`) points at `sim`. Its default GitLab
    /// client is the production configuration with a 5 ms retry base, so that retry budgets
    /// are exercised without waiting seconds: the retry count stays the production one.
    fn start(sim: &SimHandle, token: Option<&str>, secrets: Vec<Value>) -> Self {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(service, "default");
        let api = ApiServer::start(handle, secrets);
        let url: url::Url = sim.base_url().parse().expect("url");
        let config = OperatorConfig {
            default_gitlab: token.map(|token| DefaultConnection {
                url: url.clone(),
                token: SecretString::from(token),
            }),
            resync: RESYNC,
            ..OperatorConfig::default()
        };
        let (registry_store, registries) = store::store::<VirtualRegistry>();
        let (upstream_store, upstreams) = store::store::<Upstream>();
        let ctx = Arc::new(Context::new(
            client,
            config,
            Arc::new(Metrics::default()),
            registry_store,
            upstream_store,
        ));
        // The stores are listed (empty) as `run` says once its reflectors are ready.
        ctx.stores_listed();
        if let Some(token) = token {
            // Same key the controller uses for the default connection (`<url>|default`).
            let mut config = ctx.client_config(url.clone(), SecretString::from(token));
            config.retry_base_delay = Duration::from_millis(5);
            ctx.gitlab
                .get_or_create(&format!("{url}|default"), || GitLabClient::new(config))
                .expect("client");
        }
        Self {
            api,
            ctx,
            registries,
            upstreams,
        }
    }

    fn know_registry(&mut self, registry: &VirtualRegistry) {
        self.registries
            .apply_watcher_event(&watcher::Event::Apply(registry.clone()));
    }

    fn know_upstream(&mut self, upstream: &Upstream) {
        self.upstreams
            .apply_watcher_event(&watcher::Event::Apply(upstream.clone()));
    }

    async fn reconcile_registry(&self, registry: &VirtualRegistry) -> controller::Result<Requeue> {
        controller::registry::reconcile(Arc::new(registry.clone()), self.ctx.clone()).await
    }

    async fn reconcile_upstream(&self, upstream: &Upstream) -> controller::Result<Requeue> {
        controller::upstream::reconcile(Arc::new(upstream.clone()), self.ctx.clone()).await
    }

    fn registry_error_policy(
        &self,
        registry: &VirtualRegistry,
        error: &controller::Error,
    ) -> Requeue {
        controller::registry::error_policy(Arc::new(registry.clone()), error, self.ctx.clone())
    }
}

fn sim_config(token: &str) -> SimConfig {
    SimConfig {
        allow_local_network: true,
        ..SimConfig::with_token(token)
    }
}

fn group_seed() -> Seed {
    Seed {
        groups: vec![SeedGroup {
            id: GROUP_ID,
            full_path: GROUP.into(),
            name: None,
        }],
        ..Seed::default()
    }
}

async fn simulator() -> SimHandle {
    Simulator::start(sim_config(TOKEN), group_seed())
        .await
        .expect("simulator")
}

fn registry_object(name: &str, upstreams: &[&str], extra_spec: Value) -> VirtualRegistry {
    let list: Vec<Value> = upstreams.iter().map(|name| json!({"name": name})).collect();
    let mut spec = json!({"group": GROUP, "upstreams": list});
    merge(&mut spec, extra_spec);
    serde_json::from_value(json!({
        "apiVersion": "gitlabregistry.io/v1alpha1", "kind": "VirtualRegistry",
        "metadata": {"name": name, "namespace": NAMESPACE, "uid": format!("uid-{name}"),
                     "generation": 1, "resourceVersion": "1", "finalizers": [FINALIZER]},
        "spec": spec,
    }))
    .expect("VirtualRegistry")
}

fn upstream_object(name: &str, url: &str, extra_spec: Value) -> Upstream {
    let mut spec = json!({"group": GROUP, "url": url});
    merge(&mut spec, extra_spec);
    serde_json::from_value(json!({
        "apiVersion": "gitlabregistry.io/v1alpha1", "kind": "Upstream",
        "metadata": {"name": name, "namespace": NAMESPACE, "uid": format!("uid-{name}"),
                     "generation": 1, "resourceVersion": "1", "finalizers": [FINALIZER]},
        "spec": spec,
    }))
    .expect("Upstream")
}

fn merge(base: &mut Value, extra: Value) {
    if let (Some(base), Value::Object(extra)) = (base.as_object_mut(), extra) {
        base.extend(extra);
    }
}

fn with_status<K: serde::Serialize + serde::de::DeserializeOwned>(object: &K, status: &Value) -> K {
    let mut value = serde_json::to_value(object).expect("json");
    value["status"] = status.clone();
    serde_json::from_value(value).expect("object with status")
}

/// The delay of a requeue (kube's `Action` has no getter; delays here are whole seconds).
fn delay_of(requeue: &Requeue) -> Duration {
    (0..=3600)
        .map(Duration::from_secs)
        .find(|delay| *requeue == Requeue::requeue(*delay))
        .unwrap_or_else(|| panic!("a requeue within an hour: {requeue:?}"))
}

fn fault(count: u32, method: &str, route: &str, action: FaultAction) -> FaultSpec {
    FaultSpec {
        once: vec![OneShotFault {
            count,
            method: Some(method.into()),
            route: Some(route.into()),
            fault: action,
        }],
        ..FaultSpec::default()
    }
}

fn total_requests(sim: &SimHandle) -> u64 {
    sim.request_counts().values().sum()
}

// ---- 1. GitLab faults ----------------------------------------------------------------------

#[tokio::test]
async fn a_500_burst_is_absorbed_by_retries_and_a_longer_one_is_gitlab_unavailable_then_recovers() {
    guarded(async {
        let sim = simulator().await;
        let operator = Operator::start(&sim, Some(TOKEN), Vec::new());
        let attempts = controller_attempts();

        // A burst shorter than the retry budget: the reconcile succeeds on its own.
        sim.inject_fault(fault(
            (attempts - 1) as u32,
            "GET",
            REGISTRIES,
            FaultAction::Status { status: 500 },
        ));
        let cache = registry_object("cache", &[], json!({}));
        operator.reconcile_registry(&cache).await.expect("absorbed");
        assert_eq!(sim.request_count("GET", REGISTRIES), attempts);
        assert_eq!(sim.request_count("POST", REGISTRIES), 1);
        let seen = operator.api.take();
        assert_eq!(condition(&last_status(&seen), "Ready").0, "True");

        // A burst as long as the budget: GitLabUnavailable, bounded requests, no create.
        sim.reset_request_counts();
        sim.inject_fault(fault(
            attempts as u32,
            "GET",
            REGISTRIES,
            FaultAction::Status { status: 500 },
        ));
        let mirror = registry_object("mirror", &[], json!({}));
        let error = operator
            .reconcile_registry(&mirror)
            .await
            .expect_err("down");
        assert_eq!(error.reason(), "GitLabUnavailable");
        assert!(error.is_transient());
        assert_eq!(total_requests(&sim), attempts, "{:?}", sim.request_counts());
        let seen = operator.api.take();
        let status = last_status(&seen);
        let (synced, reason, message) = condition(&status, "Synced");
        assert_eq!(
            (synced.as_str(), reason.as_str()),
            ("False", "GitLabUnavailable")
        );
        assert!(message.contains("500"), "{message}");
        assert_eq!(condition(&status, "Ready").0, "False");
        assert!(events(&seen).contains(&("Warning".into(), "GitLabUnavailable".into())));
        let requeue = operator.registry_error_policy(&mirror, &error);
        assert_eq!(requeue, Requeue::requeue(Duration::from_secs(5)));

        // Next attempt: recovered by itself, exactly one registry of that name.
        operator
            .reconcile_registry(&with_status(&mirror, &status))
            .await
            .expect("recovered");
        let status = last_status(&operator.api.take());
        assert_eq!(condition(&status, "Ready").0, "True");
        let names: Vec<String> = sim
            .snapshot()
            .registries
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(names, ["cache", "mirror"]);
    })
    .await;
}

#[tokio::test]
async fn connection_resets_are_retried_on_reads_and_never_replayed_on_creates() {
    guarded(async {
        let sim = simulator().await;
        let operator = Operator::start(&sim, Some(TOKEN), Vec::new());
        let mut faults = fault(2, "GET", REGISTRIES, FaultAction::Drop);
        faults
            .once
            .extend(fault(1, "POST", REGISTRIES, FaultAction::Drop).once);
        sim.inject_fault(faults);
        let cache = registry_object("cache", &[], json!({}));

        let error = operator
            .reconcile_registry(&cache)
            .await
            .expect_err("reset");
        assert_eq!(error.reason(), "GitLabUnavailable");
        assert!(error.is_transient());
        assert_eq!(
            sim.request_count("GET", REGISTRIES),
            3,
            "two resets retried"
        );
        assert_eq!(
            sim.request_count("POST", REGISTRIES),
            1,
            "a POST is not replayed"
        );
        assert!(sim.snapshot().registries.is_empty());
        let status = last_status(&operator.api.take());
        assert_eq!(condition(&status, "Synced").1, "GitLabUnavailable");

        operator
            .reconcile_registry(&with_status(&cache, &status))
            .await
            .expect("recovered");
        assert_eq!(sim.request_count("POST", REGISTRIES), 2);
        assert_eq!(sim.snapshot().registries.len(), 1);
    })
    .await;
}

/// A client straight to the simulator with a short timeout and fast retries.
fn impatient_client(sim: &SimHandle, token: &str) -> GitLabClient {
    let mut config = ClientConfig::new(
        sim.base_url().parse().expect("url"),
        SecretString::from(token),
    );
    config.request_timeout = Duration::from_millis(500);
    config.retry_base_delay = Duration::from_millis(5);
    config.max_retries = 2;
    config.max_retry_after = Duration::from_secs(1);
    GitLabClient::new(config).expect("client")
}

fn desired_registry(name: &str, members: &[(&str, Resolution)]) -> RegistryRequest {
    RegistryRequest {
        desired: DesiredRegistry {
            group: PathOrId::parse(GROUP),
            name: name.into(),
            description: None,
            members: members
                .iter()
                .map(|(name, resolution)| DesiredMember {
                    name: (*name).into(),
                    resolution: resolution.clone(),
                })
                .collect(),
        },
        known: KnownRegistry::default(),
        purge_cache_request: None,
        mode: Mode::Apply,
    }
}

fn desired_upstream(name: &str, url: &str, registry_for_create: Option<i64>) -> UpstreamRequest {
    UpstreamRequest {
        desired: DesiredUpstream {
            group: PathOrId::parse(GROUP),
            name: name.into(),
            url: url.into(),
            description: None,
            cache_validity_hours: 24,
            credentials: None,
            gate_changes: true,
            connectivity_interval: RESYNC,
        },
        known: KnownUpstream::default(),
        registry_for_create: registry_for_create
            .map(gitlab_registry_operator::sync::upstream::CreateThrough::Registry),
        purge_cache_request: None,
        now: Timestamp::now(),
        mode: Mode::Apply,
    }
}

fn reasons(actions: &[Action]) -> Vec<&'static str> {
    actions.iter().map(|action| action.reason).collect()
}

#[tokio::test]
async fn creates_gitlab_carried_out_but_answered_after_the_timeout_are_adopted_not_duplicated() {
    guarded(async {
        let sim = simulator().await;
        let client = impatient_client(&sim, TOKEN);
        let slow = || FaultAction::Delay { delay_ms: 3_000 };

        // The registry POST: executed, answered too late.
        sim.inject_fault(fault(1, "POST", REGISTRIES, slow()));
        let request = desired_registry("cache", &[]);
        let timed_out = registry::reconcile(&client, &request).await;
        let error = timed_out.error.expect("timed out");
        assert_eq!(error.reason(), "GitLabUnavailable");
        assert!(error.is_transient());
        assert_eq!(timed_out.registry_id, None, "the answer never came");
        assert_eq!(sim.snapshot().registries.len(), 1, "GitLab carried it out");
        assert_eq!(
            sim.request_count("POST", REGISTRIES),
            1,
            "a POST is not replayed"
        );
        let adopted = registry::reconcile(&client, &request).await;
        assert!(adopted.error.is_none(), "{:?}", adopted.error);
        assert_eq!(reasons(&adopted.actions), ["Adopted"]);
        assert_eq!(sim.request_count("POST", REGISTRIES), 1);
        let registry_id = adopted.registry_id.expect("id");
        assert_eq!(sim.snapshot().registries.len(), 1);

        // The upstream POST through the registry: adopted by name and url.
        let stub = UpstreamStub::start(StubBehaviour::default())
            .await
            .expect("stub");
        sim.inject_fault(fault(1, "POST", REGISTRY_UPSTREAMS, slow()));
        let request = desired_upstream("dockerhub", &stub.url(), Some(registry_id));
        let timed_out = upstream::reconcile(&client, &request).await;
        assert_eq!(
            timed_out.error.expect("timed out").reason(),
            "GitLabUnavailable"
        );
        assert_eq!(sim.snapshot().upstreams.len(), 1, "GitLab carried it out");
        let adopted = upstream::reconcile(&client, &request).await;
        assert!(adopted.error.is_none(), "{:?}", adopted.error);
        assert!(reasons(&adopted.actions).contains(&"Adopted"));
        assert_eq!(sim.request_count("POST", REGISTRY_UPSTREAMS), 1);
        let upstream_id = adopted.upstream_id.expect("id");
        let snapshot = sim.snapshot();
        assert_eq!(snapshot.upstreams.len(), 1);
        assert_eq!(snapshot.associations.len(), 1);

        // An association POST for a second registry.
        let mirror = registry::reconcile(&client, &desired_registry("mirror", &[])).await;
        let mirror_id = mirror.registry_id.expect("mirror");
        sim.inject_fault(fault(1, "POST", ASSOCIATIONS, slow()));
        let mut request = desired_registry(
            "mirror",
            &[("dockerhub", Resolution::Resolved(upstream_id))],
        );
        request.known.registry_id = Some(mirror_id);
        let timed_out = registry::reconcile(&client, &request).await;
        assert_eq!(
            timed_out.error.expect("timed out").reason(),
            "GitLabUnavailable"
        );
        let converged = registry::reconcile(&client, &request).await;
        assert!(converged.error.is_none(), "{:?}", converged.error);
        assert!(converged.actions.is_empty(), "{:?}", converged.actions);
        assert_eq!(sim.request_count("POST", ASSOCIATIONS), 1);
        let snapshot = sim.snapshot();
        assert_eq!(snapshot.associations.len(), 2);
        assert_eq!(converged.members.len(), 1);
        assert_eq!(converged.members[0].upstream_id, upstream_id);
    })
    .await;
}

#[tokio::test]
async fn gitlab_down_for_minutes_backs_off_without_a_request_storm_and_recovers_by_itself() {
    guarded(async {
        let sim = simulator().await;
        let operator = Operator::start(&sim, Some(TOKEN), Vec::new());
        let attempts = controller_attempts();
        let cache = registry_object("cache", &[], json!({}));
        sim.inject_fault(FaultSpec {
            error_rate: Some(1.0),
            error_status: Some(503),
            ..FaultSpec::default()
        });

        // The controller's schedule while GitLab stays down: each failing reconcile is followed
        // by the error policy's requeue delay (simulated time: nothing waits for it).
        let mut outage = Duration::ZERO;
        let mut delays = Vec::new();
        let mut current = cache.clone();
        for _ in 0..7 {
            sim.reset_request_counts();
            let error = operator
                .reconcile_registry(&current)
                .await
                .expect_err("down");
            assert_eq!(error.reason(), "GitLabUnavailable");
            assert_eq!(
                total_requests(&sim),
                attempts,
                "one request, retried, per reconcile"
            );
            let seen = operator.api.take();
            // The first failure writes the status; the same failure again changes nothing.
            if !status_patches(&seen).is_empty() {
                current = with_status(&cache, &last_status(&seen));
            }
            assert_eq!(
                condition(&current_status(&current), "Synced").1,
                "GitLabUnavailable"
            );
            let delay = delay_of(&operator.registry_error_policy(&current, &error));
            outage += delay;
            delays.push(delay.as_secs());
        }
        assert_eq!(delays, [5, 10, 20, 40, 80, 160, 300]);
        assert!(outage >= Duration::from_secs(10 * 60), "{outage:?}");
        // Fewer than one GitLab request every 10 s of outage, on average.
        assert!(attempts * 7 * 10 < outage.as_secs());
        assert!(sim.snapshot().registries.is_empty());

        // GitLab is back: the next scheduled reconcile converges, once.
        sim.clear_faults();
        operator
            .reconcile_registry(&current)
            .await
            .expect("recovered");
        let status = last_status(&operator.api.take());
        assert_eq!(condition(&status, "Ready").0, "True");
        assert_eq!(sim.snapshot().registries.len(), 1);
        // Success reset the backoff: a new failure starts again at 5 s.
        sim.inject_fault(FaultSpec {
            error_rate: Some(1.0),
            error_status: Some(502),
            ..FaultSpec::default()
        });
        let current = with_status(&cache, &status);
        let error = operator
            .reconcile_registry(&current)
            .await
            .expect_err("down again");
        assert_eq!(
            operator.registry_error_policy(&current, &error),
            Requeue::requeue(Duration::from_secs(5))
        );
    })
    .await;
}

fn current_status(registry: &VirtualRegistry) -> Value {
    serde_json::to_value(registry).expect("json")["status"].clone()
}

#[tokio::test]
async fn a_long_rate_limit_costs_one_request_per_reconcile_and_waits_gitlabs_delay() {
    guarded(async {
        let sim = simulator().await;
        let operator = Operator::start(&sim, Some(TOKEN), Vec::new());
        sim.inject_fault(FaultSpec {
            error_rate: Some(1.0),
            error_status: Some(429),
            retry_after_seconds: Some(120),
            ..FaultSpec::default()
        });
        let cache = registry_object("cache", &[], json!({}));
        for _ in 0..3 {
            sim.reset_request_counts();
            let error = operator
                .reconcile_registry(&cache)
                .await
                .expect_err("limited");
            assert_eq!(error.reason(), "RateLimited");
            assert!(error.is_transient());
            assert_eq!(
                total_requests(&sim),
                1,
                "a Retry-After beyond 10 s is not waited in-call"
            );
            assert_eq!(
                operator.registry_error_policy(&cache, &error),
                Requeue::requeue(Duration::from_secs(120))
            );
        }
        let status = last_status(&operator.api.take());
        let (_, reason, message) = condition(&status, "Synced");
        assert_eq!(reason, "RateLimited");
        assert!(message.contains("Retry later"), "{message}");

        // A short Retry-After is waited out inside the call: one reconcile, Ready.
        sim.clear_faults();
        sim.inject_fault(fault(
            1,
            "GET",
            REGISTRIES,
            FaultAction::RateLimited {
                retry_after_seconds: 1,
            },
        ));
        sim.reset_request_counts();
        operator
            .reconcile_registry(&with_status(&cache, &status))
            .await
            .expect("waited");
        assert_eq!(sim.request_count("GET", REGISTRIES), 2);
        assert_eq!(sim.snapshot().registries.len(), 1);
    })
    .await;
}

// ---- 2. Lost state -------------------------------------------------------------------------

/// A registry `cache` listing `dockerhub`, both created through the controller; returns the
/// objects with the statuses the controller wrote.
async fn created_pair(operator: &mut Operator, stub: &UpstreamStub) -> (VirtualRegistry, Upstream) {
    let registry = registry_object("cache", &["dockerhub"], json!({}));
    let upstream = upstream_object("dockerhub", &stub.url(), json!({}));
    operator.know_upstream(&upstream);
    operator
        .reconcile_registry(&registry)
        .await
        .expect("registry");
    let registry = with_status(&registry, &last_status(&operator.api.take()));
    operator.know_registry(&registry);
    operator
        .reconcile_upstream(&upstream)
        .await
        .expect("upstream");
    let upstream = with_status(&upstream, &last_status(&operator.api.take()));
    operator.know_upstream(&upstream);
    operator
        .reconcile_registry(&registry)
        .await
        .expect("registry");
    let registry = with_status(&registry, &last_status(&operator.api.take()));
    operator.know_registry(&registry);
    (registry, upstream)
}

#[tokio::test]
async fn a_wiped_status_or_a_recreated_object_adopts_what_gitlab_has() {
    guarded(async {
        let sim = simulator().await;
        let mut operator = Operator::start(&sim, Some(TOKEN), Vec::new());
        let stub = UpstreamStub::start(StubBehaviour::default())
            .await
            .expect("stub");
        let (registry, upstream) = created_pair(&mut operator, &stub).await;
        let registry_id = current_status(&registry)["registryId"].clone();
        let upstream_id =
            serde_json::to_value(&upstream).expect("json")["status"]["upstreamId"].clone();
        assert!(registry_id.is_i64() && upstream_id.is_i64());

        // Deleted with the status lost and created again under the same name: new uid, no
        // status, the upstream's status gone too (the registry sees it as pending).
        let mut again_registry = registry_object("cache", &["dockerhub"], json!({}));
        again_registry.metadata.uid = Some("uid-cache-again".into());
        let mut again_upstream = upstream_object("dockerhub", &stub.url(), json!({}));
        again_upstream.metadata.uid = Some("uid-dockerhub-again".into());
        operator.know_upstream(&again_upstream);
        sim.reset_request_counts();

        operator
            .reconcile_registry(&again_registry)
            .await
            .expect("adopted");
        let status = last_status(&operator.api.take());
        assert_eq!(status["registryId"], registry_id);
        operator.know_registry(&with_status(&again_registry, &status));
        operator
            .reconcile_upstream(&again_upstream)
            .await
            .expect("adopted");
        let seen = operator.api.take();
        let upstream_status = last_status(&seen);
        assert_eq!(upstream_status["upstreamId"], upstream_id);
        assert!(events(&seen).contains(&("Normal".into(), "Adopted".into())));

        assert_eq!(sim.request_count("POST", REGISTRIES), 0);
        assert_eq!(sim.request_count("POST", REGISTRY_UPSTREAMS), 0);
        assert_eq!(
            sim.request_count(
                "DELETE",
                "/virtual_registries/container/registry_upstreams/:id"
            ),
            0,
            "nothing removed while the member was pending"
        );
        let snapshot = sim.snapshot();
        assert_eq!(snapshot.registries.len(), 1);
        assert_eq!(snapshot.upstreams.len(), 1);
        assert_eq!(snapshot.associations.len(), 1);
    })
    .await;
}

#[tokio::test]
async fn a_registry_renamed_or_deleted_in_gitlab_is_corrected_with_status_and_events() {
    guarded(async {
        let sim = simulator().await;
        let operator = Operator::start(&sim, Some(TOKEN), Vec::new());
        let cache = registry_object("cache", &[], json!({}));
        operator.reconcile_registry(&cache).await.expect("created");
        let status = last_status(&operator.api.take());
        let id = status["registryId"].as_u64().expect("id");
        let cache = with_status(&cache, &status);

        sim.with_state(|state| state.update_registry(id, Some("renamed-in-the-ui"), None))
            .expect("rename");
        operator
            .reconcile_registry(&cache)
            .await
            .expect("corrected");
        let seen = operator.api.take();
        assert_eq!(events(&seen), [("Normal".to_owned(), "Updated".to_owned())]);
        assert!(
            status_patches(&seen).is_empty(),
            "status unchanged: no patch"
        );
        assert_eq!(sim.snapshot().registries[0].name, "cache");

        sim.with_state(|state| state.delete_registry(id))
            .expect("delete");
        operator
            .reconcile_registry(&cache)
            .await
            .expect("re-created");
        let seen = operator.api.take();
        let reasons: Vec<String> = events(&seen)
            .into_iter()
            .map(|(_, reason)| reason)
            .collect();
        assert_eq!(reasons, ["NotFound", "Created"]);
        let new_id = last_status(&seen)["registryId"].as_u64().expect("id");
        assert_ne!(new_id, id);
        let snapshot = sim.snapshot();
        assert_eq!(snapshot.registries.len(), 1);
        assert_eq!(snapshot.registries[0].id, new_id);
    })
    .await;
}

#[tokio::test]
async fn a_revoked_token_is_unauthorized_permanent_and_never_retried_at_speed() {
    guarded(async {
        let sim = simulator().await;
        let operator = Operator::start(&sim, Some(REVOKED_TOKEN), Vec::new());
        let cache = registry_object("cache", &[], json!({}));
        for _ in 0..3 {
            sim.reset_request_counts();
            let error = operator.reconcile_registry(&cache).await.expect_err("401");
            assert_eq!(error.reason(), "Unauthorized");
            assert!(!error.is_transient());
            assert_eq!(total_requests(&sim), 1, "a 401 is not retried");
            assert_eq!(
                operator.registry_error_policy(&cache, &error),
                Requeue::requeue(RESYNC),
                "no fast requeue either"
            );
        }
        let status = last_status(&operator.api.take());
        let (synced, reason, message) = condition(&status, "Synced");
        assert_eq!(
            (synced.as_str(), reason.as_str()),
            ("False", "Unauthorized")
        );
        assert_eq!(message, "401 Unauthorized");
        assert_eq!(condition(&status, "Ready").1, "Unauthorized");
        assert!(sim.snapshot().registries.is_empty());
    })
    .await;
}

#[tokio::test]
async fn a_rotated_token_secret_is_picked_up_without_a_restart_from_the_objects_namespace() {
    guarded(async {
        let sim = simulator().await;
        const OWN: &str = "team-b";
        // A decoy with the working token in another namespace: reading it would succeed.
        let decoy = secret(NAMESPACE, "gitlab-token", "9", &[("token", TOKEN)]);
        let old = secret(OWN, "gitlab-token", "1", &[("token", REVOKED_TOKEN)]);
        let operator = Operator::start(&sim, None, vec![decoy, old]);
        let mut cache = registry_object(
            "cache",
            &[],
            json!({"gitlab": {"url": sim.base_url(),
                              "tokenSecretRef": {"name": "gitlab-token", "key": "token"}}}),
        );
        cache.metadata.namespace = Some(OWN.into());

        let error = operator
            .reconcile_registry(&cache)
            .await
            .expect_err("revoked");
        assert_eq!(error.reason(), "Unauthorized");
        let seen = operator.api.take();
        let status = last_status(&seen);
        assert_eq!(condition(&status, "Synced").1, "Unauthorized");

        // The Secret is rotated: new value, new resourceVersion. Same Context, no restart.
        operator
            .api
            .replace_secret(secret(OWN, "gitlab-token", "2", &[("token", TOKEN)]));
        operator
            .reconcile_registry(&with_status(&cache, &status))
            .await
            .expect("rotated token used");
        let seen_after = operator.api.take();
        assert_eq!(condition(&last_status(&seen_after), "Ready").0, "True");
        assert_eq!(sim.snapshot().registries.len(), 1);

        let secret_reads: Vec<&str> = seen
            .iter()
            .chain(&seen_after)
            .filter(|s| s.path.contains("/secrets/"))
            .map(|s| s.path.as_str())
            .collect();
        assert_eq!(
            secret_reads,
            [
                "/api/v1/namespaces/team-b/secrets/gitlab-token",
                "/api/v1/namespaces/team-b/secrets/gitlab-token"
            ]
        );
        assert!(
            seen.iter()
                .chain(&seen_after)
                .all(|s| s.path.contains("/namespaces/team-b/")),
            "every request stays in the object's namespace"
        );
    })
    .await;
}

// ---- 3. Cleanup safety ---------------------------------------------------------------------

const PROJECT_ID: u64 = 10;
const REPOSITORY_ID: u64 = 100;

fn now() -> Timestamp {
    "2026-06-15T12:00:00Z".parse().expect("timestamp")
}

fn digest(n: u64) -> String {
    format!("sha256:{n:064x}")
}

fn seed_tag(name: &str, digest: Option<String>, created_at: Option<Timestamp>) -> SeedTag {
    SeedTag {
        name: name.into(),
        digest,
        created_at,
        total_size: 1_000,
    }
}

/// Project `acme/app` with one root repository holding `tags`, and a protection rule for
/// `release-*` tags that Maintainers (the token's role) cannot delete.
fn cleanup_seed(tags: Vec<SeedTag>) -> Seed {
    Seed {
        groups: vec![SeedGroup {
            id: 1,
            full_path: "acme".into(),
            name: None,
        }],
        projects: vec![SeedProject {
            id: PROJECT_ID,
            path_with_namespace: "acme/app".into(),
            repositories: vec![SeedRepository {
                id: Some(REPOSITORY_ID),
                name: String::new(),
                created_at: Some(now() - SignedDuration::from_hours(24 * 365)),
                tags,
            }],
            tag_protection_rules: vec![SeedProtectionRule {
                tag_name_pattern: "release-.*".into(),
                minimum_access_level_for_push: AccessLevel::Maintainer,
                minimum_access_level_for_delete: AccessLevel::Owner,
            }],
            branches: Vec::new(),
        }],
        ..Seed::default()
    }
}

async fn cleanup_sim(tags: Vec<SeedTag>) -> SimHandle {
    let config = SimConfig {
        tag_list_details: true,
        ..SimConfig::with_token(TOKEN)
    };
    Simulator::start(config, cleanup_seed(tags))
        .await
        .expect("simulator")
}

fn cleanup_run(rules: RuleSpec, in_use: InUse) -> CleanupRun {
    CleanupRun {
        target: CleanupTarget::Project {
            project: PathOrId::parse("acme/app"),
            path_regex: None,
        },
        rules,
        cache_not_downloaded_for: None,
        safety: Safety::default(),
        in_use,
        dry_run: false,
        limits: RunLimits {
            max_deletions_per_run: 10_000,
            requests_per_second: 1_000,
            max_deletion_percent: None,
        },
        now: now(),
        mode: Mode::Apply,
        approved_deletions: Default::default(),
    }
}

fn no_pods() -> InUse {
    InUse::Known(Arc::new(InUseIndex::new()))
}

fn tag_names(sim: &SimHandle) -> BTreeSet<String> {
    sim.snapshot()
        .repositories
        .into_iter()
        .flat_map(|repository| repository.tags.into_keys())
        .collect()
}

fn delete_requests(sim: &SimHandle) -> u64 {
    sim.request_counts()
        .iter()
        .filter(|(key, _)| key.starts_with("DELETE "))
        .map(|(_, count)| count)
        .sum()
}

async fn finish(client: &GitLabClient, run: &CleanupRun) -> CleanupReport {
    run_cleanup(client, run).await.expect("valid spec")
}

/// 40 tags over 80 days (every 7th sharing the previous digest), `latest`, `main` and two
/// protected `release-*` tags.
fn many_tags() -> Vec<SeedTag> {
    let mut tags = vec![
        seed_tag(
            "latest",
            Some(digest(1)),
            Some(now() - SignedDuration::from_hours(900)),
        ),
        seed_tag(
            "main",
            Some(digest(2)),
            Some(now() - SignedDuration::from_hours(800)),
        ),
        seed_tag(
            "release-1",
            Some(digest(3)),
            Some(now() - SignedDuration::from_hours(1900)),
        ),
        seed_tag(
            "release-2",
            Some(digest(4)),
            Some(now() - SignedDuration::from_hours(1800)),
        ),
    ];
    let mut previous = digest(5);
    for n in 0..40u64 {
        let value = if n % 7 == 6 {
            previous.clone()
        } else {
            digest(100 + n)
        };
        previous = value.clone();
        let age = SignedDuration::from_hours(i64::try_from(n * 48 + 1).expect("hours"));
        tags.push(seed_tag(
            &format!("build-{n}"),
            Some(value),
            Some(now() - age),
        ));
    }
    tags
}

fn everyday_rules() -> RuleSpec {
    RuleSpec {
        name_regex_delete: Some(".*".into()),
        name_regex_keep: Some("main".into()),
        keep_n: Some(5),
        older_than: Some("7d".into()),
        ..RuleSpec::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_cleanup_run_resumes_and_ends_exactly_where_an_uninterrupted_one_does() {
    guarded(async {
        // The reference: the same repository cleaned by one uninterrupted run.
        let reference = cleanup_sim(many_tags()).await;
        let reference_client = impatient_client(&reference, TOKEN);
        let report = finish(&reference_client, &cleanup_run(everyday_rules(), no_pods())).await;
        assert!(report.tags_deleted > 10, "{}", report.message);
        let expected_left = tag_names(&reference);

        // Interrupted: the 6th DELETE is carried out, its answer never comes, and the
        // operator dies (the run's task is dropped) while waiting for it.
        let sim = cleanup_sim(many_tags()).await;
        let before = tag_names(&sim);
        sim.inject_fault(FaultSpec {
            once: vec![
                OneShotFault {
                    count: 5,
                    method: Some("DELETE".into()),
                    route: Some(TAG.into()),
                    fault: FaultAction::Delay { delay_ms: 0 },
                },
                OneShotFault {
                    count: 1,
                    method: Some("DELETE".into()),
                    route: Some(TAG.into()),
                    fault: FaultAction::Delay { delay_ms: 120_000 },
                },
            ],
            ..FaultSpec::default()
        });
        let mut patient = ClientConfig::new(
            sim.base_url().parse().expect("url"),
            SecretString::from(TOKEN),
        );
        patient.request_timeout = Duration::from_secs(170);
        let client = GitLabClient::new(patient).expect("client");
        let run = cleanup_run(everyday_rules(), no_pods());
        let task = {
            let client = client.clone();
            let run = run.clone();
            tokio::spawn(async move { run_cleanup(&client, &run).await })
        };
        while before.len() - tag_names(&sim).len() < 6 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        task.abort();
        assert!(task.await.is_err_and(|error| error.is_cancelled()));
        assert_eq!(delete_requests(&sim), 6);

        // The next run (a restarted operator) finishes the job.
        sim.clear_faults();
        let resumed = finish(&impatient_client(&sim, TOKEN), &run).await;
        assert_eq!(resumed.failures, 0, "{}", resumed.message);
        assert_eq!(tag_names(&sim), expected_left);
        assert_eq!(
            delete_requests(&sim),
            report.tags_deleted as u64,
            "no tag deleted twice, none missed"
        );
        for kept in ["latest", "main", "release-1", "release-2"] {
            assert!(expected_left.contains(kept), "{kept} kept");
        }
    })
    .await;
}

/// Every kind of fault the cleanup cases of this suite are run under: server errors, rate
/// limits, resets, slow answers, refusals, and random errors.
fn fault_cases() -> Vec<(&'static str, FaultSpec)> {
    let everything = |fault: FaultAction, count: u32| FaultSpec {
        once: vec![OneShotFault {
            count,
            method: None,
            route: None,
            fault,
        }],
        ..FaultSpec::default()
    };
    vec![
        (
            "500 burst on tag lists",
            fault(3, "GET", TAGS, FaultAction::Status { status: 500 }),
        ),
        (
            "503 on everything",
            everything(FaultAction::Status { status: 503 }, 50),
        ),
        (
            "429 with Retry-After",
            fault(
                2,
                "GET",
                TAGS,
                FaultAction::RateLimited {
                    retry_after_seconds: 0,
                },
            ),
        ),
        (
            "endpoint rate limit",
            everything(FaultAction::EndpointRateLimited, 1),
        ),
        ("connection resets", everything(FaultAction::Drop, 3)),
        (
            "answers past the timeout",
            everything(FaultAction::Delay { delay_ms: 1_500 }, 2),
        ),
        ("401", everything(FaultAction::Status { status: 401 }, 1)),
        (
            "403 on protection rules",
            fault(
                1,
                "GET",
                "/projects/:id/registry/protection/tag/rules",
                FaultAction::Status { status: 403 },
            ),
        ),
        (
            "404 on the project",
            everything(FaultAction::Status { status: 404 }, 1),
        ),
        (
            "random 50% errors",
            FaultSpec {
                error_rate: Some(0.5),
                error_status: Some(500),
                ..FaultSpec::default()
            },
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_or_plan_sends_no_delete_under_any_kind_of_fault() {
    guarded(async {
        let sim = cleanup_sim(many_tags()).await;
        let client = impatient_client(&sim, TOKEN);
        let before = tag_names(&sim);
        let cases = fault_cases();
        let mut runs = 0;
        for (name, faults) in cases {
            for mode in [Mode::Apply, Mode::Plan] {
                sim.clear_faults();
                sim.inject_fault(faults.clone());
                let mut run = cleanup_run(everyday_rules(), no_pods());
                run.dry_run = mode == Mode::Apply;
                run.mode = mode;
                // Valid spec: whatever the fault did, the run reports, never deletes.
                let report = finish(&client, &run).await;
                assert!(report.simulated(), "{name}");
                assert_eq!(delete_requests(&sim), 0, "{name}: {mode:?}");
                runs += 1;
            }
        }
        assert_eq!(runs, 20);
        assert_eq!(sim.write_count(), 0);
        assert_eq!(tag_names(&sim), before);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deletion_budget_holds_under_every_kind_of_fault() {
    guarded(async {
        // Branches are read too (keepBranchTags), so faults reach that route as well.
        let budget_run = |approved: &[&str]| {
            let rules = RuleSpec {
                keep_branch_tags: Some("(.+)-[0-9]+".into()),
                ..everyday_rules()
            };
            let mut run = cleanup_run(rules, no_pods());
            run.limits.max_deletion_percent = Some(10);
            run.approved_deletions = approved.iter().map(|fp| (*fp).to_owned()).collect();
            run
        };
        for (name, faults) in fault_cases() {
            let sim = cleanup_sim(many_tags()).await;
            let client = impatient_client(&sim, TOKEN);
            let before = tag_names(&sim);
            // The approval a fault-free dry run asks for, and the exact set it covers.
            let mut dry = budget_run(&[]);
            dry.dry_run = true;
            let plan = finish(&client, &dry).await;
            assert_eq!(plan.outcome, RunOutcome::NeedsApproval, "{}", plan.message);
            let fingerprint = plan.pending_approvals[0].fingerprint.clone();
            let approved_set: BTreeSet<String> = plan.repository_reports[0]
                .selected
                .iter()
                .cloned()
                .collect();
            assert!(approved_set.len() * 100 > before.len() * 10);

            // Not approved, or approved for another plan: no DELETE, whatever the fault.
            for approval in [None, Some("0123456789abcdef")] {
                sim.clear_faults();
                sim.inject_fault(faults.clone());
                let report = finish(&client, &budget_run(approval.as_slice())).await;
                assert_eq!(delete_requests(&sim), 0, "{name}: {}", report.message);
                assert_ne!(report.outcome, RunOutcome::Succeeded, "{name}");
            }
            assert_eq!(tag_names(&sim), before, "{name}");

            // Approved: only tags of the approved set go, under the fault and after it (the
            // rest of a partly carried out plan is a new selection).
            for faulty in [true, false] {
                sim.clear_faults();
                if faulty {
                    sim.inject_fault(faults.clone());
                }
                let report = finish(&client, &budget_run(&[&fingerprint])).await;
                let deleted: BTreeSet<String> =
                    before.difference(&tag_names(&sim)).cloned().collect();
                assert!(
                    deleted.is_subset(&approved_set),
                    "{name}: deleted outside the approved plan: {:?}; {}",
                    deleted.difference(&approved_set).collect::<Vec<_>>(),
                    report.message
                );
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_regex_matching_everything_still_spares_latest_protected_in_use_shared_and_newest() {
    guarded(async {
        let days = |n: i64| Some(now() - SignedDuration::from_hours(24 * n));
        let tags = vec![
            seed_tag("latest", Some(digest(1)), days(300)),
            seed_tag("release-1", Some(digest(2)), days(290)),
            seed_tag("running-by-tag", Some(digest(3)), days(280)),
            seed_tag("running-by-digest", Some(digest(4)), days(270)),
            seed_tag("twin-of-newest", Some(digest(9)), days(260)),
            seed_tag("no-manifest", None, None),
            seed_tag("old-1", Some(digest(5)), days(250)),
            seed_tag("old-2", Some(digest(6)), days(240)),
            seed_tag("old-3", Some(digest(7)), days(230)),
            seed_tag("newest-2", Some(digest(8)), days(2)),
            seed_tag("newest-1", Some(digest(9)), days(1)),
        ];
        let sim = cleanup_sim(tags).await;
        let client = impatient_client(&sim, TOKEN);
        let location = format!("{}/acme/app", sim.config().registry_host);
        let pods = InUseIndex::from_images([
            (format!("{location}:running-by-tag"), String::new()),
            (
                "mirror.local/app:whatever".to_owned(),
                format!("docker-pullable://{location}@{}", digest(4)),
            ),
        ]);
        let rules = RuleSpec {
            name_regex_delete: Some(".*".into()),
            name_regex_keep: None,
            keep_n: Some(2),
            older_than: None,
            ..RuleSpec::default()
        };
        let report = finish(&client, &cleanup_run(rules, InUse::Known(Arc::new(pods)))).await;
        assert_eq!(report.failures, 0, "{}", report.message);
        let left = tag_names(&sim);
        let expected: BTreeSet<String> = [
            "latest",
            "release-1",
            "running-by-tag",
            "running-by-digest",
            "twin-of-newest",
            "no-manifest",
            "newest-2",
            "newest-1",
        ]
        .into_iter()
        .map(str::to_owned)
        .collect();
        assert_eq!(left, expected, "{}", report.message);
        assert_eq!(delete_requests(&sim), 3);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_skew_between_gitlab_and_the_operator_never_deletes_a_young_or_newest_tag() {
    guarded(async {
        // GitLab's clock runs 3 h ahead of the operator's: fresh tags look "from the future".
        let hours = |n: i64| Some(now() + SignedDuration::from_hours(n));
        let tags = vec![
            seed_tag("future-2h", Some(digest(1)), hours(2)),
            seed_tag(
                "future-10m",
                Some(digest(2)),
                Some(now() + SignedDuration::from_mins(10)),
            ),
            seed_tag("day-old", Some(digest(3)), hours(-25)),
            seed_tag("month-old", Some(digest(4)), hours(-24 * 30)),
        ];
        let sim = cleanup_sim(tags.clone()).await;
        let client = impatient_client(&sim, TOKEN);
        let rules = RuleSpec {
            name_regex_delete: Some(".*".into()),
            name_regex_keep: None,
            keep_n: None,
            older_than: Some("2d".into()),
            ..RuleSpec::default()
        };
        let report = finish(&client, &cleanup_run(rules.clone(), no_pods())).await;
        assert_eq!(report.failures, 0, "{}", report.message);
        let left = tag_names(&sim);
        assert_eq!(
            left,
            ["day-old", "future-10m", "future-2h"]
                .into_iter()
                .map(str::to_owned)
                .collect::<BTreeSet<_>>()
        );

        // The operator's clock a year ahead: everything looks old, yet keepN still keeps the
        // newest by GitLab's own created_at order.
        let sim = cleanup_sim(tags).await;
        let client = impatient_client(&sim, TOKEN);
        let mut run = cleanup_run(
            RuleSpec {
                keep_n: Some(2),
                ..rules
            },
            no_pods(),
        );
        run.now = now() + SignedDuration::from_hours(24 * 365);
        finish(&client, &run).await;
        assert_eq!(
            tag_names(&sim),
            ["future-10m", "future-2h"]
                .into_iter()
                .map(str::to_owned)
                .collect::<BTreeSet<_>>()
        );
    })
    .await;
}

// ---- 4. Bad input --------------------------------------------------------------------------

/// Every property path under `node` (`spec.gitlab.tokenSecretRef.name`, …).
fn property_paths(node: &Value, prefix: &str, out: &mut Vec<String>) {
    if let Some(properties) = node["properties"].as_object() {
        for (name, child) in properties {
            let path = format!("{prefix}.{name}");
            out.push(path.clone());
            property_paths(child, &path, out);
        }
    }
    if node["items"].is_object() {
        property_paths(&node["items"], &format!("{prefix}[]"), out);
    }
    if let Some(additional) = node.get("additionalProperties").filter(|v| v.is_object()) {
        property_paths(additional, &format!("{prefix}{{}}"), out);
    }
    for key in ["oneOf", "anyOf", "allOf"] {
        for alternative in node[key].as_array().into_iter().flatten() {
            property_paths(alternative, prefix, out);
        }
    }
}

#[test]
fn no_field_of_any_kind_can_name_another_namespace() {
    let mut references = 0;
    for (file, definition) in crd::all() {
        let schema = validation::open_api_schema(&definition);
        let spec = &schema["properties"]["spec"];
        assert!(spec.is_object(), "{file}: spec schema");
        let mut paths = Vec::new();
        property_paths(spec, "spec", &mut paths);
        assert!(paths.len() > 10, "{file}: walked {paths:?}");
        for path in &paths {
            let leaf = path
                .rsplit('.')
                .next()
                .unwrap_or_default()
                .to_ascii_lowercase();
            assert!(
                !leaf.contains("namespace"),
                "{file}: {path} could point at another namespace"
            );
        }
        // Every Secret or object reference holds names and keys only.
        for path in paths
            .iter()
            .filter(|p| p.ends_with("SecretRef") || p.ends_with("Ref"))
        {
            references += 1;
            let mut node = spec;
            for segment in path.trim_start_matches("spec.").split('.') {
                node = &node["properties"][segment];
            }
            let fields: BTreeSet<&str> = node["properties"]
                .as_object()
                .unwrap_or_else(|| panic!("{file}: {path} is an object"))
                .keys()
                .map(String::as_str)
                .collect();
            assert!(
                fields.is_subset(&BTreeSet::from([
                    "name",
                    "key",
                    "usernameKey",
                    "passwordKey"
                ])),
                "{file}: {path} has {fields:?}"
            );
        }
    }
    // tokenSecretRef (3 kinds), credentialsSecretRef, upstreamRef.
    assert!(references >= 5, "{references}");
}

fn schema_errors(object: &Value) -> Vec<String> {
    let kind = object["kind"].as_str().expect("kind");
    let (_, definition) = crd::all()
        .into_iter()
        .find(|(_, definition)| definition.spec.names.kind == kind)
        .expect("CRD");
    let schema = validation::open_api_schema(&definition);
    let validator = jsonschema::validator_for(&schema).expect("schema compiles");
    let mut errors: Vec<String> = validator
        .iter_errors(object)
        .map(|error| format!("{}: {error}", error.instance_path))
        .collect();
    errors.extend(validation::cel_errors(&definition, object));
    errors
}

#[test]
fn huge_specs_are_refused_by_the_schema_naming_the_field() {
    let megabyte = "x".repeat(1 << 20);
    let long_name = "n".repeat(256);
    let registry = |spec: Value| {
        json!({"apiVersion": "gitlabregistry.io/v1alpha1", "kind": "VirtualRegistry",
               "metadata": {"name": "cache", "namespace": NAMESPACE}, "spec": spec})
    };
    let upstream = |spec: Value| {
        json!({"apiVersion": "gitlabregistry.io/v1alpha1", "kind": "Upstream",
               "metadata": {"name": "hub", "namespace": NAMESPACE}, "spec": spec})
    };
    let six: Vec<Value> = (0..6).map(|n| json!({"name": format!("u{n}")})).collect();
    let cases = [
        (
            registry(json!({"group": GROUP, "description": megabyte})),
            "/spec/description",
        ),
        (
            registry(json!({"group": GROUP, "name": long_name})),
            "/spec/name",
        ),
        (
            registry(json!({"group": GROUP, "name": "镜".repeat(256)})),
            "/spec/name",
        ),
        (
            registry(json!({"group": GROUP, "upstreams": six})),
            "/spec/upstreams",
        ),
        (
            upstream(json!({"group": GROUP, "url": format!("https://{}.io", "a".repeat(300))})),
            "/spec/url",
        ),
        (
            upstream(
                json!({"group": GROUP, "url": "https://quay.io", "description": "d".repeat(1025)}),
            ),
            "/spec/description",
        ),
        (
            upstream(json!({"group": GROUP, "url": "https://quay.io",
                            "credentialsSecretRef": {"name": "s".repeat(254)}})),
            "/spec/credentialsSecretRef/name",
        ),
    ];
    for (object, field) in cases {
        let errors = schema_errors(&object);
        assert!(
            errors.iter().any(|error| error.starts_with(field)),
            "{field}: {errors:?}"
        );
        // The message is short even when the value is a megabyte.
        assert!(
            errors
                .iter()
                .all(|error| error.len() < 2_000 || error.starts_with(field))
        );
    }
    // At the limits: accepted.
    let fine = registry(
        json!({"group": GROUP, "name": "镜".repeat(255), "description": "d".repeat(1024)}),
    );
    assert!(
        schema_errors(&fine).is_empty(),
        "{:?}",
        schema_errors(&fine)
    );
}

#[tokio::test]
async fn gitlabs_own_limits_surface_as_clear_conditions_and_are_not_retried() {
    guarded(async {
        let sim = simulator().await;
        let client = impatient_client(&sim, TOKEN);
        // Past the schema (defence in depth): GitLab's validation message is the message.
        let mut request = desired_registry(&"n".repeat(300), &[]);
        let outcome = registry::reconcile(&client, &request).await;
        let error = outcome.error.expect("refused");
        assert_eq!(error.reason(), "InvalidSpec");
        assert!(!error.is_transient());
        assert!(
            error
                .message()
                .contains("is too long (maximum is 255 characters)"),
            "{}",
            error.message()
        );
        assert_eq!(outcome.synced.reason, "InvalidSpec");
        assert_eq!(sim.request_count("POST", REGISTRIES), 1);
        request.desired.name = "cache".into();
        request.desired.description = Some("d".repeat(1025));
        let error = registry::reconcile(&client, &request)
            .await
            .error
            .expect("refused");
        assert!(
            error.message().contains("description"),
            "{}",
            error.message()
        );

        // The sixth registry of a group, through the controller: LimitExceeded, slow requeue.
        for n in 0..5 {
            sim.with_state(|state| state.create_registry(GROUP_ID, &format!("r{n}"), None))
                .expect("registry");
        }
        let operator = Operator::start(&sim, Some(TOKEN), Vec::new());
        sim.reset_request_counts();
        let sixth = registry_object("sixth", &[], json!({}));
        let error = operator
            .reconcile_registry(&sixth)
            .await
            .expect_err("limit");
        assert_eq!(error.reason(), "LimitExceeded");
        assert!(!error.is_transient());
        assert_eq!(
            operator.registry_error_policy(&sixth, &error),
            Requeue::requeue(RESYNC)
        );
        assert_eq!(sim.request_count("POST", REGISTRIES), 1);
        let status = last_status(&operator.api.take());
        let (_, reason, message) = condition(&status, "Synced");
        assert_eq!(reason, "LimitExceeded");
        assert!(
            message.contains("5 registries is the maximum allowed per top-level group."),
            "{message}"
        );
    })
    .await;
}

#[tokio::test]
async fn unicode_names_round_trip_and_are_adopted_by_their_exact_name() {
    guarded(async {
        let sim = simulator().await;
        let client = impatient_client(&sim, TOKEN);
        const REGISTRY_NAME: &str = "Größe-镜像";
        const UPSTREAM_NAME: &str = "Größe-上游 🐳";
        let mut request = desired_registry(REGISTRY_NAME, &[]);
        request.desired.description = Some("Zwischenspeicher für 镜像 ✓".into());
        let created = registry::reconcile(&client, &request).await;
        assert!(created.error.is_none(), "{:?}", created.error);
        let registry_id = created.registry_id.expect("id");
        let snapshot = sim.snapshot();
        assert_eq!(snapshot.registries[0].name, REGISTRY_NAME);

        // Steady state with the id, and adoption without it: no write, no duplicate.
        sim.reset_request_counts();
        let mut known = request.clone();
        known.known.registry_id = Some(registry_id);
        assert!(
            registry::reconcile(&client, &known)
                .await
                .actions
                .is_empty()
        );
        let adopted = registry::reconcile(&client, &request).await;
        assert_eq!(reasons(&adopted.actions), ["Adopted"]);
        assert_eq!(adopted.registry_id, Some(registry_id));
        assert_eq!(sim.write_count(), 0);

        let stub = UpstreamStub::start(StubBehaviour::default())
            .await
            .expect("stub");
        let upstream_request = desired_upstream(UPSTREAM_NAME, &stub.url(), Some(registry_id));
        let created = upstream::reconcile(&client, &upstream_request).await;
        assert!(created.error.is_none(), "{:?}", created.error);
        assert_eq!(sim.snapshot().upstreams[0].name, UPSTREAM_NAME);
        let adopted = upstream::reconcile(&client, &upstream_request).await;
        assert!(adopted.error.is_none(), "{:?}", adopted.error);
        assert!(reasons(&adopted.actions).contains(&"Adopted"));
        assert_eq!(adopted.upstream_id, created.upstream_id);
        assert_eq!(sim.snapshot().upstreams.len(), 1);
        assert!(sim.request_count("GET", GROUP_UPSTREAMS) >= 2);
    })
    .await;
}

#[tokio::test]
async fn an_unknown_upstream_reference_is_a_condition_and_removes_nothing() {
    guarded(async {
        let sim = simulator().await;
        let operator = Operator::start(&sim, Some(TOKEN), Vec::new());
        let stub = UpstreamStub::start(StubBehaviour::default())
            .await
            .expect("stub");
        let registry_id = sim
            .with_state(|state| state.create_registry(GROUP_ID, "cache", None))
            .expect("registry")
            .id;
        sim.with_state(|state| {
            state.create_upstream(
                registry_id,
                gitlab_registry_operator::sim::state::NewUpstream {
                    name: "kept".into(),
                    url: stub.url(),
                    ..Default::default()
                },
                true,
            )
        })
        .expect("upstream");
        let cache = registry_object("cache", &["nowhere"], json!({}));
        operator
            .reconcile_registry(&cache)
            .await
            .expect("reconciled");
        let status = last_status(&operator.api.take());
        let (resolved, reason, message) = condition(&status, "UpstreamsResolved");
        assert_eq!(
            (resolved.as_str(), reason.as_str()),
            ("False", "UpstreamNotFound")
        );
        assert!(message.contains("nowhere"), "{message}");
        assert_eq!(condition(&status, "Ready").0, "False");
        assert_eq!(sim.snapshot().associations.len(), 1, "nothing removed");
    })
    .await;
}

// ---- 5. Secrets ----------------------------------------------------------------------------

/// Everything every tracing event of this test binary writes, at TRACE, process-wide.
#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Buffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("buffer").extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn trace_buffer() -> Buffer {
    static BUFFER: OnceLock<Buffer> = OnceLock::new();
    BUFFER
        .get_or_init(|| {
            use tracing_subscriber::util::SubscriberInitExt;
            let buffer = Buffer::default();
            let writer = buffer.clone();
            tracing_subscriber::fmt()
                .with_max_level(tracing::Level::TRACE)
                .with_ansi(false)
                .with_writer(move || writer.clone())
                .finish()
                .try_init()
                .expect("global subscriber");
            buffer
        })
        .clone()
}

fn write_file(dir: &std::path::Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).expect("writable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_passwords_appear_in_no_log_event_status_error_metric_or_plan_output() {
    guarded(async {
        let buffer = trace_buffer();
        let mut outputs: Vec<(String, String)> = Vec::new();
        let sim = simulator().await;
        let stub = UpstreamStub::start(StubBehaviour::requiring(USERNAME, PASSWORD))
            .await
            .expect("stub");

        // The controller: credentials from a Secret, created, then the password rotated.
        let login = secret(NAMESPACE, "login", "1", &[("username", USERNAME), ("password", PASSWORD)]);
        let mut operator = Operator::start(&sim, Some(TOKEN), vec![login]);
        let registry = registry_object("cache", &["dockerhub"], json!({}));
        let upstream = upstream_object(
            "dockerhub",
            &stub.url(),
            json!({"credentialsSecretRef": {"name": "login"}}),
        );
        operator.know_upstream(&upstream);
        operator.reconcile_registry(&registry).await.expect("registry");
        let registry = with_status(&registry, &last_status(&operator.api.seen.lock().expect("log")));
        operator.know_registry(&registry);
        operator.reconcile_upstream(&upstream).await.expect("upstream");
        let upstream_status = last_status(&operator.api.seen.lock().expect("log"));
        assert_eq!(condition(&upstream_status, "Ready").0, "True", "{upstream_status}");
        operator.api.replace_secret(secret(
            NAMESPACE,
            "login",
            "2",
            &[("username", USERNAME), ("password", ROTATED_PASSWORD)],
        ));
        let upstream = with_status(&upstream, &upstream_status);
        // The stub still wants the old password: GitLab's test fails, the change is blocked.
        let outcome = operator.reconcile_upstream(&upstream).await;
        outputs.push(("reconcile result".into(), format!("{outcome:?}")));
        let upstream_status = last_status(&operator.api.seen.lock().expect("log"));
        assert_eq!(condition(&upstream_status, "Synced").1, "ConnectivityTestFailed");

        // Errors, formatted every way, from a revoked token and a missing Secret.
        let revoked = Operator::start(&sim, Some(REVOKED_TOKEN), Vec::new());
        let error = revoked.reconcile_registry(&registry).await.expect_err("401");
        outputs.push(("revoked error".into(), format!("{error} | {error:?} | {}", error.message())));
        let missing = upstream_object(
            "quay",
            &stub.url(),
            json!({"credentialsSecretRef": {"name": "absent"}}),
        );
        let error = operator.reconcile_upstream(&missing).await.expect_err("no secret");
        outputs.push(("missing secret".into(), format!("{error} | {error:?}")));

        // Engines: the request (with credentials) and outcomes, Debug-formatted.
        let client = impatient_client(&sim, TOKEN);
        outputs.push(("client".into(), format!("{client:?}")));
        let mut request = desired_upstream("direct", &stub.url(), None);
        request.desired.credentials = Some(upstream::ResolvedCredentials {
            credentials: gitlab_registry_operator::gitlab::UpstreamCredentials::new(
                USERNAME,
                SecretString::from(PASSWORD),
            ),
            version: upstream::CredentialsVersion {
                secret_name: "login".into(),
                resource_version: "1".into(),
            },
        });
        outputs.push(("engine request".into(), format!("{request:?}")));
        let outcome = upstream::reconcile(&impatient_client(&sim, REVOKED_TOKEN), &request).await;
        outputs.push(("engine outcome".into(), format!("{outcome:?}")));
        let error = outcome.error.expect("401");
        outputs.push(("engine error".into(), format!("{error} | {error:?}")));

        // Standalone plan and apply, table and JSON, with the password in a Secret manifest
        // (another upstream url: GitLab refuses a second upstream with the same credentials).
        let standalone_stub = UpstreamStub::start(StubBehaviour::requiring(USERNAME, PASSWORD))
            .await
            .expect("stub");
        let dir = std::env::temp_dir().join(format!("faults-secrets-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        write_file(
            &dir,
            "all.yaml",
            &format!(
                "apiVersion: v1\nkind: Secret\nmetadata: {{name: creds}}\nstringData: {{username: {USERNAME}, password: {PASSWORD}}}\n---\n\
                 apiVersion: gitlabregistry.io/v1alpha1\nkind: Upstream\nmetadata: {{name: hub}}\nspec: {{group: {GROUP}, url: '{}', credentialsSecretRef: {{name: creds}}}}\n---\n\
                 apiVersion: gitlabregistry.io/v1alpha1\nkind: VirtualRegistry\nmetadata: {{name: standalone}}\nspec: {{group: {GROUP}, upstreams: [{{name: hub}}]}}\n",
                standalone_stub.url()
            ),
        );
        for (mode, token) in [
            (Mode::Plan, TOKEN),
            (Mode::Apply, TOKEN),
            (Mode::Plan, TOKEN),
            (Mode::Apply, REVOKED_TOKEN),
        ] {
            let options = standalone::Options {
                paths: vec![dir.clone()],
                mode,
                gitlab: Some((sim.base_url().parse().expect("url"), SecretString::from(token))),
                extra_ca_pem: None,
                resend_credentials: true,
                approved_deletions: Default::default(),
                access_policy: None,
            };
            outputs.push(("options".into(), format!("{options:?}")));
            let report = standalone::execute(&options).await.expect("report");
            outputs.push(("table".into(), standalone::render_table(&report)));
            outputs.push(("json".into(), serde_json::to_string(&report).expect("json")));
            if mode == Mode::Apply && token == TOKEN {
                assert!(report.all_ready(), "{}", standalone::render_table(&report));
            }
        }
        let _ = std::fs::remove_dir_all(&dir);

        // Metrics, every request to the Kubernetes API (status patches, Events), the logs.
        outputs.push(("metrics".into(), operator.ctx.metrics.encode()));
        outputs.push(("metrics (revoked)".into(), revoked.ctx.metrics.encode()));
        for seen in operator.api.take().into_iter().chain(revoked.api.take()) {
            outputs.push((format!("{} {}", seen.method, seen.path), seen.raw_body));
        }
        let logs = String::from_utf8_lossy(&buffer.0.lock().expect("buffer")).into_owned();
        assert!(logs.contains("GitLab request"), "TRACE logs were captured");
        outputs.push(("logs".into(), logs));

        let encode = |text: &str| base64::engine::general_purpose::STANDARD.encode(text);
        let forbidden = [TOKEN, REVOKED_TOKEN, PASSWORD, ROTATED_PASSWORD]
            .into_iter()
            .flat_map(|secret| [secret.to_owned(), encode(secret)]);
        let forbidden: Vec<String> = forbidden.collect();
        assert!(outputs.len() > 20);
        for (what, text) in &outputs {
            for secret in &forbidden {
                assert!(!text.contains(secret.as_str()), "{what} leaks a secret: {text}");
            }
        }
    })
    .await;
}

// ---- 6. Concurrency ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_upstream_listed_by_five_registries_reconciled_concurrently_exists_once() {
    guarded(async {
        let sim = simulator().await;
        let mut operator = Operator::start(&sim, Some(TOKEN), Vec::new());
        let stub = UpstreamStub::start(StubBehaviour::default())
            .await
            .expect("stub");
        let upstream = upstream_object("dockerhub", &stub.url(), json!({}));
        operator.know_upstream(&upstream);
        let registries: Vec<VirtualRegistry> = (0..5)
            .map(|n| registry_object(&format!("cache-{n}"), &["dockerhub"], json!({})))
            .collect();

        // All five registries and the upstream at once.
        let results = futures::future::join_all(
            registries
                .iter()
                .map(|registry| operator.reconcile_registry(registry)),
        )
        .await;
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        let mut current = Vec::new();
        for registry in &registries {
            let id = sim
                .snapshot()
                .registries
                .iter()
                .find(|r| Some(&r.name) == registry.metadata.name.as_ref())
                .expect("created")
                .id;
            let status = json!({"registryId": id});
            let known = with_status(registry, &status);
            operator.know_registry(&known);
            current.push(known);
        }
        operator.api.take();
        let (upstream_result, registry_results) = tokio::join!(
            operator.reconcile_upstream(&upstream),
            futures::future::join_all(current.iter().map(|r| operator.reconcile_registry(r)))
        );
        upstream_result.expect("upstream");
        assert!(
            registry_results.iter().all(Result::is_ok),
            "{registry_results:?}"
        );
        let upstream_status = last_status(
            &operator
                .api
                .take()
                .into_iter()
                .filter(|s| s.path.contains("/upstreams/"))
                .collect::<Vec<_>>(),
        );
        operator.know_upstream(&with_status(&upstream, &upstream_status));

        // Now every registry resolves it, concurrently again.
        let results = futures::future::join_all(
            current
                .iter()
                .map(|registry| operator.reconcile_registry(registry)),
        )
        .await;
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        let snapshot = sim.snapshot();
        assert_eq!(snapshot.registries.len(), 5);
        assert_eq!(
            snapshot.upstreams.len(),
            1,
            "one upstream, however many registries"
        );
        let upstream_id = snapshot.upstreams[0].id;
        let mut per_registry: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for association in &snapshot.associations {
            per_registry
                .entry(association.registry_id)
                .or_default()
                .push(association.upstream_id);
        }
        assert_eq!(per_registry.len(), 5, "{per_registry:?}");
        assert!(per_registry.values().all(|ids| ids == &[upstream_id]));

        // Steady state, still concurrent: no writes.
        sim.reset_request_counts();
        operator.api.take();
        let statuses: Vec<VirtualRegistry> = current.clone();
        let results = futures::future::join_all(
            statuses
                .iter()
                .map(|registry| operator.reconcile_registry(registry)),
        )
        .await;
        assert!(results.iter().all(Result::is_ok));
        assert_eq!(sim.write_count(), 0, "{:?}", sim.request_counts());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_operator_instances_racing_on_the_same_objects_create_no_duplicates() {
    guarded(async {
        let sim = simulator().await;
        let first = Operator::start(&sim, Some(TOKEN), Vec::new());
        let second = Operator::start(&sim, Some(TOKEN), Vec::new());
        let cache = registry_object("cache", &[], json!({}));
        // Both list the group before either creates: each list answer is held back a while.
        sim.inject_fault(fault(
            2,
            "GET",
            REGISTRIES,
            FaultAction::Delay { delay_ms: 300 },
        ));
        let (a, b) = tokio::join!(
            first.reconcile_registry(&cache),
            second.reconcile_registry(&cache)
        );
        assert_eq!(
            sim.request_count("POST", REGISTRIES),
            2,
            "both tried to create"
        );
        assert_eq!(sim.snapshot().registries.len(), 1, "GitLab kept one");
        let outcomes = [a, b];
        for outcome in &outcomes {
            assert!(
                outcome.is_ok(),
                "the loser adopts what the winner created: {outcome:?}"
            );
        }
        // Both report the same registry, Ready, and stay quiet on the next reconcile.
        let mut ids = BTreeSet::new();
        sim.reset_request_counts();
        for operator in [&first, &second] {
            let status = last_status(&operator.api.take());
            assert_eq!(condition(&status, "Ready").0, "True", "{status}");
            ids.insert(status["registryId"].as_u64().expect("id"));
            operator
                .reconcile_registry(&with_status(&cache, &status))
                .await
                .expect("steady");
            assert!(status_patches(&operator.api.take()).is_empty());
        }
        assert_eq!(sim.write_count(), 0);
        assert_eq!(ids.len(), 1);
        assert_eq!(sim.snapshot().registries.len(), 1);
    })
    .await;
}

/// Two writers create the same upstream at once: GitLab refuses the duplicate url and
/// credentials, and the loser adopts the winner's upstream instead of reporting InvalidSpec.
#[tokio::test]
async fn two_writers_creating_the_same_upstream_end_with_one() {
    guarded(async {
        let sim = simulator().await;
        let client = impatient_client(&sim, TOKEN);
        let registry = registry::reconcile(&client, &desired_registry("cache", &[])).await;
        let registry_id = registry.registry_id.expect("registry created");
        let stub = UpstreamStub::start(StubBehaviour::default())
            .await
            .expect("stub");
        let request = desired_upstream("mirror", &stub.url(), Some(registry_id));
        // Both list the group's upstreams before either creates.
        sim.inject_fault(fault(
            2,
            "GET",
            "/groups/:id/-/virtual_registries/container/upstreams",
            FaultAction::Delay { delay_ms: 300 },
        ));
        let (a, b) = tokio::join!(
            upstream::reconcile(&client, &request),
            upstream::reconcile(&client, &request)
        );
        assert_eq!(sim.snapshot().upstreams.len(), 1, "GitLab kept one");
        for outcome in [&a, &b] {
            assert!(outcome.error.is_none(), "{:?}", outcome.error);
            assert_eq!(outcome.synced.reason, "Synced");
        }
        assert_eq!(a.upstream_id, b.upstream_id);
        let adopted = [&a, &b]
            .iter()
            .filter(|o| reasons(&o.actions).contains(&"Adopted"))
            .count();
        assert_eq!(adopted, 1, "exactly one writer lost the race and adopted");
    })
    .await;
}
