//! Cleanup selection speed: tags evaluated per second by `cleanup::select` on one core, for
//! 1,000,000 tags of one repository with a delete regex, a keep regex, keepN and olderThan.
//!
//! `cargo bench --bench cleanup_selection`
//!
//! Then one cleanup run (`sync::cleanup::run_cleanup`, the engine the controller and `apply`
//! use) over a repository of 10,000 tags in the simulator, once with tag lists carrying
//! `digest` and `created_at` (GitLab with the registry metadata database) and once without
//! (one tag-details GET per deletion candidate): requests per tag.
//!
//! Tag names look like a busy CI's: 40-hex git shas (90 %, matched by the delete regex),
//! `release-N` (10 %, kept by the keep regex) and `latest`; half the digests are shared by
//! two tags; ages spread over ~580 days. Inputs are built before timing; the figure is the
//! median of several runs (each one `select` call over the whole list, verdicts, delete
//! order and counters included).

use std::hint::black_box;
use std::time::{Duration, Instant};

use std::sync::Arc;

use gitlab_registry_operator::cleanup::{
    CompiledRules, InUseIndex, Protections, RuleSpec, TagInfo, select,
};
use gitlab_registry_operator::gitlab::{ClientConfig, GitLabClient, PathOrId};
use gitlab_registry_operator::sim::seed::{SeedGroup, SeedProject, SeedRepository, SeedTag};
use gitlab_registry_operator::sim::{DEFAULT_TOKEN, Seed, SimConfig, Simulator};
use gitlab_registry_operator::sync::Mode;
use gitlab_registry_operator::sync::cleanup::{
    CleanupRun, CleanupTarget, InUse, RunLimits, Safety, run_cleanup,
};
use jiff::{SignedDuration, Timestamp};
use secrecy::SecretString;

const TAGS: usize = 1_000_000;
const RUNS: usize = 7;
const GOAL_PER_SECOND: f64 = 2_000_000.0;

fn tags(now: Timestamp) -> Vec<TagInfo> {
    (0..TAGS)
        .map(|i| {
            let name = if i == 0 {
                "latest".to_owned()
            } else if i % 10 == 0 {
                format!("release-{i}")
            } else {
                format!(
                    "{:040x}",
                    (i as u128).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c)
                )
            };
            let age = SignedDuration::from_secs((i as i64 * 7919) % 50_000_000);
            TagInfo {
                name,
                digest: Some(format!("sha256:{:064x}", i / 2)),
                created_at: Some(now - age),
            }
        })
        .collect()
}

const RUN_TAGS: usize = 10_000;

fn rule_spec() -> RuleSpec {
    RuleSpec {
        name_regex_delete: Some("[0-9a-f]{40}".into()),
        name_regex_keep: Some("release-.*|main|stable-.*".into()),
        keep_n: Some(10),
        older_than: Some("14d".into()),
        ..RuleSpec::default()
    }
}

/// One cleanup run over `RUN_TAGS` tags; prints its request figures.
async fn cleanup_run(tag_list_details: bool) {
    let now = Timestamp::now();
    let tags = (0..RUN_TAGS)
        .map(|i| SeedTag {
            name: if i % 10 == 0 {
                format!("release-{i}")
            } else {
                format!(
                    "{:040x}",
                    (i as u128).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c)
                )
            },
            digest: Some(format!("sha256:{:064x}", i)),
            // Ages from 0 to ~28 days: about half are older than 14d.
            created_at: Some(now - SignedDuration::from_secs(i as i64 * 240)),
            total_size: 1000,
        })
        .collect();
    let seed = Seed {
        groups: vec![SeedGroup {
            id: 1000,
            full_path: "org".into(),
            name: None,
        }],
        projects: vec![SeedProject {
            id: 2000,
            path_with_namespace: "org/app".into(),
            repositories: vec![SeedRepository {
                id: Some(3000),
                name: String::new(),
                created_at: None,
                tags,
            }],
            tag_protection_rules: Vec::new(),
            branches: Vec::new(),
        }],
        ..Seed::default()
    };
    let sim = Simulator::start(
        SimConfig {
            tag_list_details,
            ..SimConfig::default()
        },
        seed,
    )
    .await
    .expect("simulator");
    let client = GitLabClient::new(ClientConfig::new(
        sim.base_url().parse().expect("url"),
        SecretString::from(DEFAULT_TOKEN),
    ))
    .expect("client");
    let run = CleanupRun {
        target: CleanupTarget::Project {
            project: PathOrId::parse("org/app"),
            path_regex: None,
        },
        rules: rule_spec(),
        cache_not_downloaded_for: None,
        safety: Safety::default(),
        // No Pod runs any of these images.
        in_use: InUse::Known(Arc::new(InUseIndex::new())),
        dry_run: false,
        limits: RunLimits {
            max_deletions_per_run: RUN_TAGS as u32,
            // Unpaced: the figure is requests, not time.
            requests_per_second: 1_000_000,
            max_deletion_percent: None,
        },
        now,
        mode: Mode::Apply,
        approved_deletions: Default::default(),
    };
    let started = Instant::now();
    let report = run_cleanup(&client, &run).await.expect("valid run");
    let elapsed = started.elapsed();
    let counts = sim.request_counts();
    let total: u64 = counts.values().sum();
    let deletes: u64 = counts
        .iter()
        .filter(|(key, _)| key.starts_with("DELETE "))
        .map(|(_, count)| count)
        .sum();
    let label = if tag_list_details {
        "list_with_created_at"
    } else {
        "list_without_details"
    };
    let per_tag = total as f64 / RUN_TAGS as f64;
    let deletions_per_tag = report.tags_deleted as f64 / RUN_TAGS as f64;
    println!(
        "cleanup.run[{label}].requests_per_tag = {per_tag:.4} (goal <= 1.01 + deletions per tag = {:.4}; {total} requests, {} tags deleted, outcome {:?}, {:.1} s unpaced)",
        1.01 + deletions_per_tag,
        report.tags_deleted,
        report.outcome,
        elapsed.as_secs_f64()
    );
    println!(
        "cleanup.run[{label}].non_delete_requests_per_tag = {:.4} ({} list/detail/other requests for {} tags evaluated)",
        (total - deletes) as f64 / RUN_TAGS as f64,
        total - deletes,
        report.tags_evaluated
    );
    for (route, count) in &counts {
        println!("cleanup.run[{label}].requests_by_route[{route}] = {count}");
    }
    sim.shutdown().await;
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn main() {
    let now = Timestamp::now();
    let rules = CompiledRules::compile(&rule_spec()).expect("valid rules");
    let unsorted = tags(now);
    // GitLab lists a repository's tags sorted by name.
    let mut by_name = unsorted.clone();
    by_name.sort_by(|a, b| a.name.cmp(&b.name));

    for keep_shared_digests in [true, false] {
        let protections = Protections {
            keep_shared_digests,
            ..Protections::default()
        };
        for (label, input) in [("sorted_by_name", &by_name), ("unsorted", &unsorted)] {
            let mut samples = Vec::with_capacity(RUNS);
            let mut deleted = 0;
            for _ in 0..RUNS {
                let started = Instant::now();
                let selection = select(black_box(input), &rules, &protections, now);
                deleted = black_box(selection.counts().delete);
                samples.push(started.elapsed());
                assert_eq!(selection.counts().evaluated, TAGS);
            }
            let per_second = TAGS as f64 / median(samples).as_secs_f64();
            let shared = if keep_shared_digests {
                "keepSharedDigests"
            } else {
                "no_shared_digest_check"
            };
            println!(
                "cleanup.select_tags_per_second[{label},{shared}] = {:.2} M/s (goal >= {:.0} M/s on one core; {deleted} of {TAGS} selected for deletion)",
                per_second / 1e6,
                GOAL_PER_SECOND / 1e6
            );
        }
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        cleanup_run(true).await;
        cleanup_run(false).await;
    });
}
