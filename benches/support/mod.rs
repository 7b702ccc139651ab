//! Shared by the benches: a simulator with a GitLab client for it, and a stand-in for the
//! `run` process's two controllers that drives the real `sync` engines through the real
//! rules (`resolve::{registry,upstream}::{request,status}`
//! and the watch predicates of `controller::triggers`).
//!
//! What the stand-in keeps from kube-rs's `Controller` as `run` wires it:
//! - status is carried between reconciles (known ids, applied credentials, last connection
//!   test's result) exactly as the controller writes it, and a status equal to the current
//!   one is not patched; the time of each Upstream's latest test is kept beside the status,
//!   as the controller keeps it in memory;
//! - a status patch is a watch event, filtered as `run` filters it ([`Requeues::Predicates`]):
//!   the own-kind stream passes only spec/intent changes (so never the operator's own status
//!   write), the Upstream → registry stream only a changed `upstreamId`, the registry →
//!   Upstream stream only a changed `registryId`/group/list. [`Requeues::EveryStatusWrite`]
//!   models the wiring before those predicates (every status write requeued the object and
//!   the mapped objects), for comparison;
//! - one scheduled run per object, the earliest wins; a trigger while the object runs makes
//!   it run once more afterwards; no concurrency limit (the controller's default);
//! - requeue after success: registries at the resync, Upstreams at the earlier of the resync
//!   and the next connection test;
//! - Upstreams read GitLab through the controller's group upstream listings, gated and keyed
//!   by the same `controller::upstream` functions (max age half the resync, on virtual time),
//!   and registries plan on the controller's recent registry views as `run` does.
//!
//! What it leaves out: the Kubernetes API itself (finalizer patch, status patches, Events,
//! watch latency): those cost no GitLab request.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gitlab_registry_operator::controller;
use gitlab_registry_operator::crd::conditions::{self, READY};
use gitlab_registry_operator::crd::upstream::ConnectivityCheckResult;
use gitlab_registry_operator::crd::{Upstream, VirtualRegistry};
use gitlab_registry_operator::gitlab::{ClientConfig, GitLabClient};
use gitlab_registry_operator::resolve;
use gitlab_registry_operator::sim::seed::SeedGroup;
use gitlab_registry_operator::sim::{DEFAULT_TOKEN, Seed, SimConfig, SimHandle, Simulator};
use gitlab_registry_operator::sync::Action;
use gitlab_registry_operator::sync::listing::UpstreamListings;
use gitlab_registry_operator::sync::registry::{RegistryViews, SharedViews};
use jiff::Timestamp;
use secrecy::SecretString;

/// The controller's default resync (`--resync`).
pub const RESYNC: Duration = controller::runtime::DEFAULT_RESYNC;

/// Starts a simulator with `groups` top-level groups `org-00`, `org-01`, … (ids 1000, 1001, …)
/// whose connection tests are answered by the built-in stub (no network).
pub async fn start_simulator(latency: Duration, groups: usize) -> SimHandle {
    let seed = Seed {
        groups: (0..groups)
            .map(|group| SeedGroup {
                id: 1000 + group as u64,
                full_path: group_path(group),
                name: None,
            })
            .collect(),
        ..Seed::default()
    };
    let config = SimConfig {
        latency,
        stub_upstreams: true,
        ..SimConfig::default()
    };
    Simulator::start(config, seed)
        .await
        .expect("the simulator starts on loopback")
}

pub fn group_path(group: usize) -> String {
    format!("org-{group:02}")
}

/// A client as the controller builds one: default retries and timeouts, no client-side limit.
pub fn client_for(sim: &SimHandle) -> GitLabClient {
    let config = ClientConfig::new(
        sim.base_url().parse().expect("simulator url"),
        SecretString::from(DEFAULT_TOKEN),
    );
    GitLabClient::new(config).expect("client")
}

/// GitLab requests counted by the simulator, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RequestTally {
    pub reads: u64,
    /// `POST …/upstreams/test` and `…/upstreams/:id/test`: POSTs that change nothing.
    pub connection_tests: u64,
    pub writes: u64,
}

impl RequestTally {
    pub fn from_counts(counts: &BTreeMap<String, u64>) -> Self {
        let mut tally = Self::default();
        for (key, count) in counts {
            if key.starts_with("GET ") || key.starts_with("HEAD ") {
                tally.reads += count;
            } else if key.starts_with("POST ") && key.ends_with("/test") {
                tally.connection_tests += count;
            } else {
                tally.writes += count;
            }
        }
        tally
    }

    pub fn total(&self) -> u64 {
        self.reads + self.connection_tests + self.writes
    }
}

/// One object of the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKey {
    Registry(usize),
    Upstream(usize),
}

/// The objects as a cluster would hold them (spec and status), and who requeues whom.
pub struct Fleet {
    registries: Vec<VirtualRegistry>,
    upstreams: Vec<Upstream>,
    /// Per registry: the Upstreams it lists (registry watch → upstream requeue).
    listed_upstreams: Vec<Vec<usize>>,
    /// Per upstream: the registries listing it (upstream watch → registry requeue).
    listing_registries: Vec<Vec<usize>>,
    /// The controller's group upstream listings (`Context::upstream_listings`).
    listings: Arc<UpstreamListings>,
    /// The controller's registry views (`Context::registry_views`).
    registry_views: Arc<RegistryViews>,
    /// The controller's latest connection test per Upstream
    /// (`Context::last_connectivity_checks`): status records a test only when its result
    /// changes.
    last_checks: std::collections::HashMap<usize, ConnectivityCheckResult>,
}

/// Which watch events requeue objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requeues {
    /// As `run` filters them (`controller::triggers`).
    Predicates,
    /// Every status write requeues the object and the mapped objects (no predicates).
    EveryStatusWrite,
}

/// What one reconcile did, for the driver.
#[derive(Debug, Clone)]
pub struct Reconciled {
    /// A status patch was sent (a watch event follows).
    pub patched: bool,
    /// The patch changed what the other kind's controller watches (`controller::triggers`).
    pub identity_changed: bool,
    pub requeue_after: Duration,
    /// The error's reason and GitLab's message, when it failed.
    pub error: Option<String>,
    /// What the reconcile did (action reasons), for traces.
    pub actions: Vec<&'static str>,
}

impl Reconciled {
    /// After a success the object requeues at `requeue_after_success`; after a failure at
    /// the controller's retry delay.
    fn new(
        patched: bool,
        identity_changed: bool,
        requeue_after_success: Duration,
        error: Option<&gitlab_registry_operator::sync::Error>,
        actions: &[Action],
    ) -> Self {
        Self {
            patched,
            identity_changed,
            requeue_after: after(error, requeue_after_success),
            error: error.map(|error| format!("{}: {}", error.reason(), error.message())),
            actions: actions.iter().map(|action| action.reason).collect(),
        }
    }

    pub fn failed(&self) -> bool {
        self.error.is_some()
    }
}

impl Fleet {
    /// `groups` namespaces `team-NN`, each targeting top-level group `org-NN` with
    /// `registries_per_group` VirtualRegistries that all list the group's
    /// `upstreams_per_group` Upstreams, in the same order.
    pub fn new(groups: usize, registries_per_group: usize, upstreams_per_group: usize) -> Self {
        Self::with_layout(groups, registries_per_group, upstreams_per_group, |_| {
            0..upstreams_per_group
        })
    }

    /// As [`Fleet::new`], but each VirtualRegistry lists `upstreams_per_registry` Upstreams of
    /// its own: `registries_per_group × upstreams_per_registry` Upstreams per group.
    pub fn with_distinct_upstreams(
        groups: usize,
        registries_per_group: usize,
        upstreams_per_registry: usize,
    ) -> Self {
        Self::with_layout(
            groups,
            registries_per_group,
            registries_per_group * upstreams_per_registry,
            |registry| registry * upstreams_per_registry..(registry + 1) * upstreams_per_registry,
        )
    }

    /// Registry `r` of each group lists the group's Upstreams `listed_by(r)`.
    fn with_layout(
        groups: usize,
        registries_per_group: usize,
        upstreams_per_group: usize,
        listed_by: impl Fn(usize) -> std::ops::Range<usize>,
    ) -> Self {
        let mut registries: Vec<VirtualRegistry> = Vec::new();
        let mut upstreams: Vec<Upstream> = Vec::new();
        for group in 0..groups {
            let namespace = format!("team-{group:02}");
            let upstream_names: Vec<String> = (0..upstreams_per_group)
                .map(|u| format!("upstream-{u}"))
                .collect();
            for (u, name) in upstream_names.iter().enumerate() {
                upstreams.push(object(serde_json::json!({
                    "apiVersion": "gitlabregistry.io/v1alpha1",
                    "kind": "Upstream",
                    "metadata": {"name": name, "namespace": namespace, "generation": 1},
                    "spec": {
                        "group": group_path(group),
                        "url": format!("https://registry-{u}.example.com"),
                    },
                })));
            }
            for r in 0..registries_per_group {
                let listed: Vec<_> = upstream_names[listed_by(r)]
                    .iter()
                    .map(|name| serde_json::json!({ "name": name }))
                    .collect();
                registries.push(object(serde_json::json!({
                    "apiVersion": "gitlabregistry.io/v1alpha1",
                    "kind": "VirtualRegistry",
                    "metadata": {"name": format!("cache-{r}"), "namespace": namespace, "generation": 1},
                    "spec": {"group": group_path(group), "upstreams": listed},
                })));
            }
        }
        let listed_upstreams = registries
            .iter()
            .map(|registry| {
                registry
                    .spec
                    .upstreams
                    .iter()
                    .filter_map(|reference| {
                        upstreams.iter().position(|upstream| {
                            upstream.metadata.namespace == registry.metadata.namespace
                                && upstream.metadata.name.as_deref()
                                    == Some(reference.name.as_str())
                        })
                    })
                    .collect()
            })
            .collect::<Vec<Vec<usize>>>();
        let mut listing_registries = vec![Vec::new(); upstreams.len()];
        for (registry, listed) in listed_upstreams.iter().enumerate() {
            for upstream in listed {
                listing_registries[*upstream].push(registry);
            }
        }
        Self {
            registries,
            upstreams,
            listed_upstreams,
            listing_registries,
            listings: Arc::new(controller::context::upstream_listings(RESYNC)),
            registry_views: Arc::new(controller::context::registry_views(RESYNC)),
            last_checks: Default::default(),
        }
    }

    pub fn keys(&self) -> Vec<ObjectKey> {
        (0..self.registries.len())
            .map(ObjectKey::Registry)
            .chain((0..self.upstreams.len()).map(ObjectKey::Upstream))
            .collect()
    }

    pub fn registry_count(&self) -> usize {
        self.registries.len()
    }

    pub fn upstream_count(&self) -> usize {
        self.upstreams.len()
    }

    pub fn object_count(&self) -> usize {
        self.registries.len() + self.upstreams.len()
    }

    /// What a reconcile's status patch requeues.
    pub fn requeued_by(
        &self,
        key: ObjectKey,
        reconciled: &Reconciled,
        requeues: Requeues,
    ) -> Vec<ObjectKey> {
        if !reconciled.patched {
            return Vec::new();
        }
        let mut requeued = Vec::new();
        match requeues {
            Requeues::Predicates if !reconciled.identity_changed => return requeued,
            Requeues::Predicates => {}
            Requeues::EveryStatusWrite => requeued.push(key),
        }
        match key {
            ObjectKey::Registry(registry) => requeued.extend(
                self.listed_upstreams[registry]
                    .iter()
                    .map(|u| ObjectKey::Upstream(*u)),
            ),
            ObjectKey::Upstream(upstream) => requeued.extend(
                self.listing_registries[upstream]
                    .iter()
                    .map(|r| ObjectKey::Registry(*r)),
            ),
        }
        requeued
    }

    pub fn is_ready(&self, key: ObjectKey) -> bool {
        let conditions = match key {
            ObjectKey::Registry(r) => self.registries[r].status.as_ref().map(|s| &s.conditions),
            ObjectKey::Upstream(u) => self.upstreams[u].status.as_ref().map(|s| &s.conditions),
        };
        conditions
            .and_then(|conditions| conditions::find(conditions, READY))
            .is_some_and(|ready| ready.status == "True")
    }

    pub fn all_ready(&self) -> bool {
        self.keys().into_iter().all(|key| self.is_ready(key))
    }

    pub fn registry(&self, index: usize) -> &VirtualRegistry {
        &self.registries[index]
    }

    /// The GitLab ids of the Upstreams registry `index` lists, in declared order, as far as
    /// their statuses know them.
    pub fn declared_upstream_ids(&self, index: usize) -> Vec<Option<i64>> {
        self.listed_upstreams[index]
            .iter()
            .map(|u| {
                self.upstreams[*u]
                    .status
                    .as_ref()
                    .and_then(|s| s.upstream_id)
            })
            .collect()
    }

    pub fn upstream(&self, index: usize) -> &Upstream {
        &self.upstreams[index]
    }
}

fn object<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
    serde_json::from_value(value).expect("a valid object")
}

/// One reconcile of `key` as the controller's `apply` does it: build the engine's request
/// from the object and the store, run the engine, derive the status, patch it if it changed.
/// The store is locked only to read and to write, never across a GitLab request.
pub async fn reconcile(
    fleet: &Mutex<Fleet>,
    client: &GitLabClient,
    key: ObjectKey,
    now: Timestamp,
) -> Reconciled {
    match key {
        ObjectKey::Registry(index) => {
            let (request, views, connection) = {
                let fleet = lock(fleet);
                let registry = &fleet.registries[index];
                (
                    resolve::registry::request(
                        registry,
                        &resolve::Objects {
                            upstreams: fleet.upstreams.iter().collect(),
                            ..Default::default()
                        },
                    ),
                    fleet.registry_views.clone(),
                    connection_of(
                        client,
                        registry.metadata.namespace.as_ref(),
                        registry.spec.gitlab.as_ref(),
                    ),
                )
            };
            let shared = SharedViews {
                views: &views,
                connection: &connection,
                now,
            };
            let outcome = gitlab_registry_operator::sync::registry::reconcile_with_views(
                client,
                &request,
                Some(shared),
            )
            .await;
            let mut fleet = lock(fleet);
            let registry = &mut fleet.registries[index];
            let identity_before = controller::triggers::registry_identity(registry);
            let current = registry.status.clone().unwrap_or_default();
            let status = resolve::registry::status(registry, &current, &outcome);
            let patched = registry.status.as_ref() != Some(&status);
            registry.status = Some(status);
            Reconciled::new(
                patched,
                controller::triggers::registry_identity(registry) != identity_before,
                RESYNC,
                outcome.error.as_ref(),
                &outcome.actions,
            )
        }
        ObjectKey::Upstream(index) => {
            let (connection, listings, registry_views);
            let (request, listing) = {
                let fleet = lock(fleet);
                let upstream = &fleet.upstreams[index];
                connection = connection_of(
                    client,
                    upstream.metadata.namespace.as_ref(),
                    upstream.spec.gitlab.as_ref(),
                );
                listings = fleet.listings.clone();
                registry_views = fleet.registry_views.clone();
                let mut request = resolve::upstream::request(
                    upstream,
                    None,
                    &resolve::Objects {
                        registries: fleet.registries.iter().collect(),
                        ..Default::default()
                    },
                    now,
                )
                .expect("valid Upstream specs");
                let latest = resolve::upstream::latest_check(
                    upstream
                        .status
                        .as_ref()
                        .and_then(|status| status.last_connectivity_check.as_ref()),
                    fleet.last_checks.get(&index),
                );
                resolve::upstream::with_latest_check(&mut request, latest.as_ref());
                let listing = controller::upstream::shared_listing(
                    upstream,
                    &listings,
                    &registry_views,
                    &connection,
                );
                (request, listing)
            };
            let outcome = gitlab_registry_operator::sync::upstream::reconcile_with_listing(
                client,
                &request,
                Some(listing),
            )
            .await;
            let mut fleet = lock(fleet);
            if let Some(check) = resolve::upstream::outcome_check(&outcome) {
                fleet.last_checks.insert(index, check);
            }
            let upstream = &mut fleet.upstreams[index];
            let identity_before = controller::triggers::upstream_identity(upstream);
            let current = upstream.status.clone().unwrap_or_default();
            let status = resolve::upstream::status(upstream, &current, &outcome);
            let patched = upstream.status.as_ref() != Some(&status);
            upstream.status = Some(status);
            Reconciled::new(
                patched,
                controller::triggers::upstream_identity(upstream) != identity_before,
                outcome.next_check_in.map_or(RESYNC, |d| d.min(RESYNC)),
                outcome.error.as_ref(),
                &outcome.actions,
            )
        }
    }
}

/// The connection name `run` keys listings and views by (the fleet's tokens come from no
/// Secret, so there is no Secret version).
fn connection_of(
    client: &GitLabClient,
    namespace: Option<&String>,
    gitlab: Option<&gitlab_registry_operator::crd::GitLabConnection>,
) -> String {
    controller::connection::connection_key(
        client.base_url(),
        namespace.map_or("", String::as_str),
        gitlab,
        None,
    )
}

fn after(error: Option<&gitlab_registry_operator::sync::Error>, success: Duration) -> Duration {
    match error {
        None => success,
        Some(error) => {
            controller::error::retry_delay(&controller::Error::Sync(error.clone()), 0, RESYNC)
        }
    }
}

pub fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Runs every due object in virtual time, one at a time (no latency is simulated), from
/// `start` until the queue holds nothing due at or before `until`. Returns the reconciles run.
///
/// `queue` holds one due time per object (the earliest wins, as in kube-rs's scheduler).
pub async fn run_virtual(
    fleet: &Mutex<Fleet>,
    client: &GitLabClient,
    queue: &mut BTreeMap<ObjectKey, Timestamp>,
    until: Timestamp,
    requeues: Requeues,
) -> u64 {
    let mut runs = 0;
    loop {
        let Some((&key, &due)) = queue.iter().min_by_key(|(key, due)| (**due, **key)) else {
            return runs;
        };
        if due > until {
            return runs;
        }
        queue.remove(&key);
        let reconciled = reconcile(fleet, client, key, due).await;
        runs += 1;
        let requeue_at = due + reconciled.requeue_after;
        schedule(queue, key, requeue_at);
        let requeued = lock(fleet).requeued_by(key, &reconciled, requeues);
        for other in requeued {
            schedule(queue, other, due);
        }
    }
}

/// kube-rs scheduler semantics: one entry per object, the earliest time wins.
pub fn schedule(queue: &mut BTreeMap<ObjectKey, Timestamp>, key: ObjectKey, at: Timestamp) {
    queue
        .entry(key)
        .and_modify(|due| *due = (*due).min(at))
        .or_insert(at);
}
