//! Turning custom resources, plus what they read of the other objects ([`World`]), into
//! engine requests. Knows the `crd` types, never the Kubernetes client: the controller and
//! standalone `apply`/`plan` are the drivers that feed it, so both send GitLab the same calls
//! for the same objects.

pub mod cleanup_policy;
pub mod facts;
pub mod registry;
pub mod stamp;
pub mod upstream;
pub mod world;

pub use facts::{GitLabId, RegistryFacts, UpstreamFacts, registry_facts, upstream_facts};
pub use world::{Objects, World};

/// A spec the rules refuse before anything is sent to GitLab.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The spec cannot work as written.
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    /// The spec names an object that does not exist; a new object may fix it.
    #[error("invalid spec: {0}")]
    MissingReference(String),
    /// The engine's own check of the spec refused it.
    #[error(transparent)]
    Engine(#[from] crate::sync::Error),
}

impl Error {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidSpec(_) | Self::MissingReference(_) => {
                crate::crd::reasons::Reason::InvalidSpec.as_str()
            }
            Self::Engine(error) => error.reason(),
        }
    }

    /// The condition message, as the controller writes it.
    pub fn message(&self) -> String {
        match self {
            Self::InvalidSpec(_) => self.to_string(),
            Self::MissingReference(message) => message.clone(),
            Self::Engine(error) => error.message(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
