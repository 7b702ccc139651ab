//! The Upstream and VirtualRegistry reconcilers against a mocked Kubernetes API server
//! (kube-rs's tower-test pattern) and the GitLab simulator: finalizers, status patches by
//! server-side apply (only when the status changed), Events, deletion policies, suspend and
//! a missing connection.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gitlab_registry_operator::controller::context::DefaultConnection;
use gitlab_registry_operator::controller::metrics::Metrics;
use gitlab_registry_operator::controller::tenancy::{AccessPolicyFile, HandoverObserver};
use gitlab_registry_operator::controller::{self, Context, OperatorConfig};
use gitlab_registry_operator::crd::{CleanupPolicy, Upstream, VirtualRegistry};
use gitlab_registry_operator::sim::upstream_stub::{StubBehaviour, UpstreamStub};
use gitlab_registry_operator::sim::{Seed, SimConfig, SimHandle, Simulator};
use http::{Request, Response};
use kube::client::Body;
use kube::runtime::controller::Action as Requeue;
use kube::runtime::reflector::store;
use kube::runtime::watcher;
use secrecy::SecretString;
use serde_json::{Value, json};

const TOKEN: &str = "controller-token";
const NAMESPACE: &str = "team";
const FINALIZER: &str = "gitlabregistry.io/finalizer";
const RESYNC: Duration = Duration::from_secs(600);
const UPSTREAMS_PATH: &str = "/apis/gitlabregistry.io/v1alpha1/namespaces/team/upstreams";
const REGISTRIES_PATH: &str = "/apis/gitlabregistry.io/v1alpha1/namespaces/team/virtualregistries";
const EVENTS_PATH: &str = "/apis/events.k8s.io/v1/namespaces/team/events";

#[path = "support/harness.rs"]
mod harness;
#[path = "support/kube_api.rs"]
mod kube_api;

use harness::guarded;
use kube_api::{ApiServer, Seen, not_found};

struct Env {
    sim: SimHandle,
    api: ApiServer,
    ctx: Arc<Context>,
    registries: store::Writer<VirtualRegistry>,
    upstreams: store::Writer<Upstream>,
}

fn seed() -> Seed {
    Seed::parse("groups:\n  - {id: 100, full_path: my-org}\n").expect("seed")
}

impl Env {
    async fn start() -> Self {
        Self::with(true, Vec::new()).await
    }

    async fn with(default_connection: bool, secrets: Vec<Value>) -> Self {
        Self::with_access_policy(default_connection, secrets, None).await
    }

    async fn with_access_policy(
        default_connection: bool,
        secrets: Vec<Value>,
        access_policy: Option<Arc<AccessPolicyFile>>,
    ) -> Self {
        let mut env = Self::listing(default_connection, secrets, access_policy).await;
        env.lists_done();
        env
    }

    /// As the process starts: the stores' first lists are still arriving.
    async fn listing(
        default_connection: bool,
        secrets: Vec<Value>,
        access_policy: Option<Arc<AccessPolicyFile>>,
    ) -> Self {
        let sim = Simulator::start(
            SimConfig {
                allow_local_network: true,
                ..SimConfig::with_token(TOKEN)
            },
            seed(),
        )
        .await
        .expect("simulator");
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(service, "default");
        let api = ApiServer::start(handle, secrets);
        let config = OperatorConfig {
            default_gitlab: default_connection.then(|| DefaultConnection {
                url: sim.base_url().parse().expect("url"),
                token: SecretString::from(TOKEN),
            }),
            resync: RESYNC,
            access_policy,
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
        Self {
            sim,
            api,
            ctx,
            registries,
            upstreams,
        }
    }

    /// The stores' first lists are complete: what was listed is in them, and the
    /// reconciles are told, as `run` tells them once its reflectors are ready.
    fn lists_done(&mut self) {
        self.registries
            .apply_watcher_event(&watcher::Event::InitDone);
        self.upstreams
            .apply_watcher_event(&watcher::Event::InitDone);
        self.ctx.stores_listed();
    }

    fn know_registry(&mut self, registry: &VirtualRegistry) {
        self.registries
            .apply_watcher_event(&watcher::Event::Apply(registry.clone()));
    }

    fn know_upstream(&mut self, upstream: &Upstream) {
        self.upstreams
            .apply_watcher_event(&watcher::Event::Apply(upstream.clone()));
    }

    /// A registry in GitLab, and its object (with that id in status) in the store.
    fn registry_listing(&mut self, upstream: &str) -> i64 {
        let id = self
            .sim
            .with_state(|state| state.create_registry(100, "cache", None))
            .expect("registry")
            .id as i64;
        let registry = registry_object(&[upstream], Some(id), &[FINALIZER]);
        self.know_registry(&registry);
        id
    }

    /// An Upstream of `stub` created through a registry listing it; its first status.
    async fn created_upstream(
        &mut self,
        stub: &UpstreamStub,
        extra_spec: Value,
    ) -> (Upstream, Value) {
        self.registry_listing("dockerhub");
        let upstream = upstream_object(&stub.url(), &[FINALIZER], extra_spec);
        self.know_upstream(&upstream);
        self.reconcile_upstream(&upstream).await.expect("created");
        let seen = self.api.take();
        let status = status_patches(&seen, UPSTREAMS_PATH)[0].body["status"].clone();
        (upstream, status)
    }

    async fn reconcile_upstream(&self, upstream: &Upstream) -> controller::Result<Requeue> {
        controller::upstream::reconcile(Arc::new(upstream.clone()), self.ctx.clone()).await
    }

    async fn reconcile_registry(&self, registry: &VirtualRegistry) -> controller::Result<Requeue> {
        controller::registry::reconcile(Arc::new(registry.clone()), self.ctx.clone()).await
    }
}

fn upstream_object(url: &str, finalizers: &[&str], extra_spec: Value) -> Upstream {
    let mut spec = json!({"group": "my-org", "url": url});
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra_spec.as_object()) {
        spec.extend(extra.clone());
    }
    serde_json::from_value(json!({
        "apiVersion": "gitlabregistry.io/v1alpha1",
        "kind": "Upstream",
        "metadata": {"name": "dockerhub", "namespace": NAMESPACE, "uid": "uid-dockerhub",
                     "generation": 3, "resourceVersion": "1", "finalizers": finalizers},
        "spec": spec,
    }))
    .expect("Upstream")
}

fn registry_object(upstreams: &[&str], id: Option<i64>, finalizers: &[&str]) -> VirtualRegistry {
    let list: Vec<Value> = upstreams.iter().map(|name| json!({"name": name})).collect();
    let mut object = json!({
        "apiVersion": "gitlabregistry.io/v1alpha1",
        "kind": "VirtualRegistry",
        "metadata": {"name": "cache", "namespace": NAMESPACE, "uid": "uid-cache",
                     "generation": 1, "resourceVersion": "1", "finalizers": finalizers},
        "spec": {"group": "my-org", "upstreams": list},
    });
    if let Some(id) = id {
        object["status"] = json!({"registryId": id});
    }
    serde_json::from_value(object).expect("VirtualRegistry")
}

fn deleting<K: kube::Resource>(mut object: K) -> K {
    object.meta_mut().deletion_timestamp = Some(
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now()),
    );
    object
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .and_then(|list| list.iter().find(|c| c["type"] == type_))
        .unwrap_or_else(|| panic!("condition {type_} in {status}"))
}

fn status_patches(seen: &[Seen], collection: &str) -> Vec<Seen> {
    seen.iter()
        .filter(|s| {
            s.method == "PATCH" && s.path.starts_with(collection) && s.path.ends_with("/status")
        })
        .cloned()
        .collect()
}

fn event_reasons(seen: &[Seen]) -> Vec<String> {
    seen.iter()
        .filter(|s| s.is("POST", EVENTS_PATH))
        .map(|s| s.body["reason"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn assert_finalizer_patch(seen: &Seen, path: &str, op: &str) {
    assert!(seen.is("PATCH", path), "{seen:?}");
    assert_eq!(seen.content_type, "application/json-patch+json");
    let operations = seen.body.as_array().expect("JSON patch");
    assert!(
        operations.iter().any(|o| o["op"] == op),
        "{op} in {}",
        seen.body
    );
    if op == "add" {
        let added = operations.iter().find(|o| o["op"] == "add").expect("add");
        assert!(
            added["value"] == json!([FINALIZER]) || added["value"] == json!(FINALIZER),
            "{}",
            seen.body
        );
    }
}

// ---- Upstream ----------------------------------------------------------------------------

#[tokio::test]
async fn a_new_upstream_first_gets_the_finalizer_and_nothing_else() {
    guarded(async {
        let env = Env::start().await;
        let upstream = upstream_object("https://registry-1.docker.io", &[], json!({}));
        let requeue = env.reconcile_upstream(&upstream).await.expect("reconciled");
        assert_eq!(requeue, Requeue::await_change());
        let seen = env.api.take();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_finalizer_patch(&seen[0], &format!("{UPSTREAMS_PATH}/dockerhub"), "add");
        assert!(
            env.sim.request_counts().is_empty(),
            "GitLab is not called yet"
        );
    })
    .await;
}

#[tokio::test]
async fn an_upstream_is_created_with_one_status_patch_and_an_event_and_then_left_alone() {
    guarded(async {
        let mut env = Env::start().await;
        let stub = UpstreamStub::start(StubBehaviour::default())
            .await
            .expect("stub");
        let registry_id = env.registry_listing("dockerhub");
        let upstream = upstream_object(&stub.url(), &[FINALIZER], json!({}));
        env.know_upstream(&upstream);

        let requeue = env.reconcile_upstream(&upstream).await.expect("reconciled");
        assert_eq!(requeue, Requeue::requeue(RESYNC));
        let snapshot = env.sim.snapshot();
        assert_eq!(snapshot.upstreams.len(), 1);
        let created = &snapshot.upstreams[0];
        assert_eq!(created.url, stub.url());
        assert_eq!(snapshot.associations[0].registry_id as i64, registry_id);

        let seen = env.api.take();
        let patches = status_patches(&seen, UPSTREAMS_PATH);
        assert_eq!(patches.len(), 1, "{seen:?}");
        let patch = &patches[0];
        assert_eq!(patch.path, format!("{UPSTREAMS_PATH}/dockerhub/status"));
        assert_eq!(patch.content_type, "application/apply-patch+yaml");
        assert!(
            patch
                .query
                .contains("fieldManager=gitlab-registry-operator"),
            "{}",
            patch.query
        );
        assert!(patch.query.contains("force=true"), "{}", patch.query);
        assert_eq!(patch.body["apiVersion"], "gitlabregistry.io/v1alpha1");
        assert_eq!(patch.body["kind"], "Upstream");
        let status = &patch.body["status"];
        assert_eq!(status["upstreamId"], json!(created.id));
        assert_eq!(status["groupId"], json!(100));
        assert_eq!(status["observedGeneration"], json!(3));
        assert_eq!(status["lastConnectivityCheck"]["success"], json!(true));
        for type_ in ["Ready", "Synced", "Reachable"] {
            let condition = condition(status, type_);
            assert_eq!(condition["status"], "True", "{condition}");
            assert_eq!(condition["observedGeneration"], json!(3));
        }
        assert_eq!(event_reasons(&seen), ["Created"]);
        let event = seen
            .iter()
            .find(|s| s.is("POST", EVENTS_PATH))
            .expect("event");
        assert_eq!(event.body["regarding"]["name"], "dockerhub");
        assert_eq!(event.body["regarding"]["kind"], "Upstream");
        assert_eq!(event.body["type"], "Normal");
        // Nothing else went to the apiserver.
        assert_eq!(seen.len(), 2, "{seen:?}");

        // The next reconcile sees that status: GitLab in line, status equal, nothing sent.
        let mut current = upstream.clone();
        current.status = Some(serde_json::from_value(status.clone()).expect("status"));
        env.sim.reset_request_counts();
        let requeue = env.reconcile_upstream(&current).await.expect("reconciled");
        assert_ne!(
            requeue,
            Requeue::await_change(),
            "requeued for the next check"
        );
        let seen = env.api.take();
        assert!(seen.is_empty(), "no status patch, no event: {seen:?}");
        assert_eq!(env.sim.write_count(), 0, "{:?}", env.sim.request_counts());
    })
    .await;
}

/// The periodic connection tests GitLab received.
fn periodic_tests(sim: &SimHandle) -> u64 {
    sim.request_counts()
        .iter()
        .filter(|(route, _)| route.starts_with("POST ") && route.ends_with("/:id/test"))
        .map(|(_, count)| count)
        .sum()
}

#[tokio::test]
async fn a_periodic_test_with_the_same_result_writes_nothing_and_only_a_change_is_recorded() {
    guarded(async {
        let mut env = Env::start().await;
        let stub = UpstreamStub::start(StubBehaviour::default())
            .await
            .expect("stub");
        let (upstream, created) = env.created_upstream(&stub, json!({})).await;

        // After a restart (nothing remembered), with the recorded result first seen an hour
        // ago: a test is due (interval 10m).
        env.ctx.last_connectivity_checks.forget("team/dockerhub");
        let mut status = created.clone();
        status["lastConnectivityCheck"]["time"] = json!(
            (jiff::Timestamp::now() - jiff::SignedDuration::from_hours(1)).to_string()
        );
        let mut current = upstream.clone();
        current.status = Some(serde_json::from_value(status.clone()).expect("status"));
        env.sim.reset_request_counts();
        env.reconcile_upstream(&current).await.expect("tested");
        assert_eq!(periodic_tests(&env.sim), 1, "{:?}", env.sim.request_counts());
        let seen = env.api.take();
        assert!(seen.is_empty(), "same result: no status patch, no event: {seen:?}");
        let exposition = env.ctx.metrics.encode();
        let series = "gitlab_registry_operator_upstream_last_connectivity_check_timestamp_seconds{namespace=\"team\",name=\"dockerhub\"} ";
        let checked_at: f64 = exposition
            .lines()
            .find_map(|line| line.strip_prefix(series))
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("the time of the test is a metric: {exposition}"));
        let recorded_at = jiff::Timestamp::from_str(
            status["lastConnectivityCheck"]["time"].as_str().expect("time"),
        )
        .expect("time");
        assert!(
            checked_at > recorded_at.as_second() as f64 + 3000.0,
            "the metric holds the latest test ({checked_at}), status the first with its result ({recorded_at})"
        );

        // The test just run counts, though status still says an hour ago: none is due.
        env.sim.reset_request_counts();
        env.reconcile_upstream(&current).await.expect("reconciled");
        assert_eq!(periodic_tests(&env.sim), 0, "{:?}", env.sim.request_counts());
        assert!(env.api.take().is_empty());

        // Again after a restart, with the result first seen two hours ago: a changed result
        // is written, with the time of the test that saw it.
        env.ctx.last_connectivity_checks.forget("team/dockerhub");
        stub.set_status(401);
        let mut due = current.clone();
        let stale = jiff::Timestamp::now() - jiff::SignedDuration::from_hours(2);
        if let Some(check) = due
            .status
            .as_mut()
            .and_then(|s| s.last_connectivity_check.as_mut())
        {
            check.time = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(stale);
        }
        env.reconcile_upstream(&due).await.expect("reconciled");
        let seen = env.api.take();
        let patches = status_patches(&seen, UPSTREAMS_PATH);
        assert_eq!(patches.len(), 1, "{seen:?}");
        let changed = &patches[0].body["status"];
        assert_eq!(changed["lastConnectivityCheck"]["success"], json!(false));
        let changed_at = jiff::Timestamp::from_str(
            changed["lastConnectivityCheck"]["time"].as_str().expect("time"),
        )
        .expect("time");
        assert!(changed_at > stale + jiff::SignedDuration::from_hours(1));
        assert_eq!(condition(changed, "Reachable")["reason"], "Unauthorized");
    })
    .await;
}

#[tokio::test]
async fn upstream_deletion_with_policy_delete_deletes_in_gitlab_then_drops_the_finalizer() {
    guarded(async {
        let mut env = Env::start().await;
        let stub = UpstreamStub::start(StubBehaviour::default())
            .await
            .expect("stub");
        let (upstream, status) = env.created_upstream(&stub, json!({})).await;
        let id = status["upstreamId"].as_i64().expect("id");

        let mut current = deleting(upstream);
        current.status = Some(serde_json::from_value(status).expect("status"));
        let requeue = env.reconcile_upstream(&current).await.expect("cleaned up");
        assert_eq!(requeue, Requeue::await_change());
        assert_eq!(
            env.sim
                .request_count("DELETE", "/virtual_registries/container/upstreams/:id"),
            1
        );
        assert!(
            env.sim
                .snapshot()
                .upstreams
                .iter()
                .all(|u| u.id as i64 != id)
        );
        let seen = env.api.take();
        assert_eq!(event_reasons(&seen), ["Deleted"]);
        let last = seen.last().expect("finalizer patch");
        assert_finalizer_patch(last, &format!("{UPSTREAMS_PATH}/dockerhub"), "remove");
        assert!(status_patches(&seen, UPSTREAMS_PATH).is_empty());
    })
    .await;
}

#[tokio::test]
async fn upstream_deletion_with_policy_orphan_leaves_gitlab_alone() {
    guarded(async {
        let mut env = Env::start().await;
        let stub = UpstreamStub::start(StubBehaviour::default())
            .await
            .expect("stub");
        let (upstream, status) = env
            .created_upstream(&stub, json!({"deletionPolicy": "Orphan"}))
            .await;

        env.sim.reset_request_counts();
        let mut current = deleting(upstream);
        current.status = Some(serde_json::from_value(status).expect("status"));
        env.reconcile_upstream(&current).await.expect("cleaned up");
        assert!(
            env.sim.request_counts().is_empty(),
            "{:?}",
            env.sim.request_counts()
        );
        assert_eq!(env.sim.snapshot().upstreams.len(), 1);
        let seen = env.api.take();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_finalizer_patch(&seen[0], &format!("{UPSTREAMS_PATH}/dockerhub"), "remove");
    })
    .await;
}

#[tokio::test]
async fn a_suspended_upstream_calls_nothing_and_says_so() {
    guarded(async {
        let mut env = Env::start().await;
        env.registry_listing("dockerhub");
        env.sim.reset_request_counts();
        let upstream = upstream_object(
            "https://registry-1.docker.io",
            &[FINALIZER],
            json!({"suspend": true}),
        );
        let requeue = env.reconcile_upstream(&upstream).await.expect("reconciled");
        assert_eq!(requeue, Requeue::await_change());
        assert!(
            env.sim.request_counts().is_empty(),
            "{:?}",
            env.sim.request_counts()
        );
        let seen = env.api.take();
        let patches = status_patches(&seen, UPSTREAMS_PATH);
        assert_eq!(patches.len(), 1, "{seen:?}");
        let ready = condition(&patches[0].body["status"], "Ready");
        assert_eq!(ready["status"], "False");
        assert_eq!(ready["reason"], "Suspended");

        // Same again with that status: nothing at all.
        let mut current = upstream.clone();
        current.status =
            Some(serde_json::from_value(patches[0].body["status"].clone()).expect("status"));
        env.reconcile_upstream(&current).await.expect("reconciled");
        assert!(env.api.take().is_empty());
        assert!(env.sim.request_counts().is_empty());
    })
    .await;
}

#[tokio::test]
async fn a_missing_connection_is_reported_and_retried_slowly() {
    guarded(async {
        let env = Env::with(false, Vec::new()).await;
        let upstream = upstream_object("https://registry-1.docker.io", &[FINALIZER], json!({}));
        let error = env
            .reconcile_upstream(&upstream)
            .await
            .expect_err("no connection");
        assert_eq!(error.reason(), "ConnectionMissing");
        let seen = env.api.take();
        let patches = status_patches(&seen, UPSTREAMS_PATH);
        assert_eq!(patches.len(), 1, "{seen:?}");
        let status = &patches[0].body["status"];
        let synced = condition(status, "Synced");
        assert_eq!(synced["status"], "False");
        assert_eq!(synced["reason"], "ConnectionMissing");
        let ready = condition(status, "Ready");
        assert_eq!(ready["status"], "False");
        assert_eq!(ready["reason"], "ConnectionMissing");
        let requeue =
            controller::upstream::error_policy(Arc::new(upstream), &error, env.ctx.clone());
        assert_eq!(requeue, Requeue::requeue(RESYNC));
        assert!(env.sim.request_counts().is_empty());
    })
    .await;
}

#[tokio::test]
async fn credentials_come_from_a_secret_in_the_objects_namespace() {
    guarded(async {
        let secret = json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "dockerhub-login", "namespace": NAMESPACE, "resourceVersion": "41"},
            "data": {"username": "cm9ib3Q=", "password": "czNjcmV0"},
        });
        let mut env = Env::with(true, vec![secret]).await;
        let stub = UpstreamStub::start(StubBehaviour::requiring("robot", "s3cret"))
            .await
            .expect("stub");
        env.registry_listing("dockerhub");
        let upstream = upstream_object(
            &stub.url(),
            &[FINALIZER],
            json!({"credentialsSecretRef": {"name": "dockerhub-login"}}),
        );
        env.reconcile_upstream(&upstream).await.expect("reconciled");
        let seen = env.api.take();
        assert!(seen.iter().any(|s| s.is("GET", &format!("/api/v1/namespaces/{NAMESPACE}/secrets/dockerhub-login"))));
        let status = &status_patches(&seen, UPSTREAMS_PATH)[0].body["status"];
        assert_eq!(
            status["appliedCredentials"],
            json!({"secretName": "dockerhub-login", "resourceVersion": "41"})
        );
        assert_eq!(condition(status, "Reachable")["status"], "True");
        let text = serde_json::to_string(&seen.iter().map(|s| &s.body).collect::<Vec<_>>())
            .expect("json");
        assert!(!text.contains("s3cret"), "no password in status or events");
        let snapshot = env.sim.snapshot();
        assert_eq!(snapshot.upstreams[0].username.as_deref(), Some("robot"));
        assert!(snapshot.upstreams[0].password.is_some());

        // A missing Secret is SecretNotFound, not a GitLab call.
        env.sim.reset_request_counts();
        let mut other = upstream_object(
            &stub.url(),
            &[FINALIZER],
            json!({"credentialsSecretRef": {"name": "absent"}}),
        );
        other.metadata.name = Some("quay".into());
        let error = env.reconcile_upstream(&other).await.expect_err("no secret");
        assert_eq!(error.reason(), "SecretNotFound");
        assert!(env.sim.request_counts().is_empty());
        let seen = env.api.take();
        let status = &status_patches(&seen, UPSTREAMS_PATH)[0].body["status"];
        assert_eq!(condition(status, "Synced")["reason"], "SecretNotFound");
    })
    .await;
}

/// A Secret still holding `export`'s placeholder password is not sent: the Upstream waits,
/// with the reason, and GitLab is not called.
#[tokio::test]
async fn a_placeholder_password_from_export_is_never_sent() {
    guarded(async {
        let secret = json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "hub-credentials", "namespace": NAMESPACE, "resourceVersion": "7"},
            "stringData": {
                "username": "robot",
                "password": gitlab_registry_operator::crd::upstream::PLACEHOLDER_PASSWORD,
            },
        });
        let env = Env::with(true, vec![secret]).await;
        let upstream = upstream_object(
            "https://registry.example.com",
            &[FINALIZER],
            json!({"credentialsSecretRef": {"name": "hub-credentials"}}),
        );
        let error = env
            .reconcile_upstream(&upstream)
            .await
            .expect_err("placeholder");
        assert_eq!(error.reason(), "PlaceholderPassword");
        assert!(!error.is_transient());
        assert!(
            env.sim.request_counts().is_empty(),
            "{:?}",
            env.sim.request_counts()
        );
        let seen = env.api.take();
        let status = &status_patches(&seen, UPSTREAMS_PATH)[0].body["status"];
        let synced = condition(status, "Synced");
        assert_eq!(synced["reason"], "PlaceholderPassword");
        assert!(
            synced["message"]
                .as_str()
                .is_some_and(|m| m.contains("hub-credentials")),
            "{synced}"
        );
    })
    .await;
}

#[tokio::test]
async fn an_upstream_without_a_registry_waits() {
    guarded(async {
        let env = Env::start().await;
        let stub = UpstreamStub::start(StubBehaviour::default())
            .await
            .expect("stub");
        let upstream = upstream_object(&stub.url(), &[FINALIZER], json!({}));
        env.reconcile_upstream(&upstream).await.expect("reconciled");
        // Only the group-level connection test is sent while waiting; nothing is created.
        let counts = env.sim.request_counts();
        let writes: Vec<_> = counts
            .iter()
            .filter(|(route, _)| !route.starts_with("GET "))
            .collect();
        assert_eq!(
            writes,
            [(
                &"POST /groups/:id/-/virtual_registries/container/upstreams/test".to_owned(),
                &1
            )]
        );
        let seen = env.api.take();
        let status = &status_patches(&seen, UPSTREAMS_PATH)[0].body["status"];
        let ready = condition(status, "Ready");
        assert_eq!(ready["status"], "False");
        assert_eq!(ready["reason"], "WaitingForRegistry");
        // The test and what it tested are in status, for the create to reuse.
        let check = &status["lastConnectivityCheck"];
        assert_eq!(check["url"], stub.url());
        assert_eq!(check["success"], true);
        assert!(check["time"].is_string(), "{check}");
    })
    .await;
}

// ---- VirtualRegistry ---------------------------------------------------------------------

#[tokio::test]
async fn a_registry_is_created_and_reports_its_pull_prefix() {
    guarded(async {
        let env = Env::start().await;
        let registry = registry_object(&[], None, &[FINALIZER]);
        env.reconcile_registry(&registry).await.expect("reconciled");
        let snapshot = env.sim.snapshot();
        assert_eq!(snapshot.registries.len(), 1);
        let id = snapshot.registries[0].id;
        let seen = env.api.take();
        let patches = status_patches(&seen, REGISTRIES_PATH);
        assert_eq!(patches.len(), 1, "{seen:?}");
        let status = &patches[0].body["status"];
        assert_eq!(status["registryId"], json!(id));
        assert_eq!(
            status["pullPrefix"],
            json!(format!(
                "{}/virtual_registries/container/{id}",
                env.sim.address()
            ))
        );
        assert_eq!(condition(status, "Ready")["status"], "True");
        assert_eq!(event_reasons(&seen), ["Created"]);

        let mut current = registry.clone();
        current.status = Some(serde_json::from_value(status.clone()).expect("status"));
        env.sim.reset_request_counts();
        env.reconcile_registry(&current).await.expect("reconciled");
        assert!(env.api.take().is_empty());
        assert_eq!(env.sim.write_count(), 0);
    })
    .await;
}

#[tokio::test]
async fn no_reconcile_starts_before_the_stores_hold_their_first_lists() {
    guarded(async {
        let mut env = Env::listing(true, Vec::new(), None).await;
        // On a restart the registry's own watch hands it out while the Upstream list is
        // still arriving: the Upstream is on its way, not in the store yet.
        let registry = registry_object(&["dockerhub"], None, &[FINALIZER]);
        let upstream = upstream_object("https://registry-1.docker.io", &[FINALIZER], json!({}));
        env.registries
            .apply_watcher_event(&watcher::Event::InitApply(registry.clone()));
        env.upstreams
            .apply_watcher_event(&watcher::Event::InitApply(upstream));
        let reconcile = tokio::spawn(controller::registry::reconcile(
            Arc::new(registry),
            env.ctx.clone(),
        ));
        // However often the reconcile gets to run meanwhile, it waits.
        for _ in 0..1000 {
            tokio::task::yield_now().await;
        }
        assert!(!reconcile.is_finished());
        assert!(env.api.take().is_empty(), "nothing sent to Kubernetes");
        assert!(
            env.sim.request_counts().is_empty(),
            "nothing sent to GitLab"
        );
        assert!(
            !env.ctx
                .metrics
                .encode()
                .contains("reconciles_total{kind=\"VirtualRegistry\"}"),
            "no reconcile started"
        );

        env.lists_done();
        reconcile
            .await
            .expect("the reconcile ran")
            .expect("reconciled");
        let seen = env.api.take();
        let patches = status_patches(&seen, REGISTRIES_PATH);
        assert_eq!(patches.len(), 1, "{seen:?}");
        let resolved = condition(&patches[0].body["status"], "UpstreamsResolved");
        assert_eq!(
            resolved["reason"], "WaitingForUpstream",
            "the Upstream is found, waiting for its id: {resolved}"
        );
    })
    .await;
}

#[tokio::test]
async fn registry_deletion_keeps_upstreams_whose_objects_remain() {
    guarded(async {
        let mut env = Env::start().await;
        let kept_stub = UpstreamStub::start(StubBehaviour::default())
            .await
            .expect("stub");
        let gone_stub = UpstreamStub::start(StubBehaviour::default())
            .await
            .expect("stub");
        let registry_id = env.registry_listing("dockerhub");
        let (kept, gone) = env.sim.with_state(|state| {
            let new = |name: &str, url: String| gitlab_registry_operator::sim::state::NewUpstream {
                name: name.into(),
                url,
                ..Default::default()
            };
            let kept = state
                .create_upstream(registry_id as u64, new("dockerhub", kept_stub.url()), true)
                .expect("kept")
                .0
                .id;
            let gone = state
                .create_upstream(registry_id as u64, new("old", gone_stub.url()), true)
                .expect("gone")
                .0
                .id;
            (kept, gone)
        });
        let mut upstream = upstream_object(&kept_stub.url(), &[FINALIZER], json!({}));
        upstream.status =
            Some(serde_json::from_value(json!({"upstreamId": kept})).expect("status"));
        env.know_upstream(&upstream);

        let registry = deleting(registry_object(
            &["dockerhub"],
            Some(registry_id),
            &[FINALIZER],
        ));
        env.reconcile_registry(&registry).await.expect("cleaned up");
        let snapshot = env.sim.snapshot();
        assert!(snapshot.registries.is_empty());
        let left: Vec<u64> = snapshot.upstreams.iter().map(|u| u.id).collect();
        assert_eq!(left, [kept], "the declared one survives, {gone} cascaded");
        let seen = env.api.take();
        assert_finalizer_patch(
            seen.last().expect("finalizer patch"),
            &format!("{REGISTRIES_PATH}/cache"),
            "remove",
        );
        let mut reasons = event_reasons(&seen);
        reasons.sort();
        assert_eq!(reasons, ["Deleted", "Disassociated"]);

        // Orphan: GitLab untouched.
        let registry_id = env
            .sim
            .with_state(|state| state.create_registry(100, "cache", None))
            .expect("registry")
            .id as i64;
        let mut orphan = deleting(registry_object(&[], Some(registry_id), &[FINALIZER]));
        orphan.spec.deletion_policy = gitlab_registry_operator::crd::DeletionPolicy::Orphan;
        env.sim.reset_request_counts();
        env.reconcile_registry(&orphan).await.expect("cleaned up");
        assert!(env.sim.request_counts().is_empty());
        assert_eq!(env.sim.snapshot().registries.len(), 1);
        let seen = env.api.take();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_finalizer_patch(&seen[0], &format!("{REGISTRIES_PATH}/cache"), "remove");
    })
    .await;
}

#[tokio::test]
async fn a_refused_connection_test_is_a_warning_event_and_a_synced_false_status() {
    guarded(async {
        let mut env = Env::start().await;
        let stub = UpstreamStub::start(StubBehaviour::status(401))
            .await
            .expect("stub");
        env.registry_listing("dockerhub");
        let upstream = upstream_object(&stub.url(), &[FINALIZER], json!({}));
        let requeue = env.reconcile_upstream(&upstream).await.expect("reconciled");
        assert_ne!(requeue, Requeue::await_change(), "tested again later");
        assert!(env.sim.snapshot().upstreams.is_empty(), "not created");
        let seen = env.api.take();
        let status = &status_patches(&seen, UPSTREAMS_PATH)[0].body["status"];
        let synced = condition(status, "Synced");
        assert_eq!(synced["status"], "False");
        assert_eq!(synced["reason"], "ConnectivityTestFailed");
        assert!(
            synced["message"]
                .as_str()
                .is_some_and(|m| m.contains("Error: 401 - Unauthorized")),
            "{synced}"
        );
        assert_eq!(condition(status, "Reachable")["reason"], "Unauthorized");
        assert_eq!(condition(status, "Ready")["status"], "False");
        let event = seen
            .iter()
            .find(|s| s.is("POST", EVENTS_PATH))
            .expect("event");
        assert_eq!(event.body["reason"], "ConnectivityTestFailed");
        assert_eq!(event.body["type"], "Warning");
    })
    .await;
}

/// The `upstream_reachable{namespace,name}` series of the `dockerhub` Upstream, if exported.
fn dockerhub_reachable(metrics: &Metrics) -> Option<String> {
    let prefix = format!(
        "gitlab_registry_operator_upstream_reachable{{namespace=\"{NAMESPACE}\",name=\"dockerhub\"}} "
    );
    metrics
        .encode()
        .lines()
        .find_map(|line| line.strip_prefix(&prefix).map(str::to_owned))
}

#[tokio::test]
async fn reachability_and_the_last_successful_reconcile_reach_the_metrics() {
    guarded(async {
        let mut env = Env::start().await;
        let stub = UpstreamStub::start(StubBehaviour::default())
            .await
            .expect("stub");
        env.registry_listing("dockerhub");
        let upstream = upstream_object(&stub.url(), &[FINALIZER], json!({}));
        env.know_upstream(&upstream);
        env.reconcile_upstream(&upstream).await.expect("created");
        assert_eq!(dockerhub_reachable(&env.ctx.metrics).as_deref(), Some("1"));
        let text = env.ctx.metrics.encode();
        let last_success = text
            .lines()
            .find_map(|line| {
                line.strip_prefix(
                    "gitlab_registry_operator_last_successful_reconcile_timestamp_seconds{kind=\"Upstream\"} ",
                )
            })
            .and_then(|value| value.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no last success of Upstream: {text}"));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs_f64();
        assert!(
            last_success > now - 3600.0 && last_success <= now,
            "a Unix time of this run: {last_success}"
        );

        // Deleted: its series goes with it.
        let seen = env.api.take();
        let status = status_patches(&seen, UPSTREAMS_PATH)[0].body["status"].clone();
        let mut current = deleting(upstream);
        current.status = Some(serde_json::from_value(status).expect("status"));
        env.reconcile_upstream(&current).await.expect("cleaned up");
        assert_eq!(dockerhub_reachable(&env.ctx.metrics), None);

        // A refused connection test: 0, and a suspended Upstream is not tested, so no series.
        let env = Env::start().await;
        let refusing = UpstreamStub::start(StubBehaviour::status(401))
            .await
            .expect("stub");
        let upstream = upstream_object(&refusing.url(), &[FINALIZER], json!({}));
        env.reconcile_upstream(&upstream).await.expect("reconciled");
        assert_eq!(dockerhub_reachable(&env.ctx.metrics).as_deref(), Some("0"));
        let suspended = upstream_object(&refusing.url(), &[FINALIZER], json!({"suspend": true}));
        env.reconcile_upstream(&suspended).await.expect("reconciled");
        assert_eq!(dockerhub_reachable(&env.ctx.metrics), None);
    })
    .await;
}

#[tokio::test]
async fn a_gitlab_rate_limit_requeues_after_gitlabs_delay() {
    guarded(async {
        let env = Env::start().await;
        env.sim
            .inject_fault(gitlab_registry_operator::sim::FaultSpec {
                once: vec![gitlab_registry_operator::sim::OneShotFault {
                    count: 1,
                    method: Some("GET".into()),
                    route: Some("/groups/:id/-/virtual_registries/container/registries".into()),
                    fault: gitlab_registry_operator::sim::FaultAction::RateLimited {
                        retry_after_seconds: 900,
                    },
                }],
                ..Default::default()
            });
        let registry = registry_object(&[], None, &[FINALIZER]);
        let error = env
            .reconcile_registry(&registry)
            .await
            .expect_err("rate limited");
        assert_eq!(error.reason(), "RateLimited");
        let seen = env.api.take();
        let status = &status_patches(&seen, REGISTRIES_PATH)[0].body["status"];
        assert_eq!(condition(status, "Synced")["reason"], "RateLimited");
        assert!(event_reasons(&seen).contains(&"RateLimited".to_owned()));
        let requeue =
            controller::registry::error_policy(Arc::new(registry), &error, env.ctx.clone());
        assert_eq!(requeue, Requeue::requeue(Duration::from_secs(900)));
        assert!(env.sim.snapshot().registries.is_empty());
    })
    .await;
}

// ---- CleanupPolicy -----------------------------------------------------------------------

const POLICIES_PATH: &str = "/apis/gitlabregistry.io/v1alpha1/namespaces/team/cleanuppolicies";

/// A project with one repository: `latest`, `main` and ten old numbered tags.
fn cleanup_seed() -> Seed {
    let old = jiff::Timestamp::now() - jiff::SignedDuration::from_hours(24 * 60);
    let mut tags = vec![
        json!({"name": "latest", "digest": format!("sha256:{}", "a".repeat(64)), "created_at": old.to_string()}),
        json!({"name": "main", "digest": format!("sha256:{}", "b".repeat(64)), "created_at": old.to_string()}),
    ];
    for n in 0..10 {
        let created = old - jiff::SignedDuration::from_hours(n);
        tags.push(json!({"name": format!("1.0.{n}"), "digest": format!("sha256:{n:064}"), "created_at": created.to_string()}));
    }
    let seed = json!({
        "groups": [{"id": 100, "full_path": "my-org"}],
        "projects": [{"id": 200, "path_with_namespace": "my-org/app",
                      "repositories": [{"id": 300, "name": "", "tags": tags}]}],
    });
    Seed::parse(&seed.to_string()).expect("seed")
}

fn policy_object(
    annotations: Value,
    status: Value,
    keep_in_use: bool,
) -> gitlab_registry_operator::crd::CleanupPolicy {
    serde_json::from_value(json!({
        "apiVersion": "gitlabregistry.io/v1alpha1",
        "kind": "CleanupPolicy",
        "metadata": {"name": "nightly", "namespace": NAMESPACE, "uid": "uid-nightly", "generation": 1,
                     "resourceVersion": "1", "finalizers": [FINALIZER], "annotations": annotations,
                     "creationTimestamp": jiff::Timestamp::now().to_string()},
        "spec": {"schedule": "0 3 * * *", "target": {"containerRepositories": {"project": "my-org/app"}},
                 "rules": {"nameRegexDelete": ".*", "nameRegexKeep": "main", "keepN": 3},
                 "safety": {"keepInUse": keep_in_use}},
        "status": status,
    }))
    .expect("CleanupPolicy")
}

async fn cleanup_env(pods_synced: Option<bool>) -> (SimHandle, ApiServer, Arc<Context>) {
    let (sim, api, ctx) = cleanup_env_with(pods_synced, None, None).await;
    (sim, api, Arc::new(ctx))
}

/// As [`cleanup_env`], with an access policy and a CleanupPolicy store, the context not yet
/// shared.
async fn cleanup_env_with(
    pods_synced: Option<bool>,
    access_policy: Option<Arc<AccessPolicyFile>>,
    policies: Option<store::Store<CleanupPolicy>>,
) -> (SimHandle, ApiServer, Context) {
    let sim = Simulator::start(
        SimConfig {
            tag_list_details: true,
            ..SimConfig::with_token(TOKEN)
        },
        cleanup_seed(),
    )
    .await
    .expect("simulator");
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let api = ApiServer::start(handle, Vec::new());
    let config = OperatorConfig {
        default_gitlab: Some(DefaultConnection {
            url: sim.base_url().parse().expect("url"),
            token: SecretString::from(TOKEN),
        }),
        resync: RESYNC,
        access_policy,
        ..OperatorConfig::default()
    };
    let (registry_store, _) = store::store::<VirtualRegistry>();
    let (upstream_store, _) = store::store::<Upstream>();
    let mut ctx = Context::new(
        kube::Client::new(service, "default"),
        config,
        Arc::new(Metrics::default()),
        registry_store,
        upstream_store,
    );
    ctx.stores_listed();
    if let Some(synced) = pods_synced {
        let pods = controller::cleanup_policy::PodImages::default();
        if synced {
            // An empty cluster's Pod list.
            pods.apply(kube::runtime::watcher::Event::Init);
            pods.apply(kube::runtime::watcher::Event::InitDone);
        }
        ctx = ctx.with_pods(pods);
    }
    if let Some(policies) = policies {
        ctx = ctx.with_policies(policies);
    }
    (sim, api, ctx)
}

/// The tags GitLab lists for the repository, by name.
async fn tag_names(sim: &SimHandle) -> Vec<String> {
    let tags: Vec<Value> = reqwest::Client::new()
        .get(format!(
            "{}/projects/200/registry/repositories/300/tags?per_page=100",
            sim.api_url()
        ))
        .header("PRIVATE-TOKEN", TOKEN)
        .send()
        .await
        .expect("listed")
        .json()
        .await
        .expect("json");
    let mut names: Vec<String> = tags
        .iter()
        .filter_map(|t| t["name"].as_str().map(str::to_owned))
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn a_policy_not_yet_due_calls_nothing_and_schedules_the_next_run() {
    guarded(async {
        let (sim, api, ctx) = cleanup_env(Some(true)).await;
        let policy = policy_object(json!({}), json!(null), true);
        let requeue = controller::cleanup_policy::reconcile(Arc::new(policy), ctx)
            .await
            .expect("reconciled");
        assert_ne!(requeue, Requeue::await_change());
        assert!(
            sim.request_counts().is_empty(),
            "no GitLab request before the slot: {:?}",
            sim.request_counts()
        );
        let patches = status_patches(&api.take(), POLICIES_PATH);
        assert_eq!(patches.len(), 1);
        let status = &patches[0].body["status"];
        assert!(
            status["nextRunTime"]
                .as_str()
                .is_some_and(|t| t.contains("T03:00:00")),
            "{status}"
        );
        assert_eq!(condition(status, "Ready")["status"], "True");
        assert!(status.get("lastRun").is_none());
    })
    .await;
}

#[tokio::test]
async fn a_run_request_runs_once_reports_and_deletes_exactly_what_the_rules_select() {
    guarded(async {
        let (sim, api, ctx) = cleanup_env(Some(true)).await;
        let policy = policy_object(
            json!({"gitlabregistry.io/run-requested-at": "2026-11-23T10:00:00Z"}),
            json!(null),
            false,
        );
        controller::cleanup_policy::reconcile(Arc::new(policy), ctx.clone())
            .await
            .expect("reconciled");
        // latest and main kept; of the ten numbered tags the three newest (1.0.0..1.0.2) survive.
        assert_eq!(
            tag_names(&sim).await,
            ["1.0.0", "1.0.1", "1.0.2", "latest", "main"]
        );
        let seen = api.take();
        let patches = status_patches(&seen, POLICIES_PATH);
        assert_eq!(patches.len(), 1);
        let status = &patches[0].body["status"];
        assert_eq!(status["lastRun"]["tagsDeleted"], 7, "{status}");
        assert_eq!(status["lastRun"]["outcome"], "Succeeded");
        assert_eq!(status["lastRun"]["dryRun"], false);
        assert_eq!(status["lastHandledRunRequest"], "2026-11-23T10:00:00Z");
        assert!(
            event_reasons(&seen).contains(&"CleanupCompleted".to_string()),
            "{:?}",
            event_reasons(&seen)
        );

        // The same request value again: no second run.
        sim.reset_request_counts();
        let handled = policy_object(
            json!({"gitlabregistry.io/run-requested-at": "2026-11-23T10:00:00Z"}),
            status.clone(),
            false,
        );
        controller::cleanup_policy::reconcile(Arc::new(handled), ctx)
            .await
            .expect("reconciled");
        assert!(
            sim.request_counts().is_empty(),
            "{:?}",
            sim.request_counts()
        );
    })
    .await;
}

#[tokio::test]
async fn keep_in_use_before_the_pod_cache_synced_deletes_nothing() {
    guarded(async {
        let (sim, api, ctx) = cleanup_env(Some(false)).await;
        let before = tag_names(&sim).await;
        assert_eq!(before.len(), 12);
        sim.reset_request_counts();
        let policy = policy_object(
            json!({"gitlabregistry.io/run-requested-at": "1"}),
            json!(null),
            true,
        );
        controller::cleanup_policy::reconcile(Arc::new(policy), ctx)
            .await
            .expect("reconciled");
        assert!(
            sim.request_counts()
                .keys()
                .all(|route| !route.starts_with("DELETE")),
            "{:?}",
            sim.request_counts()
        );
        assert_eq!(tag_names(&sim).await, before);
        assert!(
            sim.request_counts()
                .keys()
                .all(|route| !route.starts_with("DELETE")),
            "{:?}",
            sim.request_counts()
        );
        let status = &status_patches(&api.take(), POLICIES_PATH)[0].body["status"];
        assert_eq!(status["lastRun"]["outcome"], "Partial", "{status}");
        assert!(
            status["lastRun"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("Pod cache")),
            "{status}"
        );
    })
    .await;
}

#[tokio::test]
async fn missed_slots_run_once() {
    guarded(async {
        let (sim, api, ctx) = cleanup_env(Some(true)).await;
        let three_days_ago =
            (jiff::Timestamp::now() - jiff::SignedDuration::from_hours(72)).to_string();
        let policy = policy_object(
            json!({}),
            json!({"lastScheduleTime": three_days_ago}),
            false,
        );
        controller::cleanup_policy::reconcile(Arc::new(policy), ctx)
            .await
            .expect("reconciled");
        let deletes: u64 = sim
            .request_counts()
            .iter()
            .filter(|(r, _)| r.starts_with("DELETE"))
            .map(|(_, n)| n)
            .sum();
        assert_eq!(deletes, 7, "one run, not three");
        let status = &status_patches(&api.take(), POLICIES_PATH)[0].body["status"];
        let last = status["lastScheduleTime"].as_str().expect("recorded");
        assert!(
            last.contains("T03:00:00") && last > three_days_ago.as_str(),
            "{status}"
        );
    })
    .await;
}

#[tokio::test]
async fn a_run_over_its_deletion_budget_asks_for_approval_and_the_annotation_grants_it() {
    guarded(async {
        let (sim, api, ctx) = cleanup_env(Some(true)).await;
        let before = tag_names(&sim).await;
        let over_budget = |annotations: Value, status: Value| {
            let mut policy = policy_object(annotations, status, false);
            policy.spec.limits.max_deletion_percent = Some(50);
            policy
        };
        // 7 of 12 tags would go: more than 50%.
        let policy = over_budget(
            json!({"gitlabregistry.io/run-requested-at": "1"}),
            json!(null),
        );
        controller::cleanup_policy::reconcile(Arc::new(policy), ctx.clone())
            .await
            .expect("reconciled");
        assert_eq!(tag_names(&sim).await, before);
        let seen = api.take();
        let status = status_patches(&seen, POLICIES_PATH)[0].body["status"].clone();
        let last_run = &status["lastRun"];
        assert_eq!(last_run["outcome"], "NeedsApproval", "{status}");
        let pending = &last_run["pendingApproval"][0];
        assert_eq!(pending["repository"], "my-org/app", "{status}");
        assert_eq!((pending["wouldDelete"].as_i64(), pending["total"].as_i64()), (Some(7), Some(12)));
        let fingerprint = pending["fingerprint"].as_str().expect("fingerprint").to_owned();
        assert_eq!(condition(&status, "Synced")["reason"], "NeedsApproval");
        assert!(
            event_reasons(&seen).contains(&"NeedsApproval".to_string()),
            "{:?}",
            event_reasons(&seen)
        );
        let metrics = ctx.metrics.encode();
        assert!(
            metrics.contains("gitlab_registry_operator_cleanup_pending_approvals_total 1"),
            "{metrics}"
        );
        assert!(
            metrics.contains("gitlab_registry_operator_cleanup_runs_total{outcome=\"NeedsApproval\"} 1"),
            "{metrics}"
        );

        // Approved: the next requested run deletes exactly that set.
        let approved = over_budget(
            json!({"gitlabregistry.io/run-requested-at": "2",
                   "gitlabregistry.io/approve-deletion": format!("0000000000000000, {fingerprint}")}),
            status.clone(),
        );
        controller::cleanup_policy::reconcile(Arc::new(approved), ctx)
            .await
            .expect("reconciled");
        assert_eq!(
            tag_names(&sim).await,
            ["1.0.0", "1.0.1", "1.0.2", "latest", "main"]
        );
        let status = &status_patches(&api.take(), POLICIES_PATH)[0].body["status"];
        assert_eq!(status["lastRun"]["outcome"], "Succeeded", "{status}");
        assert!(status["lastRun"].get("pendingApproval").is_none(), "{status}");
        assert_eq!(status["lastRun"]["keptByReason"]["KeepN"], 3, "{status}");
    })
    .await;
}

// ---- Leader election ---------------------------------------------------------------------

/// A Lease as a fake apiserver keeps it, with the field manager that owns `holderIdentity`
/// (server-side apply refuses to take it from another manager: 409 Conflict).
#[derive(Default)]
struct FakeLease {
    lease: Option<Value>,
    holder_owner: Option<String>,
    version: u64,
    /// Requests per instance, to know the standby has looked.
    requests_by: BTreeMap<&'static str, u64>,
}

fn lease_path() -> String {
    format!("/apis/coordination.k8s.io/v1/namespaces/{NAMESPACE}/leases")
}

fn answer_lease(state: &Mutex<FakeLease>, request: &Seen) -> (u16, Value) {
    let mut fake = state.lock().expect("lease");
    let name_path = format!("{}/{}", lease_path(), controller::runtime::LEASE_NAME);
    let manager = request
        .query
        .split('&')
        .find_map(|pair| pair.strip_prefix("fieldManager="))
        .unwrap_or_default()
        .to_owned();
    match (request.method.as_str(), request.path.as_str()) {
        ("GET", path) if path == name_path => match &fake.lease {
            Some(lease) => (200, lease.clone()),
            None => not_found("lease"),
        },
        ("POST", path) if path == lease_path() => {
            if fake.lease.is_some() {
                return (
                    409,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "AlreadyExists", "code": 409, "message": "exists"}),
                );
            }
            fake.version += 1;
            let mut lease = request.body.clone();
            lease["metadata"]["resourceVersion"] = json!(fake.version.to_string());
            lease["metadata"]["namespace"] = json!(NAMESPACE);
            fake.lease = Some(lease.clone());
            (201, lease)
        }
        ("PATCH", path) if path == name_path => {
            let Some(mut lease) = fake.lease.clone() else {
                return not_found("lease");
            };
            let patch_spec = request.body["spec"]
                .as_object()
                .cloned()
                .unwrap_or_default();
            let apply = request.content_type.starts_with("application/apply-patch");
            let current_holder = lease["spec"]["holderIdentity"].as_str().map(str::to_owned);
            let wanted_holder = patch_spec
                .get("holderIdentity")
                .and_then(Value::as_str)
                .map(str::to_owned);
            if apply
                && current_holder.is_some()
                && wanted_holder != current_holder
                && fake.holder_owner.as_deref() != Some(manager.as_str())
            {
                return (
                    409,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409,
                                    "message": "Apply failed with 1 conflict: conflict with another manager: .spec.holderIdentity"}),
                );
            }
            for (field, value) in patch_spec {
                if field == "holderIdentity" {
                    fake.holder_owner = (!value.is_null()).then(|| manager.clone());
                }
                if value.is_null() {
                    if let Some(spec) = lease["spec"].as_object_mut() {
                        spec.remove(&field);
                    }
                } else {
                    lease["spec"][field] = value;
                }
            }
            fake.version += 1;
            lease["metadata"]["resourceVersion"] = json!(fake.version.to_string());
            fake.lease = Some(lease.clone());
            (200, lease)
        }
        _ => not_found("object"),
    }
}

/// A kube client whose apiserver is the shared fake Lease.
fn lease_client(state: Arc<Mutex<FakeLease>>, instance: &'static str) -> kube::Client {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            let seen = Seen::read(request).await;
            *state
                .lock()
                .expect("lease")
                .requests_by
                .entry(instance)
                .or_default() += 1;
            let (status, answer) = answer_lease(&state, &seen);
            send.send_response(
                Response::builder()
                    .status(status)
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(Body::from(serde_json::to_vec(&answer).expect("json")))
                    .expect("response"),
            );
        }
    });
    kube::Client::new(service, NAMESPACE)
}

fn holder(state: &Mutex<FakeLease>) -> Option<String> {
    state
        .lock()
        .expect("lease")
        .lease
        .as_ref()
        .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_owned))
}

#[tokio::test]
async fn of_two_instances_only_one_holds_the_lease_until_it_lets_go() {
    guarded(async {
        let state: Arc<Mutex<FakeLease>> = Arc::default();
        let first = controller::runtime::acquire_lease(
            lease_client(state.clone(), "first"),
            NAMESPACE,
            "first",
        )
        .await
        .expect("the first instance gets the lease");
        assert_eq!(holder(&state).as_deref(), Some("first"));

        let second = tokio::spawn(controller::runtime::acquire_lease(
            lease_client(state.clone(), "second"),
            NAMESPACE,
            "second",
        ));
        // The second instance reads the lease (twice: set up, then its first lock attempt) and
        // finds it held.
        while state
            .lock()
            .expect("lease")
            .requests_by
            .get("second")
            .copied()
            .unwrap_or(0)
            < 2
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            !second.is_finished(),
            "the standby must not hold the lease while the leader does"
        );
        assert_eq!(holder(&state).as_deref(), Some("first"));

        // The leader stops: dropping its receiver releases the lease and the standby takes it.
        drop(first);
        let second = second
            .await
            .expect("joined")
            .expect("the standby gets the lease");
        assert!(*second.borrow());
        assert_eq!(holder(&state).as_deref(), Some("second"));
    })
    .await;
}

#[tokio::test]
async fn two_instances_starting_together_elect_exactly_one() {
    guarded(async {
        let state: Arc<Mutex<FakeLease>> = Arc::default();
        let a = tokio::spawn(controller::runtime::acquire_lease(
            lease_client(state.clone(), "a"),
            NAMESPACE,
            "a",
        ));
        let b = tokio::spawn(controller::runtime::acquire_lease(
            lease_client(state.clone(), "b"),
            NAMESPACE,
            "b",
        ));
        while holder(&state).is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Let both finish their first attempts, then exactly the holder has returned.
        while ["a", "b"].iter().any(|i| {
            state
                .lock()
                .expect("lease")
                .requests_by
                .get(i)
                .copied()
                .unwrap_or(0)
                < 3
        }) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let leader = holder(&state).expect("a holder");
        let (won, lost) = if leader == "a" { (a, b) } else { (b, a) };
        let receiver = won.await.expect("joined").expect("the holder acquired");
        assert!(*receiver.borrow());
        assert!(!lost.is_finished(), "the other instance stands by");
        assert_eq!(holder(&state), Some(leader));
        lost.abort();
    })
    .await;
}

// ---- Tenancy -----------------------------------------------------------------------------

/// An access policy file of its own for one test.
fn policy_file(test: &str, text: &str) -> (std::path::PathBuf, Arc<AccessPolicyFile>) {
    let dir = std::env::temp_dir().join(format!("controller-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("access.yaml");
    std::fs::write(&path, text).expect("policy written");
    let file = AccessPolicyFile::load(&path).expect("policy loads");
    (path, Arc::new(file))
}

/// The Ready condition of the first status patch to `collection` since the last look.
fn patched_ready(api: &ApiServer, collection: &str) -> Value {
    let patches = status_patches(&api.take(), collection);
    let patch = patches.first().expect("a status patch");
    condition(&patch.body["status"], "Ready").clone()
}

fn assert_no_gitlab_request(sim: &SimHandle) {
    let counts = sim.request_counts();
    assert!(counts.is_empty(), "no GitLab request: {counts:?}");
}

/// Asserts Ready's reason and that its message names `part`.
fn assert_ready_false(ready: &Value, reason: &str, part: &str) {
    assert_eq!(ready["status"], "False", "{ready}");
    assert_eq!(ready["reason"], reason, "{ready}");
    assert!(
        ready["message"].as_str().is_some_and(|m| m.contains(part)),
        "{part} in {ready}"
    );
}

fn created_at<K: kube::Resource>(mut object: K, namespace: &str, time: &str) -> K {
    object.meta_mut().namespace = Some(namespace.into());
    object.meta_mut().creation_timestamp = Some(
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(time.parse().expect("time")),
    );
    object
}

#[tokio::test]
async fn objects_outside_the_access_policy_are_not_permitted_and_send_nothing_to_gitlab() {
    guarded(async {
        let (path, file) = policy_file(
            "not-permitted",
            "rules: [{namespaces: [team], groups: [other-org]}]",
        );
        let env = Env::with_access_policy(true, Vec::new(), Some(file)).await;
        let registry = registry_object(&[], None, &[FINALIZER]);
        let error = env
            .reconcile_registry(&registry)
            .await
            .expect_err("not permitted");
        assert_eq!(error.reason(), "NotPermitted");
        let seen = env.api.take();
        let patches = status_patches(&seen, REGISTRIES_PATH);
        assert_eq!(patches.len(), 1, "{seen:?}");
        let ready = condition(&patches[0].body["status"], "Ready");
        assert_eq!(ready["status"], "False");
        assert_eq!(ready["reason"], "NotPermitted");
        let message = ready["message"].as_str().expect("message");
        for part in [
            "namespace team",
            "group my-org",
            &path.display().to_string(),
        ] {
            assert!(message.contains(part), "{part} in {message}");
        }
        let upstream = upstream_object("https://registry-1.docker.io", &[FINALIZER], json!({}));
        let error = env
            .reconcile_upstream(&upstream)
            .await
            .expect_err("not permitted");
        assert_eq!(error.reason(), "NotPermitted");
        assert_eq!(
            patched_ready(&env.api, UPSTREAMS_PATH)["reason"],
            "NotPermitted"
        );
        assert_no_gitlab_request(&env.sim);

        // A change of the file is used by the next reconcile, without a restart.
        std::fs::write(&path, "rules: [{namespaces: [team], groups: [My-Org]}]").expect("write");
        env.reconcile_registry(&registry)
            .await
            .expect("permitted now");
        assert_eq!(env.sim.snapshot().registries.len(), 1);
        assert_eq!(patched_ready(&env.api, REGISTRIES_PATH)["status"], "True");
    })
    .await;
}

#[tokio::test]
async fn an_object_with_its_own_token_is_outside_the_access_policy() {
    guarded(async {
        let (_, file) = policy_file("own-token", "rules: []");
        let secret = json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "gitlab-token", "namespace": NAMESPACE, "resourceVersion": "4"},
            "stringData": {"token": TOKEN}});
        let env = Env::with_access_policy(false, vec![secret], Some(file)).await;
        let mut registry = registry_object(&[], None, &[FINALIZER]);
        registry.spec.gitlab = Some(gitlab_registry_operator::crd::GitLabConnection {
            url: env.sim.base_url(),
            token_secret_ref: gitlab_registry_operator::crd::SecretKeyReference {
                name: "gitlab-token".into(),
                key: "token".into(),
            },
        });
        env.reconcile_registry(&registry)
            .await
            .expect("GitLab's permissions for that token apply");
        assert_eq!(env.sim.snapshot().registries.len(), 1);
    })
    .await;
}

#[tokio::test]
async fn the_younger_of_two_registries_for_one_gitlab_registry_waits_and_takes_over_when_the_owner_goes()
 {
    guarded(async {
        let mut env = Env::start().await;
        let owner = created_at(
            registry_object(&[], None, &[FINALIZER]),
            "elder",
            "2026-01-01T00:00:00Z",
        );
        env.know_registry(&owner);
        let mut young = created_at(
            registry_object(&[], None, &[FINALIZER]),
            NAMESPACE,
            "2026-06-01T00:00:00Z",
        );
        env.know_registry(&young);
        let error = env
            .reconcile_registry(&young)
            .await
            .expect_err("in conflict");
        assert_eq!(error.reason(), "Conflict");
        let patches = status_patches(&env.api.take(), REGISTRIES_PATH);
        assert_eq!(patches.len(), 1);
        let status = patches[0].body["status"].clone();
        let ready = condition(&status, "Ready");
        assert_eq!(ready["status"], "False");
        assert_eq!(ready["reason"], "Conflict");
        assert!(
            ready["message"]
                .as_str()
                .is_some_and(|m| m.contains("elder/cache")),
            "names the owner: {ready}"
        );
        assert_no_gitlab_request(&env.sim);

        // The waiting one is triggered when the owner's claims move, and when it goes.
        young.status = Some(serde_json::from_value(status).expect("status"));
        env.know_registry(&young);
        let (sender, mut triggered) = futures::channel::mpsc::unbounded();
        let mut observer = HandoverObserver::new(
            env.ctx.registries.clone(),
            Some(env.sim.base_url().parse().expect("url")),
            sender,
        );
        observer.observe(&watcher::Event::Apply(owner.clone()));
        observer.observe(&watcher::Event::Apply(owner.clone()));
        assert!(triggered.try_recv().is_err(), "nothing moved yet");
        let mut renamed = owner.clone();
        renamed.spec.name = Some("elder-cache".into());
        let young_ref = kube::runtime::reflector::ObjectRef::from_obj(&young);
        for moved in [renamed, owner.clone()] {
            observer.observe(&watcher::Event::Apply(moved));
            assert_eq!(triggered.try_recv().expect("sent"), young_ref);
            assert!(triggered.try_recv().is_err(), "only the contender");
        }
        env.registries
            .apply_watcher_event(&watcher::Event::Delete(owner.clone()));
        observer.observe(&watcher::Event::Delete(owner));
        assert_eq!(triggered.try_recv().expect("sent"), young_ref);

        env.reconcile_registry(&young).await.expect("takes over");
        assert_eq!(env.sim.snapshot().registries.len(), 1);
        assert_eq!(patched_ready(&env.api, REGISTRIES_PATH)["status"], "True");
    })
    .await;
}

#[tokio::test]
async fn deleting_the_non_owner_deletes_and_disassociates_nothing_in_gitlab() {
    guarded(async {
        let mut env = Env::start().await;
        let registry_id = env
            .sim
            .with_state(|state| state.create_registry(100, "cache", None))
            .expect("registry")
            .id as i64;
        let owner = created_at(
            registry_object(&[], Some(registry_id), &[FINALIZER]),
            "elder",
            "2026-01-01T00:00:00Z",
        );
        env.know_registry(&owner);
        let young = deleting(created_at(
            registry_object(&[], Some(registry_id), &[FINALIZER]),
            NAMESPACE,
            "2026-06-01T00:00:00Z",
        ));
        env.know_registry(&young);
        env.reconcile_registry(&young)
            .await
            .expect("finalizer removed");
        assert_no_gitlab_request(&env.sim);
        assert_eq!(
            env.sim.snapshot().registries.len(),
            1,
            "the owner's registry stays"
        );
        let seen = env.api.take();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_finalizer_patch(&seen[0], &format!("{REGISTRIES_PATH}/cache"), "remove");
    })
    .await;
}

#[tokio::test]
async fn a_cleanup_outside_the_access_policy_runs_nothing() {
    guarded(async {
        let (_, file) = policy_file(
            "cleanup-not-permitted",
            "rules: [{namespaces: [team], groups: [my-org], projects: ['other-org/**']}]",
        );
        let (sim, api, ctx) = cleanup_env_with(Some(true), Some(file), None).await;
        let before = tag_names(&sim).await;
        sim.reset_request_counts();
        let policy = policy_object(
            json!({"gitlabregistry.io/run-requested-at": "2026-11-23T10:00:00Z"}),
            json!(null),
            false,
        );
        let error = controller::cleanup_policy::reconcile(Arc::new(policy), Arc::new(ctx))
            .await
            .expect_err("not permitted");
        assert_eq!(error.reason(), "NotPermitted");
        assert_no_gitlab_request(&sim);
        assert_eq!(tag_names(&sim).await, before);
        assert_ready_false(
            &patched_ready(&api, POLICIES_PATH),
            "NotPermitted",
            "project my-org/app",
        );
    })
    .await;
}

#[tokio::test]
async fn a_second_gitlab_policy_for_one_project_waits_in_conflict() {
    guarded(async {
        let gitlab_policy = |namespace: &str, created: &str| {
            let mut policy = created_at(
                policy_object(json!({}), json!(null), false),
                namespace,
                created,
            );
            policy.spec.strategy = gitlab_registry_operator::crd::CleanupStrategy::GitLabPolicy;
            policy.spec.cadence = Some(serde_json::from_value(json!("7d")).expect("cadence"));
            policy
        };
        let owner = gitlab_policy("elder", "2026-01-01T00:00:00Z");
        let young = gitlab_policy(NAMESPACE, "2026-06-01T00:00:00Z");
        let (policies, mut writer) = {
            let (store, writer) = store::store::<CleanupPolicy>();
            (store, writer)
        };
        writer.apply_watcher_event(&watcher::Event::Apply(owner));
        writer.apply_watcher_event(&watcher::Event::Apply(young.clone()));
        let (sim, api, ctx) = cleanup_env_with(Some(true), None, Some(policies)).await;
        let ctx = Arc::new(ctx);
        let error = controller::cleanup_policy::reconcile(Arc::new(young.clone()), ctx.clone())
            .await
            .expect_err("in conflict");
        assert_eq!(error.reason(), "Conflict");
        assert_no_gitlab_request(&sim);
        assert_ready_false(
            &patched_ready(&api, POLICIES_PATH),
            "Conflict",
            "elder/nightly",
        );

        // Its deletion leaves GitLab's policy, the owner's, as it is.
        controller::cleanup_policy::reconcile(Arc::new(deleting(young)), ctx)
            .await
            .expect("finalizer removed");
        assert_no_gitlab_request(&sim);
    })
    .await;
}

#[tokio::test]
async fn a_group_cleanup_runs_only_when_every_project_it_expands_to_is_permitted() {
    guarded(async {
        let group_run = || {
            let mut policy = policy_object(
                json!({"gitlabregistry.io/run-requested-at": "2026-11-23T10:00:00Z"}),
                json!(null),
                false,
            );
            policy.spec.target.container_repositories =
                Some(serde_json::from_value(json!({"group": "my-org"})).expect("group target"));
            Arc::new(policy)
        };
        let (path, file) = policy_file(
            "group-expansion",
            "rules: [{namespaces: [team], groups: [my-org], projects: ['my-org/other-*']}]",
        );
        let (sim, api, ctx) = cleanup_env_with(Some(true), Some(file), None).await;
        let ctx = Arc::new(ctx);
        let before = tag_names(&sim).await;
        sim.reset_request_counts();
        let error = controller::cleanup_policy::reconcile(group_run(), ctx.clone())
            .await
            .expect_err("my-org/app is not permitted");
        assert_eq!(error.reason(), "NotPermitted");
        assert_eq!(sim.write_count(), 0, "{:?}", sim.request_counts());
        assert_eq!(
            sim.request_counts().values().sum::<u64>(),
            1,
            "only the group's listing: {:?}",
            sim.request_counts()
        );
        assert_eq!(tag_names(&sim).await, before);
        assert_ready_false(
            &patched_ready(&api, POLICIES_PATH),
            "NotPermitted",
            "project my-org/app",
        );

        std::fs::write(
            &path,
            "rules: [{namespaces: [team], groups: [my-org], projects: ['my-org/**']}]",
        )
        .expect("write");
        controller::cleanup_policy::reconcile(group_run(), ctx)
            .await
            .expect("permitted now");
        assert!(
            tag_names(&sim).await.len() < before.len(),
            "the run deleted"
        );
    })
    .await;
}
