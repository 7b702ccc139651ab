//! A stateful GitLab API simulator served over HTTP, used by tests, the demo and `sim`.
