//! Counters and a latency histogram, rendered in the Prometheus text format. Lock-free atomics;
//! knows no other module.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the delivery latency buckets.
const BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// What the store reports, handed in by the caller (this module knows no other).
#[derive(Debug, Default, Clone, Copy)]
pub struct StoreFigures {
    pub commits: u64,
    pub rounds: u64,
    pub flush_seconds: f64,
    pub sync_seconds: f64,
}

/// What became of a submission (`chartbridge_submissions_total`'s `outcome`); in the order of
/// `Outcome::ALL`, which its discriminant indexes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Accepted,
    /// A new revision of a submission accepted before (its payload changed).
    Revised,
    /// The same submission again: answered as before, nothing new.
    Duplicate,
    /// Refused for what was sent (a 4xx), or while the outbox is full.
    Rejected,
    /// Its signature or key did not check out.
    Unauthorized,
    /// A notification whose submission could not be fetched from the source's API.
    Unfetched,
    /// The gateway's own failure (a 500: the store).
    Failed,
    /// A post its mapping's `accept_when` does not take (a step of a multi-step form).
    Ignored,
}

impl Outcome {
    const ALL: [Outcome; 8] = [
        Outcome::Accepted,
        Outcome::Revised,
        Outcome::Duplicate,
        Outcome::Rejected,
        Outcome::Unauthorized,
        Outcome::Unfetched,
        Outcome::Failed,
        Outcome::Ignored,
    ];

    fn label(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Revised => "revised",
            Outcome::Duplicate => "duplicate",
            Outcome::Rejected => "rejected",
            Outcome::Unauthorized => "unauthorized",
            Outcome::Unfetched => "unfetched",
            Outcome::Failed => "failed",
            Outcome::Ignored => "ignored",
        }
    }
}

/// One counter per outcome.
#[derive(Default)]
struct Outcomes([AtomicU64; Outcome::ALL.len()]);

#[derive(Default)]
pub struct Metrics {
    /// Submissions by mapping (those loaded at start: the label set is bounded) and outcome.
    submissions: std::collections::BTreeMap<String, Outcomes>,
    /// Submissions no loaded mapping is named for (an unknown id, a response to no mapping's
    /// Questionnaire, a body that names none): counted without a mapping, by outcome.
    unattributed: Outcomes,
    pub deliveries_ok: AtomicU64,
    pub delivery_retries: AtomicU64,
    pub dead_letters: AtomicU64,
    /// The retention sweep: Bundles deleted, Bundles moved (still needed), segments deleted.
    pub bundles_expired: AtomicU64,
    pub bundles_moved: AtomicU64,
    pub bundle_segments_deleted: AtomicU64,
    /// Audit entries removed past their retention.
    pub audit_entries_forgotten: AtomicU64,
    /// Refused operators' attempts over the audit trail's rate, counted instead of recorded.
    pub operator_refusals_unrecorded: AtomicU64,
    /// Events sent to webhook receivers, by receiver and outcome (`delivered`, `retried`,
    /// `dead_lettered`): a few receivers, a few outcomes.
    webhooks: std::sync::Mutex<std::collections::BTreeMap<(String, &'static str), u64>>,
    /// Events received (`POST /events/<sender>`, the poller), by sender and what came of them.
    inbound: std::sync::Mutex<std::collections::BTreeMap<(String, &'static str), u64>>,
    latency_buckets: [AtomicU64; BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_micros: AtomicU64,
}

impl Metrics {
    /// Counters for these mappings' submissions, the rest at zero.
    pub fn for_mappings<'a>(ids: impl IntoIterator<Item = &'a str>) -> Metrics {
        Metrics {
            submissions: ids
                .into_iter()
                .map(|id| (id.to_string(), Outcomes::default()))
                .collect(),
            ..Metrics::default()
        }
    }

    /// Counts a submission to `mapping` (`None`: none loaded is named).
    pub fn submission(&self, mapping: Option<&str>, outcome: Outcome) {
        let of = mapping
            .and_then(|m| self.submissions.get(m))
            .unwrap_or(&self.unattributed);
        Metrics::inc(&of.0[outcome as usize]);
    }

    pub fn inc(counter: &AtomicU64) {
        Metrics::add(counter, 1);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts an event's delivery attempt to `receiver`: `delivered`, `retried`, `dead_lettered`.
    pub fn count_webhook(&self, receiver: &str, outcome: &'static str) {
        let mut m = self
            .webhooks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *m.entry((receiver.to_string(), outcome)).or_default() += 1;
    }

    /// Counts an inbound event from `sender` (a configured one: the label set is bounded) by
    /// what came of it: `queued`, `unchanged`, `duplicate`, `unmatched`, `status`, `refused`.
    pub fn count_inbound(&self, sender: &str, outcome: &'static str) {
        let mut m = self
            .inbound
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *m.entry((sender.to_string(), outcome)).or_default() += 1;
    }

    /// How many inbound events from `sender` came to `outcome` so far.
    pub fn inbound_count(&self, sender: &str, outcome: &'static str) -> u64 {
        let m = self
            .inbound
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        m.get(&(sender.to_string(), outcome)).copied().unwrap_or(0)
    }

    pub fn observe_delivery(&self, took: Duration) {
        let secs = took.as_secs_f64();
        for (bucket, bound) in self.latency_buckets.iter().zip(BUCKETS) {
            if secs <= bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    /// The Prometheus exposition text; the store's figures are read by the caller.
    pub fn render(
        &self,
        outbox_depth: usize,
        dead_letters: usize,
        store: &StoreFigures,
        events: &EventFigures,
    ) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# HELP chartbridge_submissions_total Submissions received, by mapping and outcome."
        );
        let _ = writeln!(s, "# TYPE chartbridge_submissions_total counter");
        let by_mapping = self
            .submissions
            .iter()
            .map(|(m, counts)| (format!("mapping=\"{m}\","), counts));
        for (mapping, counts) in by_mapping.chain([(String::new(), &self.unattributed)]) {
            for (outcome, c) in Outcome::ALL.iter().zip(&counts.0) {
                let _ = writeln!(
                    s,
                    "chartbridge_submissions_total{{{mapping}outcome=\"{}\"}} {}",
                    outcome.label(),
                    get(c)
                );
            }
        }
        for (name, help, c) in [
            (
                "chartbridge_deliveries_total",
                "Submissions delivered to the EHR.",
                &self.deliveries_ok,
            ),
            (
                "chartbridge_delivery_retries_total",
                "Delivery attempts that will be retried.",
                &self.delivery_retries,
            ),
            (
                "chartbridge_dead_letters_total",
                "Submissions the EHR rejected for good.",
                &self.dead_letters,
            ),
            (
                "chartbridge_operator_refusals_unrecorded_total",
                "Refused operators' attempts over the audit trail's rate: counted, not recorded one by one.",
                &self.operator_refusals_unrecorded,
            ),
        ] {
            let _ = writeln!(
                s,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                get(c)
            );
        }
        let _ = writeln!(
            s,
            "# HELP chartbridge_outbox_depth Deliveries waiting in the outbox."
        );
        let _ = writeln!(
            s,
            "# TYPE chartbridge_outbox_depth gauge\nchartbridge_outbox_depth {outbox_depth}"
        );
        let _ = writeln!(
            s,
            "# HELP chartbridge_dead_lettered Submissions dead-lettered now (not replayed since)."
        );
        let _ = writeln!(
            s,
            "# TYPE chartbridge_dead_lettered gauge\nchartbridge_dead_lettered {dead_letters}"
        );
        for (name, help, value) in [
            (
                "chartbridge_store_commits_total",
                "Durable commits asked for.",
                store.commits as f64,
            ),
            (
                "chartbridge_store_commit_rounds_total",
                "Flush + fdatasync rounds (one covers many commits).",
                store.rounds as f64,
            ),
            (
                "chartbridge_store_flush_seconds_total",
                "Time in sled's flush.",
                store.flush_seconds,
            ),
            (
                "chartbridge_store_fdatasync_seconds_total",
                "Time in fdatasync.",
                store.sync_seconds,
            ),
            (
                "chartbridge_bundles_expired_total",
                "Delivered submissions' Bundles deleted past their retention.",
                get(&self.bundles_expired) as f64,
            ),
            (
                "chartbridge_bundles_moved_total",
                "Bundles still needed moved out of a segment past its retention.",
                get(&self.bundles_moved) as f64,
            ),
            (
                "chartbridge_bundle_segments_deleted_total",
                "Bundle log segments deleted by the retention sweep.",
                get(&self.bundle_segments_deleted) as f64,
            ),
            (
                "chartbridge_audit_entries_forgotten_total",
                "Audit trail entries removed past their retention.",
                get(&self.audit_entries_forgotten) as f64,
            ),
        ] {
            let _ = writeln!(
                s,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        }
        self.render_events(&mut s, events);
        let _ = writeln!(
            s,
            "# HELP chartbridge_delivery_seconds Time of one delivery attempt."
        );
        let _ = writeln!(s, "# TYPE chartbridge_delivery_seconds histogram");
        for (bucket, bound) in self.latency_buckets.iter().zip(BUCKETS) {
            let _ = writeln!(
                s,
                "chartbridge_delivery_seconds_bucket{{le=\"{bound}\"}} {}",
                get(bucket)
            );
        }
        let count = get(&self.latency_count);
        let _ = writeln!(
            s,
            "chartbridge_delivery_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            s,
            "chartbridge_delivery_seconds_sum {}",
            get(&self.latency_sum_micros) as f64 / 1e6
        );
        let _ = writeln!(s, "chartbridge_delivery_seconds_count {count}");
        s
    }
}

/// What the store says of the webhook receivers and the inbound events, read by the caller.
#[derive(Debug, Default, Clone)]
pub struct EventFigures {
    /// Per webhook receiver: events waiting, events dead-lettered now.
    pub receivers: Vec<(String, usize, usize)>,
    /// Inbound events kept as unmatched.
    pub unmatched: usize,
}

impl Metrics {
    fn render_events(&self, s: &mut String, events: &EventFigures) {
        let _ = writeln!(
            s,
            "# HELP chartbridge_events_waiting Events waiting in the outbox, by receiver.\n# TYPE chartbridge_events_waiting gauge"
        );
        for (receiver, waiting, _) in &events.receivers {
            let _ = writeln!(
                s,
                "chartbridge_events_waiting{{receiver=\"{receiver}\"}} {waiting}"
            );
        }
        let _ = writeln!(
            s,
            "# HELP chartbridge_events_dead_lettered Events dead-lettered now (not replayed since), by receiver.\n# TYPE chartbridge_events_dead_lettered gauge"
        );
        for (receiver, _, dead) in &events.receivers {
            let _ = writeln!(
                s,
                "chartbridge_events_dead_lettered{{receiver=\"{receiver}\"}} {dead}"
            );
        }
        let _ = writeln!(
            s,
            "# HELP chartbridge_events_sent_total Event delivery attempts, by receiver and outcome.\n# TYPE chartbridge_events_sent_total counter"
        );
        let sent = self
            .webhooks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for ((receiver, outcome), n) in sent.iter() {
            let _ = writeln!(
                s,
                "chartbridge_events_sent_total{{receiver=\"{receiver}\",outcome=\"{outcome}\"}} {n}"
            );
        }
        drop(sent);
        let _ = writeln!(
            s,
            "# HELP chartbridge_inbound_events_total Events received, by sender and what came of them.\n# TYPE chartbridge_inbound_events_total counter"
        );
        let inbound = self
            .inbound
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for ((sender, outcome), n) in inbound.iter() {
            let _ = writeln!(
                s,
                "chartbridge_inbound_events_total{{sender=\"{sender}\",outcome=\"{outcome}\"}} {n}"
            );
        }
        drop(inbound);
        let _ = writeln!(
            s,
            "# HELP chartbridge_events_unmatched Inbound events that resolved to no submission, kept for operators.\n# TYPE chartbridge_events_unmatched gauge\nchartbridge_events_unmatched {}",
            events.unmatched
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_buckets() {
        let m = Metrics::for_mappings(["phq9-typeform", "refill-request-portal"]);
        m.submission(Some("phq9-typeform"), Outcome::Accepted);
        m.submission(Some("phq9-typeform"), Outcome::Accepted);
        m.submission(Some("refill-request-portal"), Outcome::Failed);
        m.submission(None, Outcome::Rejected);
        m.submission(Some("not-loaded"), Outcome::Rejected);
        m.observe_delivery(Duration::from_millis(30));
        m.count_webhook("crm", "delivered");
        m.count_inbound("ehr", "unmatched");
        let text = m.render(
            3,
            1,
            &StoreFigures {
                commits: 4,
                rounds: 2,
                ..Default::default()
            },
            &EventFigures {
                receivers: vec![("crm".into(), 2, 1)],
                unmatched: 5,
            },
        );
        for line in [
            "chartbridge_submissions_total{mapping=\"phq9-typeform\",outcome=\"accepted\"} 2",
            "chartbridge_submissions_total{mapping=\"phq9-typeform\",outcome=\"failed\"} 0",
            "chartbridge_submissions_total{mapping=\"refill-request-portal\",outcome=\"failed\"} 1",
            "chartbridge_submissions_total{outcome=\"rejected\"} 2",
            "chartbridge_submissions_total{outcome=\"accepted\"} 0",
            "chartbridge_events_waiting{receiver=\"crm\"} 2",
            "chartbridge_events_dead_lettered{receiver=\"crm\"} 1",
            "chartbridge_events_sent_total{receiver=\"crm\",outcome=\"delivered\"} 1",
            "chartbridge_inbound_events_total{sender=\"ehr\",outcome=\"unmatched\"} 1",
            "chartbridge_events_unmatched 5",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in {text}");
        }
        assert!(!text.contains("not-loaded"));
        assert!(
            Outcome::ALL
                .iter()
                .enumerate()
                .all(|(i, o)| *o as usize == i),
            "ALL in declaration order: the discriminant indexes the counters"
        );
        assert!(text.contains("chartbridge_outbox_depth 3"));
        assert!(text.contains("chartbridge_dead_lettered 1"));
        assert!(text.contains("chartbridge_store_commit_rounds_total 2"));
        assert!(text.contains("chartbridge_delivery_seconds_bucket{le=\"0.025\"} 0"));
        assert!(text.contains("chartbridge_delivery_seconds_bucket{le=\"0.05\"} 1"));
        assert!(text.contains("chartbridge_delivery_seconds_bucket{le=\"+Inf\"} 1"));
    }
}
