//! Cleanup selection speed: tags evaluated per second by `cleanup::select` on one core, for
//! 1,000,000 tags of one repository with a delete regex, a keep regex, keepN and olderThan.
//!
//! `cargo bench --bench cleanup_selection`
//!
//! Tag names look like a busy CI's: 40-hex git shas (90 %, matched by the delete regex),
//! `release-N` (10 %, kept by the keep regex) and `latest`; half the digests are shared by
//! two tags; ages spread over ~580 days. Inputs are built before timing; the figure is the
//! median of several runs (each one `select` call over the whole list, verdicts, delete
//! order and counters included).

use std::hint::black_box;
use std::time::{Duration, Instant};

use gitlab_registry_operator::cleanup::{CompiledRules, Protections, RuleSpec, TagInfo, select};
use jiff::{SignedDuration, Timestamp};

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

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn main() {
    let now = Timestamp::now();
    let rules = CompiledRules::compile(&RuleSpec {
        name_regex_delete: Some("[0-9a-f]{40}".into()),
        name_regex_keep: Some("release-.*|main|stable-.*".into()),
        keep_n: Some(10),
        older_than: Some("14d".into()),
    })
    .expect("valid rules");
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
}
