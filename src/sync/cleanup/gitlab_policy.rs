//! Strategy `GitLabPolicy`: [`sync_gitlab_policy`] makes a project's
//! `container_expiration_policy` match the spec with one `PUT` carrying only what differs.

use jiff::Timestamp;

use super::FIELD_CADENCE;
use crate::cleanup::{CompiledRules, RuleSpec};
use crate::crd::cleanup_policy::{
    CleanupPolicySpec, GitLabCadence, GitLabKeepN, GitLabOlderThan, TagRules,
};
use crate::crd::reasons::Reason;
use crate::gitlab::{
    ContainerExpirationPolicy, ContainerExpirationPolicyUpdate, GitLabClient, PathOrId,
};
use crate::sync::{Action, Error, FieldChange, Mode, Result};

/// The project cleanup policy GitLab should run (strategy `GitLabPolicy`). Always enabled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredGitLabPolicy {
    pub cadence: GitLabCadence,
    /// One of 1, 5, 10, 25, 50, 100; `None`: no limit.
    pub keep_n: Option<i32>,
    /// One of 7d, 14d, 30d, 90d; `None`: no age limit.
    pub older_than: Option<String>,
    /// GitLab's `name_regex` (the delete regex); required.
    pub name_regex_delete: Option<String>,
    pub name_regex_keep: Option<String>,
}

impl DesiredGitLabPolicy {
    /// From a `CleanupPolicy` spec; a missing cadence is [`Error::InvalidSpec`].
    pub fn from_spec(spec: &CleanupPolicySpec) -> Result<Self> {
        let cadence = spec.cadence.ok_or_else(|| {
            Error::InvalidSpec(format!(
                "{FIELD_CADENCE} is required with strategy GitLabPolicy"
            ))
        })?;
        let rules = spec.rules.clone().unwrap_or(TagRules {
            name_regex_delete: None,
            name_regex_keep: None,
            keep_n: None,
            older_than: None,
            keep_n_per_family: None,
        });
        Ok(Self {
            cadence,
            keep_n: rules.keep_n,
            older_than: rules.older_than,
            name_regex_delete: rules.name_regex_delete,
            name_regex_keep: rules.name_regex_keep,
        })
    }
}

/// The policy in GitLab's terms, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PolicyValues {
    cadence: &'static str,
    keep_n: Option<i64>,
    older_than: Option<&'static str>,
    name_regex: String,
    name_regex_keep: Option<String>,
    notes: Vec<String>,
}

fn policy_values(desired: &DesiredGitLabPolicy) -> Result<PolicyValues> {
    let keep_n = desired
        .keep_n
        .map(|keep_n| GitLabKeepN::try_from(keep_n).map_err(Error::InvalidSpec))
        .transpose()?
        .map(|keep_n| keep_n as i64);
    let older_than = desired
        .older_than
        .as_deref()
        .map(|older_than| GitLabOlderThan::try_from(older_than).map_err(Error::InvalidSpec))
        .transpose()?
        .map(GitLabOlderThan::as_gitlab);
    // The regexes must be valid RE2 and the delete regex non-blank, as GitLab checks.
    let compiled = CompiledRules::compile(&RuleSpec {
        name_regex_delete: desired.name_regex_delete.clone(),
        name_regex_keep: desired.name_regex_keep.clone(),
        keep_n: None,
        older_than: None,
        ..RuleSpec::default()
    })
    .map_err(|error| Error::InvalidSpec(error.to_string()))?;
    Ok(PolicyValues {
        cadence: desired.cadence.as_gitlab(),
        keep_n,
        older_than,
        name_regex: compiled.name_regex_delete().to_owned(),
        name_regex_keep: compiled.name_regex_keep().map(str::to_owned),
        notes: compiled.notes().to_vec(),
    })
}

/// What [`sync_gitlab_policy`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyOutcome {
    /// The policy as GitLab has it now (after the PUT; in plan mode, before it).
    pub policy: Option<ContainerExpirationPolicy>,
    /// When GitLab runs it next (`status.nextRunTime`).
    pub next_run_at: Option<Timestamp>,
    /// `Updated` with the changed fields, when the policy differed (in plan mode: would).
    pub action: Option<Action>,
    /// Remarks about how GitLab reads the regexes.
    pub notes: Vec<String>,
}

/// Makes the project's GitLab cleanup policy match `desired`: reads it, and sends one
/// `PUT /projects/:id` with only the differing fields, or nothing when it matches (or in
/// [`Mode::Plan`]). An invalid `keepN`, `olderThan` or regex is [`Error::InvalidSpec`] before
/// any request.
pub async fn sync_gitlab_policy(
    client: &GitLabClient,
    project: &PathOrId,
    desired: &DesiredGitLabPolicy,
    mode: Mode,
) -> Result<PolicyOutcome> {
    let values = policy_values(desired)?;
    let current = client.get_cleanup_policy(project).await?;
    let (update, changes) = policy_difference(current.as_ref(), &values);
    if changes.is_empty() {
        return Ok(PolicyOutcome {
            next_run_at: current.as_ref().and_then(|policy| policy.next_run_at),
            policy: current,
            action: None,
            notes: values.notes,
        });
    }
    let (policy, message) = if mode.writes() {
        let updated = client.update_cleanup_policy(project, &update).await?;
        (
            updated,
            format!("updated the GitLab cleanup policy of project {project}"),
        )
    } else {
        (
            current,
            format!("would update the GitLab cleanup policy of project {project}"),
        )
    };
    Ok(PolicyOutcome {
        next_run_at: policy.as_ref().and_then(|policy| policy.next_run_at),
        policy,
        action: Some(Action::new(Reason::Updated.as_str(), message).with_changes(changes)),
        notes: values.notes,
    })
}

/// The fields to send and their changes. A blank keep regex reads as none.
fn policy_difference(
    current: Option<&ContainerExpirationPolicy>,
    desired: &PolicyValues,
) -> (ContainerExpirationPolicyUpdate, Vec<FieldChange>) {
    let mut update = ContainerExpirationPolicyUpdate::default();
    let mut changes = Vec::new();
    let current_cadence = current.map(|policy| policy.cadence.as_str());
    if current_cadence != Some(desired.cadence) {
        changes.push(FieldChange::new(
            "cadence",
            current_cadence,
            Some(desired.cadence),
        ));
        update.cadence = Some(desired.cadence.to_owned());
    }
    let current_enabled = current.map(|policy| policy.enabled);
    if current_enabled != Some(true) {
        changes.push(FieldChange::new("enabled", current_enabled, Some(true)));
        update.enabled = Some(true);
    }
    let current_keep_n = current.and_then(|policy| policy.keep_n);
    if current.is_none() || current_keep_n != desired.keep_n {
        changes.push(FieldChange::new("keepN", current_keep_n, desired.keep_n));
        update.keep_n = Some(desired.keep_n);
    }
    let current_older_than = current.and_then(|policy| policy.older_than.as_deref());
    if current.is_none() || current_older_than != desired.older_than {
        changes.push(FieldChange::new(
            "olderThan",
            current_older_than,
            desired.older_than,
        ));
        update.older_than = Some(desired.older_than.map(str::to_owned));
    }
    let current_delete = current.and_then(|policy| policy.name_regex.as_deref());
    if current_delete != Some(desired.name_regex.as_str()) {
        changes.push(FieldChange::new(
            "nameRegexDelete",
            current_delete,
            Some(&desired.name_regex),
        ));
        update.name_regex = Some(desired.name_regex.clone());
    }
    let current_keep = current
        .and_then(|policy| policy.name_regex_keep.as_deref())
        .filter(|keep| !keep.is_empty());
    let desired_keep = desired
        .name_regex_keep
        .as_deref()
        .filter(|keep| !keep.is_empty());
    if current_keep != desired_keep {
        changes.push(FieldChange::new(
            "nameRegexKeep",
            current_keep,
            desired_keep,
        ));
        // GitLab takes a blank keep regex as "keep nothing by name".
        update.name_regex_keep = Some(desired_keep.unwrap_or_default().to_owned());
    }
    (update, changes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(keep_regex: Option<&str>) -> ContainerExpirationPolicy {
        ContainerExpirationPolicy {
            cadence: "7d".into(),
            enabled: true,
            keep_n: Some(10),
            older_than: Some("14d".into()),
            name_regex: Some(".*".into()),
            name_regex_keep: keep_regex.map(str::to_owned),
            next_run_at: None,
        }
    }

    fn desired(keep_regex: Option<&str>) -> PolicyValues {
        policy_values(&DesiredGitLabPolicy {
            cadence: GitLabCadence::Weekly,
            keep_n: Some(10),
            older_than: Some("14d".into()),
            name_regex_delete: Some(".*".into()),
            name_regex_keep: keep_regex.map(str::to_owned),
        })
        .expect("valid")
    }

    #[test]
    fn policy_difference_sends_only_what_differs() {
        let (update, changes) = policy_difference(Some(&policy(None)), &desired(None));
        assert!(changes.is_empty());
        assert_eq!(update, ContainerExpirationPolicyUpdate::default());
        // A blank keep regex is no keep regex.
        let (_, changes) = policy_difference(Some(&policy(Some(""))), &desired(None));
        assert!(changes.is_empty());

        let mut drifted = policy(Some("main"));
        drifted.keep_n = None;
        drifted.enabled = false;
        let (update, changes) = policy_difference(Some(&drifted), &desired(None));
        assert_eq!(
            update,
            ContainerExpirationPolicyUpdate {
                enabled: Some(true),
                keep_n: Some(Some(10)),
                name_regex_keep: Some(String::new()),
                ..ContainerExpirationPolicyUpdate::default()
            }
        );
        assert_eq!(
            changes,
            vec![
                FieldChange::new("enabled", Some(false), Some(true)),
                FieldChange::new("keepN", None::<i64>, Some(10)),
                FieldChange::new("nameRegexKeep", Some("main"), None::<&str>),
            ]
        );

        let (update, changes) = policy_difference(None, &desired(Some("main")));
        assert_eq!(changes.len(), 6);
        assert_eq!(update.older_than, Some(Some("14d".to_owned())));
    }

    #[test]
    fn gitlab_policy_values_are_gitlabs_own() {
        let base = DesiredGitLabPolicy {
            cadence: GitLabCadence::Monthly,
            keep_n: None,
            older_than: None,
            name_regex_delete: Some("v.*".into()),
            name_regex_keep: None,
        };
        let values = policy_values(&base).expect("valid");
        assert_eq!(
            (values.cadence, values.keep_n, values.older_than),
            ("1month", None, None)
        );
        for keep_n in [0, 2, 1000] {
            let error = policy_values(&DesiredGitLabPolicy {
                keep_n: Some(keep_n),
                ..base.clone()
            })
            .expect_err("not GitLab's");
            assert_eq!(error.reason(), "InvalidSpec");
        }
        let error = policy_values(&DesiredGitLabPolicy {
            older_than: Some("1month".into()),
            ..base.clone()
        })
        .expect_err("not GitLab's");
        assert!(error.message().contains("olderThan"), "{error}");
    }
}
