//! Typed GitLab REST client: authentication, pagination, retries, rate limiting, typed errors.
