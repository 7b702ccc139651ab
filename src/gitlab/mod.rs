//! Typed GitLab REST client: authentication, pagination, retries, rate limiting, typed errors.
//!
//! Owns every HTTP exchange with GitLab's `/api/v4`: the reconcile engines (`sync`), cleanup
//! runs and standalone `apply`/`plan` call the typed methods of [`GitLabClient`] and get typed
//! models ([`model`]) or a typed [`Error`] carrying GitLab's own message and a stable condition
//! reason. The token lives in a [`SecretString`] and is exposed only to build the
//! `PRIVATE-TOKEN` header (marked sensitive); nothing here logs tokens, passwords or bodies.

mod api;
pub mod error;
mod limiter;
pub mod model;
pub mod path;
mod transport;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;
use url::Url;

pub use error::{Error, Result};
pub use model::*;
pub use path::{GroupRef, PathOrId, ProjectRef};
pub use transport::parse_link_next;

/// Receives one call per HTTP attempt, for metrics. `route_template` is the API route with
/// placeholders (`/virtual_registries/container/upstreams/:id`), never raw ids or paths, so
/// label cardinality stays bounded. `status` is `None` when no answer came (timeout, network).
pub trait RequestObserver: Send + Sync {
    fn observe(&self, method: &str, route_template: &str, status: Option<u16>, latency: Duration);
}

/// How to reach GitLab and how hard to try.
#[derive(Clone)]
pub struct ClientConfig {
    /// GitLab root (`https://gitlab.example.com`, or with a relative root); `/api/v4` is appended.
    pub base_url: Url,
    pub token: SecretString,
    /// Per HTTP attempt, connection and body included.
    pub request_timeout: Duration,
    /// Retries after the first attempt (so at most `max_retries + 1` attempts).
    pub max_retries: u32,
    /// First backoff delay; doubled per retry, jittered, capped at [`MAX_BACKOFF`].
    pub retry_base_delay: Duration,
    /// Longest `Retry-After` waited for inside a call; a longer one is returned to the caller
    /// as [`Error::RateLimited`] with the delay, so it can requeue instead of blocking.
    pub max_retry_after: Duration,
    /// Client-side request rate, shared by every client of the same GitLab host (the lowest
    /// configured rate wins). `None`: no client-side limit.
    pub requests_per_second: Option<f64>,
    /// Extra PEM CA certificates trusted besides the built-in roots (self-managed GitLab).
    pub extra_ca_pem: Option<Vec<u8>>,
    pub metrics: Option<Arc<dyn RequestObserver>>,
}

/// Upper bound of one backoff delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

impl ClientConfig {
    /// A configuration with the defaults: 30 s timeout, 4 retries from 500 ms, `Retry-After`
    /// honoured up to 5 minutes, no client-side limit, built-in CA roots, no metrics.
    pub fn new(base_url: Url, token: SecretString) -> Self {
        Self {
            base_url,
            token,
            request_timeout: Duration::from_secs(30),
            max_retries: 4,
            retry_base_delay: Duration::from_millis(500),
            max_retry_after: Duration::from_secs(300),
            requests_per_second: None,
            extra_ca_pem: None,
            metrics: None,
        }
    }
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("ClientConfig")
            .field("base_url", &self.base_url.as_str())
            .field("token", &"[REDACTED]")
            .field("request_timeout", &self.request_timeout)
            .field("max_retries", &self.max_retries)
            .field("retry_base_delay", &self.retry_base_delay)
            .field("max_retry_after", &self.max_retry_after)
            .field("requests_per_second", &self.requests_per_second)
            .field(
                "extra_ca_pem",
                &self
                    .extra_ca_pem
                    .as_ref()
                    .map(|pem| format!("{} bytes", pem.len())),
            )
            .field("metrics", &self.metrics.is_some())
            .finish()
    }
}

/// The GitLab REST client. Cheap to clone (shared connection pool, limiter and settings).
#[derive(Clone)]
pub struct GitLabClient {
    inner: Arc<transport::Transport>,
}

impl GitLabClient {
    pub fn new(config: ClientConfig) -> Result<Self> {
        Ok(Self {
            inner: Arc::new(transport::Transport::new(config)?),
        })
    }

    /// The GitLab root this client talks to (as configured, without `/api/v4`).
    pub fn base_url(&self) -> &Url {
        self.inner.base_url()
    }

    /// `host[:port]` of the GitLab root, as used in pull prefixes
    /// (`<host>/virtual_registries/container/<id>`).
    pub fn host_with_port(&self) -> String {
        self.inner.host_key()
    }

    /// What `docker login` / `docker pull` use for a virtual registry:
    /// `<host>/virtual_registries/container/<registry_id>`.
    pub fn pull_prefix(&self, registry_id: i64) -> String {
        format!(
            "{}/virtual_registries/container/{registry_id}",
            self.host_with_port()
        )
    }
}

impl fmt::Debug for GitLabClient {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("GitLabClient")
            .field("config", self.inner.config())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_for(url: &str) -> GitLabClient {
        GitLabClient::new(ClientConfig::new(
            url.parse().expect("url"),
            SecretString::from("token-value"),
        ))
        .expect("client")
    }

    #[test]
    fn pull_prefix_uses_host_and_explicit_port() {
        assert_eq!(
            client_for("https://gitlab.example.com").pull_prefix(3),
            "gitlab.example.com/virtual_registries/container/3"
        );
        assert_eq!(
            client_for("http://127.0.0.1:8929/gitlab/").pull_prefix(12),
            "127.0.0.1:8929/virtual_registries/container/12"
        );
    }

    #[test]
    fn debug_redacts_the_token() {
        let client = client_for("https://gitlab.example.com");
        let output = format!("{client:?}");
        assert!(!output.contains("token-value"), "{output}");
        assert!(output.contains("[REDACTED]"));
    }
}
