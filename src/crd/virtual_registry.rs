//! The `VirtualRegistry` kind: one GitLab container virtual registry and the ordered list of
//! upstreams it pulls through.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{DeletionPolicy, GitLabConnection, LocalObjectReference};

/// GitLab's limit of upstreams per virtual registry.
pub const MAX_UPSTREAMS: usize = 5;

/// Desired state of a GitLab container virtual registry.
// Each printcolumn(...) repeats `type_ = ...`, which clippy reads as a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "gitlabregistry.io",
    version = "v1alpha1",
    kind = "VirtualRegistry",
    namespaced,
    status = "VirtualRegistryStatus",
    shortname = "vreg",
    category = "gitlabregistry",
    doc = "A GitLab container virtual registry: a pull-through cache in front of an ordered list of upstream registries.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Registry ID",
        type_ = "integer",
        json_path = ".status.registryId"
    ),
    printcolumn(
        name = "Pull prefix",
        type_ = "string",
        json_path = ".status.pullPrefix",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct VirtualRegistrySpec {
    /// Top-level GitLab group that owns the registry: its full path (`my-org`) or numeric id.
    #[schemars(length(min = 1))]
    pub group: String,
    /// Name of the registry in GitLab, unique in the group. Defaults to `metadata.name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub name: Option<String>,
    /// Description of the registry in GitLab. Unset: left as it is in GitLab.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,
    /// Upstreams in the order GitLab tries them: the first entry gets position 1. Each names an
    /// `Upstream` in this namespace. At most 5 (GitLab's limit). Upstreams associated in
    /// GitLab but missing here are disassociated.
    #[serde(default)]
    #[schemars(length(max = 5))]
    #[x_kube(validation = Rule::new("self.all(x, self.exists_one(y, y.name == x.name))").message("upstream names must be unique"))]
    pub upstreams: Vec<LocalObjectReference>,
    /// What happens to the GitLab registry when this object is deleted. With `Delete`, upstreams
    /// whose `Upstream` objects still exist are first disassociated so GitLab keeps them.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
    /// Stop reconciling: nothing is sent to GitLab while true.
    #[serde(default)]
    pub suspend: bool,
    /// GitLab connection for this object; unset: the operator's default connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gitlab: Option<GitLabConnection>,
}

/// Observed state of the virtual registry.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualRegistryStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Id of the registry in GitLab.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_id: Option<i64>,
    /// Numeric id of the top-level group that owns the registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<i64>,
    /// Image prefix to pull through: `<gitlab host>/virtual_registries/container/<registryId>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_prefix: Option<String>,
    /// The upstreams as associated in GitLab, in position order.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub upstreams: Vec<RegistryUpstreamStatus>,
    /// Last value of the `gitlabregistry.io/purge-cache-requested-at` annotation acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handled_purge_cache_at: Option<String>,
    /// Last value of the `gitlabregistry.io/reconcile-requested-at` annotation acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handled_reconcile_at: Option<String>,
    /// `Ready`, `Synced` and `UpstreamsResolved`.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// One upstream as associated with the registry in GitLab.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegistryUpstreamStatus {
    /// Name of the `Upstream` object.
    pub name: String,
    /// Id of the upstream in GitLab.
    pub upstream_id: i64,
    /// Id of the registry-upstream association in GitLab.
    pub association_id: i64,
    /// Position in the registry (1 is tried first).
    pub position: i32,
}

impl VirtualRegistry {
    /// Name of the registry in GitLab: `spec.name`, else `metadata.name`.
    pub fn gitlab_name(&self) -> String {
        self.spec
            .name
            .clone()
            .or_else(|| self.metadata.name.clone())
            .unwrap_or_default()
    }
}
