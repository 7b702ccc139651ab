//! The `sync` engines (Upstream and VirtualRegistry) with the real GitLab client against the
//! simulator on loopback, upstream urls served by `UpstreamStub`s. Every test asserts GitLab's
//! state through `snapshot()` and what was sent through the simulator's request counts and a
//! recording TCP relay between the client and the simulator (request bodies).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gitlab_registry_operator::crd::conditions::Status;
use gitlab_registry_operator::gitlab::{ClientConfig, GitLabClient, PathOrId, UpstreamCredentials};
use gitlab_registry_operator::sim::upstream_stub::{StubBehaviour, UpstreamStub};
use gitlab_registry_operator::sim::{
    FaultAction, FaultSpec, OneShotFault, Seed, SimConfig, SimHandle, Simulator, Snapshot,
};
use gitlab_registry_operator::sync::registry::{
    self, DesiredMember, DesiredRegistry, KnownRegistry, RegistryOutcome, RegistryRequest,
    Resolution,
};
use gitlab_registry_operator::sync::upstream::{
    self, CreateThrough, CredentialsVersion, DesiredUpstream, KnownUpstream, ResolvedCredentials,
    UpstreamOutcome, UpstreamRequest,
};
use gitlab_registry_operator::sync::{Action, Mode};
use jiff::{SignedDuration, Timestamp};
use secrecy::SecretString;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TOKEN: &str = "engine-token";
const GROUP: &str = "my-org";
const GROUP_ID: u64 = 100;
const INTERVAL: Duration = Duration::from_secs(600);

const REGISTRIES: &str = "/groups/:id/-/virtual_registries/container/registries";
const REGISTRY: &str = "/virtual_registries/container/registries/:id";
const REGISTRY_UPSTREAMS: &str = "/virtual_registries/container/registries/:id/upstreams";
const UPSTREAM: &str = "/virtual_registries/container/upstreams/:id";
const UPSTREAM_TEST: &str = "/virtual_registries/container/upstreams/:id/test";
const NEW_UPSTREAM_TEST: &str = "/groups/:id/-/virtual_registries/container/upstreams/test";
const ASSOCIATIONS: &str = "/virtual_registries/container/registry_upstreams";
const ASSOCIATION: &str = "/virtual_registries/container/registry_upstreams/:id";

// ---- harness ------------------------------------------------------------------------------

#[path = "support/harness.rs"]
mod harness;

use harness::guarded;

/// One request as the client sent it.
#[derive(Debug, Clone)]
struct Recorded {
    method: String,
    path: String,
    body: Value,
}

/// A TCP relay that parses the HTTP/1.1 requests passing through it, so tests can see the
/// bodies the client sent. Requests are recorded before they are forwarded.
struct Recorder {
    address: SocketAddr,
    requests: Arc<Mutex<Vec<Recorded>>>,
}

impl Recorder {
    async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let address = listener.local_addr().expect("relay address");
        let requests: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let log = requests.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                tokio::spawn(relay(inbound, target, log.clone()));
            }
        });
        Self { address, requests }
    }

    fn take(&self) -> Vec<Recorded> {
        std::mem::take(&mut *self.requests.lock().expect("log"))
    }
}

async fn relay(inbound: TcpStream, target: SocketAddr, log: Arc<Mutex<Vec<Recorded>>>) {
    let Ok(outbound) = TcpStream::connect(target).await else {
        return;
    };
    let (mut from_client, mut to_client) = inbound.into_split();
    let (mut from_server, mut to_server) = outbound.into_split();
    tokio::spawn(async move {
        let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
        let _ = to_client.shutdown().await;
    });
    let mut pending = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let read = match from_client.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        pending.extend_from_slice(&chunk[..read]);
        let parsed = parse_requests(&mut pending);
        log.lock().expect("log").extend(parsed);
        if to_server.write_all(&chunk[..read]).await.is_err() {
            break;
        }
    }
    let _ = to_server.shutdown().await;
}

fn parse_requests(buffer: &mut Vec<u8>) -> Vec<Recorded> {
    let mut parsed = Vec::new();
    while let Some(head_end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let mut request_line = lines.next().unwrap_or_default().split(' ');
        let method = request_line.next().unwrap_or_default().to_owned();
        let path = request_line.next().unwrap_or_default().to_owned();
        let mut length = 0usize;
        for line in lines {
            if let Some((name, value)) = line.split_once(':') {
                assert!(
                    !(name.eq_ignore_ascii_case("transfer-encoding")
                        && value.to_ascii_lowercase().contains("chunked")),
                    "the relay does not parse chunked bodies"
                );
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().expect("content-length");
                }
            }
        }
        let end = head_end + 4 + length;
        if buffer.len() < end {
            break;
        }
        let body = serde_json::from_slice(&buffer[head_end + 4..end]).unwrap_or(Value::Null);
        buffer.drain(..end);
        parsed.push(Recorded { method, path, body });
    }
    parsed
}

struct Env {
    sim: SimHandle,
    recorder: Recorder,
    client: GitLabClient,
}

/// A client through the recording relay at `address`, with fast retries.
fn client_through(address: SocketAddr, adjust: impl FnOnce(&mut ClientConfig)) -> GitLabClient {
    let mut config = ClientConfig::new(
        format!("http://{address}").parse().expect("url"),
        SecretString::from(TOKEN),
    );
    config.request_timeout = Duration::from_secs(30);
    config.retry_base_delay = Duration::from_millis(5);
    config.max_retries = 2;
    adjust(&mut config);
    GitLabClient::new(config).expect("client")
}

fn sim_config() -> SimConfig {
    SimConfig {
        allow_local_network: true,
        upstream_timeout: Duration::from_secs(10),
        ..SimConfig::with_token(TOKEN)
    }
}

fn seed() -> Seed {
    Seed::parse(&format!(
        "groups:\n  - {{id: {GROUP_ID}, full_path: {GROUP}}}\n  - {{id: 200, full_path: other-org}}\n"
    ))
    .expect("seed")
}

impl Env {
    async fn start() -> Self {
        Self::with_config(sim_config()).await
    }

    async fn with_config(config: SimConfig) -> Self {
        let sim = Simulator::start(config, seed()).await.expect("simulator");
        let recorder = Recorder::start(sim.address()).await;
        let client = client_through(recorder.address, |_| {});
        Self {
            sim,
            recorder,
            client,
        }
    }

    fn client_with(&self, adjust: impl FnOnce(&mut ClientConfig)) -> GitLabClient {
        client_through(self.recorder.address, adjust)
    }

    /// Forgets the requests counted and recorded so far.
    fn reset(&self) {
        self.sim.reset_request_counts();
        self.recorder.take();
    }

    fn count(&self, method: &str, route: &str) -> u64 {
        self.sim.request_count(method, route)
    }

    fn snapshot(&self) -> Snapshot {
        self.sim.snapshot()
    }

    /// Bodies of the PATCHes sent since the last reset to paths containing `fragment`.
    fn patch_bodies(&self, fragment: &str) -> Vec<Value> {
        self.recorder
            .take()
            .into_iter()
            .filter(|r| r.method == "PATCH" && r.path.contains(fragment))
            .map(|r| r.body)
            .collect()
    }

    async fn reconcile_upstream(&self, request: &UpstreamRequest) -> UpstreamOutcome {
        upstream::reconcile(&self.client, request).await
    }

    async fn reconcile_registry(&self, request: &RegistryRequest) -> RegistryOutcome {
        registry::reconcile(&self.client, request).await
    }

    /// Creates a registry through the engine and returns its id.
    async fn registry(&self, name: &str) -> i64 {
        let outcome = self
            .reconcile_registry(&registry_request(name, &[], None))
            .await;
        assert!(outcome.error.is_none(), "{:?}", outcome.error);
        outcome.registry_id.expect("registry id")
    }

    /// Creates an upstream through the engine and `registry_id`; returns the outcome.
    async fn upstream(&self, name: &str, url: &str, registry_id: i64) -> UpstreamOutcome {
        let mut request = upstream_request(desired(name, url), KnownUpstream::default(), t0());
        request.registry_for_create = Some(CreateThrough::Registry(registry_id));
        let outcome = self.reconcile_upstream(&request).await;
        assert!(outcome.error.is_none(), "{:?}", outcome.error);
        assert!(outcome.upstream_id.is_some(), "{:?}", outcome.actions);
        outcome
    }
}

fn t0() -> Timestamp {
    Timestamp::from_second(1_900_000_000).expect("time")
}

fn minutes(count: i64) -> SignedDuration {
    SignedDuration::from_mins(count)
}

fn desired(name: &str, url: &str) -> DesiredUpstream {
    DesiredUpstream {
        group: PathOrId::parse(GROUP),
        name: name.into(),
        url: url.into(),
        description: None,
        cache_validity_hours: 24,
        credentials: None,
        gate_changes: true,
        connectivity_interval: INTERVAL,
    }
}

fn credentials(username: &str, password: &str, version: &str) -> ResolvedCredentials {
    ResolvedCredentials {
        credentials: UpstreamCredentials::new(username, SecretString::from(password.to_owned())),
        version: CredentialsVersion {
            secret_name: "upstream-credentials".into(),
            resource_version: version.into(),
        },
    }
}

fn upstream_request(
    desired: DesiredUpstream,
    known: KnownUpstream,
    now: Timestamp,
) -> UpstreamRequest {
    UpstreamRequest {
        desired,
        known,
        registry_for_create: None,
        purge_cache_request: None,
        now,
        mode: Mode::Apply,
    }
}

/// What the next reconcile knows after `outcome` was written to status.
fn known_after(outcome: &UpstreamOutcome) -> KnownUpstream {
    KnownUpstream {
        upstream_id: outcome.upstream_id,
        group_id: outcome.group_id,
        applied_credentials: outcome.applied_credentials.clone(),
        last_check: outcome.last_check.clone(),
        last_check_configuration: outcome.last_check_configuration.clone(),
        last_handled_purge_cache: outcome.last_handled_purge_cache.clone(),
    }
}

fn members(list: &[(&str, i64)]) -> Vec<DesiredMember> {
    list.iter()
        .map(|(name, id)| DesiredMember {
            name: (*name).into(),
            resolution: Resolution::Resolved(*id),
        })
        .collect()
}

/// The registry views of one process, as a reconcile at `now` uses them.
fn shared_views(views: &registry::RegistryViews, now: Timestamp) -> registry::SharedViews<'_> {
    registry::SharedViews {
        views,
        connection: "sim|default",
        now,
    }
}

/// Reconciles registries of these names, with no status, all at once.
async fn new_registries_at_once(
    env: &Env,
    shared: registry::SharedViews<'_>,
    names: &[&str],
) -> Vec<RegistryOutcome> {
    let requests: Vec<RegistryRequest> = names
        .iter()
        .map(|name| registry_request(name, &[], None))
        .collect();
    futures::future::join_all(
        requests
            .iter()
            .map(|request| registry::reconcile_with_views(&env.client, request, Some(shared))),
    )
    .await
}

/// GitLab answers the next `method` to `route` with a 429 and a 15-minute Retry-After.
fn rate_limit_once(env: &Env, method: &str, route: &str) {
    env.sim.inject_fault(FaultSpec {
        once: vec![OneShotFault {
            count: 1,
            method: Some(method.into()),
            route: Some(route.into()),
            fault: FaultAction::RateLimited {
                retry_after_seconds: 900,
            },
        }],
        ..FaultSpec::default()
    });
}

fn registry_request(name: &str, list: &[(&str, i64)], known: Option<i64>) -> RegistryRequest {
    RegistryRequest {
        desired: DesiredRegistry {
            group: PathOrId::parse(GROUP),
            name: name.into(),
            description: None,
            members: members(list),
        },
        known: KnownRegistry {
            registry_id: known,
            last_handled_purge_cache: None,
            waiting_for_upstreams: false,
        },
        purge_cache_request: None,
        mode: Mode::Apply,
    }
}

async fn stub() -> UpstreamStub {
    UpstreamStub::start(StubBehaviour::default())
        .await
        .expect("stub")
}

fn reasons(actions: &[Action]) -> Vec<&'static str> {
    actions.iter().map(|a| a.reason).collect()
}

/// Upstream ids of a registry's associations in GitLab, by position (positions checked to
/// be 1..=n).
fn order_of(snapshot: &Snapshot, registry_id: i64) -> Vec<i64> {
    let mut associations: Vec<_> = snapshot
        .associations
        .iter()
        .filter(|a| a.registry_id as i64 == registry_id)
        .collect();
    associations.sort_by_key(|a| a.position);
    let positions: Vec<i64> = associations.iter().map(|a| a.position).collect();
    let expected: Vec<i64> = (1..=associations.len() as i64).collect();
    assert_eq!(positions, expected, "positions are 1..=n");
    associations.iter().map(|a| a.upstream_id as i64).collect()
}

fn body_keys(body: &Value) -> Vec<String> {
    let mut keys: Vec<String> = body
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    keys.sort();
    keys
}

fn sim_upstream(snapshot: &Snapshot, id: i64) -> &gitlab_registry_operator::sim::state::Upstream {
    snapshot
        .upstreams
        .iter()
        .find(|u| u.id as i64 == id)
        .expect("upstream in GitLab")
}

// ---- registries ---------------------------------------------------------------------------

#[tokio::test]
async fn registry_is_created_then_adopted_after_a_lost_status() {
    guarded(async {
        let env = Env::start().await;
        let outcome = env
            .reconcile_registry(&registry_request("docker-cache", &[], None))
            .await;
        assert!(outcome.error.is_none(), "{:?}", outcome.error);
        assert_eq!(reasons(&outcome.actions), ["Created"]);
        let id = outcome.registry_id.expect("id");
        assert_eq!(outcome.group_id, Some(GROUP_ID as i64));
        assert_eq!(
            outcome.pull_prefix.as_deref(),
            Some(format!("{}/virtual_registries/container/{id}", env.recorder.address).as_str())
        );
        assert_eq!(outcome.synced.status, Status::True);
        assert_eq!(env.count("POST", REGISTRIES), 1);
        let snapshot = env.snapshot();
        assert_eq!(snapshot.registries.len(), 1);
        assert_eq!(snapshot.registries[0].name, "docker-cache");

        // The status was lost: the registry is found by name, not created again.
        env.reset();
        let adopted = env
            .reconcile_registry(&registry_request("docker-cache", &[], None))
            .await;
        assert!(adopted.error.is_none(), "{:?}", adopted.error);
        assert_eq!(reasons(&adopted.actions), ["Adopted"]);
        assert_eq!(adopted.registry_id, Some(id));
        assert_eq!(env.sim.write_count(), 0);
        assert_eq!(env.snapshot().registries.len(), 1);
    })
    .await;
}

#[tokio::test]
async fn registry_name_and_description_changes_are_one_patch_each_with_only_that_field() {
    guarded(async {
        let env = Env::start().await;
        let id = env.registry("cache").await;

        env.reset();
        let renamed = env
            .reconcile_registry(&registry_request("cache-2", &[], Some(id)))
            .await;
        assert!(renamed.error.is_none(), "{:?}", renamed.error);
        assert_eq!(env.count("PATCH", REGISTRY), 1);
        assert_eq!(env.sim.write_count(), 1);
        let bodies = env.patch_bodies("/registries/");
        assert_eq!(bodies.len(), 1);
        assert_eq!(body_keys(&bodies[0]), ["name"]);
        assert_eq!(env.snapshot().registries[0].name, "cache-2");

        env.reset();
        let mut request = registry_request("cache-2", &[], Some(id));
        request.desired.description = Some("pull-through cache".into());
        let described = env.reconcile_registry(&request).await;
        assert!(described.error.is_none(), "{:?}", described.error);
        assert_eq!(env.sim.write_count(), 1);
        let bodies = env.patch_bodies("/registries/");
        assert_eq!(bodies.len(), 1);
        assert_eq!(body_keys(&bodies[0]), ["description"]);
        assert_eq!(
            env.snapshot().registries[0].description.as_deref(),
            Some("pull-through cache")
        );

        env.reset();
        let again = env.reconcile_registry(&request).await;
        assert!(
            again.error.is_none() && again.actions.is_empty(),
            "{:?}",
            again.actions
        );
        assert_eq!(env.sim.write_count(), 0);
    })
    .await;
}

#[tokio::test]
async fn sixth_registry_reports_gitlabs_limit() {
    guarded(async {
        let env = Env::start().await;
        for index in 0..5 {
            env.registry(&format!("cache-{index}")).await;
        }
        let outcome = env
            .reconcile_registry(&registry_request("cache-5", &[], None))
            .await;
        let error = outcome.error.expect("refused");
        assert_eq!(error.reason(), "LimitExceeded");
        assert!(!error.is_transient());
        assert_eq!(outcome.synced.status, Status::False);
        assert_eq!(outcome.synced.reason, "LimitExceeded");
        assert!(
            outcome
                .synced
                .message
                .contains("5 registries is the maximum allowed per top-level group."),
            "{}",
            outcome.synced.message
        );
        assert_eq!(outcome.registry_id, None);
        assert_eq!(env.snapshot().registries.len(), 5);
    })
    .await;
}

#[tokio::test]
async fn registry_deleted_in_gitlab_is_recreated() {
    guarded(async {
        let env = Env::start().await;
        let id = env.registry("cache").await;
        env.with_state_delete_registry(id);
        env.reset();
        let outcome = env
            .reconcile_registry(&registry_request("cache", &[], Some(id)))
            .await;
        assert!(outcome.error.is_none(), "{:?}", outcome.error);
        assert_eq!(reasons(&outcome.actions), ["NotFound", "Created"]);
        let new_id = outcome.registry_id.expect("id");
        assert_ne!(new_id, id);
        assert_eq!(env.count("POST", REGISTRIES), 1);
        assert_eq!(env.snapshot().registries.len(), 1);
    })
    .await;
}

impl Env {
    fn with_state_delete_registry(&self, id: i64) {
        self.sim
            .with_state(|state| state.delete_registry(id as u64))
            .expect("deleted in GitLab");
    }
}

// ---- upstreams: create, wait, adopt -----------------------------------------------------------

#[tokio::test]
async fn upstream_waits_for_a_registry_then_is_created_through_it() {
    guarded(async {
        let env = Env::start().await;
        let dockerhub = stub().await;
        let request = upstream_request(
            desired("dockerhub", &dockerhub.url()),
            KnownUpstream::default(),
            t0(),
        );
        let waiting = env.reconcile_upstream(&request).await;
        assert!(waiting.error.is_none(), "{:?}", waiting.error);
        assert_eq!(waiting.synced.status, Status::False);
        assert_eq!(waiting.synced.reason, "WaitingForRegistry");
        assert!(waiting.synced.message.contains("registry"));
        assert_eq!(waiting.upstream_id, None);
        // The group-level test runs while waiting: nothing else is written.
        assert_eq!(env.count("POST", NEW_UPSTREAM_TEST), 1);
        assert_eq!(env.sim.write_count(), 0);
        assert_eq!(
            waiting
                .reachable
                .as_ref()
                .expect("tested while waiting")
                .status,
            Status::True
        );
        assert!(env.snapshot().upstreams.is_empty());

        let registry_id = env.registry("cache").await;
        env.reset();
        let mut request = upstream_request(
            desired("dockerhub", &dockerhub.url()),
            known_after(&waiting),
            t0() + minutes(1),
        );
        request.registry_for_create = Some(CreateThrough::Registry(registry_id));
        let created = env.reconcile_upstream(&request).await;
        assert!(created.error.is_none(), "{:?}", created.error);
        assert_eq!(reasons(&created.actions), ["Created"]);
        assert_eq!(created.synced.status, Status::True);
        let reachable = created.reachable.clone().expect("tested before create");
        assert_eq!(reachable.status, Status::True);
        // The test of this url a minute ago vouches for the create: no second test.
        assert_eq!(env.count("POST", NEW_UPSTREAM_TEST), 0);
        assert_eq!(env.count("POST", REGISTRY_UPSTREAMS), 1);
        assert_eq!(created.last_check, waiting.last_check);
        assert_eq!(
            dockerhub.requests().len(),
            1,
            "GitLab tested the upstream once"
        );
        let snapshot = env.snapshot();
        assert_eq!(snapshot.upstreams.len(), 1);
        let id = created.upstream_id.expect("id");
        let remote = sim_upstream(&snapshot, id);
        assert_eq!(remote.name, "dockerhub");
        assert_eq!(remote.url, dockerhub.url());
        assert_eq!(remote.cache_validity_hours, 24);
        assert_eq!(order_of(&snapshot, registry_id), [id]);
        assert_eq!(created.group_id, Some(GROUP_ID as i64));
    })
    .await;
}

#[tokio::test]
async fn upstream_is_adopted_only_on_name_and_url() {
    guarded(async {
        let env = Env::start().await;
        let first = stub().await;
        let second = stub().await;
        let registry_id = env.registry("cache").await;
        let created = env.upstream("dockerhub", &first.url(), registry_id).await;
        let id = created.upstream_id.expect("id");

        // Lost status, same name and url: adopted, nothing created.
        env.reset();
        let mut request = upstream_request(
            desired("dockerhub", &first.url()),
            KnownUpstream::default(),
            t0(),
        );
        request.registry_for_create = Some(CreateThrough::Registry(registry_id));
        let adopted = env.reconcile_upstream(&request).await;
        assert!(adopted.error.is_none(), "{:?}", adopted.error);
        assert_eq!(adopted.upstream_id, Some(id));
        assert!(reasons(&adopted.actions).contains(&"Adopted"));
        assert_eq!(env.count("POST", REGISTRY_UPSTREAMS), 0);
        assert_eq!(env.snapshot().upstreams.len(), 1);

        // Same name, another url: a different upstream (names are not unique in GitLab).
        env.reset();
        let mut request = upstream_request(
            desired("dockerhub", &second.url()),
            KnownUpstream::default(),
            t0(),
        );
        request.registry_for_create = Some(CreateThrough::Registry(registry_id));
        let other = env.reconcile_upstream(&request).await;
        assert!(other.error.is_none(), "{:?}", other.error);
        assert_eq!(reasons(&other.actions), ["Created"]);
        assert_ne!(other.upstream_id, Some(id));
        assert_eq!(
            env.count("PATCH", UPSTREAM),
            0,
            "the first one is left alone"
        );
        let snapshot = env.snapshot();
        assert_eq!(snapshot.upstreams.len(), 2);
        assert_eq!(sim_upstream(&snapshot, id).url, first.url());
    })
    .await;
}

#[tokio::test]
async fn a_new_upstreams_connection_test_is_sent_with_its_adoption_lookup() {
    guarded(async {
        let env = Env::start().await;
        let dockerhub = stub().await;
        let registry_id = env.registry("cache").await;
        let upstreams_of_group = "/groups/:id/-/virtual_registries/container/upstreams";

        // The lookup is refused (rate limited): the test, sent with it, is on record anyway,
        // so the retry does not test again.
        rate_limit_once(&env, "GET", upstreams_of_group);
        env.reset();
        let mut request = upstream_request(
            desired("dockerhub", &dockerhub.url()),
            KnownUpstream::default(),
            t0(),
        );
        request.registry_for_create = Some(CreateThrough::Registry(registry_id));
        let limited = env.reconcile_upstream(&request).await;
        assert_eq!(
            limited.error.as_ref().map(|error| error.reason()),
            Some("RateLimited")
        );
        assert_eq!(env.count("GET", upstreams_of_group), 1);
        assert_eq!(env.count("POST", NEW_UPSTREAM_TEST), 1);
        assert!(
            limited
                .last_check
                .as_ref()
                .is_some_and(|check| check.success)
        );
        assert_eq!(env.count("POST", REGISTRY_UPSTREAMS), 0);

        env.reset();
        let retry = upstream_request(
            desired("dockerhub", &dockerhub.url()),
            known_after(&limited),
            t0() + minutes(1),
        );
        let retry = UpstreamRequest {
            registry_for_create: Some(CreateThrough::Registry(registry_id)),
            ..retry
        };
        let created = env.reconcile_upstream(&retry).await;
        assert!(created.error.is_none(), "{:?}", created.error);
        assert_eq!(reasons(&created.actions), ["Created"]);
        assert_eq!(
            env.count("POST", NEW_UPSTREAM_TEST),
            0,
            "the test is reused"
        );

        // Adopting: a test that GitLab failed to answer fails nothing; the adopted upstream
        // is tested as any known one.
        env.sim.inject_fault(FaultSpec {
            once: vec![OneShotFault {
                count: 1,
                method: Some("POST".into()),
                route: Some(NEW_UPSTREAM_TEST.into()),
                fault: FaultAction::Status { status: 500 },
            }],
            ..FaultSpec::default()
        });
        env.reset();
        let lost_status = upstream_request(
            desired("dockerhub", &dockerhub.url()),
            KnownUpstream::default(),
            t0() + minutes(2),
        );
        let adopted = env.reconcile_upstream(&lost_status).await;
        assert!(adopted.error.is_none(), "{:?}", adopted.error);
        assert_eq!(adopted.upstream_id, created.upstream_id);
        assert!(reasons(&adopted.actions).contains(&"Adopted"));
        assert_eq!(env.count("POST", UPSTREAM_TEST), 1);
        assert!(
            adopted
                .last_check
                .as_ref()
                .is_some_and(|check| check.success)
        );
    })
    .await;
}

#[tokio::test]
async fn upstream_deleted_in_gitlab_is_recreated() {
    guarded(async {
        let env = Env::start().await;
        let dockerhub = stub().await;
        let registry_id = env.registry("cache").await;
        let created = env
            .upstream("dockerhub", &dockerhub.url(), registry_id)
            .await;
        let id = created.upstream_id.expect("id");
        env.sim
            .with_state(|state| state.delete_upstream(id as u64))
            .expect("deleted");
        env.reset();
        let mut request = upstream_request(
            desired("dockerhub", &dockerhub.url()),
            known_after(&created),
            t0() + minutes(1),
        );
        request.registry_for_create = Some(CreateThrough::Registry(registry_id));
        let outcome = env.reconcile_upstream(&request).await;
        assert!(outcome.error.is_none(), "{:?}", outcome.error);
        assert_eq!(reasons(&outcome.actions), ["NotFound", "Created"]);
        assert_ne!(outcome.upstream_id, Some(id));
        assert_eq!(env.count("POST", REGISTRY_UPSTREAMS), 1);
        let snapshot = env.snapshot();
        assert_eq!(snapshot.upstreams.len(), 1);
        assert_eq!(
            order_of(&snapshot, registry_id),
            [outcome.upstream_id.expect("id")]
        );
    })
    .await;
}

// ---- upstreams: updates --------------------------------------------------------------------

#[tokio::test]
async fn each_upstream_field_change_is_one_patch_with_only_that_field() {
    guarded(async {
        let env = Env::start().await;
        let first = stub().await;
        let second = stub().await;
        let registry_id = env.registry("cache").await;
        let mut outcome = env.upstream("dockerhub", &first.url(), registry_id).await;
        let id = outcome.upstream_id.expect("id");
        let mut spec = desired("dockerhub", &first.url());

        type Change = (&'static str, fn(&mut DesiredUpstream, &str));
        let changes: [Change; 4] = [
            ("name", |d, _| d.name = "docker-hub".into()),
            ("description", |d, _| {
                d.description = Some("Docker Hub".into())
            }),
            ("cache_validity_hours", |d, _| d.cache_validity_hours = 48),
            ("url", |d, url| d.url = url.into()),
        ];
        for (field, change) in changes {
            change(&mut spec, &second.url());
            env.reset();
            let request = upstream_request(spec.clone(), known_after(&outcome), t0() + minutes(1));
            outcome = env.reconcile_upstream(&request).await;
            assert!(outcome.error.is_none(), "{field}: {:?}", outcome.error);
            assert_eq!(outcome.synced.status, Status::True, "{field}");
            assert_eq!(env.count("PATCH", UPSTREAM), 1, "{field}");
            let bodies = env.patch_bodies("/upstreams/");
            assert_eq!(bodies.len(), 1, "{field}");
            assert_eq!(body_keys(&bodies[0]), [field], "{field}: {}", bodies[0]);
            let updated: Vec<_> = outcome
                .actions
                .iter()
                .filter(|a| a.reason == "Updated")
                .collect();
            assert_eq!(updated.len(), 1, "{field}");
            // A url change is tested first (gated); other fields are not.
            let tests = env.count("POST", UPSTREAM_TEST);
            assert_eq!(tests, u64::from(field == "url"), "{field}");
            // The connection test stores nothing: the PATCH is the one write.
            assert_eq!(env.sim.write_count(), 1, "{field}");
        }
        let snapshot = env.snapshot();
        let remote = sim_upstream(&snapshot, id);
        assert_eq!(remote.name, "docker-hub");
        assert_eq!(remote.description.as_deref(), Some("Docker Hub"));
        assert_eq!(remote.cache_validity_hours, 48);
        assert_eq!(remote.url, second.url());

        env.reset();
        let request = upstream_request(spec, known_after(&outcome), t0() + minutes(2));
        let steady = env.reconcile_upstream(&request).await;
        assert!(
            steady.error.is_none() && steady.actions.is_empty(),
            "{:?}",
            steady.actions
        );
        assert_eq!(env.sim.write_count(), 0);
    })
    .await;
}

#[tokio::test]
async fn url_change_resends_the_credentials() {
    guarded(async {
        let env = Env::start().await;
        let first = UpstreamStub::start(StubBehaviour::requiring("robot", "s3cret"))
            .await
            .expect("stub");
        let second = UpstreamStub::start(StubBehaviour::requiring("robot", "s3cret"))
            .await
            .expect("stub");
        let registry_id = env.registry("cache").await;
        let mut spec = desired("private", &first.url());
        spec.credentials = Some(credentials("robot", "s3cret", "1"));
        let mut request = upstream_request(spec.clone(), KnownUpstream::default(), t0());
        request.registry_for_create = Some(CreateThrough::Registry(registry_id));
        let created = env.reconcile_upstream(&request).await;
        assert!(created.error.is_none(), "{:?}", created.error);
        assert_eq!(
            created.reachable.as_ref().expect("tested").status,
            Status::True
        );
        let id = created.upstream_id.expect("id");
        assert_eq!(
            created.applied_credentials,
            Some(CredentialsVersion {
                secret_name: "upstream-credentials".into(),
                resource_version: "1".into()
            })
        );
        let snapshot = env.snapshot();
        assert!(sim_upstream(&snapshot, id).password.is_some());

        env.reset();
        spec.url = second.url();
        let request = upstream_request(spec, known_after(&created), t0() + minutes(1));
        let moved = env.reconcile_upstream(&request).await;
        assert!(moved.error.is_none(), "{:?}", moved.error);
        assert_eq!(moved.synced.status, Status::True);
        // GitLab clears the credentials on a url change unless both change in the same
        // request, and the same values re-sent are no change: the url goes first, the
        // credentials follow in a second PATCH. One change all the same.
        let bodies = env.patch_bodies("/upstreams/");
        assert_eq!(bodies.len(), 2);
        assert_eq!(body_keys(&bodies[0]), ["url"]);
        assert_eq!(body_keys(&bodies[1]), ["password", "username"]);
        assert_eq!(bodies[1]["username"], "robot");
        assert_eq!(reasons(&moved.actions), ["Updated"]);
        let fields: Vec<&str> = moved.actions[0]
            .changes
            .iter()
            .map(|change| change.field)
            .collect();
        assert_eq!(fields, ["url", "credentials"]);
        let snapshot = env.snapshot();
        let remote = sim_upstream(&snapshot, id);
        assert_eq!(remote.url, second.url());
        assert_eq!(remote.username.as_deref(), Some("robot"));
        assert!(
            remote.password.is_some(),
            "credentials survived the url change"
        );
        assert_eq!(moved.applied_credentials, created.applied_credentials);
        // The gate test went to the new url, the credentials to its token realm only.
        assert_eq!(second.tests(), 1);
        let token_requests: Vec<_> = second
            .requests()
            .into_iter()
            .filter(|request| request.is_token_request())
            .collect();
        assert_eq!(token_requests.len(), 1);
        assert_eq!(token_requests[0].username.as_deref(), Some("robot"));
        assert!(
            second
                .registry_requests()
                .iter()
                .all(|r| r.username.is_none())
        );
        // The change description never shows the password.
        let shown = format!("{:?}", moved.actions);
        assert!(!shown.contains("s3cret"), "{shown}");
    })
    .await;
}

#[tokio::test]
async fn credentials_are_resent_only_when_the_secret_version_changes() {
    guarded(async {
        let env = Env::start().await;
        let registry = UpstreamStub::start(StubBehaviour::requiring("robot", "old"))
            .await
            .expect("stub");
        let registry_id = env.registry("cache").await;
        let mut spec = desired("private", &registry.url());
        spec.credentials = Some(credentials("robot", "old", "1"));
        let mut request = upstream_request(spec.clone(), KnownUpstream::default(), t0());
        request.registry_for_create = Some(CreateThrough::Registry(registry_id));
        let created = env.reconcile_upstream(&request).await;
        assert!(created.error.is_none(), "{:?}", created.error);

        // Same Secret version: nothing to send.
        env.reset();
        let same = env
            .reconcile_upstream(&upstream_request(
                spec.clone(),
                known_after(&created),
                t0() + minutes(1),
            ))
            .await;
        assert!(
            same.error.is_none() && same.actions.is_empty(),
            "{:?}",
            same.actions
        );
        assert_eq!(env.sim.write_count(), 0);

        // Rotated Secret: tested with the new credentials, then sent.
        registry.require_credentials(Some(("robot", "new")));
        spec.credentials = Some(credentials("robot", "new", "2"));
        env.reset();
        let rotated = env
            .reconcile_upstream(&upstream_request(
                spec.clone(),
                known_after(&same),
                t0() + minutes(2),
            ))
            .await;
        assert!(rotated.error.is_none(), "{:?}", rotated.error);
        assert_eq!(rotated.synced.status, Status::True);
        assert_eq!(env.count("POST", UPSTREAM_TEST), 1);
        assert_eq!(env.count("PATCH", UPSTREAM), 1);
        let bodies = env.patch_bodies("/upstreams/");
        assert_eq!(body_keys(&bodies[0]), ["password", "username"]);
        assert_eq!(
            rotated
                .applied_credentials
                .as_ref()
                .map(|v| v.resource_version.as_str()),
            Some("2")
        );
        assert_eq!(
            rotated.reachable.as_ref().expect("tested").status,
            Status::True
        );

        env.reset();
        let steady = env
            .reconcile_upstream(&upstream_request(
                spec,
                known_after(&rotated),
                t0() + minutes(3),
            ))
            .await;
        assert!(steady.actions.is_empty(), "{:?}", steady.actions);
        assert_eq!(env.sim.write_count(), 0);
    })
    .await;
}

#[tokio::test]
async fn a_failing_test_blocks_a_gated_change_and_keeps_the_working_config() {
    guarded(async {
        let env = Env::start().await;
        let working = stub().await;
        let broken = UpstreamStub::start(StubBehaviour::status(401))
            .await
            .expect("stub");
        let registry_id = env.registry("cache").await;
        let created = env.upstream("dockerhub", &working.url(), registry_id).await;
        let id = created.upstream_id.expect("id");

        // A new url that answers 401.
        env.reset();
        let mut spec = desired("dockerhub", &broken.url());
        let refused = env
            .reconcile_upstream(&upstream_request(
                spec.clone(),
                known_after(&created),
                t0() + minutes(1),
            ))
            .await;
        assert!(refused.error.is_none(), "{:?}", refused.error);
        assert_eq!(refused.synced.status, Status::False);
        assert_eq!(refused.synced.reason, "ConnectivityTestFailed");
        assert!(
            refused.synced.message.contains("Error: 401 - Unauthorized"),
            "{}",
            refused.synced.message
        );
        assert_eq!(reasons(&refused.actions), ["ConnectivityTestFailed"]);
        assert_eq!(env.count("POST", UPSTREAM_TEST), 1);
        assert_eq!(env.count("PATCH", UPSTREAM), 0);
        assert_eq!(sim_upstream(&env.snapshot(), id).url, working.url());

        // New credentials the (working) upstream refuses.
        working.require_credentials(Some(("robot", "right")));
        spec.url = working.url();
        spec.credentials = Some(credentials("robot", "wrong", "1"));
        env.reset();
        let refused = env
            .reconcile_upstream(&upstream_request(
                spec,
                known_after(&created),
                t0() + minutes(2),
            ))
            .await;
        assert_eq!(refused.synced.reason, "ConnectivityTestFailed");
        assert!(refused.synced.message.contains("Error: 401 - Unauthorized"));
        assert_eq!(refused.applied_credentials, None, "not applied");
        assert_eq!(env.count("PATCH", UPSTREAM), 0);
        let snapshot = env.snapshot();
        let remote = sim_upstream(&snapshot, id);
        assert!(remote.username.is_none() && remote.password.is_none());
    })
    .await;
}

#[tokio::test]
async fn an_ungated_change_goes_through_a_failing_test() {
    guarded(async {
        let env = Env::start().await;
        let working = stub().await;
        let broken = UpstreamStub::start(StubBehaviour::status(401))
            .await
            .expect("stub");
        let registry_id = env.registry("cache").await;
        let created = env.upstream("dockerhub", &working.url(), registry_id).await;
        let id = created.upstream_id.expect("id");
        env.reset();
        let mut spec = desired("dockerhub", &broken.url());
        spec.gate_changes = false;
        let outcome = env
            .reconcile_upstream(&upstream_request(
                spec,
                known_after(&created),
                t0() + minutes(1),
            ))
            .await;
        assert!(outcome.error.is_none(), "{:?}", outcome.error);
        assert_eq!(outcome.synced.status, Status::True);
        assert_eq!(env.count("PATCH", UPSTREAM), 1);
        assert_eq!(sim_upstream(&env.snapshot(), id).url, broken.url());
        let reachable = outcome.reachable.as_ref().expect("tested");
        assert_eq!(reachable.status, Status::False);
        assert_eq!(reachable.reason, "Unauthorized");
    })
    .await;
}

#[tokio::test]
async fn a_gated_create_is_refused_when_the_test_fails() {
    guarded(async {
        let env = Env::start().await;
        let broken = UpstreamStub::start(StubBehaviour::status(403))
            .await
            .expect("stub");
        let registry_id = env.registry("cache").await;
        env.reset();
        let mut request = upstream_request(
            desired("dockerhub", &broken.url()),
            KnownUpstream::default(),
            t0(),
        );
        request.registry_for_create = Some(CreateThrough::Registry(registry_id));
        let outcome = env.reconcile_upstream(&request).await;
        assert_eq!(outcome.synced.reason, "ConnectivityTestFailed");
        assert!(outcome.synced.message.contains("Error: 403 - Forbidden"));
        assert_eq!(outcome.upstream_id, None);
        assert_eq!(env.count("POST", REGISTRY_UPSTREAMS), 0);
        assert!(env.snapshot().upstreams.is_empty());
        assert_eq!(
            outcome.reachable.as_ref().expect("tested").reason,
            "Forbidden"
        );
    })
    .await;
}

#[tokio::test]
async fn a_failing_test_shows_before_the_registry_exists_and_is_not_repeated_within_the_interval() {
    guarded(async {
        let env = Env::start().await;
        let broken = UpstreamStub::start(StubBehaviour::status(401))
            .await
            .expect("stub");
        let request = upstream_request(
            desired("dockerhub", &broken.url()),
            KnownUpstream::default(),
            t0(),
        );
        let refused = env.reconcile_upstream(&request).await;
        assert_eq!(refused.synced.reason, "ConnectivityTestFailed");
        assert!(refused.synced.message.contains("Error: 401 - Unauthorized"));
        assert_eq!(reasons(&refused.actions), ["ConnectivityTestFailed"]);
        assert_eq!(env.count("POST", NEW_UPSTREAM_TEST), 1);

        // The registry appears a minute later: the failed test of this url still holds,
        // nothing is created and GitLab is not asked again (no second Event either).
        let registry_id = env.registry("cache").await;
        env.reset();
        let mut later = upstream_request(
            desired("dockerhub", &broken.url()),
            known_after(&refused),
            t0() + minutes(1),
        );
        later.registry_for_create = Some(CreateThrough::Registry(registry_id));
        let still = env.reconcile_upstream(&later).await;
        assert_eq!(still.synced.reason, "ConnectivityTestFailed");
        assert!(still.actions.is_empty(), "{:?}", still.actions);
        assert_eq!(env.count("POST", NEW_UPSTREAM_TEST), 0);
        assert_eq!(env.count("POST", REGISTRY_UPSTREAMS), 0);
        assert_eq!(still.next_check_in, Some(Duration::from_secs(9 * 60)));

        // A fixed url is a new configuration: tested at once, then created.
        let working = stub().await;
        env.reset();
        let mut fixed = upstream_request(
            desired("dockerhub", &working.url()),
            known_after(&still),
            t0() + minutes(2),
        );
        fixed.registry_for_create = Some(CreateThrough::Registry(registry_id));
        let created = env.reconcile_upstream(&fixed).await;
        assert!(created.error.is_none(), "{:?}", created.error);
        assert_eq!(reasons(&created.actions), ["Created"]);
        assert_eq!(env.count("POST", NEW_UPSTREAM_TEST), 1);
        assert_eq!(working.requests().len(), 1);
    })
    .await;
}

#[tokio::test]
async fn a_test_of_other_credentials_or_an_expired_test_is_not_reused_for_a_create() {
    guarded(async {
        let env = Env::start().await;
        let dockerhub = stub().await;
        let waiting = env
            .reconcile_upstream(&upstream_request(
                desired("dockerhub", &dockerhub.url()),
                KnownUpstream::default(),
                t0(),
            ))
            .await;
        assert_eq!(waiting.synced.reason, "WaitingForRegistry");
        let registry_id = env.registry("cache").await;

        // Credentials added since the test: tested again with them.
        env.reset();
        let mut with_credentials = desired("dockerhub", &dockerhub.url());
        with_credentials.credentials = Some(credentials("robot", "s3cret", "7"));
        let mut request = upstream_request(with_credentials, known_after(&waiting), t0());
        request.registry_for_create = Some(CreateThrough::Registry(registry_id));
        let created = env.reconcile_upstream(&request).await;
        assert!(created.error.is_none(), "{:?}", created.error);
        assert_eq!(env.count("POST", NEW_UPSTREAM_TEST), 1);
        assert_eq!(
            created.last_check_configuration,
            Some(upstream::TestedConfiguration::of(&request.desired))
        );

        // A test older than the interval is not reused either.
        env.reset();
        let mut other = desired("quay", &format!("{}/quay", dockerhub.url()));
        other.connectivity_interval = Duration::from_secs(60);
        let first = env
            .reconcile_upstream(&upstream_request(
                other.clone(),
                KnownUpstream::default(),
                t0(),
            ))
            .await;
        let mut request = upstream_request(other, known_after(&first), t0() + minutes(2));
        request.registry_for_create = Some(CreateThrough::Registry(registry_id));
        env.reset();
        let created = env.reconcile_upstream(&request).await;
        assert!(created.error.is_none(), "{:?}", created.error);
        assert_eq!(env.count("POST", NEW_UPSTREAM_TEST), 1);
    })
    .await;
}

// ---- upstreams: connection tests -------------------------------------------------------------

#[tokio::test]
async fn periodic_tests_report_gitlabs_result_as_the_reachable_reason() {
    guarded(async {
        let env = Env::start().await;
        let registry_id = env.registry("cache").await;
        for (status, reason) in [
            (401, "Unauthorized"),
            (403, "Forbidden"),
            (500, "ServerError"),
            (503, "ServerError"),
        ] {
            let upstream = stub().await;
            let name = format!("upstream-{status}");
            let created = env.upstream(&name, &upstream.url(), registry_id).await;
            upstream.set_status(status);
            env.reset();
            let outcome = env
                .reconcile_upstream(&upstream_request(
                    desired(&name, &upstream.url()),
                    known_after(&created),
                    t0() + minutes(10),
                ))
                .await;
            assert!(outcome.error.is_none(), "{:?}", outcome.error);
            assert_eq!(env.count("POST", UPSTREAM_TEST), 1, "{status}");
            let reachable = outcome.reachable.as_ref().expect("tested");
            assert_eq!(reachable.status, Status::False, "{status}");
            assert_eq!(reachable.reason, reason, "{status}");
            let phrase = reqwest::StatusCode::from_u16(status)
                .expect("status")
                .canonical_reason()
                .expect("reason phrase");
            assert_eq!(reachable.message, format!("Error: {status} - {phrase}"));
            // An unreachable upstream is not a sync failure.
            assert_eq!(outcome.synced.status, Status::True);
            let check = outcome.last_check.expect("recorded");
            assert!(!check.success);
            assert_eq!(check.time, t0() + minutes(10));
            // Limit of 5 upstreams per registry: remove it again.
            env.sim
                .with_state(|state| state.delete_upstream(created.upstream_id.expect("id") as u64))
                .expect("removed");
        }
    })
    .await;
}

#[tokio::test]
async fn a_slow_upstream_is_reported_as_timeout() {
    guarded(async {
        let env = Env::with_config(SimConfig {
            upstream_timeout: Duration::from_millis(300),
            ..sim_config()
        })
        .await;
        let slow = stub().await;
        let registry_id = env.registry("cache").await;
        let created = env.upstream("slow", &slow.url(), registry_id).await;
        slow.set_delay(Duration::from_secs(5));
        let outcome = env
            .reconcile_upstream(&upstream_request(
                desired("slow", &slow.url()),
                known_after(&created),
                t0() + minutes(10),
            ))
            .await;
        assert!(outcome.error.is_none(), "{:?}", outcome.error);
        let reachable = outcome.reachable.as_ref().expect("tested");
        assert_eq!(reachable.status, Status::False);
        assert_eq!(reachable.reason, "Timeout", "{}", reachable.message);
    })
    .await;
}

#[tokio::test]
async fn the_periodic_test_runs_only_when_the_interval_has_elapsed() {
    guarded(async {
        let env = Env::start().await;
        let upstream = stub().await;
        let registry_id = env.registry("cache").await;
        let created = env
            .upstream("dockerhub", &upstream.url(), registry_id)
            .await;
        let spec = desired("dockerhub", &upstream.url());

        env.reset();
        let early = env
            .reconcile_upstream(&upstream_request(
                spec.clone(),
                known_after(&created),
                t0() + minutes(9),
            ))
            .await;
        assert!(early.error.is_none(), "{:?}", early.error);
        assert_eq!(env.sim.write_count(), 0, "no test before the interval");
        assert_eq!(early.last_check, created.last_check);
        assert_eq!(early.next_check_in, Some(Duration::from_secs(60)));
        assert_eq!(
            early.reachable.as_ref().expect("last check").status,
            Status::True
        );

        env.reset();
        let due = env
            .reconcile_upstream(&upstream_request(
                spec,
                known_after(&early),
                t0() + minutes(10),
            ))
            .await;
        assert!(due.error.is_none(), "{:?}", due.error);
        assert_eq!(env.count("POST", UPSTREAM_TEST), 1);
        assert_eq!(
            env.sim.write_count(),
            0,
            "the test is the only POST, and stores nothing"
        );
        assert_eq!(due.last_check.expect("recorded").time, t0() + minutes(10));
        assert_eq!(due.next_check_in, Some(INTERVAL));
    })
    .await;
}

// ---- associations ------------------------------------------------------------------------

/// A registry with upstreams `names` created through it, in that order.
async fn registry_with(
    env: &Env,
    registry: &str,
    names: &[&str],
) -> (i64, Vec<(String, i64)>, Vec<UpstreamStub>) {
    let registry_id = env.registry(registry).await;
    let mut stubs = Vec::new();
    let mut ids = Vec::new();
    for name in names {
        let upstream = stub().await;
        let created = env.upstream(name, &upstream.url(), registry_id).await;
        ids.push(((*name).to_owned(), created.upstream_id.expect("id")));
        stubs.push(upstream);
    }
    (registry_id, ids, stubs)
}

fn pick<'a>(ids: &'a [(String, i64)], names: &[&str]) -> Vec<(&'a str, i64)> {
    names
        .iter()
        .map(|name| {
            let (n, id) = ids.iter().find(|(n, _)| n == name).expect("known name");
            (n.as_str(), *id)
        })
        .collect()
}

#[tokio::test]
async fn reorder_takes_the_fewest_repositionings_and_matches_the_spec() {
    guarded(async {
        let env = Env::start().await;
        let (registry_id, ids, _stubs) = registry_with(&env, "cache", &["a", "b", "c"]).await;

        env.reset();
        let steady = env
            .reconcile_registry(&registry_request(
                "cache",
                &pick(&ids, &["a", "b", "c"]),
                Some(registry_id),
            ))
            .await;
        assert!(
            steady.error.is_none() && steady.actions.is_empty(),
            "{:?}",
            steady.actions
        );
        assert_eq!(env.sim.write_count(), 0);

        env.reset();
        let wanted = pick(&ids, &["c", "a", "b"]);
        let outcome = env
            .reconcile_registry(&registry_request("cache", &wanted, Some(registry_id)))
            .await;
        assert!(outcome.error.is_none(), "{:?}", outcome.error);
        assert_eq!(
            env.count("PATCH", ASSOCIATION),
            1,
            "moving c to the front is one call"
        );
        assert_eq!(env.sim.write_count(), 1);
        let want_ids: Vec<i64> = wanted.iter().map(|(_, id)| *id).collect();
        assert_eq!(order_of(&env.snapshot(), registry_id), want_ids);
        let reported: Vec<(String, i64, i64)> = outcome
            .members
            .iter()
            .map(|m| (m.name.clone(), m.upstream_id, m.position))
            .collect();
        assert_eq!(
            reported,
            [
                ("c".to_owned(), want_ids[0], 1),
                ("a".to_owned(), want_ids[1], 2),
                ("b".to_owned(), want_ids[2], 3)
            ]
        );
        // Association ids in the outcome are GitLab's.
        let snapshot = env.snapshot();
        for member in &outcome.members {
            let association = snapshot
                .associations
                .iter()
                .find(|a| Some(a.id as i64) == member.association_id)
                .expect("association exists");
            assert_eq!(association.upstream_id as i64, member.upstream_id);
            assert_eq!(association.position, member.position);
        }

        // [c, a, b] -> [b, a, c] reverses the order: no two stay in order, two moves.
        env.reset();
        let reversed = pick(&ids, &["b", "a", "c"]);
        let outcome = env
            .reconcile_registry(&registry_request("cache", &reversed, Some(registry_id)))
            .await;
        assert!(outcome.error.is_none(), "{:?}", outcome.error);
        assert_eq!(env.count("PATCH", ASSOCIATION), 2);
        let want_ids: Vec<i64> = reversed.iter().map(|(_, id)| *id).collect();
        assert_eq!(order_of(&env.snapshot(), registry_id), want_ids);

        env.reset();
        let outcome = env
            .reconcile_registry(&registry_request("cache", &reversed, Some(registry_id)))
            .await;
        assert!(outcome.actions.is_empty(), "{:?}", outcome.actions);
        assert_eq!(env.sim.write_count(), 0);
    })
    .await;
}

#[tokio::test]
async fn every_order_of_five_converges_in_gitlab() {
    guarded(async {
        let env = Env::start().await;
        let (registry_id, ids, _stubs) =
            registry_with(&env, "cache", &["a", "b", "c", "d", "e"]).await;
        let orders: [[&str; 5]; 4] = [
            ["e", "d", "c", "b", "a"],
            ["b", "c", "d", "e", "a"],
            ["a", "e", "b", "d", "c"],
            ["c", "a", "e", "b", "d"],
        ];
        for order in orders {
            let wanted = pick(&ids, &order);
            let outcome = env
                .reconcile_registry(&registry_request("cache", &wanted, Some(registry_id)))
                .await;
            assert!(outcome.error.is_none(), "{order:?}: {:?}", outcome.error);
            let want_ids: Vec<i64> = wanted.iter().map(|(_, id)| *id).collect();
            assert_eq!(
                order_of(&env.snapshot(), registry_id),
                want_ids,
                "{order:?}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn upstreams_are_added_and_removed_as_the_list_says() {
    guarded(async {
        let env = Env::start().await;
        let (registry_id, ids, _stubs) = registry_with(&env, "cache", &["a", "b"]).await;
        // `c` lives in another registry; adding it to ours is an association.
        let (_, other_ids, _other_stubs) = registry_with(&env, "other", &["c"]).await;
        let mut all = ids.clone();
        all.extend(other_ids);

        env.reset();
        let wanted = pick(&all, &["a", "c"]);
        let outcome = env
            .reconcile_registry(&registry_request("cache", &wanted, Some(registry_id)))
            .await;
        assert!(outcome.error.is_none(), "{:?}", outcome.error);
        assert_eq!(env.count("DELETE", ASSOCIATION), 1);
        assert_eq!(env.count("POST", ASSOCIATIONS), 1);
        assert_eq!(env.count("PATCH", ASSOCIATION), 0);
        assert_eq!(env.count("DELETE", UPSTREAM), 0);
        let snapshot = env.snapshot();
        let want_ids: Vec<i64> = wanted.iter().map(|(_, id)| *id).collect();
        assert_eq!(order_of(&snapshot, registry_id), want_ids);
        // Disassociated, not deleted.
        assert_eq!(snapshot.upstreams.len(), 3);
        let mut seen = reasons(&outcome.actions);
        seen.sort();
        assert_eq!(seen, ["Associated", "Disassociated"]);

        env.reset();
        let outcome = env
            .reconcile_registry(&registry_request("cache", &[], Some(registry_id)))
            .await;
        assert!(outcome.error.is_none(), "{:?}", outcome.error);
        assert_eq!(env.count("DELETE", ASSOCIATION), 2);
        assert!(order_of(&env.snapshot(), registry_id).is_empty());
        assert!(outcome.members.is_empty());
    })
    .await;
}

#[tokio::test]
async fn nothing_is_removed_while_a_member_is_pending() {
    guarded(async {
        let env = Env::start().await;
        let (registry_id, ids, _stubs) = registry_with(&env, "cache", &["a", "b"]).await;
        let mut request = registry_request("cache", &pick(&ids, &["a"]), Some(registry_id));
        request.desired.members.push(DesiredMember {
            name: "quay".into(),
            resolution: Resolution::Pending,
        });
        env.reset();
        let outcome = env.reconcile_registry(&request).await;
        assert!(outcome.error.is_none(), "{:?}", outcome.error);
        assert_eq!(env.count("DELETE", ASSOCIATION), 0);
        assert_eq!(outcome.upstreams_resolved.status, Status::False);
        assert_eq!(outcome.upstreams_resolved.reason, "WaitingForUpstream");
        assert_eq!(
            order_of(&env.snapshot(), registry_id),
            ids.iter().map(|(_, id)| *id).collect::<Vec<_>>()
        );

        // A missing Upstream object holds removals back the same way.
        request.desired.members[1].resolution = Resolution::Missing;
        env.reset();
        let outcome = env.reconcile_registry(&request).await;
        assert_eq!(env.count("DELETE", ASSOCIATION), 0);
        assert_eq!(outcome.upstreams_resolved.reason, "UpstreamNotFound");

        // Once everything resolves, the extra goes.
        env.reset();
        let outcome = env
            .reconcile_registry(&registry_request(
                "cache",
                &pick(&ids, &["a"]),
                Some(registry_id),
            ))
            .await;
        assert!(outcome.error.is_none(), "{:?}", outcome.error);
        assert_eq!(env.count("DELETE", ASSOCIATION), 1);
        assert_eq!(outcome.upstreams_resolved.status, Status::True);
        assert_eq!(order_of(&env.snapshot(), registry_id), [ids[0].1]);
    })
    .await;
}

#[tokio::test]
async fn sixth_upstream_of_a_registry_reports_gitlabs_limit() {
    guarded(async {
        let env = Env::start().await;
        let (registry_id, ids, _stubs) =
            registry_with(&env, "cache", &["a", "b", "c", "d", "e"]).await;
        let sixth = stub().await;
        let mut request =
            upstream_request(desired("f", &sixth.url()), KnownUpstream::default(), t0());
        request.registry_for_create = Some(CreateThrough::Registry(registry_id));
        let outcome = env.reconcile_upstream(&request).await;
        let error = outcome.error.expect("refused");
        assert_eq!(error.reason(), "LimitExceeded");
        assert_eq!(outcome.synced.reason, "LimitExceeded");
        assert!(
            outcome
                .synced
                .message
                .contains("must be less than or equal to 5"),
            "{}",
            outcome.synced.message
        );
        assert_eq!(env.snapshot().upstreams.len(), 5);

        // Listing six in a registry is refused before GitLab is asked to do anything.
        let (_, other_ids, _other_stubs) = registry_with(&env, "other", &["g"]).await;
        let mut six: Vec<(&str, i64)> = ids.iter().map(|(n, id)| (n.as_str(), *id)).collect();
        six.push(("g", other_ids[0].1));
        env.reset();
        let outcome = env
            .reconcile_registry(&registry_request("cache", &six, Some(registry_id)))
            .await;
        assert_eq!(outcome.error.expect("refused").reason(), "InvalidSpec");
        assert_eq!(env.sim.write_count(), 0);
    })
    .await;
}

#[tokio::test]
async fn a_registry_waiting_for_upstreams_plans_its_reruns_on_its_recent_view() {
    guarded(async {
        let env = Env::start().await;
        let dockerhub = stub().await;
        let other = env.registry("other").await;
        let cache = env.registry("cache").await;
        let mut ids = Vec::new();
        for name in ["u1", "u2", "u3", "u4"] {
            let created = env
                .upstream(name, &format!("{}/{name}", dockerhub.url()), other)
                .await;
            ids.push(created.upstream_id.expect("id"));
        }
        let views = registry::RegistryViews::new(registry::REGISTRY_VIEW_MAX_AGE);
        let shared = shared_views(&views, t0());

        // u2 is still being created: u1 is associated, u3 waits behind it.
        env.reset();
        let mut request = registry_request("cache", &[("u1", ids[0])], Some(cache));
        request.desired.members.push(DesiredMember {
            name: "u2".into(),
            resolution: Resolution::Pending,
        });
        request.desired.members.push(DesiredMember {
            name: "u3".into(),
            resolution: Resolution::Resolved(ids[2]),
        });
        let waiting = registry::reconcile_with_views(&env.client, &request, Some(shared)).await;
        assert!(waiting.error.is_none(), "{:?}", waiting.error);
        assert_eq!(waiting.upstreams_resolved.reason, "WaitingForUpstream");
        assert_eq!(env.count("GET", REGISTRY), 1);
        assert_eq!(order_of(&env.snapshot(), cache), [ids[0]]);

        // u2 got its id: the rerun plans on the view, reads nothing and appends in order.
        env.reset();
        let mut rerun = registry_request(
            "cache",
            &[("u1", ids[0]), ("u2", ids[1]), ("u3", ids[2])],
            Some(cache),
        );
        rerun.known.waiting_for_upstreams = true;
        let done = registry::reconcile_with_views(&env.client, &rerun, Some(shared)).await;
        assert!(done.error.is_none(), "{:?}", done.error);
        assert_eq!(env.count("GET", REGISTRY), 0);
        assert_eq!(env.count("POST", ASSOCIATIONS), 2);
        assert_eq!(env.count("PATCH", ASSOCIATION), 0);
        assert_eq!(order_of(&env.snapshot(), cache), [ids[0], ids[1], ids[2]]);
        assert_eq!(
            done.members.iter().map(|m| m.position).collect::<Vec<_>>(),
            [1, 2, 3]
        );

        // Behind the view's back, u4 is associated (as an upstream created through the
        // registry would be). A plan on the view tries to add it; GitLab refuses the
        // duplicate, and the engine reads the registry and plans again.
        env.client
            .associate_upstream(cache, ids[3])
            .await
            .expect("associated in GitLab");
        env.reset();
        let mut stale = registry_request(
            "cache",
            &[
                ("u1", ids[0]),
                ("u2", ids[1]),
                ("u4", ids[3]),
                ("u3", ids[2]),
            ],
            Some(cache),
        );
        stale.known.waiting_for_upstreams = true;
        let corrected = registry::reconcile_with_views(&env.client, &stale, Some(shared)).await;
        assert!(corrected.error.is_none(), "{:?}", corrected.error);
        assert_eq!(env.count("POST", ASSOCIATIONS), 1, "the refused one");
        assert_eq!(env.count("GET", REGISTRY), 1, "read after the refusal");
        assert_eq!(
            order_of(&env.snapshot(), cache),
            [ids[0], ids[1], ids[3], ids[2]]
        );
        assert_eq!(corrected.synced.status, Status::True);

        // Not waiting for upstreams (a resync, a new spec): the registry is read.
        env.reset();
        let resync = registry::reconcile_with_views(
            &env.client,
            &registry_request(
                "cache",
                &[
                    ("u1", ids[0]),
                    ("u2", ids[1]),
                    ("u4", ids[3]),
                    ("u3", ids[2]),
                ],
                Some(cache),
            ),
            Some(shared),
        )
        .await;
        assert!(resync.actions.is_empty(), "{:?}", resync.actions);
        assert_eq!(env.count("GET", REGISTRY), 1);

        // A view older than its max age is not used either.
        env.reset();
        let later = registry::SharedViews {
            now: t0() + SignedDuration::from_secs(31),
            ..shared
        };
        registry::reconcile_with_views(&env.client, &stale, Some(later)).await;
        assert_eq!(env.count("GET", REGISTRY), 1);
    })
    .await;
}

#[tokio::test]
async fn a_full_registry_behind_the_view_is_read_and_reordered_not_failed() {
    guarded(async {
        let env = Env::start().await;
        let dockerhub = stub().await;
        let cache = env.registry("cache").await;
        let views = registry::RegistryViews::new(registry::REGISTRY_VIEW_MAX_AGE);
        let shared = shared_views(&views, t0());
        // The view: nothing associated yet, every member still being created.
        let mut waiting = registry_request("cache", &[], Some(cache));
        for name in ["u1", "u2", "u3", "u4", "u5"] {
            waiting.desired.members.push(DesiredMember {
                name: name.into(),
                resolution: Resolution::Pending,
            });
        }
        let outcome = registry::reconcile_with_views(&env.client, &waiting, Some(shared)).await;
        assert!(outcome.error.is_none(), "{:?}", outcome.error);

        // All five are created through the registry, in the reverse of the declared order.
        let mut ids = Vec::new();
        for name in ["u5", "u4", "u3", "u2", "u1"] {
            let created = env
                .upstream(name, &format!("{}/{name}", dockerhub.url()), cache)
                .await;
            ids.insert(0, created.upstream_id.expect("id"));
        }
        env.reset();
        let list: Vec<(&str, i64)> = ["u1", "u2", "u3", "u4", "u5"]
            .into_iter()
            .zip(ids.iter().copied())
            .collect();
        let mut rerun = registry_request("cache", &list, Some(cache));
        rerun.known.waiting_for_upstreams = true;
        let done = registry::reconcile_with_views(&env.client, &rerun, Some(shared)).await;
        // The plan on the view adds u1 to a full registry: GitLab refuses (limit, taken), the
        // registry is read, and only repositioning is left to do.
        assert!(done.error.is_none(), "{:?}", done.error);
        assert_eq!(env.count("POST", ASSOCIATIONS), 1);
        assert_eq!(env.count("GET", REGISTRY), 1);
        assert_eq!(order_of(&env.snapshot(), cache), ids);
        assert_eq!(done.synced.status, Status::True);
    })
    .await;
}

#[tokio::test]
async fn an_upstream_created_through_a_registry_is_added_to_its_view_or_drops_it() {
    guarded(async {
        let env = Env::start().await;
        let dockerhub = stub().await;
        let cache = env.registry("cache").await;
        let views = registry::RegistryViews::new(registry::REGISTRY_VIEW_MAX_AGE);
        let listings = gitlab_registry_operator::sync::listing::UpstreamListings::new(
            Duration::from_secs(300),
        );
        let shared = shared_views(&views, t0());
        let mut waiting = registry_request("cache", &[], Some(cache));
        waiting.desired.members.push(DesiredMember {
            name: "u1".into(),
            resolution: Resolution::Pending,
        });
        registry::reconcile_with_views(&env.client, &waiting, Some(shared)).await;

        // The Upstream engine creates u1 through the registry and adds GitLab's answer (the
        // association at position 1) to the registry's view.
        let mut request = upstream_request(
            desired("u1", &dockerhub.url()),
            KnownUpstream::default(),
            t0(),
        );
        request.registry_for_create = Some(CreateThrough::Registry(cache));
        let created = upstream::reconcile_with_listing(
            &env.client,
            &request,
            Some(upstream::SharedListing {
                listings: &listings,
                connection: "sim|default",
                nothing_changed: false,
                registry_views: Some(&views),
            }),
        )
        .await;
        let id = created.upstream_id.expect("created");

        // The registry's rerun plans on that view: u1 is there, nothing is sent.
        env.reset();
        let mut rerun = registry_request("cache", &[("u1", id)], Some(cache));
        rerun.known.waiting_for_upstreams = true;
        let done = registry::reconcile_with_views(&env.client, &rerun, Some(shared)).await;
        assert!(done.error.is_none(), "{:?}", done.error);
        assert_eq!(env.count("GET", REGISTRY), 0);
        assert_eq!(env.count("POST", ASSOCIATIONS), 0, "nothing refused");
        assert_eq!(done.members.len(), 1);

        // An insert that does not land where the view expects the next one (here: the view
        // knows one association, GitLab reports position 1 again) drops the view.
        views.record_insert(
            "sim|default",
            &gitlab_registry_operator::gitlab::RegistryUpstream {
                id: 999,
                registry_id: Some(cache),
                upstream_id: Some(12345),
                position: 1,
            },
        );
        env.reset();
        registry::reconcile_with_views(&env.client, &rerun, Some(shared)).await;
        assert_eq!(env.count("GET", REGISTRY), 1, "read again");
        assert_eq!(order_of(&env.snapshot(), cache), [id]);
    })
    .await;
}

#[tokio::test]
async fn new_registries_of_a_group_share_one_group_list_for_their_adoption_lookups() {
    guarded(async {
        let env = Env::start().await;
        let existing = env.registry("existing").await;
        let views = registry::RegistryViews::new(registry::REGISTRY_VIEW_MAX_AGE);
        let shared = shared_views(&views, t0());

        // Three registries reconciled at once: one list, then each creates or adopts.
        env.reset();
        let outcomes = new_registries_at_once(&env, shared, &["a", "b", "existing"]).await;
        for outcome in &outcomes {
            assert!(outcome.error.is_none(), "{:?}", outcome.error);
        }
        assert_eq!(env.count("GET", REGISTRIES), 1, "one list for all three");
        assert_eq!(env.count("POST", REGISTRIES), 2);
        assert_eq!(outcomes[2].registry_id, Some(existing));
        assert_eq!(reasons(&outcomes[2].actions), ["Adopted"]);

        // Our creates are writes in the group since that list: the next lookup lists again.
        env.reset();
        let outcome = registry::reconcile_with_views(
            &env.client,
            &registry_request("c", &[], None),
            Some(shared),
        )
        .await;
        assert!(outcome.error.is_none(), "{:?}", outcome.error);
        assert_eq!(env.count("GET", REGISTRIES), 1);
        assert_eq!(env.snapshot().registries.len(), 4, "nothing created twice");
    })
    .await;
}

#[tokio::test]
async fn a_registry_deleted_after_the_shared_list_is_looked_up_again_not_adopted() {
    guarded(async {
        let env = Env::start().await;
        let existing = env.registry("existing").await;
        let by_hand = env.registry("cache").await;
        let views = registry::RegistryViews::new(registry::REGISTRY_VIEW_MAX_AGE);
        let shared = shared_views(&views, t0());
        // An adoption (no write) lists the group: the listing shows `cache` too.
        let adopted = registry::reconcile_with_views(
            &env.client,
            &registry_request("existing", &[], None),
            Some(shared),
        )
        .await;
        assert_eq!(adopted.registry_id, Some(existing));

        // `cache` is deleted in the UI while that listing is still young enough to serve.
        env.sim
            .with_state(|state| state.delete_registry(by_hand as u64))
            .expect("deleted");
        env.reset();
        let outcome = registry::reconcile_with_views(
            &env.client,
            &registry_request("cache", &[], None),
            Some(shared),
        )
        .await;
        assert!(outcome.error.is_none(), "{:?}", outcome.error);
        assert_eq!(reasons(&outcome.actions), ["Created"]);
        assert_ne!(outcome.registry_id, Some(by_hand));
        assert_eq!(env.count("GET", REGISTRY), 1, "the listed one: 404");
        assert_eq!(env.count("GET", REGISTRIES), 1, "a list of its own");
        assert_eq!(env.count("POST", REGISTRIES), 1);
    })
    .await;
}

#[tokio::test]
async fn a_failed_shared_registry_list_is_one_request_and_every_waiter_gets_its_error() {
    guarded(async {
        let env = Env::start().await;
        let views = registry::RegistryViews::new(registry::REGISTRY_VIEW_MAX_AGE);
        let shared = shared_views(&views, t0());
        rate_limit_once(&env, "GET", REGISTRIES);
        env.reset();
        let outcomes = new_registries_at_once(&env, shared, &["a", "b"]).await;
        for outcome in &outcomes {
            let error = outcome.error.as_ref().expect("rate limited");
            assert_eq!(error.reason(), "RateLimited");
        }
        assert_eq!(env.count("GET", REGISTRIES), 1, "no second list");
        assert_eq!(env.count("POST", REGISTRIES), 0);
    })
    .await;
}

#[tokio::test]
async fn inserts_into_one_registry_go_one_at_a_time_as_gitlabs_unique_positions_require() {
    guarded(async {
        // GitLab reads the highest position, then commits; here 200 ms apart.
        let env = Env::with_config(SimConfig {
            insert_commit_delay: Duration::from_millis(200),
            ..sim_config()
        })
        .await;
        let dockerhub = stub().await;
        let new_upstream = |name: &str, registry_id: i64| {
            let mut request = upstream_request(
                desired(name, &format!("{}/{name}", dockerhub.url())),
                KnownUpstream::default(),
                t0(),
            );
            request.registry_for_create = Some(CreateThrough::Registry(registry_id));
            request
        };

        // Without the registry views, three creates through one registry at once read the
        // same position: GitLab's constraint fails all but one.
        let cache = env.registry("cache").await;
        let racing: Vec<UpstreamRequest> =
            ["a", "b", "c"].map(|name| new_upstream(name, cache)).into();
        let outcomes = futures::future::join_all(
            racing
                .iter()
                .map(|request| upstream::reconcile(&env.client, request)),
        )
        .await;
        let failed: Vec<&str> = outcomes
            .iter()
            .filter_map(|outcome| outcome.error.as_ref().map(|error| error.reason()))
            .collect();
        assert_eq!(failed, ["GitLabUnavailable", "GitLabUnavailable"]);
        assert_eq!(order_of(&env.snapshot(), cache).len(), 1);

        // With them (as `run` holds them; `apply` sends one request at a time), a registry's
        // reconcile adding two members and two creates through that registry, all at once,
        // all land.
        let other = env.registry("other").await;
        let created: Vec<i64> = outcomes.iter().filter_map(|o| o.upstream_id).collect();
        let second = env
            .upstream("x", &format!("{}/x", dockerhub.url()), cache)
            .await
            .upstream_id
            .expect("id");
        let views = registry::RegistryViews::new(registry::REGISTRY_VIEW_MAX_AGE);
        let listings = gitlab_registry_operator::sync::listing::UpstreamListings::new(
            Duration::from_secs(300),
        );
        let mut registry_request =
            registry_request("other", &[("a", created[0]), ("x", second)], Some(other));
        for name in ["d", "e"] {
            registry_request.desired.members.push(DesiredMember {
                name: name.into(),
                resolution: Resolution::Pending,
            });
        }
        let creates: Vec<UpstreamRequest> = ["d", "e"].map(|name| new_upstream(name, other)).into();
        let shared_listing = upstream::SharedListing {
            listings: &listings,
            connection: "sim|default",
            nothing_changed: false,
            registry_views: Some(&views),
        };
        let (registry_outcome, create_outcomes) = futures::future::join(
            registry::reconcile_with_views(
                &env.client,
                &registry_request,
                Some(shared_views(&views, t0())),
            ),
            futures::future::join_all(creates.iter().map(|request| {
                upstream::reconcile_with_listing(&env.client, request, Some(shared_listing))
            })),
        )
        .await;
        assert!(
            registry_outcome.error.is_none(),
            "{:?}",
            registry_outcome.error
        );
        for outcome in &create_outcomes {
            assert!(outcome.error.is_none(), "{:?}", outcome.error);
        }
        let order = order_of(&env.snapshot(), other);
        assert_eq!(order.len(), 4, "{order:?}");
    })
    .await;
}

// ---- deletion ----------------------------------------------------------------------------

#[tokio::test]
async fn registry_delete_keeps_declared_and_shared_upstreams() {
    guarded(async {
        let env = Env::start().await;
        let (registry_id, ids, _stubs) =
            registry_with(&env, "cache", &["declared", "shared", "exclusive"]).await;
        let other = env.registry("other").await;
        let shared = ids[1].1;
        env.client
            .associate_upstream(other, shared)
            .await
            .expect("shared with another registry");

        env.reset();
        let keep = HashSet::from([ids[0].1]);
        let actions = registry::delete(&env.client, registry_id, &keep, Mode::Apply)
            .await
            .expect("deleted");
        assert_eq!(reasons(&actions), ["Disassociated", "Deleted"]);
        assert_eq!(env.count("DELETE", ASSOCIATION), 1);
        assert_eq!(env.count("DELETE", REGISTRY), 1);
        let snapshot = env.snapshot();
        assert!(
            snapshot
                .registries
                .iter()
                .all(|r| r.id as i64 != registry_id)
        );
        let left: HashSet<i64> = snapshot.upstreams.iter().map(|u| u.id as i64).collect();
        assert_eq!(
            left,
            HashSet::from([ids[0].1, shared]),
            "exclusive one cascaded"
        );
        assert_eq!(order_of(&snapshot, other), [shared]);

        // Deleting again: already gone is deleted.
        env.reset();
        let again = registry::delete(&env.client, registry_id, &keep, Mode::Apply)
            .await
            .expect("already gone is fine");
        assert_eq!(reasons(&again), ["Deleted"]);
        assert_eq!(env.sim.write_count(), 0);
    })
    .await;
}

#[tokio::test]
async fn upstream_delete_succeeds_also_when_already_gone() {
    guarded(async {
        let env = Env::start().await;
        let (registry_id, ids, _stubs) = registry_with(&env, "cache", &["a", "b"]).await;
        let action = upstream::delete(&env.client, ids[0].1, Mode::Apply)
            .await
            .expect("deleted");
        assert_eq!(action.reason, "Deleted");
        let snapshot = env.snapshot();
        assert_eq!(snapshot.upstreams.len(), 1);
        assert_eq!(order_of(&snapshot, registry_id), [ids[1].1]);
        let again = upstream::delete(&env.client, ids[0].1, Mode::Apply)
            .await
            .expect("already gone is fine");
        assert_eq!(again.reason, "Deleted");
        assert!(!again.writes);
        // Plan mode deletes nothing.
        env.reset();
        let planned = upstream::delete(&env.client, ids[1].1, Mode::Plan)
            .await
            .expect("planned");
        assert_eq!(planned.reason, "Deleted");
        assert_eq!(env.sim.write_count(), 0);
        assert_eq!(env.snapshot().upstreams.len(), 1);
    })
    .await;
}

// ---- drift, steady state, plan ---------------------------------------------------------------

#[tokio::test]
async fn drift_made_in_gitlab_is_corrected_on_the_next_reconcile() {
    guarded(async {
        let env = Env::start().await;
        let (registry_id, ids, stubs) = registry_with(&env, "cache", &["a", "b", "c"]).await;
        let list = pick(&ids, &["a", "b", "c"]);
        let request = registry_request("cache", &list, Some(registry_id));
        let (a, b, c) = (ids[0].1 as u64, ids[1].1 as u64, ids[2].1 as u64);
        let other_url = stub().await;

        // Someone renames the registry, moves an upstream, edits two upstreams in the UI.
        env.sim.with_state(|state| {
            state
                .update_registry(registry_id as u64, Some("renamed"), None)
                .expect("rename");
            let moved = state
                .associations_of_upstream(c)
                .first()
                .map(|association| association.id)
                .expect("association");
            state.reposition(moved, 1).expect("reorder");
            state
                .update_upstream(
                    a,
                    gitlab_registry_operator::sim::state::UpstreamChanges {
                        url: Some(other_url.url()),
                        ..Default::default()
                    },
                    true,
                )
                .expect("url drift");
            state
                .update_upstream(
                    b,
                    gitlab_registry_operator::sim::state::UpstreamChanges {
                        cache_validity_hours: Some(1),
                        ..Default::default()
                    },
                    true,
                )
                .expect("hours drift");
        });

        env.reset();
        let outcome = env.reconcile_registry(&request).await;
        assert!(outcome.error.is_none(), "{:?}", outcome.error);
        assert_eq!(env.count("PATCH", REGISTRY), 1);
        assert_eq!(env.count("PATCH", ASSOCIATION), 1);
        let snapshot = env.snapshot();
        assert_eq!(
            snapshot
                .registries
                .iter()
                .find(|r| r.id as i64 == registry_id)
                .expect("registry")
                .name,
            "cache"
        );
        assert_eq!(
            order_of(&snapshot, registry_id),
            [a as i64, b as i64, c as i64]
        );

        for (index, (name, id)) in ids.iter().enumerate().take(2) {
            let outcome = env
                .reconcile_upstream(&upstream_request(
                    desired(name, &stubs[index].url()),
                    KnownUpstream {
                        upstream_id: Some(*id),
                        last_check: Some(upstream::ConnectivityCheck {
                            time: t0(),
                            success: true,
                            result: None,
                        }),
                        ..Default::default()
                    },
                    t0() + minutes(1),
                ))
                .await;
            assert!(outcome.error.is_none(), "{name}: {:?}", outcome.error);
            assert_eq!(reasons(&outcome.actions), ["Updated"], "{name}");
        }
        let snapshot = env.snapshot();
        assert_eq!(sim_upstream(&snapshot, a as i64).url, stubs[0].url());
        assert_eq!(sim_upstream(&snapshot, b as i64).cache_validity_hours, 24);

        // An association removed in GitLab comes back, at its declared position.
        env.sim.with_state(|state| {
            let removed = state
                .associations_of_upstream(a)
                .first()
                .map(|association| association.id)
                .expect("association");
            state.disassociate(removed).expect("removed");
        });
        env.reset();
        let outcome = env.reconcile_registry(&request).await;
        assert!(outcome.error.is_none(), "{:?}", outcome.error);
        assert_eq!(env.count("POST", ASSOCIATIONS), 1);
        assert_eq!(
            env.count("PATCH", ASSOCIATION),
            1,
            "appended, then moved to the front"
        );
        assert_eq!(
            order_of(&env.snapshot(), registry_id),
            [a as i64, b as i64, c as i64]
        );
    })
    .await;
}

#[tokio::test]
async fn a_converged_reconcile_sends_no_writes_and_tests_only_when_due() {
    guarded(async {
        let env = Env::start().await;
        let (registry_id, ids, stubs) = registry_with(&env, "cache", &["a", "b"]).await;
        let list = pick(&ids, &["a", "b"]);
        let mut known = Vec::new();
        for (index, (name, id)) in ids.iter().enumerate() {
            known.push((
                desired(name, &stubs[index].url()),
                KnownUpstream {
                    upstream_id: Some(*id),
                    last_check: Some(upstream::ConnectivityCheck {
                        time: t0(),
                        success: true,
                        result: None,
                    }),
                    ..Default::default()
                },
            ));
        }

        env.reset();
        let outcome = env
            .reconcile_registry(&registry_request("cache", &list, Some(registry_id)))
            .await;
        assert!(
            outcome.error.is_none() && outcome.actions.is_empty(),
            "{:?}",
            outcome.actions
        );
        for (spec, known) in &known {
            let outcome = env
                .reconcile_upstream(&upstream_request(
                    spec.clone(),
                    known.clone(),
                    t0() + minutes(5),
                ))
                .await;
            assert!(
                outcome.error.is_none() && outcome.actions.is_empty(),
                "{:?}",
                outcome.actions
            );
            assert_eq!(outcome.synced.status, Status::True);
        }
        assert_eq!(env.sim.write_count(), 0, "{:?}", env.sim.request_counts());

        // Once the interval has elapsed the only POSTs are the connection tests.
        env.reset();
        for (spec, known) in &known {
            env.reconcile_upstream(&upstream_request(
                spec.clone(),
                known.clone(),
                t0() + minutes(10),
            ))
            .await;
        }
        assert_eq!(env.count("POST", UPSTREAM_TEST), 2);
        // Connection tests store nothing in GitLab: still no write.
        assert_eq!(env.sim.write_count(), 0, "{:?}", env.sim.request_counts());
    })
    .await;
}

#[tokio::test]
async fn plan_sends_only_gets_and_reports_what_apply_does() {
    guarded(async {
        let env = Env::start().await;
        let (registry_id, ids, stubs) = registry_with(&env, "cache", &["a", "b", "c"]).await;
        let (_, other_ids, _other_stubs) = registry_with(&env, "other", &["d"]).await;
        let mut all = ids.clone();
        all.extend(other_ids);
        let moved = stub().await;

        let mut registry_plan = registry_request(
            "cache-renamed",
            &pick(&all, &["c", "a", "d"]),
            Some(registry_id),
        );
        registry_plan.desired.description = Some("described".into());
        registry_plan.mode = Mode::Plan;
        let mut upstream_spec = desired("a", &moved.url());
        upstream_spec.cache_validity_hours = 12;
        let mut upstream_plan = upstream_request(
            upstream_spec,
            KnownUpstream {
                upstream_id: Some(ids[0].1),
                last_check: Some(upstream::ConnectivityCheck {
                    time: t0(),
                    success: true,
                    result: None,
                }),
                ..Default::default()
            },
            t0() + minutes(30),
        );
        upstream_plan.mode = Mode::Plan;
        let mut new_registry_plan = registry_request("brand-new", &pick(&all, &["b"]), None);
        new_registry_plan.mode = Mode::Plan;
        let new_upstream = stub().await;
        let mut new_upstream_plan = upstream_request(
            desired("new", &new_upstream.url()),
            KnownUpstream::default(),
            t0(),
        );
        new_upstream_plan.registry_for_create = Some(CreateThrough::Registry(registry_id));
        new_upstream_plan.mode = Mode::Plan;

        let before = env.snapshot();
        env.reset();
        let planned_registry = env.reconcile_registry(&registry_plan).await;
        let planned_upstream = env.reconcile_upstream(&upstream_plan).await;
        let planned_new_registry = env.reconcile_registry(&new_registry_plan).await;
        let planned_new_upstream = env.reconcile_upstream(&new_upstream_plan).await;
        for error in [
            &planned_registry.error,
            &planned_upstream.error,
            &planned_new_registry.error,
            &planned_new_upstream.error,
        ] {
            assert!(error.is_none(), "{error:?}");
        }
        let counts = env.sim.request_counts();
        assert!(!counts.is_empty());
        assert!(
            counts.keys().all(|key| key.starts_with("GET ")),
            "plan sent more than GETs: {counts:?}"
        );
        assert_eq!(env.snapshot().registries.len(), before.registries.len());
        assert_eq!(env.snapshot().associations, before.associations);
        assert_eq!(stubs[0].requests().len(), 1, "plan tests nothing");
        assert!(new_upstream.requests().is_empty());
        assert_eq!(
            reasons(&planned_new_registry.actions),
            ["Created", "Associated"]
        );
        assert_eq!(reasons(&planned_new_upstream.actions), ["Created"]);

        let summary = |actions: &[Action]| -> Vec<(String, Vec<String>)> {
            let mut list: Vec<(String, Vec<String>)> = actions
                .iter()
                .map(|a| {
                    (
                        a.reason.to_owned(),
                        a.changes
                            .iter()
                            .map(|c| format!("{}:{:?}->{:?}", c.field, c.from, c.to))
                            .collect(),
                    )
                })
                .collect();
            list.sort();
            list
        };

        let mut registry_apply = registry_plan.clone();
        registry_apply.mode = Mode::Apply;
        let mut upstream_apply = upstream_plan.clone();
        upstream_apply.mode = Mode::Apply;
        let applied_registry = env.reconcile_registry(&registry_apply).await;
        let applied_upstream = env.reconcile_upstream(&upstream_apply).await;
        assert!(
            applied_registry.error.is_none(),
            "{:?}",
            applied_registry.error
        );
        assert!(
            applied_upstream.error.is_none(),
            "{:?}",
            applied_upstream.error
        );
        assert_eq!(
            summary(&planned_registry.actions),
            summary(&applied_registry.actions)
        );
        assert_eq!(
            summary(&planned_upstream.actions),
            summary(&applied_upstream.actions)
        );
        assert_eq!(
            planned_registry.members,
            applied_registry
                .members
                .iter()
                .map(|m| {
                    let mut m = m.clone();
                    if planned_registry
                        .members
                        .iter()
                        .any(|p| p.upstream_id == m.upstream_id && p.association_id.is_none())
                    {
                        m.association_id = None;
                    }
                    m
                })
                .collect::<Vec<_>>()
        );
        let want: Vec<i64> = pick(&all, &["c", "a", "d"])
            .iter()
            .map(|(_, id)| *id)
            .collect();
        assert_eq!(order_of(&env.snapshot(), registry_id), want);

        let mut new_registry_apply = new_registry_plan.clone();
        new_registry_apply.mode = Mode::Apply;
        let applied_new = env.reconcile_registry(&new_registry_apply).await;
        assert!(applied_new.error.is_none(), "{:?}", applied_new.error);
        assert_eq!(
            summary(&planned_new_registry.actions).len(),
            summary(&applied_new.actions).len()
        );
        assert_eq!(reasons(&applied_new.actions), ["Created", "Associated"]);
    })
    .await;
}

// ---- GitLab failing ----------------------------------------------------------------------

#[tokio::test]
async fn a_gitlab_outage_is_transient_and_the_next_reconcile_converges_without_duplicates() {
    guarded(async {
        let env = Env::start().await;
        let (_, ids, stubs) = registry_with(&env, "seed-registry", &["a", "b"]).await;
        let list = pick(&ids, &["a", "b"]);

        // The association calls fail with 500s (POST is not retried by the client).
        env.sim.inject_fault(FaultSpec {
            once: vec![OneShotFault {
                count: 3,
                method: Some("POST".into()),
                route: Some(ASSOCIATIONS.into()),
                fault: FaultAction::Status { status: 500 },
            }],
            ..FaultSpec::default()
        });
        let request = registry_request("cache", &list, None);
        let failed = env.reconcile_registry(&request).await;
        let error = failed.error.clone().expect("GitLab failed");
        assert_eq!(error.reason(), "GitLabUnavailable");
        assert!(error.is_transient());
        assert_eq!(failed.synced.reason, "GitLabUnavailable");
        let registry_id = failed
            .registry_id
            .expect("the create is kept in the outcome");

        // The status write was lost too: the next run adopts and finishes.
        env.sim.clear_faults();
        let outcome = env.reconcile_registry(&request).await;
        assert!(outcome.error.is_none(), "{:?}", outcome.error);
        assert_eq!(outcome.registry_id, Some(registry_id));
        let snapshot = env.snapshot();
        assert_eq!(snapshot.registries.len(), 2, "no duplicate registry");
        let want: Vec<i64> = list.iter().map(|(_, id)| *id).collect();
        assert_eq!(order_of(&snapshot, registry_id), want);

        // A 500 burst on reads (retried, then given up) during an upstream reconcile.
        env.sim.inject_fault(FaultSpec {
            once: vec![OneShotFault {
                count: 5,
                method: Some("GET".into()),
                route: Some(UPSTREAM.into()),
                fault: FaultAction::Status { status: 503 },
            }],
            ..FaultSpec::default()
        });
        let upstream_known = KnownUpstream {
            upstream_id: Some(ids[0].1),
            ..Default::default()
        };
        let spec = desired("a", &stubs[0].url());
        let failed = env
            .reconcile_upstream(&upstream_request(
                spec.clone(),
                upstream_known.clone(),
                t0(),
            ))
            .await;
        assert_eq!(failed.error.expect("failed").reason(), "GitLabUnavailable");
        assert_eq!(failed.synced.reason, "GitLabUnavailable");
        env.sim.clear_faults();
        let outcome = env
            .reconcile_upstream(&upstream_request(spec, upstream_known, t0()))
            .await;
        assert!(outcome.error.is_none(), "{:?}", outcome.error);
        assert_eq!(env.snapshot().upstreams.len(), 2, "no duplicate upstream");
    })
    .await;
}

#[tokio::test]
async fn a_rate_limit_is_reported_with_gitlabs_delay_and_the_next_reconcile_converges() {
    guarded(async {
        let env = Env::start().await;
        let client = env.client_with(|config| config.max_retry_after = Duration::from_secs(1));
        let upstream = stub().await;
        let registry_id = env.registry("cache").await;

        env.sim.inject_fault(FaultSpec {
            once: vec![OneShotFault {
                count: 1,
                method: Some("POST".into()),
                route: Some(REGISTRY_UPSTREAMS.into()),
                fault: FaultAction::RateLimited {
                    retry_after_seconds: 120,
                },
            }],
            ..FaultSpec::default()
        });
        let mut request = upstream_request(
            desired("dockerhub", &upstream.url()),
            KnownUpstream::default(),
            t0(),
        );
        request.registry_for_create = Some(CreateThrough::Registry(registry_id));
        let limited = upstream::reconcile(&client, &request).await;
        let error = limited.error.clone().expect("rate limited");
        assert_eq!(error.reason(), "RateLimited");
        assert!(error.is_transient());
        assert_eq!(error.retry_after(), Some(Duration::from_secs(120)));
        assert_eq!(limited.synced.reason, "RateLimited");
        assert_eq!(limited.upstream_id, None);
        assert!(env.snapshot().upstreams.is_empty());

        let outcome = upstream::reconcile(&client, &request).await;
        assert!(outcome.error.is_none(), "{:?}", outcome.error);
        // Run once more with a lost status: adopted, still one.
        let again = upstream::reconcile(&client, &request).await;
        assert!(again.error.is_none(), "{:?}", again.error);
        assert_eq!(again.upstream_id, outcome.upstream_id);
        let snapshot = env.snapshot();
        assert_eq!(snapshot.upstreams.len(), 1);
        assert_eq!(
            order_of(&snapshot, registry_id),
            [outcome.upstream_id.expect("id")]
        );

        // A 429 on a registry read.
        env.sim.inject_fault(FaultSpec {
            once: vec![OneShotFault {
                count: 1,
                method: Some("GET".into()),
                route: Some(REGISTRY.into()),
                fault: FaultAction::EndpointRateLimited,
            }],
            ..FaultSpec::default()
        });
        let limited =
            registry::reconcile(&client, &registry_request("cache", &[], Some(registry_id))).await;
        let error = limited.error.expect("rate limited");
        assert_eq!(error.reason(), "RateLimited");
        assert_eq!(error.retry_after(), Some(Duration::from_secs(60)));
        assert!(
            error.message().contains("requested too many times"),
            "{}",
            error.message()
        );
    })
    .await;
}

#[tokio::test]
async fn removed_credentials_are_cleared_in_gitlab_and_in_the_outcome() {
    guarded(async {
        let env = Env::start().await;
        let first = stub().await;
        let second = stub().await;
        let registry_id = env.registry("cache").await;
        let mut spec = desired("private", &first.url());
        spec.credentials = Some(credentials("robot", "s3cret", "1"));
        let mut request = upstream_request(spec.clone(), KnownUpstream::default(), t0());
        request.registry_for_create = Some(CreateThrough::Registry(registry_id));
        let created = env.reconcile_upstream(&request).await;
        assert!(created.error.is_none(), "{:?}", created.error);
        let id = created.upstream_id.expect("id");

        // Credentials dropped from the spec, url unchanged: both sent empty.
        spec.credentials = None;
        env.reset();
        let cleared = env
            .reconcile_upstream(&upstream_request(
                spec.clone(),
                known_after(&created),
                t0() + minutes(1),
            ))
            .await;
        assert!(cleared.error.is_none(), "{:?}", cleared.error);
        let sent = env.recorder.take();
        // The gate test tries the upstream as it will be: without credentials (both blank;
        // none sent would test the stored ones).
        let gate = sent
            .iter()
            .find(|r| r.method == "POST" && r.path.ends_with("/test"))
            .expect("gate test");
        assert_eq!(gate.body, json!({"username": "", "password": ""}));
        let bodies: Vec<Value> = sent
            .into_iter()
            .filter(|r| r.method == "PATCH" && r.path.contains("/upstreams/"))
            .map(|r| r.body)
            .collect();
        assert_eq!(bodies.len(), 1);
        assert_eq!(body_keys(&bodies[0]), ["password", "username"]);
        assert_eq!(bodies[0]["username"], "");
        assert_eq!(cleared.applied_credentials, None);
        let snapshot = env.snapshot();
        let username = sim_upstream(&snapshot, id).username.clone();
        assert!(
            username.as_deref().is_none_or(str::is_empty),
            "{username:?}"
        );
        env.reset();
        let steady = env
            .reconcile_upstream(&upstream_request(
                spec,
                known_after(&cleared),
                t0() + minutes(2),
            ))
            .await;
        assert!(steady.actions.is_empty(), "{:?}", steady.actions);
        assert_eq!(env.sim.write_count(), 0);

        // Credentials dropped together with a url change: the url change alone clears them,
        // and the outcome no longer claims the old Secret version is applied.
        let mut spec = desired("private", &first.url());
        spec.credentials = Some(credentials("robot", "s3cret", "2"));
        let restored = env
            .reconcile_upstream(&upstream_request(
                spec.clone(),
                known_after(&steady),
                t0() + minutes(3),
            ))
            .await;
        assert!(restored.error.is_none(), "{:?}", restored.error);
        assert!(sim_upstream(&env.snapshot(), id).password.is_some());
        spec.credentials = None;
        spec.url = second.url();
        env.reset();
        let moved = env
            .reconcile_upstream(&upstream_request(
                spec,
                known_after(&restored),
                t0() + minutes(4),
            ))
            .await;
        assert!(moved.error.is_none(), "{:?}", moved.error);
        let bodies = env.patch_bodies("/upstreams/");
        assert_eq!(body_keys(&bodies[0]), ["url"]);
        assert_eq!(moved.applied_credentials, None);
        let snapshot = env.snapshot();
        let remote = sim_upstream(&snapshot, id);
        assert_eq!(remote.url, second.url());
        assert!(remote.username.is_none() && remote.password.is_none());
    })
    .await;
}

#[tokio::test]
async fn a_purge_cache_request_is_acted_on_once_per_value() {
    guarded(async {
        let env = Env::start().await;
        env.sim
            .seed(
                &Seed::parse(
                    "registries:\n  - {id: 7, group: my-org, name: cache}\nupstreams:\n  - id: 9\n    group: my-org\n    name: hub\n    url: https://registry-1.docker.io\n    registries: [cache]\n    cache_entries:\n      - {relative_path: library/alpine/manifests/latest}\n",
                )
                .expect("seed"),
            )
            .expect("seeded");
        assert_eq!(env.snapshot().cache_entries.len(), 1);
        let known = KnownUpstream {
            upstream_id: Some(9),
            last_check: Some(upstream::ConnectivityCheck {
                time: t0(),
                success: true,
                result: None,
            }),
            ..Default::default()
        };
        let mut request = upstream_request(
            desired("hub", "https://registry-1.docker.io"),
            known,
            t0() + minutes(1),
        );
        request.purge_cache_request = Some("2026-01-01T00:00:00Z".into());
        env.reset();
        let purged = env.reconcile_upstream(&request).await;
        assert!(purged.error.is_none(), "{:?}", purged.error);
        assert_eq!(reasons(&purged.actions), ["CachePurged"]);
        assert_eq!(
            env.count("DELETE", "/virtual_registries/container/upstreams/:id/cache"),
            1
        );
        assert!(env.snapshot().cache_entries.is_empty());
        assert_eq!(
            purged.last_handled_purge_cache.as_deref(),
            Some("2026-01-01T00:00:00Z")
        );

        // Same annotation value again: already handled.
        request.known = known_after(&purged);
        env.reset();
        let again = env.reconcile_upstream(&request).await;
        assert!(again.actions.is_empty(), "{:?}", again.actions);
        assert_eq!(env.sim.write_count(), 0);

        // The registry's purge works the same way.
        let mut registry_purge = registry_request("cache", &[("hub", 9)], Some(7));
        registry_purge.purge_cache_request = Some("first".into());
        env.reset();
        let purged = env.reconcile_registry(&registry_purge).await;
        assert!(purged.error.is_none(), "{:?}", purged.error);
        assert_eq!(reasons(&purged.actions), ["CachePurged"]);
        assert_eq!(
            env.count("DELETE", "/virtual_registries/container/registries/:id/cache"),
            1
        );
        registry_purge.known.last_handled_purge_cache = purged.last_handled_purge_cache;
        env.reset();
        let again = env.reconcile_registry(&registry_purge).await;
        assert!(again.actions.is_empty(), "{:?}", again.actions);
        assert_eq!(env.sim.write_count(), 0);
    })
    .await;
}

#[tokio::test]
async fn a_local_url_refused_by_gitlab_is_an_invalid_spec_with_gitlabs_message() {
    guarded(async {
        let env = Env::with_config(SimConfig {
            allow_local_network: false,
            ..sim_config()
        })
        .await;
        let local = stub().await;
        let registry_id = env.registry("cache").await;
        let mut request = upstream_request(
            desired("local", &local.url()),
            KnownUpstream::default(),
            t0(),
        );
        request.registry_for_create = Some(CreateThrough::Registry(registry_id));
        let outcome = env.reconcile_upstream(&request).await;
        let error = outcome.error.expect("refused");
        assert_eq!(error.reason(), "InvalidSpec");
        assert!(!error.is_transient());
        assert_eq!(outcome.synced.reason, "InvalidSpec");
        assert!(
            outcome
                .synced
                .message
                .contains("Requests to localhost are not allowed"),
            "{}",
            outcome.synced.message
        );
        assert!(env.snapshot().upstreams.is_empty());
        assert!(local.requests().is_empty());
    })
    .await;
}
