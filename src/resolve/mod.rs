//! Turning custom resources, plus what they read of the other objects, into engine requests.
//! Knows the `crd` types, never the Kubernetes client: the controller and standalone
//! `apply`/`plan` are the drivers that feed it.

pub mod facts;

pub use facts::{GitLabId, RegistryFacts, UpstreamFacts, registry_facts, upstream_facts};
