//! Upstream connection tests, as GitLab's `Upstream#test` runs them: a `HEAD` to
//! `<url without trailing / and /v2>/v2/<path>` (path `library/alpine/manifests/latest` for a
//! new upstream, the first cached path for an existing one), redirects followed. Credentials
//! never go to the registry itself: only a `401` with a `WWW-Authenticate: Bearer realm=…,
//! service=…` challenge makes GitLab ask the realm for a token with Basic credentials, and
//! the test `HEAD` is sent again with `Authorization: Bearer <token>`. The answer is mapped to
//! `{"success": true}` (2xx or 404) or `{"success": false, "result": "Error: <code> - <reason
//! phrase>"}` / `"Error: <transport message>"`. In stub mode no network is used: the answer is
//! derived from the url (see [`stub_outcome`]).

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;

/// The path GitLab probes for a new upstream (or one with nothing cached).
pub const NEW_UPSTREAM_TEST_PATH: &str = "library/alpine/manifests/latest";

/// The `Accept` header of GitLab's registry requests (manifest media types).
const REGISTRY_ACCEPT: &str = "application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json";

/// What a connection test checks.
#[derive(Debug, Clone)]
pub struct ProbeTarget {
    pub url: String,
    pub username: Option<String>,
    pub password: Option<SecretString>,
    /// Path below `/v2/`: a cached relative path, or [`NEW_UPSTREAM_TEST_PATH`].
    pub path: String,
}

impl ProbeTarget {
    /// GitLab's `url_for(path)`: the url without a trailing `/` and `/v2`, then `/v2/<path>`.
    pub fn probe_url(&self) -> String {
        let base = self.url.trim_end_matches('/');
        let base = base.strip_suffix("/v2").unwrap_or(base);
        format!("{base}/v2/{}", self.path.trim_start_matches('/'))
    }

    /// The repository the probed path belongs to (`library/alpine` of
    /// `library/alpine/manifests/latest`), for the token scope.
    fn repository(&self) -> &str {
        let path = self.path.trim_start_matches('/');
        ["/manifests/", "/blobs/", "/tags/"]
            .iter()
            .find_map(|marker| path.find(marker).map(|index| &path[..index]))
            .unwrap_or(path)
    }

    fn credentials(&self) -> Option<(&str, &str)> {
        match (&self.username, &self.password) {
            (Some(username), Some(password)) => Some((username, password.expose_secret())),
            _ => None,
        }
    }
}

/// The body of a connection test answer.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TestOutcome {
    pub success: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
}

impl TestOutcome {
    pub fn success() -> Self {
        Self {
            success: true,
            result: None,
        }
    }

    pub fn failure(result: impl Into<String>) -> Self {
        Self {
            success: false,
            result: Some(result.into()),
        }
    }

    /// GitLab's mapping of the upstream's status: 2xx and 404 succeed, anything else is
    /// `Error: <code> - <reason phrase>`.
    pub fn from_status(status: u16) -> Self {
        match status {
            200..=299 | 404 => Self::success(),
            other => {
                let reason = reqwest::StatusCode::from_u16(other)
                    .ok()
                    .and_then(|code| code.canonical_reason())
                    .unwrap_or("Unknown");
                Self::failure(format!("Error: {other} - {reason}"))
            }
        }
    }
}

/// Builds the client used for connection tests (`timeout` bounds each test).
pub fn http_client(timeout: Duration) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .user_agent("GitLab-Simulator/virtual-registry-connection-test")
        .build()
}

fn registry_head(client: &reqwest::Client, url: &str) -> reqwest::RequestBuilder {
    client
        .head(url)
        .header(reqwest::header::ACCEPT, REGISTRY_ACCEPT)
}

/// Sends the test `HEAD` (anonymously; with a Bearer token when the registry challenges
/// and credentials are given) and maps the answer.
pub async fn probe(client: &reqwest::Client, target: &ProbeTarget) -> TestOutcome {
    let url = target.probe_url();
    let response = match registry_head(client, &url).send().await {
        Ok(response) => response,
        Err(error) => return network_failure(&error),
    };
    if response.status() == reqwest::StatusCode::UNAUTHORIZED
        && target.credentials().is_some()
        && let Some(challenge) = bearer_challenge(&response)
    {
        return match fetch_token(client, target, &challenge).await {
            Ok(Some(token)) => match registry_head(client, &url).bearer_auth(token).send().await {
                Ok(retried) => TestOutcome::from_status(retried.status().as_u16()),
                Err(error) => network_failure(&error),
            },
            Ok(None) => TestOutcome::from_status(401),
            Err(outcome) => outcome,
        };
    }
    TestOutcome::from_status(response.status().as_u16())
}

fn network_failure(error: &reqwest::Error) -> TestOutcome {
    if error.is_timeout() {
        return TestOutcome::failure("Error: Connection timeout");
    }
    let mut message = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(inner) = source {
        message = inner.to_string();
        source = inner.source();
    }
    if message.to_ascii_lowercase().contains("timed out") {
        return TestOutcome::failure("Error: Connection timeout");
    }
    TestOutcome::failure(format!("Error: {message}"))
}

#[derive(Debug, PartialEq)]
struct BearerChallenge {
    realm: String,
    service: Option<String>,
}

fn bearer_challenge(response: &reqwest::Response) -> Option<BearerChallenge> {
    let header = response
        .headers()
        .get(reqwest::header::WWW_AUTHENTICATE)?
        .to_str()
        .ok()?;
    parse_bearer_challenge(header)
}

fn parse_bearer_challenge(header: &str) -> Option<BearerChallenge> {
    let rest = header.trim();
    let (scheme, parameters) = rest.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut realm = None;
    let mut service = None;
    for part in split_parameters(parameters) {
        let Some((key, value)) = part.split_once('=') else {
            continue;
        };
        let value = value.trim().trim_matches('"').to_owned();
        match key.trim().to_ascii_lowercase().as_str() {
            "realm" => realm = Some(value),
            "service" => service = Some(value),
            _ => {}
        }
    }
    Some(BearerChallenge {
        realm: realm?,
        service,
    })
}

/// Splits `a="x,y",b=z` on commas outside quotes.
fn split_parameters(text: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for character in text.chars() {
        match character {
            '"' => {
                quoted = !quoted;
                current.push(character);
            }
            ',' if !quoted => parts.push(std::mem::take(&mut current)),
            _ => current.push(character),
        }
    }
    parts.push(current);
    parts
}

/// Asks the challenge's realm for a pull token of the probed repository, with the
/// credentials as Basic auth. A realm that refuses maps like a registry answer (INFERRED).
async fn fetch_token(
    client: &reqwest::Client,
    target: &ProbeTarget,
    challenge: &BearerChallenge,
) -> Result<Option<String>, TestOutcome> {
    let scope = format!("repository:{}:pull", target.repository());
    let mut query = vec![("scope", scope.as_str())];
    if let Some(service) = &challenge.service {
        query.insert(0, ("service", service.as_str()));
    }
    let mut request = client.get(&challenge.realm).query(&query);
    if let Some((username, password)) = target.credentials() {
        request = request.basic_auth(username, Some(password));
    }
    let response = request
        .send()
        .await
        .map_err(|error| network_failure(&error))?;
    if !response.status().is_success() {
        return Err(TestOutcome::from_status(response.status().as_u16()));
    }
    let body: serde_json::Value = response
        .json()
        .await
        .map_err(|error| network_failure(&error))?;
    Ok(body
        .get("token")
        .or_else(|| body.get("access_token"))
        .and_then(|token| token.as_str())
        .map(str::to_owned))
}

/// The built-in stub registry's answer (no network). Decided from the url's host and path,
/// lower-cased: containing `unauthorized` → 401; `forbidden` → 403; `server-error` or
/// `unavailable` → 503; `timeout` or `unreachable` → connection timeout; `private` without
/// credentials → 401; anything else succeeds.
pub fn stub_outcome(target: &ProbeTarget) -> TestOutcome {
    let text = url::Url::parse(&target.url)
        .map(|parsed| format!("{}{}", parsed.host_str().unwrap_or_default(), parsed.path()))
        .unwrap_or_else(|_| target.url.clone())
        .to_ascii_lowercase();
    if text.contains("unauthorized") {
        TestOutcome::from_status(401)
    } else if text.contains("forbidden") {
        TestOutcome::from_status(403)
    } else if text.contains("server-error") || text.contains("unavailable") {
        TestOutcome::from_status(503)
    } else if text.contains("timeout") || text.contains("unreachable") {
        TestOutcome::failure("Error: Connection timeout")
    } else if text.contains("private") && target.credentials().is_none() {
        TestOutcome::from_status(401)
    } else {
        TestOutcome::success()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(url: &str) -> ProbeTarget {
        ProbeTarget {
            url: url.into(),
            username: None,
            password: None,
            path: String::new(),
        }
    }

    #[test]
    fn status_mapping_follows_the_documented_table() {
        assert_eq!(TestOutcome::from_status(200), TestOutcome::success());
        assert_eq!(TestOutcome::from_status(404), TestOutcome::success());
        assert_eq!(
            TestOutcome::from_status(401).result.as_deref(),
            Some("Error: 401 - Unauthorized")
        );
        assert_eq!(
            TestOutcome::from_status(403).result.as_deref(),
            Some("Error: 403 - Forbidden")
        );
        assert_eq!(
            TestOutcome::from_status(503).result.as_deref(),
            Some("Error: 503 - Service Unavailable")
        );
        assert_eq!(
            TestOutcome::from_status(500).result.as_deref(),
            Some("Error: 500 - Internal Server Error")
        );
        assert_eq!(
            TestOutcome::from_status(429).result.as_deref(),
            Some("Error: 429 - Too Many Requests")
        );
        assert_eq!(
            serde_json::to_value(TestOutcome::success()).unwrap(),
            serde_json::json!({"success": true})
        );
    }

    #[test]
    fn stub_answers_from_the_url() {
        assert!(stub_outcome(&target("https://registry-1.docker.io")).success);
        assert_eq!(
            stub_outcome(&target("https://unauthorized.example.com")).result,
            Some("Error: 401 - Unauthorized".into())
        );
        assert_eq!(
            stub_outcome(&target("https://example.com/timeout")).result,
            Some("Error: Connection timeout".into())
        );
        let private = target("https://private.example.com");
        assert!(!stub_outcome(&private).success);
        let with_credentials = ProbeTarget {
            username: Some("u".into()),
            password: Some("p".into()),
            ..private
        };
        assert!(stub_outcome(&with_credentials).success);
    }

    #[test]
    fn probe_urls_drop_a_trailing_v2() {
        let probe = |url: &str, path: &str| {
            ProbeTarget {
                path: path.into(),
                ..target(url)
            }
            .probe_url()
        };
        assert_eq!(
            probe("https://registry-1.docker.io", NEW_UPSTREAM_TEST_PATH),
            "https://registry-1.docker.io/v2/library/alpine/manifests/latest"
        );
        assert_eq!(
            probe("https://quay.io/v2/", "/org/app/manifests/1"),
            "https://quay.io/v2/org/app/manifests/1"
        );
        assert_eq!(
            probe("https://example.com/mirror/v2", "a/blobs/sha256:x"),
            "https://example.com/mirror/v2/a/blobs/sha256:x"
        );
        let target = ProbeTarget {
            path: "org/team/app/manifests/latest".into(),
            ..target("https://x.io")
        };
        assert_eq!(target.repository(), "org/team/app");
    }

    #[test]
    fn bearer_challenges_parse() {
        let challenge = parse_bearer_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull,push""#,
        )
        .unwrap();
        assert_eq!(challenge.realm, "https://auth.docker.io/token");
        assert_eq!(challenge.service.as_deref(), Some("registry.docker.io"));
        assert_eq!(parse_bearer_challenge(r#"Basic realm="x""#), None);
    }
}
