//! Kube-free reconcile engines: desired spec + resolved inputs + GitLab client -> outcome.
