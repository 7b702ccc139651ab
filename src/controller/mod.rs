//! Kubernetes glue: watches, finalizers, status patches, events, metrics, health, leader
//! election. Each reconcile reads the object and what it references (dereference), checks
//! what the apiserver cannot (validate), hands resolved inputs to a `sync` engine, and writes
//! the outcome back as status (only when it changed) and Events. No GitLab rule lives here.

pub mod cleanup_policy;
pub mod connection;
pub mod context;
pub mod error;
pub mod metrics;
pub mod reconciler;
pub mod registry;
pub mod runtime;
pub mod status;
pub mod tenancy;
pub mod triggers;
pub mod upstream;
pub mod world;

pub use context::{Context, OperatorConfig};
pub use error::{Error, Result};

/// The one field manager of every server-side apply this operator sends.
pub const FIELD_MANAGER: &str = "gitlab-registry-operator";
