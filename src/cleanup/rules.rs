//! A cleanup's tag rules, compiled once: GitLab's `name_regex_delete`, `name_regex_keep`,
//! `keep_n` and `older_than` (this operator's `rules.nameRegexDelete`, `rules.nameRegexKeep`,
//! `rules.keepN`, `rules.olderThan`).
//!
//! Regexes are RE2 syntax (the `regex` crate accepts the same language for everything a tag
//! name needs) and are implicitly anchored, as GitLab documents.
//!
//! GitLab anchors by plain text concatenation, `\A` + pattern + `\z`, so a pattern with a
//! top-level `|` such as `main|stable-.*` reads, in GitLab, as "starts with `main`" or "ends
//! with `stable-…`" — which is why GitLab's own examples wrap alternatives in `(?:…)`. To never
//! delete more than either reading would, this module:
//! - deletes only names that match the delete pattern as a whole, `\A(?:pattern)\z`, which
//!   never matches more than GitLab's reading;
//! - keeps names that match the keep pattern in *either* reading.
//!
//! Where the readings can differ, [`CompiledRules::notes`] says so, for status and events.

use std::time::Duration;

use regex::Regex;

use super::duration::{format_duration, parse_duration};
use super::{Error, Result};

/// Spec field names, as users write them in a `CleanupPolicy`.
pub const FIELD_NAME_REGEX_DELETE: &str = "rules.nameRegexDelete";
pub const FIELD_NAME_REGEX_KEEP: &str = "rules.nameRegexKeep";
pub const FIELD_OLDER_THAN: &str = "rules.olderThan";
pub const FIELD_KEEP_N_PER_FAMILY_PATTERN: &str = "rules.keepNPerFamily.pattern";
pub const FIELD_KEEP_N_PER_FAMILY_N: &str = "rules.keepNPerFamily.n";
pub const FIELD_KEEP_BRANCH_TAGS_PATTERN: &str = "safety.keepBranchTags.pattern";

/// `rules.keepNPerFamily`: tags grouped by the text the pattern's one capture group captures;
/// the `n` newest of every group are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilySpec {
    /// RE2 with exactly one capture group, anchored like the other regexes.
    pub pattern: String,
    /// At least 1.
    pub n: u32,
}

/// The rules as written (GitLab's names and shapes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleSpec {
    /// Tags to expire; required and non-blank (GitLab: "This value cannot be blank").
    pub name_regex_delete: Option<String>,
    /// Tags to preserve; overrides the delete regex. Blank means none.
    pub name_regex_keep: Option<String>,
    /// How many of the newest matching tags to always keep.
    pub keep_n: Option<u32>,
    /// Delete only tags older than this human duration (`14d`, `1month`).
    pub older_than: Option<String>,
    /// The operator's own rule, after GitLab's: keep the `n` newest of every family.
    pub keep_n_per_family: Option<FamilySpec>,
    /// The operator's own protection (`safety.keepBranchTags.pattern`): keep a tag whose
    /// captured text is the `CI_COMMIT_REF_SLUG` of an existing branch of its project.
    pub keep_branch_tags: Option<String>,
}

/// A regex anchored at both ends, in the whole-pattern reading and, where it can differ, in
/// GitLab's textual reading.
#[derive(Debug, Clone)]
struct AnchoredPattern {
    source: String,
    /// `\A(?:source)\z`.
    whole: Regex,
    /// `\A` + source + `\z`, only when it may mean something else than `whole`.
    textual: Option<Regex>,
}

impl AnchoredPattern {
    fn compile(field: &'static str, source: &str) -> Result<Self> {
        let invalid = |error: regex::Error| Error::InvalidRegex {
            field,
            pattern: source.to_owned(),
            message: error.to_string(),
        };
        // The pattern must be valid on its own: wrapping could otherwise "repair" input such
        // as `a)|(b` into something GitLab rejects.
        Regex::new(source).map_err(invalid)?;
        let whole = Regex::new(&format!(r"\A(?:{source})\z")).map_err(invalid)?;
        let textual = if readings_may_differ(source) {
            Some(Regex::new(&format!(r"\A{source}\z")).map_err(invalid)?)
        } else {
            None
        };
        Ok(Self {
            source: source.to_owned(),
            whole,
            textual,
        })
    }

    /// Matches in the whole-pattern reading (and, when it differs, also in GitLab's): the
    /// narrowest reading, used for deleting.
    fn matches_narrowly(&self, name: &str) -> bool {
        self.whole.is_match(name)
            && self
                .textual
                .as_ref()
                .is_none_or(|textual| textual.is_match(name))
    }

    /// Matches in either reading: the widest, used for keeping.
    fn matches_widely(&self, name: &str) -> bool {
        self.whole.is_match(name)
            || self
                .textual
                .as_ref()
                .is_some_and(|textual| textual.is_match(name))
    }
}

/// A pattern with exactly one capture group, anchored like the others, that yields the text
/// the group captures.
#[derive(Debug, Clone)]
pub struct CapturePattern {
    pattern: AnchoredPattern,
}

impl CapturePattern {
    /// Compiles `source`; a pattern without exactly one capture group (named or not) is
    /// [`Error::InvalidCaptureGroups`].
    pub fn compile(field: &'static str, source: &str) -> Result<Self> {
        let pattern = AnchoredPattern::compile(field, source)?;
        // `captures_len` counts the implicit group 0 of the whole match.
        let groups = pattern.whole.captures_len() - 1;
        if groups != 1 {
            return Err(Error::InvalidCaptureGroups {
                field,
                pattern: source.to_owned(),
                groups,
            });
        }
        Ok(Self { pattern })
    }

    pub fn source(&self) -> &str {
        &self.pattern.source
    }

    /// The captured text in the whole-pattern reading, else in GitLab's textual reading
    /// (where it differs): a name either reading matches belongs to a family, which can only
    /// keep more. `None` when the name does not match or the group took no part.
    pub fn captured<'h>(&self, name: &'h str) -> Option<&'h str> {
        self.captured_in_each_reading(name).next()
    }

    /// The captured text in every reading that matches.
    pub fn captured_in_each_reading<'h>(&self, name: &'h str) -> impl Iterator<Item = &'h str> {
        std::iter::once(&self.pattern.whole)
            .chain(self.pattern.textual.as_ref())
            .filter_map(move |regex| Some(regex.captures(name)?.get(1)?.as_str()))
    }
}

/// `rules.keepNPerFamily`, compiled.
#[derive(Debug, Clone)]
pub struct FamilyRule {
    pub pattern: CapturePattern,
    pub n: u32,
}

/// Only a `|` outside any group, or a `#` comment in extended mode, makes textual anchoring
/// differ from anchoring the whole pattern; both need the characters `|` or `#`. (A cheap,
/// safe test: when in doubt both readings are compiled and consulted.)
fn readings_may_differ(source: &str) -> bool {
    source.contains('|') || source.contains('#')
}

/// Whether the pattern has a `|` outside every group and character class, i.e. whether GitLab's
/// textual anchoring really reads it differently. Used for [`CompiledRules::notes`] only.
fn has_top_level_alternation(source: &str) -> bool {
    let mut chars = source.chars().peekable();
    let mut depth = 0usize;
    while let Some(character) = chars.next() {
        match character {
            '\\' => {
                chars.next();
            }
            '[' => skip_class(&mut chars),
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            '|' if depth == 0 => return true,
            _ => {}
        }
    }
    false
}

/// Skips the rest of a character class whose `[` was just read (nested classes and
/// `[:alpha:]` included, as the `regex` crate reads them).
fn skip_class(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) {
    if chars.peek() == Some(&'^') {
        chars.next();
    }
    if chars.peek() == Some(&']') {
        chars.next();
    }
    while let Some(character) = chars.next() {
        match character {
            '\\' => {
                chars.next();
            }
            '[' if chars.peek() == Some(&':') => {
                while let Some(inner) = chars.next() {
                    if inner == ':' && chars.peek() == Some(&']') {
                        chars.next();
                        break;
                    }
                }
            }
            '[' => skip_class(chars),
            ']' => return,
            _ => {}
        }
    }
}

/// Rules ready to evaluate, many times and fast.
#[derive(Debug, Clone)]
pub struct CompiledRules {
    delete: AnchoredPattern,
    keep: Option<AnchoredPattern>,
    keep_n: Option<u32>,
    older_than: Option<Duration>,
    family: Option<FamilyRule>,
    branch_tags: Option<CapturePattern>,
    notes: Vec<String>,
}

impl CompiledRules {
    /// Compiles and validates: an invalid regex is [`Error::InvalidRegex`] carrying the
    /// engine's message, a missing or blank delete regex is [`Error::MissingField`] (a
    /// cleanup without one would delete nothing, which is never what was meant), an invalid
    /// `older_than` is [`Error::InvalidDuration`]. All have reason `InvalidSpec`.
    pub fn compile(spec: &RuleSpec) -> Result<Self> {
        let delete_source = spec
            .name_regex_delete
            .as_deref()
            .filter(|source| !source.is_empty())
            .ok_or(Error::MissingField {
                field: FIELD_NAME_REGEX_DELETE,
                message: "GitLab requires a non-blank regex of the tags to delete; use .* for all tags",
            })?;
        let delete = AnchoredPattern::compile(FIELD_NAME_REGEX_DELETE, delete_source)?;
        // GitLab anchors a blank keep regex to `\A\z`, which no tag name matches.
        let keep = match spec.name_regex_keep.as_deref() {
            Some(source) if !source.is_empty() => {
                Some(AnchoredPattern::compile(FIELD_NAME_REGEX_KEEP, source)?)
            }
            _ => None,
        };
        let older_than = spec
            .older_than
            .as_deref()
            .map(|text| parse_duration(text).map_err(|error| error.in_field(FIELD_OLDER_THAN)))
            .transpose()?;

        let family = spec
            .keep_n_per_family
            .as_ref()
            .map(|family| {
                if family.n == 0 {
                    return Err(Error::OutOfRange {
                        field: FIELD_KEEP_N_PER_FAMILY_N,
                        message: "must be at least 1",
                    });
                }
                Ok(FamilyRule {
                    pattern: CapturePattern::compile(
                        FIELD_KEEP_N_PER_FAMILY_PATTERN,
                        &family.pattern,
                    )?,
                    n: family.n,
                })
            })
            .transpose()?;
        let branch_tags = spec
            .keep_branch_tags
            .as_deref()
            .map(|source| CapturePattern::compile(FIELD_KEEP_BRANCH_TAGS_PATTERN, source))
            .transpose()?;

        let mut notes = Vec::new();
        if has_top_level_alternation(delete_source) {
            notes.push(format!(
                "{FIELD_NAME_REGEX_DELETE} {delete_source:?} contains '|': GitLab would anchor it \
                 as \\A{delete_source}\\z (also matching names that only start with the first \
                 alternative or end with the last); the operator deletes only names matching the \
                 whole pattern, as if written (?:{delete_source})"
            ));
        }
        if let Some(keep) = &keep
            && has_top_level_alternation(&keep.source)
        {
            let source = &keep.source;
            notes.push(format!(
                "{FIELD_NAME_REGEX_KEEP} {source:?} contains '|': GitLab anchors it as \
                 \\A{source}\\z, which also keeps names that only start with the first \
                 alternative or end with the last; the operator keeps names matching either \
                 reading. Write (?:{source}) to keep only whole-name matches"
            ));
        }
        Ok(Self {
            delete,
            keep,
            keep_n: spec.keep_n,
            older_than,
            family,
            branch_tags,
            notes,
        })
    }

    /// Whether a tag name is one the delete regex selects (whole-name match).
    pub fn matches_delete(&self, name: &str) -> bool {
        self.delete.matches_narrowly(name)
    }

    /// Whether a tag name is one the keep regex preserves (in either anchoring reading).
    pub fn matches_keep(&self, name: &str) -> bool {
        self.keep
            .as_ref()
            .is_some_and(|keep| keep.matches_widely(name))
    }

    pub fn name_regex_delete(&self) -> &str {
        &self.delete.source
    }

    pub fn name_regex_keep(&self) -> Option<&str> {
        self.keep.as_ref().map(|keep| keep.source.as_str())
    }

    pub fn keep_n(&self) -> Option<u32> {
        self.keep_n
    }

    pub fn older_than(&self) -> Option<Duration> {
        self.older_than
    }

    /// `rules.keepNPerFamily`, when set.
    pub fn family(&self) -> Option<&FamilyRule> {
        self.family.as_ref()
    }

    /// `safety.keepBranchTags.pattern`, when set: the run must read the project's branches.
    pub fn branch_tags(&self) -> Option<&CapturePattern> {
        self.branch_tags.as_ref()
    }

    /// Human-readable remarks about how the rules are read where GitLab's reading is
    /// ambiguous; empty for ordinary rules. Worth surfacing in status or an event.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// One line describing the rules, e.g. for an event: `delete ".*" keep "stable-.*"
    /// keepN 5 olderThan 14d`.
    pub fn summary(&self) -> String {
        let mut summary = format!("delete {:?}", self.delete.source);
        if let Some(keep) = &self.keep {
            summary.push_str(&format!(" keep {:?}", keep.source));
        }
        if let Some(keep_n) = self.keep_n {
            summary.push_str(&format!(" keepN {keep_n}"));
        }
        if let Some(older_than) = self.older_than {
            summary.push_str(&format!(" olderThan {}", format_duration(older_than)));
        }
        if let Some(family) = &self.family {
            summary.push_str(&format!(
                " keepNPerFamily {} of {:?}",
                family.n,
                family.pattern.source()
            ));
        }
        if let Some(branch_tags) = &self.branch_tags {
            summary.push_str(&format!(" keepBranchTags {:?}", branch_tags.source()));
        }
        summary
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(delete: &str) -> RuleSpec {
        RuleSpec {
            name_regex_delete: Some(delete.to_owned()),
            ..RuleSpec::default()
        }
    }

    fn rules_deleting(delete: &str) -> CompiledRules {
        CompiledRules::compile(&spec(delete)).unwrap()
    }

    #[test]
    fn user_guide_regex_pattern_examples() {
        // "Match all tags" (the default expiration regex).
        let all = rules_deleting(".*");
        for name in ["", "v1", "master", "release-1", "anything.goes_here"] {
            assert!(all.matches_delete(name), "{name}");
        }
        // "Match tags that start with v".
        let v = rules_deleting("v.+");
        assert!(v.matches_delete("v1.2.3"));
        assert!(!v.matches_delete("v"));
        assert!(!v.matches_delete("dev1"));
        // "Match only the tag named master".
        let master = rules_deleting("master");
        assert!(master.matches_delete("master"));
        assert!(!master.matches_delete("master-2"));
        assert!(!master.matches_delete("old-master"));
        // "Match tags that are either named or start with release".
        let release = rules_deleting("release.*");
        assert!(release.matches_delete("release"));
        assert!(release.matches_delete("release-1.0"));
        assert!(!release.matches_delete("prerelease"));
        // "Match tags that either start with v, are named master, or begin with release".
        let combined = rules_deleting("(?:v.+|master|release.*)");
        for name in ["v2", "master", "release", "release-3"] {
            assert!(combined.matches_delete(name), "{name}");
        }
        for name in ["main", "master-1", "old-release", "v"] {
            assert!(!combined.matches_delete(name), "{name}");
        }
        assert!(combined.notes().is_empty(), "{:?}", combined.notes());
    }

    #[test]
    fn patterns_are_anchored_even_with_anchors_written() {
        let rules = rules_deleting("[0-9a-z]{40}");
        assert!(rules.matches_delete(&"a".repeat(40)));
        assert!(!rules.matches_delete(&"a".repeat(41)));
        assert!(!rules.matches_delete(&format!("x-{}", "a".repeat(40))));
        let anchored = rules_deleting("^v1$");
        assert!(anchored.matches_delete("v1"));
        assert!(!anchored.matches_delete("v12"));
    }

    #[test]
    fn top_level_alternation_deletes_narrowly_and_keeps_widely() {
        let rules = CompiledRules::compile(&RuleSpec {
            name_regex_delete: Some("v.+|master".into()),
            name_regex_keep: Some("main|stable-.*".into()),
            ..RuleSpec::default()
        })
        .unwrap();
        // GitLab would also delete "foo-master" (ends with master): we do not.
        assert!(rules.matches_delete("master"));
        assert!(rules.matches_delete("v1"));
        assert!(!rules.matches_delete("foo-master"));
        assert!(!rules.matches_delete("xv1"));
        // GitLab keeps "main-123" (starts with main) and "x-stable-1" (ends with stable-…).
        assert!(rules.matches_keep("main"));
        assert!(rules.matches_keep("stable-2"));
        assert!(rules.matches_keep("main-123"));
        assert!(rules.matches_keep("x-stable-1"));
        assert!(!rules.matches_keep("feature-1"));
        assert_eq!(rules.notes().len(), 2, "{:?}", rules.notes());
    }

    #[test]
    fn top_level_alternation_detection() {
        for source in ["a|b", "(a)|b", r"\(|x", "[|]|x", "[]|]|y", "[[:alpha:]]|z"] {
            assert!(has_top_level_alternation(source), "{source}");
        }
        for source in [
            "(?:a|b)",
            r"a\|b",
            "[|]",
            "[a[|]]",
            "[[:alpha:]|]",
            "x(y|z)w",
            ".*",
        ] {
            assert!(!has_top_level_alternation(source), "{source}");
        }
    }

    #[test]
    fn invalid_regex_carries_the_engine_message_and_field() {
        let error = CompiledRules::compile(&spec("v(1")).unwrap_err();
        match &error {
            Error::InvalidRegex {
                field,
                pattern,
                message,
            } => {
                assert_eq!(*field, FIELD_NAME_REGEX_DELETE);
                assert_eq!(pattern, "v(1");
                assert!(message.contains("unclosed group"), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(error.reason(), "InvalidSpec");

        let keep = CompiledRules::compile(&RuleSpec {
            name_regex_keep: Some("[z-a]".into()),
            ..spec(".*")
        })
        .unwrap_err();
        assert!(matches!(
            keep,
            Error::InvalidRegex {
                field: FIELD_NAME_REGEX_KEEP,
                ..
            }
        ));

        // Unbalanced on its own but balanced once wrapped: still rejected.
        let sneaky = CompiledRules::compile(&spec("a)|(b")).unwrap_err();
        assert!(matches!(sneaky, Error::InvalidRegex { .. }), "{sneaky:?}");
    }

    #[test]
    fn missing_or_blank_delete_regex_is_invalid_spec() {
        for delete in [None, Some(String::new())] {
            let error = CompiledRules::compile(&RuleSpec {
                name_regex_delete: delete,
                ..RuleSpec::default()
            })
            .unwrap_err();
            assert!(matches!(
                error,
                Error::MissingField {
                    field: FIELD_NAME_REGEX_DELETE,
                    ..
                }
            ));
            assert_eq!(error.reason(), "InvalidSpec");
        }
    }

    #[test]
    fn older_than_errors_name_the_field() {
        let error = CompiledRules::compile(&RuleSpec {
            older_than: Some("two weeks".into()),
            ..spec(".*")
        })
        .unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("rules.olderThan: invalid duration \"two weeks\""),
            "{error}"
        );
    }

    #[test]
    fn blank_keep_regex_keeps_nothing_and_summary_reads_well() {
        let rules = CompiledRules::compile(&RuleSpec {
            name_regex_keep: Some(String::new()),
            keep_n: Some(5),
            older_than: Some("1month".into()),
            ..spec(".*")
        })
        .unwrap();
        assert!(!rules.matches_keep("anything"));
        assert_eq!(rules.name_regex_keep(), None);
        assert_eq!(rules.summary(), "delete \".*\" keepN 5 olderThan 30d");
        assert!(rules.notes().is_empty());
    }

    #[test]
    fn capture_patterns_need_exactly_one_group_and_are_anchored() {
        for (pattern, groups) in [("[a-z]+-[0-9a-f]{8}", 0), ("(a)(b)", 2), ("(?P<x>a)(b)", 2)] {
            let error = CompiledRules::compile(&RuleSpec {
                keep_n_per_family: Some(FamilySpec {
                    pattern: pattern.into(),
                    n: 2,
                }),
                ..spec(".*")
            })
            .unwrap_err();
            assert_eq!(
                error,
                Error::InvalidCaptureGroups {
                    field: FIELD_KEEP_N_PER_FAMILY_PATTERN,
                    pattern: pattern.into(),
                    groups,
                }
            );
            assert_eq!(error.reason(), "InvalidSpec");
        }
        let error = CompiledRules::compile(&RuleSpec {
            keep_branch_tags: Some("(?:a)b".into()),
            ..spec(".*")
        })
        .unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with(FIELD_KEEP_BRANCH_TAGS_PATTERN),
            "{error}"
        );
        let zero = CompiledRules::compile(&RuleSpec {
            keep_n_per_family: Some(FamilySpec {
                pattern: "(.+)".into(),
                n: 0,
            }),
            ..spec(".*")
        })
        .unwrap_err();
        assert!(
            zero.to_string().starts_with(FIELD_KEEP_N_PER_FAMILY_N),
            "{zero}"
        );

        let rules = CompiledRules::compile(&RuleSpec {
            keep_n_per_family: Some(FamilySpec {
                pattern: "(.+)-[0-9a-f]{8}".into(),
                n: 2,
            }),
            keep_branch_tags: Some("(?P<branch>.+)-[0-9a-f]{8}".into()),
            ..spec(".*")
        })
        .unwrap();
        let family = rules.family().unwrap();
        assert_eq!(family.pattern.captured("main-0123abcd"), Some("main"));
        assert_eq!(family.pattern.captured("x-main-0123abcd"), Some("x-main"));
        assert_eq!(family.pattern.captured("main-0123abcd-x"), None);
        assert_eq!(
            rules
                .branch_tags()
                .unwrap()
                .captured("feature-login-form-deadbeef"),
            Some("feature-login-form")
        );
        assert!(
            rules.summary().contains("keepNPerFamily 2 of"),
            "{}",
            rules.summary()
        );
    }

    #[test]
    fn a_capture_pattern_with_alternation_captures_in_either_reading() {
        let pattern = CapturePattern::compile("f", "(a)|b.*").unwrap();
        // Whole reading: "a" or "b…"; GitLab's textual reading also "a…".
        assert_eq!(pattern.captured("a"), Some("a"));
        assert_eq!(pattern.captured("abc"), Some("a"));
        assert_eq!(pattern.captured("bcd"), None);
    }
}
