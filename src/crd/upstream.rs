//! The `Upstream` kind: one GitLab container upstream registry (Docker Hub, Quay, …) that
//! virtual registries pull through.

use crate::crd::reasons::Reason;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{DeletionPolicy, GitLabConnection, default_true};

/// Desired state of a GitLab container upstream registry.
// Each printcolumn(...) repeats `type_ = ...`, which clippy reads as a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "gitlabregistry.io",
    version = "v1alpha1",
    kind = "Upstream",
    namespaced,
    status = "UpstreamStatus",
    shortname = "vup",
    category = "gitlabregistry",
    doc = "A GitLab container upstream registry (for example Docker Hub) that virtual registries pull through and cache.",
    printcolumn(name = "URL", type_ = "string", json_path = ".spec.url"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Reachable",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Reachable\")].status"
    ),
    printcolumn(
        name = "Upstream ID",
        type_ = "integer",
        json_path = ".status.upstreamId"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamSpec {
    /// Top-level GitLab group that owns the upstream: its full path (`my-org`) or numeric id.
    #[schemars(length(min = 1))]
    pub group: String,
    /// Name of the upstream in GitLab. Defaults to the object's `metadata.name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub name: Option<String>,
    /// URL of the upstream container registry, e.g. `https://registry-1.docker.io`.
    /// http or https only; GitLab refuses localhost and local network addresses.
    #[schemars(length(min = 1, max = 255))]
    #[x_kube(validation = Rule::new("self.startsWith('https://') || self.startsWith('http://')").message("url must start with http:// or https://"))]
    pub url: String,
    /// Description of the upstream in GitLab. Unset: left as it is in GitLab.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,
    /// Hours a cached image stays valid before GitLab checks the upstream again; 0 disables
    /// revalidation.
    #[serde(default = "default_cache_validity_hours")]
    #[schemars(range(min = 0))]
    pub cache_validity_hours: i32,
    /// Secret in this namespace holding the upstream's username and password. Unset: anonymous
    /// pulls. GitLab never returns the password, so it is re-sent whenever the Secret changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<CredentialsSecretReference>,
    /// Connection tests against the upstream, before changes and periodically.
    #[serde(default)]
    pub connectivity_check: ConnectivityCheck,
    /// What happens to the GitLab upstream when this object is deleted.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
    /// Stop reconciling: nothing is sent to GitLab while true.
    #[serde(default)]
    pub suspend: bool,
    /// GitLab connection for this object; unset: the operator's default connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gitlab: Option<GitLabConnection>,
}

fn default_cache_validity_hours() -> i32 {
    24
}

/// Secret in the object's namespace with the upstream registry's credentials.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CredentialsSecretReference {
    /// Name of the Secret, in the same namespace as the Upstream.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key of the username in the Secret's data.
    #[serde(default = "default_username_key")]
    pub username_key: String,
    /// Key of the password (or access token) in the Secret's data.
    #[serde(default = "default_password_key")]
    pub password_key: String,
}

fn default_username_key() -> String {
    "username".into()
}

fn default_password_key() -> String {
    "password".into()
}

/// How the operator tests the connection from GitLab to the upstream.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectivityCheck {
    /// Time between periodic connection tests, e.g. `10m`, `1h`.
    #[serde(default = "default_connectivity_interval")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.matches('^[1-9][0-9]*\\\\s*[a-z]+$')").message("interval must be a positive duration such as 10m, 1h or 1d"))]
    pub interval: String,
    /// When true, a failing test blocks a change of url or credentials: GitLab keeps the
    /// working configuration and `Synced` turns False with reason `ConnectivityTestFailed`.
    #[serde(default = "default_true")]
    pub gate_changes: bool,
}

fn default_connectivity_interval() -> String {
    "10m".into()
}

impl Default for ConnectivityCheck {
    fn default() -> Self {
        Self {
            interval: default_connectivity_interval(),
            gate_changes: true,
        }
    }
}

/// Observed state of the upstream.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Id of the upstream in GitLab.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_id: Option<i64>,
    /// Numeric id of the top-level group that owns the upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<i64>,
    /// The version of the credentials Secret last sent to GitLab (never a value or a hash).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_credentials: Option<AppliedCredentials>,
    /// Result of the last connection test. Written when the result or what was tested
    /// changes, not after every periodic test: the time of the latest test is the metric
    /// `gitlab_registry_operator_upstream_last_connectivity_check_timestamp_seconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_connectivity_check: Option<ConnectivityCheckResult>,
    /// Last value of the `gitlabregistry.io/purge-cache-requested-at` annotation acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handled_purge_cache_at: Option<String>,
    /// Last value of the `gitlabregistry.io/reconcile-requested-at` annotation acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handled_reconcile_at: Option<String>,
    /// `Ready`, `Synced` and `Reachable`.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// Which version of the credentials Secret GitLab holds.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AppliedCredentials {
    /// Name of the Secret the credentials came from.
    pub secret_name: String,
    /// `metadata.resourceVersion` of that Secret when its credentials were sent.
    pub resource_version: String,
}

/// Outcome of a connection test run by GitLab against the upstream.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectivityCheckResult {
    /// When a test first had this result: later tests with the same result leave it as it is.
    pub time: Time,
    /// Whether GitLab reached the upstream with the configured credentials.
    pub success: bool,
    /// GitLab's result text on failure, e.g. `Error: 401 - Unauthorized`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    /// The url that was tested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The version of the credentials Secret that was tested; absent for an anonymous test.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<AppliedCredentials>,
}

impl Upstream {
    /// Name of the upstream in GitLab: `spec.name`, else `metadata.name`.
    pub fn gitlab_name(&self) -> String {
        self.spec
            .name
            .clone()
            .or_else(|| self.metadata.name.clone())
            .unwrap_or_default()
    }
}

/// The password `export` writes into the credentials Secrets it generates: GitLab never
/// returns an upstream's password. Neither the controller nor standalone `plan`/`apply`
/// ever sends it to GitLab.
pub const PLACEHOLDER_PASSWORD: &str = "REPLACE-ME-gitlab-never-returns-upstream-passwords";

/// Condition reason of an Upstream whose credentials Secret still holds
/// [`PLACEHOLDER_PASSWORD`] where sending it would replace GitLab's working password.
pub const REASON_PLACEHOLDER_PASSWORD: &str = Reason::PlaceholderPassword.as_str();
