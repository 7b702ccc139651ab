//! Condition helpers shared by every kind: replace a condition by type while keeping its
//! `lastTransitionTime` unless the status flips, and derive `Ready` from the others.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// Condition types used across the kinds.
pub const READY: &str = "Ready";
pub const SYNCED: &str = "Synced";
pub const REACHABLE: &str = "Reachable";
pub const UPSTREAMS_RESOLVED: &str = "UpstreamsResolved";

/// Condition status values, as Kubernetes spells them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    True,
    False,
    Unknown,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::True => "True",
            Self::False => "False",
            Self::Unknown => "Unknown",
        }
    }

    fn parse(value: &str) -> Self {
        match value {
            "True" => Self::True,
            "False" => Self::False,
            _ => Self::Unknown,
        }
    }
}

impl From<bool> for Status {
    fn from(value: bool) -> Self {
        if value { Self::True } else { Self::False }
    }
}

/// A condition as a reconcile step decides it, before time and generation are stamped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConditionUpdate {
    pub type_: &'static str,
    pub status: Status,
    pub reason: String,
    pub message: String,
}

impl ConditionUpdate {
    pub fn new(
        type_: &'static str,
        status: impl Into<Status>,
        reason: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_,
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// Sets `update` in `conditions`, replacing the condition of the same type. The
/// `lastTransitionTime` is kept unless the status flips, so a condition that only changes its
/// message or reason does not look like a new transition.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    update: ConditionUpdate,
    observed_generation: Option<i64>,
    now: &Time,
) {
    let existing = conditions.iter_mut().find(|c| c.type_ == update.type_);
    match existing {
        Some(condition) => {
            if Status::parse(&condition.status) != update.status {
                condition.last_transition_time = now.clone();
            }
            condition.status = update.status.as_str().to_string();
            condition.reason = update.reason;
            condition.message = update.message;
            condition.observed_generation = observed_generation;
        }
        None => conditions.push(Condition {
            type_: update.type_.to_string(),
            status: update.status.as_str().to_string(),
            reason: update.reason,
            message: update.message,
            observed_generation,
            last_transition_time: now.clone(),
        }),
    }
}

/// The condition of a type, if set.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether the condition of a type is set and True.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    find(conditions, type_).is_some_and(|c| c.status == "True")
}

/// The reason of the condition of a type when it is set and False.
pub fn false_reason<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a str> {
    find(conditions, type_)
        .filter(|c| c.status == "False")
        .map(|c| c.reason.as_str())
}

/// `Ready` as the summary of `components`: True with reason `Synced` when every component is
/// True; otherwise False (or Unknown, when a component is not yet known) with the reason and
/// message of the first component that is not True.
pub fn ready_summary(conditions: &[Condition], components: &[&'static str]) -> ConditionUpdate {
    for component in components {
        match find(conditions, component) {
            Some(c) if c.status == "True" => continue,
            Some(c) => {
                return ConditionUpdate::new(
                    READY,
                    Status::parse(&c.status),
                    c.reason.clone(),
                    c.message.clone(),
                );
            }
            None => {
                return ConditionUpdate::new(
                    READY,
                    Status::Unknown,
                    "Pending",
                    format!("{component} is not known yet"),
                );
            }
        }
    }
    ConditionUpdate::new(
        READY,
        Status::True,
        super::reasons::Reason::Synced.as_str(),
        "in line with the spec",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn time(seconds: i64) -> Time {
        Time(jiff::Timestamp::from_second(seconds).unwrap())
    }

    #[test]
    fn setting_a_new_type_appends_it_with_generation_and_time() {
        let mut conditions = Vec::new();
        set_condition(
            &mut conditions,
            ConditionUpdate::new(SYNCED, true, "Synced", "ok"),
            Some(3),
            &time(10),
        );
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].status, "True");
        assert_eq!(conditions[0].observed_generation, Some(3));
        assert_eq!(conditions[0].last_transition_time, time(10));
    }

    #[test]
    fn same_status_keeps_transition_time_but_updates_message_and_generation() {
        let mut conditions = Vec::new();
        set_condition(
            &mut conditions,
            ConditionUpdate::new(SYNCED, false, "NotFound", "a"),
            Some(1),
            &time(10),
        );
        set_condition(
            &mut conditions,
            ConditionUpdate::new(SYNCED, false, "Forbidden", "b"),
            Some(2),
            &time(20),
        );
        assert_eq!(conditions.len(), 1, "replaced by type, not appended");
        assert_eq!(conditions[0].last_transition_time, time(10));
        assert_eq!(conditions[0].reason, "Forbidden");
        assert_eq!(conditions[0].message, "b");
        assert_eq!(conditions[0].observed_generation, Some(2));
    }

    #[test]
    fn flipped_status_moves_transition_time() {
        let mut conditions = Vec::new();
        set_condition(
            &mut conditions,
            ConditionUpdate::new(SYNCED, false, "NotFound", "a"),
            None,
            &time(10),
        );
        set_condition(
            &mut conditions,
            ConditionUpdate::new(SYNCED, true, "Synced", "ok"),
            None,
            &time(20),
        );
        assert_eq!(conditions[0].last_transition_time, time(20));
        assert_eq!(conditions[0].status, "True");
    }

    #[test]
    fn ready_summarises_components() {
        let mut conditions = Vec::new();
        let ready = ready_summary(&conditions, &[SYNCED, UPSTREAMS_RESOLVED]);
        assert_eq!(ready.status, Status::Unknown);

        set_condition(
            &mut conditions,
            ConditionUpdate::new(SYNCED, true, "Synced", "ok"),
            None,
            &time(1),
        );
        set_condition(
            &mut conditions,
            ConditionUpdate::new(
                UPSTREAMS_RESOLVED,
                false,
                "UpstreamNotFound",
                "Upstream quay not found",
            ),
            None,
            &time(1),
        );
        let ready = ready_summary(&conditions, &[SYNCED, UPSTREAMS_RESOLVED]);
        assert_eq!(ready.status, Status::False);
        assert_eq!(ready.reason, "UpstreamNotFound");
        assert_eq!(ready.message, "Upstream quay not found");

        set_condition(
            &mut conditions,
            ConditionUpdate::new(UPSTREAMS_RESOLVED, true, "Resolved", "all found"),
            None,
            &time(2),
        );
        let ready = ready_summary(&conditions, &[SYNCED, UPSTREAMS_RESOLVED]);
        assert_eq!(ready.status, Status::True);
        assert_eq!(ready.reason, "Synced");
        assert!(is_true(&conditions, UPSTREAMS_RESOLVED));
    }
}
