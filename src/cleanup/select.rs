//! Which tags of one container repository a cleanup deletes, and why every other tag stays.
//!
//! [`select()`] first follows GitLab's documented cleanup algorithm, step by step
//! (container registry user guide, "How the cleanup policy works"):
//!
//! 1. the tag named `latest` is kept ([`KeepReason::Latest`]);
//! 2. names not matching the delete regex are kept ([`KeepReason::NotMatchingDelete`]);
//! 3. names matching the keep regex are kept ([`KeepReason::MatchesKeep`]);
//! 4. tags without a manifest (no digest) are kept ([`KeepReason::NoManifest`]);
//! 5. the rest are ordered by `created_at`, newest first (a missing `created_at` counts as
//!    `now`, as GitLab does; ties are broken by name, then input position);
//! 6. the first `keep_n` are kept ([`KeepReason::KeepN`]);
//! 7. of the rest, with `older_than`, only tags created strictly before `now - older_than`
//!    are deleted ([`KeepReason::NewerThan`]; a `created_at` in the future is never older);
//!    a tag without `created_at` is never deleted by an age rule
//!    ([`KeepReason::MissingCreatedAt`], as GitLab: `tag.created_at && tag.created_at < …`);
//! 8. the remaining tags are the deletion candidates.
//!
//! Then the operator's protections and rules override deletions, in this order of
//! attribution: GitLab protected tags ([`KeepReason::Protected`]), tags whose name or digest
//! a Pod runs ([`KeepReason::InUse`]), the `n` newest tags of every family of
//! `rules.keepNPerFamily` ([`KeepReason::KeepNPerFamily`]), tags whose captured text is the
//! `CI_COMMIT_REF_SLUG` of an existing branch (`safety.keepBranchTags`,
//! [`KeepReason::BranchExists`]), and, with `keep_shared_digests`, tags whose digest is also
//! the digest of any kept tag, whatever kept it ([`KeepReason::SharedDigest`]) — deleting
//! such a tag would not free the image and would break anyone pulling by that name. Each of
//! them only turns a deletion into a keep, so together they never delete more than GitLab's
//! rules alone.
//!
//! A family is every tag whose name the family pattern matches (either anchoring reading)
//! and that has a manifest, whatever else decided about it: a tag kept by `keepN` or not
//! matching `nameRegexDelete` still takes one of the family's `n` places, as "the `n` newest
//! of each family are kept" reads. Newest means the order of step 5; a name listed twice
//! takes one place.
//!
//! Tags are deleted by name, so a name listed twice (overlapping pages, a tag re-pushed
//! between two page reads) is deleted only if every entry of it would be; otherwise its
//! other entries are kept ([`KeepReason::DuplicateName`]), and it takes one `keep_n` place.
//!
//! The result has exactly one [`Verdict`] per input entry and counters for status and metrics.
//! `select` does no I/O and allocates per candidate only a small sort key (and, for input not
//! sorted by name, one hash per name to look for names listed twice).

use std::cmp::Reverse;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::{BuildHasher, BuildHasherDefault};
use std::time::Duration;

use jiff::Timestamp;
use regex::RegexSet;

use super::branches::ProjectBranches;
use super::duration::format_duration;
use super::in_use::RepositoryInUse;
use super::rules::{CapturePattern, CompiledRules, FamilyRule};
use super::{Error, Result};

/// The tag GitLab never deletes in a cleanup.
pub const LATEST: &str = "latest";

/// One tag of a container repository, as GitLab's tag details report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagInfo {
    pub name: String,
    /// Manifest digest (`sha256:…`); `None` (or empty) means the tag has no manifest.
    pub digest: Option<String>,
    /// When the manifest was created (GitLab's `created_at`).
    pub created_at: Option<Timestamp>,
}

impl TagInfo {
    pub fn new(
        name: impl Into<String>,
        digest: Option<&str>,
        created_at: Option<Timestamp>,
    ) -> Self {
        Self {
            name: name.into(),
            digest: digest.map(str::to_owned),
            created_at,
        }
    }

    fn manifest_digest(&self) -> Option<&str> {
        self.digest.as_deref().filter(|digest| !digest.is_empty())
    }
}

/// Why a tag is kept. The first reason that applies, in the order of the algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeepReason {
    Latest,
    NotMatchingDelete,
    MatchesKeep,
    NoManifest,
    KeepN,
    NewerThan,
    MissingCreatedAt,
    Protected,
    InUse,
    KeepNPerFamily,
    BranchExists,
    SharedDigest,
    DuplicateName,
}

impl KeepReason {
    pub const ALL: [KeepReason; 13] = [
        KeepReason::Latest,
        KeepReason::NotMatchingDelete,
        KeepReason::MatchesKeep,
        KeepReason::NoManifest,
        KeepReason::KeepN,
        KeepReason::NewerThan,
        KeepReason::MissingCreatedAt,
        KeepReason::Protected,
        KeepReason::InUse,
        KeepReason::KeepNPerFamily,
        KeepReason::BranchExists,
        KeepReason::SharedDigest,
        KeepReason::DuplicateName,
    ];

    /// Stable CamelCase name, for metrics labels and machine-readable output.
    pub fn as_str(self) -> &'static str {
        match self {
            KeepReason::Latest => "Latest",
            KeepReason::NotMatchingDelete => "NotMatchingDelete",
            KeepReason::MatchesKeep => "MatchesKeep",
            KeepReason::NoManifest => "NoManifest",
            KeepReason::KeepN => "KeepN",
            KeepReason::NewerThan => "NewerThan",
            KeepReason::MissingCreatedAt => "MissingCreatedAt",
            KeepReason::Protected => "Protected",
            KeepReason::InUse => "InUse",
            KeepReason::KeepNPerFamily => "KeepNPerFamily",
            KeepReason::BranchExists => "BranchExists",
            KeepReason::SharedDigest => "SharedDigest",
            KeepReason::DuplicateName => "DuplicateName",
        }
    }

    /// A sentence fragment for humans, as in "kept: `description`".
    pub fn description(self) -> &'static str {
        match self {
            KeepReason::Latest => "the tag named latest is never deleted",
            KeepReason::NotMatchingDelete => "name does not match nameRegexDelete",
            KeepReason::MatchesKeep => "name matches nameRegexKeep",
            KeepReason::NoManifest => "tag has no manifest",
            KeepReason::KeepN => "one of the keepN newest matching tags",
            KeepReason::NewerThan => "not older than olderThan",
            KeepReason::MissingCreatedAt => {
                "creation time unknown; an olderThan rule never deletes a tag of unknown age"
            }
            KeepReason::Protected => "protected by a GitLab tag protection rule",
            KeepReason::InUse => "a Pod in the cluster runs this tag or its digest",
            KeepReason::KeepNPerFamily => {
                "one of the n newest tags of its family (rules.keepNPerFamily)"
            }
            KeepReason::BranchExists => {
                "built from a branch that still exists in the project (safety.keepBranchTags), \
                 or the branches are unknown"
            }
            KeepReason::SharedDigest => "its digest is also the digest of a kept tag",
            KeepReason::DuplicateName => {
                "listed more than once and another entry of this name is kept; deleting by name \
                 would delete that one too"
            }
        }
    }

    fn slot(self) -> usize {
        self as usize
    }
}

impl fmt::Display for KeepReason {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// The decision for one tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    Delete,
    Keep(KeepReason),
}

impl Verdict {
    pub fn is_delete(self) -> bool {
        self == Verdict::Delete
    }

    pub fn keep_reason(self) -> Option<KeepReason> {
        match self {
            Verdict::Delete => None,
            Verdict::Keep(reason) => Some(reason),
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Delete => formatter.write_str("Delete"),
            Verdict::Keep(reason) => write!(formatter, "Keep({reason})"),
        }
    }
}

/// GitLab's container tag protection rules of a project (`tag_name_pattern`s).
///
/// GitLab matches them as an *unanchored* RE2 search
/// (`Gitlab::UntrustedRegexp.new(rule.tag_name_pattern).match?(name)`), so `v` protects every
/// name containing a `v`; this does the same. Access levels are ignored: every rule protects,
/// whoever the token belongs to (an administrator's token could delete them; we never do).
#[derive(Debug, Clone, Default)]
pub struct ProtectedTags {
    patterns: Vec<String>,
    set: Option<RegexSet>,
}

impl ProtectedTags {
    pub const FIELD: &'static str = "tag protection rule tag_name_pattern";

    /// No protection rules.
    pub fn none() -> Self {
        Self::default()
    }

    /// Compiles the patterns. One that does not compile is an error, not ignored: without it
    /// we could not know what it protects.
    pub fn compile<I, S>(patterns: I) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let patterns: Vec<String> = patterns
            .into_iter()
            .map(|pattern| pattern.as_ref().to_owned())
            .collect();
        for pattern in &patterns {
            regex::Regex::new(pattern).map_err(|error| Error::InvalidRegex {
                field: Self::FIELD,
                pattern: pattern.clone(),
                message: error.to_string(),
            })?;
        }
        let set = if patterns.is_empty() {
            None
        } else {
            Some(
                RegexSet::new(&patterns).map_err(|error| Error::InvalidRegex {
                    field: Self::FIELD,
                    pattern: patterns.join(" | "),
                    message: error.to_string(),
                })?,
            )
        };
        Ok(Self { patterns, set })
    }

    pub fn is_protected(&self, name: &str) -> bool {
        self.set.as_ref().is_some_and(|set| set.is_match(name))
    }

    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }
}

/// The operator's protections on top of GitLab's rules.
#[derive(Debug, Clone, Default)]
pub struct Protections<'a> {
    /// GitLab's tag protection rules of the project.
    pub protected_tags: ProtectedTags,
    /// Images that Pods run, for this repository (`safety.keepInUse`); `None` = not checked.
    pub in_use: Option<RepositoryInUse<'a>>,
    /// `safety.keepSharedDigests`.
    pub keep_shared_digests: bool,
    /// The branches of the repository's project, for `safety.keepBranchTags`. `None` while
    /// the rule is set means they are unknown: every tag the pattern captures is kept.
    pub branches: Option<&'a ProjectBranches>,
}

/// Counters of one selection, for status (`tagsEvaluated`, `tagsDeleted`, `tagsKept`,
/// `tagsProtected`) and metrics. They count input entries: only with a name listed twice can
/// `delete` exceed the number of names [`Selection::to_delete`] yields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SelectionCounts {
    pub evaluated: usize,
    pub delete: usize,
    pub kept: usize,
    /// Deletion candidates saved by a GitLab tag protection rule.
    pub protected: usize,
    kept_by_reason: [usize; KeepReason::ALL.len()],
}

impl SelectionCounts {
    pub fn kept_by(&self, reason: KeepReason) -> usize {
        self.kept_by_reason[reason.slot()]
    }

    /// Every reason with its count, in [`KeepReason::ALL`] order (zeros included).
    pub fn kept_by_reason(&self) -> impl Iterator<Item = (KeepReason, usize)> + '_ {
        KeepReason::ALL
            .iter()
            .map(|reason| (*reason, self.kept_by_reason[reason.slot()]))
    }
}

/// Newest-first ordering key of a candidate: whole seconds of `created_at` (or `now`), newest
/// first, then input position. Comparing it is plain integer work, with no look-up into the
/// tags; [`order_candidates`] then puts candidates created in the same second in the exact
/// documented order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct CandidateKey {
    newest_first: Reverse<i64>,
    index: usize,
}

/// The verdict for every tag of one repository.
#[derive(Debug, Clone)]
pub struct Selection<'a> {
    tags: &'a [TagInfo],
    /// Parallel to `tags`.
    verdicts: Vec<Verdict>,
    /// Input positions of the tags to delete, oldest first, each name once.
    delete_order: Vec<usize>,
    counts: SelectionCounts,
    keep_n: Option<u32>,
    older_than: Option<Duration>,
    cutoff: Option<Timestamp>,
    now: Timestamp,
}

/// Decides, for every tag, delete or keep (and why). See the module docs for the exact order.
///
/// Every decision but `keep_n` is made in input order, which reads the tags and their strings
/// sequentially (most of them in one pass); only the `keep_n` newest and the deletion order
/// need the candidates sorted.
pub fn select<'a>(
    tags: &'a [TagInfo],
    rules: &CompiledRules,
    protections: &Protections<'_>,
    now: Timestamp,
) -> Selection<'a> {
    let keep_n = rules.keep_n();
    let older_than = rules.older_than();
    // A cutoff before the representable past means nothing is old enough.
    let cutoff = older_than.map(|age| now.saturating_sub(age).unwrap_or(Timestamp::MIN));

    let mut verdicts: Vec<Verdict> = Vec::with_capacity(tags.len());
    let mut candidates: Vec<CandidateKey> = Vec::with_capacity(tags.len());
    // GitLab lists tags sorted by name: names that reach step 4 in strictly ascending order
    // cannot repeat, which spares the duplicate check.
    let mut names_ascending = true;
    let mut previous_name: Option<&str> = None;
    for (index, tag) in tags.iter().enumerate() {
        // Steps 1–3 depend on the name alone, so every entry of a name gets the same answer.
        let verdict = if tag.name == LATEST {
            Verdict::Keep(KeepReason::Latest)
        } else if !rules.matches_delete(&tag.name) {
            Verdict::Keep(KeepReason::NotMatchingDelete)
        } else if rules.matches_keep(&tag.name) {
            Verdict::Keep(KeepReason::MatchesKeep)
        } else {
            names_ascending &= previous_name.is_none_or(|previous| previous < tag.name.as_str());
            previous_name = Some(&tag.name);
            if tag.manifest_digest().is_none() {
                Verdict::Keep(KeepReason::NoManifest)
            } else {
                candidates.push(CandidateKey {
                    newest_first: Reverse(tag.created_at.unwrap_or(now).as_second()),
                    index,
                });
                verdict_unless_kept_by_keep_n(tag, cutoff, protections)
            }
        };
        verdicts.push(verdict);
    }

    // Step 5.
    order_candidates(&mut candidates, tags, now);
    let duplicates = !names_ascending && has_duplicate_names(tags, &verdicts);

    // Step 6: the newest `keep_n` override whatever the age rule or a protection said.
    if let Some(keep_n) = keep_n {
        let mut names_counted: HashSet<&str> = HashSet::new();
        let mut position: u64 = 0;
        for key in &candidates {
            if position >= u64::from(keep_n) {
                break;
            }
            verdicts[key.index] = Verdict::Keep(KeepReason::KeepN);
            // A name listed twice (overlapping pages) must not use up two keepN places.
            if !duplicates || names_counted.insert(tags[key.index].name.as_str()) {
                position += 1;
            }
        }
    }

    // The operator's own rules, after GitLab's: they only turn deletions into keeps.
    if let Some(family) = rules.family() {
        keep_newest_of_families(tags, &mut verdicts, family, now);
    }
    if let Some(pattern) = rules.branch_tags() {
        keep_branch_tags(tags, &mut verdicts, pattern, protections.branches);
    }

    let any_delete = verdicts.contains(&Verdict::Delete);
    if any_delete && !duplicates {
        if protections.keep_shared_digests {
            keep_shared_digests(tags, &mut verdicts);
        }
    } else if any_delete {
        // Keeping for one reason can make the other apply; repeat until nothing changes.
        loop {
            let mut changed = false;
            if protections.keep_shared_digests {
                changed |= keep_shared_digests(tags, &mut verdicts);
            }
            changed |= keep_names_kept_elsewhere(tags, &mut verdicts);
            if !changed {
                break;
            }
        }
    }

    let mut counts = SelectionCounts {
        evaluated: tags.len(),
        ..SelectionCounts::default()
    };
    for verdict in &verdicts {
        match verdict {
            Verdict::Delete => counts.delete += 1,
            Verdict::Keep(reason) => {
                counts.kept += 1;
                counts.kept_by_reason[reason.slot()] += 1;
            }
        }
    }
    counts.protected = counts.kept_by(KeepReason::Protected);

    let mut names_listed: HashSet<&str> = HashSet::new();
    let mut delete_order: Vec<usize> = Vec::with_capacity(counts.delete);
    delete_order.extend(
        candidates
            .iter()
            .rev()
            .map(|key| key.index)
            .filter(|&index| verdicts[index] == Verdict::Delete)
            .filter(|&index| !duplicates || names_listed.insert(tags[index].name.as_str())),
    );

    Selection {
        tags,
        verdicts,
        delete_order,
        counts,
        keep_n,
        older_than,
        cutoff,
        now,
    }
}

/// Steps 7–8 and the operator's protections for a candidate, as if it were not among the
/// `keep_n` newest (the few that are get [`KeepReason::KeepN`] once candidates are ordered).
fn verdict_unless_kept_by_keep_n(
    tag: &TagInfo,
    cutoff: Option<Timestamp>,
    protections: &Protections<'_>,
) -> Verdict {
    match (cutoff, tag.created_at) {
        (None, _) => {}
        (Some(_), None) => return Verdict::Keep(KeepReason::MissingCreatedAt),
        (Some(cutoff), Some(created)) if created < cutoff => {}
        (Some(_), Some(_)) => return Verdict::Keep(KeepReason::NewerThan),
    }
    if protections.protected_tags.is_protected(&tag.name) {
        Verdict::Keep(KeepReason::Protected)
    } else if protections
        .in_use
        .as_ref()
        .is_some_and(|in_use| in_use.is_in_use(&tag.name, tag.manifest_digest()))
    {
        Verdict::Keep(KeepReason::InUse)
    } else {
        Verdict::Delete
    }
}

/// `rules.keepNPerFamily`: the `n` newest members of every family keep their place; those
/// still to be deleted become `Keep(KeepNPerFamily)`.
fn keep_newest_of_families(
    tags: &[TagInfo],
    verdicts: &mut [Verdict],
    family: &FamilyRule,
    now: Timestamp,
) {
    let mut families: HashMap<&str, Vec<CandidateKey>> = HashMap::new();
    for (index, tag) in tags.iter().enumerate() {
        if tag.manifest_digest().is_none() {
            continue;
        }
        if let Some(captured) = family.pattern.captured(&tag.name) {
            families.entry(captured).or_default().push(CandidateKey {
                newest_first: Reverse(tag.created_at.unwrap_or(now).as_second()),
                index,
            });
        }
    }
    for members in families.values_mut() {
        order_candidates(members, tags, now);
        let mut names: HashSet<&str> = HashSet::new();
        for key in members.iter() {
            if names.len() >= family.n as usize && !names.contains(tags[key.index].name.as_str()) {
                break;
            }
            names.insert(tags[key.index].name.as_str());
            if verdicts[key.index] == Verdict::Delete {
                verdicts[key.index] = Verdict::Keep(KeepReason::KeepNPerFamily);
            }
        }
    }
}

/// `safety.keepBranchTags`: a deletion whose captured text (in either reading) is the slug of
/// an existing branch — or any captured deletion while the branches are unknown — is kept.
fn keep_branch_tags(
    tags: &[TagInfo],
    verdicts: &mut [Verdict],
    pattern: &CapturePattern,
    branches: Option<&ProjectBranches>,
) {
    for (tag, verdict) in tags.iter().zip(verdicts.iter_mut()) {
        if *verdict != Verdict::Delete {
            continue;
        }
        let mut captured = pattern.captured_in_each_reading(&tag.name).peekable();
        let keep = match branches {
            Some(branches) => captured.any(|text| branches.has_slug(text)),
            None => captured.peek().is_some(),
        };
        if keep {
            *verdict = Verdict::Keep(KeepReason::BranchExists);
        }
    }
}

/// Step 5: newest first; equal times by name, then position, so the result never depends on
/// the sort algorithm. Sorting by [`CandidateKey`] alone is cheap; only candidates created in
/// the same second (usually none, or a handful) need the full comparison.
fn order_candidates(candidates: &mut [CandidateKey], tags: &[TagInfo], now: Timestamp) {
    candidates.sort_unstable();
    let created = |key: &CandidateKey| tags[key.index].created_at.unwrap_or(now);
    for same_second in candidates.chunk_by_mut(|a, b| a.newest_first == b.newest_first) {
        if same_second.len() > 1 {
            same_second.sort_unstable_by(|a, b| {
                created(b)
                    .cmp(&created(a))
                    .then_with(|| tags[a.index].name.cmp(&tags[b.index].name))
                    .then(a.index.cmp(&b.index))
            });
        }
    }
}

/// Whether the name of a tag decided it (steps 1–3), so that every entry of that name has the
/// same verdict and listing it twice changes nothing.
fn decided_by_name(verdict: Verdict) -> bool {
    matches!(
        verdict,
        Verdict::Keep(KeepReason::Latest | KeepReason::NotMatchingDelete | KeepReason::MatchesKeep)
    )
}

/// Whether a name that reaches step 4 appears more than once.
///
/// Sorting one 64-bit hash per name and comparing neighbours touches memory in order, where a
/// set of a million names would miss the cache on every insert. Equal hashes are rare (or
/// crafted); only then are names compared, in a set with SipHash's random keys so that crafted
/// names cannot make it slow.
fn has_duplicate_names(tags: &[TagInfo], verdicts: &[Verdict]) -> bool {
    let reaching_step_4 = || {
        tags.iter()
            .zip(verdicts)
            .filter(|(_, verdict)| !decided_by_name(**verdict))
            .map(|(tag, _)| tag.name.as_str())
    };
    let name_hasher = BuildHasherDefault::<NameHasher>::default();
    let mut hashes: Vec<u64> = reaching_step_4()
        .map(|name| name_hasher.hash_one(name))
        .collect();
    hashes.sort_unstable();
    if hashes.windows(2).all(|pair| pair[0] != pair[1]) {
        return false;
    }
    let mut seen: HashSet<&str> = HashSet::with_capacity(hashes.len());
    !reaching_step_4().all(|name| seen.insert(name))
}

/// Turns into `Keep(DuplicateName)` every deletion of a name that another entry keeps: tags
/// are deleted by name. Returns whether anything changed.
fn keep_names_kept_elsewhere(tags: &[TagInfo], verdicts: &mut [Verdict]) -> bool {
    let kept_names: HashSet<&str> = tags
        .iter()
        .zip(verdicts.iter())
        .filter(|(_, verdict)| !verdict.is_delete())
        .map(|(tag, _)| tag.name.as_str())
        .collect();
    let mut changed = false;
    for (tag, verdict) in tags.iter().zip(verdicts.iter_mut()) {
        if *verdict == Verdict::Delete && kept_names.contains(tag.name.as_str()) {
            *verdict = Verdict::Keep(KeepReason::DuplicateName);
            changed = true;
        }
    }
    changed
}

/// Hashes a digest by its last 16 bytes only. Digests are content hashes (`sha256:<hex>`), so
/// their tails are already uniformly spread; equality is still decided on the whole string by
/// the set, so this only makes the shared-digest pass cheaper, never less exact.
#[derive(Default)]
struct DigestHasher(u64);

impl std::hash::Hasher for DigestHasher {
    fn write(&mut self, bytes: &[u8]) {
        let tail = &bytes[bytes.len().saturating_sub(16)..];
        for chunk in tail.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = mix(self.0 ^ u64::from_le_bytes(word));
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Hashes every byte of a tag name, eight at a time: much cheaper than SipHash on the hot
/// path, and the set still compares whole names.
#[derive(Default)]
struct NameHasher(u64);

impl std::hash::Hasher for NameHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = mix(self.0 ^ u64::from_le_bytes(word));
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// SplitMix64's finaliser: every input bit reaches every output bit, so digests that differ
/// in a few characters still land in different buckets.
fn mix(value: u64) -> u64 {
    let mut z = value.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Turns into `Keep(SharedDigest)` every deletion whose digest a kept tag also has (a tag kept
/// here adds no digest that was not already kept). Returns whether anything changed.
fn keep_shared_digests(tags: &[TagInfo], verdicts: &mut [Verdict]) -> bool {
    // Sized for the kept tags, not all tags: most tags are usually deleted, and in a table
    // sized for all of them nearly every look-up of a deletion would miss the cache.
    let kept = verdicts
        .iter()
        .filter(|verdict| !verdict.is_delete())
        .count();
    let mut kept_digests: HashSet<&str, BuildHasherDefault<DigestHasher>> =
        HashSet::with_capacity_and_hasher(kept, BuildHasherDefault::default());
    kept_digests.extend(
        tags.iter()
            .zip(verdicts.iter())
            .filter(|(_, verdict)| !verdict.is_delete())
            .filter_map(|(tag, _)| tag.manifest_digest()),
    );
    if kept_digests.is_empty() {
        return false;
    }
    let mut changed = false;
    for (tag, verdict) in tags.iter().zip(verdicts.iter_mut()) {
        if *verdict == Verdict::Delete
            && tag
                .manifest_digest()
                .is_some_and(|digest| kept_digests.contains(digest))
        {
            *verdict = Verdict::Keep(KeepReason::SharedDigest);
            changed = true;
        }
    }
    changed
}

impl<'a> Selection<'a> {
    pub fn counts(&self) -> &SelectionCounts {
        &self.counts
    }

    /// Verdicts parallel to the input slice.
    pub fn verdicts(&self) -> &[Verdict] {
        &self.verdicts
    }

    /// The verdict of the tag at `index` in the input slice.
    pub fn verdict_at(&self, index: usize) -> Option<Verdict> {
        self.verdicts.get(index).copied()
    }

    /// The verdict of the first tag with this name (a linear search; for tests and
    /// explanations, not for loops).
    pub fn verdict(&self, name: &str) -> Option<Verdict> {
        self.tags
            .iter()
            .position(|tag| tag.name == name)
            .map(|index| self.verdicts[index])
    }

    /// Tags to delete, oldest first (ties: name descending), each name once, so that a run
    /// capped by `maxDeletionsPerRun` removes the most expired tags first.
    pub fn to_delete(&self) -> impl DoubleEndedIterator<Item = &'a TagInfo> + '_ {
        let tags = self.tags;
        self.delete_order.iter().map(move |&index| &tags[index])
    }

    /// Names of the tags to delete, in [`Selection::to_delete`] order.
    pub fn names_to_delete(&self) -> impl DoubleEndedIterator<Item = &'a str> + '_ {
        self.to_delete().map(|tag| tag.name.as_str())
    }

    /// Every tag with its verdict, in a deterministic order that does not depend on the input
    /// order: newest first (missing `created_at` as `now`), then by name, then position.
    pub fn iter(&self) -> impl Iterator<Item = (&'a TagInfo, Verdict)> + '_ {
        let tags = self.tags;
        let mut order: Vec<usize> = (0..tags.len()).collect();
        let now_key = (self.now.as_second(), self.now.subsec_nanosecond());
        order.sort_unstable_by(|&a, &b| {
            let key_a = tags[a]
                .created_at
                .map(|t| (t.as_second(), t.subsec_nanosecond()));
            let key_b = tags[b]
                .created_at
                .map(|t| (t.as_second(), t.subsec_nanosecond()));
            key_b
                .unwrap_or(now_key)
                .cmp(&key_a.unwrap_or(now_key))
                .then_with(|| tags[a].name.cmp(&tags[b].name))
                .then(a.cmp(&b))
        });
        order
            .into_iter()
            .map(move |index| (&tags[index], self.verdicts[index]))
    }

    /// Kept tags with their reason, in [`Selection::iter`] order.
    pub fn kept(&self) -> impl Iterator<Item = (&'a TagInfo, KeepReason)> + '_ {
        self.iter()
            .filter_map(|(tag, verdict)| verdict.keep_reason().map(|reason| (tag, reason)))
    }

    /// Why the tag at `index` gets its verdict, in one sentence with the rule values.
    pub fn explain(&self, index: usize) -> Option<String> {
        let tag = self.tags.get(index)?;
        let verdict = self.verdicts[index];
        let created = match tag.created_at {
            Some(created) => created.to_string(),
            None => "unknown".to_owned(),
        };
        let text = match verdict {
            Verdict::Delete => {
                let mut text = format!(
                    "{}: delete: matches nameRegexDelete and not nameRegexKeep",
                    tag.name
                );
                if let Some(keep_n) = self.keep_n {
                    text.push_str(&format!(", not among the {keep_n} newest (keepN)"));
                }
                match (self.cutoff, self.older_than) {
                    (Some(cutoff), Some(age)) => text.push_str(&format!(
                        ", created {created}, before the olderThan {} cutoff {cutoff}",
                        format_duration(age)
                    )),
                    _ => text.push_str(&format!(", created {created}")),
                }
                text
            }
            Verdict::Keep(KeepReason::KeepN) => format!(
                "{}: keep: one of the {} newest matching tags (keepN; created {created})",
                tag.name,
                self.keep_n.unwrap_or_default()
            ),
            Verdict::Keep(KeepReason::NewerThan) => format!(
                "{}: keep: created {created}, not before the olderThan {} cutoff {}",
                tag.name,
                self.older_than.map(format_duration).unwrap_or_default(),
                self.cutoff
                    .map(|cutoff| cutoff.to_string())
                    .unwrap_or_default()
            ),
            Verdict::Keep(reason) => format!("{}: keep: {}", tag.name, reason.description()),
        };
        Some(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cleanup::in_use::InUseIndex;
    use crate::cleanup::rules::RuleSpec;
    use proptest::prelude::*;

    fn now() -> Timestamp {
        "2026-06-15T12:00:00Z".parse().unwrap()
    }

    fn digest_for(seed: &str) -> String {
        // A fake but well-formed digest, distinct per seed.
        let mut hex = String::new();
        for byte in seed.bytes().cycle().take(32) {
            hex.push_str(&format!("{byte:02x}"));
        }
        format!("sha256:{hex}")
    }

    fn tag(name: &str, age_days: i64) -> TagInfo {
        TagInfo::new(name, Some(&digest_for(name)), Some(at_days_ago(age_days)))
    }

    fn at_days_ago(days: i64) -> Timestamp {
        now()
            .checked_sub(jiff::SignedDuration::from_hours(24 * days))
            .unwrap()
    }

    fn rules(
        delete: &str,
        keep: Option<&str>,
        keep_n: Option<u32>,
        older_than: Option<&str>,
    ) -> CompiledRules {
        CompiledRules::compile(&RuleSpec {
            name_regex_delete: Some(delete.into()),
            name_regex_keep: keep.map(Into::into),
            keep_n,
            older_than: older_than.map(Into::into),
            ..RuleSpec::default()
        })
        .unwrap()
    }

    fn deleted(selection: &Selection<'_>) -> Vec<String> {
        let mut names: Vec<String> = selection.names_to_delete().map(str::to_owned).collect();
        names.sort();
        names
    }

    fn sha(n: usize) -> String {
        format!("{n:040x}")
    }

    #[test]
    fn bulk_delete_example_git_sha_keep_5_older_than_2d() {
        // name_regex_delete=[0-9a-z]{40}, keep_n=5, older_than=2d.
        let mut tags: Vec<TagInfo> = (0..10).map(|age| tag(&sha(age as usize), age)).collect();
        tags.push(tag("v1.0.0", 30));
        tags.push(tag("latest", 30));
        tags.push(tag(&format!("{}x", sha(99)), 30)); // 41 chars: no match
        let rules = rules("[0-9a-z]{40}", None, Some(5), Some("2d"));
        let selection = select(&tags, &rules, &Protections::default(), now());
        // The 5 newest shas (ages 0..=4) survive; ages 5..=9 are older than 2 days.
        let expected: Vec<String> = {
            let mut names: Vec<String> = (5..10).map(sha).collect();
            names.sort();
            names
        };
        assert_eq!(deleted(&selection), expected);
        assert_eq!(
            selection.verdict(&sha(0)),
            Some(Verdict::Keep(KeepReason::KeepN))
        );
        assert_eq!(
            selection.verdict("v1.0.0"),
            Some(Verdict::Keep(KeepReason::NotMatchingDelete))
        );
        assert_eq!(
            selection.verdict("latest"),
            Some(Verdict::Keep(KeepReason::Latest))
        );
        let counts = selection.counts();
        assert_eq!((counts.evaluated, counts.delete, counts.kept), (13, 5, 8));
        assert_eq!(counts.kept_by(KeepReason::KeepN), 5);
        // Oldest first.
        assert_eq!(selection.names_to_delete().next(), Some(sha(9).as_str()));
    }

    #[test]
    fn bulk_delete_example_git_sha_older_than_spares_the_young_beyond_keep_n() {
        // Same call, but the tags beyond keep_n are young: older_than saves them.
        let tags: Vec<TagInfo> = (0..8)
            .map(|hours| {
                TagInfo::new(
                    sha(hours),
                    Some(&digest_for(&sha(hours))),
                    Some(
                        now()
                            .checked_sub(jiff::SignedDuration::from_hours(hours as i64 * 6))
                            .unwrap(),
                    ),
                )
            })
            .collect();
        let rules = rules("[0-9a-z]{40}", None, Some(5), Some("2d"));
        let selection = select(&tags, &rules, &Protections::default(), now());
        assert!(deleted(&selection).is_empty());
        assert_eq!(selection.counts().kept_by(KeepReason::NewerThan), 3);
    }

    #[test]
    fn bulk_delete_example_all_tags_keep_latest_5() {
        // name_regex_delete=.*, keep_n=5.
        let mut tags: Vec<TagInfo> = (0..8)
            .map(|age| tag(&format!("build-{age}"), age))
            .collect();
        tags.push(tag("latest", 100));
        let rules = rules(".*", None, Some(5), None);
        let selection = select(&tags, &rules, &Protections::default(), now());
        assert_eq!(deleted(&selection), ["build-5", "build-6", "build-7"]);
        assert_eq!(
            selection.verdict("latest"),
            Some(Verdict::Keep(KeepReason::Latest))
        );
    }

    #[test]
    fn bulk_delete_example_all_but_stable() {
        // name_regex_delete=.*, name_regex_keep=stable.*.
        let tags = vec![
            tag("stable", 50),
            tag("stable-1.2", 40),
            tag("unstable", 40),
            tag("v1", 1),
            tag("latest", 1),
        ];
        let rules = rules(".*", Some("stable.*"), None, None);
        let selection = select(&tags, &rules, &Protections::default(), now());
        assert_eq!(deleted(&selection), ["unstable", "v1"]);
        assert_eq!(
            selection.verdict("stable-1.2"),
            Some(Verdict::Keep(KeepReason::MatchesKeep))
        );
    }

    #[test]
    fn bulk_delete_example_older_than_1_month() {
        // name_regex_delete=.*, older_than=1month (30 days).
        let tags = vec![tag("a", 29), tag("b", 30), tag("c", 31), tag("d", 400)];
        let exactly_30_days = TagInfo::new(
            "edge",
            Some(&digest_for("edge")),
            Some(
                now()
                    .checked_sub(jiff::SignedDuration::from_hours(30 * 24))
                    .unwrap(),
            ),
        );
        let mut tags = tags;
        tags.push(exactly_30_days);
        let rules = rules(".*", None, None, Some("1month"));
        let selection = select(&tags, &rules, &Protections::default(), now());
        // Strictly older than the cutoff: exactly 30 days old is kept (GitLab: created_at < cutoff).
        assert_eq!(deleted(&selection), ["c", "d"]);
        assert_eq!(
            selection.verdict("b"),
            Some(Verdict::Keep(KeepReason::NewerThan))
        );
        assert_eq!(
            selection.verdict("edge"),
            Some(Verdict::Keep(KeepReason::NewerThan))
        );
    }

    #[test]
    fn user_guide_policy_api_example() {
        // cadence 1month, keep_n 1, older_than 14d, name_regex_delete .*, name_regex_keep .*-master.
        let tags = vec![
            tag("feature-x", 20),
            tag("feature-y", 30),
            tag("fix-1", 2),
            tag("build-master", 60),
            tag("latest", 90),
        ];
        let rules = rules(".*", Some(".*-master"), Some(1), Some("14d"));
        let selection = select(&tags, &rules, &Protections::default(), now());
        assert_eq!(deleted(&selection), ["feature-x", "feature-y"]);
        assert_eq!(
            selection.verdict("fix-1"),
            Some(Verdict::Keep(KeepReason::KeepN))
        );
        assert_eq!(
            selection.verdict("build-master"),
            Some(Verdict::Keep(KeepReason::MatchesKeep))
        );
    }

    #[test]
    fn policy_ui_fields_keep_n_values() {
        // UI "Keep the most recent": 1 | 5 | 10 | 25 | 50 | 100.
        let tags: Vec<TagInfo> = (0..120)
            .map(|age| tag(&format!("t{age:03}"), age))
            .collect();
        for keep_n in [1u32, 5, 10, 25, 50, 100] {
            let rules = rules(".*", None, Some(keep_n), Some("7d"));
            let selection = select(&tags, &rules, &Protections::default(), now());
            let expected_kept = keep_n.max(8) as usize; // ages 0..=7 are not older than 7d
            assert_eq!(selection.counts().kept, expected_kept, "keep_n {keep_n}");
        }
    }

    #[test]
    fn steps_are_attributed_in_gitlab_order() {
        let tags = vec![
            TagInfo::new("latest", None, None),
            TagInfo::new("other", None, None),
            TagInfo::new("keep-me", None, None),
            TagInfo::new("app-no-manifest", None, Some(at_days_ago(100))),
            TagInfo::new("app-empty-digest", Some(""), Some(at_days_ago(100))),
            TagInfo::new("app-unknown-age", Some(&digest_for("u")), None),
            tag("app-new", 1),
            tag("app-old", 100),
        ];
        let rules = rules("app-.*|keep-.*", Some("keep-.*"), None, Some("14d"));
        let selection = select(&tags, &rules, &Protections::default(), now());
        let verdicts: Vec<Verdict> = selection.verdicts().to_vec();
        assert_eq!(
            verdicts,
            [
                Verdict::Keep(KeepReason::Latest),
                Verdict::Keep(KeepReason::NotMatchingDelete),
                Verdict::Keep(KeepReason::MatchesKeep),
                Verdict::Keep(KeepReason::NoManifest),
                Verdict::Keep(KeepReason::NoManifest),
                Verdict::Keep(KeepReason::MissingCreatedAt),
                Verdict::Keep(KeepReason::NewerThan),
                Verdict::Delete,
            ]
        );
        let explanation = selection.explain(5).unwrap();
        assert!(explanation.contains("unknown age"), "{explanation}");
        let explanation = selection.explain(7).unwrap();
        assert!(explanation.contains("olderThan 14d"), "{explanation}");
        assert!(!explanation.contains("keepN"), "{explanation}");
        assert_eq!(selection.explain(99), None);
    }

    #[test]
    fn missing_created_at_is_deleted_without_age_rule_and_counts_as_newest() {
        // GitLab sorts a missing created_at as now: it is among the keep_n newest.
        let tags = vec![
            TagInfo::new("unknown", Some(&digest_for("unknown")), None),
            tag("old-1", 10),
            tag("old-2", 20),
        ];
        let selection = select(
            &tags,
            &rules(".*", None, Some(1), None),
            &Protections::default(),
            now(),
        );
        assert_eq!(
            selection.verdict("unknown"),
            Some(Verdict::Keep(KeepReason::KeepN))
        );
        assert_eq!(deleted(&selection), ["old-1", "old-2"]);
        let no_keep = select(
            &tags,
            &rules(".*", None, None, None),
            &Protections::default(),
            now(),
        );
        assert_eq!(no_keep.counts().delete, 3);
    }

    #[test]
    fn future_created_at_is_newest_and_never_older() {
        let future = now()
            .checked_add(jiff::SignedDuration::from_hours(24 * 365))
            .unwrap();
        let tags = vec![
            TagInfo::new("from-the-future", Some(&digest_for("f")), Some(future)),
            tag("recent", 0),
            tag("old", 100),
        ];
        let selection = select(
            &tags,
            &rules(".*", None, Some(1), Some("1d")),
            &Protections::default(),
            now(),
        );
        assert_eq!(
            selection.verdict("from-the-future"),
            Some(Verdict::Keep(KeepReason::KeepN))
        );
        let no_keep_n = select(
            &tags,
            &rules(".*", None, None, Some("1d")),
            &Protections::default(),
            now(),
        );
        assert_eq!(
            no_keep_n.verdict("from-the-future"),
            Some(Verdict::Keep(KeepReason::NewerThan))
        );
        assert_eq!(deleted(&no_keep_n), ["old"]);
    }

    #[test]
    fn ties_are_broken_by_name_whatever_the_input_order() {
        let when = at_days_ago(50);
        let names = ["c", "a", "d", "b"];
        let forward: Vec<TagInfo> = names
            .iter()
            .map(|name| TagInfo::new(*name, Some(&digest_for(name)), Some(when)))
            .collect();
        let mut backward = forward.clone();
        backward.reverse();
        let rules = rules(".*", None, Some(2), None);
        for tags in [&forward, &backward] {
            let selection = select(tags, &rules, &Protections::default(), now());
            assert_eq!(deleted(&selection), ["c", "d"]);
            let order: Vec<&str> = selection.iter().map(|(tag, _)| tag.name.as_str()).collect();
            assert_eq!(order, ["a", "b", "c", "d"]);
            let deletion_order: Vec<&str> = selection.names_to_delete().collect();
            assert_eq!(deletion_order, ["d", "c"]);
        }
    }

    #[test]
    fn protections_override_deletions() {
        let shared = digest_for("shared");
        let tags = vec![
            tag("v1.0.0", 100),
            tag("release-old", 100),
            tag("running", 100),
            TagInfo::new(
                "by-digest",
                Some(&digest_for("pinned")),
                Some(at_days_ago(100)),
            ),
            TagInfo::new("alias-old", Some(&shared), Some(at_days_ago(100))),
            TagInfo::new("stable", Some(&shared), Some(at_days_ago(100))),
            TagInfo::new(
                "latest",
                Some(&digest_for("latest-digest")),
                Some(at_days_ago(1)),
            ),
            TagInfo::new(
                "same-as-latest",
                Some(&digest_for("latest-digest")),
                Some(at_days_ago(100)),
            ),
            tag("doomed", 100),
        ];
        let index = InUseIndex::from_images([
            ("gitlab.example.com:5000/group/project:running", ""),
            (
                "busybox",
                &*format!(
                    "docker-pullable://gitlab.example.com:5000/group/project@{}",
                    digest_for("pinned")
                ),
            ),
        ]);
        let protections = Protections {
            protected_tags: ProtectedTags::compile(["^v\\d", "release"]).unwrap(),
            in_use: Some(index.repository("gitlab.example.com:5000/group/project")),
            keep_shared_digests: true,
            ..Protections::default()
        };
        let rules = rules(".*", Some("stable"), None, Some("14d"));
        let selection = select(&tags, &rules, &protections, now());
        assert_eq!(
            selection.verdict("v1.0.0"),
            Some(Verdict::Keep(KeepReason::Protected))
        );
        // Unanchored, as GitLab matches protection patterns.
        assert_eq!(
            selection.verdict("release-old"),
            Some(Verdict::Keep(KeepReason::Protected))
        );
        assert_eq!(
            selection.verdict("running"),
            Some(Verdict::Keep(KeepReason::InUse))
        );
        assert_eq!(
            selection.verdict("by-digest"),
            Some(Verdict::Keep(KeepReason::InUse))
        );
        assert_eq!(
            selection.verdict("alias-old"),
            Some(Verdict::Keep(KeepReason::SharedDigest))
        );
        assert_eq!(
            selection.verdict("same-as-latest"),
            Some(Verdict::Keep(KeepReason::SharedDigest))
        );
        assert_eq!(deleted(&selection), ["doomed"]);
        assert_eq!(selection.counts().protected, 2);
        assert_eq!(selection.counts().kept_by(KeepReason::InUse), 2);

        let without_shared = Protections {
            keep_shared_digests: false,
            ..protections.clone()
        };
        let selection = select(&tags, &rules, &without_shared, now());
        assert_eq!(
            deleted(&selection),
            ["alias-old", "doomed", "same-as-latest"]
        );
    }

    #[test]
    fn digests_shared_only_among_deletions_are_deleted() {
        let twin = digest_for("twin");
        let tags = vec![
            TagInfo::new("twin-a", Some(&twin), Some(at_days_ago(100))),
            TagInfo::new("twin-b", Some(&twin), Some(at_days_ago(100))),
        ];
        let protections = Protections {
            keep_shared_digests: true,
            ..Protections::default()
        };
        let selection = select(&tags, &rules(".*", None, None, None), &protections, now());
        assert_eq!(deleted(&selection), ["twin-a", "twin-b"]);
    }

    #[test]
    fn duplicate_names_take_one_keep_n_place_and_are_never_split() {
        let tags = vec![
            tag("new", 1),
            tag("new", 1),
            tag("mid", 50),
            tag("old", 100),
            tag("old", 100),
        ];
        let selection = select(
            &tags,
            &rules(".*", None, Some(2), None),
            &Protections::default(),
            now(),
        );
        assert_eq!(selection.verdicts()[2], Verdict::Keep(KeepReason::KeepN));
        let names: Vec<&str> = selection.names_to_delete().collect();
        assert_eq!(names, ["old"]);
        assert_eq!(selection.counts().delete, 2);

        // Re-pushed between two page reads: the new image under the same name must survive.
        let repushed = vec![
            TagInfo::new("x", Some(&digest_for("new-image")), Some(at_days_ago(0))),
            TagInfo::new("x", Some(&digest_for("old-image")), Some(at_days_ago(100))),
            tag("y", 100),
        ];
        let selection = select(
            &repushed,
            &rules(".*", None, Some(1), None),
            &Protections::default(),
            now(),
        );
        assert_eq!(
            selection.verdicts()[1],
            Verdict::Keep(KeepReason::DuplicateName)
        );
        assert_eq!(selection.names_to_delete().collect::<Vec<_>>(), ["y"]);
    }

    #[test]
    fn tags_created_in_the_same_second_are_ordered_by_time_then_name() {
        let second = at_days_ago(30);
        let at = |millis: i64| Some(second + jiff::SignedDuration::from_millis(millis));
        let tags = vec![
            TagInfo::new("c", Some(&digest_for("c")), at(200)),
            TagInfo::new("d", Some(&digest_for("d")), at(-1000)),
            TagInfo::new("b", Some(&digest_for("b")), at(500)),
            TagInfo::new("a", Some(&digest_for("a")), at(200)),
        ];
        let selection = select(
            &tags,
            &rules(".*", None, Some(1), None),
            &Protections::default(),
            now(),
        );
        // "b" is the newest by half a second, whatever its name or position.
        assert_eq!(
            selection.verdict("b"),
            Some(Verdict::Keep(KeepReason::KeepN))
        );
        // Oldest first; "a" and "c" were created at the same instant: name descending.
        assert_eq!(
            selection.names_to_delete().collect::<Vec<_>>(),
            ["d", "c", "a"]
        );
    }

    #[test]
    fn invalid_protection_pattern_is_an_error() {
        let error = ProtectedTags::compile(["v(("]).unwrap_err();
        assert!(matches!(
            error,
            Error::InvalidRegex {
                field: ProtectedTags::FIELD,
                ..
            }
        ));
    }

    #[test]
    fn huge_older_than_deletes_nothing_by_age() {
        let tags = vec![tag("ancient", 3650)];
        let selection = select(
            &tags,
            &rules(".*", None, None, Some("100000y")),
            &Protections::default(),
            now(),
        );
        assert_eq!(selection.counts().delete, 0);
    }

    #[test]
    fn empty_input() {
        let selection = select(
            &[],
            &rules(".*", None, Some(3), Some("1d")),
            &Protections::default(),
            now(),
        );
        assert_eq!(selection.counts(), &SelectionCounts::default());
        assert_eq!(selection.iter().count(), 0);
    }

    fn arbitrary_tags() -> impl Strategy<Value = Vec<TagInfo>> {
        let name = prop_oneof![
            Just("latest".to_owned()),
            "[a-z]{1,3}",
            "(v|keep-|rel-)[0-9]{1,2}",
        ];
        let digest = prop_oneof![1 => Just(None), 6 => (0u8..12).prop_map(|d| Some(digest_for(&format!("d{d}"))))];
        let created = prop_oneof![1 => Just(None), 8 => (-5i64..200).prop_map(|days| Some(at_days_ago(days)))];
        proptest::collection::vec((name, digest, created), 0..40).prop_map(|entries| {
            let mut seen = HashSet::new();
            entries
                .into_iter()
                .filter(|(name, _, _)| seen.insert(name.clone()))
                .map(|(name, digest, created_at)| TagInfo {
                    name,
                    digest,
                    created_at,
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn selection_invariants(
            tags in arbitrary_tags(),
            delete in prop_oneof![Just(".*"), Just("v.*|rel-.*"), Just("[a-z]+"), Just("(?:v|keep-)[0-9]+")],
            keep in prop_oneof![Just(None), Just(Some("keep-.*")), Just(Some("v1.*|x"))],
            keep_n in proptest::option::of(0u32..6),
            older_than in proptest::option::of(prop_oneof![Just("1d"), Just("14d"), Just("30d")]),
            protected_pattern in proptest::option::of(prop_oneof![Just("^rel"), Just("a")]),
            in_use_picks in proptest::collection::vec(0usize..40, 0..4),
            keep_shared in any::<bool>(),
        ) {
            let rules = rules(delete, keep, keep_n, older_than);
            let running: Vec<(String, String)> = in_use_picks
                .iter()
                .filter_map(|&pick| tags.get(pick))
                .map(|tag| (format!("registry.example.com/p:{}", tag.name), String::new()))
                .collect();
            let index = InUseIndex::from_images(running.iter().map(|(image, id)| (image.as_str(), id.as_str())));
            let protections = Protections {
                protected_tags: ProtectedTags::compile(protected_pattern).unwrap(),
                in_use: Some(index.repository("registry.example.com/p")),
                keep_shared_digests: keep_shared,
                ..Protections::default()
            };
            let selection = select(&tags, &rules, &protections, now());

            // Exactly one verdict per tag; counters add up.
            prop_assert_eq!(selection.verdicts().len(), tags.len());
            prop_assert_eq!(selection.iter().count(), tags.len());
            let counts = selection.counts();
            prop_assert_eq!(counts.evaluated, tags.len());
            prop_assert_eq!(counts.delete + counts.kept, tags.len());
            prop_assert_eq!(counts.kept_by_reason().map(|(_, n)| n).sum::<usize>(), counts.kept);

            // Deleted and kept are disjoint; to_delete lists each deletion once.
            let deleted: HashSet<&str> = selection.names_to_delete().collect();
            prop_assert_eq!(deleted.len(), counts.delete);
            for (tag, reason) in selection.kept() {
                prop_assert!(!deleted.contains(tag.name.as_str()), "{} kept ({reason}) and deleted", tag.name);
            }

            let cutoff = older_than.map(|age| now().checked_sub(jiff::SignedDuration::from_secs(
                crate::cleanup::parse_duration(age).unwrap().as_secs() as i64)).unwrap());
            let running_names: HashSet<&str> = in_use_picks.iter().filter_map(|&pick| tags.get(pick)).map(|tag| tag.name.as_str()).collect();
            for tag in &tags {
                if !deleted.contains(tag.name.as_str()) {
                    continue;
                }
                // Never deleted: latest, in use, protected, keep-regex matches.
                prop_assert_ne!(tag.name.as_str(), LATEST);
                prop_assert!(!running_names.contains(tag.name.as_str()));
                prop_assert!(!protections.protected_tags.is_protected(&tag.name));
                prop_assert!(!rules.matches_keep(&tag.name));
                // A deleted tag matches delete, has a manifest, and is older than older_than.
                prop_assert!(rules.matches_delete(&tag.name));
                prop_assert!(tag.digest.is_some());
                if let Some(cutoff) = cutoff {
                    prop_assert!(tag.created_at.is_some_and(|created| created < cutoff));
                }
                if keep_shared {
                    let kept_digests: HashSet<&str> = selection.kept().filter_map(|(kept, _)| kept.digest.as_deref()).collect();
                    prop_assert!(!kept_digests.contains(tag.digest.as_deref().unwrap_or_default()));
                }
            }

            // The keep_n newest matching tags (with a manifest) always survive.
            if let Some(keep_n) = keep_n {
                let mut matching: Vec<&TagInfo> = tags
                    .iter()
                    .filter(|tag| tag.name != LATEST && rules.matches_delete(&tag.name) && !rules.matches_keep(&tag.name) && tag.digest.is_some())
                    .collect();
                matching.sort_by(|a, b| b.created_at.unwrap_or(now()).cmp(&a.created_at.unwrap_or(now())).then(a.name.cmp(&b.name)));
                for newest in matching.iter().take(keep_n as usize) {
                    prop_assert!(!deleted.contains(newest.name.as_str()), "{} is among the {keep_n} newest", newest.name);
                }
            }

            // The result does not depend on input order.
            let mut reversed = tags.clone();
            reversed.reverse();
            let again = select(&reversed, &rules, &protections, now());
            let again_deleted: HashSet<&str> = again.names_to_delete().collect();
            prop_assert_eq!(&deleted, &again_deleted);
            let order_a: Vec<&str> = selection.iter().map(|(tag, _)| tag.name.as_str()).collect();
            let order_b: Vec<&str> = again.iter().map(|(tag, _)| tag.name.as_str()).collect();
            prop_assert_eq!(order_a, order_b);
        }
    }

    proptest! {
        #[test]
        fn duplicate_names_are_decided_as_one(
            entries in proptest::collection::vec(
                (
                    prop_oneof![Just("latest"), Just("a"), Just("b"), Just("c"), Just("d"), Just("keep-1")],
                    prop_oneof![1 => Just(None), 4 => (0u8..4).prop_map(Some)],
                    proptest::option::of(0i64..60),
                ),
                0..16,
            ),
            keep_n in proptest::option::of(0u32..4),
            older_than in proptest::option::of(Just("14d")),
            keep_shared in any::<bool>(),
        ) {
            let tags: Vec<TagInfo> = entries
                .iter()
                .map(|(name, digest, age)| TagInfo {
                    name: (*name).to_owned(),
                    digest: digest.map(|d| digest_for(&format!("d{d}"))),
                    created_at: age.map(at_days_ago),
                })
                .collect();
            let rules = rules(".*", Some("keep-.*"), keep_n, older_than);
            let protections = Protections { keep_shared_digests: keep_shared, ..Protections::default() };
            let selection = select(&tags, &rules, &protections, now());
            let names: Vec<&str> = selection.names_to_delete().collect();
            let distinct: HashSet<&str> = names.iter().copied().collect();
            prop_assert_eq!(distinct.len(), names.len());
            for (index, tag) in tags.iter().enumerate() {
                if distinct.contains(tag.name.as_str()) {
                    prop_assert_eq!(selection.verdicts()[index], Verdict::Delete, "{} split", tag.name);
                }
            }
            if let Some(keep_n) = keep_n {
                // Newest entry per candidate name, then the keep_n first names survive.
                let mut newest: std::collections::HashMap<&str, Timestamp> = std::collections::HashMap::new();
                for tag in &tags {
                    if tag.name != LATEST && rules.matches_delete(&tag.name) && !rules.matches_keep(&tag.name) && tag.digest.is_some() {
                        let key = tag.created_at.unwrap_or(now());
                        let entry = newest.entry(tag.name.as_str()).or_insert(key);
                        *entry = (*entry).max(key);
                    }
                }
                let mut order: Vec<(&str, Timestamp)> = newest.into_iter().collect();
                order.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
                for (name, _) in order.iter().take(keep_n as usize) {
                    prop_assert!(!distinct.contains(name), "{} among the {} newest", name, keep_n);
                }
            }
        }
    }

    /// Run with `cargo test --lib cleanup::select::tests::selection_throughput -- --ignored
    /// --nocapture`. Prints tags/second; asserts nothing about time (machines are noisy, and
    /// debug builds are many times slower than release).
    #[test]
    #[ignore]
    fn selection_throughput() {
        let count = 1_000_000usize;
        let tags: Vec<TagInfo> = (0..count)
            .map(|i| {
                let name = if i % 10 == 0 {
                    format!("release-{i}")
                } else {
                    format!("{i:040x}")
                };
                TagInfo {
                    name,
                    digest: Some(format!("sha256:{:064x}", i / 2)),
                    created_at: Some(
                        now()
                            .checked_sub(jiff::SignedDuration::from_secs(
                                (i as i64 * 7919) % 50_000_000,
                            ))
                            .unwrap(),
                    ),
                }
            })
            .collect();
        let rules = rules("[0-9a-f]{40}", Some("release-.*"), Some(10), Some("14d"));
        let protections = Protections {
            keep_shared_digests: true,
            ..Protections::default()
        };
        let mut by_name = tags.clone();
        by_name.sort_by(|a, b| a.name.cmp(&b.name));
        // GitLab lists tags sorted by name; unsorted input costs one more hash pass.
        for (label, input) in [("unsorted", &tags), ("sorted by name", &by_name)] {
            let started = std::time::Instant::now();
            let selection = select(input, &rules, &protections, now());
            let elapsed = started.elapsed();
            let per_second = count as f64 / elapsed.as_secs_f64();
            println!(
                "selection_throughput ({label}): {count} tags in {elapsed:?} = {per_second:.0} \
                 tags/second (delete {}, kept {})",
                selection.counts().delete,
                selection.counts().kept
            );
            assert_eq!(selection.counts().evaluated, count);
        }
    }

    fn project_rules(
        delete: &str,
        keep_n: Option<u32>,
        older_than: Option<&str>,
        family: Option<(&str, u32)>,
        branch_tags: Option<&str>,
    ) -> CompiledRules {
        CompiledRules::compile(&RuleSpec {
            name_regex_delete: Some(delete.into()),
            keep_n,
            older_than: older_than.map(Into::into),
            keep_n_per_family: family.map(|(pattern, n)| crate::cleanup::FamilySpec {
                pattern: pattern.into(),
                n,
            }),
            keep_branch_tags: branch_tags.map(Into::into),
            ..RuleSpec::default()
        })
        .unwrap()
    }

    const BUILD: &str = "(.+)-[0-9a-f]{8}";

    #[test]
    fn keep_n_per_family_keeps_the_newest_of_every_family() {
        let tags = vec![
            tag("main-00000001", 30),
            tag("main-00000002", 20),
            tag("main-00000003", 10),
            tag("feature-x-0000000a", 40),
            tag("feature-x-0000000b", 35),
            tag("feature-x-0000000c", 33),
            tag("v1.0.0", 50),
        ];
        let selection = select(
            &tags,
            &project_rules(".*", None, None, Some((BUILD, 2)), None),
            &Protections::default(),
            now(),
        );
        assert_eq!(
            deleted(&selection),
            ["feature-x-0000000a", "main-00000001", "v1.0.0"]
        );
        assert_eq!(
            selection.verdict("main-00000003"),
            Some(Verdict::Keep(KeepReason::KeepNPerFamily))
        );
        assert_eq!(selection.counts().kept_by(KeepReason::KeepNPerFamily), 4);

        // A tag another rule keeps still takes one of its family's places.
        let with_keep_n = select(
            &tags,
            &project_rules(".*", Some(1), None, Some((BUILD, 2)), None),
            &Protections::default(),
            now(),
        );
        assert_eq!(
            with_keep_n.verdict("main-00000003"),
            Some(Verdict::Keep(KeepReason::KeepN))
        );
        assert_eq!(
            deleted(&with_keep_n),
            ["feature-x-0000000a", "main-00000001", "v1.0.0"]
        );
        assert!(with_keep_n.explain(0).is_some());
    }

    #[test]
    fn keep_branch_tags_keeps_builds_of_existing_branches_only() {
        let tags = vec![
            tag("main-00000001", 30),
            tag("feature-login-form-00000002", 30),
            tag("feature-gone-00000003", 30),
            tag("release", 30),
        ];
        let rules = project_rules(".*", None, None, None, Some(BUILD));
        let branches = ProjectBranches::from_names(["main", "feature/Login-Form"]);
        let selection = select(
            &tags,
            &rules,
            &Protections {
                branches: Some(&branches),
                ..Protections::default()
            },
            now(),
        );
        assert_eq!(deleted(&selection), ["feature-gone-00000003", "release"]);
        assert_eq!(
            selection.verdict("feature-login-form-00000002"),
            Some(Verdict::Keep(KeepReason::BranchExists))
        );
        // Unknown branches: every captured tag is kept.
        let unknown = select(&tags, &rules, &Protections::default(), now());
        assert_eq!(deleted(&unknown), ["release"]);
    }

    fn build_tags() -> impl Strategy<Value = Vec<TagInfo>> {
        let name = prop_oneof![
            3 => (
                prop_oneof![Just("main"), Just("feature-login-form"), Just("fix"), Just("Main"), Just("a-b")],
                0u32..6,
            )
                .prop_map(|(branch, build)| format!("{branch}-{:08x}", build * 0x1111)),
            1 => Just("latest".to_owned()),
            1 => "(v|rel-)[0-9]{1,2}",
        ];
        let digest = prop_oneof![1 => Just(None), 6 => (0u8..10).prop_map(|d| Some(digest_for(&format!("d{d}"))))];
        let created =
            prop_oneof![1 => Just(None), 8 => (-5i64..60).prop_map(|days| Some(at_days_ago(days)))];
        proptest::collection::vec((name, digest, created), 0..30).prop_map(|entries| {
            entries
                .into_iter()
                .map(|(name, digest, created_at)| TagInfo {
                    name,
                    digest,
                    created_at,
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn operator_rules_only_ever_keep_more_than_gitlabs(
            tags in build_tags(),
            delete in prop_oneof![Just(".*"), Just("[a-z-]+-[0-9a-f]{8}"), Just("(?:v|rel-)[0-9]+|main-.*")],
            keep_n in proptest::option::of(0u32..4),
            older_than in proptest::option::of(prop_oneof![Just("1d"), Just("14d")]),
            family_n in proptest::option::of(1u32..4),
            family_pattern in prop_oneof![Just(BUILD), Just("([a-z]+).*"), Just("(main)-.*|(?:fix)-.*")],
            branch_pattern in proptest::option::of(prop_oneof![Just(BUILD), Just("(.*)")]),
            branch_names in proptest::collection::vec(prop_oneof![Just("main"), Just("feature/Login-Form"), Just("fix"), Just("A_B")], 0..3),
            branches_known in any::<bool>(),
            keep_shared in any::<bool>(),
        ) {
            let gitlab_only = project_rules(delete, keep_n, older_than, None, None);
            let family = family_n.map(|n| (family_pattern, n));
            let with_operator_rules = project_rules(delete, keep_n, older_than, family, branch_pattern);
            let branches = ProjectBranches::from_names(&branch_names);
            let protections = Protections {
                keep_shared_digests: keep_shared,
                branches: branches_known.then_some(&branches),
                ..Protections::default()
            };
            let before = select(&tags, &gitlab_only, &protections, now());
            let after = select(&tags, &with_operator_rules, &protections, now());
            let deleted_before: HashSet<&str> = before.names_to_delete().collect();
            let deleted_after: HashSet<&str> = after.names_to_delete().collect();
            prop_assert!(
                deleted_after.is_subset(&deleted_before),
                "the operator's rules deleted {:?}",
                deleted_after.difference(&deleted_before).collect::<Vec<_>>()
            );
            prop_assert_eq!(after.counts().delete + after.counts().kept, tags.len());

            // The n newest of every family (with a manifest) survive.
            if let Some((pattern, n)) = family {
                let pattern = crate::cleanup::CapturePattern::compile("f", pattern).unwrap();
                let mut families: HashMap<&str, Vec<&TagInfo>> = HashMap::new();
                for tag in tags.iter().filter(|tag| tag.digest.is_some()) {
                    if let Some(captured) = pattern.captured(&tag.name) {
                        families.entry(captured).or_default().push(tag);
                    }
                }
                for members in families.values_mut() {
                    members.sort_by(|a, b| b.created_at.unwrap_or(now()).cmp(&a.created_at.unwrap_or(now())).then(a.name.cmp(&b.name)));
                    let mut names: Vec<&str> = members.iter().map(|tag| tag.name.as_str()).collect();
                    names.dedup();
                    for newest in names.iter().take(n as usize) {
                        prop_assert!(!deleted_after.contains(newest), "{newest} is among its family's {n} newest");
                    }
                }
            }
            // A build of an existing branch (or of any branch, while they are unknown) survives.
            if let Some(pattern) = branch_pattern {
                let pattern = crate::cleanup::CapturePattern::compile("b", pattern).unwrap();
                for tag in &tags {
                    let keeps = pattern.captured_in_each_reading(&tag.name).any(|text| !branches_known || branches.has_slug(text));
                    if keeps {
                        prop_assert!(!deleted_after.contains(tag.name.as_str()), "{} is a build of a branch", tag.name);
                    }
                }
            }
        }
    }
}
