//! Kubernetes glue: watches, finalizers, status patches, events, metrics, health, leader election.
