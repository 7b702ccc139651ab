//! One owner per GitLab object: of the objects that claim one GitLab object (a registry, an
//! upstream, a project's GitLab cleanup policy, on one GitLab), the oldest manages it —
//! creation time, then namespace/name — and the others wait, so two tenants can never
//! rewrite the same GitLab object against each other (Crossplane's one managed resource per
//! external resource).

use std::collections::BTreeMap;
use std::fmt;

use jiff::Timestamp;

/// A GitLab object, as objects of the kinds resolve to it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum GitLabObject {
    /// A registry by group (lower-cased path, or `id:N`) and name: GitLab's unique key.
    Registry { group: String, name: String },
    /// A registry by its id.
    RegistryId(i64),
    /// An upstream by group, name and url: GitLab's upstream names are not unique, so an
    /// upstream is adopted by name and url together.
    Upstream {
        group: String,
        name: String,
        url: String,
    },
    /// An upstream by its id.
    UpstreamId(i64),
    /// The GitLab cleanup policy (`container_expiration_policy`) of a project.
    ProjectCleanupPolicy { project: String },
}

impl fmt::Display for GitLabObject {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Registry { group, name } => {
                write!(formatter, "registry {name:?} of group {group}")
            }
            Self::RegistryId(id) => write!(formatter, "registry {id}"),
            Self::Upstream { group, name, url } => {
                write!(formatter, "upstream {name:?} ({url}) of group {group}")
            }
            Self::UpstreamId(id) => write!(formatter, "upstream {id}"),
            Self::ProjectCleanupPolicy { project } => {
                write!(formatter, "the GitLab cleanup policy of project {project}")
            }
        }
    }
}

/// A GitLab object on one GitLab (its normalised base url).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Claim {
    pub gitlab: String,
    pub object: GitLabObject,
}

impl fmt::Display for Claim {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{} on {}", self.object, self.gitlab)
    }
}

/// An object that claims GitLab objects; `id` names it (namespace/name, or a manifest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contender<Id> {
    pub id: Id,
    /// `metadata.creationTimestamp`; an object without one ranks after all that have one.
    pub created: Option<Timestamp>,
    pub claims: Vec<Claim>,
}

impl<Id: Ord> Contender<Id> {
    /// The ranking: older first, then by id.
    fn rank(&self) -> (bool, Option<Timestamp>, &Id) {
        (self.created.is_none(), self.created, &self.id)
    }
}

/// Another contender that owns one of `me`'s claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedElsewhere<'a, Id> {
    pub owner: &'a Id,
    pub claim: &'a Claim,
}

/// The first of `me`'s claims that an older contender also holds, with that owner; `None`
/// when `me` owns everything it claims. `contenders` may include `me` (by id). Pure.
pub fn owned_elsewhere<'a, Id: Ord>(
    me: &'a Contender<Id>,
    contenders: impl IntoIterator<Item = &'a Contender<Id>>,
) -> Option<OwnedElsewhere<'a, Id>> {
    let contenders: Vec<&Contender<Id>> = contenders
        .into_iter()
        .filter(|other| other.id != me.id)
        .collect();
    me.claims.iter().find_map(|claim| {
        contenders
            .iter()
            .filter(|other| other.claims.contains(claim))
            .copied()
            .min_by(|a, b| a.rank().cmp(&b.rank()))
            .filter(|oldest| oldest.rank() < me.rank())
            .map(|owner| OwnedElsewhere {
                owner: &owner.id,
                claim,
            })
    })
}

/// Every GitLab object claimed more than once, with the first two claimants in the given
/// order: for manifests, which must not declare one GitLab object twice. Pure.
pub fn duplicate_claims<Id>(contenders: &[Contender<Id>]) -> Vec<(&Claim, &Id, &Id)> {
    let mut first: BTreeMap<&Claim, &Id> = BTreeMap::new();
    let mut duplicates: Vec<(&Claim, &Id, &Id)> = Vec::new();
    for contender in contenders {
        for claim in &contender.claims {
            match first.get(claim) {
                None => {
                    first.insert(claim, &contender.id);
                }
                Some(earlier) => {
                    let earlier: &Id = earlier;
                    if !std::ptr::eq(earlier, &contender.id)
                        && !duplicates.iter().any(|(seen, _, _)| *seen == claim)
                    {
                        duplicates.push((claim, earlier, &contender.id));
                    }
                }
            }
        }
    }
    duplicates
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(name: &str) -> Claim {
        Claim {
            gitlab: "https://gitlab.example.com/".into(),
            object: GitLabObject::Registry {
                group: "my-org".into(),
                name: name.into(),
            },
        }
    }

    fn contender(id: &str, created: Option<i64>, claims: &[Claim]) -> Contender<String> {
        Contender {
            id: id.into(),
            created: created.map(|s| Timestamp::from_second(s).expect("time")),
            claims: claims.to_vec(),
        }
    }

    #[test]
    fn the_oldest_contender_owns_and_the_others_name_it() {
        let old = contender("team-b/cache", Some(100), &[claim("cache")]);
        let young = contender("team-a/cache", Some(200), &[claim("cache")]);
        let all = [old.clone(), young.clone()];
        assert_eq!(owned_elsewhere(&old, &all), None);
        let elsewhere = owned_elsewhere(&young, &all).expect("owned by the old one");
        assert_eq!(elsewhere.owner, "team-b/cache");
        assert_eq!(*elsewhere.claim, claim("cache"));
    }

    #[test]
    fn equal_creation_times_are_ranked_by_namespace_and_name() {
        let a = contender("team-a/cache", Some(100), &[claim("cache")]);
        let b = contender("team-b/cache", Some(100), &[claim("cache")]);
        let all = [b.clone(), a.clone()];
        assert_eq!(owned_elsewhere(&a, &all), None);
        assert_eq!(
            owned_elsewhere(&b, &all).map(|e| e.owner.as_str()),
            Some("team-a/cache")
        );
    }

    #[test]
    fn without_the_owner_the_next_oldest_takes_over() {
        let first = contender("a/x", Some(1), &[claim("cache")]);
        let second = contender("b/x", Some(2), &[claim("cache")]);
        let third = contender("c/x", Some(3), &[claim("cache")]);
        assert!(
            owned_elsewhere(&second, &[first.clone(), second.clone(), third.clone()]).is_some()
        );
        assert_eq!(
            owned_elsewhere(&second, &[second.clone(), third.clone()]),
            None
        );
        assert_eq!(
            owned_elsewhere(&third, &[second.clone(), third.clone()]).map(|e| e.owner.as_str()),
            Some("b/x")
        );
    }

    #[test]
    fn different_objects_or_gitlabs_do_not_conflict_and_missing_times_rank_last() {
        let mut elsewhere = claim("cache");
        elsewhere.gitlab = "https://other.example.com/".into();
        let a = contender("a/x", Some(5), &[claim("cache")]);
        let b = contender("b/x", Some(1), &[claim("other")]);
        let c = contender("c/x", Some(1), &[elsewhere]);
        assert_eq!(owned_elsewhere(&a, &[a.clone(), b, c]), None);
        let undated = contender("0/x", None, &[claim("cache")]);
        assert_eq!(owned_elsewhere(&a, &[a.clone(), undated.clone()]), None);
        assert!(owned_elsewhere(&undated, &[a, undated.clone()]).is_some());
    }

    #[test]
    fn duplicates_name_both_claimants_once() {
        let list = vec![
            contender("one.yaml", None, &[claim("cache"), claim("x")]),
            contender("two.yaml", None, &[claim("cache")]),
            contender("three.yaml", None, &[claim("cache")]),
        ];
        let duplicates = duplicate_claims(&list);
        assert_eq!(duplicates.len(), 1);
        assert_eq!(
            duplicates[0],
            (
                &claim("cache"),
                &"one.yaml".to_string(),
                &"two.yaml".to_string()
            )
        );
    }
}
