//! The branches of a project as a cleanup compares them with tag names: GitLab's
//! `CI_COMMIT_REF_SLUG` of every branch, for `safety.keepBranchTags`.

use std::collections::HashSet;

/// GitLab's longest `CI_COMMIT_REF_SLUG`.
pub const MAX_SLUG_CHARS: usize = 63;

/// `CI_COMMIT_REF_SLUG` as GitLab computes it (`Gitlab::Utils.slugify`): lowercased, every
/// character outside `[a-z0-9]` replaced by `-`, cut to 63 characters, then leading and
/// trailing `-` removed (cut first, so a slug can be shorter than 63).
pub fn ref_slug(name: &str) -> String {
    let replaced: String = name
        .to_lowercase()
        .chars()
        .map(|character| {
            if character.is_ascii_lowercase() || character.is_ascii_digit() {
                character
            } else {
                '-'
            }
        })
        .take(MAX_SLUG_CHARS)
        .collect();
    replaced.trim_matches('-').to_owned()
}

/// The slugs of the branches that exist in one project.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProjectBranches {
    slugs: HashSet<String>,
}

impl ProjectBranches {
    /// From branch names as GitLab lists them (`feature/Login-Form`).
    pub fn from_names<I, S>(names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Self {
            slugs: names
                .into_iter()
                .map(|name| ref_slug(name.as_ref()))
                .filter(|slug| !slug.is_empty())
                .collect(),
        }
    }

    /// Whether a branch of this slug exists.
    pub fn has_slug(&self, slug: &str) -> bool {
        self.slugs.contains(slug)
    }

    pub fn len(&self) -> usize {
        self.slugs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slugs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_follow_gitlab() {
        assert_eq!(ref_slug("main"), "main");
        assert_eq!(ref_slug("feature/Login-Form"), "feature-login-form");
        assert_eq!(ref_slug("-Fix_bug-"), "fix-bug");
        assert_eq!(ref_slug("Ünïcode"), "n-code");
        let long = format!("{}-{}", "a".repeat(62), "b".repeat(10));
        assert_eq!(ref_slug(&long), "a".repeat(62));
        assert_eq!(ref_slug(&"x".repeat(80)).len(), MAX_SLUG_CHARS);
        assert_eq!(ref_slug("///"), "");
    }

    #[test]
    fn branches_are_found_by_slug() {
        let branches = ProjectBranches::from_names(["main", "feature/Login-Form", "--"]);
        assert_eq!(branches.len(), 2);
        assert!(branches.has_slug("feature-login-form"));
        assert!(!branches.has_slug("feature/Login-Form"));
        assert!(!branches.has_slug(""));
    }
}
