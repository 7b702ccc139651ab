//! One HTTP exchange with GitLab, with auth, limiter, retries, observation and pagination.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap, HeaderValue, RETRY_AFTER};
use reqwest::{Method, StatusCode};
use secrecy::ExposeSecret;
use serde::de::DeserializeOwned;
use url::Url;

use super::ClientConfig;
use super::error::{Error, Result};
use super::limiter::{RateLimiter, limiter_for};
use super::model::{KeysetPage, Page};

const TOKEN_HEADER: &str = "PRIVATE-TOKEN";
/// Guard against a server whose pagination headers never end.
const MAX_PAGES: u32 = 100_000;
/// GitLab's largest `per_page`.
pub(crate) const MAX_PER_PAGE: u32 = 100;

/// A request body, encoded once and re-sent unchanged on retries. Never logged.
pub(crate) enum RequestBody {
    Json(Vec<u8>),
    Form(String),
}

impl RequestBody {
    pub(crate) fn json(value: &impl serde::Serialize) -> Result<Self> {
        serde_json::to_vec(value)
            .map(Self::Json)
            .map_err(|error| Error::Config {
                message: format!("cannot encode request body: {error}"),
            })
    }

    pub(crate) fn form(pairs: &[(String, String)]) -> Self {
        let mut serializer = url::form_urlencoded::Serializer::new(String::new());
        for (key, value) in pairs {
            serializer.append_pair(key, value);
        }
        Self::Form(serializer.finish())
    }
}

/// Where a request goes: a path under `/api/v4` (already percent-encoded), or an absolute URL
/// GitLab handed out (keyset `Link`), checked to be on the configured GitLab.
pub(crate) enum Target {
    Path(String),
    Url(Url),
}

/// One API call, before retries.
pub(crate) struct Call {
    pub method: Method,
    /// Route template for metrics and logs (`/projects/:id/registry/repositories`).
    pub route: &'static str,
    pub target: Target,
    pub query: Vec<(&'static str, String)>,
    pub body: Option<RequestBody>,
}

impl Call {
    pub(crate) fn new(method: Method, route: &'static str, path: String) -> Self {
        Self {
            method,
            route,
            target: Target::Path(path),
            query: Vec::new(),
            body: None,
        }
    }

    pub(crate) fn query(mut self, key: &'static str, value: impl ToString) -> Self {
        self.query.push((key, value.to_string()));
        self
    }

    pub(crate) fn query_opt(self, key: &'static str, value: Option<impl ToString>) -> Self {
        match value {
            Some(value) => self.query(key, value),
            None => self,
        }
    }

    pub(crate) fn body(mut self, body: RequestBody) -> Self {
        self.body = Some(body);
        self
    }
}

/// A successful answer.
pub(crate) struct RawResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

/// A failed attempt, and whether the request surely never reached GitLab.
struct AttemptFailure {
    error: Error,
    not_sent: bool,
}

pub(crate) struct Transport {
    config: ClientConfig,
    http: reqwest::Client,
    api_root: String,
    host_key: String,
    limiter: Option<Arc<RateLimiter>>,
}

impl Transport {
    pub(crate) fn new(config: ClientConfig) -> Result<Self> {
        let base = &config.base_url;
        if !matches!(base.scheme(), "http" | "https") || base.host_str().is_none() {
            return Err(Error::Config {
                message: format!("GitLab URL must be http(s)://host[/path], got {base}"),
            });
        }
        if base.query().is_some() || base.fragment().is_some() {
            return Err(Error::Config {
                message: "GitLab URL must not have a query or fragment".into(),
            });
        }
        // Checked once here so that building the header per request cannot fail later.
        token_header(&config)?;
        let api_root = format!("{}/api/v4", base.as_str().trim_end_matches('/'));
        let limiter_key = format!(
            "{}:{}",
            base.host_str().unwrap_or_default(),
            base.port_or_known_default().unwrap_or_default()
        );
        let host_key = match base.port() {
            Some(port) => format!("{}:{port}", base.host_str().unwrap_or_default()),
            None => base.host_str().unwrap_or_default().to_owned(),
        };
        let limiter = limiter_for(&limiter_key, config.requests_per_second);
        let http = build_http_client(&config)?;
        Ok(Self {
            config,
            http,
            api_root,
            host_key,
            limiter,
        })
    }

    pub(crate) fn config(&self) -> &ClientConfig {
        &self.config
    }

    pub(crate) fn base_url(&self) -> &Url {
        &self.config.base_url
    }

    pub(crate) fn host_key(&self) -> String {
        self.host_key.clone()
    }

    fn url_for(&self, call: &Call) -> Result<Url> {
        let mut url = match &call.target {
            Target::Path(path) => {
                Url::parse(&format!("{}{path}", self.api_root)).map_err(|error| Error::Config {
                    message: format!("cannot build request URL: {error}"),
                })?
            }
            Target::Url(url) => {
                self.check_same_origin(url, call.route)?;
                url.clone()
            }
        };
        if !call.query.is_empty() {
            let mut pairs = url.query_pairs_mut();
            for (key, value) in &call.query {
                pairs.append_pair(key, value);
            }
        }
        Ok(url)
    }

    /// The token goes only to the configured GitLab: links elsewhere are refused.
    fn check_same_origin(&self, url: &Url, route: &str) -> Result<()> {
        let base = &self.config.base_url;
        let same = url.scheme() == base.scheme()
            && url.host_str() == base.host_str()
            && url.port_or_known_default() == base.port_or_known_default()
            && url.path().starts_with(&format!("{}/", self.api_path()));
        if same {
            Ok(())
        } else {
            Err(Error::Decode {
                route: route.to_owned(),
                message: format!("pagination link outside the GitLab API not followed: {url}"),
            })
        }
    }

    fn api_path(&self) -> String {
        format!(
            "{}/api/v4",
            self.config.base_url.path().trim_end_matches('/')
        )
    }

    /// Sends the call with retries; `Ok` only for 2xx answers.
    pub(crate) async fn execute(&self, call: &Call) -> Result<RawResponse> {
        let url = self.url_for(call)?;
        let idempotent = matches!(
            call.method,
            Method::GET | Method::PUT | Method::DELETE | Method::HEAD
        );
        let method = call.method.as_str();
        let mut retries = 0u32;
        loop {
            if let Some(limiter) = &self.limiter {
                limiter.acquire().await;
            }
            let started = Instant::now();
            let outcome = self.attempt(call, &url).await;
            let latency = started.elapsed();
            let status = match &outcome {
                Ok(response) => Some(response.status.as_u16()),
                Err(failure) => failure.error.status(),
            };
            if let Some(observer) = &self.config.metrics {
                observer.observe(method, call.route, status, latency);
            }
            tracing::debug!(
                method,
                route = call.route,
                status,
                latency_ms = latency.as_millis() as u64,
                attempt = retries + 1,
                "GitLab request"
            );
            let failure = match outcome {
                Ok(response) => return Ok(response),
                Err(failure) => failure,
            };
            let delay = self.retry_delay(&failure, idempotent, retries);
            match delay {
                Some(delay) if retries < self.config.max_retries => {
                    retries += 1;
                    tracing::debug!(
                        method,
                        route = call.route,
                        retry = retries,
                        delay_ms = delay.as_millis() as u64,
                        reason = failure.error.reason(),
                        "retrying GitLab request"
                    );
                    tokio::time::sleep(delay).await;
                }
                _ => return Err(failure.error),
            }
        }
    }

    /// `None`: do not retry. 429 is retried for every method (GitLab did not execute it);
    /// 5xx, timeouts and network errors only for idempotent methods, or when the request
    /// surely never left (connection refused).
    fn retry_delay(
        &self,
        failure: &AttemptFailure,
        idempotent: bool,
        retries: u32,
    ) -> Option<Duration> {
        match &failure.error {
            Error::RateLimited { retry_after, .. } => match retry_after {
                Some(delay) if *delay > self.config.max_retry_after => None,
                Some(delay) => Some(*delay),
                None => Some(self.backoff(retries)),
            },
            Error::Server { .. } | Error::Timeout { .. } | Error::Network { .. }
                if idempotent || failure.not_sent =>
            {
                Some(self.backoff(retries))
            }
            _ => None,
        }
    }

    /// Exponential backoff with jitter: uniformly in `[d/2, d]` where `d = base · 2^retries`.
    fn backoff(&self, retries: u32) -> Duration {
        let factor = 2u32.saturating_pow(retries.min(20));
        let ceiling = self
            .config
            .retry_base_delay
            .saturating_mul(factor)
            .min(super::MAX_BACKOFF);
        let ceiling_ms = ceiling.as_millis() as u64;
        if ceiling_ms < 2 {
            return ceiling;
        }
        Duration::from_millis(rand::rng().random_range(ceiling_ms / 2..=ceiling_ms))
    }

    async fn attempt(&self, call: &Call, url: &Url) -> Result<RawResponse, AttemptFailure> {
        let mut request = self
            .http
            .request(call.method.clone(), url.clone())
            .header(ACCEPT, "application/json");
        // Validated in `new`; a failure here still never panics.
        match token_header(&self.config) {
            Ok(token) => request = request.header(TOKEN_HEADER, token),
            Err(error) => {
                return Err(AttemptFailure {
                    error,
                    not_sent: true,
                });
            }
        }
        match &call.body {
            Some(RequestBody::Json(bytes)) => {
                request = request
                    .header(CONTENT_TYPE, "application/json")
                    .body(bytes.clone());
            }
            Some(RequestBody::Form(text)) => {
                request = request
                    .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                    .body(text.clone());
            }
            None => {}
        }
        let response = request
            .send()
            .await
            .map_err(|error| self.transport_failure(call, &error))?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response
            .bytes()
            .await
            .map_err(|error| self.transport_failure(call, &error))?
            .to_vec();
        tracing::trace!(
            method = call.method.as_str(),
            route = call.route,
            status = status.as_u16(),
            body_bytes = body.len(),
            "GitLab response received"
        );
        if status.is_success() {
            return Ok(RawResponse {
                status,
                headers,
                body,
            });
        }
        let retry_after = headers
            .get(RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .and_then(parse_retry_after);
        Err(AttemptFailure {
            error: Error::from_response(status.as_u16(), retry_after, &body),
            not_sent: false,
        })
    }

    fn transport_failure(&self, call: &Call, error: &reqwest::Error) -> AttemptFailure {
        if error.is_timeout() {
            return AttemptFailure {
                error: Error::Timeout {
                    method: call.method.as_str().to_owned(),
                    route: call.route.to_owned(),
                },
                not_sent: false,
            };
        }
        AttemptFailure {
            error: Error::Network {
                message: error_chain(error),
            },
            not_sent: error.is_connect(),
        }
    }

    /// Sends and decodes a JSON answer.
    pub(crate) async fn json<T: DeserializeOwned>(&self, call: Call) -> Result<T> {
        let response = self.execute(&call).await?;
        decode(call.route, &response.body)
    }

    /// Sends and ignores the answer body (204, 202, or a PATCH's 200).
    pub(crate) async fn empty(&self, call: Call) -> Result<()> {
        self.execute(&call).await.map(|_| ())
    }

    /// One page of an offset-paginated list.
    pub(crate) async fn page<T: DeserializeOwned>(&self, call: Call) -> Result<Page<T>> {
        let response = self.execute(&call).await?;
        let items = decode(call.route, &response.body)?;
        let header = |name: &str| {
            response
                .headers
                .get(name)
                .and_then(|value| value.to_str().ok())
                .map(str::trim)
                .filter(|value| !value.is_empty())
                .map(str::to_owned)
        };
        Ok(Page {
            items,
            page: header("x-page").and_then(|value| value.parse().ok()),
            per_page: header("x-per-page").and_then(|value| value.parse().ok()),
            next_page: header("x-next-page").and_then(|value| value.parse().ok()),
            total: header("x-total").and_then(|value| value.parse().ok()),
            total_pages: header("x-total-pages").and_then(|value| value.parse().ok()),
        })
    }

    /// Every item of an offset-paginated list, 100 per page, following `x-next-page`.
    /// `make_call` builds the call for a page number.
    pub(crate) async fn all_pages<T: DeserializeOwned>(
        &self,
        make_call: impl Fn(u32) -> Call,
    ) -> Result<Vec<T>> {
        let mut items = Vec::new();
        let mut page_number = 1u32;
        for _ in 0..MAX_PAGES {
            let page: Page<T> = self.page(make_call(page_number)).await?;
            let received = page.items.len();
            items.extend(page.items);
            let next = page.next_page.or_else(|| {
                // Without x-next-page (GitLab omits it past 10,000 items), use x-total-pages.
                page.total_pages
                    .filter(|total| page_number < *total)
                    .map(|_| page_number + 1)
            });
            match next {
                Some(next) if next > page_number && received > 0 => page_number = next,
                _ => break,
            }
        }
        Ok(items)
    }

    /// One page of a keyset-paginated list.
    pub(crate) async fn keyset_page<T: DeserializeOwned>(
        &self,
        call: Call,
    ) -> Result<KeysetPage<T>> {
        let response = self.execute(&call).await?;
        let items = decode(call.route, &response.body)?;
        let request_url = self.url_for(&call)?;
        let next = response
            .headers
            .get_all(reqwest::header::LINK)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .find_map(parse_link_next)
            .and_then(|link| request_url.join(&link).ok());
        Ok(KeysetPage { items, next })
    }

    /// The call that fetches the page behind a keyset `next` link.
    pub(crate) fn link_call(route: &'static str, next: Url) -> Call {
        Call {
            method: Method::GET,
            route,
            target: Target::Url(next),
            query: Vec::new(),
            body: None,
        }
    }
}

fn token_header(config: &ClientConfig) -> Result<HeaderValue> {
    let mut value =
        HeaderValue::from_str(config.token.expose_secret()).map_err(|_| Error::Config {
            message: "the GitLab token contains characters not allowed in an HTTP header".into(),
        })?;
    value.set_sensitive(true);
    Ok(value)
}

fn build_http_client(config: &ClientConfig) -> Result<reqwest::Client> {
    let origin = config.base_url.origin();
    let mut builder = reqwest::Client::builder()
        .timeout(config.request_timeout)
        .user_agent(concat!(
            env!("CARGO_PKG_NAME"),
            "/",
            env!("CARGO_PKG_VERSION")
        ))
        // reqwest strips standard auth headers on cross-host redirects, not PRIVATE-TOKEN:
        // follow redirects only within the configured GitLab.
        .redirect(reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= 5 || attempt.url().origin() != origin {
                attempt.stop()
            } else {
                attempt.follow()
            }
        }));
    if let Some(pem) = &config.extra_ca_pem {
        let certificates =
            reqwest::Certificate::from_pem_bundle(pem).map_err(|error| Error::Config {
                message: format!("cannot read the extra CA bundle: {error}"),
            })?;
        if certificates.is_empty() {
            return Err(Error::Config {
                message: "the extra CA bundle holds no PEM certificate".into(),
            });
        }
        for certificate in certificates {
            builder = builder.add_root_certificate(certificate);
        }
    }
    builder.build().map_err(|error| Error::Config {
        message: format!("cannot build the HTTP client: {}", error_chain(&error)),
    })
}

fn decode<T: DeserializeOwned>(route: &str, body: &[u8]) -> Result<T> {
    // An empty 2xx body reads as JSON null, so `()`/Option targets still decode.
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"null"
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|error| Error::Decode {
        route: route.to_owned(),
        message: error.to_string(),
    })
}

/// The error and its causes (reqwest's top-level message alone says little).
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

/// `Retry-After`: delay in seconds, or an HTTP date.
pub(crate) fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when = jiff::fmt::rfc2822::parse(value).ok()?.timestamp();
    let delay = when.duration_since(jiff::Timestamp::now());
    Some(Duration::try_from(delay).unwrap_or(Duration::ZERO))
}

/// The `rel="next"` target of an RFC 8288 `Link` header value, as written (maybe relative).
pub fn parse_link_next(header: &str) -> Option<String> {
    let mut rest = header;
    while let Some(open) = rest.find('<') {
        let after_open = &rest[open + 1..];
        let close = after_open.find('>')?;
        let target = &after_open[..close];
        let params_and_more = &after_open[close + 1..];
        let params_end = params_and_more.find('<').unwrap_or(params_and_more.len());
        let params = &params_and_more[..params_end];
        let is_next = params.split(';').any(|param| {
            let Some((key, value)) = param.split_once('=') else {
                return false;
            };
            key.trim().eq_ignore_ascii_case("rel")
                && value
                    .trim()
                    .trim_end_matches(',')
                    .trim()
                    .trim_matches('"')
                    .split_ascii_whitespace()
                    .any(|relation| relation.eq_ignore_ascii_case("next"))
        });
        if is_next {
            return Some(target.to_owned());
        }
        rest = params_and_more;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_next_is_found_among_others() {
        let header = r#"<https://gitlab.example.com/api/v4/projects/5/registry/repositories/2/tags?last=b&pagination=keyset&per_page=2&sort=asc>; rel="next", <https://gitlab.example.com/api/v4/projects/5/registry/repositories/2/tags?pagination=keyset&per_page=2>; rel="first""#;
        assert_eq!(
            parse_link_next(header).as_deref(),
            Some(
                "https://gitlab.example.com/api/v4/projects/5/registry/repositories/2/tags?last=b&pagination=keyset&per_page=2&sort=asc"
            )
        );
        let first_listed_last =
            r#"<https://a/first>; rel="first", <https://a/next?x=1,2>; rel="next""#;
        assert_eq!(
            parse_link_next(first_listed_last).as_deref(),
            Some("https://a/next?x=1,2")
        );
    }

    #[test]
    fn link_variants() {
        assert_eq!(
            parse_link_next("<https://a/n>; rel=next").as_deref(),
            Some("https://a/n")
        );
        assert_eq!(
            parse_link_next(r#"<https://a/n>; title="x"; rel="prev next""#).as_deref(),
            Some("https://a/n")
        );
        assert_eq!(
            parse_link_next(r#"</api/v4/x?page=2>; REL="Next""#).as_deref(),
            Some("/api/v4/x?page=2")
        );
        assert_eq!(parse_link_next(r#"<https://a/p>; rel="prev""#), None);
        assert_eq!(parse_link_next(""), None);
        assert_eq!(parse_link_next("<broken"), None);
        assert_eq!(
            parse_link_next(r#"<https://a/nextpage>; rel="nextish""#),
            None
        );
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        assert_eq!(parse_retry_after("60"), Some(Duration::from_secs(60)));
        assert_eq!(parse_retry_after(" 0 "), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        let in_a_while = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(3600);
        let header = jiff::fmt::rfc2822::to_string(&in_a_while.to_zoned(jiff::tz::TimeZone::UTC))
            .expect("date");
        let parsed = parse_retry_after(&header).expect("parsed");
        assert!(parsed > Duration::from_secs(3000) && parsed <= Duration::from_secs(3600));
        assert_eq!(parse_retry_after("soon"), None);
    }
}
