//! The access policy: rules of namespaces and the groups and projects their objects may reach
//! through the operator's own GitLab connection. Group and project paths compare
//! case-insensitively, as GitLab resolves them. A numeric id in a spec cannot be matched
//! against a path without asking GitLab, so it is permitted only by a rule that lists that
//! id (or by a pattern that allows everything): the safe side.

use crate::crd::reasons::Reason;
use std::fmt;

use serde::Deserialize;

use crate::gitlab::PathOrId;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A policy file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("access policy {source_name}: {message}")]
    Invalid {
        source_name: String,
        message: String,
    },
    #[error("access policy {source_name}: cannot read: {message}")]
    Unreadable {
        source_name: String,
        message: String,
    },
}

impl Error {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Invalid { .. } => Reason::InvalidAccessPolicy.as_str(),
            Self::Unreadable { .. } => Reason::AccessPolicyUnreadable.as_str(),
        }
    }
}

/// The parsed policy, as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    rules: Vec<Rule>,
}

/// One rule: the objects of these namespaces may use these groups and projects.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Namespace names, exactly, or `*` for every namespace.
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Groups (top-level, subgroups included) for VirtualRegistry, Upstream and group
    /// cleanups; `*` for every group; a numeric id permits exactly that id.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Globs over project full paths for cleanup targets (a project, a GitLab cleanup policy,
    /// and every project a group cleanup expands to): `*` within one path segment, `**` any
    /// number of segments; a numeric id permits exactly that id.
    #[serde(default)]
    pub projects: Vec<String>,
}

/// What an object asks to reach through the operator's connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A group a registry or upstream lives in (an upstream cache cleanup: its Upstream's).
    Group(PathOrId),
    /// A project whose repositories are cleaned, or whose GitLab cleanup policy is set.
    Project(PathOrId),
    /// Every project of a group (a group cleanup).
    GroupProjects(PathOrId),
}

impl fmt::Display for Target {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Group(group) => write!(formatter, "group {group}"),
            Self::Project(project) => write!(formatter, "project {project}"),
            Self::GroupProjects(group) => write!(formatter, "the projects of group {group}"),
        }
    }
}

/// A refusal: which namespace asked for what, under which policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "namespace {namespace} may not use the operator's GitLab connection for {target}: no rule of the access policy {policy} allows it (set spec.gitlab with a token of your own, or ask for a rule)"
)]
pub struct Denial {
    pub namespace: String,
    pub target: Target,
    /// Where the policy came from (its file).
    pub policy: String,
}

/// The rules, with the name of their source for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessPolicy {
    source_name: String,
    rules: Vec<Rule>,
}

impl AccessPolicy {
    /// Parses a policy file's YAML; `source_name` (the file) appears in errors and denials.
    pub fn parse(source_name: &str, text: &str) -> Result<Self> {
        let invalid = |message: String| Error::Invalid {
            source_name: source_name.to_owned(),
            message,
        };
        let file: PolicyFile = if text.trim().is_empty() {
            PolicyFile { rules: Vec::new() }
        } else {
            serde_saphyr::from_str(text).map_err(|error| invalid(error.to_string()))?
        };
        for (index, rule) in file.rules.iter().enumerate() {
            let empty = |list: &[String]| list.iter().any(|entry| entry.trim().is_empty());
            if empty(&rule.namespaces) || empty(&rule.groups) || empty(&rule.projects) {
                return Err(invalid(format!("rules[{index}]: an entry is empty")));
            }
            if let Some(glob) = rule.projects.iter().find(|glob| glob.contains("***")) {
                return Err(invalid(format!(
                    "rules[{index}].projects: {glob:?}: use * within a segment or ** for segments"
                )));
            }
        }
        Ok(Self {
            source_name: source_name.to_owned(),
            rules: file.rules,
        })
    }

    /// The policy's source, as messages name it.
    pub fn source_name(&self) -> &str {
        &self.source_name
    }

    /// Whether objects of `namespace` may reach `target`.
    pub fn permits(&self, namespace: &str, target: &Target) -> bool {
        self.rules
            .iter()
            .filter(|rule| {
                rule.namespaces
                    .iter()
                    .any(|entry| entry == "*" || entry == namespace)
            })
            .any(|rule| rule_permits(rule, target))
    }

    /// [`Self::permits`] for every target, or the first refusal.
    pub fn check<'a>(
        &self,
        namespace: &str,
        targets: impl IntoIterator<Item = &'a Target>,
    ) -> Result<(), Denial> {
        match targets
            .into_iter()
            .find(|target| !self.permits(namespace, target))
        {
            None => Ok(()),
            Some(target) => Err(Denial {
                namespace: namespace.to_owned(),
                target: target.clone(),
                policy: self.source_name.clone(),
            }),
        }
    }
}

/// The full path of the project a container repository belongs to: its `path` without the
/// trailing `/<name>` (the project's own repository has an empty name and the project's
/// path). INFERRED from the API examples (`group/project`, `group/project/releases`).
pub fn project_of_repository<'a>(path: &'a str, name: &str) -> &'a str {
    if name.is_empty() {
        return path;
    }
    path.strip_suffix(name)
        .and_then(|rest| rest.strip_suffix('/'))
        .unwrap_or(path)
}

impl AccessPolicy {
    /// For a group cleanup, at run time: every project the group expands to (the projects of
    /// its repositories, `(path, name)`) must be one `namespace` may clean.
    pub fn check_expansion<'a>(
        &self,
        namespace: &str,
        repositories: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<(), Denial> {
        let projects: Vec<Target> = repositories
            .into_iter()
            .map(|(path, name)| {
                Target::Project(PathOrId::Path(project_of_repository(path, name).into()))
            })
            .collect();
        self.check(namespace, &projects)
    }
}

fn rule_permits(rule: &Rule, target: &Target) -> bool {
    match target {
        Target::Group(group) => rule
            .groups
            .iter()
            .any(|entry| group_entry_permits(entry, group)),
        Target::Project(project) => rule
            .projects
            .iter()
            .any(|glob| project_glob_permits(glob, project)),
        Target::GroupProjects(group) => {
            rule.groups
                .iter()
                .any(|entry| group_entry_permits(entry, group))
                || rule
                    .projects
                    .iter()
                    .any(|glob| glob_covers_group(glob, group))
        }
    }
}

/// A `groups` entry permits the group itself and its subgroups.
fn group_entry_permits(entry: &str, group: &PathOrId) -> bool {
    let entry = entry.trim().trim_matches('/');
    if entry == "*" {
        return true;
    }
    match group {
        PathOrId::Id(id) => entry == id.to_string(),
        PathOrId::Path(path) => {
            let (entry, path) = (entry.to_lowercase(), path.to_lowercase());
            path == entry || path.starts_with(&format!("{entry}/"))
        }
    }
}

fn project_glob_permits(glob: &str, project: &PathOrId) -> bool {
    let glob = glob.trim().trim_matches('/');
    match project {
        PathOrId::Id(id) => glob == id.to_string() || glob == "**",
        PathOrId::Path(path) => glob_matches(glob, path),
    }
}

/// Whether every project under `group` matches `glob`: the glob is `<prefix>/**` (or `**`)
/// and its prefix matches the group or one of its parents.
fn glob_covers_group(glob: &str, group: &PathOrId) -> bool {
    let glob = glob.trim().trim_matches('/').to_lowercase();
    if glob == "**" {
        return true;
    }
    let (PathOrId::Path(path), Some(prefix)) = (group, glob.strip_suffix("/**")) else {
        return false;
    };
    let prefix: Vec<&str> = prefix.split('/').collect();
    if prefix.contains(&"**") {
        return false;
    }
    let path = path.to_lowercase();
    let segments: Vec<&str> = path.split('/').collect();
    segments.len() >= prefix.len()
        && prefix
            .iter()
            .zip(&segments)
            .all(|(pattern, segment)| segment_matches(pattern, segment))
}

/// Glob match over `/`-separated paths, case-insensitive: `**` is any number of segments
/// (none included), `*` any characters within one segment.
pub fn glob_matches(glob: &str, path: &str) -> bool {
    let (glob, path) = (glob.to_lowercase(), path.to_lowercase());
    let patterns: Vec<&str> = glob.trim_matches('/').split('/').collect();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    segments_match(&patterns, &segments)
}

fn segments_match(patterns: &[&str], segments: &[&str]) -> bool {
    match patterns.split_first() {
        None => segments.is_empty(),
        Some((&"**", rest)) => {
            (0..=segments.len()).any(|skip| segments_match(rest, &segments[skip..]))
        }
        Some((pattern, rest)) => match segments.split_first() {
            Some((segment, remaining)) => {
                segment_matches(pattern, segment) && segments_match(rest, remaining)
            }
            None => false,
        },
    }
}

/// `*` matches any run of characters (within the segment); everything else literally.
fn segment_matches(pattern: &str, segment: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == segment;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if segment.len() < first.len() + last.len()
        || !segment.starts_with(first)
        || !segment.ends_with(last)
    {
        return false;
    }
    let mut rest = &segment[first.len()..segment.len() - last.len()];
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(at) => rest = &rest[at + middle.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = "rules:\n  - namespaces: [team-a]\n    groups: [team-a-org]\n    projects: [\"team-a-org/**\", \"shared/team-a-*\"]\n  - namespaces: [\"*\"]\n    groups: [public-cache]\n  - namespaces: [ids]\n    groups: [\"4711\"]\n    projects: [\"815\"]\n";

    fn policy() -> AccessPolicy {
        AccessPolicy::parse("/etc/access/policy.yaml", POLICY).expect("valid policy")
    }

    fn group(path: &str) -> Target {
        Target::Group(PathOrId::parse(path))
    }

    fn project(path: &str) -> Target {
        Target::Project(PathOrId::parse(path))
    }

    #[test]
    fn globs_match_segments_and_any_depth() {
        assert!(glob_matches("team-a-org/**", "team-a-org/app"));
        assert!(glob_matches("team-a-org/**", "team-a-org/sub/deeper/app"));
        assert!(!glob_matches("team-a-org/**", "team-b-org/app"));
        assert!(!glob_matches("team-a-org/**", "team-a-organisation/app"));
        assert!(glob_matches("team-a-org/*", "team-a-org/app"));
        assert!(!glob_matches("team-a-org/*", "team-a-org/sub/app"));
        assert!(glob_matches("*/app-*", "any/app-frontend"));
        assert!(!glob_matches("*/app-*", "any/web-app"));
        assert!(glob_matches("a/**/z", "a/z") && glob_matches("a/**/z", "a/b/c/z"));
        assert!(!glob_matches("a/**/z", "a/b/c"));
        assert!(glob_matches("a*b*c", "aXXbYYc") && !glob_matches("a*b*c", "aXXcYYb"));
        assert!(glob_matches("**", "anything/at/all"));
    }

    #[test]
    fn paths_compare_case_insensitively_as_gitlab_resolves_them() {
        let policy = policy();
        assert!(policy.permits("team-a", &group("Team-A-Org")));
        assert!(policy.permits("team-a", &project("TEAM-A-ORG/App")));
    }

    #[test]
    fn a_namespace_reaches_only_its_groups_and_projects() {
        let policy = policy();
        assert!(policy.permits("team-a", &group("team-a-org")));
        assert!(policy.permits("team-a", &group("team-a-org/subgroup")));
        assert!(!policy.permits("team-a", &group("team-b-org")));
        assert!(policy.permits("team-a", &project("team-a-org/app")));
        assert!(policy.permits("team-a", &project("shared/team-a-tools")));
        assert!(!policy.permits("team-a", &project("shared/team-b-tools")));
        assert!(!policy.permits("team-a", &project("team-b-org/app")));
        assert!(!policy.permits("team-b", &group("team-a-org")));
    }

    #[test]
    fn a_star_namespace_rule_applies_to_every_namespace() {
        let policy = policy();
        assert!(policy.permits("team-b", &group("public-cache")));
        assert!(policy.permits("team-a", &group("public-cache")));
        assert!(!policy.permits("team-b", &project("public-cache/app")));
    }

    #[test]
    fn an_unknown_namespace_reaches_nothing_but_star_rules() {
        let policy = policy();
        assert!(!policy.permits("unknown", &group("team-a-org")));
        assert!(!policy.permits("unknown", &project("team-a-org/app")));
        let denial = policy
            .check("unknown", [&group("public-cache"), &group("team-a-org")])
            .expect_err("denied");
        assert_eq!(denial.target, group("team-a-org"));
        let message = denial.to_string();
        assert!(message.contains("namespace unknown"), "{message}");
        assert!(message.contains("group team-a-org"), "{message}");
        assert!(message.contains("/etc/access/policy.yaml"), "{message}");
        let empty = AccessPolicy::parse("empty.yaml", "").expect("empty is valid");
        assert!(!empty.permits("team-a", &group("team-a-org")));
    }

    #[test]
    fn numeric_ids_are_permitted_only_by_a_rule_listing_that_id() {
        let policy = policy();
        assert!(
            !policy.permits("team-a", &group("4711")),
            "the id may be team-a-org's or not"
        );
        assert!(policy.permits("ids", &group("4711")));
        assert!(!policy.permits("ids", &group("4712")));
        assert!(policy.permits("ids", &project("815")));
        assert!(!policy.permits("team-a", &project("815")));
        let everything = AccessPolicy::parse(
            "all.yaml",
            "rules: [{namespaces: [ops], groups: ['*'], projects: ['**']}]",
        )
        .expect("valid");
        assert!(everything.permits("ops", &group("4711")));
        assert!(everything.permits("ops", &project("815")));
    }

    #[test]
    fn a_group_cleanup_needs_the_group_or_globs_covering_all_its_projects() {
        let policy = policy();
        let projects_of = |path: &str| Target::GroupProjects(PathOrId::parse(path));
        assert!(policy.permits("team-a", &projects_of("team-a-org")));
        assert!(policy.permits("team-a", &projects_of("team-a-org/sub")));
        assert!(
            !policy.permits("team-a", &projects_of("shared")),
            "only some of shared's projects"
        );
        let by_glob = AccessPolicy::parse(
            "globs.yaml",
            "rules: [{namespaces: [team-c], projects: ['team-*/**']}]",
        )
        .expect("valid");
        assert!(by_glob.permits("team-c", &projects_of("team-c-org/sub")));
        assert!(!by_glob.permits("team-c", &projects_of("other")));
        assert!(
            !by_glob.permits("team-c", &group("team-c-org")),
            "projects are not groups"
        );
    }

    #[test]
    fn a_group_cleanup_expands_to_projects_that_must_each_be_permitted() {
        assert_eq!(project_of_repository("group/project", ""), "group/project");
        assert_eq!(
            project_of_repository("group/project/releases", "releases"),
            "group/project"
        );
        assert_eq!(
            project_of_repository("group/sub/project/a/b", "a/b"),
            "group/sub/project"
        );
        let policy = AccessPolicy::parse(
            "p.yaml",
            "rules: [{namespaces: [team-a], groups: [shared], projects: ['shared/team-a-*']}]",
        )
        .expect("valid");
        assert!(policy.permits("team-a", &Target::GroupProjects("shared".into())));
        assert!(
            policy
                .check_expansion(
                    "team-a",
                    [("shared/team-a-app", ""), ("shared/team-a-web/img", "img")]
                )
                .is_ok()
        );
        let denial = policy
            .check_expansion(
                "team-a",
                [("shared/team-a-app", ""), ("shared/team-b-app/x", "x")],
            )
            .expect_err("another team's project");
        assert_eq!(denial.target, Target::Project("shared/team-b-app".into()));
    }

    #[test]
    fn a_malformed_policy_names_its_file() {
        let error = AccessPolicy::parse("p.yaml", "rules: [{namespace: [a]}]").expect_err("typo");
        assert!(error.to_string().contains("p.yaml"), "{error}");
        assert_eq!(error.reason(), "InvalidAccessPolicy");
        assert!(AccessPolicy::parse("p.yaml", "rules: [{namespaces: ['']}]").is_err());
        assert!(
            AccessPolicy::parse("p.yaml", "rules: [{namespaces: [a], projects: ['a/***']}]")
                .is_err()
        );
    }
}
