//! Batched Upstream reads: the Upstream engine with the shared group listings
//! (`sync::listing`) against the simulator on loopback, counting what is sent through the
//! simulator's request counts. Converged upstreams are read from one group list per page per
//! wave; anything known to have changed, and anything we wrote to, is read with its own GET.

use std::future::Future;
use std::time::Duration;

use futures::future::join_all;
use gitlab_registry_operator::crd::conditions::Status;
use gitlab_registry_operator::gitlab::{ClientConfig, GitLabClient, PathOrId};
use gitlab_registry_operator::sim::state::UpstreamChanges;
use gitlab_registry_operator::sim::{
    FaultAction, FaultSpec, OneShotFault, Seed, SimConfig, SimHandle, Simulator,
};
use gitlab_registry_operator::sync::listing::UpstreamListings;
use gitlab_registry_operator::sync::upstream::{
    self, ConnectivityCheck, CreateThrough, CredentialsVersion, DesiredUpstream, KnownUpstream,
    ResolvedCredentials, SharedListing, UpstreamOutcome, UpstreamRequest,
};
use gitlab_registry_operator::sync::{Action, Mode};
use jiff::{SignedDuration, Timestamp};
use secrecy::SecretString;

const TOKEN: &str = "batched-token";
const GROUP: &str = "my-org";
const GROUP_ID: u64 = 100;
const CONNECTION: &str = "sim|default";
/// What the controller uses at the default resync of 10 minutes.
const MAX_AGE: Duration = Duration::from_secs(300);
const INTERVAL: Duration = Duration::from_secs(600);

const GROUP_UPSTREAMS: &str = "/groups/:id/-/virtual_registries/container/upstreams";
const UPSTREAM: &str = "/virtual_registries/container/upstreams/:id";
const REGISTRY_UPSTREAMS: &str = "/virtual_registries/container/registries/:id/upstreams";

/// Hang guard only: nothing asserts on time.
async fn guarded<F: Future<Output = ()>>(test: F) {
    tokio::time::timeout(Duration::from_secs(120), test)
        .await
        .expect("test finished within the hang guard");
}

struct Env {
    sim: SimHandle,
    client: GitLabClient,
    listings: UpstreamListings,
    /// Seeded upstream ids, in seed order (`upstream-0`, `upstream-1`, …).
    ids: Vec<i64>,
}

/// A group with one registry `cache` and `count` upstreams: the first five associated with
/// the registry, the rest in the group only (the list pages past 100 need more than a
/// registry's five).
async fn env(count: usize) -> Env {
    let mut seed = format!(
        "groups:\n  - {{id: {GROUP_ID}, full_path: {GROUP}}}\n\
         registries:\n  - {{id: 7, group: {GROUP}, name: cache}}\nupstreams:\n"
    );
    for index in 0..count {
        let registries = if index < 5 { "[cache]" } else { "[]" };
        seed.push_str(&format!(
            "  - {{id: {}, group: {GROUP}, name: upstream-{index}, url: '{}', registries: {registries}}}\n",
            index + 1,
            url(index)
        ));
    }
    let config = SimConfig {
        allow_local_network: true,
        stub_upstreams: true,
        ..SimConfig::with_token(TOKEN)
    };
    let sim = Simulator::start(config, Seed::parse(&seed).expect("seed"))
        .await
        .expect("simulator");
    let mut client_config = ClientConfig::new(
        sim.base_url().parse().expect("url"),
        SecretString::from(TOKEN),
    );
    client_config.retry_base_delay = Duration::from_millis(5);
    client_config.max_retries = 2;
    let client = GitLabClient::new(client_config).expect("client");
    Env {
        sim,
        client,
        listings: UpstreamListings::new(MAX_AGE),
        ids: (1..=count as i64).collect(),
    }
}

fn url(index: usize) -> String {
    format!("https://registry-{index}.example.com")
}

fn t0() -> Timestamp {
    Timestamp::from_second(1_900_000_000).expect("time")
}

fn minutes(count: i64) -> SignedDuration {
    SignedDuration::from_mins(count)
}

/// Upstream `index` as converged: known id, GitLab matching the spec, tested a minute ago.
fn converged(env: &Env, index: usize, now: Timestamp) -> UpstreamRequest {
    UpstreamRequest {
        desired: DesiredUpstream {
            group: PathOrId::parse(GROUP),
            name: format!("upstream-{index}"),
            url: url(index),
            description: None,
            cache_validity_hours: 24,
            credentials: None,
            gate_changes: true,
            connectivity_interval: INTERVAL,
        },
        known: KnownUpstream {
            upstream_id: Some(env.ids[index]),
            group_id: Some(GROUP_ID as i64),
            applied_credentials: None,
            last_check: Some(ConnectivityCheck {
                time: now - minutes(1),
                success: true,
                result: None,
            }),
            last_check_configuration: None,
            last_handled_purge_cache: None,
        },
        registry_for_create: Some(CreateThrough::Registry(7)),
        purge_cache_request: None,
        now,
        mode: Mode::Apply,
    }
}

impl Env {
    fn shared(&self, nothing_changed: bool) -> SharedListing<'_> {
        SharedListing {
            listings: &self.listings,
            connection: CONNECTION,
            nothing_changed,
            registry_views: None,
        }
    }

    async fn reconcile(&self, request: &UpstreamRequest, nothing_changed: bool) -> UpstreamOutcome {
        upstream::reconcile_with_listing(&self.client, request, Some(self.shared(nothing_changed)))
            .await
    }

    /// Every upstream reconciled one after the other at `now`, as converged.
    async fn wave(&self, now: Timestamp) -> Vec<UpstreamOutcome> {
        let mut outcomes = Vec::new();
        for index in 0..self.ids.len() {
            outcomes.push(self.reconcile(&converged(self, index, now), true).await);
        }
        outcomes
    }

    fn count(&self, method: &str, route: &str) -> u64 {
        self.sim.request_count(method, route)
    }

    fn change(&self, index: usize, changes: UpstreamChanges) {
        self.sim
            .with_state(|state| state.update_upstream(self.ids[index] as u64, changes, true))
            .expect("changed in GitLab");
    }

    fn cache_validity_hours(&self, index: usize) -> i64 {
        let id = self.ids[index] as u64;
        self.sim
            .snapshot()
            .upstreams
            .iter()
            .find(|upstream| upstream.id == id)
            .expect("upstream in GitLab")
            .cache_validity_hours
    }
}

fn reasons(actions: &[Action]) -> Vec<&'static str> {
    actions.iter().map(|a| a.reason).collect()
}

fn assert_quiet(outcomes: &[UpstreamOutcome]) {
    for outcome in outcomes {
        assert!(outcome.error.is_none(), "{:?}", outcome.error);
        assert!(outcome.actions.is_empty(), "{:?}", outcome.actions);
        assert_eq!(outcome.synced.status, Status::True);
    }
}

#[tokio::test]
async fn a_converged_wave_costs_one_list_per_page_and_no_upstream_get() {
    guarded(async {
        // 120 upstreams: two pages of 100.
        let env = env(120).await;
        env.sim.reset_request_counts();
        let outcomes = env.wave(t0()).await;
        assert_quiet(&outcomes);
        assert_eq!(env.count("GET", GROUP_UPSTREAMS), 2, "one list, two pages");
        assert_eq!(env.count("GET", UPSTREAM), 0);
        assert_eq!(env.sim.write_count(), 0, "{:?}", env.sim.request_counts());

        // The next wave, past the max age, all at once: one list call serves every waiter.
        env.sim.reset_request_counts();
        let now = t0() + minutes(10);
        let requests: Vec<_> = (0..env.ids.len())
            .map(|index| converged(&env, index, now))
            .collect();
        let outcomes = join_all(requests.iter().map(|r| env.reconcile(r, true))).await;
        assert_quiet(&outcomes);
        assert_eq!(env.count("GET", GROUP_UPSTREAMS), 2);
        assert_eq!(env.count("GET", UPSTREAM), 0);
        assert_eq!(env.sim.request_counts().values().sum::<u64>(), 2);
    })
    .await;
}

#[tokio::test]
async fn drift_in_gitlab_is_corrected_at_the_first_wave_after_the_max_age() {
    guarded(async {
        let env = env(3).await;
        assert_quiet(&env.wave(t0()).await);
        env.change(
            1,
            UpstreamChanges {
                name: Some("renamed-in-the-ui".into()),
                cache_validity_hours: Some(1),
                ..Default::default()
            },
        );

        // Within the max age the listing still serves the state before the drift.
        env.sim.reset_request_counts();
        assert_quiet(&env.wave(t0() + minutes(4)).await);
        assert_eq!(env.sim.request_counts().values().sum::<u64>(), 0);

        // The next resync lists again and corrects exactly the drifted upstream, once.
        env.sim.reset_request_counts();
        let outcomes = env.wave(t0() + minutes(10)).await;
        assert_eq!(reasons(&outcomes[1].actions), ["Updated"]);
        assert_quiet(&[outcomes[0].clone(), outcomes[2].clone()]);
        assert_eq!(env.count("GET", GROUP_UPSTREAMS), 1);
        assert_eq!(env.count("GET", UPSTREAM), 0);
        assert_eq!(env.count("PATCH", UPSTREAM), 1);
        assert_eq!(env.sim.write_count(), 1);
        assert_eq!(env.cache_validity_hours(1), 24);

        // Corrected: the next wave (a fresh listing) is quiet.
        env.sim.reset_request_counts();
        assert_quiet(&env.wave(t0() + minutes(20)).await);
        assert_eq!(env.sim.write_count(), 0);
    })
    .await;
}

#[tokio::test]
async fn an_upstream_deleted_in_gitlab_is_recreated_through_the_404_of_its_get() {
    guarded(async {
        let env = env(3).await;
        let gone = env.ids[2];
        env.sim
            .with_state(|state| state.delete_upstream(gone as u64))
            .expect("deleted");
        env.sim.reset_request_counts();
        let outcomes = env.wave(t0()).await;
        assert_quiet(&outcomes[..2]);
        assert!(outcomes[2].error.is_none(), "{:?}", outcomes[2].error);
        assert_eq!(reasons(&outcomes[2].actions), ["NotFound", "Created"]);
        let recreated = outcomes[2].upstream_id.expect("new id");
        assert_ne!(recreated, gone);
        assert_eq!(
            env.count("GET", GROUP_UPSTREAMS),
            1,
            "the wave's list serves the adoption lookup too"
        );
        assert_eq!(env.count("GET", UPSTREAM), 1, "only the unlisted one: 404");
        assert_eq!(env.count("POST", REGISTRY_UPSTREAMS), 1);

        // The listing was sent before the re-creation, but holds the upstream as GitLab
        // answered our create: the next reconcile within the max age reads it from there.
        env.sim.reset_request_counts();
        let mut request = converged(&env, 2, t0() + minutes(1));
        request.known.upstream_id = Some(recreated);
        let outcome = env.reconcile(&request, true).await;
        assert_quiet(&[outcome]);
        assert_eq!(env.count("GET", UPSTREAM), 0);
        assert_eq!(env.count("GET", GROUP_UPSTREAMS), 0);

        // Changed in GitLab since: seen at the next listing, after the max age.
        env.sim
            .with_state(|state| {
                let changes = UpstreamChanges {
                    cache_validity_hours: Some(1),
                    ..Default::default()
                };
                state.update_upstream(recreated as u64, changes, true)
            })
            .expect("changed in GitLab");
        let mut request = converged(&env, 2, t0() + minutes(6));
        request.known.upstream_id = Some(recreated);
        let outcome = env.reconcile(&request, true).await;
        assert_eq!(
            reasons(&outcome.actions),
            ["Updated"],
            "{:?}",
            outcome.error
        );
        assert_eq!(env.count("GET", GROUP_UPSTREAMS), 1);
    })
    .await;
}

#[tokio::test]
async fn after_our_own_patch_a_reconcile_within_the_max_age_does_not_patch_again() {
    guarded(async {
        let env = env(3).await;
        assert_quiet(&env.wave(t0()).await);

        // A spec change (the controller passes nothing_changed = false) reads fresh and patches.
        env.sim.reset_request_counts();
        let mut changed = converged(&env, 0, t0() + minutes(1));
        changed.desired.cache_validity_hours = 48;
        let outcome = env.reconcile(&changed, false).await;
        assert_eq!(reasons(&outcome.actions), ["Updated"]);
        assert_eq!(env.count("GET", UPSTREAM), 1);
        assert_eq!(env.count("PATCH", UPSTREAM), 1);

        // The next reconcile (spec observed) within the max age: the listing sent before the
        // PATCH does not serve it, so it is read fresh and nothing is sent again.
        env.sim.reset_request_counts();
        let mut again = converged(&env, 0, t0() + minutes(2));
        again.desired.cache_validity_hours = 48;
        let outcome = env.reconcile(&again, true).await;
        assert_quiet(&[outcome]);
        assert_eq!(env.count("GET", UPSTREAM), 1);
        assert_eq!(env.count("PATCH", UPSTREAM), 0);
        assert_eq!(env.count("GET", GROUP_UPSTREAMS), 0);
        // The others are still served by the listing.
        let outcome = env
            .reconcile(&converged(&env, 1, t0() + minutes(2)), true)
            .await;
        assert_quiet(&[outcome]);
        assert_eq!(env.count("GET", UPSTREAM), 1);

        // A drift corrected by our PATCH from a fresh listing is not patched again either.
        env.change(
            2,
            UpstreamChanges {
                cache_validity_hours: Some(1),
                ..Default::default()
            },
        );
        env.sim.reset_request_counts();
        let outcome = env
            .reconcile(&converged(&env, 2, t0() + minutes(10)), true)
            .await;
        assert_eq!(reasons(&outcome.actions), ["Updated"]);
        let outcome = env
            .reconcile(&converged(&env, 2, t0() + minutes(11)), true)
            .await;
        assert_quiet(&[outcome]);
        assert_eq!(env.count("PATCH", UPSTREAM), 1);
        assert_eq!(env.cache_validity_hours(2), 24);
    })
    .await;
}

#[tokio::test]
async fn a_listing_answered_after_our_patch_never_serves_the_patched_upstream() {
    guarded(async {
        let env = env(3).await;
        // The list is carried out at once and answered 500 ms later: it shows GitLab before
        // the PATCH below, whatever order the two answers arrive in.
        env.sim.inject_fault(gets_fail(
            1,
            Some(GROUP_UPSTREAMS),
            FaultAction::Delay { delay_ms: 500 },
        ));
        let now = t0() + minutes(1);
        let listing_reader = async {
            let outcome = env.reconcile(&converged(&env, 1, now), true).await;
            assert_quiet(&[outcome]);
        };
        let writer = async {
            while env.count("GET", GROUP_UPSTREAMS) == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let mut changed = converged(&env, 0, now);
            changed.desired.cache_validity_hours = 48;
            let outcome = env.reconcile(&changed, false).await;
            assert_eq!(reasons(&outcome.actions), ["Updated"]);
        };
        tokio::join!(listing_reader, writer);
        assert_eq!(env.count("GET", GROUP_UPSTREAMS), 1);

        env.sim.reset_request_counts();
        let mut again = converged(&env, 0, now + minutes(1));
        again.desired.cache_validity_hours = 48;
        let outcome = env.reconcile(&again, true).await;
        assert_quiet(&[outcome]);
        assert_eq!(env.count("PATCH", UPSTREAM), 0);
        assert_eq!(env.count("GET", UPSTREAM), 1);
        assert_eq!(env.count("GET", GROUP_UPSTREAMS), 0, "the listing is fresh");
    })
    .await;
}

#[tokio::test]
async fn anything_known_to_have_changed_reads_fresh() {
    guarded(async {
        let env = env(2).await;
        assert_quiet(&env.wave(t0()).await);
        let now = t0() + minutes(1);

        // The caller saw a change (spec generation, a failed last reconcile, a requested one).
        env.sim.reset_request_counts();
        assert_quiet(&[env.reconcile(&converged(&env, 0, now), false).await]);
        assert_eq!(env.count("GET", UPSTREAM), 1);

        // A purge request not handled yet.
        env.sim.reset_request_counts();
        let mut purge = converged(&env, 0, now);
        purge.purge_cache_request = Some("2026-01-01T00:00:00Z".into());
        let outcome = env.reconcile(&purge, true).await;
        assert_eq!(reasons(&outcome.actions), ["CachePurged"]);
        assert_eq!(env.count("GET", UPSTREAM), 1);

        // A credentials Secret version not applied yet: read fresh, tested, sent.
        env.sim.reset_request_counts();
        let mut rotated = converged(&env, 1, now);
        rotated.desired.credentials = Some(ResolvedCredentials {
            credentials: gitlab_registry_operator::gitlab::UpstreamCredentials::new(
                "robot",
                SecretString::from("s3cret"),
            ),
            version: CredentialsVersion {
                secret_name: "credentials".into(),
                resource_version: "2".into(),
            },
        });
        let outcome = env.reconcile(&rotated, true).await;
        assert!(outcome.error.is_none(), "{:?}", outcome.error);
        assert_eq!(reasons(&outcome.actions), ["Updated"]);
        assert_eq!(env.count("GET", UPSTREAM), 1);

        // Plan mode shows what a GET shows.
        env.sim.reset_request_counts();
        let mut plan = converged(&env, 0, now);
        plan.mode = Mode::Plan;
        assert_quiet(&[env.reconcile(&plan, true).await]);
        assert_eq!(env.count("GET", UPSTREAM), 1);
        assert_eq!(env.count("GET", GROUP_UPSTREAMS), 0);
    })
    .await;
}

#[tokio::test]
async fn a_failing_list_falls_back_to_gets_with_the_same_outcome_and_is_not_kept() {
    guarded(async {
        let env = env(4).await;
        env.change(
            3,
            UpstreamChanges {
                cache_validity_hours: Some(1),
                ..Default::default()
            },
        );
        // Every list attempt fails with a 500 (the client tries 3 times: max_retries 2).
        env.sim.inject_fault(gets_fail(
            3,
            Some(GROUP_UPSTREAMS),
            FaultAction::Status { status: 500 },
        ));
        env.sim.reset_request_counts();
        let requests: Vec<_> = (0..env.ids.len())
            .map(|index| converged(&env, index, t0()))
            .collect();
        let outcomes = join_all(requests.iter().map(|r| env.reconcile(r, true))).await;
        assert_quiet(&outcomes[..3]);
        assert_eq!(
            reasons(&outcomes[3].actions),
            ["Updated"],
            "as without listings"
        );
        assert_eq!(env.cache_validity_hours(3), 24);
        assert_eq!(
            env.count("GET", GROUP_UPSTREAMS),
            3,
            "one failed call (with its retries) for the whole wave"
        );
        assert_eq!(env.count("GET", UPSTREAM), 4, "each fell back to its GET");

        // The failure was not kept: the next reconcile lists again, and is served.
        env.sim.reset_request_counts();
        assert_quiet(&[env
            .reconcile(&converged(&env, 0, t0() + minutes(1)), true)
            .await]);
        assert_eq!(env.count("GET", GROUP_UPSTREAMS), 1);
        assert_eq!(env.count("GET", UPSTREAM), 0);
    })
    .await;
}

#[tokio::test]
async fn errors_read_the_same_as_without_listings_when_gitlab_fails_both_reads() {
    guarded(async {
        let env = env(1).await;
        let fault = gets_fail(100, None, FaultAction::Status { status: 503 });
        env.sim.inject_fault(fault.clone());
        let request = converged(&env, 0, t0());
        let plain = upstream::reconcile(&env.client, &request).await;
        let listed = env.reconcile(&request, true).await;
        env.sim.clear_faults();
        let (plain, listed) = (plain.error.expect("fails"), listed.error.expect("fails"));
        assert_eq!(listed.reason(), plain.reason());
        assert_eq!(listed.message(), plain.message());
        assert!(listed.is_transient());
    })
    .await;
}

/// The next `count` GETs (to `route`, or to any route) answered with `fault`.
fn gets_fail(count: u32, route: Option<&str>, fault: FaultAction) -> FaultSpec {
    FaultSpec {
        once: vec![OneShotFault {
            count,
            method: Some("GET".into()),
            route: route.map(str::to_owned),
            fault,
        }],
        ..FaultSpec::default()
    }
}

/// A declared upstream GitLab does not hold yet (`new-<name>`), with no status.
fn new_upstream(env: &Env, name: &str, registry: Option<i64>, now: Timestamp) -> UpstreamRequest {
    let mut request = converged(env, 0, now);
    request.desired.name = format!("new-{name}");
    request.desired.url = format!("https://{name}.example.com");
    request.known = KnownUpstream::default();
    request.registry_for_create = registry.map(CreateThrough::Registry);
    request
}

#[tokio::test]
async fn adoption_lookups_share_one_fresh_listing_until_a_write_of_ours_or_its_age() {
    guarded(async {
        let env = env(2).await;
        env.sim.reset_request_counts();

        // Three new upstreams of one group, reconciled at once: one list for all three.
        let env = &env;
        let waiting = join_all(["a", "b", "c"].map(|name| async move {
            env.reconcile(&new_upstream(env, name, None, t0()), false)
                .await
        }))
        .await;
        for outcome in &waiting {
            assert_eq!(outcome.synced.reason, "WaitingForRegistry");
        }
        assert_eq!(env.count("GET", GROUP_UPSTREAMS), 1);

        // An object that matches an upstream GitLab holds is adopted from that listing.
        let mut lost_status = converged(env, 1, t0());
        lost_status.known = KnownUpstream::default();
        let adopted = env.reconcile(&lost_status, false).await;
        assert_eq!(adopted.upstream_id, Some(env.ids[1]));
        assert_eq!(reasons(&adopted.actions), ["Adopted"]);
        assert_eq!(env.count("GET", GROUP_UPSTREAMS), 1);

        // The registry appears 10 s later: the first create needs no second list.
        let later = t0() + SignedDuration::from_secs(10);
        let created = env
            .reconcile(&new_upstream(env, "a", Some(7), later), false)
            .await;
        assert_eq!(
            reasons(&created.actions),
            ["Created"],
            "{:?}",
            created.error
        );
        assert_eq!(env.count("GET", GROUP_UPSTREAMS), 1);

        // That create is a write in the group since the listing was sent: the next
        // adoption lookup lists again, and finds no new-b.
        let created = env
            .reconcile(&new_upstream(env, "b", Some(7), later), false)
            .await;
        assert_eq!(
            reasons(&created.actions),
            ["Created"],
            "{:?}",
            created.error
        );
        assert_eq!(env.count("GET", GROUP_UPSTREAMS), 2);

        // A listing older than the adoption age is not used either.
        let much_later = later + SignedDuration::from_secs(31);
        let created = env
            .reconcile(&new_upstream(env, "c", Some(7), much_later), false)
            .await;
        assert_eq!(
            reasons(&created.actions),
            ["Created"],
            "{:?}",
            created.error
        );
        assert_eq!(env.count("GET", GROUP_UPSTREAMS), 3);
        assert_eq!(env.count("POST", REGISTRY_UPSTREAMS), 3);
        assert_eq!(
            env.sim.snapshot().upstreams.len(),
            5,
            "nothing created twice"
        );
    })
    .await;
}
