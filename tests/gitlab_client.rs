//! The GitLab client over loopback HTTP: transport behaviour against small axum stubs.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::Query;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use gitlab_registry_operator::gitlab::{
    BulkTagDelete, ClientConfig, Error, GitLabClient, KeysetRequest, NewUpstream, PageRequest,
    PathOrId, RequestObserver, SortOrder, UpstreamCredentials,
};
use secrecy::SecretString;
use serde_json::json;

const TOKEN: &str = "glpat-test-token-do-not-leak";

async fn serve(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let address = listener.local_addr().expect("local address");
    tokio::spawn(async move {
        axum::serve(listener, router).await.expect("stub server");
    });
    address
}

fn config(address: SocketAddr) -> ClientConfig {
    let mut config = ClientConfig::new(
        format!("http://{address}").parse().expect("url"),
        SecretString::from(TOKEN),
    );
    config.retry_base_delay = Duration::from_millis(5);
    config.request_timeout = Duration::from_secs(20);
    config
}

fn client(config: ClientConfig) -> GitLabClient {
    GitLabClient::new(config).expect("client")
}

#[derive(Default)]
struct Recorder {
    calls: Mutex<Vec<(String, String, Option<u16>)>>,
}

impl RequestObserver for Recorder {
    fn observe(&self, method: &str, route: &str, status: Option<u16>, _latency: Duration) {
        self.calls
            .lock()
            .expect("recorder")
            .push((method.to_owned(), route.to_owned(), status));
    }
}

impl Recorder {
    fn statuses(&self) -> Vec<Option<u16>> {
        self.calls
            .lock()
            .expect("recorder")
            .iter()
            .map(|call| call.2)
            .collect()
    }
}

/// Answers `failures` times with `failure`, then with 200 `success`.
fn flaky(
    failures: usize,
    failure: fn() -> Response,
    success: serde_json::Value,
) -> (
    Arc<AtomicUsize>,
    impl Fn() -> Response + Clone + Send + Sync + 'static,
) {
    let attempts = Arc::new(AtomicUsize::new(0));
    let counter = attempts.clone();
    let handler = move || {
        let attempt = counter.fetch_add(1, Ordering::SeqCst);
        if attempt < failures {
            failure()
        } else {
            (StatusCode::OK, axum::Json(success.clone())).into_response()
        }
    };
    (attempts, handler)
}

fn registry_json(id: i64) -> serde_json::Value {
    json!({"id": id, "group_id": 5, "name": "cache", "description": "",
           "created_at": "2024-05-30T12:28:27.855Z", "updated_at": "2024-05-30T12:28:27.855Z"})
}

#[tokio::test]
async fn rate_limited_post_is_retried_after_retry_after() {
    let (attempts, handler) = flaky(
        2,
        || {
            (
                StatusCode::TOO_MANY_REQUESTS,
                [("Retry-After", "0")],
                "Retry later",
            )
                .into_response()
        },
        registry_json(1),
    );
    let router = Router::new().route(
        "/api/v4/groups/{group}/-/virtual_registries/container/registries",
        post(move || {
            let handler = handler.clone();
            async move { handler() }
        }),
    );
    let address = serve(router).await;
    let recorder = Arc::new(Recorder::default());
    let mut config = config(address);
    config.metrics = Some(recorder.clone());
    let registry = client(config)
        .create_registry(&PathOrId::parse("my-org"), "cache", None)
        .await
        .expect("created after 429s");
    assert_eq!(registry.id, 1);
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    assert_eq!(recorder.statuses(), vec![Some(429), Some(429), Some(200)]);
}

#[tokio::test]
async fn retry_after_beyond_the_bound_is_returned_to_the_caller() {
    let (attempts, handler) = flaky(
        usize::MAX,
        || {
            (
                StatusCode::TOO_MANY_REQUESTS,
                [("Retry-After", "3600")],
                axum::Json(json!({"message": {"error": "This endpoint has been requested too many times. Try again later."}})),
            )
                .into_response()
        },
        json!(null),
    );
    let router = Router::new().route(
        "/api/v4/virtual_registries/container/registries/{id}",
        get(move || {
            let handler = handler.clone();
            async move { handler() }
        }),
    );
    let address = serve(router).await;
    let error = client(config(address))
        .get_registry(1)
        .await
        .expect_err("rate limited");
    assert_eq!(error.retry_after(), Some(Duration::from_secs(3600)));
    assert_eq!(error.reason(), "RateLimited");
    assert_eq!(
        error.message(),
        "This endpoint has been requested too many times. Try again later."
    );
    assert_eq!(attempts.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn server_error_burst_is_retried_for_get() {
    let (attempts, handler) = flaky(
        3,
        || (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response(),
        registry_json(7),
    );
    let router = Router::new().route(
        "/api/v4/virtual_registries/container/registries/{id}",
        get(move || {
            let handler = handler.clone();
            async move { handler() }
        }),
    );
    let address = serve(router).await;
    let recorder = Arc::new(Recorder::default());
    let mut config = config(address);
    config.metrics = Some(recorder.clone());
    let registry = client(config).get_registry(7).await.expect("after retries");
    assert_eq!(registry.id, 7);
    assert_eq!(attempts.load(Ordering::SeqCst), 4);
    let calls = recorder.calls.lock().expect("recorder").clone();
    assert_eq!(calls.len(), 4);
    assert!(calls.iter().all(|(method, route, _)| method == "GET"
        && route == "/virtual_registries/container/registries/:id"));
}

#[tokio::test]
async fn retries_are_bounded() {
    let (attempts, handler) = flaky(
        usize::MAX,
        || (StatusCode::SERVICE_UNAVAILABLE, "down").into_response(),
        json!(null),
    );
    let router = Router::new().route(
        "/api/v4/virtual_registries/container/upstreams/{id}",
        any(move || {
            let handler = handler.clone();
            async move { handler() }
        }),
    );
    let address = serve(router).await;
    let mut config = config(address);
    config.max_retries = 2;
    let error = client(config).delete_upstream(3).await.expect_err("down");
    assert!(
        matches!(error, Error::Server { status: 503, .. }),
        "{error:?}"
    );
    assert!(error.is_transient());
    assert_eq!(error.reason(), "GitLabUnavailable");
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn post_is_not_retried_on_server_error() {
    let (attempts, handler) = flaky(
        usize::MAX,
        || (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response(),
        json!(null),
    );
    let router = Router::new().route(
        "/api/v4/virtual_registries/container/registries/{id}/upstreams",
        post(move || {
            let handler = handler.clone();
            async move { handler() }
        }),
    );
    let address = serve(router).await;
    let upstream = NewUpstream {
        name: "Docker Hub".into(),
        url: "https://registry-1.docker.io".into(),
        ..NewUpstream::default()
    };
    let error = client(config(address))
        .create_upstream(1, &upstream)
        .await
        .expect_err("500");
    assert!(matches!(error, Error::Server { status: 500, .. }));
    assert_eq!(attempts.load(Ordering::SeqCst), 1);

    // PATCH is not idempotent either.
    let router = Router::new().route(
        "/api/v4/virtual_registries/container/registry_upstreams/{id}",
        any(|| async { (StatusCode::BAD_GATEWAY, "bad gateway").into_response() }),
    );
    let address = serve(router).await;
    let recorder = Arc::new(Recorder::default());
    let mut config = config(address);
    config.metrics = Some(recorder.clone());
    let error = client(config)
        .reposition_association(1, 2)
        .await
        .expect_err("502");
    assert_eq!(error.status(), Some(502));
    assert_eq!(recorder.statuses(), vec![Some(502)]);
}

#[tokio::test]
async fn timeout_is_reported_as_timeout() {
    let router = Router::new().route(
        "/api/v4/virtual_registries/container/registries/{id}",
        get(|| async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            "late"
        }),
    );
    let address = serve(router).await;
    let recorder = Arc::new(Recorder::default());
    let mut config = config(address);
    config.request_timeout = Duration::from_millis(200);
    config.max_retries = 1;
    config.metrics = Some(recorder.clone());
    let error = client(config).get_registry(1).await.expect_err("timeout");
    assert!(matches!(error, Error::Timeout { .. }), "{error:?}");
    assert_eq!(error.reason(), "GitLabUnavailable");
    assert!(error.is_transient());
    // Idempotent: retried once, each attempt observed without a status.
    assert_eq!(recorder.statuses(), vec![None, None]);
}

#[tokio::test]
async fn connection_refused_is_a_network_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = listener.local_addr().expect("address");
    drop(listener);
    let mut config = config(address);
    config.max_retries = 1;
    let error = client(config)
        .list_registries(&PathOrId::Id(5))
        .await
        .expect_err("refused");
    assert!(matches!(error, Error::Network { .. }), "{error:?}");
    assert_eq!(error.reason(), "GitLabUnavailable");
}

fn offset_page(items: &[serde_json::Value], params: &HashMap<String, String>) -> Response {
    let page: usize = params.get("page").and_then(|p| p.parse().ok()).unwrap_or(1);
    let per_page: usize = params
        .get("per_page")
        .and_then(|p| p.parse().ok())
        .unwrap_or(20)
        .min(100);
    let total_pages = items.len().div_ceil(per_page).max(1);
    let slice: Vec<_> = items
        .iter()
        .skip((page - 1) * per_page)
        .take(per_page)
        .cloned()
        .collect();
    let next = if page < total_pages {
        (page + 1).to_string()
    } else {
        String::new()
    };
    (
        [
            ("x-total", items.len().to_string()),
            ("x-total-pages", total_pages.to_string()),
            ("x-page", page.to_string()),
            ("x-per-page", per_page.to_string()),
            ("x-next-page", next),
        ],
        axum::Json(slice),
    )
        .into_response()
}

#[tokio::test]
async fn offset_pagination_over_more_than_100_items_is_followed() {
    let upstreams: Vec<_> = (1..=250)
        .map(|id| json!({"id": id, "group_id": 5, "name": format!("up-{id}"),
                         "url": format!("https://registry{id}.example"), "cache_validity_hours": 24}))
        .collect();
    let requested_per_page = Arc::new(Mutex::new(Vec::new()));
    let seen = requested_per_page.clone();
    let router = Router::new().route(
        "/api/v4/groups/{group}/-/virtual_registries/container/upstreams",
        get(move |Query(params): Query<HashMap<String, String>>| {
            let upstreams = upstreams.clone();
            let seen = seen.clone();
            async move {
                seen.lock()
                    .expect("seen")
                    .push(params.get("per_page").cloned());
                offset_page(&upstreams, &params)
            }
        }),
    );
    let address = serve(router).await;
    let client = client(config(address));
    let all = client
        .list_group_upstreams_all(&PathOrId::parse("my-org"), None)
        .await
        .expect("all pages");
    assert_eq!(all.len(), 250);
    assert_eq!(all[249].name, "up-250");
    assert_eq!(
        requested_per_page.lock().expect("seen").clone(),
        vec![Some("100".to_owned()); 3]
    );

    let page = client
        .list_group_upstreams(&PathOrId::parse("my-org"), PageRequest::new(2, 20), None)
        .await
        .expect("page 2");
    assert_eq!(page.items.len(), 20);
    assert_eq!(page.items[0].id, 21);
    assert_eq!(page.next_page, Some(3));
    assert_eq!(page.total, Some(250));
    assert_eq!(page.total_pages, Some(13));
}

#[tokio::test]
async fn keyset_pagination_follows_link_next() {
    let names: Vec<String> = (0..230).map(|n| format!("v{n:04}")).collect();
    let router = Router::new().route(
        "/api/v4/projects/{project}/registry/repositories/{repository}/tags",
        get(
            move |uri: Uri, headers: HeaderMap, Query(params): Query<HashMap<String, String>>| {
                let names = names.clone();
                async move {
                    assert_eq!(params.get("pagination").map(String::as_str), Some("keyset"));
                    let per_page: usize = params
                        .get("per_page")
                        .and_then(|p| p.parse().ok())
                        .unwrap_or(20);
                    let start = params
                        .get("last")
                        .and_then(|last| names.iter().position(|name| name == last))
                        .map_or(0, |index| index + 1);
                    let page: Vec<_> = names
                        .iter()
                        .skip(start)
                        .take(per_page)
                        .map(|name| json!({"name": name, "path": format!("g/p:{name}"), "location": format!("reg/g/p:{name}")}))
                        .collect();
                    let host = headers
                        .get("host")
                        .and_then(|h| h.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    let mut response = axum::Json(page.clone()).into_response();
                    if start + per_page < names.len()
                        && let Some(last) = page.last().and_then(|tag| tag["name"].as_str())
                    {
                        let link = format!(
                            "<http://{host}{}?last={last}&pagination=keyset&per_page={per_page}&sort=asc>; rel=\"next\"",
                            uri.path()
                        );
                        response
                            .headers_mut()
                            .insert("link", link.parse().expect("link header"));
                    }
                    response
                }
            },
        ),
    );
    let address = serve(router).await;
    let client = client(config(address));
    let project = PathOrId::parse("my-org/app");
    let tags = client
        .list_tags_keyset_all(&project, 2, SortOrder::Asc)
        .await
        .expect("keyset");
    assert_eq!(tags.len(), 230);
    assert_eq!(tags[229].name, "v0229");

    let first = client
        .list_tags_keyset(
            &project,
            2,
            &KeysetRequest {
                per_page: Some(10),
                ..KeysetRequest::default()
            },
        )
        .await
        .expect("first page");
    assert_eq!(first.items.len(), 10);
    let next = first.next.expect("next link");
    let second = client.list_tags_keyset_next(&next).await.expect("second");
    assert_eq!(second.items[0].name, "v0010");
}

#[tokio::test]
async fn keyset_links_to_another_host_are_not_followed() {
    let router = Router::new().route(
        "/api/v4/projects/{project}/registry/repositories/{repository}/tags",
        get(|| async {
            (
                [(
                    "link",
                    "<http://attacker.invalid/api/v4/x?last=a>; rel=\"next\"",
                )],
                axum::Json(json!([{"name": "a", "path": "g/p:a", "location": "r/g/p:a"}])),
            )
        }),
    );
    let address = serve(router).await;
    let error = client(config(address))
        .list_tags_keyset_all(&PathOrId::Id(1), 2, SortOrder::Desc)
        .await
        .expect_err("foreign link");
    assert!(matches!(error, Error::Decode { .. }), "{error:?}");
}

#[tokio::test]
async fn paths_and_tag_names_are_encoded() {
    let raw_paths = Arc::new(Mutex::new(Vec::new()));
    let seen = raw_paths.clone();
    let router = Router::new().fallback(move |uri: Uri| {
        let seen = seen.clone();
        async move {
            seen.lock().expect("seen").push(uri.path().to_owned());
            StatusCode::NO_CONTENT
        }
    });
    let address = serve(router).await;
    let client = client(config(address));
    let project = PathOrId::parse("my-org/sub/app");
    client
        .delete_tag(&project, 3, "feature/x+y")
        .await
        .expect("delete tag");
    client
        .delete_cache_entry("MTUgbGlicmFyeS9uZ2lueA==")
        .await
        .expect("delete cache entry");
    assert_eq!(
        raw_paths.lock().expect("seen").clone(),
        vec![
            "/api/v4/projects/my-org%2Fsub%2Fapp/registry/repositories/3/tags/feature%2Fx%2By",
            "/api/v4/virtual_registries/container/cache_entries/MTUgbGlicmFyeS9uZ2lueA==",
        ]
    );
}

#[tokio::test]
async fn gitlab_error_bodies_become_typed_errors() {
    let router = Router::new()
        .route(
            "/api/v4/groups/{group}/-/virtual_registries/container/registries",
            post(|| async {
                (
                    StatusCode::BAD_REQUEST,
                    axum::Json(json!({"message": {"base": ["5 registries is the maximum allowed per top-level group."]}})),
                )
            })
            .get(|| async {
                (
                    StatusCode::NOT_FOUND,
                    axum::Json(json!({"message": "404 Group Not Found"})),
                )
            }),
        )
        .route(
            "/api/v4/projects/{project}/registry/repositories/{repository}/tags",
            any(|body: String| async move {
                // The bulk delete criteria arrive as a form body.
                assert!(body.contains("name_regex_delete=.*"), "{body}");
                assert!(body.contains("keep_n=5"), "{body}");
                (
                    StatusCode::BAD_REQUEST,
                    axum::Json(json!({"message": "This request has already been made. You can run this at most once an hour for a given container repository"})),
                )
            }),
        );
    let address = serve(router).await;
    let client = client(config(address));
    let group = PathOrId::parse("my-org");
    let error = client
        .create_registry(&group, "sixth", Some("x"))
        .await
        .expect_err("limit");
    assert_eq!(error.reason(), "LimitExceeded");
    assert_eq!(
        error.message(),
        "5 registries is the maximum allowed per top-level group."
    );
    let error = client.list_registries(&group).await.expect_err("404");
    assert_eq!(error.reason(), "NotFound");
    assert_eq!(error.message(), "404 Group Not Found");
    let error = client
        .bulk_delete_tags(
            &PathOrId::Id(9),
            1,
            &BulkTagDelete {
                name_regex_delete: ".*".into(),
                keep_n: Some(5),
                ..BulkTagDelete::default()
            },
        )
        .await
        .expect_err("hourly limit");
    assert_eq!(error.reason(), "LimitExceeded");
}

#[tokio::test]
async fn redirects_to_another_origin_do_not_carry_the_token() {
    let leaked = Arc::new(AtomicUsize::new(0));
    let counter = leaked.clone();
    let other = serve(Router::new().fallback(move |headers: HeaderMap| {
        let counter = counter.clone();
        async move {
            if headers.contains_key("private-token") {
                counter.fetch_add(1, Ordering::SeqCst);
            }
            axum::Json(json!([]))
        }
    }))
    .await;
    let router = Router::new().fallback(move || async move {
        (
            StatusCode::FOUND,
            [("location", format!("http://{other}/api/v4/elsewhere"))],
        )
    });
    let address = serve(router).await;
    let result = client(config(address))
        .list_registries(&PathOrId::Id(1))
        .await;
    assert!(result.is_err());
    assert_eq!(leaked.load(Ordering::SeqCst), 0);
}

/// Two clients of one host share one limiter: 6 requests at 20/s take at least 5 intervals.
/// Only a lower bound is asserted, which a slow machine cannot break.
#[tokio::test]
async fn clients_of_one_host_share_the_rate_limit() {
    let router = Router::new().fallback(|| async { axum::Json(json!([])) });
    let address = serve(router).await;
    let mut limited = config(address);
    limited.requests_per_second = Some(20.0);
    let first = client(limited.clone());
    let second = client(limited);
    let started = std::time::Instant::now();
    for _ in 0..3 {
        first
            .list_registries(&PathOrId::Id(1))
            .await
            .expect("first");
        second
            .list_registries(&PathOrId::Id(1))
            .await
            .expect("second");
    }
    assert!(started.elapsed() >= Duration::from_millis(250));
}

#[tokio::test]
async fn invalid_configuration_is_rejected() {
    let mut bad_ca = ClientConfig::new(
        "https://gitlab.example.com".parse().expect("url"),
        SecretString::from(TOKEN),
    );
    bad_ca.extra_ca_pem = Some(b"not a certificate".to_vec());
    let error = GitLabClient::new(bad_ca).expect_err("bad CA");
    assert!(matches!(error, Error::Config { .. }));

    let bad_scheme = ClientConfig::new(
        "ftp://gitlab.example.com".parse().expect("url"),
        SecretString::from(TOKEN),
    );
    assert!(GitLabClient::new(bad_scheme).is_err());

    let bad_token = ClientConfig::new(
        "https://gitlab.example.com".parse().expect("url"),
        SecretString::from("line\nbreak"),
    );
    let error = GitLabClient::new(bad_token).expect_err("bad token");
    assert!(!error.to_string().contains("line\nbreak"));
}

/// Collects everything every subscriber-visible event writes, at TRACE, process-wide.
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

#[tokio::test]
async fn token_and_passwords_never_appear_in_output() {
    let buffer = trace_buffer();
    const PASSWORD: &str = "upstream-password-do-not-leak";
    let tokens_seen = Arc::new(Mutex::new(Vec::new()));
    let seen = tokens_seen.clone();
    let router = Router::new()
        .route(
            "/api/v4/virtual_registries/container/registries/{id}/upstreams",
            post(move |headers: HeaderMap| {
                let seen = seen.clone();
                async move {
                    seen.lock().expect("seen").push(
                        headers
                            .get("private-token")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned(),
                    );
                    (
                        StatusCode::CREATED,
                        axum::Json(json!({"id": 1, "group_id": 5, "name": "hub",
                            "url": "https://registry-1.docker.io", "username": "bot",
                            "cache_validity_hours": 24,
                            "registry_upstream": {"id": 3, "registry_id": 1, "position": 1}})),
                    )
                }
            }),
        )
        .route(
            "/api/v4/virtual_registries/container/upstreams/{id}",
            any(|| async {
                (
                    StatusCode::UNAUTHORIZED,
                    axum::Json(json!({"message": "401 Unauthorized"})),
                )
            }),
        );
    let address = serve(router).await;
    let config = config(address);
    let client = client(config.clone());
    let credentials = UpstreamCredentials::new("bot", SecretString::from(PASSWORD));
    let upstream = NewUpstream {
        name: "hub".into(),
        url: "https://registry-1.docker.io".into(),
        credentials: Some(credentials.clone()),
        ..NewUpstream::default()
    };
    let created = client.create_upstream(1, &upstream).await.expect("created");
    assert_eq!(created.registry_upstream.map(|link| link.id), Some(3));
    assert_eq!(
        tokens_seen.lock().expect("seen").clone(),
        vec![TOKEN.to_owned()]
    );
    let error = client.get_upstream(1).await.expect_err("401");
    assert_eq!(error.reason(), "Unauthorized");

    let outputs = [
        format!("{config:?}"),
        format!("{client:?}"),
        format!("{error}"),
        format!("{error:?}"),
        format!("{upstream:?}"),
        format!("{credentials:?}"),
        String::from_utf8_lossy(&buffer.0.lock().expect("buffer")).into_owned(),
    ];
    let trace = outputs.last().expect("trace");
    assert!(
        trace.contains("/virtual_registries/container/registries/:id/upstreams"),
        "tracing captured the request: {trace}"
    );
    for output in &outputs {
        assert!(!output.contains(TOKEN), "token leaked: {output}");
        assert!(!output.contains(PASSWORD), "password leaked: {output}");
    }
}

// ---------------------------------------------------------------------------------------
// Every client method against the simulator over loopback.
// ---------------------------------------------------------------------------------------

mod against_simulator {
    use std::collections::BTreeSet;

    use gitlab_registry_operator::gitlab::{
        ContainerExpirationPolicyUpdate, RegistryUpdate, RepositoryDetailsRequest,
        RepositoryListRequest, UpstreamTestOverrides, UpstreamUpdate,
    };
    use gitlab_registry_operator::sim::upstream_stub::{StubBehaviour, UpstreamStub};
    use gitlab_registry_operator::sim::{
        FaultAction, FaultSpec, OneShotFault, Seed, SimConfig, SimHandle, Simulator,
    };

    use super::*;

    const SIM_TOKEN: &str = "sim-client-token";
    const GROUP_ID: i64 = 10;
    const PROJECT_ID: i64 = 20;
    const BIG_REPOSITORY: i64 = 30;
    const SMALL_REPOSITORY: i64 = 31;
    const CACHED_UPSTREAM: i64 = 500;
    const SEEDED_UPSTREAMS: usize = 120;
    const CACHE_ENTRIES: usize = 130;
    const BIG_TAGS: usize = 230;

    fn seed() -> Seed {
        let big_tags: Vec<_> = (0..BIG_TAGS)
            .map(|n| {
                json!({"name": format!("v{n:04}"),
                       "digest": format!("sha256:{n:064x}"),
                       "created_at": format!("2024-01-01T00:{:02}:{:02}Z", n / 60, n % 60),
                       "total_size": 1000 + n})
            })
            .collect();
        let mut upstreams: Vec<_> = (1..SEEDED_UPSTREAMS)
            .map(|n| {
                json!({"group": "acme", "name": format!("mirror-{n:03}"),
                       "url": format!("https://mirror{n}.example.com")})
            })
            .collect();
        let cache_entries: Vec<_> = (0..CACHE_ENTRIES)
            .map(|n| {
                json!({"relative_path": format!("library/image{n:03}/manifests/latest"),
                       "size": 2048, "downloads_count": n})
            })
            .collect();
        upstreams.push(
            json!({"id": CACHED_UPSTREAM, "group": "acme", "name": "cached",
            "url": "https://cached.example.com", "registries": ["seeded"],
            "cache_entries": cache_entries}),
        );
        let seed = json!({
            "groups": [{"id": GROUP_ID, "full_path": "acme"}],
            "projects": [
                {"id": PROJECT_ID, "path_with_namespace": "acme/app",
                 "repositories": [
                    {"id": BIG_REPOSITORY, "name": "", "tags": big_tags},
                    {"id": SMALL_REPOSITORY, "name": "tools", "tags": [
                        {"name": "latest", "digest": "sha256:aa", "created_at": "2024-01-01T00:00:00Z"},
                        {"name": "release-1", "digest": "sha256:bb", "created_at": "2024-01-01T00:00:00Z"},
                        {"name": "feature/x", "digest": "sha256:cc", "created_at": "2024-01-01T00:00:00Z"}
                    ]}
                 ],
                 "tag_protection_rules": [
                    {"tag_name_pattern": "release-.*", "minimum_access_level_for_delete": "owner"}
                 ]},
                {"id": 21, "path_with_namespace": "acme/other",
                 "repositories": [{"id": 32, "name": "", "tags": []}]}
            ],
            "registries": [{"group": "acme", "name": "seeded"}],
            "upstreams": upstreams
        });
        Seed::parse(&seed.to_string()).expect("seed")
    }

    async fn start() -> SimHandle {
        let config = SimConfig {
            allow_local_network: true,
            ..SimConfig::with_token(SIM_TOKEN)
        };
        Simulator::start(config, seed()).await.expect("simulator")
    }

    fn sim_client(sim: &SimHandle, recorder: Option<Arc<Recorder>>) -> GitLabClient {
        let mut config = ClientConfig::new(
            sim.base_url().parse().expect("url"),
            SecretString::from(SIM_TOKEN),
        );
        config.retry_base_delay = Duration::from_millis(5);
        config.metrics = recorder.map(|recorder| recorder as Arc<dyn RequestObserver>);
        GitLabClient::new(config).expect("client")
    }

    /// Our route templates are exactly the simulator's (which follow GitLab's routes).
    fn assert_routes_match(sim: &SimHandle, recorder: &Recorder) {
        let ours: BTreeSet<String> = recorder
            .calls
            .lock()
            .expect("recorder")
            .iter()
            .map(|(method, route, _)| format!("{method} {route}"))
            .collect();
        let theirs: BTreeSet<String> = sim.request_counts().keys().cloned().collect();
        assert_eq!(ours, theirs);
    }

    #[tokio::test]
    async fn registries_upstreams_and_associations() {
        let sim = start().await;
        let recorder = Arc::new(Recorder::default());
        let client = sim_client(&sim, Some(recorder.clone()));
        let group = PathOrId::parse("acme");
        let stub = UpstreamStub::start(StubBehaviour::requiring("bot", "pw"))
            .await
            .expect("stub");
        let good = UpstreamCredentials::new("bot", SecretString::from("pw"));
        let bad = UpstreamCredentials::new("bot", SecretString::from("wrong"));

        let registries = client.list_registries(&group).await.expect("list");
        assert_eq!(registries.len(), 1);
        assert_eq!(registries[0].name, "seeded");
        let seeded_id = registries[0].id;

        let created = client
            .create_registry(&PathOrId::Id(GROUP_ID), "docker-cache", Some("cache"))
            .await
            .expect("create registry");
        assert_eq!(created.group_id, GROUP_ID);
        assert_eq!(created.description.as_deref(), Some("cache"));
        let duplicate = client
            .create_registry(&group, "docker-cache", None)
            .await
            .expect_err("duplicate");
        assert!(duplicate.is_already_taken("name"), "{duplicate:?}");
        assert_eq!(duplicate.message(), "name has already been taken");

        client
            .update_registry(
                created.id,
                &RegistryUpdate {
                    description: Some("pull-through cache".into()),
                    ..RegistryUpdate::default()
                },
            )
            .await
            .expect("update registry");
        let empty_update = client
            .update_registry(created.id, &RegistryUpdate::default())
            .await
            .expect_err("nothing to update");
        assert_eq!(empty_update.reason(), "InvalidSpec");

        // Connection tests before create.
        let ok = client
            .test_upstream_connection(&group, &stub.url(), Some(&good))
            .await
            .expect("test");
        assert!(ok.success, "{ok:?}");
        let denied = client
            .test_upstream_connection(&group, &stub.url(), Some(&bad))
            .await
            .expect("test");
        assert!(!denied.success);
        assert_eq!(denied.result.as_deref(), Some("Error: 401 - Unauthorized"));

        let upstream = client
            .create_upstream(
                created.id,
                &NewUpstream {
                    name: "stub".into(),
                    url: stub.url(),
                    description: Some("loopback".into()),
                    cache_validity_hours: Some(48),
                    credentials: Some(good.clone()),
                },
            )
            .await
            .expect("create upstream");
        assert_eq!(upstream.username.as_deref(), Some("bot"));
        assert_eq!(upstream.cache_validity_hours, 48);
        let first_link = upstream.registry_upstream.clone().expect("association");
        assert_eq!(first_link.position, 1);

        let existing = client
            .test_existing_upstream(upstream.id, &UpstreamTestOverrides::default())
            .await
            .expect("test existing");
        assert!(existing.success, "{existing:?}");
        let override_failure = client
            .test_existing_upstream(
                upstream.id,
                &UpstreamTestOverrides {
                    url: None,
                    credentials: Some(bad.clone()),
                },
            )
            .await
            .expect("test override");
        assert!(!override_failure.success);

        client
            .update_upstream(
                upstream.id,
                &UpstreamUpdate {
                    description: Some("changed".into()),
                    cache_validity_hours: Some(0),
                    ..UpstreamUpdate::default()
                },
            )
            .await
            .expect("update upstream");
        let fetched = client
            .get_upstream(upstream.id)
            .await
            .expect("get upstream");
        assert_eq!(fetched.description.as_deref(), Some("changed"));
        assert_eq!(fetched.cache_validity_hours, 0);
        assert_eq!(fetched.registry_upstreams.len(), 1);
        assert_eq!(fetched.registry_upstreams[0].registry_id, Some(created.id));

        // Second association: the seeded upstream gets position 2, then moves to 1.
        let association = client
            .associate_upstream(created.id, CACHED_UPSTREAM)
            .await
            .expect("associate");
        assert_eq!(association.position, 2);
        assert_eq!(association.upstream_id, Some(CACHED_UPSTREAM));
        let again = client
            .associate_upstream(created.id, CACHED_UPSTREAM)
            .await
            .expect_err("already associated");
        assert!(again.is_already_taken("upstream_id"), "{again:?}");
        client
            .reposition_association(association.id, 1)
            .await
            .expect("reposition");
        let registry = client.get_registry(created.id).await.expect("get registry");
        assert_eq!(registry.description.as_deref(), Some("pull-through cache"));
        let mut order: Vec<_> = registry
            .registry_upstreams
            .iter()
            .map(|link| (link.position, link.upstream_id))
            .collect();
        order.sort();
        assert_eq!(
            order,
            vec![(1, Some(CACHED_UPSTREAM)), (2, Some(upstream.id))]
        );
        let listed = client
            .list_registry_upstreams(created.id)
            .await
            .expect("registry upstreams");
        assert_eq!(listed.len(), 2);
        assert!(listed.iter().all(|item| item.registry_upstream.is_some()));

        client
            .delete_association(association.id)
            .await
            .expect("disassociate");
        assert_eq!(
            client
                .get_upstream(CACHED_UPSTREAM)
                .await
                .expect("survives")
                .registry_upstreams
                .len(),
            1
        );
        client
            .purge_registry_cache(created.id)
            .await
            .expect("purge registry cache");
        client
            .purge_upstream_cache(upstream.id)
            .await
            .expect("purge upstream cache");
        client
            .delete_upstream(upstream.id)
            .await
            .expect("delete upstream");
        let gone = client.get_upstream(upstream.id).await.expect_err("deleted");
        assert!(gone.is_not_found());
        client
            .delete_registry(created.id)
            .await
            .expect("delete registry");
        assert!(
            client
                .get_registry(created.id)
                .await
                .expect_err("gone")
                .is_not_found()
        );

        // Five registries per group.
        for n in 0..4 {
            client
                .create_registry(&group, &format!("extra-{n}"), None)
                .await
                .expect("up to five");
        }
        let sixth = client
            .create_registry(&group, "sixth", None)
            .await
            .expect_err("limit");
        assert_eq!(sixth.reason(), "LimitExceeded");
        assert_eq!(
            sixth.message(),
            "5 registries is the maximum allowed per top-level group."
        );
        assert!(client.get_registry(seeded_id).await.is_ok());
        assert_routes_match(&sim, &recorder);
    }

    #[tokio::test]
    async fn upstream_and_cache_entry_pagination() {
        let sim = start().await;
        let recorder = Arc::new(Recorder::default());
        let client = sim_client(&sim, Some(recorder.clone()));
        let group = PathOrId::parse("acme");

        let all = client
            .list_group_upstreams_all(&group, None)
            .await
            .expect("all upstreams");
        assert_eq!(all.len(), SEEDED_UPSTREAMS);
        let ids: BTreeSet<_> = all.iter().map(|upstream| upstream.id).collect();
        assert_eq!(ids.len(), SEEDED_UPSTREAMS);
        let page = client
            .list_group_upstreams(&PathOrId::Id(GROUP_ID), PageRequest::new(2, 50), None)
            .await
            .expect("page");
        assert_eq!(page.items.len(), 50);
        assert_eq!(page.page, Some(2));
        assert_eq!(page.next_page, Some(3));
        assert_eq!(page.total, Some(SEEDED_UPSTREAMS as u64));
        let filtered = client
            .list_group_upstreams_all(&group, Some("mirror-01"))
            .await
            .expect("filtered");
        assert!(!filtered.is_empty());
        assert!(
            filtered
                .iter()
                .all(|upstream| upstream.name.contains("mirror-01"))
        );

        let entries = client
            .list_cache_entries_all(CACHED_UPSTREAM, None)
            .await
            .expect("all entries");
        assert_eq!(entries.len(), CACHE_ENTRIES);
        // GitLab lists them newest first: the last cached comes first.
        let paths: Vec<&str> = entries
            .iter()
            .map(|entry| entry.relative_path.as_str())
            .collect();
        let newest_first: Vec<String> = (0..CACHE_ENTRIES)
            .rev()
            .map(|n| format!("library/image{n:03}/manifests/latest"))
            .collect();
        assert_eq!(paths, newest_first);
        let malformed = client
            .delete_cache_entry("not-an-entry-id")
            .await
            .expect_err("malformed id");
        assert_eq!(malformed.status(), Some(400), "{malformed}");
        let case_insensitive = client
            .list_cache_entries_all(CACHED_UPSTREAM, Some("LIBRARY/IMAGE007"))
            .await
            .expect("search");
        assert_eq!(case_insensitive.len(), 1);
        let first_page = client
            .list_cache_entries(CACHED_UPSTREAM, PageRequest::default(), None)
            .await
            .expect("default page");
        assert_eq!(first_page.items.len(), 20);
        let searched = client
            .list_cache_entries(
                CACHED_UPSTREAM,
                PageRequest::new(1, 100),
                Some("library/image007"),
            )
            .await
            .expect("search");
        assert_eq!(searched.items.len(), 1);
        let target = &searched.items[0];
        assert_eq!(target.relative_path, "library/image007/manifests/latest");
        client
            .delete_cache_entry(&target.id)
            .await
            .expect("delete cache entry");
        let remaining = client
            .list_cache_entries_all(CACHED_UPSTREAM, None)
            .await
            .expect("remaining");
        assert_eq!(remaining.len(), CACHE_ENTRIES - 1);
        assert!(remaining.iter().all(|entry| entry.id != target.id));
        assert_routes_match(&sim, &recorder);
    }

    #[tokio::test]
    async fn container_repositories_tags_and_policies() {
        let sim = start().await;
        let recorder = Arc::new(Recorder::default());
        let client = sim_client(&sim, Some(recorder.clone()));
        let project = PathOrId::parse("acme/app");

        let repositories = client
            .list_project_repositories(
                &project,
                &RepositoryListRequest {
                    tags_count: true,
                    ..RepositoryListRequest::default()
                },
            )
            .await
            .expect("project repositories");
        assert_eq!(repositories.items.len(), 2);
        let big = repositories
            .items
            .iter()
            .find(|repository| repository.id == BIG_REPOSITORY)
            .expect("big repository");
        assert_eq!(big.tags_count, Some(BIG_TAGS as i64));
        let all_project = client
            .list_project_repositories_all(
                &PathOrId::Id(PROJECT_ID),
                &RepositoryListRequest::default(),
            )
            .await
            .expect("all project repositories");
        assert_eq!(all_project.len(), 2);
        let group_page = client
            .list_group_repositories(&PathOrId::parse("acme"), PageRequest::new(1, 2))
            .await
            .expect("group page");
        assert_eq!(group_page.items.len(), 2);
        let all_group = client
            .list_group_repositories_all(&PathOrId::parse("acme"))
            .await
            .expect("group repositories");
        assert_eq!(all_group.len(), 3);

        let details = client
            .get_repository(
                SMALL_REPOSITORY,
                &RepositoryDetailsRequest {
                    tags: true,
                    tags_count: true,
                    size: true,
                },
            )
            .await
            .expect("repository details");
        assert_eq!(details.tags_count, Some(3));
        assert_eq!(details.tags.as_ref().map(Vec::len), Some(3));
        assert_eq!(details.path, "acme/app/tools");

        // Offset pagination over 230 tags.
        let offset_all = client
            .list_tags_all(&project, BIG_REPOSITORY)
            .await
            .expect("offset tags");
        assert_eq!(offset_all.len(), BIG_TAGS);
        let page = client
            .list_tags(&project, BIG_REPOSITORY, PageRequest::new(3, 100))
            .await
            .expect("tags page 3");
        assert_eq!(page.items.len(), BIG_TAGS - 200);
        assert_eq!(page.next_page, None);

        // Keyset pagination, both orders, following Link rel="next".
        let ascending = client
            .list_tags_keyset_all(&project, BIG_REPOSITORY, SortOrder::Asc)
            .await
            .expect("keyset asc");
        let names: Vec<_> = ascending.iter().map(|tag| tag.name.clone()).collect();
        let expected: Vec<_> = (0..BIG_TAGS).map(|n| format!("v{n:04}")).collect();
        assert_eq!(names, expected);
        let descending = client
            .list_tags_keyset_all(&project, BIG_REPOSITORY, SortOrder::Desc)
            .await
            .expect("keyset desc");
        assert_eq!(descending.len(), BIG_TAGS);
        assert_eq!(descending[0].name, "v0229");
        let first = client
            .list_tags_keyset(
                &project,
                BIG_REPOSITORY,
                &KeysetRequest {
                    per_page: Some(7),
                    sort: Some(SortOrder::Asc),
                    last: Some("v0100".into()),
                },
            )
            .await
            .expect("keyset page");
        assert_eq!(first.items[0].name, "v0101");
        let second = client
            .list_tags_keyset_next(first.next.as_ref().expect("next link"))
            .await
            .expect("next page");
        assert_eq!(second.items[0].name, "v0108");

        let tag = client
            .get_tag(&project, BIG_REPOSITORY, "v0005")
            .await
            .expect("tag details");
        assert_eq!(
            tag.digest.as_deref(),
            Some(format!("sha256:{:064x}", 5).as_str())
        );
        assert_eq!(
            tag.created_at,
            Some("2024-01-01T00:00:05Z".parse().expect("timestamp"))
        );
        let slashed = client
            .get_tag(&project, SMALL_REPOSITORY, "feature/x")
            .await
            .expect("tag with a slash");
        assert_eq!(slashed.name, "feature/x");
        let missing = client
            .get_tag(&project, BIG_REPOSITORY, "nope")
            .await
            .expect_err("missing tag");
        assert_eq!(missing.message(), "404 Tag Not Found");

        client
            .delete_tag(&project, SMALL_REPOSITORY, "feature/x")
            .await
            .expect("delete tag");
        let protected = client
            .delete_tag(&project, SMALL_REPOSITORY, "release-1")
            .await
            .expect_err("protected");
        assert_eq!(protected.reason(), "Forbidden");
        // GitLab's policy refuses a protected tag before the delete service runs: the plain
        // 403, not the service's "- cannot delete protected tag(s)".
        assert_eq!(protected.message(), "403 Forbidden");
        let rules = client
            .list_tag_protection_rules(&project)
            .await
            .expect("rules");
        assert_eq!(rules.len(), 1);
        assert_eq!(rules[0].tag_name_pattern, "release-.*");
        assert_eq!(
            rules[0].minimum_access_level_for_delete.as_deref(),
            Some("owner")
        );

        let criteria = BulkTagDelete {
            name_regex_delete: "v0.*".into(),
            name_regex_keep: Some("v00.*".into()),
            keep_n: Some(5),
            older_than: Some("1d".into()),
        };
        client
            .bulk_delete_tags(&project, BIG_REPOSITORY, &criteria)
            .await
            .expect("bulk delete accepted");
        let remaining = client
            .list_tags_keyset_all(&project, BIG_REPOSITORY, SortOrder::Asc)
            .await
            .expect("after bulk delete");
        assert!(remaining.len() < BIG_TAGS, "bulk delete removed tags");
        assert!(
            remaining.iter().any(|tag| tag.name == "v0001"),
            "kept by regex"
        );
        let hourly = client
            .bulk_delete_tags(&project, BIG_REPOSITORY, &criteria)
            .await
            .expect_err("once an hour");
        assert_eq!(hourly.reason(), "LimitExceeded");
        let bad_regex = client
            .bulk_delete_tags(
                &project,
                SMALL_REPOSITORY,
                &BulkTagDelete {
                    name_regex_delete: "(".into(),
                    ..BulkTagDelete::default()
                },
            )
            .await
            .expect_err("invalid regex");
        assert_eq!(bad_regex.reason(), "InvalidSpec");
        assert!(
            bad_regex
                .message()
                .starts_with("name_regex_delete is an invalid regexp")
        );

        // GitLab-run cleanup policy.
        let project_view = client.get_project(&project).await.expect("project");
        assert_eq!(project_view.id, PROJECT_ID);
        let before = client.get_cleanup_policy(&project).await.expect("policy");
        assert!(
            before.as_ref().is_none_or(|policy| !policy.enabled),
            "{before:?}"
        );
        let updated = client
            .update_cleanup_policy(
                &PathOrId::Id(PROJECT_ID),
                &ContainerExpirationPolicyUpdate {
                    cadence: Some("7d".into()),
                    enabled: Some(true),
                    keep_n: Some(Some(10)),
                    older_than: Some(Some("14d".into())),
                    name_regex: Some(".*".into()),
                    name_regex_keep: Some("main|stable-.*".into()),
                },
            )
            .await
            .expect("update policy")
            .expect("policy in answer");
        assert!(updated.enabled);
        assert_eq!(updated.cadence, "7d");
        assert_eq!(updated.keep_n, Some(10));
        assert!(updated.next_run_at.is_some());
        let read_back = client
            .get_cleanup_policy(&project)
            .await
            .expect("policy")
            .expect("present");
        assert_eq!(read_back.name_regex_keep.as_deref(), Some("main|stable-.*"));
        let invalid = client
            .update_cleanup_policy(
                &project,
                &ContainerExpirationPolicyUpdate {
                    cadence: Some("2d".into()),
                    ..ContainerExpirationPolicyUpdate::default()
                },
            )
            .await
            .expect_err("bad cadence");
        assert_eq!(invalid.reason(), "InvalidSpec");
        assert_routes_match(&sim, &recorder);
    }

    #[tokio::test]
    async fn auth_errors_and_injected_faults() {
        let sim = start().await;
        let mut wrong = ClientConfig::new(
            sim.base_url().parse().expect("url"),
            SecretString::from("not-the-token"),
        );
        wrong.max_retries = 0;
        let error = GitLabClient::new(wrong)
            .expect("client")
            .list_registries(&PathOrId::parse("acme"))
            .await
            .expect_err("401");
        assert_eq!(error.reason(), "Unauthorized");
        assert_eq!(error.message(), "401 Unauthorized");

        let client = sim_client(&sim, None);
        let missing = client
            .list_registries(&PathOrId::parse("nope"))
            .await
            .expect_err("404");
        assert_eq!(missing.message(), "404 Group Not Found");

        sim.reset_request_counts();
        let route = "/groups/:id/-/virtual_registries/container/registries";
        sim.inject_fault(FaultSpec {
            once: vec![OneShotFault {
                count: 2,
                method: Some("GET".into()),
                route: Some(route.into()),
                fault: FaultAction::Status { status: 503 },
            }],
            ..FaultSpec::default()
        });
        let registries = client
            .list_registries(&PathOrId::parse("acme"))
            .await
            .expect("retried past two 503s");
        assert_eq!(registries.len(), 1);
        assert_eq!(sim.request_count("GET", route), 3);

        sim.inject_fault(FaultSpec {
            once: vec![OneShotFault {
                count: 1,
                method: Some("POST".into()),
                route: Some(route.into()),
                fault: FaultAction::RateLimited {
                    retry_after_seconds: 0,
                },
            }],
            ..FaultSpec::default()
        });
        client
            .create_registry(&PathOrId::parse("acme"), "after-429", None)
            .await
            .expect("POST retried after 429");
        assert_eq!(sim.request_count("POST", route), 2);

        sim.inject_fault(FaultSpec {
            once: vec![OneShotFault {
                count: 1,
                method: Some("POST".into()),
                route: Some(route.into()),
                fault: FaultAction::Status { status: 500 },
            }],
            ..FaultSpec::default()
        });
        let error = client
            .create_registry(&PathOrId::parse("acme"), "after-500", None)
            .await
            .expect_err("POST not retried on 500");
        assert_eq!(error.status(), Some(500));
        assert_eq!(sim.request_count("POST", route), 3);

        sim.inject_fault(FaultSpec {
            once: vec![OneShotFault {
                count: 1,
                method: Some("GET".into()),
                route: Some("/virtual_registries/container/upstreams/:id".into()),
                fault: FaultAction::EndpointRateLimited,
            }],
            ..FaultSpec::default()
        });
        let mut impatient = ClientConfig::new(
            sim.base_url().parse().expect("url"),
            SecretString::from(SIM_TOKEN),
        );
        impatient.max_retry_after = Duration::from_secs(1);
        let error = GitLabClient::new(impatient)
            .expect("client")
            .get_upstream(CACHED_UPSTREAM)
            .await
            .expect_err("Retry-After 60 is above the 1 s bound");
        assert_eq!(error.reason(), "RateLimited");
        assert_eq!(error.retry_after(), Some(Duration::from_secs(60)));
        assert_eq!(
            error.message(),
            "This endpoint has been requested too many times. Try again later."
        );
    }
}
