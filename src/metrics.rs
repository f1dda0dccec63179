//! `/metrics` in the Prometheus text format (version 0.0.4), kept with `prometheus-client`.
//!
//! Two kinds of series:
//! - counters and histograms the pipeline's parts count into as things happen. Their
//!   families are defined and registered once, in [`PipelineMetrics::register`]; each part
//!   holds the handles of its own series ([`IngestCounters`], [`StageCounters`],
//!   [`LocationCounters`], …), so counting is one atomic add;
//! - figures that live in the actors or the database (per-partition counters, lag,
//!   watermarks, snapshot ages, the notification hub): read at scrape time by the collector in
//!   `crate::pipeline::metrics`, from the same status `/v1/status` shows.

use std::sync::atomic::AtomicU64;

pub use prometheus_client::encoding::prometheus_text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
pub use prometheus_client::registry::Registry;
use udaconnect_actors::actors::ports::Stage;

/// A counter of seconds (fractional).
pub type SecondsCounter = Counter<f64, AtomicU64>;

/// Upper bounds of the batch-size histograms' buckets (1, 2, 4, … 8192, then +Inf).
pub const SIZE_BUCKETS: [f64; 14] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
];

/// A histogram of sizes (records or copies per batch) over [`SIZE_BUCKETS`].
pub fn size_histogram() -> Histogram {
    Histogram::new(SIZE_BUCKETS)
}

/// `{stage="zones"|"persons"|"ingest"}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabel {
    pub stage: &'static str,
}

/// `{table="location"|"halo_copy"}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabel {
    pub table: &'static str,
}

/// What retention counts (`crate::store::retention`).
#[derive(Debug, Clone, Default)]
pub struct RetentionCounters {
    /// Reports deleted from `location` and ghost copies from `halo_copy`.
    pub locations: Counter,
    pub halo_copies: Counter,
    /// Passes finished (a pass skipped because another process ran one is not counted).
    pub passes: Counter,
}

impl RetentionCounters {
    fn register(registry: &mut Registry) -> Self {
        let deleted = Family::<TableLabel, Counter>::default();
        registry.register(
            "udaconnect_retention_deleted",
            "Rows deleted because their report is older than retention_days, by table",
            deleted.clone(),
        );
        let passes = Counter::default();
        registry.register(
            "udaconnect_retention_passes",
            "Retention passes this process finished",
            passes.clone(),
        );
        Self {
            locations: deleted.get_or_create_owned(&TableLabel { table: "location" }),
            halo_copies: deleted.get_or_create_owned(&TableLabel { table: "halo_copy" }),
            passes,
        }
    }
}

/// `{result="accepted"|"rejected"}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

/// `{reason="ahead_of_clock"}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// `{stage, kind}` of a snapshot offset the log contradicted.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MismatchLabels {
    pub stage: &'static str,
    pub kind: &'static str,
}

/// What the ingest side counts.
#[derive(Debug, Clone)]
pub struct IngestCounters {
    /// Reports acknowledged by the broker, and reports refused.
    pub accepted: Counter,
    pub rejected: Counter,
    /// Locations records produced (each packs many routed copies).
    pub records: Counter,
    /// Routed copies (home and halo) per locations record: the packing.
    pub copies_per_record: Histogram,
    /// Accepted reports stamped further ahead of their receive time than `clock_skew_s`:
    /// matched with the time they carry, but trusted to move event time only that far.
    pub ahead_of_clock: Counter,
    /// Reports refused because their `event_id` was already a different report's.
    pub id_reused: Counter,
}

impl Default for IngestCounters {
    /// Counters that no registry exports (an ingestor outside a pipeline: the CLI, tests).
    fn default() -> Self {
        Self {
            accepted: Counter::default(),
            rejected: Counter::default(),
            records: Counter::default(),
            copies_per_record: size_histogram(),
            ahead_of_clock: Counter::default(),
            id_reused: Counter::default(),
        }
    }
}

/// What a stage's consumer counts.
#[derive(Debug, Clone)]
pub struct StageCounters {
    /// Records handed to the partitions' workers.
    pub records: Counter,
    /// Time the poll thread waited for room in a worker's channel (backpressure), seconds.
    pub backpressure_s: SecondsCounter,
    /// Records per worker batch.
    pub batch_records: Histogram,
    /// Snapshot stores given up because a release's budget ran out (its final snapshot, or
    /// the periodic one still being stored when it began): the next owner replayed from the
    /// snapshot before.
    pub snapshot_stores_abandoned: Counter,
}

impl Default for StageCounters {
    /// Counters that no registry exports.
    fn default() -> Self {
        Self {
            records: Counter::default(),
            backpressure_s: SecondsCounter::default(),
            batch_records: size_histogram(),
            snapshot_stores_abandoned: Counter::default(),
        }
    }
}

/// What the zone stage's location sink counts.
#[derive(Debug, Clone, Default)]
pub struct LocationCounters {
    /// Home events newly stored in `location`.
    pub stored: Counter,
    /// Late copies matched against the stored copies, and searches made for them.
    pub late_copies: Counter,
    pub late_searches: Counter,
    /// Reports dead-lettered because their id was already another report's.
    pub id_reused: Counter,
}

/// Every family the pipeline's parts count into, registered in one registry.
#[derive(Debug, Clone)]
pub struct PipelineMetrics {
    pub ingest: IngestCounters,
    pub zones: StageCounters,
    pub persons: StageCounters,
    pub locations: LocationCounters,
    /// Records sent to a dead-letter topic (both stages).
    pub dead_letters: Counter,
    /// Snapshot offsets the log contradicted, by stage and kind.
    pub mismatches: Family<MismatchLabels, Counter>,
    pub retention: RetentionCounters,
}

impl IngestCounters {
    /// Registers the ingest side's series; `id_reused` is the family it shares with the zone
    /// stage (`stage="ingest"` is counted here).
    fn register(registry: &mut Registry, id_reused: &Family<StageLabel, Counter>) -> Self {
        let events = Family::<ResultLabel, Counter>::default();
        registry.register(
            "udaconnect_ingest_events",
            "Location events the ingest path accepted (acknowledged by the broker) or rejected",
            events.clone(),
        );
        let untrusted = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "udaconnect_ingest_untrusted_times",
            "Accepted reports not trusted to move event time as far as their recorded_at, per \
             reason (ahead_of_clock: stamped more than clock_skew_s ahead of their receive time)",
            untrusted.clone(),
        );
        let ingest = Self {
            accepted: events.get_or_create_owned(&ResultLabel { result: "accepted" }),
            rejected: events.get_or_create_owned(&ResultLabel { result: "rejected" }),
            ahead_of_clock: untrusted.get_or_create_owned(&ReasonLabel {
                reason: "ahead_of_clock",
            }),
            id_reused: id_reused.get_or_create_owned(&StageLabel { stage: "ingest" }),
            ..Self::default()
        };
        registry.register(
            "udaconnect_ingest_records",
            "Records produced to the locations topic",
            ingest.records.clone(),
        );
        registry.register(
            "udaconnect_ingest_copies_per_record",
            "Routed event copies packed into one locations record",
            ingest.copies_per_record.clone(),
        );
        ingest
    }
}

impl LocationCounters {
    /// Registers the location sink's series (`stage="zones"` of `id_reused` is counted here).
    fn register(registry: &mut Registry, id_reused: &Family<StageLabel, Counter>) -> Self {
        let locations = Self {
            id_reused: id_reused.get_or_create_owned(&StageLabel { stage: "zones" }),
            ..Self::default()
        };
        registry.register(
            "udaconnect_late_searches",
            "Searches of the stored copies for late copies (one per zone batch that has any)",
            locations.late_searches.clone(),
        );
        registry.register(
            "udaconnect_late_copies_searched",
            "Late copies matched against the copies their zone saw before them (the late path)",
            locations.late_copies.clone(),
        );
        registry.register(
            "udaconnect_locations_stored",
            "Home events newly stored in the location table",
            locations.stored.clone(),
        );
        locations
    }
}

impl StageCounters {
    /// Registers the stage consumers' families; the zones' and the persons' series.
    fn register(registry: &mut Registry) -> (Self, Self) {
        let records = Family::<StageLabel, Counter>::default();
        registry.register(
            "udaconnect_stage_records",
            "Kafka records a stage handed to its partition workers",
            records.clone(),
        );
        let backpressure = Family::<StageLabel, SecondsCounter>::default();
        registry.register(
            "udaconnect_stage_backpressure_seconds",
            "Time a stage's poll thread waited for room in a partition worker's bounded channel",
            backpressure.clone(),
        );
        let batch_records =
            Family::<StageLabel, Histogram, fn() -> Histogram>::new_with_constructor(
                size_histogram,
            );
        registry.register(
            "udaconnect_stage_batch_records",
            "Kafka records per batch a partition worker handled",
            batch_records.clone(),
        );
        let abandoned = Family::<StageLabel, Counter>::default();
        registry.register(
            "udaconnect_stage_snapshot_stores_abandoned",
            "Snapshot stores given up because a partition release's release_budget_ms ran out; the next owner replayed from the snapshot before",
            abandoned.clone(),
        );
        let stage = |stage: Stage| {
            let label = StageLabel {
                stage: stage.as_str(),
            };
            Self {
                records: records.get_or_create_owned(&label),
                backpressure_s: backpressure.get_or_create_owned(&label),
                batch_records: batch_records.get_or_create_owned(&label),
                snapshot_stores_abandoned: abandoned.get_or_create_owned(&label),
            }
        };
        (stage(Stage::Zones), stage(Stage::Persons))
    }
}

impl PipelineMetrics {
    /// Creates the families, registers them in `registry` under their exported names, and
    /// creates every labelled series up front (so a zero shows as 0, not as absent);
    /// `mismatch_kinds` are the kinds of snapshot offset mismatch.
    pub fn register(registry: &mut Registry, mismatch_kinds: &[&'static str]) -> Self {
        let id_reused = Family::<StageLabel, Counter>::default();
        registry.register(
            "udaconnect_event_id_reused",
            "Reports whose event_id was already a different report's: refused at ingest (409), \
             or dead-lettered by the zone stage when ingest did not know the first",
            id_reused.clone(),
        );
        let ingest = IngestCounters::register(registry, &id_reused);
        let locations = LocationCounters::register(registry, &id_reused);
        let (zones, persons) = StageCounters::register(registry);
        let mismatches = Family::<MismatchLabels, Counter>::default();
        registry.register(
            "udaconnect_snapshot_offset_mismatches",
            "Snapshot offsets the log contradicted when a partition was restored (the topic \
             recreated, the log ending before the offset or starting after it), by kind",
            mismatches.clone(),
        );
        for stage in [Stage::Zones, Stage::Persons] {
            for kind in mismatch_kinds {
                mismatches.get_or_create_owned(&MismatchLabels {
                    stage: stage.as_str(),
                    kind,
                });
            }
        }
        let dead_letters = Counter::default();
        registry.register(
            "udaconnect_dead_letters",
            "Records sent to a dead-letter topic because they could not be read",
            dead_letters.clone(),
        );
        let retention = RetentionCounters::register(registry);
        Self {
            ingest,
            zones,
            persons,
            locations,
            dead_letters,
            mismatches,
            retention,
        }
    }
}

/// `udaconnect_pipeline_up`, 1 while this process's pipeline runs, and the registry it is in.
pub fn pipeline_up(up: bool) -> Registry {
    let mut registry = Registry::default();
    let gauge = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
    gauge.set(i64::from(up));
    registry.register(
        "udaconnect_pipeline_up",
        "Whether this process's pipeline runs",
        gauge,
    );
    registry
}

/// The text of `registries`, one after the other.
pub fn render(registries: &[&Registry]) -> String {
    let mut text = String::new();
    for r in registries {
        encode(&mut text, r).expect("writing to a String does not fail");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_format_has_help_type_labels_and_cumulative_buckets() {
        let mut registry = Registry::default();
        let m = PipelineMetrics::register(&mut registry, &["above_end"]);
        for size in [1, 3, 3, 5000, 100_000] {
            m.zones.batch_records.observe(size as f64);
        }
        m.ingest.accepted.inc_by(3);
        let text = render(&[&registry]);
        assert!(
            text.contains("# TYPE udaconnect_ingest_events_total counter\n"),
            "{text}"
        );
        assert!(text.contains("udaconnect_ingest_events_total{result=\"accepted\"} 3\n"));
        assert!(text.contains("udaconnect_ingest_events_total{result=\"rejected\"} 0\n"));
        let bucket = "udaconnect_stage_batch_records_bucket{stage=\"zones\",le=";
        for (le, n) in [("1", 1), ("4", 3), ("4096", 3), ("8192", 4), ("+Inf", 5)] {
            assert!(
                text.contains(&format!("{bucket}\"{le}\"}} {n}\n")),
                "{le}: {text}"
            );
        }
        assert!(text.contains("udaconnect_stage_batch_records_sum{stage=\"zones\"} 105007"));
        assert!(text.contains("udaconnect_stage_batch_records_count{stage=\"zones\"} 5\n"));
        assert!(text.contains(
            "udaconnect_snapshot_offset_mismatches_total{stage=\"persons\",kind=\"above_end\"} 0\n"
        ));
    }
}
