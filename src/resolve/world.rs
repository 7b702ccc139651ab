//! What a reconcile may know about the other objects: [`World`] answers it for both drivers,
//! the controller from its reflector stores, standalone from the manifests and the ids found
//! so far in the pass.

use super::facts::{RegistryFacts, UpstreamFacts, registry_facts, upstream_facts};
use crate::crd::{Upstream, VirtualRegistry};

/// The other objects a reconcile reads, and the GitLab ids they hold.
pub trait World {
    /// Every VirtualRegistry, in any namespace.
    fn registries(&self) -> Vec<RegistryFacts>;
    /// Every Upstream, in any namespace.
    fn upstreams(&self) -> Vec<UpstreamFacts>;
    /// Whether a registry on its way to an id gets it from the plan being made (standalone
    /// `plan`), rather than from a reconcile still to come.
    fn plans_creations(&self) -> bool;
}

/// Objects as the cluster holds them: ids from their status.
#[derive(Default)]
pub struct Objects<'a> {
    pub registries: Vec<&'a VirtualRegistry>,
    pub upstreams: Vec<&'a Upstream>,
}

impl World for Objects<'_> {
    fn registries(&self) -> Vec<RegistryFacts> {
        self.registries.iter().map(|r| registry_facts(r)).collect()
    }

    fn upstreams(&self) -> Vec<UpstreamFacts> {
        self.upstreams.iter().map(|u| upstream_facts(u)).collect()
    }

    fn plans_creations(&self) -> bool {
        false
    }
}
