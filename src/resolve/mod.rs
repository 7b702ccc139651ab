//! Turning custom resources, plus what they read of the other objects ([`World`]), into
//! engine requests. Knows the `crd` types, never the Kubernetes client: the controller and
//! standalone `apply`/`plan` are the drivers that feed it, so both send GitLab the same calls
//! for the same objects.

pub mod facts;
pub mod upstream;
pub mod world;

pub use facts::{GitLabId, RegistryFacts, UpstreamFacts, registry_facts, upstream_facts};
pub use world::{Objects, World};
