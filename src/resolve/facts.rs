//! What one kind's reconcile reads about the other kind, as one small value per object. The
//! reconciles read only these, and the cross-kind trigger filters hash exactly these, so a
//! change the other side acts on always requeues it, and nothing else does.

use kube::ResourceExt;

use crate::crd::conditions::{self, SYNCED};
use crate::crd::reasons::Reason;
use crate::crd::{Upstream, VirtualRegistry};

/// Where an object stands with its GitLab id, as the other kind needs to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GitLabId {
    /// It has one.
    Held(i64),
    /// It has none yet but is getting one: the other side waits for it.
    OnItsWay,
    /// It has none and is not getting one (suspended, or its last reconcile failed): the
    /// other side does not wait for it.
    Blocked,
}

impl GitLabId {
    pub fn held(self) -> Option<i64> {
        match self {
            Self::Held(id) => Some(id),
            Self::OnItsWay | Self::Blocked => None,
        }
    }
}

/// What a VirtualRegistry reconcile reads about an Upstream.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UpstreamFacts {
    pub namespace: Option<String>,
    pub name: String,
    pub id: GitLabId,
    /// Being deleted: a registry's deletion need not keep it in GitLab.
    pub leaving: bool,
}

/// What an Upstream reconcile reads about a VirtualRegistry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RegistryFacts {
    pub namespace: Option<String>,
    pub name: String,
    /// `spec.group` as written.
    pub group: String,
    /// The names of the Upstreams it lists, in order.
    pub upstreams: Vec<String>,
    pub id: GitLabId,
    /// Being deleted: an Upstream is not created through it.
    pub leaving: bool,
}

impl RegistryFacts {
    /// The position of `upstream` in the registry's list.
    pub fn position_of(&self, upstream: &str) -> Option<usize> {
        self.upstreams.iter().position(|name| name == upstream)
    }
}

/// An Upstream without a GitLab id is not on its way to one when it is suspended, or its
/// last reconcile failed for another reason than waiting for a registry (a failed
/// connection test, a refusal by GitLab, a missing Secret).
pub fn upstream_facts(upstream: &Upstream) -> UpstreamFacts {
    let status = upstream.status.as_ref();
    let id = match status.and_then(|s| s.upstream_id) {
        Some(id) => GitLabId::Held(id),
        None => {
            let failed = status
                .and_then(|status| conditions::false_reason(&status.conditions, SYNCED))
                .is_some_and(|reason| Reason::parse(reason) != Some(Reason::WaitingForRegistry));
            if upstream.spec.suspend || failed {
                GitLabId::Blocked
            } else {
                GitLabId::OnItsWay
            }
        }
    };
    UpstreamFacts {
        namespace: upstream.namespace(),
        name: upstream.name_any(),
        id,
        leaving: upstream.metadata.deletion_timestamp.is_some(),
    }
}

/// A registry without a GitLab id is getting one unless it is suspended or its last
/// reconcile failed.
pub fn registry_facts(registry: &VirtualRegistry) -> RegistryFacts {
    let status = registry.status.as_ref();
    let id = match status.and_then(|s| s.registry_id) {
        Some(id) => GitLabId::Held(id),
        None => {
            let failed = status.is_some_and(|status| {
                conditions::false_reason(&status.conditions, SYNCED).is_some()
            });
            if registry.spec.suspend || failed {
                GitLabId::Blocked
            } else {
                GitLabId::OnItsWay
            }
        }
    };
    RegistryFacts {
        namespace: registry.namespace(),
        name: registry.name_any(),
        group: registry.spec.group.clone(),
        upstreams: registry
            .spec
            .upstreams
            .iter()
            .map(|u| u.name.clone())
            .collect(),
        id,
        leaving: registry.metadata.deletion_timestamp.is_some(),
    }
}
