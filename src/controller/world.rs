//! The controller's [`World`]: the other objects as its reflector stores hold them.

use std::sync::Arc;

use super::Context;
use crate::crd::{Upstream, VirtualRegistry};
use crate::resolve::{self, RegistryFacts, UpstreamFacts, World};

/// A snapshot of the stores, taken once per reconcile.
pub struct Stores {
    registries: Vec<Arc<VirtualRegistry>>,
    upstreams: Vec<Arc<Upstream>>,
}

impl Stores {
    pub fn of(ctx: &Context) -> Self {
        Self {
            registries: ctx.registries.state(),
            upstreams: ctx.upstreams.state(),
        }
    }
}

impl World for Stores {
    fn registries(&self) -> Vec<RegistryFacts> {
        self.registries
            .iter()
            .map(|r| resolve::registry_facts(r))
            .collect()
    }

    fn upstreams(&self) -> Vec<UpstreamFacts> {
        self.upstreams
            .iter()
            .map(|u| resolve::upstream_facts(u))
            .collect()
    }

    fn plans_creations(&self) -> bool {
        false
    }
}
