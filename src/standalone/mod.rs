//! Standalone mode (`apply`, `plan`): reconcile manifests on disk against GitLab once, with the
//! same `sync` engines the controllers use, without a cluster.

pub mod manifests;
