//! gitlab-registry-operator: keeps GitLab container virtual registries, their upstreams and
//! container tag cleanups in line with Kubernetes objects.
//!
//! `sync` and `cleanup` know nothing of Kubernetes; `resolve` turns objects into engine
//! requests and outcomes into status for both drivers, `controller` (the thin glue between
//! the cluster and the engines) and `standalone`; `sim` is a GitLab simulator used by tests,
//! the demo and `sim`. See ARCHITECTURE.md.

pub mod cleanup;
pub mod controller;
pub mod crd;
pub mod gitlab;
pub mod resolve;
pub mod sim;
pub mod standalone;
pub mod sync;
pub mod tenancy;
