//! Tenancy, pure: who may point the operator's own GitLab connection at which groups and
//! projects (the access policy of `--access-policy`), and which of several objects that
//! resolve to one GitLab object manages it (ownership). No I/O and no Kubernetes client:
//! the controllers and `apply`/`plan` hand in objects and get decisions back.

pub mod access;
pub mod claims;
pub mod ownership;

pub use access::{AccessPolicy, Denial, Target};
pub use ownership::{Claim, Contender, GitLabObject};
