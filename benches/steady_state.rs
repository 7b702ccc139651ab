//! Steady state: GitLab requests per object per hour after convergence, at the default
//! resync (10 min) and connection-test interval (10 min).
//!
//! `cargo bench --bench steady_state`
//!
//! 20 groups × (5 VirtualRegistries listing the group's 5 Upstreams) are converged, then
//! driven for one simulated hour in virtual time ("now" advanced, no sleeping) by the
//! controller stand-in of `support` (real engines, real status derivation, watch-driven
//! requeues, the controller's group upstream listings). The simulator counts every request by
//! method and route. A second scenario has larger groups: 20 groups × (5 VirtualRegistries
//! listing 5 Upstreams of their own = 25 Upstreams per group).

mod support;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use gitlab_registry_operator::gitlab::GitLabClient;
use gitlab_registry_operator::sim::SimHandle;
use jiff::{SignedDuration, Timestamp};
use support::{Fleet, RequestTally, Requeues};

const GROUPS: usize = 20;
const REGISTRIES_PER_GROUP: usize = 5;
const UPSTREAMS_PER_GROUP: usize = 5;
/// The larger groups: each registry lists this many Upstreams of its own.
const UPSTREAMS_PER_REGISTRY: usize = 5;
const HOUR: SignedDuration = SignedDuration::from_hours(1);
const RESYNCS_PER_HOUR: f64 = 6.0;

const GROUP_UPSTREAM_LIST: &str = "GET /groups/:id/-/virtual_registries/container/upstreams";
const UPSTREAM_GETS: &str = "GET /virtual_registries/container/upstreams";
const GROUP_REGISTRY_LIST: &str = "GET /groups/:id/-/virtual_registries/container/registries";
const REGISTRY_GETS: &str = "GET /virtual_registries/container/registries";

#[tokio::main]
async fn main() {
    let start: Timestamp = "2026-01-05T00:00:00Z".parse().expect("timestamp");
    let sim = support::start_simulator(Duration::ZERO, GROUPS).await;
    let client = support::client_for(&sim);

    for requeues in [Requeues::Predicates, Requeues::EveryStatusWrite] {
        // A fresh fleet in fresh groups would need new groups; reuse the converged GitLab
        // state instead: the second fleet adopts what the first created (reads only).
        let fleet = Fleet::new(GROUPS, REGISTRIES_PER_GROUP, UPSTREAMS_PER_GROUP);
        let prefix = match requeues {
            Requeues::Predicates => "steady_state",
            Requeues::EveryStatusWrite => "steady_state.without_watch_predicates",
        };
        if requeues == Requeues::Predicates {
            println!(
                "steady_state.objects = {} ({} VirtualRegistries, {} Upstreams in {GROUPS} groups; resync 10m, connectivityCheck.interval 10m)",
                fleet.object_count(),
                fleet.registry_count(),
                fleet.upstream_count()
            );
        } else {
            println!(
                "# without_watch_predicates: the same hour with every status write requeueing the object and \
                 the mapped objects, as `run` was wired before controller::triggers (for comparison)"
            );
        }
        one_hour(&sim, &client, fleet, start, requeues, prefix).await;
    }
    sim.shutdown().await;

    let sim = support::start_simulator(Duration::ZERO, GROUPS).await;
    let client = support::client_for(&sim);
    let fleet =
        Fleet::with_distinct_upstreams(GROUPS, REGISTRIES_PER_GROUP, UPSTREAMS_PER_REGISTRY);
    println!(
        "steady_state.larger_groups.objects = {} ({} VirtualRegistries, {} Upstreams in {GROUPS} groups: \
         each registry lists {UPSTREAMS_PER_REGISTRY} Upstreams of its own)",
        fleet.object_count(),
        fleet.registry_count(),
        fleet.upstream_count()
    );
    one_hour(
        &sim,
        &client,
        fleet,
        start,
        Requeues::Predicates,
        "steady_state.larger_groups",
    )
    .await;
    sim.shutdown().await;
}

/// Converges `fleet` at `start`, then drives it for one hour and prints what GitLab saw.
async fn one_hour(
    sim: &SimHandle,
    client: &GitLabClient,
    fleet: Fleet,
    start: Timestamp,
    requeues: Requeues,
    prefix: &str,
) {
    sim.reset_request_counts();
    let fleet = Mutex::new(fleet);
    let mut queue = BTreeMap::new();
    for key in support::lock(&fleet).keys() {
        support::schedule(&mut queue, key, start);
    }
    support::run_virtual(&fleet, client, &mut queue, start, requeues).await;
    assert!(
        support::lock(&fleet).all_ready(),
        "the fleet converges before the hour starts"
    );

    sim.reset_request_counts();
    let runs = support::run_virtual(&fleet, client, &mut queue, start + HOUR, requeues).await;
    let counts = sim.request_counts();
    let tally = RequestTally::from_counts(&counts);
    let fleet = support::lock(&fleet);
    let objects = fleet.object_count() as f64;
    let upstreams = fleet.upstream_count() as f64;
    let registries = fleet.registry_count() as f64;
    let per_group = |count: f64| count / GROUPS as f64;
    let (r, u) = (per_group(registries), per_group(upstreams));
    println!(
        "{prefix}.reads_per_object_per_hour = {:.2} (goal <= 6, < 1 with batched reads; per group per resync 1 list + R registry GETs: 6·(1+R)/(R+U) = {:.2} at R = {r}, U = {u})",
        tally.reads as f64 / objects,
        RESYNCS_PER_HOUR * (1.0 + r) / (r + u)
    );
    println!(
        "{prefix}.writes_per_object_per_hour = {:.2} (goal 0)",
        tally.writes as f64 / objects
    );
    println!(
        "{prefix}.connection_tests_per_upstream_per_hour = {:.2} (one per connectivityCheck.interval = 6; not mutations)",
        tally.connection_tests as f64 / upstreams
    );
    let registry_reads =
        route_sum(&counts, REGISTRY_GETS) + route_sum(&counts, GROUP_REGISTRY_LIST);
    let upstream_lists = route_sum(&counts, GROUP_UPSTREAM_LIST);
    let upstream_gets = route_sum(&counts, UPSTREAM_GETS);
    println!(
        "{prefix}.reads_per_registry_per_hour = {:.2} (one GET per resync: associations are only on the registry itself)",
        registry_reads as f64 / registries
    );
    println!(
        "{prefix}.reads_per_upstream_per_hour = {:.2} (group lists {upstream_lists} + GETs {upstream_gets}; goal < 1)",
        (upstream_lists + upstream_gets) as f64 / upstreams
    );
    println!(
        "{prefix}.upstream_lists_per_group_per_resync = {:.2}",
        upstream_lists as f64 / (GROUPS as f64 * RESYNCS_PER_HOUR)
    );
    println!(
        "{prefix}.requests_per_object_per_hour = {:.2} (all methods; Crossplane provider-gitlab polls 60)",
        tally.total() as f64 / objects
    );
    println!(
        "{prefix}.reconciles_per_object_per_hour = {:.2}",
        runs as f64 / objects
    );
    for (route, count) in &counts {
        println!("{prefix}.requests_by_route[{route}] = {count}");
    }
}

fn route_sum(counts: &BTreeMap<String, u64>, prefix: &str) -> u64 {
    counts
        .iter()
        .filter(|(key, _)| key.starts_with(prefix))
        .map(|(_, count)| count)
        .sum()
}
