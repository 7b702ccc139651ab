//! The mocked Kubernetes API server the operator tests talk to (a `tower-test` handle):
//! it answers the requests the way the apiserver would for these tests and records them.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use http::{Request, Response};
use kube::client::Body;
use serde_json::{Value, json};

pub type ApiServerHandle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// One request the operator sent to the Kubernetes API, body as sent.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: String,
    pub content_type: String,
    pub raw_body: String,
    pub body: Value,
}

impl Seen {
    /// Reads one request as the apiserver receives it.
    pub async fn read(request: Request<Body>) -> Self {
        let (parts, body) = request.into_parts();
        let bytes = body.collect_bytes().await.expect("request body");
        Self {
            method: parts.method.as_str().to_owned(),
            path: parts.uri.path().to_owned(),
            query: parts.uri.query().unwrap_or_default().to_owned(),
            content_type: parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|value| value.to_str().ok())
                .unwrap_or_default()
                .to_owned(),
            raw_body: String::from_utf8_lossy(&bytes).into_owned(),
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        }
    }

    pub fn is(&self, method: &str, path: &str) -> bool {
        self.method == method && self.path == path
    }
}

/// Answers Secret reads from a list the test can change (rotation), echoes custom-resource
/// patches and Events, answers 404 otherwise, and records every request.
#[derive(Clone)]
pub struct ApiServer {
    pub seen: Arc<Mutex<Vec<Seen>>>,
    secrets: Arc<Mutex<Vec<Value>>>,
}

impl ApiServer {
    pub fn start(mut handle: ApiServerHandle, secrets: Vec<Value>) -> Self {
        let server = Self {
            seen: Arc::default(),
            secrets: Arc::new(Mutex::new(secrets)),
        };
        let state = server.clone();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let seen = Seen::read(request).await;
                let (status, answer) = state.answer(&seen);
                state.seen.lock().expect("log").push(seen);
                let response = Response::builder()
                    .status(status)
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(Body::from(serde_json::to_vec(&answer).expect("json")))
                    .expect("response");
                send.send_response(response);
            }
        });
        server
    }

    fn answer(&self, request: &Seen) -> (u16, Value) {
        let segments: Vec<&str> = request.path.split('/').collect();
        // /api/v1/namespaces/{namespace}/secrets/{name}
        if request.method == "GET"
            && segments.len() == 7
            && segments[1..4] == ["api", "v1", "namespaces"]
            && segments[5] == "secrets"
        {
            let secrets = self.secrets.lock().expect("secrets");
            return secrets
                .iter()
                .find(|secret| {
                    secret["metadata"]["namespace"] == segments[4]
                        && secret["metadata"]["name"] == segments[6]
                })
                .map_or_else(|| not_found("secret"), |secret| (200, secret.clone()));
        }
        if request.path.contains("/events") {
            return (
                if request.method == "POST" { 201 } else { 200 },
                request.body.clone(),
            );
        }
        // /apis/gitlabregistry.io/v1alpha1/namespaces/{namespace}/{plural}/{name}[/status]:
        // the object after the patch, enough of it for the client to decode.
        if request.method == "PATCH" && request.path.starts_with("/apis/gitlabregistry.io/") {
            let (kind, spec) = match segments.get(6).copied() {
                Some("upstreams") => (
                    "Upstream",
                    json!({"group": "my-org", "url": "https://example.org"}),
                ),
                Some("cleanuppolicies") => (
                    "CleanupPolicy",
                    json!({"target": {"containerRepositories": {"project": "my-org/app"}}, "rules": {"nameRegexDelete": ".*"}}),
                ),
                _ => ("VirtualRegistry", json!({"group": "my-org"})),
            };
            return (
                200,
                json!({"apiVersion": "gitlabregistry.io/v1alpha1", "kind": kind,
                       "metadata": {"name": segments.get(7).copied().unwrap_or_default(),
                                    "namespace": segments.get(5).copied().unwrap_or_default(),
                                    "resourceVersion": "2"},
                       "spec": spec}),
            );
        }
        not_found("object")
    }

    /// Every request recorded since the last `take`.
    pub fn take(&self) -> Vec<Seen> {
        std::mem::take(&mut *self.seen.lock().expect("log"))
    }

    /// Replaces (or adds) the Secret with `secret`'s namespace and name.
    pub fn replace_secret(&self, secret: Value) {
        let mut secrets = self.secrets.lock().expect("secrets");
        secrets.retain(|s| {
            s["metadata"]["name"] != secret["metadata"]["name"]
                || s["metadata"]["namespace"] != secret["metadata"]["namespace"]
        });
        secrets.push(secret);
    }
}

/// The apiserver's 404 `Status` for `what`.
pub fn not_found(what: &str) -> (u16, Value) {
    (
        404,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": format!("{what} not found"), "reason": "NotFound", "code": 404}),
    )
}
