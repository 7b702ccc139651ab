//! Fault injection for the simulator's GitLab API: added latency, a random error rate, and
//! one-shot failures (a status, a 429 with `Retry-After`, a dropped connection or a long
//! delay) for the next N matching requests. Control endpoints under `/-/sim/` are never
//! affected.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A change to the fault settings (`POST /-/sim/faults`). Given fields replace the current
/// ones; `once` entries are appended to the pending one-shot faults.
///
/// ```json
/// {"latency_ms": 20, "error_rate": 0.5, "error_status": 503,
///  "once": [{"count": 2, "method": "POST",
///            "route": "/virtual_registries/container/registries/:id/upstreams",
///            "fault": {"kind": "status", "status": 500}}]}
/// ```
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FaultSpec {
    /// Extra delay before every API request is answered.
    #[serde(default)]
    pub latency_ms: Option<u64>,
    /// Probability (0 to 1) that an API request fails with `error_status`.
    #[serde(default)]
    pub error_rate: Option<f64>,
    /// Status of random failures; default 500. A 429 carries `Retry-After`.
    #[serde(default)]
    pub error_status: Option<u16>,
    /// `Retry-After` seconds for 429 answers; default 1.
    #[serde(default)]
    pub retry_after_seconds: Option<u64>,
    #[serde(default)]
    pub once: Vec<OneShotFault>,
}

/// A failure for the next `count` requests matching `method` and `route` (both optional).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OneShotFault {
    #[serde(default = "one")]
    pub count: u32,
    /// HTTP method, e.g. `POST`; any method when absent.
    #[serde(default)]
    pub method: Option<String>,
    /// Route template as `/-/sim/requests` shows it, e.g. `/projects/:id`; any when absent.
    #[serde(default)]
    pub route: Option<String>,
    pub fault: FaultAction,
}

fn one() -> u32 {
    1
}

/// What an injected fault does to a request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum FaultAction {
    /// Answer with this status (GitLab-style body) without touching state.
    Status { status: u16 },
    /// GitLab's global rate limit: `429`, plain text `Retry later`, `Retry-After`.
    RateLimited {
        #[serde(default = "default_retry_after")]
        retry_after_seconds: u64,
    },
    /// An endpoint's own rate limit: `429`
    /// `{"message":{"error":"This endpoint has been requested too many times. Try again later."}}`
    /// with `Retry-After: 60`.
    EndpointRateLimited,
    /// Close the connection without a complete answer.
    Drop,
    /// Execute the request, then hold the answer back this long. Longer than a client's
    /// timeout, this is GitLab's slow answer to a request it did carry out (Puma finishes a
    /// request whose client has gone): the client sees a timeout, GitLab holds the change.
    Delay { delay_ms: u64 },
}

fn default_retry_after() -> u64 {
    1
}

/// The current fault settings.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Faults {
    pub latency_ms: u64,
    pub error_rate: f64,
    pub error_status: u16,
    pub retry_after_seconds: u64,
    pub pending: Vec<OneShotFault>,
}

/// What to do with one request.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Decision {
    /// Wait before the request is handled (latency).
    pub delay: Duration,
    /// Wait after the request was handled, before answering (a `Delay` fault).
    pub answer_delay: Duration,
    pub action: Option<FaultAction>,
}

impl Faults {
    pub fn new() -> Self {
        Self {
            error_status: 500,
            retry_after_seconds: 1,
            ..Self::default()
        }
    }

    pub fn apply(&mut self, spec: FaultSpec) {
        if let Some(latency) = spec.latency_ms {
            self.latency_ms = latency;
        }
        if let Some(rate) = spec.error_rate {
            self.error_rate = rate.clamp(0.0, 1.0);
        }
        if let Some(status) = spec.error_status {
            self.error_status = status;
        }
        if let Some(seconds) = spec.retry_after_seconds {
            self.retry_after_seconds = seconds;
        }
        self.pending.extend(spec.once);
    }

    pub fn clear(&mut self) {
        *self = Self::new();
    }

    /// Decides the fate of a request. `roll` is a uniform sample in `[0, 1)`.
    pub fn decide(&mut self, method: &str, route: &str, roll: f64) -> Decision {
        let mut decision = Decision {
            delay: Duration::from_millis(self.latency_ms),
            ..Decision::default()
        };
        let matching = self.pending.iter().position(|fault| {
            fault
                .method
                .as_deref()
                .is_none_or(|wanted| wanted.eq_ignore_ascii_case(method))
                && fault.route.as_deref().is_none_or(|wanted| wanted == route)
        });
        if let Some(index) = matching {
            let fault = &mut self.pending[index];
            let action = fault.fault.clone();
            fault.count = fault.count.saturating_sub(1);
            if fault.count == 0 {
                self.pending.remove(index);
            }
            match action {
                FaultAction::Delay { delay_ms } => {
                    decision.answer_delay = Duration::from_millis(delay_ms);
                }
                other => decision.action = Some(other),
            }
            return decision;
        }
        if roll < self.error_rate {
            decision.action = Some(if self.error_status == 429 {
                FaultAction::RateLimited {
                    retry_after_seconds: self.retry_after_seconds,
                }
            } else {
                FaultAction::Status {
                    status: self.error_status,
                }
            });
        }
        decision
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_shot_faults_match_method_and_route_then_expire() {
        let mut faults = Faults::new();
        faults.apply(FaultSpec {
            once: vec![OneShotFault {
                count: 2,
                method: Some("post".into()),
                route: Some("/projects/:id".into()),
                fault: FaultAction::Status { status: 502 },
            }],
            ..FaultSpec::default()
        });
        assert_eq!(faults.decide("GET", "/projects/:id", 0.5).action, None);
        for _ in 0..2 {
            assert_eq!(
                faults.decide("POST", "/projects/:id", 0.5).action,
                Some(FaultAction::Status { status: 502 })
            );
        }
        assert_eq!(faults.decide("POST", "/projects/:id", 0.5).action, None);
    }

    #[test]
    fn error_rate_and_latency() {
        let mut faults = Faults::new();
        faults.apply(
            serde_json::from_str(r#"{"latency_ms": 5, "error_rate": 1, "error_status": 429, "retry_after_seconds": 7}"#)
                .unwrap(),
        );
        let decision = faults.decide("GET", "/x", 0.3);
        assert_eq!(decision.delay, Duration::from_millis(5));
        assert_eq!(
            decision.action,
            Some(FaultAction::RateLimited {
                retry_after_seconds: 7
            })
        );
        faults.clear();
        assert_eq!(faults.decide("GET", "/x", 0.0), Decision::default());
    }

    #[test]
    fn delay_faults_hold_the_answer_after_the_latency() {
        let mut faults = Faults::new();
        faults.apply(
            serde_json::from_str(
                r#"{"latency_ms": 5, "once": [{"fault": {"kind": "delay", "delay_ms": 300}}]}"#,
            )
            .unwrap(),
        );
        let decision = faults.decide("GET", "/x", 0.9);
        assert_eq!(decision.delay, Duration::from_millis(5));
        assert_eq!(decision.answer_delay, Duration::from_millis(300));
        assert_eq!(decision.action, None);
    }
}
