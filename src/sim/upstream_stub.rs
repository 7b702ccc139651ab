//! A tiny container registry stand-in on loopback for connection-test tests: it answers
//! every request with a configurable status, optionally waits first, and records what it
//! received. With required credentials it behaves as Docker Hub and most registries do: a
//! request to the registry without a valid Bearer token answers `401` with
//! `WWW-Authenticate: Bearer realm="<stub>/token",service="upstream-stub"`; `GET /token` with
//! the right Basic credentials gives `{"token": …}`; Basic credentials sent to the registry
//! itself are not accepted. Its behaviour can be changed while it runs.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// How the stub answers.
#[derive(Debug, Clone)]
pub struct StubBehaviour {
    /// Status for requests that pass the credential check.
    pub status: u16,
    /// `(username, password)` the token realm requires (as Basic auth) before it hands out
    /// the Bearer token the registry wants; `None` accepts anonymous requests.
    pub required_credentials: Option<(String, String)>,
    /// Wait before answering (longer than the client timeout = a timeout).
    pub delay: Duration,
}

impl Default for StubBehaviour {
    fn default() -> Self {
        Self {
            status: 200,
            required_credentials: None,
            delay: Duration::ZERO,
        }
    }
}

impl StubBehaviour {
    pub fn status(status: u16) -> Self {
        Self {
            status,
            ..Self::default()
        }
    }

    pub fn requiring(username: &str, password: &str) -> Self {
        Self {
            required_credentials: Some((username.to_owned(), password.to_owned())),
            ..Self::default()
        }
    }
}

/// The path of the stub's token realm.
pub const TOKEN_PATH: &str = "/token";

/// One request the stub received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StubRequest {
    pub method: String,
    pub path: String,
    /// The query string, if any (the token request's `service` and `scope`).
    pub query: Option<String>,
    /// The basic-auth username sent, if any (the password is not kept).
    pub username: Option<String>,
    /// Whether an `Authorization: Bearer` token came with it.
    pub bearer: bool,
}

impl StubRequest {
    /// A request to the token realm rather than to the registry.
    pub fn is_token_request(&self) -> bool {
        self.path == TOKEN_PATH
    }
}

#[derive(Default)]
struct StubState {
    behaviour: StubBehaviour,
    received: Vec<StubRequest>,
}

type Shared = Arc<Mutex<StubState>>;

fn lock(shared: &Shared) -> MutexGuard<'_, StubState> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A running stub registry. Dropping it stops the server.
pub struct UpstreamStub {
    url: String,
    shared: Shared,
    stop: Option<oneshot::Sender<()>>,
}

impl UpstreamStub {
    /// Binds `127.0.0.1:0` and serves in the background.
    pub async fn start(behaviour: StubBehaviour) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let shared: Shared = Arc::new(Mutex::new(StubState {
            behaviour,
            received: Vec::new(),
        }));
        let router = Router::new().fallback(answer).with_state(shared.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok(Self {
            url,
            shared,
            stop: Some(stop),
        })
    }

    /// `http://127.0.0.1:PORT` — use as an upstream url (needs `allow_local_network`).
    pub fn url(&self) -> String {
        self.url.clone()
    }

    pub fn set_behaviour(&self, behaviour: StubBehaviour) {
        lock(&self.shared).behaviour = behaviour;
    }

    pub fn set_status(&self, status: u16) {
        lock(&self.shared).behaviour.status = status;
    }

    pub fn require_credentials(&self, credentials: Option<(&str, &str)>) {
        lock(&self.shared).behaviour.required_credentials =
            credentials.map(|(username, password)| (username.to_owned(), password.to_owned()));
    }

    pub fn set_delay(&self, delay: Duration) {
        lock(&self.shared).behaviour.delay = delay;
    }

    /// Requests received so far, token requests included.
    pub fn requests(&self) -> Vec<StubRequest> {
        lock(&self.shared).received.clone()
    }

    /// Requests received so far by the registry itself (not the token realm).
    pub fn registry_requests(&self) -> Vec<StubRequest> {
        self.requests()
            .into_iter()
            .filter(|request| !request.is_token_request())
            .collect()
    }

    /// Connection tests received: the registry requests sent without a token (every test
    /// starts with one; a token, when needed, is fetched after its challenge).
    pub fn tests(&self) -> usize {
        self.registry_requests()
            .iter()
            .filter(|request| !request.bearer)
            .count()
    }
}

impl Drop for UpstreamStub {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn authorization<'a>(request: &'a Request, wanted: &str) -> Option<&'a str> {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, credentials) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case(wanted)
        .then_some(credentials.trim())
}

fn basic_credentials(request: &Request) -> Option<(String, String)> {
    let encoded = authorization(request, "basic")?;
    let decoded = String::from_utf8(STANDARD.decode(encoded).ok()?).ok()?;
    let (username, password) = decoded.split_once(':')?;
    Some((username.to_owned(), password.to_owned()))
}

/// The token the realm hands out for these credentials (the registry accepts only it).
fn token_for((username, password): &(String, String)) -> String {
    format!(
        "stub-token.{}",
        STANDARD.encode(format!("{username}:{password}"))
    )
}

async fn answer(State(shared): State<Shared>, request: Request) -> Response {
    let credentials = basic_credentials(&request);
    let bearer = authorization(&request, "bearer").map(str::to_owned);
    let path = request.uri().path().to_owned();
    let behaviour = {
        let mut state = lock(&shared);
        state.received.push(StubRequest {
            method: request.method().as_str().to_owned(),
            path: path.clone(),
            query: request.uri().query().map(str::to_owned),
            username: credentials.as_ref().map(|(username, _)| username.clone()),
            bearer: bearer.is_some(),
        });
        state.behaviour.clone()
    };
    if !behaviour.delay.is_zero() {
        tokio::time::sleep(behaviour.delay).await;
    }
    if path == TOKEN_PATH {
        return match (&behaviour.required_credentials, &credentials) {
            (Some(required), Some(sent)) if required == sent => {
                axum::Json(serde_json::json!({ "token": token_for(required) })).into_response()
            }
            (None, _) => axum::Json(serde_json::json!({ "token": "anonymous" })).into_response(),
            _ => StatusCode::UNAUTHORIZED.into_response(),
        };
    }
    if let Some(required) = &behaviour.required_credentials
        && bearer.as_deref() != Some(token_for(required).as_str())
    {
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|value| value.to_str().ok())
            .unwrap_or("127.0.0.1");
        let challenge =
            format!("Bearer realm=\"http://{host}{TOKEN_PATH}\",service=\"upstream-stub\"");
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, challenge)],
        )
            .into_response();
    }
    StatusCode::from_u16(behaviour.status)
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
        .into_response()
}
