//! Cleanup runs (`sync::cleanup`) against the GitLab simulator over loopback: the exact set a
//! run deletes equals the pure selection's, protections hold, a dry run or plan never sends
//! a DELETE (faults included), limits and faults end runs as documented, the upstream cache
//! expires only old entries, and the GitLabPolicy sync writes only when it must.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use gitlab_registry_operator::cleanup::{
    self, CacheEntryInfo, CompiledRules, FamilySpec, InUseIndex, KeepReason, ProtectedTags,
    Protections, RuleSpec, TagInfo,
};
use gitlab_registry_operator::crd::cleanup_policy::{GitLabCadence, RunOutcome};
use gitlab_registry_operator::gitlab::{
    ClientConfig, ContainerExpirationPolicyUpdate, GitLabClient, PathOrId,
};
use gitlab_registry_operator::sim::seed::{
    GroupRef, SeedCacheEntry, SeedGroup, SeedProject, SeedProtectionRule, SeedRepository, SeedTag,
    SeedUpstream,
};
use gitlab_registry_operator::sim::{
    AccessLevel, FaultAction, FaultSpec, OneShotFault, Seed, SimConfig, SimHandle, Simulator,
};
use gitlab_registry_operator::sync::Mode;
use gitlab_registry_operator::sync::cleanup::{
    CleanupReport, CleanupRun, CleanupTarget, DesiredGitLabPolicy, InUse, RunLimits, Safety,
    run_cleanup, sync_gitlab_policy,
};
use jiff::{SignedDuration, Timestamp};
use secrecy::SecretString;

const TOKEN: &str = "cleanup-runs-token";
const TAGS_ROUTE: &str = "/projects/:id/registry/repositories/:repository_id/tags";
const TAG_ROUTE: &str = "/projects/:id/registry/repositories/:repository_id/tags/:tag_name";
const PROTECTION_ROUTE: &str = "/projects/:id/registry/protection/tag/rules";
/// Generous hang guard; no assertion depends on time.
const HANG_GUARD: Duration = Duration::from_secs(120);

fn now() -> Timestamp {
    "2026-06-15T12:00:00Z".parse().expect("timestamp")
}

fn hours_ago(hours: i64) -> Timestamp {
    now() - SignedDuration::from_hours(hours)
}

fn digest(seed: &str) -> String {
    // A stable 64-hex digest from any text (FNV-1a, repeated).
    let mut hex = String::new();
    let mut state: u64 = 0xcbf2_9ce4_8422_2325;
    while hex.len() < 64 {
        for byte in seed.bytes().chain(hex.len().to_string().bytes()) {
            state ^= u64::from(byte);
            state = state.wrapping_mul(0x0100_0000_01b3);
        }
        hex.push_str(&format!("{state:016x}"));
    }
    format!("sha256:{}", &hex[..64])
}

fn tag(name: &str, digest: Option<String>, created_at: Option<Timestamp>) -> SeedTag {
    SeedTag {
        name: name.to_owned(),
        digest,
        created_at,
        total_size: 1_000,
    }
}

/// `count` realistic tags plus `latest`, `main` and `stable-*`: semver, feature branches,
/// 40-hex shas and builds, created over 90 days, every 9th sharing the previous tag's digest,
/// every 50th without a manifest.
fn generated_tags(prefix: &str, count: usize) -> Vec<SeedTag> {
    let mut tags = vec![
        tag(
            "latest",
            Some(digest(&format!("{prefix}-0"))),
            Some(hours_ago(400)),
        ),
        tag(
            "main",
            Some(digest(&format!("{prefix}-main"))),
            Some(hours_ago(2000)),
        ),
        tag(
            "stable-1",
            Some(digest(&format!("{prefix}-stable"))),
            Some(hours_ago(1900)),
        ),
    ];
    let mut previous_digest = digest(prefix);
    for index in 0..count {
        let name = match index % 4 {
            0 => format!("v1.{index}"),
            1 => format!("feature-{index}"),
            2 => digest(&format!("{prefix}-sha-{index}"))[7..47].to_owned(),
            _ => format!("build-{index}"),
        };
        let hours = i64::try_from((index * 131) % (90 * 24)).expect("hours") + 1;
        let (tag_digest, created) = if index % 50 == 49 {
            (None, None)
        } else if index % 9 == 8 {
            (Some(previous_digest.clone()), Some(hours_ago(hours)))
        } else {
            (
                Some(digest(&format!("{prefix}-{index}"))),
                Some(hours_ago(hours)),
            )
        };
        if let Some(value) = &tag_digest {
            previous_digest = value.clone();
        }
        tags.push(tag(&name, tag_digest, created));
    }
    tags
}

fn repository(id: u64, name: &str, tags: Vec<SeedTag>) -> SeedRepository {
    SeedRepository {
        id: Some(id),
        name: name.to_owned(),
        created_at: Some(hours_ago(24 * 365)),
        tags,
    }
}

fn group(id: u64, full_path: &str) -> SeedGroup {
    SeedGroup {
        id,
        full_path: full_path.to_owned(),
        name: None,
    }
}

fn protection(pattern: &str) -> SeedProtectionRule {
    SeedProtectionRule {
        tag_name_pattern: pattern.to_owned(),
        minimum_access_level_for_push: AccessLevel::Maintainer,
        minimum_access_level_for_delete: AccessLevel::Owner,
    }
}

/// Project `acme/app` (id 10) with three repositories of 150 generated tags each and a
/// protection rule for `v1.1…` tags.
fn app_seed() -> Seed {
    Seed {
        groups: vec![group(1, "acme")],
        projects: vec![SeedProject {
            id: 10,
            path_with_namespace: "acme/app".into(),
            repositories: vec![
                repository(100, "", generated_tags("root", 150)),
                repository(101, "api", generated_tags("api", 150)),
                repository(102, "worker", generated_tags("worker", 150)),
            ],
            tag_protection_rules: vec![protection(r"^v1\.1")],
            branches: Vec::new(),
        }],
        ..Seed::default()
    }
}

/// Groups `acme` (projects `acme/web` with two repositories, `acme/platform/tools` in a
/// subgroup) and `other` (never targeted).
fn group_seed() -> Seed {
    Seed {
        groups: vec![
            group(1, "acme"),
            group(2, "acme/platform"),
            group(3, "other"),
        ],
        projects: vec![
            SeedProject {
                id: 10,
                path_with_namespace: "acme/web".into(),
                repositories: vec![
                    repository(100, "", generated_tags("web", 40)),
                    repository(101, "worker", generated_tags("web-worker", 40)),
                ],
                tag_protection_rules: Vec::new(),
                branches: Vec::new(),
            },
            SeedProject {
                id: 11,
                path_with_namespace: "acme/platform/tools".into(),
                repositories: vec![repository(102, "cli", generated_tags("tools", 40))],
                tag_protection_rules: Vec::new(),
                branches: Vec::new(),
            },
            SeedProject {
                id: 12,
                path_with_namespace: "other/site".into(),
                repositories: vec![repository(103, "", generated_tags("site", 40))],
                tag_protection_rules: Vec::new(),
                branches: Vec::new(),
            },
        ],
        ..Seed::default()
    }
}

async fn start(seed: Seed, tag_list_details: bool) -> SimHandle {
    let config = SimConfig {
        tag_list_details,
        ..SimConfig::with_token(TOKEN)
    };
    Simulator::start(config, seed)
        .await
        .expect("simulator starts")
}

fn client(sim: &SimHandle) -> GitLabClient {
    let mut config = ClientConfig::new(
        sim.base_url().parse().expect("url"),
        SecretString::from(TOKEN),
    );
    config.max_retries = 3;
    config.retry_base_delay = Duration::from_millis(5);
    config.max_retry_after = Duration::from_secs(5);
    config.request_timeout = Duration::from_secs(20);
    GitLabClient::new(config).expect("client")
}

fn rules() -> RuleSpec {
    RuleSpec {
        name_regex_delete: Some(".*".into()),
        name_regex_keep: Some("main|stable-.*".into()),
        keep_n: Some(5),
        older_than: Some("7d".into()),
        ..RuleSpec::default()
    }
}

fn fast_limits() -> RunLimits {
    RunLimits {
        max_deletions_per_run: 10_000,
        requests_per_second: 2_000,
        max_deletion_percent: None,
    }
}

fn project_run(project: &str, in_use: InUse) -> CleanupRun {
    CleanupRun {
        target: CleanupTarget::Project {
            project: PathOrId::parse(project),
            path_regex: None,
        },
        rules: rules(),
        cache_not_downloaded_for: None,
        safety: Safety::default(),
        in_use,
        dry_run: false,
        limits: fast_limits(),
        now: now(),
        mode: Mode::Apply,
        approved_deletions: Default::default(),
    }
}

async fn run(client: &GitLabClient, run: &CleanupRun) -> CleanupReport {
    tokio::time::timeout(HANG_GUARD, run_cleanup(client, run))
        .await
        .expect("run finishes")
        .expect("valid spec")
}

/// Tags of every repository, by repository path, as the simulator holds them now.
fn sim_tags(sim: &SimHandle) -> BTreeMap<String, BTreeSet<String>> {
    sim.snapshot()
        .repositories
        .into_iter()
        .map(|repository| (repository.path, repository.tags.into_keys().collect()))
        .collect()
}

fn location(sim: &SimHandle, path: &str) -> String {
    format!("{}/{path}", sim.config().registry_host)
}

/// What the pure selection deletes in every repository of the simulator, given the same
/// inputs the engine has: `repository_path:tag`, in deletion order per repository.
fn expected_deletions(
    sim: &SimHandle,
    rules: &RuleSpec,
    in_use: Option<&InUseIndex>,
    keep_shared_digests: bool,
    paths: impl Fn(&str) -> bool,
) -> BTreeMap<String, Vec<String>> {
    let compiled = CompiledRules::compile(rules).expect("rules");
    let snapshot = sim.snapshot();
    let mut expected = BTreeMap::new();
    for repository in &snapshot.repositories {
        if !paths(&repository.path) {
            continue;
        }
        let patterns: Vec<&str> = snapshot
            .protection_rules
            .iter()
            .filter(|rule| rule.project_id == repository.project_id)
            .map(|rule| rule.tag_name_pattern.as_str())
            .collect();
        let tags: Vec<TagInfo> = repository
            .tags
            .values()
            .map(|tag| TagInfo::new(&tag.name, tag.digest.as_deref(), tag.created_at))
            .collect();
        let repository_location = location(sim, &repository.path);
        let protections = Protections {
            protected_tags: ProtectedTags::compile(patterns).expect("patterns"),
            in_use: in_use.map(|index| index.repository(&repository_location)),
            keep_shared_digests,
            ..Protections::default()
        };
        let selection = cleanup::select(&tags, &compiled, &protections, now());
        expected.insert(
            repository.path.clone(),
            selection.names_to_delete().map(str::to_owned).collect(),
        );
    }
    expected
}

fn deleted_by_report(report: &CleanupReport) -> BTreeMap<String, Vec<String>> {
    report
        .repository_reports
        .iter()
        .filter(|repository| !repository.deleted.is_empty())
        .map(|repository| (repository.path.clone(), repository.deleted.clone()))
        .collect()
}

fn without_empty(map: BTreeMap<String, Vec<String>>) -> BTreeMap<String, Vec<String>> {
    map.into_iter()
        .filter(|(_, names)| !names.is_empty())
        .collect()
}

fn total(map: &BTreeMap<String, Vec<String>>) -> usize {
    map.values().map(Vec::len).sum()
}

fn delete_count(sim: &SimHandle) -> u64 {
    sim.request_counts()
        .iter()
        .filter(|(key, _)| key.starts_with("DELETE "))
        .map(|(_, count)| count)
        .sum()
}

/// `DELETE` requests as the control endpoint `GET /-/sim/requests` reports them.
async fn delete_count_over_http(sim: &SimHandle) -> u64 {
    let counts: BTreeMap<String, u64> = reqwest::get(format!("{}/-/sim/requests", sim.base_url()))
        .await
        .expect("requests endpoint")
        .json()
        .await
        .expect("counts");
    counts
        .iter()
        .filter(|(key, _)| key.starts_with("DELETE "))
        .map(|(_, count)| count)
        .sum()
}

/// An index of images Pods run in `acme/app/api`: an old feature tag by name, an old build by
/// digest only (as a runtime's `imageID`), and an unrelated image.
fn in_use_index(sim: &SimHandle) -> (InUseIndex, String, String) {
    let snapshot = sim.snapshot();
    let api = snapshot
        .repositories
        .iter()
        .find(|repository| repository.path == "acme/app/api")
        .expect("api repository");
    let old = |prefix: &str| {
        api.tags
            .values()
            .filter(|tag| tag.name.starts_with(prefix) && tag.digest.is_some())
            .min_by_key(|tag| tag.created_at)
            .expect("an old tag")
            .clone()
    };
    let by_name = old("feature-");
    let by_digest = old("build-");
    let api_location = location(sim, "acme/app/api");
    let index = InUseIndex::from_images([
        (format!("{api_location}:{}", by_name.name), String::new()),
        (
            "nginx:1.27".to_owned(),
            format!(
                "docker-pullable://{api_location}@{}",
                by_digest.digest.clone().expect("digest")
            ),
        ),
    ]);
    (index, by_name.name, by_digest.name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_deletes_exactly_the_pure_selection_and_keeps_every_protected_tag() {
    let sim = start(app_seed(), true).await;
    let client = client(&sim);
    let (index, in_use_by_name, in_use_by_digest) = in_use_index(&sim);
    let expected = without_empty(expected_deletions(
        &sim,
        &rules(),
        Some(&index),
        true,
        |_| true,
    ));
    let before = sim_tags(&sim);
    assert!(
        total(&expected) > 100,
        "a meaningful data set: {}",
        total(&expected)
    );
    // The pure selection itself never picks what the engine must keep.
    for (path, names) in &expected {
        for name in names {
            assert!(!name.starts_with("v1.1"), "protected {name} selected");
            assert!(name != "latest" && name != "main" && !name.starts_with("stable-"));
            if path == "acme/app/api" {
                assert!(name != &in_use_by_name && name != &in_use_by_digest);
            }
        }
    }

    let report = run(
        &client,
        &project_run("acme/app", InUse::Known(Arc::new(index))),
    )
    .await;

    assert_eq!(report.outcome, RunOutcome::Succeeded, "{}", report.message);
    assert_eq!(deleted_by_report(&report), expected);
    assert_eq!(report.tags_deleted, total(&expected));
    assert_eq!(report.failures, 0);
    assert_eq!(report.repositories, 3);
    assert_eq!(report.tags_evaluated, 3 * 153);
    assert_eq!(
        report.tags_kept + report.tags_deleted,
        report.tags_evaluated
    );
    assert_eq!(report.deleted_sample.len(), 20);
    assert!(
        report.deleted_sample[0].contains(':'),
        "{:?}",
        report.deleted_sample
    );
    for reason in [
        KeepReason::Latest,
        KeepReason::MatchesKeep,
        KeepReason::NoManifest,
        KeepReason::KeepN,
        KeepReason::NewerThan,
        KeepReason::Protected,
        KeepReason::InUse,
        KeepReason::SharedDigest,
    ] {
        assert!(
            report.kept_by_reason.get(&reason).copied().unwrap_or(0) > 0,
            "{reason} never applied: {:?}",
            report.kept_by_reason
        );
    }
    assert_eq!(
        report.tags_protected,
        report.kept_by_reason[&KeepReason::Protected] + report.kept_by_reason[&KeepReason::InUse]
    );

    // The simulator holds exactly the kept tags.
    let after = sim_tags(&sim);
    for (path, tags) in &before {
        let gone: BTreeSet<String> = expected.get(path).into_iter().flatten().cloned().collect();
        let kept: BTreeSet<String> = tags.difference(&gone).cloned().collect();
        assert_eq!(after[path], kept, "{path}");
    }
    // keepN: the 5 newest deletable tags of every repository survive.
    let snapshot = sim.snapshot();
    for repository in &snapshot.repositories {
        let newest = repository
            .tags
            .values()
            .filter(|tag| tag.created_at.is_some() && tag.digest.is_some())
            .filter(|tag| tag.name != "latest" && tag.name != "main" && tag.name != "stable-1")
            .count();
        assert!(newest >= 5, "{}: {newest}", repository.path);
    }
    assert!(after["acme/app/api"].contains(&in_use_by_name));
    assert!(after["acme/app/api"].contains(&in_use_by_digest));

    // One DELETE per deleted tag, never the bulk endpoint, protected tags never attempted.
    let deletions = u64::try_from(total(&expected)).expect("count");
    assert_eq!(sim.request_count("DELETE", TAG_ROUTE), deletions);
    assert_eq!(sim.request_count("DELETE", TAGS_ROUTE), 0);
    assert_eq!(delete_count(&sim), deletions);
    // With details in the list: one tag list page per repository (150 tags, 100 per page:
    // 2 pages), protection rules once, details only for tags without a manifest, and the
    // deletions — about one request per tag deleted, nothing per tag kept.
    let no_manifest: u64 = before
        .keys()
        .map(|path| {
            snapshot
                .repositories
                .iter()
                .find(|repository| &repository.path == path)
                .map_or(0, |repository| {
                    repository
                        .tags
                        .values()
                        .filter(|tag| tag.digest.is_none())
                        .count() as u64
                })
        })
        .sum();
    let counts = sim.request_counts();
    let all: u64 = counts.values().sum();
    assert_eq!(sim.request_count("GET", PROTECTION_ROUTE), 1);
    assert_eq!(sim.request_count("GET", TAG_ROUTE), no_manifest);
    assert!(
        all <= 1 + 3 * 2 + 1 + no_manifest + deletions,
        "{all} requests for {deletions} deletions: {counts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_list_details_every_tag_is_read_once_and_the_result_is_the_same() {
    let sim = start(app_seed(), false).await;
    let client = client(&sim);
    let expected = without_empty(expected_deletions(&sim, &rules(), None, true, |path| {
        path == "acme/app/worker"
    }));
    let mut run_spec = project_run("acme/app", InUse::Known(Arc::new(InUseIndex::new())));
    run_spec.target = CleanupTarget::Project {
        project: PathOrId::Id(10),
        path_regex: Some("acme/app/work.*".into()),
    };
    let report = run(&client, &run_spec).await;
    assert_eq!(report.outcome, RunOutcome::Succeeded, "{}", report.message);
    assert_eq!(report.repositories, 1);
    assert_eq!(deleted_by_report(&report), expected);
    assert_eq!(sim.request_count("GET", TAG_ROUTE), 153);
    let after = sim_tags(&sim);
    assert_eq!(after["acme/app"].len(), 153, "filtered out by pathRegex");
    assert_eq!(
        after["acme/app/api"].len(),
        153,
        "filtered out by pathRegex"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_in_use_without_pod_knowledge_deletes_nothing_and_says_why() {
    let sim = start(app_seed(), true).await;
    let client = client(&sim);
    let expected = without_empty(expected_deletions(&sim, &rules(), None, true, |_| true));
    let before = sim_tags(&sim);

    let report = run(
        &client,
        &project_run(
            "acme/app",
            InUse::Unavailable("standalone mode: no cluster to read Pods from".into()),
        ),
    )
    .await;

    assert_eq!(delete_count(&sim), 0);
    assert_eq!(sim_tags(&sim), before);
    assert_eq!(report.outcome, RunOutcome::Partial);
    assert_eq!(report.tags_deleted, 0);
    assert!(report.deleted_sample.is_empty());
    assert_eq!(report.withheld, total(&expected));
    assert!(
        report.message.contains("keepInUse")
            && report
                .message
                .contains("standalone mode: no cluster to read Pods from")
            && report.message.contains("nothing was deleted"),
        "{}",
        report.message
    );
    // What the rules would select is still there for `plan`/`apply` output.
    let selected: BTreeMap<String, Vec<String>> = report
        .repository_reports
        .iter()
        .filter(|repository| !repository.selected.is_empty())
        .map(|repository| (repository.path.clone(), repository.selected.clone()))
        .collect();
    assert_eq!(selected, expected);

    // keepInUse off: the same run deletes.
    let mut unprotected = project_run("acme/app", InUse::Unavailable("standalone".into()));
    unprotected.safety.keep_in_use = false;
    let report = run(&client, &unprotected).await;
    assert_eq!(report.outcome, RunOutcome::Succeeded, "{}", report.message);
    assert_eq!(deleted_by_report(&report), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_and_plan_send_no_delete_and_report_what_a_real_run_deletes() {
    let sim = start(app_seed(), true).await;
    let client = client(&sim);
    let before = sim_tags(&sim);
    let in_use = InUse::Known(Arc::new(InUseIndex::new()));

    let mut dry = project_run("acme/app", in_use.clone());
    dry.dry_run = true;
    let dry_report = run(&client, &dry).await;
    assert_eq!(delete_count_over_http(&sim).await, 0);
    assert_eq!(sim.write_count(), 0);
    assert_eq!(sim_tags(&sim), before);
    assert_eq!(
        dry_report.outcome,
        RunOutcome::Succeeded,
        "{}",
        dry_report.message
    );
    assert!(
        dry_report.message.starts_with("dry run: would delete"),
        "{}",
        dry_report.message
    );
    assert!(dry_report.actions().iter().all(|action| !action.writes));

    let mut plan = project_run("acme/app", in_use.clone());
    plan.mode = Mode::Plan;
    let plan_report = run(&client, &plan).await;
    assert_eq!(delete_count_over_http(&sim).await, 0);
    assert_eq!(
        deleted_by_report(&plan_report),
        deleted_by_report(&dry_report)
    );
    assert!(plan_report.actions().iter().all(|action| action.writes));

    let real = run(&client, &project_run("acme/app", in_use)).await;
    assert_eq!(real.outcome, RunOutcome::Succeeded, "{}", real.message);
    assert!(real.tags_deleted > 100);
    assert_eq!(deleted_by_report(&real), deleted_by_report(&dry_report));
    assert_eq!(real.deleted_sample, dry_report.deleted_sample);
    assert_eq!(delete_count(&sim), real.tags_deleted as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_under_injected_faults_still_sends_no_delete() {
    let sim = start(app_seed(), false).await;
    let client = client(&sim);
    let before = sim_tags(&sim);
    sim.inject_fault(FaultSpec {
        error_rate: Some(0.3),
        error_status: Some(500),
        once: vec![
            OneShotFault {
                count: 2,
                method: Some("GET".into()),
                route: Some(TAGS_ROUTE.into()),
                fault: FaultAction::RateLimited {
                    retry_after_seconds: 0,
                },
            },
            OneShotFault {
                count: 1,
                method: Some("GET".into()),
                route: Some(PROTECTION_ROUTE.into()),
                fault: FaultAction::Status { status: 403 },
            },
        ],
        ..FaultSpec::default()
    });
    for mode in [Mode::Apply, Mode::Plan] {
        let mut dry = project_run("acme/app", InUse::Known(Arc::new(InUseIndex::new())));
        dry.dry_run = mode == Mode::Apply;
        dry.mode = mode;
        // Whatever the faults did to the run, it must not have deleted anything.
        let report = run(&client, &dry).await;
        assert!(report.simulated());
        assert_eq!(report.already_deleted, 0);
    }
    assert_eq!(delete_count_over_http(&sim).await, 0);
    assert_eq!(sim.write_count(), 0);
    assert_eq!(sim_tags(&sim), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_deletions_per_run_is_partial_and_the_next_run_completes() {
    let sim = start(app_seed(), true).await;
    let client = client(&sim);
    let in_use = InUse::Known(Arc::new(InUseIndex::new()));
    let expected = without_empty(expected_deletions(&sim, &rules(), None, true, |_| true));
    let first_repository = expected.keys().next().expect("a repository").clone();
    let first_count = expected[&first_repository].len();
    let limit = u32::try_from(first_count + 10).expect("limit");
    let mut limited = project_run("acme/app", in_use);
    limited.limits.max_deletions_per_run = limit;

    let first = run(&client, &limited).await;
    assert_eq!(first.outcome, RunOutcome::Partial, "{}", first.message);
    assert!(first.limit_reached);
    assert_eq!(first.tags_deleted, limit as usize);
    assert!(
        first.message.contains("maxDeletionsPerRun"),
        "{}",
        first.message
    );
    assert_eq!(delete_count(&sim), u64::from(limit));
    // Oldest first: the first repository entirely, then the 10 oldest of the second.
    let deleted = deleted_by_report(&first);
    assert_eq!(deleted[&first_repository], expected[&first_repository]);
    let second_repository = expected.keys().nth(1).expect("second").clone();
    assert_eq!(
        deleted[&second_repository],
        expected[&second_repository][..10].to_vec()
    );

    limited.limits.max_deletions_per_run = 10_000;
    let second = run(&client, &limited).await;
    assert_eq!(second.outcome, RunOutcome::Succeeded, "{}", second.message);
    assert_eq!(first.tags_deleted + second.tags_deleted, total(&expected));
    let mut all: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for report in [&first, &second] {
        for (path, names) in deleted_by_report(report) {
            all.entry(path).or_default().extend(names);
        }
    }
    let expected_sets: BTreeMap<String, BTreeSet<String>> = expected
        .iter()
        .map(|(path, names)| (path.clone(), names.iter().cloned().collect()))
        .collect();
    assert_eq!(all, expected_sets);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_mid_run_is_retried_and_the_run_completes() {
    let sim = start(app_seed(), true).await;
    let client = client(&sim);
    let expected = without_empty(expected_deletions(&sim, &rules(), None, true, |_| true));
    sim.inject_fault(FaultSpec {
        once: vec![OneShotFault {
            count: 1,
            method: Some("DELETE".into()),
            route: Some(TAG_ROUTE.into()),
            fault: FaultAction::RateLimited {
                retry_after_seconds: 1,
            },
        }],
        ..FaultSpec::default()
    });
    let report = run(
        &client,
        &project_run("acme/app", InUse::Known(Arc::new(InUseIndex::new()))),
    )
    .await;
    assert_eq!(report.outcome, RunOutcome::Succeeded, "{}", report.message);
    assert_eq!(report.failures, 0);
    assert_eq!(deleted_by_report(&report), expected);
    // The rate-limited attempt plus one per deletion.
    assert_eq!(
        sim.request_count("DELETE", TAG_ROUTE),
        total(&expected) as u64 + 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_during_deletions_count_failures_and_delete_nothing_kept() {
    let sim = start(app_seed(), true).await;
    let client = client(&sim);
    let expected = without_empty(expected_deletions(&sim, &rules(), None, true, |_| true));
    let before = sim_tags(&sim);
    // Two deletions fail even after the client's 3 retries (4 attempts each).
    sim.inject_fault(FaultSpec {
        once: vec![OneShotFault {
            count: 8,
            method: Some("DELETE".into()),
            route: Some(TAG_ROUTE.into()),
            fault: FaultAction::Status { status: 500 },
        }],
        ..FaultSpec::default()
    });
    let report = run(
        &client,
        &project_run("acme/app", InUse::Known(Arc::new(InUseIndex::new()))),
    )
    .await;
    assert_eq!(report.outcome, RunOutcome::Partial, "{}", report.message);
    assert_eq!(report.failures, 2);
    assert!(
        report.message.contains("2 requests failed"),
        "{}",
        report.message
    );
    assert_eq!(report.tags_deleted, total(&expected) - 2);
    // The two oldest selections of the first repository failed; everything else went.
    let mut expected_now = expected.clone();
    let first = expected_now.keys().next().expect("repository").clone();
    let failed: Vec<String> = expected_now
        .get_mut(&first)
        .expect("first")
        .drain(..2)
        .collect();
    assert_eq!(deleted_by_report(&report), without_empty(expected_now));
    let after = sim_tags(&sim);
    for name in &failed {
        assert!(after[&first].contains(name), "{name} should still exist");
    }
    for (path, tags) in &before {
        let selected: BTreeSet<&String> = expected.get(path).into_iter().flatten().collect();
        for name in tags {
            if !selected.contains(name) {
                assert!(after[path].contains(name), "kept {path}:{name} deleted");
            }
        }
    }

    // GitLab down for good: the run stops after a few tags instead of hammering it.
    sim.inject_fault(FaultSpec {
        error_rate: Some(1.0),
        error_status: Some(503),
        ..FaultSpec::default()
    });
    let down = run(
        &client,
        &project_run("acme/app", InUse::Known(Arc::new(InUseIndex::new()))),
    )
    .await;
    assert_eq!(down.outcome, RunOutcome::Failed, "{}", down.message);
    assert_eq!(
        down.error.as_ref().map(|error| error.reason()),
        Some("GitLabUnavailable")
    );
    assert_eq!(down.tags_deleted, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protection_rules_unreadable_leaves_protection_to_gitlab_and_counts_refusals() {
    let sim = start(app_seed(), true).await;
    let client = client(&sim);
    // What the rules select when the engine does not know the protection rules: everything
    // the pure selection picks except tags whose digest another tag also has (GitLab might
    // refuse one of them, breaking keepSharedDigests whichever went first).
    let snapshot_rules = sim.snapshot().protection_rules;
    assert_eq!(snapshot_rules.len(), 1);
    let compiled = CompiledRules::compile(&rules()).expect("rules");
    let snapshot = sim.snapshot();
    let mut would_be_refused = 0;
    let mut kept_as_shared = 0;
    for repository in &snapshot.repositories {
        let tags: Vec<TagInfo> = repository
            .tags
            .values()
            .map(|tag| TagInfo::new(&tag.name, tag.digest.as_deref(), tag.created_at))
            .collect();
        let protections = Protections {
            keep_shared_digests: true,
            ..Protections::default()
        };
        let selection = cleanup::select(&tags, &compiled, &protections, now());
        for name in selection.names_to_delete() {
            let digest = &repository.tags[name].digest;
            let users = repository
                .tags
                .values()
                .filter(|tag| tag.digest.is_some() && &tag.digest == digest)
                .count();
            if users > 1 {
                kept_as_shared += 1;
            } else if name.starts_with("v1.1") {
                would_be_refused += 1;
            }
        }
    }
    assert!(would_be_refused > 0);
    assert!(kept_as_shared > 0, "the data set exercises shared digests");
    sim.inject_fault(FaultSpec {
        once: vec![OneShotFault {
            count: 1,
            method: Some("GET".into()),
            route: Some(PROTECTION_ROUTE.into()),
            fault: FaultAction::Status { status: 403 },
        }],
        ..FaultSpec::default()
    });

    let report = run(
        &client,
        &project_run("acme/app", InUse::Known(Arc::new(InUseIndex::new()))),
    )
    .await;

    assert_eq!(report.outcome, RunOutcome::Succeeded, "{}", report.message);
    assert_eq!(report.failures, 0);
    let refused: usize = report
        .repository_reports
        .iter()
        .map(|repository| repository.refused_as_protected)
        .sum();
    assert_eq!(refused, would_be_refused);
    assert!(report.tags_protected >= refused);
    assert!(
        report.message.contains("not readable"),
        "{}",
        report.message
    );
    let after = sim_tags(&sim);
    // keepSharedDigests held: no deleted tag's digest is still used by a remaining tag.
    for repository in &snapshot.repositories {
        let remaining = &after[&repository.path];
        let remaining_digests: BTreeSet<&String> = repository
            .tags
            .values()
            .filter(|tag| remaining.contains(&tag.name))
            .filter_map(|tag| tag.digest.as_ref())
            .collect();
        for tag in repository.tags.values() {
            if !remaining.contains(&tag.name)
                && let Some(digest) = &tag.digest
            {
                assert!(
                    !remaining_digests.contains(digest),
                    "{}:{} deleted but its digest is still tagged",
                    repository.path,
                    tag.name
                );
            }
        }
    }
    let protected_left: usize = after
        .values()
        .map(|tags| tags.iter().filter(|name| name.starts_with("v1.1")).count())
        .sum();
    let protected_before: usize = snapshot
        .repositories
        .iter()
        .map(|repository| {
            repository
                .tags
                .keys()
                .filter(|name| name.starts_with("v1.1"))
                .count()
        })
        .sum();
    assert_eq!(
        protected_left, protected_before,
        "GitLab kept every protected tag"
    );
}

/// A Developer token, as GitLab answers it: the rule list needs Maintainer (403, no fault
/// injected), tag deletes are allowed, and a tag a rule covers is refused with the plain
/// `403 {"message":"403 Forbidden"}`. Every such refusal is that tag protected: counted once,
/// never retried, and the run still succeeds; the unreadable list is a note, not a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_403_on_a_tag_delete_is_a_protected_tag_and_unreadable_rules_no_error() {
    let config = SimConfig {
        tag_list_details: true,
        role: AccessLevel::Developer,
        ..SimConfig::with_token(TOKEN)
    };
    let sim = Simulator::start(config, app_seed())
        .await
        .expect("simulator starts");
    let client = client(&sim);
    let protected_before: BTreeMap<String, BTreeSet<String>> = sim_tags(&sim)
        .into_iter()
        .map(|(path, tags)| {
            let protected = tags
                .into_iter()
                .filter(|name| name.starts_with("v1.1"))
                .collect();
            (path, protected)
        })
        .collect();

    let report = run(
        &client,
        &project_run("acme/app", InUse::Known(Arc::new(InUseIndex::new()))),
    )
    .await;

    assert_eq!(sim.request_count("GET", PROTECTION_ROUTE), 1);
    assert_eq!(report.outcome, RunOutcome::Succeeded, "{}", report.message);
    assert_eq!(report.failures, 0);
    assert!(report.error.is_none(), "{:?}", report.error);
    assert!(
        report.message.contains("not readable"),
        "the unreadable rule list is noted: {}",
        report.message
    );
    let refused: usize = report
        .repository_reports
        .iter()
        .map(|repository| repository.refused_as_protected)
        .sum();
    assert!(refused > 0, "the run met protected tags");
    assert!(report.tags_protected >= refused);
    // One DELETE per deleted or refused tag: no refusal was retried.
    assert_eq!(
        sim.request_count("DELETE", TAG_ROUTE),
        u64::try_from(report.tags_deleted + refused).expect("count")
    );
    let after = sim_tags(&sim);
    for (path, protected) in &protected_before {
        assert!(
            protected.is_subset(&after[path]),
            "{path} lost a protected tag"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_target_covers_every_project_and_path_regex_filters() {
    let sim = start(group_seed(), true).await;
    let client = client(&sim);
    let before = sim_tags(&sim);
    let in_use = InUse::Known(Arc::new(InUseIndex::new()));
    let filtered = |path: &str| path == "acme/web/worker" || path.starts_with("acme/platform/");
    let expected = without_empty(expected_deletions(&sim, &rules(), None, true, filtered));
    assert_eq!(expected.len(), 2);

    let mut run_spec = project_run("acme/app", in_use);
    run_spec.target = CleanupTarget::Group {
        group: PathOrId::parse("acme"),
        path_regex: Some("acme/web/worker|acme/platform/.*".into()),
    };
    let report = run(&client, &run_spec).await;
    assert_eq!(report.outcome, RunOutcome::Succeeded, "{}", report.message);
    assert_eq!(report.repositories, 2);
    assert_eq!(deleted_by_report(&report), expected);
    let after = sim_tags(&sim);
    assert_eq!(after["acme/web"], before["acme/web"]);
    assert_eq!(after["other/site"], before["other/site"]);

    // Without a regex: every repository of every project in the group, subgroups included.
    let expected_rest = without_empty(expected_deletions(&sim, &rules(), None, true, |path| {
        path.starts_with("acme/")
    }));
    run_spec.target = CleanupTarget::Group {
        group: PathOrId::Id(1),
        path_regex: None,
    };
    let report = run(&client, &run_spec).await;
    assert_eq!(report.outcome, RunOutcome::Succeeded, "{}", report.message);
    assert_eq!(report.repositories, 3);
    assert_eq!(deleted_by_report(&report), expected_rest);
    assert!(expected_rest.contains_key("acme/web"));
    assert_eq!(sim_tags(&sim)["other/site"], before["other/site"]);
    // One protection rule read per project.
    assert_eq!(sim.request_count("GET", PROTECTION_ROUTE), 2 + 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_specs_fail_before_any_request() {
    let sim = start(app_seed(), true).await;
    let client = client(&sim);
    let base = project_run("acme/app", InUse::Known(Arc::new(InUseIndex::new())));

    let mut bad_delete = base.clone();
    bad_delete.rules.name_regex_delete = Some("v(".into());
    let mut missing_delete = base.clone();
    missing_delete.rules.name_regex_delete = None;
    let mut bad_path = base.clone();
    bad_path.target = CleanupTarget::Project {
        project: PathOrId::Id(10),
        path_regex: Some("a)|(b".into()),
    };
    let mut bad_age = base.clone();
    bad_age.rules.older_than = Some("soon".into());
    let mut no_cache_rule = base.clone();
    no_cache_rule.target = CleanupTarget::UpstreamCache { upstream_id: 1 };
    let mut zero_limit = base.clone();
    zero_limit.limits.max_deletions_per_run = 0;

    for (spec, field) in [
        (&bad_delete, "rules.nameRegexDelete"),
        (&missing_delete, "rules.nameRegexDelete"),
        (&bad_path, "target.containerRepositories.pathRegex"),
        (&bad_age, "rules.olderThan"),
        (&no_cache_rule, "cacheRules.notDownloadedFor"),
        (&zero_limit, "limits.maxDeletionsPerRun"),
    ] {
        let error = run_cleanup(&client, spec).await.expect_err("invalid");
        assert_eq!(error.reason(), "InvalidSpec");
        assert!(
            error.message().contains(field),
            "{field}: {}",
            error.message()
        );
    }
    assert!(
        sim.request_counts().is_empty(),
        "{:?}",
        sim.request_counts()
    );
}

fn cache_seed() -> Seed {
    let entry = |path: &str, downloaded_days: Option<i64>, created_days: i64| SeedCacheEntry {
        relative_path: path.to_owned(),
        size: Some(1_024),
        content_type: None,
        downloads_count: Some(u64::from(downloaded_days.is_some())),
        downloaded_at: downloaded_days.map(|days| hours_ago(24 * days)),
        created_at: Some(hours_ago(24 * created_days)),
    };
    Seed {
        groups: vec![group(1, "acme")],
        upstreams: vec![SeedUpstream {
            id: Some(7),
            group: GroupRef::Path("acme".into()),
            name: "Docker Hub".into(),
            url: "https://registry-1.docker.io".into(),
            description: None,
            username: None,
            password: None,
            cache_validity_hours: None,
            registries: Vec::new(),
            cache_entries: vec![
                entry("library/alpine/manifests/latest", Some(2), 100),
                entry("library/alpine/manifests/3.19", Some(45), 100),
                entry("library/nginx/manifests/1.27", Some(31), 60),
                entry("library/nginx/manifests/1.25", Some(29), 60),
                entry("library/redis/manifests/7", None, 90),
                entry("library/redis/manifests/8", None, 3),
                entry("library/busybox/blobs/sha256:abc", Some(400), 500),
            ],
        }],
        ..Seed::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_cache_expiry_deletes_only_expired_entries() {
    let sim = start(cache_seed(), false).await;
    let client = client(&sim);
    let not_downloaded_for = Duration::from_secs(30 * 24 * 3600);
    let entries: Vec<CacheEntryInfo> = sim
        .snapshot()
        .cache_entries
        .iter()
        .map(|entry| CacheEntryInfo {
            id: entry.id.clone(),
            relative_path: entry.entry.relative_path.clone(),
            downloaded_at: (entry.entry.downloads_count > 0).then_some(entry.entry.downloaded_at),
            created_at: entry.entry.created_at,
        })
        .collect();
    let expected: Vec<String> = cleanup::select_expired(&entries, not_downloaded_for, now())
        .expired
        .iter()
        .map(|entry| entry.relative_path.clone())
        .collect();
    assert_eq!(expected.len(), 4, "{expected:?}");

    let mut cache_run = project_run("acme/app", InUse::Unavailable("standalone".into()));
    cache_run.target = CleanupTarget::UpstreamCache { upstream_id: 7 };
    cache_run.cache_not_downloaded_for = Some(not_downloaded_for);

    cache_run.dry_run = true;
    let dry = run(&client, &cache_run).await;
    assert_eq!(delete_count(&sim), 0);
    assert_eq!(dry.repository_reports[0].deleted, expected);

    cache_run.dry_run = false;
    let report = run(&client, &cache_run).await;
    assert_eq!(report.outcome, RunOutcome::Succeeded, "{}", report.message);
    assert_eq!(report.repositories, 1);
    assert_eq!(report.tags_evaluated, 7);
    assert_eq!(report.tags_deleted, 4);
    assert_eq!(report.tags_kept, 3);
    assert_eq!(report.deleted_sample, expected);
    assert_eq!(delete_count(&sim), 4);
    let left: BTreeSet<String> = sim
        .snapshot()
        .cache_entries
        .into_iter()
        .map(|entry| entry.entry.relative_path)
        .collect();
    let expected_left: BTreeSet<String> = entries
        .iter()
        .map(|entry| entry.relative_path.clone())
        .filter(|path| !expected.contains(path))
        .collect();
    assert_eq!(left, expected_left);

    // Nothing expired is left for the next run.
    let again = run(&client, &cache_run).await;
    assert_eq!(again.outcome, RunOutcome::Succeeded);
    assert_eq!(again.tags_deleted, 0);
}

fn desired_policy() -> DesiredGitLabPolicy {
    DesiredGitLabPolicy {
        cadence: GitLabCadence::Weekly,
        keep_n: Some(25),
        older_than: Some("30d".into()),
        name_regex_delete: Some(".*".into()),
        name_regex_keep: Some("(?:main|stable-.*)".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gitlab_policy_is_written_once_then_left_alone_and_drift_is_corrected() {
    let sim = start(app_seed(), false).await;
    let client = client(&sim);
    let project = PathOrId::parse("acme/app");
    let desired = desired_policy();
    sim.set_clock(Some(now()));

    let plan = sync_gitlab_policy(&client, &project, &desired, Mode::Plan)
        .await
        .expect("plan");
    assert!(plan.action.is_some());
    assert_eq!(sim.write_count(), 0);

    let first = sync_gitlab_policy(&client, &project, &desired, Mode::Apply)
        .await
        .expect("first sync");
    let action = first.action.expect("an update");
    assert_eq!(action.reason, "Updated");
    let fields: Vec<&str> = action.changes.iter().map(|change| change.field).collect();
    // GitLab's defaults already have name_regex ".*": not sent again.
    assert_eq!(
        fields,
        ["cadence", "enabled", "keepN", "olderThan", "nameRegexKeep"]
    );
    assert!(first.next_run_at.is_some_and(|next| next > now()));
    assert_eq!(sim.request_count("PUT", "/projects/:id"), 1);
    let policy = first.policy.expect("policy");
    assert_eq!(
        (
            policy.cadence.as_str(),
            policy.enabled,
            policy.keep_n,
            policy.older_than.as_deref()
        ),
        ("7d", true, Some(25), Some("30d"))
    );

    let second = sync_gitlab_policy(&client, &project, &desired, Mode::Apply)
        .await
        .expect("second sync");
    assert!(second.action.is_none());
    assert_eq!(second.next_run_at, first.next_run_at);
    assert_eq!(sim.write_count(), 1, "steady state: zero writes");

    // Drift through GitLab's API (someone in the UI).
    client
        .update_cleanup_policy(
            &project,
            &ContainerExpirationPolicyUpdate {
                keep_n: Some(Some(5)),
                name_regex_keep: Some(String::new()),
                ..ContainerExpirationPolicyUpdate::default()
            },
        )
        .await
        .expect("drift");
    let corrected = sync_gitlab_policy(&client, &project, &desired, Mode::Apply)
        .await
        .expect("correction");
    let action = corrected.action.expect("corrected");
    let changes: Vec<(&str, Option<&str>, Option<&str>)> = action
        .changes
        .iter()
        .map(|change| (change.field, change.from.as_deref(), change.to.as_deref()))
        .collect();
    assert_eq!(
        changes,
        [
            ("keepN", Some("5"), Some("25")),
            ("nameRegexKeep", None, Some("(?:main|stable-.*)")),
        ]
    );
    let policy = client
        .get_cleanup_policy(&project)
        .await
        .expect("read")
        .expect("policy");
    assert_eq!(policy.keep_n, Some(25));
    assert_eq!(
        policy.name_regex_keep.as_deref(),
        Some("(?:main|stable-.*)")
    );
    assert_eq!(sim.request_count("PUT", "/projects/:id"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gitlab_policy_rejects_values_gitlab_does_not_accept_before_any_request() {
    let sim = start(app_seed(), false).await;
    let client = client(&sim);
    let project = PathOrId::parse("acme/app");
    let cases = [
        (
            DesiredGitLabPolicy {
                keep_n: Some(7),
                ..desired_policy()
            },
            "keepN 7",
        ),
        (
            DesiredGitLabPolicy {
                older_than: Some("3d".into()),
                ..desired_policy()
            },
            "olderThan \"3d\"",
        ),
        (
            DesiredGitLabPolicy {
                name_regex_delete: None,
                ..desired_policy()
            },
            "rules.nameRegexDelete",
        ),
        (
            DesiredGitLabPolicy {
                name_regex_keep: Some("(".into()),
                ..desired_policy()
            },
            "rules.nameRegexKeep",
        ),
    ];
    for (desired, text) in cases {
        let error = sync_gitlab_policy(&client, &project, &desired, Mode::Apply)
            .await
            .expect_err("invalid");
        assert_eq!(error.reason(), "InvalidSpec");
        assert!(
            error.message().contains(text),
            "{text}: {}",
            error.message()
        );
    }
    assert!(
        sim.request_counts().is_empty(),
        "{:?}",
        sim.request_counts()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_repositories_are_skipped_whole_and_a_bad_token_stops_the_run() {
    let sim = start(group_seed(), false).await;
    let client = client(&sim);
    let before = sim_tags(&sim);
    let expected = without_empty(expected_deletions(&sim, &rules(), None, true, |path| {
        path.starts_with("acme/")
    }));
    let mut run_spec = project_run("acme/web", InUse::Known(Arc::new(InUseIndex::new())));
    run_spec.target = CleanupTarget::Group {
        group: PathOrId::parse("acme"),
        path_regex: None,
    };
    // Repositories in path order: acme/platform/tools/cli, acme/web, acme/web/worker. The
    // first one's tag list is refused; in the second, the 21st tag's details fail even after
    // the client's retries (4 attempts). One-shot faults apply in order, and a zero delay
    // answers normally, so the first 20 detail reads pass.
    sim.inject_fault(FaultSpec {
        once: vec![
            OneShotFault {
                count: 1,
                method: Some("GET".into()),
                route: Some(TAGS_ROUTE.into()),
                fault: FaultAction::Status { status: 403 },
            },
            OneShotFault {
                count: 20,
                method: Some("GET".into()),
                route: Some(TAG_ROUTE.into()),
                fault: FaultAction::Delay { delay_ms: 0 },
            },
            OneShotFault {
                count: 4,
                method: Some("GET".into()),
                route: Some(TAG_ROUTE.into()),
                fault: FaultAction::Status { status: 502 },
            },
        ],
        ..FaultSpec::default()
    });
    let report = run(&client, &run_spec).await;

    assert_eq!(report.outcome, RunOutcome::Partial, "{}", report.message);
    assert_eq!(report.failures, 2, "{}", report.message);
    let after = sim_tags(&sim);
    assert_eq!(
        after["acme/platform/tools/cli"],
        before["acme/platform/tools/cli"]
    );
    assert_eq!(
        after["acme/web"], before["acme/web"],
        "no deletion without every detail"
    );
    let skipped: Vec<&str> = report
        .repository_reports
        .iter()
        .filter(|repository| repository.skipped.is_some())
        .map(|repository| repository.path.as_str())
        .collect();
    assert_eq!(skipped, ["acme/platform/tools/cli", "acme/web"]);
    assert_eq!(
        deleted_by_report(&report),
        expected
            .iter()
            .filter(|(path, _)| path.as_str() == "acme/web/worker")
            .map(|(path, names)| (path.clone(), names.clone()))
            .collect::<BTreeMap<_, _>>()
    );

    // A token GitLab refuses: the run stops at once and says so.
    let mut config = ClientConfig::new(
        sim.base_url().parse().expect("url"),
        SecretString::from("not-the-token"),
    );
    config.retry_base_delay = Duration::from_millis(5);
    let refused = GitLabClient::new(config).expect("client");
    sim.reset_request_counts();
    let report = run(&refused, &run_spec).await;
    assert_eq!(report.outcome, RunOutcome::Failed);
    assert_eq!(
        report.error.as_ref().map(|error| error.reason()),
        Some("Unauthorized")
    );
    assert_eq!(sim.request_counts().values().sum::<u64>(), 1);
}

// ---- issue 17: branch-aware retention, families, deletion budget with approval ----------

const BRANCHES_ROUTE: &str = "/projects/:id/repository/branches";
const BUILD_PATTERN: &str = "(.+)-[0-9a-f]{8}";

/// `<slug>-<8 hex>` builds, 30+ days old, each with its own digest.
fn branch_build(slug: &str, build: u32, days: i64) -> SeedTag {
    let name = format!("{slug}-{build:08x}");
    tag(&name, Some(digest(&name)), Some(hours_ago(24 * days)))
}

/// Project `acme/app` (branches `main` and `feature/Login-Form`) with repositories `api` and
/// `worker` holding builds of both branches and of `gone`, whose branch no longer exists,
/// and project `acme/other` with `extra_branches` branches.
fn branch_seed(extra_branches: usize) -> Seed {
    let builds = |offset: u32| {
        vec![
            branch_build("main", offset + 1, 40),
            branch_build("main", offset + 2, 35),
            branch_build("main", offset + 3, 30),
            branch_build("feature-login-form", offset + 4, 45),
            branch_build("feature-login-form", offset + 5, 44),
            branch_build("gone", offset + 6, 50),
            branch_build("gone", offset + 7, 49),
            tag(
                "v1.0.0",
                Some(digest(&format!("v1-{offset}"))),
                Some(hours_ago(24 * 90)),
            ),
        ]
    };
    Seed {
        groups: vec![group(1, "acme")],
        projects: vec![
            SeedProject {
                id: 10,
                path_with_namespace: "acme/app".into(),
                repositories: vec![
                    repository(100, "api", builds(0)),
                    repository(101, "worker", builds(0x100)),
                ],
                tag_protection_rules: Vec::new(),
                branches: vec!["main".into(), "feature/Login-Form".into()],
            },
            SeedProject {
                id: 11,
                path_with_namespace: "acme/other".into(),
                repositories: vec![repository(102, "", builds(0x200))],
                tag_protection_rules: Vec::new(),
                branches: (0..extra_branches)
                    .map(|n| format!("Topic/{n}"))
                    .chain(["main".to_owned()])
                    .collect(),
            },
        ],
        ..Seed::default()
    }
}

fn branch_rules() -> RuleSpec {
    RuleSpec {
        name_regex_delete: Some(".*".into()),
        keep_branch_tags: Some(BUILD_PATTERN.into()),
        ..RuleSpec::default()
    }
}

fn group_run(rules: RuleSpec) -> CleanupRun {
    CleanupRun {
        target: CleanupTarget::Group {
            group: PathOrId::parse("acme"),
            path_regex: None,
        },
        rules,
        ..project_run("acme/app", InUse::Known(Arc::new(InUseIndex::new())))
    }
}

async fn delete_branch_over_http(sim: &SimHandle, project: &str, branch: &str) -> u16 {
    reqwest::Client::new()
        .delete(format!(
            "{}/projects/{}/repository/branches/{}",
            sim.api_url(),
            project.replace('/', "%2F"),
            branch.replace('/', "%2F")
        ))
        .header("PRIVATE-TOKEN", TOKEN)
        .send()
        .await
        .expect("delete branch")
        .status()
        .as_u16()
}

#[tokio::test]
async fn branch_builds_are_kept_until_their_branch_is_deleted() {
    // 120 branches in acme/other: two pages of branches, read once for the project.
    let sim = start(branch_seed(120), true).await;
    let client = client(&sim);
    let first = run(&client, &group_run(branch_rules())).await;
    assert_eq!(first.outcome, RunOutcome::Succeeded, "{}", first.message);
    // acme/app: 3 main and 2 feature builds per repository; acme/other: its 3 main builds.
    assert_eq!(
        first.kept_by_reason.get(&KeepReason::BranchExists),
        Some(&13)
    );
    for repository in &first.repository_reports {
        let mut deleted = repository.deleted.clone();
        deleted.sort();
        let gone_or_release = |name: &String| name.starts_with("gone-") || name == "v1.0.0";
        if repository.path == "acme/other" {
            // No feature/Login-Form branch in that project.
            assert_eq!(deleted.len(), 5, "{deleted:?}");
            assert!(
                deleted
                    .iter()
                    .all(|name| gone_or_release(name) || name.starts_with("feature-login-form-"))
            );
        } else {
            assert_eq!(deleted.len(), 3, "{}: {deleted:?}", repository.path);
            assert!(deleted.iter().all(gone_or_release), "{deleted:?}");
        }
    }
    // Once per project per run, all pages: 1 for acme/app, 2 for acme/other.
    assert_eq!(sim.request_count("GET", BRANCHES_ROUTE), 3);
    assert!(
        first.message.contains("BranchExists 13"),
        "{}",
        first.message
    );

    // The feature branch is merged and deleted: its builds fall to the other rules.
    assert_eq!(
        delete_branch_over_http(&sim, "acme/app", "feature/Login-Form").await,
        204
    );
    assert_eq!(
        delete_branch_over_http(&sim, "acme/app", "feature/Login-Form").await,
        404
    );
    let second = run(&client, &group_run(branch_rules())).await;
    assert_eq!(second.outcome, RunOutcome::Succeeded, "{}", second.message);
    let tags = sim_tags(&sim);
    for path in ["acme/app/api", "acme/app/worker"] {
        let left = &tags[path];
        assert_eq!(left.len(), 3, "{path}: {left:?}");
        assert!(
            left.iter().all(|name| name.starts_with("main-")),
            "{left:?}"
        );
    }
    // acme/other never had that branch: its feature builds went in the first run.
    assert!(
        tags["acme/other"]
            .iter()
            .all(|name| name.starts_with("main-")),
        "{:?}",
        tags["acme/other"]
    );
}

#[tokio::test]
async fn a_project_whose_branches_cannot_be_read_deletes_nothing_and_says_why() {
    let sim = start(branch_seed(0), true).await;
    let client = client(&sim);
    let before = sim_tags(&sim);
    sim.inject_fault(FaultSpec {
        once: vec![OneShotFault {
            count: 1,
            method: Some("GET".into()),
            route: Some(BRANCHES_ROUTE.into()),
            fault: FaultAction::Status { status: 403 },
        }],
        ..FaultSpec::default()
    });
    // Group order is by path: acme/app is read first and refused.
    let report = run(&client, &group_run(branch_rules())).await;
    assert_eq!(report.outcome, RunOutcome::Partial, "{}", report.message);
    assert!(
        report.message.contains("branches of project 10 unreadable"),
        "{}",
        report.message
    );
    let after = sim_tags(&sim);
    assert_eq!(after["acme/app/api"], before["acme/app/api"]);
    assert_eq!(after["acme/app/worker"], before["acme/app/worker"]);
    // The other project's branches were readable: its cleanup went ahead.
    assert_eq!(after["acme/other"].len(), before["acme/other"].len() - 5);
}

#[tokio::test]
async fn families_keep_the_newest_builds_of_every_branch_and_match_the_pure_selection() {
    let sim = start(branch_seed(0), true).await;
    let client = client(&sim);
    let rules = RuleSpec {
        name_regex_delete: Some(".*".into()),
        keep_n_per_family: Some(FamilySpec {
            pattern: BUILD_PATTERN.into(),
            n: 2,
        }),
        ..RuleSpec::default()
    };
    let expected = expected_deletions(&sim, &rules, None, true, |_| true);
    let report = run(&client, &group_run(rules)).await;
    assert_eq!(report.outcome, RunOutcome::Succeeded, "{}", report.message);
    assert_eq!(deleted_by_report(&report), without_empty(expected));
    // Per repository: main-1, feature's none, gone's none, and v1.0.0 (not a build) go.
    assert_eq!(
        report.kept_by_reason.get(&KeepReason::KeepNPerFamily),
        Some(&18)
    );
    let tags = sim_tags(&sim);
    for left in tags.values() {
        assert_eq!(left.len(), 6, "{left:?}");
        assert!(!left.contains("v1.0.0"));
    }
    assert_eq!(sim.request_count("GET", BRANCHES_ROUTE), 0);
}

/// One repository of 10 old builds whose rules would delete 8 (keepN 2): over a 50% budget.
fn budget_seed() -> Seed {
    Seed {
        groups: vec![group(1, "acme")],
        projects: vec![SeedProject {
            id: 10,
            path_with_namespace: "acme/app".into(),
            repositories: vec![repository(
                100,
                "",
                (0..10)
                    .map(|n| branch_build("main", n, 20 + i64::from(n)))
                    .collect(),
            )],
            tag_protection_rules: Vec::new(),
            branches: vec!["main".into()],
        }],
        ..Seed::default()
    }
}

fn budget_run(approved: &[&str]) -> CleanupRun {
    let mut run = project_run("acme/app", InUse::Known(Arc::new(InUseIndex::new())));
    run.rules = RuleSpec {
        name_regex_delete: Some(".*".into()),
        keep_n: Some(2),
        ..RuleSpec::default()
    };
    run.limits.max_deletion_percent = Some(50);
    run.approved_deletions = approved.iter().map(|fp| (*fp).to_owned()).collect();
    run
}

#[tokio::test]
async fn a_run_over_its_deletion_budget_waits_for_approval_of_exactly_that_set() {
    let sim = start(budget_seed(), true).await;
    let client = client(&sim);
    let before = sim_tags(&sim);

    // Over the budget: nothing deleted, the approval to ask for reported.
    let first = run(&client, &budget_run(&[])).await;
    assert_eq!(
        first.outcome,
        RunOutcome::NeedsApproval,
        "{}",
        first.message
    );
    assert_eq!(delete_count(&sim), 0);
    assert_eq!(first.tags_deleted, 0);
    assert_eq!(first.pending_approvals.len(), 1);
    let pending = first.pending_approvals[0].clone();
    assert_eq!(
        (
            pending.repository.as_str(),
            pending.would_delete,
            pending.total
        ),
        ("acme/app", 8, 10)
    );
    let selected: Vec<String> = first.repository_reports[0].selected.clone();
    assert_eq!(
        pending.fingerprint,
        cleanup::fingerprint("acme/app", &selected)
    );
    assert!(
        first.message.contains(&pending.fingerprint)
            && first.message.contains("gitlabregistry.io/approve-deletion"),
        "{}",
        first.message
    );

    // A dry run and a plan ask for the same approval, and delete nothing.
    let mut dry = budget_run(&[]);
    dry.dry_run = true;
    let mut plan = budget_run(&[]);
    plan.mode = Mode::Plan;
    for simulated in [dry, plan] {
        let report = run(&client, &simulated).await;
        assert_eq!(report.outcome, RunOutcome::NeedsApproval);
        assert_eq!(report.pending_approvals, vec![pending.clone()]);
        assert_eq!(report.tags_deleted, 0);
    }
    // Approved in a dry run: it reports the deletions the approval lets through.
    let mut approved_dry = budget_run(&[&pending.fingerprint]);
    approved_dry.dry_run = true;
    assert_eq!(run(&client, &approved_dry).await.tags_deleted, 8);
    assert_eq!(delete_count(&sim), 0);
    assert_eq!(sim_tags(&sim), before);

    // The selection changes before the approved run (a new build pushed, keepN moves): the
    // approval no longer matches and is asked again.
    reqwest::Client::new()
        .put(format!(
            "{}/-/sim/repositories/100/tags/main-000000ff",
            sim.base_url()
        ))
        .json(&serde_json::json!({
            "digest": digest("main-000000ff"),
            "created_at": hours_ago(24 * 10),
        }))
        .send()
        .await
        .expect("push a tag")
        .error_for_status()
        .expect("tag pushed");
    let changed = run(&client, &budget_run(&[&pending.fingerprint])).await;
    assert_eq!(
        changed.outcome,
        RunOutcome::NeedsApproval,
        "{}",
        changed.message
    );
    assert_eq!(delete_count(&sim), 0);
    let again = changed.pending_approvals[0].clone();
    assert_ne!(again.fingerprint, pending.fingerprint);
    assert_eq!((again.would_delete, again.total), (9, 11));

    // Approving the new fingerprint deletes exactly the set it names.
    let approved = run(
        &client,
        &budget_run(&[&pending.fingerprint, &again.fingerprint]),
    )
    .await;
    assert_eq!(
        approved.outcome,
        RunOutcome::Succeeded,
        "{}",
        approved.message
    );
    assert!(approved.pending_approvals.is_empty());
    let mut deleted = approved.repository_reports[0].deleted.clone();
    deleted.sort();
    let mut expected = changed.repository_reports[0].selected.clone();
    expected.sort();
    assert_eq!(deleted, expected);
    assert_eq!(delete_count(&sim), 9);
    assert_eq!(sim_tags(&sim)["acme/app"].len(), 2);
}

#[tokio::test]
async fn a_run_within_its_deletion_budget_needs_no_approval() {
    let sim = start(budget_seed(), true).await;
    let client = client(&sim);
    let mut within = budget_run(&[]);
    within.limits.max_deletion_percent = Some(80);
    let report = run(&client, &within).await;
    assert_eq!(report.outcome, RunOutcome::Succeeded, "{}", report.message);
    assert!(report.pending_approvals.is_empty());
    assert_eq!(delete_count(&sim), 8);
}
