//! Convergence: 20 top-level groups × (5 VirtualRegistries + 5 Upstreams that all five list)
//! and 20 CleanupPolicies applied at once, against the simulator answering every request
//! after 50 ms. Prints the wall time until every object is Ready, the GitLab requests sent,
//! and the lower bound.
//!
//! `cargo bench --bench convergence`
//!
//! The objects are driven as `run` drives them (see `support`): one task per object, watch
//! events filtered by the controller's predicates — so a registry's new GitLab id requeues
//! its Upstreams (created through a registry), and an Upstream's new id requeues the
//! registries listing it (associations). Two runs: without a concurrency limit (bound by the
//! chain of dependent requests), then with `run`'s default of 16 reconciles per controller
//! (bound by the number of requests: 32 in flight at most).
//!
//! CleanupPolicies of strategy `Operator` (one per group, project targets) become Ready
//! from their spec alone (rules compiled, schedule parsed, next run computed): they send no
//! GitLab request until their schedule fires.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gitlab_registry_operator::cleanup::{CompiledRules, RuleSpec, Schedule};
use gitlab_registry_operator::controller::runtime;
use gitlab_registry_operator::gitlab::GitLabClient;
use support::{Fleet, ObjectKey, RequestTally, Requeues};
use tokio::sync::{Notify, Semaphore};

const GROUPS: usize = 20;
const REGISTRIES_PER_GROUP: usize = 5;
const UPSTREAMS_PER_GROUP: usize = 5;
const CLEANUP_POLICIES: usize = 20;
const LATENCY: Duration = Duration::from_millis(50);

/// Per object: waiting for a reconcile slot, running, and whether a trigger arrived while
/// running. As in kube-rs's runner, triggers for an object waiting for a slot are one
/// (the scheduler holds one entry per object); one that arrives while it runs reruns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunState {
    WaitingForSlot,
    Running,
    /// A trigger arrived while running: run once more.
    RunningAgain,
}

/// The controllers' runner: one task per object, deduplicated triggers.
struct Driver {
    fleet: Mutex<Fleet>,
    client: GitLabClient,
    running: Mutex<HashMap<ObjectKey, RunState>>,
    reconciles: AtomicU64,
    failures: AtomicU64,
    started: Instant,
    all_ready_at: Mutex<Option<Duration>>,
    quiet: Notify,
    /// `--max-concurrent-reconciles` per controller (registries, Upstreams); `None`: no limit.
    limits: Option<(Semaphore, Semaphore)>,
    /// Groups whose objects are all Ready (traced).
    groups_ready: Mutex<Vec<usize>>,
}

impl Driver {
    fn trigger(self: &Arc<Self>, key: ObjectKey) {
        let mut running = support::lock(&self.running);
        match running.get(&key) {
            None => {
                running.insert(key, RunState::WaitingForSlot);
                tokio::spawn(self.clone().run(key));
            }
            Some(RunState::WaitingForSlot) => {}
            Some(_) => {
                running.insert(key, RunState::RunningAgain);
            }
        }
    }

    async fn run(self: Arc<Self>, key: ObjectKey) {
        loop {
            let permit = match (&self.limits, key) {
                (None, _) => None,
                (Some((registries, _)), ObjectKey::Registry(_)) => registries.acquire().await.ok(),
                (Some((_, upstreams)), ObjectKey::Upstream(_)) => upstreams.acquire().await.ok(),
            };
            support::lock(&self.running).insert(key, RunState::Running);
            let began = self.started.elapsed();
            let reconciled =
                support::reconcile(&self.fleet, &self.client, key, jiff::Timestamp::now()).await;
            drop(permit);
            self.reconciles.fetch_add(1, Ordering::Relaxed);
            if trace_enabled() && group_of(&self.fleet, key) == 0 {
                eprintln!(
                    "trace {:>5.0}..{:>5.0} ms {key:?} patched={} {:?}",
                    began.as_secs_f64() * 1000.0,
                    self.started.elapsed().as_secs_f64() * 1000.0,
                    reconciled.patched,
                    reconciled.actions
                );
            }
            if reconciled.failed() {
                if trace_enabled() {
                    eprintln!(
                        "failed {key:?}: {}",
                        reconciled.error.as_deref().unwrap_or("")
                    );
                }
                self.failures.fetch_add(1, Ordering::Relaxed);
                let driver = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(reconciled.requeue_after).await;
                    driver.trigger(key);
                });
            }
            if trace_enabled() {
                self.trace_group_ready(key);
            }
            let requeued =
                support::lock(&self.fleet).requeued_by(key, &reconciled, Requeues::Predicates);
            for other in requeued {
                self.trigger(other);
            }
            {
                let fleet = support::lock(&self.fleet);
                let mut ready_at = support::lock(&self.all_ready_at);
                if ready_at.is_none() && fleet.all_ready() {
                    *ready_at = Some(self.started.elapsed());
                }
            }
            let mut running = support::lock(&self.running);
            if running.get(&key) == Some(&RunState::RunningAgain) {
                running.insert(key, RunState::WaitingForSlot);
                continue;
            }
            running.remove(&key);
            if running.is_empty() {
                self.quiet.notify_one();
            }
            return;
        }
    }
}

impl Driver {
    /// `BENCH_TRACE=1`: when the last object of a group becomes Ready, one line on stderr.
    fn trace_group_ready(&self, key: ObjectKey) {
        let group = group_of(&self.fleet, key);
        let fleet = support::lock(&self.fleet);
        let namespace = format!("team-{group:02}");
        let mut members = fleet.keys().into_iter().filter(|other| {
            let other_namespace = match *other {
                ObjectKey::Registry(index) => fleet.registry(index).metadata.namespace.as_deref(),
                ObjectKey::Upstream(index) => fleet.upstream(index).metadata.namespace.as_deref(),
            };
            other_namespace == Some(namespace.as_str())
        });
        if members.all(|member| fleet.is_ready(member)) {
            let mut ready = support::lock(&self.groups_ready);
            if !ready.contains(&group) {
                ready.push(group);
                eprintln!(
                    "group {group:>2} ready at {:>5.0} ms",
                    self.started.elapsed().as_secs_f64() * 1000.0
                );
            }
        }
    }
}

/// `BENCH_TRACE=1`: one line per reconcile of the first group's objects, on stderr.
fn trace_enabled() -> bool {
    std::env::var_os("BENCH_TRACE").is_some()
}

fn group_of(fleet: &Mutex<Fleet>, key: ObjectKey) -> usize {
    let fleet = support::lock(fleet);
    let namespace = match key {
        ObjectKey::Registry(index) => fleet.registry(index).metadata.namespace.clone(),
        ObjectKey::Upstream(index) => fleet.upstream(index).metadata.namespace.clone(),
    };
    namespace
        .and_then(|n| n.strip_prefix("team-").and_then(|g| g.parse().ok()))
        .unwrap_or(usize::MAX)
}

/// What a CleanupPolicy of strategy `Operator` needs to be Ready: its rules and schedule.
fn cleanup_policy_ready(index: usize) -> bool {
    let rules = RuleSpec {
        name_regex_delete: Some("[0-9a-f]{40}|pr-.*".into()),
        name_regex_keep: Some("main|stable-.*".into()),
        keep_n: Some(10),
        older_than: Some("14d".into()),
        ..RuleSpec::default()
    };
    let schedule = Schedule::parse(&format!("{} 3 * * *", index % 60), "UTC");
    CompiledRules::compile(&rules).is_ok()
        && schedule
            .ok()
            .and_then(|s| s.next_after(jiff::Timestamp::now()))
            .is_some()
}

#[tokio::main]
async fn main() {
    let policies_ready = (0..CLEANUP_POLICIES)
        .filter(|index| cleanup_policy_ready(*index))
        .count();
    println!(
        "convergence.objects = {} ({} VirtualRegistries and Upstreams in {GROUPS} groups + {CLEANUP_POLICIES} CleanupPolicies, {policies_ready} Ready from their spec; latency {} ms per request)",
        GROUPS * (REGISTRIES_PER_GROUP + UPSTREAMS_PER_GROUP) + CLEANUP_POLICIES,
        GROUPS * (REGISTRIES_PER_GROUP + UPSTREAMS_PER_GROUP),
        LATENCY.as_millis()
    );
    // Without a limit (`--max-concurrent-reconciles 0`): latency-bound, by the dependency chain.
    run_scenario("", None).await;
    // As `run` is installed: at most 16 reconciles per controller, so 32 requests in flight:
    // throughput-bound, by the number of requests.
    let default = usize::from(runtime::DEFAULT_MAX_CONCURRENT_RECONCILES);
    run_scenario("[default_concurrency]", Some(default)).await;
}

async fn run_scenario(label: &str, max_concurrent_reconciles: Option<usize>) {
    let sim = support::start_simulator(LATENCY, GROUPS).await;
    let client = support::client_for(&sim);
    let fleet = Fleet::new(GROUPS, REGISTRIES_PER_GROUP, UPSTREAMS_PER_GROUP);
    let keys = fleet.keys();
    let objects = fleet.object_count();
    let driver = Arc::new(Driver {
        fleet: Mutex::new(fleet),
        client: client.clone(),
        running: Mutex::new(HashMap::new()),
        reconciles: AtomicU64::new(0),
        failures: AtomicU64::new(0),
        started: Instant::now(),
        all_ready_at: Mutex::new(None),
        quiet: Notify::new(),
        limits: max_concurrent_reconciles
            .map(|limit| (Semaphore::new(limit), Semaphore::new(limit))),
        groups_ready: Mutex::new(Vec::new()),
    });
    // The controllers' initial list: every object queued at once, registries first.
    for key in keys {
        driver.trigger(key);
    }
    tokio::time::timeout(Duration::from_secs(600), driver.quiet.notified())
        .await
        .expect("the fleet settles within 10 minutes");
    let settled = driver.started.elapsed();
    let ready_at = (*support::lock(&driver.all_ready_at)).expect("every object is Ready");
    let counts = sim.request_counts();
    let tally = RequestTally::from_counts(&counts);

    // Check GitLab itself: every registry holds its five upstreams in declared order.
    let order_ok = verify_gitlab(&driver).await;

    let bound = LowerBound::new(max_concurrent_reconciles);
    let ratio = ready_at.as_secs_f64() / bound.lower_bound().as_secs_f64();
    match max_concurrent_reconciles {
        None => println!("convergence.max_concurrent_reconciles = unlimited"),
        Some(limit) => println!(
            "convergence{label}.max_concurrent_reconciles = {limit} per controller (the default)"
        ),
    }
    println!(
        "convergence{label}.wall_time_to_all_ready_ms = {:.0} (goal <= 1.5 x lower bound = {:.0})",
        ready_at.as_secs_f64() * 1000.0,
        bound.lower_bound().as_secs_f64() * 1500.0
    );
    println!(
        "convergence{label}.wall_time_to_settled_ms = {:.0} (last reconcile finished)",
        settled.as_secs_f64() * 1000.0
    );
    println!(
        "convergence{label}.requests_total = {} (reads {}, connection tests {}, writes {})",
        tally.total(),
        tally.reads,
        tally.connection_tests,
        tally.writes
    );
    println!(
        "convergence{label}.requests_minimal = {} (1 registry list + 5 creates, 1 upstream list + 5 tests + 5 creates, 20 associations, per group)",
        bound.minimal_requests
    );
    println!(
        "convergence{label}.lower_bound_ms = {:.0} (max of requests bound {:.0} = {} x {} ms / {} in flight, and critical path {:.0} = {} round trips)",
        bound.lower_bound().as_secs_f64() * 1000.0,
        bound.by_requests().as_secs_f64() * 1000.0,
        bound.minimal_requests,
        LATENCY.as_millis(),
        bound.concurrency,
        bound.by_critical_path().as_secs_f64() * 1000.0,
        bound.critical_path_round_trips
    );
    println!("convergence{label}.ratio_to_lower_bound = {ratio:.2} (goal <= 1.5)");
    if let Some(limit) = max_concurrent_reconciles {
        let by_controller = bound.by_controller(limit);
        println!(
            "convergence{label}.per_controller_bound_ms = {:.0} (the registry controller's share of the minimal requests, {} of {}: every association is a registry's, x {} ms / {limit}; ratio {:.2})",
            by_controller.as_secs_f64() * 1000.0,
            bound.minimal_registry_requests,
            bound.minimal_requests,
            LATENCY.as_millis(),
            ready_at.as_secs_f64() / by_controller.as_secs_f64()
        );
    }
    if max_concurrent_reconciles.is_none() {
        println!(
            "convergence.ratio_to_requests_bound = {:.2} (minimal requests x latency / concurrency alone, which no client reaches here: {} ms is less than the dependency chain)",
            ready_at.as_secs_f64() / bound.by_requests().as_secs_f64(),
            bound.by_requests().as_millis()
        );
        println!(
            "convergence.engine_critical_path_ms = {:.0} ({} round trips the engines' own ordering implies: registry list+create, upstream list+create, registry GET + 5 sequential associations)",
            ENGINE_CHAIN_ROUND_TRIPS as f64 * LATENCY.as_secs_f64() * 1000.0,
            ENGINE_CHAIN_ROUND_TRIPS
        );
    }
    println!(
        "convergence{label}.reconciles = {} ({:.1} per object), failures = {}",
        driver.reconciles.load(Ordering::Relaxed),
        driver.reconciles.load(Ordering::Relaxed) as f64 / objects as f64,
        driver.failures.load(Ordering::Relaxed)
    );
    println!("convergence{label}.gitlab_state_matches_specs = {order_ok}");
    for (route, count) in &counts {
        println!("convergence{label}.requests_by_route[{route}] = {count}");
    }
    sim.shutdown().await;
}

/// Round trips of one group's chain as the engines order their calls: registry list +
/// create; Upstream list + create (its connection test ran while the registry was being
/// created); registry GET + one association per upstream, one after the other.
const ENGINE_CHAIN_ROUND_TRIPS: u32 = 2 + 2 + 1 + UPSTREAMS_PER_GROUP as u32;

/// The fewest requests any correct client needs, and the shortest chain of dependent
/// round trips; without a concurrency limit (`--max-concurrent-reconciles 0`, as this bench runs) one request is in
/// flight per object.
struct LowerBound {
    minimal_requests: u64,
    /// Of those, the ones a registry's reconcile sends: its list, create and associations.
    minimal_registry_requests: u64,
    concurrency: u64,
    critical_path_round_trips: u32,
}

impl LowerBound {
    /// `max_concurrent_reconciles`: per controller; `None`, one request in flight per object.
    fn new(max_concurrent_reconciles: Option<usize>) -> Self {
        let (r, u) = (REGISTRIES_PER_GROUP as u64, UPSTREAMS_PER_GROUP as u64);
        let objects = (GROUPS as u64) * (r + u);
        // Adopt-before-create: one list of the group's registries and one of its upstreams
        // (shared by all objects of the group at best); a create per registry; a connection
        // test and a create per upstream (the create associates it with one registry); the
        // other registries' associations. CleanupPolicies (strategy Operator) need none.
        let per_group = 1 + r + 1 + 2 * u + (r * u - u);
        Self {
            minimal_requests: per_group * GROUPS as u64,
            minimal_registry_requests: (1 + r + (r * u - u)) * GROUPS as u64,
            // Each reconcile has at most one GitLab request in flight.
            concurrency: max_concurrent_reconciles
                .map_or(objects, |limit| (2 * limit as u64).min(objects)),
            // registry list -> create -> an upstream created through a registry -> one
            // association per upstream into every other registry, one after the other:
            // GitLab gives every new association (an upstream created through the registry,
            // or associated with it) the highest position + 1, so two inserts into one
            // registry at once race for the same position, and the declared order is only
            // reached without repositioning by inserting in that order. The connection tests
            // run while the registries are being created.
            critical_path_round_trips: 3 + UPSTREAMS_PER_GROUP as u32,
        }
    }

    fn by_requests(&self) -> Duration {
        LATENCY * self.minimal_requests as u32 / self.concurrency as u32
    }

    /// The registry controller alone, `limit` reconciles at a time, one request each.
    fn by_controller(&self, limit: usize) -> Duration {
        LATENCY * self.minimal_registry_requests as u32 / limit as u32
    }

    fn by_critical_path(&self) -> Duration {
        LATENCY * self.critical_path_round_trips
    }

    fn lower_bound(&self) -> Duration {
        self.by_requests().max(self.by_critical_path())
    }
}

async fn verify_gitlab(driver: &Driver) -> bool {
    let expected: Vec<(i64, Vec<i64>)> = {
        let fleet = support::lock(&driver.fleet);
        (0..fleet.registry_count())
            .filter_map(|index| {
                let status = fleet.registry(index).status.as_ref()?;
                let ids = fleet
                    .declared_upstream_ids(index)
                    .into_iter()
                    .collect::<Option<_>>()?;
                Some((status.registry_id?, ids))
            })
            .collect()
    };
    if expected.len() != REGISTRIES_PER_GROUP * GROUPS {
        return false;
    }
    for (registry_id, wanted) in expected {
        let Ok(remote) = driver.client.get_registry(registry_id).await else {
            return false;
        };
        let mut associations = remote.registry_upstreams.clone();
        associations.sort_by_key(|a| a.position);
        let held: Vec<i64> = associations.iter().filter_map(|a| a.upstream_id).collect();
        if held != wanted || held.len() != UPSTREAMS_PER_GROUP {
            return false;
        }
    }
    true
}
