//! Footprint of the `run` process: start-up to ready, time until 1,000 objects are Ready,
//! then resident memory and CPU while idle; the same beside cluster noise; and the
//! Kubernetes writes at rest.
//!
//! `cargo bench --bench footprint` runs three scenarios, one operator process each
//! (`BENCH_SCENARIOS=baseline,noise,rest` picks some):
//! - `footprint.*` (baseline): the 1,000 objects alone.
//! - `footprint[noise].*`: the same beside 3,000 Secrets (500 of them 300 KB Helm release
//!   Secrets) and 3,000 Pods. After all objects are Ready and quiet, every Secret and Pod is
//!   changed once (churn of objects the operator does not manage); printed: the reconciles
//!   (`gitlab_registry_operator_reconciles_total` from `/metrics`) and GitLab requests that
//!   churn caused, peak RSS (VmHWM over the whole run) and idle RSS.
//! - `footprint[rest].*`: rest in fast motion: `--resync 20s` and every Upstream tested every
//!   10 s (`connectivityCheck.interval`), so the idle window holds several resyncs and
//!   periodic connection tests of every object; printed: Kubernetes writes per object per
//!   hour at that pace (an upper bound for the default 10 min).
//!
//! No kube-apiserver runs here, so the bench serves a small stand-in of one on loopback: the
//! list and watch endpoints of VirtualRegistries, Upstreams, CleanupPolicies (none), Secrets
//! and Pods (CRD lists in one page, as a list from any version is; Secret and Pod lists in
//! pages of `limit` with `continue`; a client asking for `PartialObjectMetadata` gets only
//! metadata, as from the apiserver; watches streaming `MODIFIED` events for every change, no
//! bookmarks), status patches (the sent status replaces the stored one), and Event creation
//! and patches; every other request is answered 404 and reported. The 1,000 objects carry
//! the finalizer already (the stand-in does not implement JSON patches). GitLab is the
//! simulator (in this process, latency 0, connection tests answered by its stub), seeded
//! with the registries and upstreams, so the operator adopts them. The operator is the real
//! binary (`CARGO_BIN_EXE_gitlab-registry-operator`, built with the bench profile), started
//! with `run --gitlab-url <sim> --metrics-addr 127.0.0.1:<port>` and a kubeconfig for the
//! stand-in.
//!
//! Measured: spawn → `/readyz` 200 (caches synced); spawn → every object `Ready=True`; then,
//! after 10 s without any status patch, VmRSS and CPU time (utime + stime from
//! `/proc/<pid>/stat`) over a 60 s idle window, and the GitLab requests and Kubernetes
//! writes (every request but GET) in that window.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use gitlab_registry_operator::sim::seed::{GroupRef, SeedGroup, SeedRegistry, SeedUpstream};
use gitlab_registry_operator::sim::{DEFAULT_TOKEN, Seed, SimConfig, Simulator};
use serde_json::{Value, json};
use tokio::sync::broadcast;

const GROUPS: usize = 100;
const REGISTRIES_PER_GROUP: usize = 5;
const UPSTREAMS_PER_GROUP: usize = 5;
const GROUP: &str = "gitlabregistry.io";
const VERSION: &str = "v1alpha1";

/// The idle window: 60 s, or `BENCH_IDLE_SECONDS`.
fn idle_window() -> Duration {
    let seconds = std::env::var("BENCH_IDLE_SECONDS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(60);
    Duration::from_secs(seconds)
}

/// How long nothing must be patched before the idle window starts.
const QUIET_BEFORE_IDLE: Duration = Duration::from_secs(10);

/// The stand-in's objects, by plural then `namespace/name`.
struct ApiState {
    objects: Mutex<BTreeMap<String, BTreeMap<String, Value>>>,
    resource_version: Mutex<u64>,
    events: broadcast::Sender<(u64, String, Value)>,
    /// Every change, for watches that start from an older resourceVersion (as the apiserver
    /// replays them): without it, a patch between a list and its watch would be lost.
    history: Mutex<Vec<(u64, String, Value)>>,
    status_patches: Mutex<u64>,
    /// Every request but a GET (status patches, Events, anything not served).
    writes: Mutex<u64>,
    last_patch: Mutex<Instant>,
    unknown_requests: Mutex<Vec<String>>,
}

impl ApiState {
    fn next_version(&self) -> u64 {
        let mut version = lock(&self.resource_version);
        *version += 1;
        *version
    }

    /// Changes an object as a client other than the operator would (noise), with a new
    /// resourceVersion and a watch event.
    fn touch(&self, plural: &str, key: &str, change: impl FnOnce(&mut Value)) {
        let mut objects = lock(&self.objects);
        let Some(object) = objects.get_mut(plural).and_then(|o| o.get_mut(key)) else {
            return;
        };
        let version = self.next_version();
        change(object);
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        let updated = object.clone();
        lock(&self.history).push((version, plural.to_owned(), updated.clone()));
        let _ = self.events.send((version, plural.to_owned(), updated));
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn kind_of(plural: &str) -> &'static str {
    match plural {
        "virtualregistries" => "VirtualRegistry",
        "upstreams" => "Upstream",
        "cleanuppolicies" => "CleanupPolicy",
        "pods" => "Pod",
        _ => "Secret",
    }
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListQuery {
    watch: Option<String>,
    resource_version: Option<String>,
    limit: Option<usize>,
    #[serde(rename = "continue")]
    continue_after: Option<String>,
}

/// Whether the client asked for metadata only (`as=PartialObjectMetadata[List]`).
fn wants_metadata(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|accept| accept.to_str().ok())
        .is_some_and(|accept| accept.contains("as=PartialObjectMetadata"))
}

/// An object as the apiserver sends it to a metadata-only client.
fn metadata_only(object: &Value) -> Value {
    json!({
        "apiVersion": "meta.k8s.io/v1",
        "kind": "PartialObjectMetadata",
        "metadata": object["metadata"],
    })
}

fn watch_line(object: &Value, metadata: bool) -> Bytes {
    let object = if metadata {
        metadata_only(object)
    } else {
        object.clone()
    };
    let mut line =
        serde_json::to_vec(&json!({"type": "MODIFIED", "object": object})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

async fn list_or_watch(
    State(state): State<Arc<ApiState>>,
    Path(plural): Path<String>,
    Query(query): Query<ListQuery>,
    headers: HeaderMap,
) -> Response {
    let watching = matches!(query.watch.as_deref(), Some("true" | "1"));
    let metadata = wants_metadata(&headers);
    if !watching {
        // A list from any version ("0") is served whole, as the apiserver serves it from its
        // cache; other lists in pages of `limit`.
        let limit = query
            .limit
            .filter(|_| query.resource_version.as_deref() != Some("0"))
            .unwrap_or(usize::MAX);
        let (items, next): (Vec<Value>, Option<String>) = {
            let objects = lock(&state.objects);
            let empty = BTreeMap::new();
            let all = objects.get(&plural).unwrap_or(&empty);
            let after = query.continue_after.clone().unwrap_or_default();
            let mut page: Vec<(&String, &Value)> = all
                .range::<String, _>((
                    std::ops::Bound::Excluded(&after),
                    std::ops::Bound::Unbounded,
                ))
                .take(limit.saturating_add(1))
                .collect();
            let next = (page.len() > limit).then(|| {
                page.truncate(limit);
                page.last()
                    .map(|(key, _)| (*key).clone())
                    .unwrap_or_default()
            });
            let items = page
                .into_iter()
                .map(|(_, object)| {
                    if metadata {
                        metadata_only(object)
                    } else {
                        object.clone()
                    }
                })
                .collect();
            (items, next)
        };
        let version = *lock(&state.resource_version);
        let (api_version, kind) = if metadata {
            (
                "meta.k8s.io/v1".to_owned(),
                "PartialObjectMetadataList".to_owned(),
            )
        } else if plural == "secrets" || plural == "pods" {
            ("v1".to_owned(), format!("{}List", kind_of(&plural)))
        } else {
            (
                format!("{GROUP}/{VERSION}"),
                format!("{}List", kind_of(&plural)),
            )
        };
        let mut list_metadata = json!({"resourceVersion": version.to_string()});
        if let Some(next) = next {
            list_metadata["continue"] = json!(next);
        }
        return axum::Json(json!({
            "apiVersion": api_version,
            "kind": kind,
            "metadata": list_metadata,
            "items": items,
        }))
        .into_response();
    }
    let since: u64 = query
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // Subscribe before reading the history so that nothing falls between the two.
    let receiver = state.events.subscribe();
    let replay: Vec<Bytes> = lock(&state.history)
        .iter()
        .filter(|(version, changed, _)| *version > since && *changed == plural)
        .map(|(_, _, object)| watch_line(object, metadata))
        .collect();
    let replayed_up_to = lock(&state.history)
        .iter()
        .map(|(version, _, _)| *version)
        .max()
        .unwrap_or(since)
        .max(since);
    let replay = futures::stream::iter(replay.into_iter().map(Ok::<_, Infallible>));
    let live = futures::stream::unfold(receiver, move |mut receiver| {
        let plural = plural.clone();
        async move {
            loop {
                match receiver.recv().await {
                    Ok((version, changed, object))
                        if changed == plural && version > replayed_up_to =>
                    {
                        return Some((
                            Ok::<_, Infallible>(watch_line(&object, metadata)),
                            receiver,
                        ));
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        }
    });
    let stream = futures::StreamExt::chain(replay, live);
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn patch_status(
    State(state): State<Arc<ApiState>>,
    Path((namespace, plural, name)): Path<(String, String, String)>,
    body: Bytes,
) -> Response {
    let Ok(patch) = serde_json::from_slice::<Value>(&body) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let updated = {
        let mut objects = lock(&state.objects);
        let Some(object) = objects
            .get_mut(&plural)
            .and_then(|objects| objects.get_mut(&format!("{namespace}/{name}")))
        else {
            return StatusCode::NOT_FOUND.into_response();
        };
        let version = state.next_version();
        object["status"] = patch.get("status").cloned().unwrap_or(Value::Null);
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        let updated = object.clone();
        // Recorded and sent under the objects lock, so versions reach watchers in order.
        lock(&state.history).push((version, plural.clone(), updated.clone()));
        let _ = state
            .events
            .send((version, plural.clone(), updated.clone()));
        updated
    };
    *lock(&state.status_patches) += 1;
    *lock(&state.last_patch) = Instant::now();
    axum::Json(updated).into_response()
}

async fn create_event(body: Bytes) -> Response {
    let event: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    (StatusCode::CREATED, axum::Json(event)).into_response()
}

/// kube's event recorder patches an Event it already created when the same event repeats.
async fn patch_event(Path((namespace, name)): Path<(String, String)>) -> Response {
    axum::Json(json!({
        "apiVersion": "events.k8s.io/v1", "kind": "Event",
        "metadata": {"name": name, "namespace": namespace},
        "eventTime": "2026-01-05T00:00:00.000000Z",
    }))
    .into_response()
}

async fn unknown(State(state): State<Arc<ApiState>>, request: axum::extract::Request) -> Response {
    lock(&state.unknown_requests).push(format!("{} {}", request.method(), request.uri()));
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": "not served by the bench's API stand-in", "reason": "NotFound", "code": 404})),
    )
        .into_response()
}

fn object(plural: &str, namespace: &str, name: &str, uid: usize, spec: Value) -> Value {
    json!({
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "kind": kind_of(plural),
        "metadata": {
            "name": name, "namespace": namespace, "uid": format!("00000000-0000-0000-0000-{uid:012}"),
            "generation": 1, "resourceVersion": "1", "creationTimestamp": "2026-01-05T00:00:00Z",
            "finalizers": ["gitlabregistry.io/finalizer"],
        },
        "spec": spec,
    })
}

fn fleet(scenario: Scenario) -> (BTreeMap<String, BTreeMap<String, Value>>, Seed) {
    let mut registries = BTreeMap::new();
    let mut upstreams = BTreeMap::new();
    let mut seed = Seed::default();
    let mut uid = 0;
    for group in 0..GROUPS {
        let group_path = format!("org-{group:03}");
        let namespace = format!("team-{group:03}");
        seed.groups.push(SeedGroup {
            id: 1000 + group as u64,
            full_path: group_path.clone(),
            name: None,
        });
        let registry_names: Vec<String> = (0..REGISTRIES_PER_GROUP)
            .map(|r| format!("cache-{r}"))
            .collect();
        let upstream_names: Vec<String> = (0..UPSTREAMS_PER_GROUP)
            .map(|u| format!("upstream-{u}"))
            .collect();
        for name in &registry_names {
            uid += 1;
            let listed: Vec<Value> = upstream_names.iter().map(|n| json!({"name": n})).collect();
            registries.insert(
                format!("{namespace}/{name}"),
                object(
                    "virtualregistries",
                    &namespace,
                    name,
                    uid,
                    json!({"group": group_path, "upstreams": listed}),
                ),
            );
            seed.registries.push(SeedRegistry {
                id: None,
                group: GroupRef::Path(group_path.clone()),
                name: name.clone(),
                description: None,
            });
        }
        for (u, name) in upstream_names.iter().enumerate() {
            uid += 1;
            let url = format!("https://registry-{u}.example.com");
            upstreams.insert(
                format!("{namespace}/{name}"),
                object(
                    "upstreams",
                    &namespace,
                    name,
                    uid,
                    if scenario == Scenario::Rest {
                        json!({"group": group_path, "url": url,
                               "connectivityCheck": {"interval": REST_CHECK_INTERVAL}})
                    } else {
                        json!({"group": group_path, "url": url})
                    },
                ),
            );
            seed.upstreams.push(SeedUpstream {
                id: None,
                group: GroupRef::Path(group_path.clone()),
                name: name.clone(),
                url,
                description: None,
                username: None,
                password: None,
                cache_validity_hours: None,
                registries: registry_names.clone(),
                cache_entries: Vec::new(),
            });
        }
    }
    let mut objects = BTreeMap::new();
    objects.insert("virtualregistries".to_owned(), registries);
    objects.insert("upstreams".to_owned(), upstreams);
    let (secrets, pods) = if scenario == Scenario::Noise {
        noise()
    } else {
        (BTreeMap::new(), BTreeMap::new())
    };
    objects.insert("secrets".to_owned(), secrets);
    objects.insert("pods".to_owned(), pods);
    (objects, seed)
}

const NOISE_NAMESPACES: usize = 30;
const NOISE_SECRETS: usize = 3_000;
const NOISE_HELM_RELEASES: usize = 500;
const HELM_RELEASE_BYTES: usize = 300 * 1024;
const NOISE_PODS: usize = 3_000;

/// Secrets and Pods of applications the operator does not manage, by `namespace/name`: every
/// sixth Secret a Helm release (300 KB of data), the rest small; Pods of two containers,
/// with their statuses, as a kubelet writes them.
fn noise() -> (BTreeMap<String, Value>, BTreeMap<String, Value>) {
    let release = "H4sI".to_owned() + &"A".repeat(HELM_RELEASE_BYTES - 4);
    let mut secrets = BTreeMap::new();
    for index in 0..NOISE_SECRETS {
        let namespace = format!("apps-{:02}", index % NOISE_NAMESPACES);
        let helm = index % (NOISE_SECRETS / NOISE_HELM_RELEASES) == 0;
        let (name, secret) = if helm {
            let name = format!("sh.helm.release.v1.app-{index}.v1");
            let secret = json!({
                "apiVersion": "v1", "kind": "Secret", "type": "helm.sh/release.v1",
                "metadata": {"name": name, "namespace": namespace, "resourceVersion": "1",
                             "uid": format!("10000000-0000-0000-0000-{index:012}"),
                             "labels": {"owner": "helm", "name": format!("app-{index}"),
                                        "status": "deployed", "version": "1"}},
                "data": {"release": release},
            });
            (name, secret)
        } else {
            let name = format!("app-{index}-credentials");
            let secret = json!({
                "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": name, "namespace": namespace, "resourceVersion": "1",
                             "uid": format!("10000000-0000-0000-0000-{index:012}")},
                "data": {"username": "YXBw", "password": "c2VjcmV0LXBhc3N3b3JkLTEyMzQ1Njc4OTA="},
            });
            (name, secret)
        };
        secrets.insert(format!("{namespace}/{name}"), secret);
    }
    let mut pods = BTreeMap::new();
    for index in 0..NOISE_PODS {
        let namespace = format!("apps-{:02}", index % NOISE_NAMESPACES);
        let name = format!("app-{}-7d9f8c6b5-{index:05}", index % 100);
        let image = format!(
            "registry.example.com/team/app-{}:1.{}",
            index % 100,
            index % 7
        );
        let container = |name: &str, image: &str| {
            json!({"name": name, "image": image,
                   "env": [{"name": "LOG_LEVEL", "value": "info"}, {"name": "PORT", "value": "8080"}],
                   "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                   "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}})
        };
        let status = |name: &str, image: &str| {
            json!({"name": name, "image": image, "ready": true, "restartCount": 0,
                   "imageID": format!("{image}@sha256:{:064x}", index),
                   "state": {"running": {"startedAt": "2026-01-05T00:00:00Z"}}})
        };
        pods.insert(
            format!("{namespace}/{name}"),
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": namespace, "resourceVersion": "1",
                             "uid": format!("20000000-0000-0000-0000-{index:012}"),
                             "labels": {"app": format!("app-{}", index % 100), "pod-template-hash": "7d9f8c6b5"},
                             "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                                  "name": format!("app-{}-7d9f8c6b5", index % 100),
                                                  "uid": "30000000-0000-0000-0000-000000000000"}]},
                "spec": {"containers": [container("app", &image),
                                        container("proxy", "registry.example.com/infra/proxy:2.1")],
                         "nodeName": format!("node-{}", index % 20), "serviceAccountName": "default"},
                "status": {"phase": "Running", "podIP": "10.0.0.1",
                           "conditions": [{"type": "Ready", "status": "True"}],
                           "containerStatuses": [status("app", &image),
                                                 status("proxy", "registry.example.com/infra/proxy:2.1")]},
            }),
        );
    }
    (secrets, pods)
}

/// Changes every Secret and Pod once, as the applications' own controllers would: new
/// Secret data (a Helm release its status label), a Pod's readiness.
async fn churn(state: &ApiState) -> usize {
    let keys = |plural: &str| -> Vec<String> {
        lock(&state.objects)
            .get(plural)
            .map(|objects| objects.keys().cloned().collect())
            .unwrap_or_default()
    };
    let mut changes = 0;
    for (n, key) in keys("secrets").iter().enumerate() {
        state.touch("secrets", key, |secret| {
            if secret["type"] == "helm.sh/release.v1" {
                secret["metadata"]["labels"]["status"] = json!("superseded");
            } else {
                secret["data"]["password"] = json!(format!("cm90YXRlZC0{n:08}"));
            }
        });
        changes += 1;
        if n % 100 == 0 {
            tokio::task::yield_now().await;
        }
    }
    for (n, key) in keys("pods").iter().enumerate() {
        state.touch("pods", key, |pod| {
            pod["status"]["conditions"][0]["status"] = json!("False");
        });
        changes += 1;
        if n % 100 == 0 {
            tokio::task::yield_now().await;
        }
    }
    changes
}

/// The operator's own kinds.
const MANAGED: [&str; 3] = ["virtualregistries", "upstreams", "cleanuppolicies"];

fn managed_objects(
    objects: &BTreeMap<String, BTreeMap<String, Value>>,
) -> impl Iterator<Item = &Value> {
    objects
        .iter()
        .filter(|(plural, _)| MANAGED.contains(&plural.as_str()))
        .flat_map(|(_, objects)| objects.values())
}

fn ready_count(state: &ApiState) -> usize {
    managed_objects(&lock(&state.objects))
        .filter(|object| {
            object["status"]["conditions"]
                .as_array()
                .is_some_and(|conditions| {
                    conditions
                        .iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
        })
        .count()
}

/// A `/proc/<pid>/status` figure in KiB (`VmRSS`, `VmHWM`: the peak resident size).
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// (resident KiB, CPU seconds) of `pid` from /proc.
fn process_usage(pid: u32, ticks_per_second: f64) -> Option<(u64, f64)> {
    let rss_kib = status_kib(pid, "VmRSS")?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let after_name = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((rss_kib, (utime + stime) / ticks_per_second))
}

fn ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100.0)
}

async fn free_port() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    listener.local_addr().expect("address")
}

/// The operator's log: to the file `BENCH_OPERATOR_LOG` names (level
/// `BENCH_OPERATOR_LOG_LEVEL`, default `warn`), else nowhere.
fn operator_log() -> Stdio {
    std::env::var("BENCH_OPERATOR_LOG")
        .ok()
        .and_then(|path| std::fs::File::create(path).ok())
        .map_or_else(Stdio::null, Stdio::from)
}

/// `POST …/test` requests GitLab received (connection tests).
fn connection_tests(sim: &gitlab_registry_operator::sim::SimHandle) -> u64 {
    sim.request_counts()
        .iter()
        .filter(|(route, _)| route.starts_with("POST ") && route.ends_with("/test"))
        .map(|(_, count)| count)
        .sum()
}

/// One operator process and what it runs beside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    Baseline,
    Noise,
    Rest,
}

/// The Upstreams' test interval in the rest scenario (the shortest the operator takes).
const REST_CHECK_INTERVAL: &str = "10s";
/// The resync in the rest scenario.
const REST_RESYNC: &str = "20s";

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Self::Baseline => "baseline",
            Self::Noise => "noise",
            Self::Rest => "rest",
        }
    }

    /// The figures' prefix: `footprint` for the baseline, as before the other scenarios.
    fn prefix(self) -> String {
        match self {
            Self::Baseline => "footprint".into(),
            other => format!("footprint[{}]", other.name()),
        }
    }
}

/// The scenarios `BENCH_SCENARIOS` names (comma-separated), else all three.
fn scenarios() -> Vec<Scenario> {
    let all = [Scenario::Baseline, Scenario::Noise, Scenario::Rest];
    match std::env::var("BENCH_SCENARIOS") {
        Ok(names) => all
            .into_iter()
            .filter(|scenario| names.split(',').any(|name| name.trim() == scenario.name()))
            .collect(),
        Err(_) => all.to_vec(),
    }
}

/// Counts every request but a GET: what the operator writes to Kubernetes.
async fn count_writes(
    State(state): State<Arc<ApiState>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if request.method() != axum::http::Method::GET {
        *lock(&state.writes) += 1;
    }
    next.run(request).await
}

/// The sum of `gitlab_registry_operator_reconciles_total` over kinds, from `/metrics`.
async fn reconciles(http: &reqwest::Client, metrics: SocketAddr) -> Option<f64> {
    let text = http
        .get(format!("http://{metrics}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    Some(
        text.lines()
            .filter(|line| line.starts_with("gitlab_registry_operator_reconciles_total{"))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum(),
    )
}

#[tokio::main]
async fn main() {
    for scenario in scenarios() {
        run_scenario(scenario).await;
    }
}

async fn run_scenario(scenario: Scenario) {
    let prefix = scenario.prefix();
    let (objects, seed) = fleet(scenario);
    let object_count = managed_objects(&objects).count();
    let noise_counts = (
        objects.get("secrets").map_or(0, BTreeMap::len),
        objects.get("pods").map_or(0, BTreeMap::len),
    );
    let sim = Simulator::start(
        SimConfig {
            stub_upstreams: true,
            ..SimConfig::default()
        },
        seed,
    )
    .await
    .expect("simulator");

    let (events, _) = broadcast::channel(16_384);
    let state = Arc::new(ApiState {
        objects: Mutex::new(objects),
        resource_version: Mutex::new(1),
        events,
        history: Mutex::new(Vec::new()),
        status_patches: Mutex::new(0),
        writes: Mutex::new(0),
        last_patch: Mutex::new(Instant::now()),
        unknown_requests: Mutex::new(Vec::new()),
    });
    let crd_base = format!("/apis/{GROUP}/{VERSION}");
    let router = Router::new()
        .route(&format!("{crd_base}/{{plural}}"), get(list_or_watch))
        .route(
            "/api/v1/secrets",
            get(|state, query, headers| {
                list_or_watch(state, Path("secrets".to_owned()), query, headers)
            }),
        )
        .route(
            "/api/v1/pods",
            get(|state, query, headers| {
                list_or_watch(state, Path("pods".to_owned()), query, headers)
            }),
        )
        .route(
            &format!("{crd_base}/namespaces/{{namespace}}/{{plural}}/{{name}}/status"),
            patch(patch_status),
        )
        .route(
            "/apis/events.k8s.io/v1/namespaces/{namespace}/events",
            post(create_event),
        )
        .route(
            "/apis/events.k8s.io/v1/namespaces/{namespace}/events/{name}",
            patch(patch_event),
        )
        .fallback(unknown)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            count_writes,
        ))
        .with_state(state.clone());
    let api_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let api_address = api_listener.local_addr().expect("address");
    tokio::spawn(async move { axum::serve(api_listener, router).await });

    let directory = std::env::temp_dir().join(format!("footprint-bench-{}", std::process::id()));
    std::fs::create_dir_all(&directory).expect("temp dir");
    let kubeconfig = directory.join("kubeconfig");
    let mut file = std::fs::File::create(&kubeconfig).expect("kubeconfig");
    write!(
        file,
        "apiVersion: v1\nkind: Config\ncurrent-context: bench\nclusters:\n- name: bench\n  cluster:\n    server: http://{api_address}\ncontexts:\n- name: bench\n  context:\n    cluster: bench\n    user: bench\nusers:\n- name: bench\n  user: {{}}\n"
    )
    .expect("write kubeconfig");

    let metrics_address = free_port().await;
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_gitlab-registry-operator"))
        .args([
            "run",
            "--gitlab-url",
            &sim.base_url(),
            "--metrics-addr",
            &metrics_address.to_string(),
        ])
        .args(if scenario == Scenario::Rest {
            vec!["--resync", REST_RESYNC]
        } else {
            Vec::new()
        })
        .env("KUBECONFIG", &kubeconfig)
        .env("GITLAB_TOKEN", DEFAULT_TOKEN)
        .env(
            "RUST_LOG",
            std::env::var("BENCH_OPERATOR_LOG_LEVEL").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(operator_log())
        .spawn()
        .expect("start the operator");
    let pid = child.id();

    let http = reqwest::Client::new();
    let readyz = format!("http://{metrics_address}/readyz");
    let mut ready_after = None;
    let mut rss_at_ready = None;
    let mut all_ready_after = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if ready_after.is_none()
            && http
                .get(&readyz)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        {
            ready_after = Some(started.elapsed());
            rss_at_ready = process_usage(pid, ticks_per_second()).map(|(rss, _)| rss);
        }
        if ready_count(&state) == object_count {
            all_ready_after = Some(started.elapsed());
            break;
        }
        // Stuck: ready, but nothing patched for a while (the rest waits for the resync).
        if ready_after.is_some() && lock(&state.last_patch).elapsed() > QUIET_BEFORE_IDLE {
            break;
        }
        if let Ok(Some(exit)) = child.try_wait() {
            eprintln!("the operator exited early: {exit}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Settle: nothing patched for a while.
    while lock(&state.last_patch).elapsed() < QUIET_BEFORE_IDLE && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Noise: every Secret and Pod changed once, then as long again for the operator to act
    // on it (it acts on none of it: it reads none of them).
    let mut churned = None;
    if scenario == Scenario::Noise {
        if let Some(rss) = status_kib(pid, "VmRSS") {
            println!(
                "{prefix}.rss_before_churn_mib = {:.1} (VmRSS when every object is Ready and quiet; peak so far {:.1})",
                rss as f64 / 1024.0,
                status_kib(pid, "VmHWM").unwrap_or_default() as f64 / 1024.0
            );
        }
        let reconciles_before = reconciles(&http, metrics_address).await;
        let gitlab_before: u64 = sim.request_counts().values().sum();
        let writes_before = *lock(&state.writes);
        let churn_started = Instant::now();
        let changes = churn(&state).await;
        tokio::time::sleep(churn_started.elapsed().max(QUIET_BEFORE_IDLE)).await;
        let reconciles_after = reconciles(&http, metrics_address).await;
        churned = Some((
            changes,
            reconciles_before.zip(reconciles_after).map(|(b, a)| a - b),
            sim.request_counts().values().sum::<u64>() - gitlab_before,
            *lock(&state.writes) - writes_before,
        ));
    }
    let ticks = ticks_per_second();
    let gitlab_before: u64 = sim.request_counts().values().sum();
    let connection_tests_before = connection_tests(&sim);
    let writes_before = *lock(&state.writes);
    let before = process_usage(pid, ticks);
    tokio::time::sleep(idle_window()).await;
    let after = process_usage(pid, ticks);
    let peak_kib = status_kib(pid, "VmHWM");
    let gitlab_idle = sim.request_counts().values().sum::<u64>() - gitlab_before;
    let connection_tests_idle = connection_tests(&sim) - connection_tests_before;
    let writes_idle = *lock(&state.writes) - writes_before;
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&directory);

    println!(
        "{prefix}.objects = {object_count} ({} VirtualRegistries, {} Upstreams; Kubernetes API stand-in, GitLab simulator)",
        GROUPS * REGISTRIES_PER_GROUP,
        GROUPS * UPSTREAMS_PER_GROUP
    );
    if scenario == Scenario::Noise {
        println!(
            "{prefix}.noise = {} Secrets ({NOISE_HELM_RELEASES} of them {} KB Helm releases), {} Pods",
            noise_counts.0,
            HELM_RELEASE_BYTES / 1024,
            noise_counts.1
        );
    }
    match ready_after {
        Some(elapsed) => println!(
            "{prefix}.startup_to_ready_ms = {:.0} (spawn to /readyz 200: caches synced)",
            elapsed.as_secs_f64() * 1000.0
        ),
        None => println!("{prefix}.startup_to_ready_ms = not reached"),
    }
    if let Some(rss_kib) = rss_at_ready {
        println!(
            "{prefix}.rss_at_ready_mib = {:.1} (VmRSS when /readyz first answered 200, before the reconciles)",
            rss_kib as f64 / 1024.0
        );
    }
    match all_ready_after {
        Some(elapsed) => println!(
            "{prefix}.startup_to_all_objects_ready_ms = {:.0} (every object Ready=True, adopting existing GitLab state)",
            elapsed.as_secs_f64() * 1000.0
        ),
        None => {
            println!(
                "{prefix}.startup_to_all_objects_ready_ms = not reached ({} of {object_count} Ready)",
                ready_count(&state)
            );
            for object in managed_objects(&lock(&state.objects)).take(2000) {
                let ready = object["status"]["conditions"]
                    .as_array()
                    .and_then(|c| c.iter().find(|c| c["type"] == "Ready").cloned());
                if ready.as_ref().is_none_or(|r| r["status"] != "True") {
                    eprintln!(
                        "not ready: {} {}/{}: {}",
                        object["kind"],
                        object["metadata"]["namespace"],
                        object["metadata"]["name"],
                        ready.map(|r| r["message"].to_string()).unwrap_or_default()
                    );
                }
            }
        }
    }
    match (before, after) {
        (Some((_, cpu_before)), Some((rss_kib, cpu_after))) => {
            println!(
                "{prefix}.idle_rss_mib = {:.1} (goal < 40 MiB; VmRSS after {}s idle)",
                rss_kib as f64 / 1024.0,
                idle_window().as_secs()
            );
            println!(
                "{prefix}.idle_cpu_percent = {:.2} (goal ~0; utime+stime over {}s)",
                (cpu_after - cpu_before) / idle_window().as_secs_f64() * 100.0,
                idle_window().as_secs()
            );
        }
        _ => println!("{prefix}.idle_rss_mib = not measured (the process was gone)"),
    }
    if let Some(peak_kib) = peak_kib {
        println!(
            "{prefix}.peak_rss_mib = {:.1} (goal < 64 MiB; VmHWM over the whole run)",
            peak_kib as f64 / 1024.0
        );
    }
    if let Some((changes, reconciles, gitlab, writes)) = churned {
        println!(
            "{prefix}.churn_reconciles = {} (goal 0; after {changes} changes of Secrets and Pods the operator does not read)",
            reconciles.map_or_else(|| "not measured".into(), |r| format!("{r:.0}"))
        );
        println!("{prefix}.churn_gitlab_requests = {gitlab} (goal 0)");
        println!("{prefix}.churn_kubernetes_writes = {writes} (goal 0)");
    }
    println!(
        "{prefix}.idle_gitlab_requests = {gitlab_idle} (in the {}s idle window; {connection_tests_idle} of them connection tests)",
        idle_window().as_secs()
    );
    let per_object_per_hour =
        writes_idle as f64 / object_count as f64 * 3600.0 / idle_window().as_secs_f64();
    let pace = if scenario == Scenario::Rest {
        format!(
            "at --resync {REST_RESYNC} and a connection test every {REST_CHECK_INTERVAL}: 30 and 60 times the defaults"
        )
    } else {
        "at the defaults: --resync 10m, a connection test every 10m".to_string()
    };
    println!(
        "{prefix}.kubernetes_writes_per_object_per_hour = {per_object_per_hour:.2} (goal 0; {writes_idle} writes in the {}s idle window, {pace})",
        idle_window().as_secs()
    );
    println!("{prefix}.status_patches = {}", *lock(&state.status_patches));
    let unknown = lock(&state.unknown_requests).clone();
    if !unknown.is_empty() {
        println!(
            "{prefix}.unserved_api_requests = {} (first: {})",
            unknown.len(),
            unknown[0]
        );
    }
    sim.shutdown().await;
}
