//! Typed errors of the GitLab client, parsed from GitLab's own error bodies.

use crate::crd::reasons::Reason;
use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;

/// At most this many characters of an unparsed response body are kept in an error message.
const MAX_BODY_TEXT: usize = 300;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong talking to GitLab. Messages carry GitLab's own text; never the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// 400 `{"message":{"<attr>":["<msg>"]}}`: a model validation failed.
    #[error("GitLab rejected the request: {}", join_field_errors(.errors))]
    Validation {
        errors: BTreeMap<String, Vec<String>>,
    },
    /// 400 `{"error":"..."}` (a missing or invalid parameter) or another plain 400 message.
    #[error("GitLab rejected the request: {message}")]
    Parameter { message: String },
    /// 401: no token, a bad token, or the feature is switched off.
    #[error("GitLab refused the token: {message}")]
    Unauthorized { message: String },
    /// 403: role too low, token scope too narrow, protected tag.
    #[error("GitLab denied access: {message}")]
    Forbidden { message: String },
    /// 404 with GitLab's message (`404 Group Not Found`, `404 Not found`, …).
    #[error("not found in GitLab: {message}")]
    NotFound { message: String },
    /// 429, with the delay GitLab asked for in `Retry-After`.
    #[error("GitLab rate limit hit{}: {message}", retry_after_text(.retry_after))]
    RateLimited {
        retry_after: Option<Duration>,
        message: String,
    },
    /// 409: the request conflicts with the current state of the resource.
    #[error("GitLab reported a conflict: {message}")]
    Conflict { message: String },
    /// A GitLab limit: 5 registries per group, 5 upstreams per registry, bulk tag delete once
    /// an hour per repository.
    #[error("GitLab limit exceeded: {message}")]
    LimitExceeded { message: String },
    /// Any other 4xx status.
    #[error("GitLab answered {status}: {message}")]
    UnexpectedStatus { status: u16, message: String },
    /// 5xx.
    #[error("GitLab server error {status}: {message}")]
    Server { status: u16, message: String },
    /// The request did not complete within the request timeout.
    #[error("request to GitLab timed out ({method} {route})")]
    Timeout { method: String, route: String },
    /// Connection refused, DNS failure, TLS failure, connection reset, …
    #[error("cannot reach GitLab: {message}")]
    Network { message: String },
    /// GitLab answered 2xx with a body that does not have the documented shape.
    #[error("unexpected response from GitLab ({route}): {message}")]
    Decode { route: String, message: String },
    /// The client configuration is unusable (base URL, CA bundle, token characters).
    #[error("invalid GitLab client configuration: {message}")]
    Config { message: String },
}

impl Error {
    /// The stable condition reason (DESIGN §5) this error maps to.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Validation { .. } | Self::Parameter { .. } | Self::Config { .. } => {
                Reason::InvalidSpec.as_str()
            }
            Self::UnexpectedStatus { .. } => Reason::InvalidSpec.as_str(),
            Self::Unauthorized { .. } => Reason::Unauthorized.as_str(),
            Self::Forbidden { .. } => Reason::Forbidden.as_str(),
            Self::NotFound { .. } => Reason::NotFound.as_str(),
            Self::LimitExceeded { .. } => Reason::LimitExceeded.as_str(),
            Self::RateLimited { .. } => Reason::RateLimited.as_str(),
            Self::Conflict { .. } => Reason::Conflict.as_str(),
            Self::Server { .. } | Self::Timeout { .. } | Self::Network { .. } => {
                Reason::GitLabUnavailable.as_str()
            }
            Self::Decode { .. } => Reason::GitLabUnavailable.as_str(),
        }
    }

    /// True when the same request may succeed later without any change (5xx, timeout,
    /// network, 429).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Server { .. }
                | Self::Timeout { .. }
                | Self::Network { .. }
                | Self::RateLimited { .. }
        )
    }

    /// The delay GitLab asked for (429 `Retry-After`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The HTTP status GitLab answered with, when there was an answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Validation { .. } | Self::Parameter { .. } => Some(400),
            Self::Unauthorized { .. } => Some(401),
            Self::Forbidden { .. } => Some(403),
            Self::NotFound { .. } => Some(404),
            Self::Conflict { .. } => Some(409),
            Self::RateLimited { .. } => Some(429),
            Self::UnexpectedStatus { status, .. } | Self::Server { status, .. } => Some(*status),
            Self::LimitExceeded { .. } => Some(400),
            Self::Timeout { .. }
            | Self::Network { .. }
            | Self::Decode { .. }
            | Self::Config { .. } => None,
        }
    }

    /// GitLab's own text, for condition messages (`name has already been taken`,
    /// `5 registries is the maximum allowed per top-level group.`).
    pub fn message(&self) -> String {
        match self {
            Self::Validation { errors } => join_field_errors(errors),
            Self::Parameter { message }
            | Self::Unauthorized { message }
            | Self::Forbidden { message }
            | Self::NotFound { message }
            | Self::RateLimited { message, .. }
            | Self::Conflict { message }
            | Self::LimitExceeded { message }
            | Self::UnexpectedStatus { message, .. }
            | Self::Server { message, .. }
            | Self::Network { message }
            | Self::Config { message } => message.clone(),
            Self::Timeout { .. } | Self::Decode { .. } => self.to_string(),
        }
    }

    /// Field errors of a validation failure (`None` for other errors).
    pub fn field_errors(&self) -> Option<&BTreeMap<String, Vec<String>>> {
        match self {
            Self::Validation { errors } => Some(errors),
            _ => None,
        }
    }

    /// True for a validation error saying `<field> has already been taken`.
    pub fn is_already_taken(&self, field: &str) -> bool {
        self.field_errors()
            .and_then(|errors| errors.get(field))
            .is_some_and(|messages| messages.iter().any(|m| m == "has already been taken"))
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::NotFound { .. })
    }

    /// Builds the error for a non-success HTTP answer from its status, `Retry-After` and body.
    pub fn from_response(status: u16, retry_after: Option<Duration>, body: &[u8]) -> Self {
        let json: Option<Value> = serde_json::from_slice(body).ok();
        let text = body_text(body, json.as_ref());
        match status {
            400 => parse_bad_request(json.as_ref(), text),
            401 => Self::Unauthorized { message: text },
            403 => Self::Forbidden { message: text },
            404 => Self::NotFound { message: text },
            409 => Self::Conflict { message: text },
            429 => Self::RateLimited {
                retry_after,
                message: text,
            },
            500..=599 => Self::Server {
                status,
                message: text,
            },
            _ => Self::UnexpectedStatus {
                status,
                message: text,
            },
        }
    }
}

fn parse_bad_request(json: Option<&Value>, text: String) -> Error {
    if let Some(Value::Object(fields)) = json.and_then(|body| body.get("message")) {
        let errors: BTreeMap<String, Vec<String>> = fields
            .iter()
            .map(|(field, messages)| (field.clone(), string_list(messages)))
            .collect();
        if is_limit(&errors) {
            return Error::LimitExceeded {
                message: join_field_errors(&errors),
            };
        }
        return Error::Validation { errors };
    }
    if text.contains("at most once an hour") {
        return Error::LimitExceeded { message: text };
    }
    Error::Parameter { message: text }
}

/// GitLab reports its count limits as validation errors; they are not spec mistakes.
fn is_limit(errors: &BTreeMap<String, Vec<String>>) -> bool {
    errors.iter().any(|(field, messages)| {
        messages.iter().any(|message| {
            message.contains("is the maximum allowed")
                || (field.ends_with("position")
                    && message.starts_with("must be less than or equal to"))
        })
    })
}

fn string_list(value: &Value) -> Vec<String> {
    match value {
        Value::Array(items) => items.iter().map(value_text).collect(),
        other => vec![value_text(other)],
    }
}

fn value_text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// The human text of an error body: `message` (string or field map), `error` (+ description),
/// or the raw body (trimmed and shortened).
fn body_text(body: &[u8], json: Option<&Value>) -> String {
    if let Some(json) = json {
        match json.get("message") {
            Some(Value::String(message)) => return message.clone(),
            Some(Value::Object(fields)) => {
                let errors = fields
                    .iter()
                    .map(|(field, messages)| (field.clone(), string_list(messages)))
                    .collect();
                return join_field_errors(&errors);
            }
            _ => {}
        }
        if let Some(error) = json.get("error").map(value_text) {
            return match json.get("error_description").map(value_text) {
                Some(description) if !description.is_empty() => format!("{error}: {description}"),
                _ => error,
            };
        }
    }
    let raw = String::from_utf8_lossy(body);
    let trimmed = raw.trim();
    if trimmed.chars().count() > MAX_BODY_TEXT {
        let mut shortened: String = trimmed.chars().take(MAX_BODY_TEXT).collect();
        shortened.push('…');
        shortened
    } else {
        trimmed.to_owned()
    }
}

/// `name has already been taken; url is blocked: …` (the `base` attribute has no prefix, and
/// the endpoint rate limit's `{"error": "..."}` map reads as its message).
fn join_field_errors(errors: &BTreeMap<String, Vec<String>>) -> String {
    errors
        .iter()
        .flat_map(|(field, messages)| {
            messages.iter().map(move |message| {
                if field == "base" || field == "error" {
                    message.clone()
                } else {
                    format!("{field} {message}")
                }
            })
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn retry_after_text(retry_after: &Option<Duration>) -> String {
    match retry_after {
        Some(delay) => format!(" (retry after {}s)", delay.as_secs()),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(status: u16, body: &str) -> Error {
        Error::from_response(status, None, body.as_bytes())
    }

    #[test]
    fn parameter_errors() {
        for message in [
            "name is missing",
            "name is empty",
            "username, password provide all or none of parameters",
            "position does not have a valid value",
            "name, description are missing, at least one parameter must be provided",
            "name_regex, name_regex_delete are missing, at least one parameter must be provided",
            "name_regex_delete is an invalid regexp: missing argument to repetition operator: *",
        ] {
            let body = serde_json::json!({ "error": message }).to_string();
            let error = parse(400, &body);
            assert_eq!(
                error,
                Error::Parameter {
                    message: message.into()
                }
            );
            assert_eq!(error.reason(), "InvalidSpec");
            assert_eq!(error.message(), message);
            assert!(!error.is_transient());
        }
    }

    #[test]
    fn validation_errors() {
        let error = parse(400, r#"{"message":{"name":["has already been taken"]}}"#);
        assert_eq!(error.reason(), "InvalidSpec");
        assert_eq!(error.message(), "name has already been taken");
        assert!(error.is_already_taken("name"));
        assert!(!error.is_already_taken("url"));

        let error = parse(
            400,
            r#"{"message":{"url":["is blocked: Requests to localhost are not allowed"]}}"#,
        );
        assert_eq!(
            error.message(),
            "url is blocked: Requests to localhost are not allowed"
        );

        let error = parse(
            400,
            r#"{"message":{"group":["already has an upstream with the same credentials"]}}"#,
        );
        assert_eq!(
            error.message(),
            "group already has an upstream with the same credentials"
        );
        assert_eq!(error.reason(), "InvalidSpec");

        let error = parse(
            400,
            r#"{"message":{"upstream_id":["has already been taken"]}}"#,
        );
        assert!(error.is_already_taken("upstream_id"));

        let error = parse(
            400,
            r#"{"message":{"container_expiration_policy.cadence":["is not included in the list"]}}"#,
        );
        assert_eq!(
            error.message(),
            "container_expiration_policy.cadence is not included in the list"
        );
        assert_eq!(error.status(), Some(400));
    }

    #[test]
    fn limits() {
        let error = parse(
            400,
            r#"{"message":{"base":["5 registries is the maximum allowed per top-level group."]}}"#,
        );
        assert!(matches!(error, Error::LimitExceeded { .. }));
        assert_eq!(error.reason(), "LimitExceeded");
        assert_eq!(
            error.message(),
            "5 registries is the maximum allowed per top-level group."
        );

        for body in [
            r#"{"message":{"registry_upstreams.position":["must be less than or equal to 5"]}}"#,
            r#"{"message":{"position":["must be less than or equal to 5"]}}"#,
        ] {
            let error = parse(400, body);
            assert_eq!(error.reason(), "LimitExceeded", "{body}");
            assert!(error.message().ends_with("must be less than or equal to 5"));
        }

        let error = parse(
            400,
            r#"{"message":"This request has already been made. You can run this at most once an hour for a given container repository"}"#,
        );
        assert_eq!(error.reason(), "LimitExceeded");
        assert!(
            error
                .message()
                .starts_with("This request has already been made.")
        );
    }

    #[test]
    fn plain_bad_request_message() {
        let error = parse(
            400,
            r#"{"message":"400 Bad request - only available on top-level groups."}"#,
        );
        assert_eq!(
            error,
            Error::Parameter {
                message: "400 Bad request - only available on top-level groups.".into()
            }
        );
    }

    #[test]
    fn unauthorized_and_forbidden() {
        let error = parse(401, r#"{"message":"401 Unauthorized"}"#);
        assert_eq!(
            error,
            Error::Unauthorized {
                message: "401 Unauthorized".into()
            }
        );
        assert_eq!(error.reason(), "Unauthorized");

        let error = parse(403, r#"{"message":"403 Forbidden"}"#);
        assert_eq!(error.reason(), "Forbidden");
        assert_eq!(error.message(), "403 Forbidden");

        let error = parse(
            403,
            r#"{"error":"insufficient_scope","error_description":"The request requires higher privileges than provided by the access token.","scope":"api"}"#,
        );
        assert_eq!(error.reason(), "Forbidden");
        assert_eq!(
            error.message(),
            "insufficient_scope: The request requires higher privileges than provided by the access token."
        );

        let error = parse(
            403,
            r#"{"message":"403 Forbidden - cannot delete protected tag(s)"}"#,
        );
        assert_eq!(
            error.message(),
            "403 Forbidden - cannot delete protected tag(s)"
        );
    }

    #[test]
    fn not_found_keeps_gitlab_text() {
        for message in [
            "404 Group Not Found",
            "404 Project Not Found",
            "404 Not found",
            "404 Upstream Not Found",
            "404 Tag Not Found",
        ] {
            let body = serde_json::json!({ "message": message }).to_string();
            let error = parse(404, &body);
            assert!(error.is_not_found());
            assert_eq!(error.reason(), "NotFound");
            assert_eq!(error.message(), message);
        }
    }

    #[test]
    fn rate_limited_plain_text_and_json() {
        let error = Error::from_response(429, Some(Duration::from_secs(7)), b"Retry later\n");
        assert_eq!(
            error,
            Error::RateLimited {
                retry_after: Some(Duration::from_secs(7)),
                message: "Retry later".into()
            }
        );
        assert_eq!(error.reason(), "RateLimited");
        assert!(error.is_transient());
        assert_eq!(error.retry_after(), Some(Duration::from_secs(7)));

        let error = Error::from_response(
            429,
            Some(Duration::from_secs(60)),
            br#"{"message":{"error":"This endpoint has been requested too many times. Try again later."}}"#,
        );
        assert_eq!(
            error.message(),
            "This endpoint has been requested too many times. Try again later."
        );
        assert_eq!(error.retry_after(), Some(Duration::from_secs(60)));
    }

    #[test]
    fn server_errors_are_transient_and_shortened() {
        let error = parse(502, "<html>bad gateway</html>");
        assert_eq!(error.reason(), "GitLabUnavailable");
        assert!(error.is_transient());
        assert_eq!(error.status(), Some(502));

        let long = "x".repeat(5000);
        let error = parse(500, &long);
        assert!(error.message().chars().count() <= MAX_BODY_TEXT + 1);

        let error = parse(500, r#"{"message":"500 Internal Server Error"}"#);
        assert_eq!(error.message(), "500 Internal Server Error");
    }

    #[test]
    fn transport_errors() {
        let timeout = Error::Timeout {
            method: "GET".into(),
            route: "/groups/:id".into(),
        };
        assert_eq!(timeout.reason(), "GitLabUnavailable");
        assert!(timeout.is_transient());
        let network = Error::Network {
            message: "connection refused".into(),
        };
        assert!(network.is_transient());
        assert_eq!(network.reason(), "GitLabUnavailable");
        assert!(!parse(409, "{}").is_transient());
        assert_eq!(
            parse(409, r#"{"message":"409 Conflict"}"#).reason(),
            "Conflict"
        );
        assert_eq!(parse(422, "nope").reason(), "InvalidSpec");
    }
}
