//! Prometheus metrics of the operator: reconciles, errors by reason, durations, the time of
//! the last successful reconcile, GitLab requests by route and status, cleanup counters, and
//! each Upstream's reachability and latest connection test. Labels are bounded sets (kinds,
//! reasons, route templates), never ids; only the per-Upstream gauges name their object, one
//! series per Upstream that goes away with it (the time of the latest test is here, not in
//! status, so that a test changing nothing writes nothing).

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::gitlab::RequestObserver;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub kind: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: String,
    pub route: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub method: String,
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TagLabels {
    /// `evaluated`, `deleted`, `kept`, `would_delete`.
    pub outcome: String,
    /// Why a tag was kept (`KeepN`, `Protected`, …), or `none`.
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RunLabels {
    pub outcome: String,
}

/// One object, for the few per-object series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ObjectLabels {
    pub namespace: String,
    pub name: String,
}

pub struct Metrics {
    registry: Mutex<Registry>,
    pub reconciles: Family<KindLabels, Counter>,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub reconcile_duration: Family<KindLabels, Histogram>,
    pub gitlab_requests: Family<RequestLabels, Counter>,
    pub gitlab_request_duration: Family<RouteLabels, Histogram>,
    pub cleanup_tags: Family<TagLabels, Counter>,
    pub cleanup_runs: Family<RunLabels, Counter>,
    pub last_successful_reconcile: Family<KindLabels, Gauge<f64, AtomicU64>>,
    pub upstream_reachable: Family<ObjectLabels, Gauge>,
    pub cleanup_pending_approvals: Counter,
    pub upstream_last_connectivity_check: Family<ObjectLabels, Gauge<f64, AtomicU64>>,
}

fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("gitlab_registry_operator");
        let reconciles = Family::<KindLabels, Counter>::default();
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        let reconcile_duration = Family::<KindLabels, Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        let gitlab_requests = Family::<RequestLabels, Counter>::default();
        let gitlab_request_duration = Family::<RouteLabels, Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        let cleanup_tags = Family::<TagLabels, Counter>::default();
        let cleanup_runs = Family::<RunLabels, Counter>::default();
        let last_successful_reconcile = Family::<KindLabels, Gauge<f64, AtomicU64>>::default();
        let upstream_reachable = Family::<ObjectLabels, Gauge>::default();
        let cleanup_pending_approvals = Counter::default();
        let upstream_last_connectivity_check =
            Family::<ObjectLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "reconciles",
            "Reconciles started, by kind",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconciles that failed, by kind and reason",
            reconcile_errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Reconcile duration, by kind",
            reconcile_duration.clone(),
        );
        registry.register(
            "gitlab_requests",
            "GitLab API requests, by method, route and status",
            gitlab_requests.clone(),
        );
        registry.register(
            "gitlab_request_duration_seconds",
            "GitLab API request latency, by method and route",
            gitlab_request_duration.clone(),
        );
        registry.register(
            "cleanup_tags",
            "Tags evaluated, deleted and kept by cleanups, by reason",
            cleanup_tags.clone(),
        );
        registry.register(
            "cleanup_runs",
            "Cleanup runs, by outcome",
            cleanup_runs.clone(),
        );
        registry.register(
            "last_successful_reconcile_timestamp_seconds",
            "Unix time of the last reconcile that succeeded, by kind",
            last_successful_reconcile.clone(),
        );
        registry.register(
            "upstream_reachable",
            "1 when the Upstream's last GitLab connection test succeeded (Reachable=True), 0 when it failed",
            upstream_reachable.clone(),
        );
        registry.register(
            "cleanup_pending_approvals",
            "Repositories whose cleanup deletions a run held back over maxDeletionPercent, \
             waiting for approval",
            cleanup_pending_approvals.clone(),
        );
        registry.register(
            "upstream_last_connectivity_check_timestamp_seconds",
            "When GitLab last tested the Upstream's connection (Unix time), by namespace and name",
            upstream_last_connectivity_check.clone(),
        );
        Self {
            registry: Mutex::new(registry),
            reconciles,
            reconcile_errors,
            reconcile_duration,
            gitlab_requests,
            gitlab_request_duration,
            cleanup_tags,
            cleanup_runs,
            last_successful_reconcile,
            upstream_reachable,
            cleanup_pending_approvals,
            upstream_last_connectivity_check,
        }
    }
}

impl Metrics {
    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let registry = self
            .registry
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
        text
    }

    pub fn reconcile_started(&self, kind: &str) {
        self.reconciles
            .get_or_create(&KindLabels { kind: kind.into() })
            .inc();
    }

    pub fn reconcile_finished(&self, kind: &str, elapsed: Duration, error_reason: Option<&str>) {
        self.reconcile_duration
            .get_or_create(&KindLabels { kind: kind.into() })
            .observe(elapsed.as_secs_f64());
        if let Some(reason) = error_reason {
            self.reconcile_errors
                .get_or_create(&ErrorLabels {
                    kind: kind.into(),
                    reason: reason.into(),
                })
                .inc();
        } else {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default();
            self.last_successful_reconcile
                .get_or_create(&KindLabels { kind: kind.into() })
                .set(now.as_secs_f64());
        }
    }

    /// Records an Upstream's `Reachable` condition: `Some(true)`/`Some(false)` as its status
    /// says, `None` (not tested, suspended, deleted) drops its series.
    pub fn upstream_reachability(&self, namespace: &str, name: &str, reachable: Option<bool>) {
        let labels = ObjectLabels {
            namespace: namespace.into(),
            name: name.into(),
        };
        match reachable {
            Some(reachable) => {
                self.upstream_reachable
                    .get_or_create(&labels)
                    .set(i64::from(reachable));
            }
            None => {
                self.upstream_reachable.remove(&labels);
            }
        }
    }

    pub fn count_tags(&self, outcome: &str, reason: &str, count: u64) {
        if count > 0 {
            self.cleanup_tags
                .get_or_create(&TagLabels {
                    outcome: outcome.into(),
                    reason: reason.into(),
                })
                .inc_by(count);
        }
    }

    pub fn count_pending_approvals(&self, repositories: u64) {
        if repositories > 0 {
            self.cleanup_pending_approvals.inc_by(repositories);
        }
    }

    /// The time of the Upstream's latest connection test.
    pub fn connectivity_checked(&self, namespace: &str, name: &str, time: jiff::Timestamp) {
        self.upstream_last_connectivity_check
            .get_or_create(&ObjectLabels {
                namespace: namespace.into(),
                name: name.into(),
            })
            .set(time.as_millisecond() as f64 / 1000.0);
    }

    /// Drops the series of an Upstream that is gone.
    pub fn forget_upstream(&self, namespace: &str, name: &str) {
        self.upstream_last_connectivity_check.remove(&ObjectLabels {
            namespace: namespace.into(),
            name: name.into(),
        });
    }

    pub fn count_run(&self, outcome: &str) {
        self.cleanup_runs
            .get_or_create(&RunLabels {
                outcome: outcome.into(),
            })
            .inc();
    }
}

impl RequestObserver for Metrics {
    fn observe(&self, method: &str, route_template: &str, status: Option<u16>, latency: Duration) {
        let status = status.map_or_else(|| "none".to_string(), |s| s.to_string());
        self.gitlab_requests
            .get_or_create(&RequestLabels {
                method: method.into(),
                route: route_template.into(),
                status,
            })
            .inc();
        self.gitlab_request_duration
            .get_or_create(&RouteLabels {
                method: method.into(),
                route: route_template.into(),
            })
            .observe(latency.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_carries_every_family_with_bounded_labels() {
        let metrics = Metrics::default();
        metrics.reconcile_started("Upstream");
        metrics.reconcile_finished(
            "Upstream",
            Duration::from_millis(20),
            Some("GitLabUnavailable"),
        );
        metrics.observe(
            "GET",
            "/virtual_registries/container/upstreams/:id",
            Some(200),
            Duration::from_millis(3),
        );
        metrics.count_tags("deleted", "none", 4);
        metrics.count_run("Succeeded");
        metrics.connectivity_checked(
            "team",
            "dockerhub",
            jiff::Timestamp::from_second(1_700_000_000).expect("valid"),
        );
        let text = metrics.encode();
        assert!(
            text.contains("gitlab_registry_operator_upstream_last_connectivity_check_timestamp_seconds{namespace=\"team\",name=\"dockerhub\"} 1700000000"),
            "{text}"
        );
        metrics.forget_upstream("team", "dockerhub");
        assert!(!metrics.encode().contains("name=\"dockerhub\""));
        assert!(
            text.contains("gitlab_registry_operator_reconciles_total{kind=\"Upstream\"} 1"),
            "{text}"
        );
        assert!(text.contains("gitlab_registry_operator_reconcile_errors_total{kind=\"Upstream\",reason=\"GitLabUnavailable\"} 1"));
        assert!(
            text.contains("route=\"/virtual_registries/container/upstreams/:id\",status=\"200\"")
        );
        assert!(text.contains(
            "gitlab_registry_operator_cleanup_tags_total{outcome=\"deleted\",reason=\"none\"} 4"
        ));
        assert!(
            text.contains("gitlab_registry_operator_cleanup_runs_total{outcome=\"Succeeded\"} 1")
        );
        assert!(
            !text.contains("last_successful_reconcile_timestamp_seconds{"),
            "a failed reconcile is no success: {text}"
        );
    }

    #[test]
    fn a_success_stamps_its_kind_and_reachability_follows_the_condition() {
        let metrics = Metrics::default();
        metrics.reconcile_finished("CleanupPolicy", Duration::from_millis(5), None);
        let text = metrics.encode();
        let stamp: f64 = text
            .lines()
            .find_map(|line| {
                line.strip_prefix(
                    "gitlab_registry_operator_last_successful_reconcile_timestamp_seconds{kind=\"CleanupPolicy\"} ",
                )
            })
            .expect("stamped")
            .parse()
            .expect("a number");
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs_f64();
        assert!(stamp > now - 3600.0 && stamp <= now, "{stamp} vs {now}");

        let series =
            "gitlab_registry_operator_upstream_reachable{namespace=\"team\",name=\"quay\"}";
        metrics.upstream_reachability("team", "quay", Some(false));
        assert!(metrics.encode().contains(&format!("{series} 0")));
        metrics.upstream_reachability("team", "quay", Some(true));
        assert!(metrics.encode().contains(&format!("{series} 1")));
        metrics.upstream_reachability("team", "quay", None);
        assert!(!metrics.encode().contains(series));
    }
}
