//! Footprint of the `run` process: start-up to ready, time until 1,000 objects are Ready,
//! then resident memory and CPU while idle.
//!
//! `cargo bench --bench footprint`
//!
//! No kube-apiserver runs here, so the bench serves a small stand-in of one on loopback: the
//! list and watch endpoints of VirtualRegistries, Upstreams, CleanupPolicies (none), Secrets
//! and Pods (none) (lists in one page,
//! watches streaming `MODIFIED` events for every status patch, no bookmarks), status patches
//! (the sent status replaces the stored one), and Event creation and patches. The 1,000 objects carry the
//! finalizer already (the stand-in does not implement JSON patches). GitLab is the simulator
//! (in this process, latency 0, connection tests answered by its stub), seeded with the
//! registries and upstreams, so the operator adopts them. The operator is the real binary
//! (`CARGO_BIN_EXE_gitlab-registry-operator`, built with the bench profile), started with
//! `run --gitlab-url <sim> --metrics-addr 127.0.0.1:<port>` and a kubeconfig for the stand-in.
//!
//! Measured: spawn → `/readyz` 200 (caches synced); spawn → every object `Ready=True`; then,
//! after 10 s without any status patch, VmRSS and CPU time (utime + stime from
//! `/proc/<pid>/stat`) over a 60 s idle window, and the GitLab requests in that window.

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
use axum::http::StatusCode;
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
    last_patch: Mutex<Instant>,
    unknown_requests: Mutex<Vec<String>>,
}

impl ApiState {
    fn next_version(&self) -> u64 {
        let mut version = lock(&self.resource_version);
        *version += 1;
        *version
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
}

fn watch_line(object: &Value) -> Bytes {
    let mut line =
        serde_json::to_vec(&json!({"type": "MODIFIED", "object": object})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

async fn list_or_watch(
    State(state): State<Arc<ApiState>>,
    Path(plural): Path<String>,
    Query(query): Query<ListQuery>,
) -> Response {
    let watching = matches!(query.watch.as_deref(), Some("true" | "1"));
    if !watching {
        let items: Vec<Value> = lock(&state.objects)
            .get(&plural)
            .map(|objects| objects.values().cloned().collect())
            .unwrap_or_default();
        let version = *lock(&state.resource_version);
        let (api_version, kind) = if plural == "secrets" || plural == "pods" {
            ("v1".to_owned(), format!("{}List", kind_of(&plural)))
        } else {
            (
                format!("{GROUP}/{VERSION}"),
                format!("{}List", kind_of(&plural)),
            )
        };
        return axum::Json(json!({
            "apiVersion": api_version,
            "kind": kind,
            "metadata": {"resourceVersion": version.to_string()},
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
        .map(|(_, _, object)| watch_line(object))
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
                        return Some((Ok::<_, Infallible>(watch_line(&object)), receiver));
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

fn fleet() -> (BTreeMap<String, BTreeMap<String, Value>>, Seed) {
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
                    json!({"group": group_path, "url": url}),
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
    objects.insert("secrets".to_owned(), BTreeMap::new());
    (objects, seed)
}

fn ready_count(state: &ApiState) -> usize {
    lock(&state.objects)
        .values()
        .flat_map(|objects| objects.values())
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

/// (resident KiB, CPU seconds) of `pid` from /proc.
fn process_usage(pid: u32, ticks_per_second: f64) -> Option<(u64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
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

#[tokio::main]
async fn main() {
    let (objects, seed) = fleet();
    let object_count: usize = objects.values().map(BTreeMap::len).sum();
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
        last_patch: Mutex::new(Instant::now()),
        unknown_requests: Mutex::new(Vec::new()),
    });
    let crd_base = format!("/apis/{GROUP}/{VERSION}");
    let router = Router::new()
        .route(&format!("{crd_base}/{{plural}}"), get(list_or_watch))
        .route(
            "/api/v1/secrets",
            get(|state, query| list_or_watch(state, Path("secrets".to_owned()), query)),
        )
        .route(
            "/api/v1/pods",
            get(|state, query| list_or_watch(state, Path("pods".to_owned()), query)),
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
        .env("KUBECONFIG", &kubeconfig)
        .env("GITLAB_TOKEN", DEFAULT_TOKEN)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
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
    let ticks = ticks_per_second();
    let gitlab_before: u64 = sim.request_counts().values().sum();
    let before = process_usage(pid, ticks);
    tokio::time::sleep(idle_window()).await;
    let after = process_usage(pid, ticks);
    let gitlab_idle = sim.request_counts().values().sum::<u64>() - gitlab_before;
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&directory);

    println!(
        "footprint.objects = {object_count} ({} VirtualRegistries, {} Upstreams; Kubernetes API stand-in, GitLab simulator)",
        GROUPS * REGISTRIES_PER_GROUP,
        GROUPS * UPSTREAMS_PER_GROUP
    );
    match ready_after {
        Some(elapsed) => println!(
            "footprint.startup_to_ready_ms = {:.0} (spawn to /readyz 200: caches synced)",
            elapsed.as_secs_f64() * 1000.0
        ),
        None => println!("footprint.startup_to_ready_ms = not reached"),
    }
    if let Some(rss_kib) = rss_at_ready {
        println!(
            "footprint.rss_at_ready_mib = {:.1} (VmRSS when /readyz first answered 200, before the reconciles)",
            rss_kib as f64 / 1024.0
        );
    }
    match all_ready_after {
        Some(elapsed) => println!(
            "footprint.startup_to_all_objects_ready_ms = {:.0} (every object Ready=True, adopting existing GitLab state)",
            elapsed.as_secs_f64() * 1000.0
        ),
        None => {
            println!(
                "footprint.startup_to_all_objects_ready_ms = not reached ({} of {object_count} Ready)",
                ready_count(&state)
            );
            for object in lock(&state.objects)
                .values()
                .flat_map(|o| o.values())
                .take(2000)
            {
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
                "footprint.idle_rss_mib = {:.1} (goal < 40 MiB; VmRSS after {}s idle)",
                rss_kib as f64 / 1024.0,
                idle_window().as_secs()
            );
            println!(
                "footprint.idle_cpu_percent = {:.2} (goal ~0; utime+stime over {}s)",
                (cpu_after - cpu_before) / idle_window().as_secs_f64() * 100.0,
                idle_window().as_secs()
            );
        }
        _ => println!("footprint.idle_rss_mib = not measured (the process was gone)"),
    }
    println!(
        "footprint.idle_gitlab_requests = {gitlab_idle} (in the {}s idle window)",
        idle_window().as_secs()
    );
    println!(
        "footprint.status_patches = {}",
        *lock(&state.status_patches)
    );
    let unknown = lock(&state.unknown_requests).clone();
    if !unknown.is_empty() {
        println!(
            "footprint.unserved_api_requests = {} (first: {})",
            unknown.len(),
            unknown[0]
        );
    }
    sim.shutdown().await;
}
