//! Typed request and response bodies of the GitLab endpoints the operator uses.
//!
//! Responses ignore unknown fields and default missing optional ones, so newer GitLab
//! versions (and the simulator) decode. Request types holding a password keep it in a
//! [`SecretString`]; their `Debug` redacts it.

use jiff::Timestamp;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A container virtual registry (`/virtual_registries/container/registries/:id`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtualRegistry {
    pub id: i64,
    #[serde(default)]
    pub group_id: i64,
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub created_at: Option<Timestamp>,
    #[serde(default)]
    pub updated_at: Option<Timestamp>,
    /// Present on `GET /registries/:id` only.
    #[serde(default)]
    pub registry_upstreams: Vec<RegistryUpstream>,
}

/// An association between a registry and an upstream, with the upstream's position.
///
/// GitLab omits `registry_id` in a registry's own listing and `upstream_id` in an upstream's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryUpstream {
    pub id: i64,
    #[serde(default)]
    pub registry_id: Option<i64>,
    #[serde(default)]
    pub upstream_id: Option<i64>,
    pub position: i64,
}

/// An upstream registry. The password is write-only and never returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upstream {
    pub id: i64,
    #[serde(default)]
    pub group_id: i64,
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    pub url: String,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default = "default_cache_validity_hours")]
    pub cache_validity_hours: i64,
    #[serde(default)]
    pub created_at: Option<Timestamp>,
    #[serde(default)]
    pub updated_at: Option<Timestamp>,
    /// The association through which it was listed or created
    /// (`GET/POST /registries/:id/upstreams`).
    #[serde(default)]
    pub registry_upstream: Option<RegistryUpstream>,
    /// Every association (`GET /upstreams/:id`).
    #[serde(default)]
    pub registry_upstreams: Vec<RegistryUpstream>,
}

fn default_cache_validity_hours() -> i64 {
    24
}

/// Upstream credentials. GitLab's model wants both or neither (a username without a password
/// is `{"password":["can't be blank"]}`, and the reverse); a create also refuses one alone.
#[derive(Debug, Clone)]
pub struct UpstreamCredentials {
    pub username: String,
    pub password: SecretString,
}

impl UpstreamCredentials {
    pub fn new(username: impl Into<String>, password: SecretString) -> Self {
        Self {
            username: username.into(),
            password,
        }
    }

    fn write_into(&self, body: &mut Map<String, Value>) {
        body.insert("username".into(), Value::String(self.username.clone()));
        body.insert(
            "password".into(),
            Value::String(self.password.expose_secret().to_owned()),
        );
    }
}

/// `POST /virtual_registries/container/registries/:id/upstreams`.
#[derive(Debug, Clone, Default)]
pub struct NewUpstream {
    pub name: String,
    pub url: String,
    pub description: Option<String>,
    pub cache_validity_hours: Option<i64>,
    pub credentials: Option<UpstreamCredentials>,
}

impl NewUpstream {
    /// The same fields as an update, all of the required ones set.
    pub(crate) fn to_body(&self) -> Value {
        UpstreamUpdate {
            name: Some(self.name.clone()),
            url: Some(self.url.clone()),
            description: self.description.clone(),
            cache_validity_hours: self.cache_validity_hours,
            credentials: self.credentials.clone(),
        }
        .to_body()
    }
}

/// `PATCH /virtual_registries/container/upstreams/:id`; `None` fields are not sent.
///
/// A url change clears the stored credentials unless both username and password change in
/// that same request (re-sending the stored ones counts as no change): send credentials in a
/// later PATCH than the url.
#[derive(Debug, Clone, Default)]
pub struct UpstreamUpdate {
    pub name: Option<String>,
    pub url: Option<String>,
    pub description: Option<String>,
    pub cache_validity_hours: Option<i64>,
    pub credentials: Option<UpstreamCredentials>,
}

impl UpstreamUpdate {
    pub fn is_empty(&self) -> bool {
        self.name.is_none()
            && self.url.is_none()
            && self.description.is_none()
            && self.cache_validity_hours.is_none()
            && self.credentials.is_none()
    }

    pub(crate) fn to_body(&self) -> Value {
        let mut body = Map::new();
        if let Some(name) = &self.name {
            body.insert("name".into(), Value::String(name.clone()));
        }
        if let Some(url) = &self.url {
            body.insert("url".into(), Value::String(url.clone()));
        }
        if let Some(description) = &self.description {
            body.insert("description".into(), Value::String(description.clone()));
        }
        if let Some(hours) = self.cache_validity_hours {
            body.insert("cache_validity_hours".into(), Value::from(hours));
        }
        if let Some(credentials) = &self.credentials {
            credentials.write_into(&mut body);
        }
        Value::Object(body)
    }
}

/// Overrides for `POST /virtual_registries/container/upstreams/:id/test`; all optional.
#[derive(Debug, Clone, Default)]
pub struct UpstreamTestOverrides {
    pub url: Option<String>,
    pub credentials: Option<UpstreamCredentials>,
}

impl UpstreamTestOverrides {
    pub(crate) fn to_body(&self) -> Value {
        let mut body = Map::new();
        if let Some(url) = &self.url {
            body.insert("url".into(), Value::String(url.clone()));
        }
        if let Some(credentials) = &self.credentials {
            credentials.write_into(&mut body);
        }
        Value::Object(body)
    }
}

pub(crate) fn connection_test_body(url: &str, credentials: Option<&UpstreamCredentials>) -> Value {
    UpstreamTestOverrides {
        url: Some(url.to_owned()),
        credentials: credentials.cloned(),
    }
    .to_body()
}

/// Answer of the upstream connection tests: `{"success":false,"result":"Error: 401 - Unauthorized"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamTestResult {
    pub success: bool,
    #[serde(default)]
    pub result: Option<String>,
}

/// `PATCH /virtual_registries/container/registries/:id`; GitLab needs at least one field and
/// refuses a blank one (`400 {"error":"description is empty"}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RegistryUpdate {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// A cached image file or manifest of an upstream. GitLab lists them newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheEntry {
    /// Url-safe base64 of `"<group_id> <iid>"` (opaque: used only to delete the entry).
    pub id: String,
    #[serde(default)]
    pub group_id: i64,
    #[serde(default)]
    pub upstream_id: i64,
    #[serde(default)]
    pub upstream_checked_at: Option<Timestamp>,
    #[serde(default)]
    pub file_sha1: Option<String>,
    #[serde(default)]
    pub size: Option<i64>,
    pub relative_path: String,
    #[serde(default)]
    pub content_type: Option<String>,
    #[serde(default)]
    pub upstream_etag: Option<String>,
    #[serde(default)]
    pub created_at: Option<Timestamp>,
    #[serde(default)]
    pub updated_at: Option<Timestamp>,
    #[serde(default)]
    pub downloads_count: i64,
    #[serde(default)]
    pub downloaded_at: Option<Timestamp>,
}

/// A container repository of a project.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRepository {
    pub id: i64,
    #[serde(default)]
    pub name: String,
    pub path: String,
    #[serde(default)]
    pub project_id: i64,
    /// `registry.example.com/group/project/name`: what Pod images refer to.
    #[serde(default)]
    pub location: String,
    #[serde(default)]
    pub created_at: Option<Timestamp>,
    #[serde(default)]
    pub cleanup_policy_started_at: Option<Timestamp>,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub tags_count: Option<i64>,
    #[serde(default)]
    pub tags: Option<Vec<Tag>>,
    #[serde(default)]
    pub size: Option<i64>,
}

/// A tag as listed. GitLab with the registry metadata database also lists the details
/// fields; without it (and in the documented shape) only `name`, `path` and `location`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tag {
    pub name: String,
    #[serde(default)]
    pub path: String,
    #[serde(default)]
    pub location: String,
    /// Manifest digest, when the list carries details.
    #[serde(default)]
    pub digest: Option<String>,
    /// Manifest creation time, when the list carries details.
    #[serde(default)]
    pub created_at: Option<Timestamp>,
}

/// A tag with its manifest details (`GET .../tags/:tag_name`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagDetails {
    pub name: String,
    #[serde(default)]
    pub path: String,
    #[serde(default)]
    pub location: String,
    #[serde(default)]
    pub revision: Option<String>,
    #[serde(default)]
    pub short_revision: Option<String>,
    #[serde(default)]
    pub digest: Option<String>,
    #[serde(default)]
    pub created_at: Option<Timestamp>,
    #[serde(default)]
    pub total_size: Option<i64>,
}

/// Criteria of `DELETE /projects/:id/registry/repositories/:repository_id/tags`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BulkTagDelete {
    /// RE2; required by GitLab. Anchored by plain concatenation, `"\\A" + regex + "\\z"`, so
    /// an alternation needs its own group: `v1|v2` also matches `v1-rc`.
    pub name_regex_delete: String,
    pub name_regex_keep: Option<String>,
    pub keep_n: Option<u32>,
    /// Human duration: `1h`, `1d`, `2d`, `1month`. GitLab does not check it when it accepts
    /// the request: a value its worker cannot parse deletes nothing (INFERRED).
    pub older_than: Option<String>,
}

impl BulkTagDelete {
    pub(crate) fn to_params(&self) -> Vec<(String, String)> {
        let mut params = vec![(
            "name_regex_delete".to_owned(),
            self.name_regex_delete.clone(),
        )];
        if let Some(keep) = &self.name_regex_keep {
            params.push(("name_regex_keep".to_owned(), keep.clone()));
        }
        if let Some(keep_n) = self.keep_n {
            params.push(("keep_n".to_owned(), keep_n.to_string()));
        }
        if let Some(older_than) = &self.older_than {
            params.push(("older_than".to_owned(), older_than.clone()));
        }
        params
    }
}

/// A project, reduced to what the operator reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Project {
    pub id: i64,
    #[serde(default)]
    pub path_with_namespace: Option<String>,
    #[serde(default)]
    pub container_expiration_policy: Option<ContainerExpirationPolicy>,
}

/// A project's cleanup policy as GitLab runs it (`container_expiration_policy`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerExpirationPolicy {
    /// `1d`, `7d`, `14d`, `1month`, `3month`.
    #[serde(default)]
    pub cadence: String,
    #[serde(default)]
    pub enabled: bool,
    #[serde(default)]
    pub keep_n: Option<i64>,
    #[serde(default)]
    pub older_than: Option<String>,
    /// The delete regex (GitLab's answer has no `name_regex_delete`). Required, and both
    /// regexes RE2-checked, only while the policy is enabled.
    #[serde(default)]
    pub name_regex: Option<String>,
    #[serde(default)]
    pub name_regex_keep: Option<String>,
    #[serde(default)]
    pub next_run_at: Option<Timestamp>,
}

/// `container_expiration_policy_attributes` of `PUT /projects/:id`. `None` is not sent;
/// `Some(None)` sends `null` (GitLab's "no limit" for `keep_n` and `older_than`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ContainerExpirationPolicyUpdate {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cadence: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_n: Option<Option<i64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub older_than: Option<Option<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name_regex: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name_regex_keep: Option<String>,
}

/// A branch of a project's repository (`GET /projects/:id/repository/branches`); only the
/// fields the operator reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Branch {
    /// `feature/Login-Form`, as pushed.
    pub name: String,
    #[serde(default)]
    pub merged: bool,
    #[serde(default)]
    pub protected: bool,
    #[serde(default)]
    pub default: bool,
}

/// A container tag protection rule (`/projects/:id/registry/protection/tag/rules`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagProtectionRule {
    pub id: i64,
    #[serde(default)]
    pub project_id: i64,
    /// RE2 pattern of protected tag names.
    pub tag_name_pattern: String,
    #[serde(default)]
    pub minimum_access_level_for_push: Option<String>,
    /// `maintainer`, `owner` or `admin`.
    #[serde(default)]
    pub minimum_access_level_for_delete: Option<String>,
}

/// One page of an offset-paginated list with GitLab's pagination headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// `x-page`.
    pub page: Option<u32>,
    /// `x-per-page`.
    pub per_page: Option<u32>,
    /// `x-next-page`; `None` on the last page.
    pub next_page: Option<u32>,
    /// `x-total`.
    pub total: Option<u64>,
    /// `x-total-pages`.
    pub total_pages: Option<u32>,
}

/// One page of a keyset-paginated list; `next` is GitLab's `Link: <…>; rel="next"` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeysetPage<T> {
    pub items: Vec<T>,
    pub next: Option<url::Url>,
}

/// `page` / `per_page` of offset pagination (GitLab defaults: 1 and 20, max 100).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageRequest {
    pub page: Option<u32>,
    pub per_page: Option<u32>,
}

impl PageRequest {
    pub fn new(page: u32, per_page: u32) -> Self {
        Self {
            page: Some(page),
            per_page: Some(per_page),
        }
    }
}

/// Sort order of keyset tag listing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SortOrder {
    #[default]
    Asc,
    Desc,
}

impl SortOrder {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Asc => "asc",
            Self::Desc => "desc",
        }
    }
}

/// First page of a keyset tag listing: `?pagination=keyset&per_page=N&sort=…&last=…`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeysetRequest {
    pub per_page: Option<u32>,
    pub sort: Option<SortOrder>,
    /// Start after this tag name.
    pub last: Option<String>,
}

/// Query of the project container repository list.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RepositoryListRequest {
    pub page: PageRequest,
    pub tags: bool,
    pub tags_count: bool,
}

/// Query of `GET /registry/repositories/:id`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RepositoryDetailsRequest {
    pub tags: bool,
    pub tags_count: bool,
    pub size: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_examples_decode() {
        let registry: VirtualRegistry = serde_json::from_str(
            r#"{"id":1,"group_id":5,"name":"my-container-virtual-registry","description":"My container virtual registry","created_at":"2024-05-30T12:28:27.855Z","updated_at":"2024-05-30T12:28:27.855Z","registry_upstreams":[{"id":2,"position":1,"upstream_id":2}],"new_field":true}"#,
        )
        .expect("registry");
        assert_eq!(registry.registry_upstreams[0].upstream_id, Some(2));

        let upstream: Upstream = serde_json::from_str(
            r#"{"id":1,"group_id":5,"url":"https://registry-1.docker.io","name":"Docker Hub","description":"Docker Hub registry","cache_validity_hours":24,"username":"user","created_at":"2024-05-30T12:28:27.855Z","updated_at":"2024-05-30T12:28:27.855Z","registry_upstream":{"id":1,"registry_id":1,"position":1}}"#,
        )
        .expect("upstream");
        assert_eq!(
            upstream.registry_upstream.map(|link| link.position),
            Some(1)
        );

        let entry: CacheEntry = serde_json::from_str(
            r#"{"id":"MTUgbGlicmFyeS9uZ2lueC9tYW5pZmVzdC9zaGEyNTY6YWJjZGVmZ2hpams=","group_id":5,"upstream_id":1,"upstream_checked_at":"2024-05-30T12:28:27.855Z","file_sha1":"74d101856d26f2db17b39bd22d3204021eb0bf7d","size":2048,"relative_path":"library/nginx/manifests/latest","content_type":"application/vnd.docker.distribution.manifest.v2+json","upstream_etag":"\"686897696a7c876b7e\"","created_at":"2024-05-30T12:28:27.855Z","updated_at":"2024-05-30T12:28:27.855Z","downloads_count":5,"downloaded_at":"2024-06-05T14:58:32.855Z"}"#,
        )
        .expect("cache entry");
        assert_eq!(entry.downloads_count, 5);

        let tag: TagDetails = serde_json::from_str(
            r#"{"name":"v10.0.0","path":"group/project:latest","location":"gitlab.example.com:5000/group/project:latest","revision":"e9ed","short_revision":"e9ed9d87c","digest":"sha256:c349","created_at":"2019-01-06T16:49:51.272+00:00","total_size":350224384}"#,
        )
        .expect("tag");
        assert_eq!(tag.created_at.map(|t| t.as_second()), Some(1546793391));

        let repository: ContainerRepository = serde_json::from_str(
            r#"{"id":2,"name":"","path":"group/project","project_id":9,"location":"gitlab.example.com:5000/group/project","created_at":"2019-01-10T13:38:57.391Z","cleanup_policy_started_at":null,"tags_count":1,"tags":[{"name":"0.0.1","path":"group/project:0.0.1","location":"x"}],"size":2818413,"status":null}"#,
        )
        .expect("repository");
        assert_eq!(repository.tags_count, Some(1));
    }

    #[test]
    fn request_bodies() {
        let update = UpstreamUpdate {
            url: Some("https://quay.io".into()),
            credentials: Some(UpstreamCredentials::new(
                "bot",
                SecretString::from("s3cret"),
            )),
            ..UpstreamUpdate::default()
        };
        assert_eq!(
            update.to_body(),
            serde_json::json!({"url":"https://quay.io","username":"bot","password":"s3cret"})
        );
        assert!(!format!("{update:?}").contains("s3cret"));
        assert!(UpstreamUpdate::default().is_empty());

        let policy = ContainerExpirationPolicyUpdate {
            cadence: Some("7d".into()),
            enabled: Some(true),
            keep_n: Some(None),
            ..ContainerExpirationPolicyUpdate::default()
        };
        assert_eq!(
            serde_json::to_value(&policy).expect("json"),
            serde_json::json!({"cadence":"7d","enabled":true,"keep_n":null})
        );

        let bulk = BulkTagDelete {
            name_regex_delete: ".*".into(),
            keep_n: Some(5),
            ..BulkTagDelete::default()
        };
        assert_eq!(
            bulk.to_params(),
            vec![
                ("name_regex_delete".to_owned(), ".*".to_owned()),
                ("keep_n".to_owned(), "5".to_owned())
            ]
        );
    }
}
