//! `/metrics` of a running pipeline: the series its parts count into (registered in
//! [`crate::metrics::PipelineMetrics`]) and, read at scrape time by [`StatusCollector`], the
//! figures that live in the actors, the database and the notification hub.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use tracing::warn;

use crate::metrics::{pipeline_up, render, Registry};
use crate::pipeline::status::{PartitionStatus, PipelineStatus};
use crate::pipeline::Pipeline;

/// Help texts of the per-partition counters in `/metrics`.
const PARTITION_COUNTERS: [(&str, &str); 12] = [
    ("batches", "Batches the partition's supervisor handled"),
    (
        "events",
        "Routed event copies (home and halo) the zone partition handled",
    ),
    (
        "late_events",
        "Event copies that arrived later than the watermark (matched by the late path against the copies their zone saw before)",
    ),
    ("updates", "Per-person updates the person partition handled"),
    (
        "colocations",
        "Co-locations accepted by the person partition (repeats excluded)",
    ),
    (
        "episode_changes",
        "Episode changes (opened, grown, reshaped, closed) written to connection",
    ),
    (
        "notifications",
        "Notifications produced to the connections topic",
    ),
    ("passivations", "Person actors passivated"),
    ("activations", "Person actors activated"),
    ("panics", "Actor panics"),
    ("restarts", "Actor restarts after a panic"),
    (
        "port_retries",
        "Retries of a failed effect (PostgreSQL or the broker away)",
    ),
];

/// The scrape-time series of one [`PipelineStatus`].
#[derive(Debug)]
struct StatusCollector(PipelineStatus);

/// `{stage, partition}`.
type PartitionLabels = [(&'static str, String); 2];

impl StatusCollector {
    fn owned(&self) -> impl Iterator<Item = (PartitionLabels, &PartitionStatus)> {
        self.0.stages.iter().flat_map(|s| {
            s.partitions.iter().map(move |p| {
                (
                    [
                        ("stage", s.stage.as_str().to_owned()),
                        ("partition", p.partition.to_string()),
                    ],
                    p,
                )
            })
        })
    }
}

/// Writes one family of `kind` (a counter's `name` without `_total`), one series per labels;
/// [`single`] writes one unlabelled series.
fn family<L: prometheus_client::encoding::EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    (name, help): (&str, &str),
    kind: MetricType,
    samples: impl IntoIterator<Item = (L, f64)>,
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in samples {
        sample(kind, value, family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Writes one unlabelled series of `kind` (a counter's `name` without `_total`).
fn single(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    value: f64,
) -> std::fmt::Result {
    sample(
        kind,
        value,
        encoder.encode_descriptor(name, help, None, kind)?,
    )
}

/// One value: a counter's as a whole number, a gauge's as it is (NaN included).
fn sample(
    kind: MetricType,
    value: f64,
    encoder: prometheus_client::encoding::MetricEncoder<'_>,
) -> std::fmt::Result {
    match kind {
        MetricType::Counter => ConstCounter::new(value as u64).encode(encoder),
        _ => ConstGauge::new(value).encode(encoder),
    }
}

impl StatusCollector {
    /// The owned partitions' gauges and counters.
    fn encode_partitions(&self, encoder: &mut DescriptorEncoder) -> std::fmt::Result {
        type Gauge = (&'static str, &'static str, fn(&PartitionStatus) -> f64);
        let partition_gauges: [Gauge; 4] = [
            (
                "udaconnect_partition_lag",
                "Records of an owned partition not processed yet (negative: the log ends before \
                 what was processed; NaN: unknown)",
                |p| p.lag.map_or(f64::NAN, |lag| lag as f64),
            ),
            (
                "udaconnect_partition_actors",
                "Zone actors, or active person actors, of an owned partition",
                |p| p.figures.actors as f64,
            ),
            (
                "udaconnect_partition_passivated_persons",
                "Passivated persons of an owned person partition",
                |p| p.figures.passivated as f64,
            ),
            (
                "udaconnect_partition_watermark_seconds",
                "Event-time watermark of an owned partition, seconds since the epoch",
                |p| {
                    if p.figures.watermark == i64::MIN {
                        f64::NAN
                    } else {
                        p.figures.watermark as f64 / 1e6
                    }
                },
            ),
        ];
        for (name, help, value) in partition_gauges {
            family(
                encoder,
                (name, help),
                MetricType::Gauge,
                self.owned().map(|(l, p)| (l, value(p))),
            )?;
        }
        for (counter, help) in PARTITION_COUNTERS {
            let samples: Vec<(PartitionLabels, f64)> = self
                .owned()
                .filter_map(|(l, p)| Some((l, *p.figures.counters.get(counter)? as f64)))
                .collect();
            if !samples.is_empty() {
                family(
                    encoder,
                    (
                        &format!("udaconnect_partition_{counter}"),
                        &format!("{help}, since the partition was assigned to this process"),
                    ),
                    MetricType::Counter,
                    samples,
                )?;
            }
        }
        Ok(())
    }

    /// This process's figures: lag, snapshot ages, the notification hub.
    fn encode_process(&self, encoder: &mut DescriptorEncoder) -> std::fmt::Result {
        let status = &self.0;
        single(
            encoder,
            "udaconnect_lag_total",
            "Records of this process's partitions not processed yet",
            MetricType::Gauge,
            status.lag_total as f64,
        )?;
        family(
            encoder,
            (
                "udaconnect_snapshot_age_seconds",
                "Age of the stored snapshot of a partition this process owns",
            ),
            MetricType::Gauge,
            status
                .owners
                .iter()
                .filter(|o| o.owner == status.node)
                .filter_map(|o| {
                    let labels = [
                        ("stage", o.stage.clone()),
                        ("partition", o.partition.to_string()),
                    ];
                    Some((labels, o.snapshot_age_s?))
                }),
        )?;
        let hub = &status.hub;
        let hub_counters = [
            (
                "received",
                "Records the notification hub read",
                hub.received,
            ),
            (
                "repeats",
                "Notifications the hub dropped as repeats (replays)",
                hub.repeats,
            ),
            (
                "malformed",
                "Records of the connections topic that were not notifications",
                hub.malformed,
            ),
            (
                "delivered",
                "Notifications handed to subscribers",
                hub.delivered,
            ),
            (
                "slow_subscribers_dropped",
                "Subscribers disconnected for falling behind",
                hub.slow_subscribers_dropped,
            ),
            (
                "erased_dropped",
                "Notifications dropped because they are about an erased person",
                hub.erased_dropped,
            ),
        ];
        for (name, help, value) in hub_counters {
            single(
                encoder,
                &format!("udaconnect_hub_{name}"),
                help,
                MetricType::Counter,
                value as f64,
            )?;
        }
        single(
            encoder,
            "udaconnect_hub_subscribers",
            "Live notification subscribers",
            MetricType::Gauge,
            hub.subscribers as f64,
        )
    }
}

impl Collector for StatusCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        self.encode_partitions(&mut encoder)?;
        self.encode_process(&mut encoder)
    }
}

impl Pipeline {
    /// This process's metrics in the Prometheus text format (version 0.0.4): the registered
    /// series, then the scrape-time figures of [`Pipeline::status`].
    pub async fn prometheus(&self) -> String {
        let status = self.status().await;
        if let Some(e) = &status.owners_error {
            warn!(error = e, "metrics without the owner rows");
        }
        let mut scrape = Registry::default();
        scrape.register_collector(Box::new(StatusCollector(status)));
        render(&[&pipeline_up(true), &self.registry, &scrape])
    }
}
