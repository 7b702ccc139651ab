//! `run`, the shipped binary started with the arguments the chart's Deployment gives it,
//! against a fake kube-apiserver on loopback that answers as the apiserver does (objects
//! stored and versioned, lists, streaming watches, metadata-only lists and watches, JSON,
//! merge and apply patches with the status subresource kept apart, a failed JSON-patch
//! `test` as 422, finalizers holding a deletion back) and records every request.
//!
//! - RBAC derived from what the process does: every (verb, group, resource, namespace or
//!   cluster) it sent is allowed by the ServiceAccount's rendered (Cluster)Roles and bindings,
//!   and the chart grants nothing it never sent, for the default values, `watchNamespace`
//!   and leader election.
//! - Conflicts are not errors: a 422 to the finalizer patch is retried, logged at debug and
//!   not counted in `reconcile_errors_total`.

#[path = "support/chart.rs"]
mod chart;

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use futures::StreamExt;
use gitlab_registry_operator::controller::runtime::LEASE_NAME;
use gitlab_registry_operator::sim::{Seed, SimConfig, SimHandle, Simulator};
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use tokio::sync::broadcast;

const RELEASE: &str = "gitlab-registry-operator";
const RELEASE_NAMESPACE: &str = "gitlab-registry-system";
const NAMESPACE: &str = "team-a";
const OTHER_NAMESPACE: &str = "unrelated";
const TOKEN: &str = "serviceaccount-token";
const RUN_REQUESTED_AT: &str = "gitlabregistry.io/run-requested-at";

/// Hang guard only: nothing asserts on time.
async fn guarded<F: std::future::Future<Output = ()>>(test: F) {
    tokio::time::timeout(Duration::from_secs(240), test)
        .await
        .expect("test finished within the hang guard");
}

// ---- The fake apiserver -------------------------------------------------------------------

/// One request as RBAC sees it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Call {
    verb: String,
    group: String,
    /// `resource` or `resource/subresource`.
    resource: String,
    /// `None`: cluster-wide (all namespaces).
    namespace: Option<String>,
    name: Option<String>,
}

/// What a path names.
#[derive(Clone, Debug)]
struct Target {
    group: String,
    resource: String,
    subresource: Option<String>,
    namespace: Option<String>,
    name: Option<String>,
}

impl Target {
    fn parse(path: &str) -> Option<Self> {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, rest) = match segments.as_slice() {
            ["api", _version, rest @ ..] => (String::new(), rest),
            ["apis", group, _version, rest @ ..] => ((*group).to_owned(), rest),
            _ => return None,
        };
        let (namespace, rest) = match rest {
            ["namespaces", namespace, rest @ ..] if !rest.is_empty() => {
                (Some((*namespace).to_owned()), rest)
            }
            rest => (None, rest),
        };
        let (resource, name, subresource) = match rest {
            [resource] => (*resource, None, None),
            [resource, name] => (*resource, Some(*name), None),
            [resource, name, subresource] => (*resource, Some(*name), Some(*subresource)),
            _ => return None,
        };
        Some(Self {
            group,
            resource: resource.to_owned(),
            subresource: subresource.map(str::to_owned),
            namespace,
            name: name.map(str::to_owned),
        })
    }
}

/// The kinds this apiserver serves: (group, resource) -> (apiVersion, kind, status subresource).
fn served(group: &str, resource: &str) -> Option<(&'static str, &'static str, bool)> {
    Some(match (group, resource) {
        ("gitlabregistry.io", "virtualregistries") => {
            ("gitlabregistry.io/v1alpha1", "VirtualRegistry", true)
        }
        ("gitlabregistry.io", "upstreams") => ("gitlabregistry.io/v1alpha1", "Upstream", true),
        ("gitlabregistry.io", "cleanuppolicies") => {
            ("gitlabregistry.io/v1alpha1", "CleanupPolicy", true)
        }
        ("", "secrets") => ("v1", "Secret", false),
        ("", "pods") => ("v1", "Pod", true),
        ("", "events") => ("v1", "Event", false),
        ("events.k8s.io", "events") => ("events.k8s.io/v1", "Event", false),
        ("coordination.k8s.io", "leases") => ("coordination.k8s.io/v1", "Lease", false),
        _ => return None,
    })
}

/// (group, resource, namespace, name)
type Key = (String, String, String, String);

#[derive(Clone, Debug)]
struct Change {
    version: u64,
    group: String,
    resource: String,
    namespace: String,
    type_: &'static str,
    object: Value,
}

#[derive(Default)]
struct Cluster {
    objects: BTreeMap<Key, Value>,
    version: u64,
    history: Vec<Change>,
    calls: Vec<Call>,
    /// Objects (resource, name) whose next finalizer patch is refused as a lost `test`.
    refuse_finalizer_patch_once: BTreeSet<(String, String)>,
}

struct ApiServer {
    cluster: Mutex<Cluster>,
    changes: broadcast::Sender<Change>,
}

fn status(code: u16, reason: &str, message: &str) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "message": message, "reason": reason, "code": code});
    (
        StatusCode::from_u16(code).expect("status code"),
        axum::Json(body),
    )
        .into_response()
}

/// An apiserver refusal: code, reason, message.
struct Refusal(u16, &'static str, String);

fn created(result: Result<Value, Refusal>) -> Response {
    match result {
        Ok(object) => ok(201, object),
        Err(Refusal(code, reason, message)) => status(code, reason, &message),
    }
}

fn ok(code: u16, body: Value) -> Response {
    (
        StatusCode::from_u16(code).expect("status code"),
        axum::Json(body),
    )
        .into_response()
}

fn as_metadata_only(object: &Value) -> Value {
    json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": object["metadata"]})
}

impl Cluster {
    /// Stores `object` under a new resource version and tells the watches.
    fn commit(
        &mut self,
        changes: &broadcast::Sender<Change>,
        key: Key,
        mut object: Value,
        type_: &'static str,
    ) -> Value {
        self.version += 1;
        object["metadata"]["resourceVersion"] = json!(self.version.to_string());
        let deleted = type_ == "DELETED";
        if deleted {
            self.objects.remove(&key);
        } else {
            self.objects.insert(key.clone(), object.clone());
        }
        let change = Change {
            version: self.version,
            group: key.0,
            resource: key.1,
            namespace: key.2,
            type_,
            object: object.clone(),
        };
        self.history.push(change.clone());
        let _ = changes.send(change);
        object
    }

    /// A new object as the apiserver fills it in.
    fn create(
        &mut self,
        changes: &broadcast::Sender<Change>,
        group: &str,
        resource: &str,
        namespace: &str,
        mut object: Value,
    ) -> Result<Value, Refusal> {
        let Some((api_version, kind, _)) = served(group, resource) else {
            return Err(Refusal(
                404,
                "NotFound",
                "the server could not find the requested resource".into(),
            ));
        };
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let key = (
            group.to_owned(),
            resource.to_owned(),
            namespace.to_owned(),
            name.clone(),
        );
        if self.objects.contains_key(&key) {
            return Err(Refusal(
                409,
                "AlreadyExists",
                format!("{resource}.{group} \"{name}\" already exists"),
            ));
        }
        object["apiVersion"] = json!(api_version);
        object["kind"] = json!(kind);
        object["metadata"]["namespace"] = json!(namespace);
        object["metadata"]["uid"] = json!(format!("uid-{resource}-{namespace}-{name}"));
        object["metadata"]["creationTimestamp"] = json!(jiff::Timestamp::now().to_string());
        if group == "gitlabregistry.io" {
            object["metadata"]["generation"] = json!(1);
        }
        // As the apiserver does for Secrets: stringData becomes base64 data.
        if let Some(strings) = object
            .as_object_mut()
            .and_then(|o| o.remove("stringData"))
            .and_then(|v| v.as_object().cloned())
        {
            for (field, value) in strings {
                object["data"][field] = json!(
                    base64::engine::general_purpose::STANDARD
                        .encode(value.as_str().unwrap_or_default())
                );
            }
        }
        Ok(self.commit(changes, key, object, "ADDED"))
    }
}

impl ApiServer {
    async fn start(objects: Vec<(String, String, String, Value)>) -> (Arc<Self>, String) {
        let (changes, _) = broadcast::channel(4096);
        let server = Arc::new(Self {
            cluster: Mutex::new(Cluster::default()),
            changes,
        });
        for (group, resource, namespace, object) in objects {
            server
                .cluster()
                .create(&server.changes, &group, &resource, &namespace, object)
                .unwrap_or_else(|_| panic!("seeded {resource}"));
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let router = axum::Router::new()
            .fallback(handle)
            .with_state(server.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        (server, url)
    }

    fn cluster(&self) -> std::sync::MutexGuard<'_, Cluster> {
        self.cluster.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn calls(&self) -> Vec<Call> {
        self.cluster().calls.clone()
    }

    fn get(&self, group: &str, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        self.cluster()
            .objects
            .get(&(group.into(), resource.into(), namespace.into(), name.into()))
            .cloned()
    }

    /// An edit by someone else (kubectl): a merge patch of the main resource.
    fn edit(&self, group: &str, resource: &str, namespace: &str, name: &str, patch: &Value) {
        let mut cluster = self.cluster();
        let key: Key = (group.into(), resource.into(), namespace.into(), name.into());
        let mut object = cluster.objects.get(&key).cloned().expect("object to edit");
        json_patch::merge(&mut object, patch);
        cluster.commit(&self.changes, key, object, "MODIFIED");
    }

    /// `kubectl delete`: gone at once without finalizers, else marked for deletion.
    fn delete(&self, group: &str, resource: &str, namespace: &str, name: &str) {
        let mut cluster = self.cluster();
        let key: Key = (group.into(), resource.into(), namespace.into(), name.into());
        let mut object = cluster
            .objects
            .get(&key)
            .cloned()
            .expect("object to delete");
        if object["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty())
        {
            object["metadata"]["deletionTimestamp"] = json!(jiff::Timestamp::now().to_string());
            cluster.commit(&self.changes, key, object, "MODIFIED");
        } else {
            cluster.commit(&self.changes, key, object, "DELETED");
        }
    }
}

async fn handle(State(server): State<Arc<ApiServer>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let query: BTreeMap<String, String> =
        url::form_urlencoded::parse(parts.uri.query().unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    let header = |name: axum::http::HeaderName| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    if header(axum::http::header::AUTHORIZATION) != format!("Bearer {TOKEN}") {
        return status(401, "Unauthorized", "Unauthorized");
    }
    let metadata_only = header(axum::http::header::ACCEPT).contains("as=PartialObjectMetadata");
    let content_type = header(axum::http::header::CONTENT_TYPE);
    let Some(target) = Target::parse(parts.uri.path()) else {
        server.cluster().calls.push(Call {
            verb: parts.method.as_str().to_lowercase(),
            group: "<non-resource>".into(),
            resource: parts.uri.path().into(),
            namespace: None,
            name: None,
        });
        return status(
            404,
            "NotFound",
            "the server could not find the requested resource",
        );
    };
    let watch = query.get("watch").is_some_and(|w| w == "true" || w == "1");
    let verb = match (parts.method.as_str(), &target.name) {
        ("GET", Some(_)) => "get",
        ("GET", None) if watch => "watch",
        ("GET", None) => "list",
        ("POST", _) => "create",
        ("PATCH", _) => "patch",
        ("PUT", _) => "update",
        ("DELETE", Some(_)) => "delete",
        ("DELETE", None) => "deletecollection",
        _ => "unknown",
    };
    let resource = match &target.subresource {
        Some(sub) => format!("{}/{sub}", target.resource),
        None => target.resource.clone(),
    };
    server.cluster().calls.push(Call {
        verb: verb.into(),
        group: target.group.clone(),
        resource,
        namespace: target.namespace.clone(),
        name: target.name.clone(),
    });
    let Some((api_version, kind, has_status)) = served(&target.group, &target.resource) else {
        return status(
            404,
            "NotFound",
            "the server could not find the requested resource",
        );
    };
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    match verb {
        "get" => {
            let namespace = target.namespace.clone().unwrap_or_default();
            let name = target.name.clone().unwrap_or_default();
            match server.get(&target.group, &target.resource, &namespace, &name) {
                Some(object) if metadata_only => ok(200, as_metadata_only(&object)),
                Some(object) => ok(200, object),
                None => status(
                    404,
                    "NotFound",
                    &format!("{}.{} \"{name}\" not found", target.resource, target.group),
                ),
            }
        }
        "list" => {
            let cluster = server.cluster();
            let mut items: Vec<Value> = cluster
                .objects
                .iter()
                .filter(|((group, resource, namespace, _), _)| {
                    *group == target.group
                        && *resource == target.resource
                        && target.namespace.as_ref().is_none_or(|n| n == namespace)
                })
                .map(|(_, object)| {
                    if metadata_only {
                        as_metadata_only(object)
                    } else {
                        object.clone()
                    }
                })
                .collect();
            if let Some(limit) = query.get("limit").and_then(|l| l.parse::<usize>().ok()) {
                items.truncate(limit);
            }
            let (api_version, kind) = if metadata_only {
                ("meta.k8s.io/v1", "PartialObjectMetadataList".to_owned())
            } else {
                (api_version, format!("{kind}List"))
            };
            ok(
                200,
                json!({"apiVersion": api_version, "kind": kind,
                       "metadata": {"resourceVersion": cluster.version.to_string()}, "items": items}),
            )
        }
        "watch" => {
            let since: u64 = query
                .get("resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let matches = {
                let target = target.clone();
                move |change: &Change| {
                    change.version > since
                        && change.group == target.group
                        && change.resource == target.resource
                        && target
                            .namespace
                            .as_ref()
                            .is_none_or(|n| *n == change.namespace)
                }
            };
            // Backlog and subscription under one lock: no change falls between them.
            let (backlog, receiver) = {
                let cluster = server.cluster();
                let backlog: Vec<Change> = cluster
                    .history
                    .iter()
                    .filter(|c| matches(c))
                    .cloned()
                    .collect();
                (backlog, server.changes.subscribe())
            };
            let live = futures::stream::unfold(receiver, |mut receiver| async move {
                loop {
                    match receiver.recv().await {
                        Ok(change) => return Some((change, receiver)),
                        Err(broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            })
            .filter(move |change| std::future::ready(matches(change)));
            let lines = futures::stream::iter(backlog)
                .chain(live)
                .map(move |change| {
                    let object = if metadata_only {
                        as_metadata_only(&change.object)
                    } else {
                        change.object
                    };
                    let mut line =
                        serde_json::to_vec(&json!({"type": change.type_, "object": object}))
                            .expect("json");
                    line.push(b'\n');
                    Ok::<_, Infallible>(Bytes::from(line))
                });
            Response::builder()
                .status(200)
                .header(axum::http::header::CONTENT_TYPE, "application/json")
                .body(Body::from_stream(lines))
                .expect("response")
        }
        "create" => {
            let namespace = target.namespace.clone().unwrap_or_default();
            created(server.cluster().create(
                &server.changes,
                &target.group,
                &target.resource,
                &namespace,
                body,
            ))
        }
        "patch" => {
            let field_manager = query.get("fieldManager").map(String::as_str);
            patch(
                &server,
                &target,
                &content_type,
                field_manager,
                body,
                has_status,
            )
        }
        "update" => {
            let namespace = target.namespace.clone().unwrap_or_default();
            let name = target.name.clone().unwrap_or_default();
            let key: Key = (
                target.group.clone(),
                target.resource.clone(),
                namespace,
                name.clone(),
            );
            let mut cluster = server.cluster();
            let Some(current) = cluster.objects.get(&key).cloned() else {
                return status(404, "NotFound", &format!("\"{name}\" not found"));
            };
            if body["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
                return status(
                    409,
                    "Conflict",
                    "the object has been modified; please apply your changes to the latest version and try again",
                );
            }
            ok(200, cluster.commit(&server.changes, key, body, "MODIFIED"))
        }
        _ => status(405, "MethodNotAllowed", "not supported by this fake"),
    }
}

fn patch(
    server: &ApiServer,
    target: &Target,
    content_type: &str,
    field_manager: Option<&str>,
    body: Value,
    has_status: bool,
) -> Response {
    let namespace = target.namespace.clone().unwrap_or_default();
    let name = target.name.clone().unwrap_or_default();
    let key: Key = (
        target.group.clone(),
        target.resource.clone(),
        namespace.clone(),
        name.clone(),
    );
    let apply = content_type.starts_with("application/apply-patch");
    if apply && field_manager.is_none_or(str::is_empty) {
        return status(
            422,
            "Invalid",
            "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
        );
    }
    let mut cluster = server.cluster();
    let Some(current) = cluster.objects.get(&key).cloned() else {
        // Server-side apply of the main resource creates a missing object.
        if apply && target.subresource.is_none() {
            return created(cluster.create(
                &server.changes,
                &target.group,
                &target.resource,
                &namespace,
                body,
            ));
        }
        return status(
            404,
            "NotFound",
            &format!("{}.{} \"{name}\" not found", target.resource, target.group),
        );
    };
    let mut patched = current.clone();
    if content_type.starts_with("application/json-patch+json") {
        let Ok(mut operations) = serde_json::from_value::<json_patch::Patch>(body.clone()) else {
            return status(400, "BadRequest", "invalid JSON patch");
        };
        let touches_finalizers = body.as_array().is_some_and(|ops| {
            ops.iter().any(|op| {
                op["path"]
                    .as_str()
                    .is_some_and(|p| p.starts_with("/metadata/finalizers"))
            })
        });
        if touches_finalizers
            && cluster
                .refuse_finalizer_patch_once
                .remove(&(target.resource.clone(), name.clone()))
        {
            return lost_test();
        }
        // As the apiserver's JSON patch: `test` of a missing member against null passes.
        operations.0.retain(|operation| match operation {
            json_patch::PatchOperation::Test(test) => {
                !(test.value.is_null() && current.pointer(test.path.as_str()).is_none())
            }
            _ => true,
        });
        if json_patch::patch(&mut patched, &operations).is_err() {
            return lost_test();
        }
    } else if apply && target.subresource.as_deref() == Some("status") {
        // The operator is the one manager of status and applies all of it each time.
        patched["status"] = body["status"].clone();
    } else if content_type.starts_with("application/merge-patch+json")
        || content_type.starts_with("application/strategic-merge-patch+json")
        || content_type.starts_with("application/apply-patch")
    {
        json_patch::merge(&mut patched, &body);
    } else {
        return status(415, "UnsupportedMediaType", content_type);
    }
    // The status subresource changes only status; the main resource never does.
    let mut object = current.clone();
    match (has_status, target.subresource.as_deref()) {
        (true, Some("status")) => object["status"] = patched["status"].clone(),
        (true, None) => {
            let kept = current.get("status").cloned();
            object = patched;
            match kept {
                Some(kept) => object["status"] = kept,
                None => {
                    object.as_object_mut().map(|o| o.remove("status"));
                }
            }
        }
        (false, None) => object = patched,
        (_, Some(other)) => {
            return status(404, "NotFound", &format!("no subresource {other}"));
        }
    }
    object["metadata"]["name"] = current["metadata"]["name"].clone();
    object["metadata"]["namespace"] = current["metadata"]["namespace"].clone();
    object["metadata"]["uid"] = current["metadata"]["uid"].clone();
    if object.get("spec") != current.get("spec")
        && let Some(generation) = current["metadata"]["generation"].as_i64()
    {
        object["metadata"]["generation"] = json!(generation + 1);
    }
    let leaving = object["metadata"]["deletionTimestamp"].is_string()
        && object["metadata"]["finalizers"]
            .as_array()
            .is_none_or(|f| f.is_empty());
    let type_ = if leaving { "DELETED" } else { "MODIFIED" };
    ok(200, cluster.commit(&server.changes, key, object, type_))
}

/// The apiserver's answer to a JSON patch whose `test` failed: a generic 422 naming no field.
fn lost_test() -> Response {
    status(
        422,
        "Invalid",
        "the server rejected our request due to an error in our request",
    )
}

// ---- The scenario -------------------------------------------------------------------------

/// The examples of `examples/` in `namespace`, one CleanupPolicy (keepInUse) with a run
/// request; Pods and a Secret in `namespace` and in another namespace.
fn scenario(namespace: &str) -> Vec<(String, String, String, Value)> {
    let mut objects = Vec::new();
    let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut files: Vec<_> = std::fs::read_dir(&examples)
        .expect("examples/")
        .map(|entry| entry.expect("entry").path())
        .collect();
    files.sort();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("example");
        let documents: Vec<Value> = serde_saphyr::from_multiple(&text).expect("yaml");
        for mut object in documents.into_iter().filter(|d| !d.is_null()) {
            let (group, resource) = match object["kind"].as_str().unwrap_or_default() {
                "Secret" => ("", "secrets"),
                "Upstream" => ("gitlabregistry.io", "upstreams"),
                "VirtualRegistry" => ("gitlabregistry.io", "virtualregistries"),
                "CleanupPolicy" => ("gitlabregistry.io", "cleanuppolicies"),
                other => panic!("example kind {other}"),
            };
            if object["metadata"]["name"] == "app-nightly" {
                assert_eq!(object["spec"]["safety"]["keepInUse"], true);
                object["metadata"]["annotations"] = json!({RUN_REQUESTED_AT: "first"});
            }
            objects.push((group.into(), resource.into(), namespace.into(), object));
        }
    }
    for (pod_namespace, image) in [
        (namespace, "registry.example.com/my-org/app:main"),
        (OTHER_NAMESPACE, "registry.example.com/my-org/app:1.0.0"),
    ] {
        objects.push((
            String::new(),
            "pods".into(),
            pod_namespace.into(),
            json!({"metadata": {"name": "web"}, "spec": {"containers": [{"name": "web", "image": image}]},
                   "status": {"phase": "Running", "containerStatuses": [{"name": "web", "image": image, "imageID": "", "ready": true, "restartCount": 0}]}}),
        ));
    }
    objects.push((
        String::new(),
        "secrets".into(),
        OTHER_NAMESPACE.into(),
        json!({"metadata": {"name": "sh.helm.release.v1.other.v1"}, "data": {"release": "aGVsbQ=="}}),
    ));
    objects
}

fn condition_is(object: &Value, type_: &str, status: &str) -> bool {
    object["status"]["conditions"]
        .as_array()
        .is_some_and(|list| {
            list.iter()
                .any(|c| c["type"] == type_ && c["status"] == status)
        })
}

async fn wait_for(what: &str, operator: &mut Operator, mut check: impl FnMut() -> bool) {
    loop {
        if check() {
            return;
        }
        if let Some(exit) = operator.child.try_wait().expect("child") {
            panic!(
                "the operator exited ({exit}) while waiting for {what}:\n{}",
                operator.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The operator binary, started as the rendered Deployment starts it.
struct Operator {
    child: Child,
    log_path: PathBuf,
    metrics: String,
}

impl Operator {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// SIGTERM, as the kubelet stops a pod; then waits for the drain.
    async fn stop(mut self) -> String {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..300 {
            if self.child.try_wait().expect("child").is_some() {
                return self.log();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.log()
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

/// Starts the binary with the container args and env of the rendered Deployment, talking to
/// `apiserver` with the ServiceAccount's token and to the simulator as GitLab.
fn start_operator(deployment: &Value, apiserver: &str, sim: &SimHandle, name: &str) -> Operator {
    let dir = std::env::temp_dir().join(format!("gro-process-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: \"{apiserver}\"}}}}]\n\
             users: [{{name: operator, user: {{token: {TOKEN}}}}}]\n\
             contexts: [{{name: fake, context: {{cluster: fake, user: operator, namespace: {RELEASE_NAMESPACE}}}}}]\n\
             current-context: fake\n"
        ),
    )
    .expect("kubeconfig");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let mut args: Vec<String> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("arg").to_owned())
        .map(|arg| {
            if arg.starts_with("--metrics-addr=") {
                format!("--metrics-addr={metrics}")
            } else if arg.starts_with("--log-format=") {
                "--log-format=text".into()
            } else {
                arg
            }
        })
        .collect();
    args.push(format!("--gitlab-url={}", sim.base_url()));
    let log_path = dir.join("operator.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let child = Command::new(env!("CARGO_BIN_EXE_gitlab-registry-operator"))
        .args(&args)
        .env_clear()
        .env("KUBECONFIG", &kubeconfig)
        .env("GITLAB_TOKEN", sim.config().token.expose_secret())
        .env("POD_NAMESPACE", RELEASE_NAMESPACE)
        .env("POD_NAME", format!("{name}-0"))
        .env("RUST_LOG", "gitlab_registry_operator=debug,info")
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .expect("operator started");
    Operator {
        child,
        log_path,
        metrics,
    }
}

async fn simulator() -> SimHandle {
    Simulator::start(SimConfig::embedded_demo(), Seed::demo())
        .await
        .expect("simulator")
}

/// Runs the scenario against the process the chart renders with `values`; the calls it sent.
async fn calls_of_a_full_run(objects: &[Value], leader_election: bool) -> Vec<Call> {
    let deployment = objects
        .iter()
        .find(|o| o["kind"] == "Deployment")
        .expect("Deployment");
    let sim = simulator().await;
    let (server, url) = ApiServer::start(scenario(NAMESPACE)).await;
    let mut operator = start_operator(deployment, &url, &sim, "full");
    let ns = NAMESPACE;
    let gitlab = "gitlabregistry.io";
    wait_for(
        "docker-cache and its upstreams Ready",
        &mut operator,
        || {
            ["dockerhub", "quay"].iter().all(|name| {
                server
                    .get(gitlab, "upstreams", ns, name)
                    .is_some_and(|u| condition_is(&u, "Ready", "True"))
            }) && server
                .get(gitlab, "virtualregistries", ns, "docker-cache")
                .is_some_and(|r| condition_is(&r, "Ready", "True"))
        },
    )
    .await;
    wait_for("the requested cleanup run", &mut operator, || {
        server
            .get(gitlab, "cleanuppolicies", ns, "app-nightly")
            .is_some_and(|p| p["status"]["lastHandledRunRequest"] == "first")
    })
    .await;
    wait_for("every policy reconciled", &mut operator, || {
        server
            .cluster()
            .objects
            .iter()
            .filter(|((_, resource, _, _), _)| resource == "cleanuppolicies")
            .all(|(_, policy)| policy["status"]["observedGeneration"].is_i64())
    })
    .await;
    // A second run request: the same Event again, which the recorder patches.
    server.edit(
        gitlab,
        "cleanuppolicies",
        ns,
        "app-nightly",
        &json!({"metadata": {"annotations": {RUN_REQUESTED_AT: "second"}}}),
    );
    wait_for("the second run's repeated Event", &mut operator, || {
        server
            .calls()
            .iter()
            .any(|c| c.verb == "patch" && c.group == "events.k8s.io")
    })
    .await;
    server.delete(gitlab, "virtualregistries", ns, "docker-cache");
    wait_for(
        "docker-cache deleted through its finalizer",
        &mut operator,
        || {
            server
                .get(gitlab, "virtualregistries", ns, "docker-cache")
                .is_none()
        },
    )
    .await;
    if leader_election {
        let holder = server
            .get(
                "coordination.k8s.io",
                "leases",
                RELEASE_NAMESPACE,
                LEASE_NAME,
            )
            .and_then(|lease| lease["spec"]["holderIdentity"].as_str().map(str::to_owned));
        assert_eq!(
            holder.as_deref(),
            Some("full-0"),
            "the operator holds the Lease"
        );
    }
    operator.stop().await;
    server.calls()
}

// ---- RBAC ---------------------------------------------------------------------------------

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|i| i.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// One right a rendered rule grants the ServiceAccount, and where.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Grant {
    /// Which Role or ClusterRole, through which binding.
    source: String,
    verb: String,
    group: String,
    resource: String,
    /// `None`: every namespace and cluster-wide (a ClusterRoleBinding).
    namespace: Option<String>,
    /// Empty: any name.
    names: Vec<String>,
}

impl Grant {
    /// What the RBAC authorizer decides for this rule.
    fn allows(&self, call: &Call) -> bool {
        self.verb == call.verb
            && self.group == call.group
            && self.resource == call.resource
            && (self.namespace.is_none() || self.namespace == call.namespace)
            && (self.names.is_empty() || call.name.as_ref().is_some_and(|n| self.names.contains(n)))
    }
}

/// The rights the rendered bindings give the Deployment's ServiceAccount, rule by rule.
fn grants(objects: &[Value]) -> Vec<Grant> {
    let deployment = objects
        .iter()
        .find(|o| o["kind"] == "Deployment")
        .expect("Deployment");
    let account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .expect("serviceAccountName");
    let account_namespace = deployment["metadata"]["namespace"]
        .as_str()
        .unwrap_or(RELEASE_NAMESPACE);
    let mut grants = Vec::new();
    for binding in objects
        .iter()
        .filter(|o| o["kind"] == "RoleBinding" || o["kind"] == "ClusterRoleBinding")
    {
        let binds_us = binding["subjects"].as_array().is_some_and(|subjects| {
            subjects.iter().any(|s| {
                s["kind"] == "ServiceAccount"
                    && s["name"] == account
                    && s["namespace"] == account_namespace
            })
        });
        if !binds_us {
            continue;
        }
        let binding_namespace = binding["metadata"]["namespace"].as_str().map(str::to_owned);
        let role_kind = binding["roleRef"]["kind"].as_str().unwrap_or_default();
        let role = objects
            .iter()
            .find(|o| {
                o["kind"] == role_kind
                    && o["metadata"]["name"] == binding["roleRef"]["name"]
                    && (role_kind == "ClusterRole"
                        || o["metadata"]["namespace"].as_str() == binding_namespace.as_deref())
            })
            .unwrap_or_else(|| panic!("the chart renders the role {binding} refers to"));
        let namespace = match binding["kind"].as_str() {
            Some("ClusterRoleBinding") => None,
            _ => Some(binding_namespace.clone().expect("RoleBinding namespace")),
        };
        let source = format!(
            "{role_kind} {} via {} {}",
            role["metadata"]["name"], binding["kind"], binding["metadata"]["name"]
        );
        for rule in role["rules"].as_array().expect("rules") {
            for group in strings(&rule["apiGroups"]) {
                for resource in strings(&rule["resources"]) {
                    for verb in strings(&rule["verbs"]) {
                        grants.push(Grant {
                            source: source.clone(),
                            verb,
                            group: group.clone(),
                            resource: resource.clone(),
                            namespace: namespace.clone(),
                            names: strings(&rule["resourceNames"]),
                        });
                    }
                }
            }
        }
    }
    grants
}

/// Every call allowed, every grant used.
fn assert_rbac_fits(name: &str, objects: &[Value], calls: &[Call]) {
    let grants = grants(objects);
    let distinct: BTreeSet<&Call> = calls.iter().collect();
    let seen: BTreeSet<String> = distinct
        .iter()
        .map(|c| {
            let scope = c.namespace.as_deref().unwrap_or("<cluster>");
            format!("{} {}/{} in {scope}", c.verb, c.group, c.resource)
        })
        .collect();
    println!("{name}: `run` sent {seen:#?}");
    let refused: Vec<&&Call> = distinct
        .iter()
        .filter(|call| !grants.iter().any(|grant| grant.allows(call)))
        .collect();
    assert!(
        refused.is_empty(),
        "{name}: the chart's RBAC refuses requests `run` sends: {refused:#?}"
    );
    let unused: Vec<&Grant> = grants
        .iter()
        .filter(|grant| !distinct.iter().any(|call| grant.allows(call)))
        .collect();
    assert!(
        unused.is_empty(),
        "{name}: the chart grants rights `run` never uses: {unused:#?}"
    );
}

fn render_or_skip(test: &str, extra: &[&str]) -> Option<Vec<Value>> {
    match chart::helm() {
        Ok(helm) => Some(chart::render(&helm, RELEASE, RELEASE_NAMESPACE, extra)),
        Err(reason) => {
            println!("SKIPPED {test}: {reason}");
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn default_values_allow_exactly_what_run_calls() {
    guarded(async {
        let Some(objects) = render_or_skip("default_values_allow_exactly_what_run_calls", &[])
        else {
            return;
        };
        let calls = calls_of_a_full_run(&objects, false).await;
        assert!(
            calls.iter().any(|c| c.namespace.is_none()),
            "cluster-wide lists and watches"
        );
        assert!(!calls.iter().any(|c| c.group == "coordination.k8s.io"));
        assert_rbac_fits("default values", &objects, &calls);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn leader_election_allows_exactly_what_run_calls() {
    guarded(async {
        let Some(objects) = render_or_skip(
            "leader_election_allows_exactly_what_run_calls",
            &["--set", "leaderElection.enabled=true"],
        ) else {
            return;
        };
        let calls = calls_of_a_full_run(&objects, true).await;
        let lease_verbs: BTreeSet<&str> = calls
            .iter()
            .filter(|c| c.resource == "leases")
            .map(|c| c.verb.as_str())
            .collect();
        assert!(
            lease_verbs.contains("patch"),
            "kube-lease-manager takes the Lease with patches: {lease_verbs:?}"
        );
        assert_rbac_fits("leaderElection.enabled=true", &objects, &calls);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_namespace_with_leader_election_allows_exactly_what_run_calls() {
    guarded(async {
        let Some(objects) = render_or_skip(
            "watch_namespace_with_leader_election_allows_exactly_what_run_calls",
            &[
                "--set",
                &format!("watchNamespace={NAMESPACE}"),
                "--set",
                "replicaCount=2",
            ],
        ) else {
            return;
        };
        let calls = calls_of_a_full_run(&objects, true).await;
        assert!(
            calls.iter().all(|c| c.namespace.is_some()),
            "nothing cluster-wide with --watch-namespace: {calls:#?}"
        );
        assert_rbac_fits("watchNamespace", &objects, &calls);
    })
    .await;
}

// ---- Conflicts ----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_finalizer_test_is_retried_and_not_counted_as_an_error() {
    guarded(async {
        let Some(objects) = render_or_skip(
            "a_lost_finalizer_test_is_retried_and_not_counted_as_an_error",
            &["--set", &format!("watchNamespace={NAMESPACE}")],
        ) else {
            return;
        };
        let deployment = objects
            .iter()
            .find(|o| o["kind"] == "Deployment")
            .expect("Deployment");
        let sim = simulator().await;
        let registry = json!({"apiVersion": "gitlabregistry.io/v1alpha1", "kind": "VirtualRegistry",
                              "metadata": {"name": "racy"}, "spec": {"group": "my-org"}});
        let (server, url) = ApiServer::start(vec![(
            "gitlabregistry.io".into(),
            "virtualregistries".into(),
            NAMESPACE.into(),
            registry,
        )])
        .await;
        server
            .cluster()
            .refuse_finalizer_patch_once
            .insert(("virtualregistries".into(), "racy".into()));
        let mut operator = start_operator(deployment, &url, &sim, "conflict");
        wait_for(
            "racy Ready after the retried finalizer",
            &mut operator,
            || {
                server
                    .get("gitlabregistry.io", "virtualregistries", NAMESPACE, "racy")
                    .is_some_and(|r| condition_is(&r, "Ready", "True"))
            },
        )
        .await;
        let finalizer_patches = server
            .calls()
            .iter()
            .filter(|c| c.verb == "patch" && c.resource == "virtualregistries")
            .count();
        assert!(
            finalizer_patches >= 2,
            "refused once, then sent again: {finalizer_patches}"
        );
        let metrics = reqwest::get(format!("http://{}/metrics", operator.metrics))
            .await
            .expect("metrics answer")
            .text()
            .await
            .expect("text");
        assert!(
            metrics.contains("gitlab_registry_operator_reconciles_total{kind=\"VirtualRegistry\"}"),
            "{metrics}"
        );
        assert!(
            !metrics
                .lines()
                .any(|line| line.starts_with("gitlab_registry_operator_reconcile_errors_total")),
            "a conflict is not a reconcile error: {metrics}"
        );
        let log = operator.stop().await;
        let conflict_lines: Vec<&str> = log
            .lines()
            .filter(|line| line.contains("conflict with another write"))
            .collect();
        assert!(!conflict_lines.is_empty(), "the conflict is logged: {log}");
        assert!(
            conflict_lines.iter().all(|line| line.contains("DEBUG")),
            "at debug: {conflict_lines:#?}"
        );
        assert!(
            !log.lines()
                .any(|line| line.contains("WARN") && line.contains("racy")),
            "no warning for a conflict: {log}"
        );
    })
    .await;
}
