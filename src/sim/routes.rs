//! The simulator's HTTP surface: the GitLab API under `/api/v4` (authentication, parameter
//! validation the way Grape reports it, pagination headers, request counting and fault
//! injection around every route) and the control endpoints under `/-/sim/`.

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, FromRequestParts, Path, Request, State as AxumState};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header, request::Parts};
use axum::middleware::{Next, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, delete, get, patch, post, put};
use jiff::{SignedDuration, Timestamp};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value, json};

use super::Shared;
use super::connection::{NEW_UPSTREAM_TEST_PATH, ProbeTarget, TestOutcome, probe, stub_outcome};
use super::faults::{FaultAction, FaultSpec};
use super::seed::Seed;
use super::state::{
    AccessLevel, ApiError, ApiResult, BulkDelete, NewUpstream, Tag, UpstreamChanges,
    ValidationErrors, url_problems,
};
use super::views::{self, RepositoryExtras};

type App = Arc<Shared>;

/// Prefix of every GitLab API route.
pub const API_PREFIX: &str = "/api/v4";
const DEFAULT_PER_PAGE: i64 = 20;
/// The single tag route, as counted.
const TAG_ROUTE: &str = "/projects/:id/registry/repositories/:repository_id/tags/:tag_name";
const MAX_PER_PAGE: i64 = 100;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        json_response(self.status, self.body)
    }
}

fn json_response(status: u16, body: Value) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, axum::Json(body)).into_response()
}

/// Grape's answer when an endpoint ends with `status :ok` / `status :accepted`: the status
/// code itself is the (not meaningful) JSON body.
fn status_body(status: u16) -> Response {
    json_response(status, json!(status))
}

fn no_content() -> Response {
    StatusCode::NO_CONTENT.into_response()
}

// ---- request parameters ----------------------------------------------------------------

/// Grape-style merged parameters: the query string, then a JSON or form body on top.
pub struct Params(Map<String, Value>);

impl<S: Send + Sync> FromRequest<S> for Params {
    type Rejection = Response;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let mut values = Map::new();
        if let Some(query) = request.uri().query() {
            for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
                values.insert(key.into_owned(), Value::String(value.into_owned()));
            }
        }
        let content_type = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_ascii_lowercase();
        let body = Bytes::from_request(request, state)
            .await
            .map_err(IntoResponse::into_response)?;
        let looks_like_json = body.iter().find(|byte| !byte.is_ascii_whitespace()) == Some(&b'{');
        if body.iter().all(u8::is_ascii_whitespace) {
            // No body.
        } else if content_type.contains("json")
            || (!content_type.contains("x-www-form-urlencoded") && looks_like_json)
        {
            match serde_json::from_slice::<Value>(&body) {
                Ok(Value::Object(object)) => values.extend(object),
                _ => {
                    return Err(ApiError::bad_request("400 Bad request - Invalid JSON body")
                        .into_response());
                }
            }
        } else {
            for (key, value) in url::form_urlencoded::parse(&body) {
                values.insert(key.into_owned(), Value::String(value.into_owned()));
            }
        }
        Ok(Self(values))
    }
}

impl Params {
    fn present(&self, name: &str) -> bool {
        self.0.get(name).is_some_and(|value| !value.is_null())
    }

    fn object(&self, name: &str) -> Option<&Map<String, Value>> {
        self.0.get(name).and_then(Value::as_object)
    }
}

/// Collects Grape validation messages in declaration order; `finish` joins them.
struct Check<'a> {
    params: &'a Params,
    errors: Vec<String>,
}

impl<'a> Check<'a> {
    fn new(params: &'a Params) -> Self {
        Self {
            params,
            errors: Vec::new(),
        }
    }

    fn string(&mut self, name: &str, required: bool, allow_blank: bool) -> Option<String> {
        match self.params.0.get(name) {
            None | Some(Value::Null) => {
                if required {
                    self.errors.push(format!("{name} is missing"));
                }
                None
            }
            Some(Value::String(text)) => {
                if !allow_blank && text.trim().is_empty() {
                    self.errors.push(format!("{name} is empty"));
                    None
                } else {
                    Some(text.clone())
                }
            }
            Some(Value::Number(number)) => Some(number.to_string()),
            Some(Value::Bool(flag)) => Some(flag.to_string()),
            Some(_) => {
                self.errors.push(format!("{name} is invalid"));
                None
            }
        }
    }

    fn required_string(&mut self, name: &str) -> Option<String> {
        self.string(name, true, false)
    }

    fn optional_string(&mut self, name: &str) -> Option<String> {
        self.string(name, false, true)
    }

    fn integer(&mut self, name: &str, required: bool) -> Option<i64> {
        let parsed = match self.params.0.get(name) {
            None | Some(Value::Null) => {
                if required {
                    self.errors.push(format!("{name} is missing"));
                }
                return None;
            }
            Some(Value::Number(number)) => number.as_i64(),
            Some(Value::String(text)) => text.trim().parse().ok(),
            Some(_) => None,
        };
        if parsed.is_none() {
            self.errors.push(format!("{name} is invalid"));
        }
        parsed
    }

    fn boolean(&mut self, name: &str) -> bool {
        match self.params.0.get(name) {
            None | Some(Value::Null) => false,
            Some(Value::Bool(flag)) => *flag,
            Some(Value::String(text)) if matches!(text.as_str(), "true" | "1") => true,
            Some(Value::String(text)) if matches!(text.as_str(), "false" | "0") => false,
            Some(_) => {
                self.errors.push(format!("{name} is invalid"));
                false
            }
        }
    }

    fn all_or_none(&mut self, names: &[&str]) {
        let present = names
            .iter()
            .filter(|name| self.params.present(name))
            .count();
        if present != 0 && present != names.len() {
            self.errors.push(format!(
                "{} provide all or none of parameters",
                names.join(", ")
            ));
        }
    }

    fn at_least_one(&mut self, names: &[&str]) {
        if !names.iter().any(|name| self.params.present(name)) {
            self.errors.push(format!(
                "{} are missing, at least one parameter must be provided",
                names.join(", ")
            ));
        }
    }

    fn finish(self) -> ApiResult<()> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(ApiError::parameter(self.errors.join(", ")))
        }
    }
}

fn integer_id(raw: &str, name: &str) -> ApiResult<u64> {
    raw.parse()
        .map_err(|_| ApiError::parameter(format!("{name} is invalid")))
}

// ---- request url and pagination --------------------------------------------------------

/// The request's absolute url (from `Host`), used to build `Link` headers.
pub struct RequestUrl {
    /// `http://host`.
    origin: String,
    /// Origin and path, without the query.
    base: String,
    query: Vec<(String, String)>,
}

impl<S: Send + Sync> FromRequestParts<S> for RequestUrl {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let host = parts
            .headers
            .get(header::HOST)
            .and_then(|value| value.to_str().ok())
            .unwrap_or("localhost");
        let query = parts
            .uri
            .query()
            .map(|query| {
                url::form_urlencoded::parse(query.as_bytes())
                    .into_owned()
                    .collect()
            })
            .unwrap_or_default();
        let origin = format!("http://{host}");
        Ok(Self {
            base: format!("{origin}{}", parts.uri.path()),
            origin,
            query,
        })
    }
}

impl RequestUrl {
    /// This url with the given query parameters replaced.
    fn with(&self, replacements: &[(&str, String)]) -> String {
        let mut serializer = url::form_urlencoded::Serializer::new(String::new());
        for (key, value) in &self.query {
            if !replacements.iter().any(|(replaced, _)| replaced == key) {
                serializer.append_pair(key, value);
            }
        }
        for (key, value) in replacements {
            serializer.append_pair(key, value);
        }
        format!("{}?{}", self.base, serializer.finish())
    }
}

fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Offset pagination with GitLab's headers (`x-total`, `x-total-pages`, `x-page`,
/// `x-per-page`, `x-next-page`, `x-prev-page`, `Link`).
fn paginate(items: Vec<Value>, params: &Params, url: &RequestUrl) -> ApiResult<Response> {
    let mut check = Check::new(params);
    let page = check.integer("page", false);
    let per_page = check.integer("per_page", false);
    check.finish()?;
    let per_page = match per_page {
        Some(size) if size >= 1 => size.min(MAX_PER_PAGE),
        _ => DEFAULT_PER_PAGE,
    };
    let page = page.filter(|page| *page >= 1).unwrap_or(1);
    let total = items.len() as i64;
    let total_pages = ((total + per_page - 1) / per_page).max(1);
    let start = usize::try_from((page - 1).saturating_mul(per_page)).unwrap_or(usize::MAX);
    let body: Vec<Value> = items
        .into_iter()
        .skip(start)
        .take(per_page as usize)
        .collect();
    let next = (page < total_pages).then_some(page + 1);
    let previous = (page > 1).then(|| (page - 1).min(total_pages));
    let link_to = |target: i64, rel: &str| {
        format!(
            "<{}>; rel=\"{rel}\"",
            url.with(&[
                ("page", target.to_string()),
                ("per_page", per_page.to_string())
            ])
        )
    };
    let mut links = Vec::new();
    if let Some(previous) = previous {
        links.push(link_to(previous, "prev"));
    }
    if let Some(next) = next {
        links.push(link_to(next, "next"));
    }
    links.push(link_to(1, "first"));
    links.push(link_to(total_pages, "last"));
    let mut response = json_response(200, Value::Array(body));
    let headers = response.headers_mut();
    let optional = |value: Option<i64>| value.map(|number| number.to_string()).unwrap_or_default();
    for (name, value) in [
        ("x-total", total.to_string()),
        ("x-total-pages", total_pages.to_string()),
        ("x-page", page.to_string()),
        ("x-per-page", per_page.to_string()),
        ("x-next-page", optional(next)),
        ("x-prev-page", optional(previous)),
        ("link", links.join(", ")),
    ] {
        headers.insert(name, header_value(&value));
    }
    Ok(response)
}

// ---- router ------------------------------------------------------------------------------

#[derive(Clone)]
struct RouteContext {
    app: App,
    /// Route template as counted and matched by faults, e.g. `/projects/:id`.
    template: Arc<str>,
}

struct ApiRoutes {
    router: Router<App>,
    app: App,
}

impl ApiRoutes {
    fn at(mut self, path: &str, methods: MethodRouter<App>) -> Self {
        let context = RouteContext {
            app: self.app.clone(),
            template: display_template(path).into(),
        };
        let methods = methods
            .layer(from_fn_with_state(context.clone(), authenticate))
            .layer(from_fn_with_state(context, observe));
        self.router = self.router.route(&format!("{API_PREFIX}{path}"), methods);
        self
    }
}

/// `/groups/{id}/x/{*rest}` → `/groups/:id/x/*rest`.
fn display_template(path: &str) -> String {
    path.replace("{*", "*").replace('{', ":").replace('}', "")
}

pub(crate) fn router(app: App) -> Router {
    const VR: &str = "/virtual_registries/container";
    let api = ApiRoutes {
        router: Router::new(),
        app: app.clone(),
    };
    let api = api
        .at(
            "/groups/{id}/-/virtual_registries/container/registries",
            get(list_registries).post(create_registry),
        )
        .at(
            "/groups/{id}/-/virtual_registries/container/upstreams",
            get(list_group_upstreams),
        )
        .at(
            "/groups/{id}/-/virtual_registries/container/upstreams/test",
            post(test_new_upstream),
        )
        .at(
            &format!("{VR}/registries/{{id}}"),
            get(get_registry)
                .patch(update_registry)
                .delete(delete_registry),
        )
        .at(
            &format!("{VR}/registries/{{id}}/cache"),
            delete(purge_registry_cache),
        )
        .at(
            &format!("{VR}/registries/{{id}}/upstreams"),
            get(list_registry_upstreams).post(create_upstream),
        )
        .at(
            &format!("{VR}/upstreams/{{id}}"),
            get(get_upstream)
                .patch(update_upstream)
                .delete(delete_upstream),
        )
        .at(
            &format!("{VR}/upstreams/{{id}}/cache"),
            delete(purge_upstream_cache),
        )
        .at(
            &format!("{VR}/upstreams/{{id}}/test"),
            post(test_existing_upstream),
        )
        .at(
            &format!("{VR}/upstreams/{{id}}/cache_entries"),
            get(list_cache_entries),
        )
        .at(
            &format!("{VR}/cache_entries/{{*id}}"),
            delete(delete_cache_entry),
        )
        .at(&format!("{VR}/registry_upstreams"), post(associate))
        .at(
            &format!("{VR}/registry_upstreams/{{id}}"),
            patch(reposition).delete(disassociate),
        )
        .at("/projects/{id}", get(get_project).put(update_project))
        .at(
            "/projects/{id}/registry/repositories",
            get(list_project_repositories),
        )
        .at(
            "/projects/{id}/registry/repositories/{repository_id}",
            delete(delete_repository),
        )
        .at(
            "/projects/{id}/registry/repositories/{repository_id}/tags",
            get(list_tags).delete(bulk_delete_tags),
        )
        .at(
            "/projects/{id}/registry/repositories/{repository_id}/tags/{tag_name}",
            get(get_tag).delete(delete_tag),
        )
        .at(
            "/projects/{id}/registry/protection/tag/rules",
            get(list_protection_rules),
        )
        .at("/projects/{id}/repository/branches", get(list_branches))
        .at(
            "/projects/{id}/repository/branches/{branch}",
            delete(delete_branch),
        )
        .at(
            "/groups/{id}/registry/repositories",
            get(list_group_repositories),
        )
        .at("/groups/{id}/projects", get(list_group_projects))
        .at("/registry/repositories/{id}", get(get_repository));
    let control = Router::new()
        .route("/-/sim/requests", get(get_requests).delete(reset_requests))
        .route(
            "/-/sim/faults",
            get(get_faults).post(post_faults).delete(delete_faults),
        )
        .route("/-/sim/seed", post(post_seed))
        .route("/-/sim/state", get(get_state))
        .route("/-/sim/clock", get(get_clock).post(post_clock))
        .route("/-/sim/repositories/{id}/tags/{tag_name}", put(put_tag));
    api.router
        .merge(control)
        .fallback(unknown_route)
        .with_state(app)
}

async fn unknown_route() -> Response {
    json_response(404, json!({ "error": "404 Not Found" }))
}

// ---- middleware --------------------------------------------------------------------------

/// Counts the request, then applies latency and injected faults; a `Delay` fault holds the
/// answer of a request already carried out.
async fn observe(
    AxumState(context): AxumState<RouteContext>,
    request: Request,
    next: Next,
) -> Response {
    let method = request.method().as_str().to_owned();
    context.app.count_request(&method, &context.template);
    let roll: f64 = rand::random();
    let decision = context
        .app
        .faults()
        .decide(&method, &context.template, roll);
    let delay = context.app.config.latency + decision.delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    match decision.action.and_then(fault_response) {
        None => {
            // The request is carried out before a `Delay` holds its answer back, so a client
            // that times out meanwhile leaves GitLab's change in place, as with real GitLab.
            let response = next.run(request).await;
            if !decision.answer_delay.is_zero() {
                tokio::time::sleep(decision.answer_delay).await;
            }
            response
        }
        Some(response) => response,
    }
}

/// The answer an injected fault gives instead of the real one; `None` lets the request
/// through (delays have already been applied).
fn fault_response(action: FaultAction) -> Option<Response> {
    Some(match action {
        FaultAction::RateLimited {
            retry_after_seconds,
        } => rate_limited(retry_after_seconds),
        FaultAction::Status { status: 429 } => rate_limited(1),
        FaultAction::EndpointRateLimited => {
            let mut response = json_response(
                429,
                json!({"message": {"error": "This endpoint has been requested too many times. Try again later."}}),
            );
            response
                .headers_mut()
                .insert("retry-after", HeaderValue::from_static("60"));
            response
        }
        FaultAction::Status { status } => {
            let reason = StatusCode::from_u16(status)
                .ok()
                .and_then(|code| code.canonical_reason())
                .unwrap_or("Error");
            json_response(status, json!({ "message": format!("{status} {reason}") }))
        }
        FaultAction::Drop => {
            let failing = futures::stream::once(async {
                Err::<Bytes, std::io::Error>(std::io::Error::other("connection dropped by fault"))
            });
            Response::new(Body::from_stream(failing))
        }
        FaultAction::Delay { .. } => return None,
    })
}

/// GitLab's global rate limit answer.
fn rate_limited(retry_after_seconds: u64) -> Response {
    let reset = Timestamp::now().as_second() + i64::try_from(retry_after_seconds).unwrap_or(0);
    let mut response = (StatusCode::TOO_MANY_REQUESTS, "Retry later\n").into_response();
    let headers = response.headers_mut();
    for (name, value) in [
        ("retry-after", retry_after_seconds.to_string()),
        ("ratelimit-name", "throttle_authenticated_api".to_owned()),
        ("ratelimit-limit", "600".to_owned()),
        ("ratelimit-observed", "601".to_owned()),
        ("ratelimit-remaining", "0".to_owned()),
        ("ratelimit-reset", reset.to_string()),
    ] {
        headers.insert(name, header_value(&value));
    }
    response
}

fn presented_token(headers: &HeaderMap) -> Option<&str> {
    if let Some(token) = headers
        .get("private-token")
        .and_then(|value| value.to_str().ok())
    {
        return Some(token);
    }
    let authorization = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = authorization.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// `PRIVATE-TOKEN` or `Authorization: Bearer`; scope and role checks for writes.
async fn authenticate(
    AxumState(context): AxumState<RouteContext>,
    request: Request,
    next: Next,
) -> Response {
    let config = &context.app.config;
    if presented_token(request.headers()) != Some(config.token.expose_secret()) {
        return ApiError::unauthorized().into_response();
    }
    let write = !matches!(*request.method(), Method::GET | Method::HEAD);
    if write && config.read_only_token {
        return json_response(
            403,
            json!({
                "error": "insufficient_scope",
                "error_description": "The request requires higher privileges than provided by the access token.",
                "scope": "api",
            }),
        );
    }
    // Writes need Maintainer, except a single tag's DELETE, which Developer may send (the
    // handler checks the role and the tag's protection).
    let tag_delete = *request.method() == Method::DELETE && &*context.template == TAG_ROUTE;
    if write && !tag_delete && config.role < AccessLevel::Maintainer {
        return ApiError::forbidden().into_response();
    }
    next.run(request).await
}

// ---- virtual registries ------------------------------------------------------------------

async fn list_registries(
    AxumState(app): AxumState<App>,
    Path(group): Path<String>,
) -> ApiResult<Response> {
    let state = app.state();
    let group = state.registry_group(&group)?;
    let list: Vec<Value> = state
        .registries_of_group(group.id)
        .into_iter()
        .map(views::registry)
        .collect();
    Ok(json_response(200, Value::Array(list)))
}

async fn create_registry(
    AxumState(app): AxumState<App>,
    Path(group): Path<String>,
    params: Params,
) -> ApiResult<Response> {
    let mut check = Check::new(&params);
    let name = check.required_string("name");
    let description = check.optional_string("description");
    check.finish()?;
    let mut state = app.state();
    let group_id = state.registry_group(&group)?.id;
    let registry = state.create_registry(
        group_id,
        name.as_deref().unwrap_or_default(),
        description.as_deref(),
    )?;
    Ok(json_response(201, views::registry(&registry)))
}

async fn get_registry(
    AxumState(app): AxumState<App>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let id = integer_id(&id, "id")?;
    let state = app.state();
    let registry = state.registry(id)?;
    Ok(json_response(
        200,
        views::registry_details(&state, registry),
    ))
}

async fn update_registry(
    AxumState(app): AxumState<App>,
    Path(id): Path<String>,
    params: Params,
) -> ApiResult<Response> {
    let id = integer_id(&id, "id")?;
    let mut check = Check::new(&params);
    // Both are `allow_blank: false` on update.
    let name = check.string("name", false, false);
    let description = check.string("description", false, false);
    check.at_least_one(&["name", "description"]);
    check.finish()?;
    app.state()
        .update_registry(id, name.as_deref(), description.as_deref())?;
    Ok(status_body(200))
}

async fn delete_registry(
    AxumState(app): AxumState<App>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let id = integer_id(&id, "id")?;
    app.state().delete_registry(id)?;
    Ok(no_content())
}

async fn purge_registry_cache(
    AxumState(app): AxumState<App>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let id = integer_id(&id, "id")?;
    app.state().purge_registry_cache(id)?;
    Ok(no_content())
}

// ---- upstreams ---------------------------------------------------------------------------

async fn list_group_upstreams(
    AxumState(app): AxumState<App>,
    Path(group): Path<String>,
    url: RequestUrl,
    params: Params,
) -> ApiResult<Response> {
    let mut check = Check::new(&params);
    let name = check.optional_string("upstream_name");
    check.finish()?;
    let list: Vec<Value> = {
        let state = app.state();
        let group = state.registry_group(&group)?;
        state
            .upstreams_of_group(group.id, name.as_deref())
            .into_iter()
            .map(views::upstream)
            .collect()
    };
    paginate(list, &params, &url)
}

async fn list_registry_upstreams(
    AxumState(app): AxumState<App>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let id = integer_id(&id, "id")?;
    let state = app.state();
    state.registry(id)?;
    let list: Vec<Value> = state
        .associations_of_registry(id)
        .into_iter()
        .filter_map(|association| {
            state
                .upstream(association.upstream_id)
                .ok()
                .map(|upstream| views::upstream_in_registry(upstream, association))
        })
        .collect();
    Ok(json_response(200, Value::Array(list)))
}

fn password(check: &mut Check<'_>) -> Option<SecretString> {
    check.optional_string("password").map(SecretString::from)
}

async fn create_upstream(
    AxumState(app): AxumState<App>,
    Path(id): Path<String>,
    params: Params,
) -> ApiResult<Response> {
    let id = integer_id(&id, "id")?;
    let mut check = Check::new(&params);
    let url = check.required_string("url");
    let name = check.required_string("name");
    let cache_validity_hours = check.integer("cache_validity_hours", false);
    let description = check.optional_string("description");
    let password = password(&mut check);
    let username = check.optional_string("username");
    check.all_or_none(&["username", "password"]);
    check.finish()?;
    let input = NewUpstream {
        name: name.unwrap_or_default(),
        url: url.unwrap_or_default(),
        description,
        username,
        password,
        cache_validity_hours,
    };
    let read_position = read_position_then_wait(&app, id).await;
    let (upstream, association) = app.state().create_upstream_at_read_position(
        id,
        input,
        app.config.allow_local_network,
        read_position,
    )?;
    Ok(json_response(
        201,
        views::upstream_in_registry(&upstream, &association),
    ))
}

async fn get_upstream(
    AxumState(app): AxumState<App>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let id = integer_id(&id, "id")?;
    let state = app.state();
    let upstream = state.upstream(id)?;
    Ok(json_response(
        200,
        views::upstream_details(&state, upstream),
    ))
}

async fn update_upstream(
    AxumState(app): AxumState<App>,
    Path(id): Path<String>,
    params: Params,
) -> ApiResult<Response> {
    let id = integer_id(&id, "id")?;
    let mut check = Check::new(&params);
    let name = check.string("name", false, false);
    let description = check.optional_string("description");
    let url = check.string("url", false, false);
    let username = check.optional_string("username");
    let password = password(&mut check);
    let cache_validity_hours = check.integer("cache_validity_hours", false);
    check.at_least_one(&[
        "name",
        "description",
        "url",
        "username",
        "password",
        "cache_validity_hours",
    ]);
    // No all-or-none here, unlike the create: the model's presence rules decide.
    check.finish()?;
    let changes = UpstreamChanges {
        name,
        description,
        url,
        username,
        password,
        cache_validity_hours,
    };
    app.state()
        .update_upstream(id, changes, app.config.allow_local_network)?;
    Ok(status_body(200))
}

async fn delete_upstream(
    AxumState(app): AxumState<App>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let id = integer_id(&id, "id")?;
    app.state().delete_upstream(id)?;
    Ok(no_content())
}

async fn purge_upstream_cache(
    AxumState(app): AxumState<App>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let id = integer_id(&id, "id")?;
    app.state().purge_upstream_cache(id)?;
    Ok(no_content())
}

async fn run_connection_test(app: &App, target: ProbeTarget) -> Response {
    let outcome: TestOutcome = if app.config.stub_upstreams {
        stub_outcome(&target)
    } else {
        probe(&app.http, &target).await
    };
    json_response(200, json!(outcome))
}

fn check_url(url: &str, allow_local_network: bool) -> ApiResult<()> {
    let problems = url_problems(url, allow_local_network);
    match problems.first() {
        None => Ok(()),
        Some(problem) => Err(ApiError::invalid("url", problem)),
    }
}

async fn test_new_upstream(
    AxumState(app): AxumState<App>,
    Path(group): Path<String>,
    params: Params,
) -> ApiResult<Response> {
    let mut check = Check::new(&params);
    let url = check.required_string("url");
    let password = password(&mut check);
    let username = check.optional_string("username");
    check.all_or_none(&["username", "password"]);
    check.finish()?;
    let url = url.unwrap_or_default();
    {
        let state = app.state();
        let group_id = state.registry_group(&group)?.id;
        // GitLab tests an unsaved upstream: its model validations answer first.
        state.validate_test_upstream(
            group_id,
            &url,
            username.as_deref(),
            password.as_ref(),
            app.config.allow_local_network,
        )?;
    }
    let target = ProbeTarget {
        url,
        username: username.filter(|name| !name.is_empty()),
        password: password.filter(|secret| !secret.expose_secret().is_empty()),
        path: NEW_UPSTREAM_TEST_PATH.to_owned(),
    };
    Ok(run_connection_test(&app, target).await)
}

/// `POST /upstreams/:id/test`: no all-or-none. The stored credentials are tested when no
/// credential is sent (with the stored url or no url), or when the stored username comes
/// with a blank password; a lone `username` or `password` is the model's "can't be blank";
/// both blank test anonymously (INFERRED); a new url without credentials is tested
/// anonymously, as the url change would clear them.
async fn test_existing_upstream(
    AxumState(app): AxumState<App>,
    Path(id): Path<String>,
    params: Params,
) -> ApiResult<Response> {
    let id = integer_id(&id, "id")?;
    let mut check = Check::new(&params);
    let url = check.string("url", false, false);
    let password = password(&mut check);
    let username = check.optional_string("username");
    check.finish()?;
    let target = {
        let state = app.state();
        let upstream = state.upstream(id)?;
        let path = state
            .first_cached_path(id)
            .unwrap_or_else(|| NEW_UPSTREAM_TEST_PATH.to_owned());
        let url = url.unwrap_or_else(|| upstream.url.clone());
        let same_url = url == upstream.url;
        let blank_password = password
            .as_ref()
            .is_some_and(|secret| secret.expose_secret().is_empty());
        let (username, password) = match (username, password) {
            (None, None) if same_url => (upstream.username.clone(), upstream.password.clone()),
            (None, None) => (None, None),
            (Some(name), _) if blank_password && upstream.username.as_deref() == Some(&name) => {
                (upstream.username.clone(), upstream.password.clone())
            }
            (username, password) => {
                let username = username.filter(|name| !name.is_empty());
                let password = password.filter(|secret| !secret.expose_secret().is_empty());
                let mut errors = ValidationErrors::default();
                if username.is_some() && password.is_none() {
                    errors.add("password", "can't be blank");
                }
                if password.is_some() && username.is_none() {
                    errors.add("username", "can't be blank");
                }
                errors.into_result()?;
                (username, password)
            }
        };
        if !same_url {
            check_url(&url, app.config.allow_local_network)?;
        }
        ProbeTarget {
            url,
            username,
            password,
            path,
        }
    };
    Ok(run_connection_test(&app, target).await)
}

async fn list_cache_entries(
    AxumState(app): AxumState<App>,
    Path(id): Path<String>,
    url: RequestUrl,
    params: Params,
) -> ApiResult<Response> {
    let id = integer_id(&id, "id")?;
    let mut check = Check::new(&params);
    let search = check.optional_string("search");
    check.finish()?;
    let list: Vec<Value> = app
        .state()
        .cache_entries_of_upstream(id, search.as_deref())?
        .into_iter()
        .map(views::cache_entry)
        .collect();
    paginate(list, &params, &url)
}

async fn delete_cache_entry(
    AxumState(app): AxumState<App>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    app.state().delete_cache_entry(&id)?;
    Ok(no_content())
}

// ---- associations ------------------------------------------------------------------------

async fn associate(AxumState(app): AxumState<App>, params: Params) -> ApiResult<Response> {
    let mut check = Check::new(&params);
    let registry_id = check.integer("registry_id", true);
    let upstream_id = check.integer("upstream_id", true);
    check.finish()?;
    let as_id = |value: Option<i64>| u64::try_from(value.unwrap_or(0)).unwrap_or(0);
    let read_position = read_position_then_wait(&app, as_id(registry_id)).await;
    let association = app.state().associate_at_read_position(
        as_id(registry_id),
        as_id(upstream_id),
        read_position,
    )?;
    Ok(json_response(201, views::association(&association)))
}

/// With an `insert_commit_delay`, reads the position a new association of the registry would
/// take and waits that long before the commit, as GitLab's transaction does; `None` (insert
/// atomically) without one, or when the registry does not exist (the commit reports it).
async fn read_position_then_wait(app: &App, registry_id: u64) -> Option<i64> {
    let delay = app.config.insert_commit_delay;
    if delay.is_zero() {
        return None;
    }
    let read_position = app.state().next_association_position(registry_id).ok()?;
    tokio::time::sleep(delay).await;
    Some(read_position)
}

async fn reposition(
    AxumState(app): AxumState<App>,
    Path(id): Path<String>,
    params: Params,
) -> ApiResult<Response> {
    let id = integer_id(&id, "id")?;
    let mut check = Check::new(&params);
    let position = check.integer("position", true);
    if position.is_some_and(|position| !(1..=super::state::MAX_POSITION).contains(&position)) {
        check
            .errors
            .push("position does not have a valid value".into());
    }
    check.finish()?;
    app.state().reposition(id, position.unwrap_or(1))?;
    Ok(status_body(200))
}

async fn disassociate(
    AxumState(app): AxumState<App>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let id = integer_id(&id, "id")?;
    app.state().disassociate(id)?;
    Ok(no_content())
}

// ---- projects and container registry -----------------------------------------------------

fn project_json(
    state: &super::state::State,
    project_id: u64,
    url: &RequestUrl,
) -> ApiResult<Value> {
    let project = state
        .project_by_id(project_id)
        .ok_or_else(|| ApiError::not_found_named("Project"))?;
    let namespace = state.group(&project.namespace_id.to_string()).ok();
    Ok(views::project(project, namespace, &url.origin))
}

async fn get_project(
    AxumState(app): AxumState<App>,
    Path(project): Path<String>,
    url: RequestUrl,
) -> ApiResult<Response> {
    let state = app.state();
    let project_id = state.project(&project)?.id;
    Ok(json_response(200, project_json(&state, project_id, &url)?))
}

async fn update_project(
    AxumState(app): AxumState<App>,
    Path(project): Path<String>,
    url: RequestUrl,
    params: Params,
) -> ApiResult<Response> {
    let mut check = Check::new(&params);
    let access_level = check.optional_string("container_registry_access_level");
    if params.present("container_expiration_policy_attributes")
        && params
            .object("container_expiration_policy_attributes")
            .is_none()
    {
        check
            .errors
            .push("container_expiration_policy_attributes is invalid".into());
    }
    check.at_least_one(&[
        "container_registry_access_level",
        "container_expiration_policy_attributes",
    ]);
    check.finish()?;
    let mut state = app.state();
    let project_id = state.project(&project)?.id;
    state.update_project(
        project_id,
        access_level.as_deref(),
        params.object("container_expiration_policy_attributes"),
    )?;
    Ok(json_response(200, project_json(&state, project_id, &url)?))
}

fn repository_extras(params: &Params, allow_size: bool) -> ApiResult<RepositoryExtras> {
    let mut check = Check::new(params);
    let extras = RepositoryExtras {
        tags: check.boolean("tags"),
        tags_count: check.boolean("tags_count"),
        size: allow_size && check.boolean("size"),
    };
    check.finish()?;
    Ok(extras)
}

async fn list_project_repositories(
    AxumState(app): AxumState<App>,
    Path(project): Path<String>,
    url: RequestUrl,
    params: Params,
) -> ApiResult<Response> {
    let extras = repository_extras(&params, false)?;
    let list: Vec<Value> = {
        let state = app.state();
        let project_id = state.project(&project)?.id;
        state
            .repositories_of_project(project_id)
            .into_iter()
            .map(|repository| views::repository(repository, &app.config.registry_host, extras))
            .collect()
    };
    paginate(list, &params, &url)
}

async fn list_group_repositories(
    AxumState(app): AxumState<App>,
    Path(group): Path<String>,
    url: RequestUrl,
    params: Params,
) -> ApiResult<Response> {
    let list: Vec<Value> = {
        let state = app.state();
        let group_id = state.group(&group)?.id;
        state
            .repositories_of_group(group_id)
            .into_iter()
            .map(|repository| {
                views::repository(
                    repository,
                    &app.config.registry_host,
                    RepositoryExtras::default(),
                )
            })
            .collect()
    };
    paginate(list, &params, &url)
}

/// `GET /groups/:id/projects`: the group's own projects, and with `include_subgroups` those
/// of its subgroups too. Projects shared with the group are not modelled (as `with_shared=false`).
/// INFERRED: the shared API pages do not cover the Groups API; this follows GitLab's public
/// Groups API documentation (offset pagination, the project entity of `GET /projects/:id`).
async fn list_group_projects(
    AxumState(app): AxumState<App>,
    Path(group): Path<String>,
    url: RequestUrl,
    params: Params,
) -> ApiResult<Response> {
    let include_subgroups = {
        let mut check = Check::new(&params);
        let include = check.boolean("include_subgroups");
        check.boolean("with_shared");
        check.finish()?;
        include
    };
    let list: Vec<Value> = {
        let state = app.state();
        let group_id = state.group(&group)?.id;
        state
            .projects_of_group(group_id, include_subgroups)
            .into_iter()
            .map(|project| {
                let namespace = state.group(&project.namespace_id.to_string()).ok();
                views::project(project, namespace, &url.origin)
            })
            .collect()
    };
    paginate(list, &params, &url)
}

async fn get_repository(
    AxumState(app): AxumState<App>,
    Path(id): Path<String>,
    params: Params,
) -> ApiResult<Response> {
    let id = integer_id(&id, "id")?;
    let extras = repository_extras(&params, true)?;
    let state = app.state();
    let repository = state.repository(id)?;
    Ok(json_response(
        200,
        views::repository(repository, &app.config.registry_host, extras),
    ))
}

async fn delete_repository(
    AxumState(app): AxumState<App>,
    Path((project, repository_id)): Path<(String, String)>,
) -> ApiResult<Response> {
    let repository_id = integer_id(&repository_id, "repository_id")?;
    let mut state = app.state();
    let project_id = state.project(&project)?.id;
    state.delete_repository(project_id, repository_id)?;
    Ok(status_body(202))
}

async fn list_tags(
    AxumState(app): AxumState<App>,
    Path((project, repository_id)): Path<(String, String)>,
    url: RequestUrl,
    params: Params,
) -> ApiResult<Response> {
    let repository_id = integer_id(&repository_id, "repository_id")?;
    let mut check = Check::new(&params);
    let keyset = check.optional_string("pagination").as_deref() == Some("keyset");
    let sort = check.optional_string("sort");
    let last = check.optional_string("last");
    let per_page = check.integer("per_page", false);
    if sort
        .as_deref()
        .is_some_and(|sort| sort != "asc" && sort != "desc")
    {
        check.errors.push("sort does not have a valid value".into());
    }
    check.finish()?;
    let mut tags = {
        let state = app.state();
        let project_id = state.project(&project)?.id;
        let repository = state.project_repository(project_id, repository_id)?;
        let host = &app.config.registry_host;
        let tags: Vec<(String, Value)> = repository
            .tags
            .values()
            .map(|tag| {
                let value = if app.config.tag_list_details {
                    views::tag_details(repository, tag, host)
                } else {
                    views::tag_summary(repository, tag, host)
                };
                (tag.name.clone(), value)
            })
            .collect();
        tags
    };
    if !keyset {
        let list = tags.into_iter().map(|(_, value)| value).collect();
        return paginate(list, &params, &url);
    }
    let descending = sort.as_deref() == Some("desc");
    if descending {
        tags.reverse();
    }
    let per_page = match per_page {
        Some(size) if size >= 1 => size.min(MAX_PER_PAGE),
        _ => DEFAULT_PER_PAGE,
    } as usize;
    let remaining: Vec<(String, Value)> = tags
        .into_iter()
        .filter(|(name, _)| match &last {
            None => true,
            Some(last) if descending => name.as_str() < last.as_str(),
            Some(last) => name.as_str() > last.as_str(),
        })
        .collect();
    let has_more = remaining.len() > per_page;
    let page: Vec<(String, Value)> = remaining.into_iter().take(per_page).collect();
    let next_last = page.last().map(|(name, _)| name.clone());
    let body: Vec<Value> = page.into_iter().map(|(_, value)| value).collect();
    let mut response = json_response(200, Value::Array(body));
    if has_more && let Some(next_last) = next_last {
        let link = format!(
            "<{}>; rel=\"next\"",
            url.with(&[
                ("last", next_last),
                ("per_page", per_page.to_string()),
                ("sort", if descending { "desc" } else { "asc" }.to_owned()),
            ])
        );
        response.headers_mut().insert("link", header_value(&link));
    }
    Ok(response)
}

async fn get_tag(
    AxumState(app): AxumState<App>,
    Path((project, repository_id, tag_name)): Path<(String, String, String)>,
) -> ApiResult<Response> {
    let repository_id = integer_id(&repository_id, "repository_id")?;
    let state = app.state();
    let project_id = state.project(&project)?.id;
    let tag = state.tag(project_id, repository_id, &tag_name)?;
    let repository = state.project_repository(project_id, repository_id)?;
    Ok(json_response(
        200,
        views::tag_details(repository, tag, &app.config.registry_host),
    ))
}

async fn delete_tag(
    AxumState(app): AxumState<App>,
    Path((project, repository_id, tag_name)): Path<(String, String, String)>,
) -> ApiResult<Response> {
    let repository_id = integer_id(&repository_id, "repository_id")?;
    let mut state = app.state();
    let project_id = state.project(&project)?.id;
    state.delete_tag(project_id, repository_id, &tag_name, app.config.role)?;
    Ok(status_body(200))
}

async fn bulk_delete_tags(
    AxumState(app): AxumState<App>,
    Path((project, repository_id)): Path<(String, String)>,
    params: Params,
) -> ApiResult<Response> {
    let repository_id = integer_id(&repository_id, "repository_id")?;
    let mut check = Check::new(&params);
    let name_regex = check.optional_string("name_regex");
    let name_regex_delete = check.optional_string("name_regex_delete");
    let name_regex_keep = check.optional_string("name_regex_keep");
    let keep_n = check.integer("keep_n", false);
    let older_than = check.optional_string("older_than");
    check.finish()?;
    let request = BulkDelete::new(
        name_regex_delete.as_deref(),
        name_regex.as_deref(),
        name_regex_keep.as_deref(),
        keep_n,
        older_than.as_deref(),
    )?;
    let mut state = app.state();
    let project_id = state.project(&project)?.id;
    state.bulk_delete_tags(project_id, repository_id, &request, app.config.role)?;
    Ok(status_body(202))
}

async fn list_protection_rules(
    AxumState(app): AxumState<App>,
    Path(project): Path<String>,
) -> ApiResult<Response> {
    // Reading the rules needs Maintainer. Only mutable rules exist here: GitLab's immutable
    // rules (EE) are never listed, so an empty list does not mean that no tag is protected.
    if app.config.role < AccessLevel::Maintainer {
        return Err(ApiError::forbidden());
    }
    let state = app.state();
    let project_id = state.project(&project)?.id;
    let list: Vec<Value> = state
        .protection_rules_of_project(project_id)
        .into_iter()
        .map(views::protection_rule)
        .collect();
    Ok(json_response(200, Value::Array(list)))
}

async fn list_branches(
    AxumState(app): AxumState<App>,
    Path(project): Path<String>,
    url: RequestUrl,
    params: Params,
) -> ApiResult<Response> {
    let list: Vec<Value> = {
        let state = app.state();
        state
            .project(&project)?
            .branches
            .iter()
            .map(|name| views::branch(name))
            .collect()
    };
    paginate(list, &params, &url)
}

async fn delete_branch(
    AxumState(app): AxumState<App>,
    Path((project, branch)): Path<(String, String)>,
) -> ApiResult<Response> {
    let mut state = app.state();
    let project_id = state.project(&project)?.id;
    state.delete_branch(project_id, &branch)?;
    Ok(no_content())
}

// ---- control endpoints -------------------------------------------------------------------

fn control_error(message: impl Into<String>, reason: &str) -> Response {
    json_response(400, json!({ "error": message.into(), "reason": reason }))
}

async fn get_requests(AxumState(app): AxumState<App>) -> Response {
    json_response(200, json!(app.request_counts()))
}

async fn reset_requests(AxumState(app): AxumState<App>) -> Response {
    app.reset_request_counts();
    no_content()
}

async fn get_faults(AxumState(app): AxumState<App>) -> Response {
    json_response(200, json!(*app.faults()))
}

async fn post_faults(AxumState(app): AxumState<App>, body: Bytes) -> Response {
    match serde_json::from_slice::<FaultSpec>(&body) {
        Ok(spec) => {
            let mut faults = app.faults();
            faults.apply(spec);
            json_response(200, json!(*faults))
        }
        Err(error) => control_error(error.to_string(), "InvalidFaultSpec"),
    }
}

async fn delete_faults(AxumState(app): AxumState<App>) -> Response {
    app.faults().clear();
    no_content()
}

async fn post_seed(AxumState(app): AxumState<App>, body: Bytes) -> Response {
    let text = String::from_utf8_lossy(&body);
    let result = Seed::parse(&text).and_then(|seed| app.state().apply_seed(&seed));
    match result {
        Ok(()) => json_response(201, json!({ "seeded": true })),
        Err(error) => control_error(error.to_string(), error.reason()),
    }
}

async fn get_state(AxumState(app): AxumState<App>) -> Response {
    json_response(200, json!(app.state().snapshot()))
}

fn clock_body(state: &super::state::State) -> Value {
    let snapshot_now = state.now();
    json!({ "now": views::time(snapshot_now), "frozen": state.clock_frozen() })
}

async fn get_clock(AxumState(app): AxumState<App>) -> Response {
    json_response(200, clock_body(&app.state()))
}

/// `{"now": "<RFC 3339>"}` freezes the clock, `{"now": null}` returns to wall time,
/// `{"advance_seconds": N}` moves it forward.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClockChange {
    #[serde(default, deserialize_with = "present")]
    now: Option<Option<Timestamp>>,
    #[serde(default)]
    advance_seconds: Option<i64>,
}

fn present<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Option<Timestamp>>, D::Error> {
    Option::<Timestamp>::deserialize(deserializer).map(Some)
}

async fn post_clock(AxumState(app): AxumState<App>, body: Bytes) -> Response {
    let change: ClockChange = match serde_json::from_slice(&body) {
        Ok(change) => change,
        Err(error) => return control_error(error.to_string(), "InvalidClockChange"),
    };
    let mut state = app.state();
    if let Some(now) = change.now {
        state.set_clock(now);
    }
    if let Some(seconds) = change.advance_seconds
        && let Err(error) = state.advance_clock(SignedDuration::from_secs(seconds))
    {
        return error.into_response();
    }
    json_response(200, clock_body(&state))
}

/// Body of `PUT /-/sim/repositories/:id/tags/:tag_name` (a push, or setting a tag's age).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TagChange {
    #[serde(default)]
    digest: Option<String>,
    #[serde(default)]
    created_at: Option<Timestamp>,
    #[serde(default)]
    total_size: Option<u64>,
}

async fn put_tag(
    AxumState(app): AxumState<App>,
    Path((repository_id, tag_name)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let Ok(repository_id) = repository_id.parse::<u64>() else {
        return control_error("repository id must be an integer", "InvalidRepositoryId");
    };
    let change: TagChange = match serde_json::from_slice(&body) {
        Ok(change) => change,
        Err(error) => return control_error(error.to_string(), "InvalidTag"),
    };
    let mut state = app.state();
    let tag = Tag {
        name: tag_name,
        digest: change.digest,
        created_at: change.created_at.or_else(|| Some(state.now())),
        total_size: change.total_size.unwrap_or(0),
    };
    match state.put_tag(repository_id, tag.clone()) {
        Ok(()) => json_response(200, json!(tag)),
        Err(error) => error.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_are_displayed_with_colons() {
        assert_eq!(
            display_template("/projects/{id}/registry/repositories/{repository_id}/tags"),
            "/projects/:id/registry/repositories/:repository_id/tags"
        );
        assert_eq!(
            display_template("/virtual_registries/container/cache_entries/{*id}"),
            "/virtual_registries/container/cache_entries/*id"
        );
    }

    #[test]
    fn grape_checks_collect_messages() {
        let params = Params(
            json!({"username": "u", "position": "x", "blank": " "})
                .as_object()
                .cloned()
                .unwrap_or_default(),
        );
        let mut check = Check::new(&params);
        check.required_string("name");
        check.required_string("blank");
        check.integer("position", true);
        check.all_or_none(&["username", "password"]);
        let error = check.finish().unwrap_err();
        assert_eq!(
            error.body,
            json!({"error": "name is missing, blank is empty, position is invalid, username, password provide all or none of parameters"})
        );
    }
}
