//! Where a restored partition starts reading: the snapshot's offset, checked against the log
//! (docs/architecture.md, "Restore, and offsets checked, not trusted").
//!
//! A snapshot says "records before `next_offset` are in this state". That is only true of the
//! log the snapshot was taken on. When the log says otherwise, skipping to the snapshot's offset
//! would skip records nobody processed, silently: a topic deleted and created again starts over
//! at offset 0 (every new record would be below the snapshot's offset), and retention may have
//! removed records no snapshot covered. So the offset is checked against the log's start and
//! end offsets and the topic's id (Kafka topic ids, KIP-516), and on any contradiction the
//! partition keeps what stays exact — the actors' state, whose effects are idempotent — and
//! reads whatever the log holds from its start. The mismatch is reported: an error log, a
//! metric, and a field of the partition's status.

use serde::Serialize;

use crate::kafka::LogPosition;

/// How a snapshot's offset contradicts the log it is restored on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MismatchKind {
    /// The snapshot was taken on another incarnation of the topic (its id differs).
    OtherTopicId,
    /// The snapshot's offset is above the log's end: the log lost records it once had.
    AboveEnd,
    /// The snapshot's offset is below the log's start: retention removed records that no
    /// snapshot covered, which can no longer be read.
    BelowStart,
}

impl MismatchKind {
    /// The label used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OtherTopicId => "other_topic_id",
            Self::AboveEnd => "above_end",
            Self::BelowStart => "below_start",
        }
    }
}

/// A snapshot offset the log contradicted, and what was done instead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OffsetMismatch {
    pub kind: MismatchKind,
    /// The snapshot's next offset.
    pub snapshot_offset: i64,
    /// The topic id the snapshot was taken on (absent for snapshots stored before topic ids
    /// were recorded).
    pub snapshot_topic_id: Option<String>,
    /// The log as found: start and end offsets and topic id.
    pub log_start: i64,
    pub log_end: i64,
    pub topic_id: String,
    /// Where the partition reads from instead (the log's start).
    pub resumed_at: i64,
}

impl OffsetMismatch {
    /// One sentence for the error log.
    pub fn describe(&self) -> String {
        match self.kind {
            MismatchKind::OtherTopicId => format!(
                "the snapshot (next offset {}) was taken on topic id {}, the topic is now {}: \
                 the topic was deleted and created again; reading its new log from offset {}",
                self.snapshot_offset,
                self.snapshot_topic_id.as_deref().unwrap_or("?"),
                self.topic_id,
                self.resumed_at
            ),
            MismatchKind::AboveEnd => format!(
                "the snapshot's next offset {} is above the log's end offset {}: the log lost \
                 records it once held; reading from offset {}",
                self.snapshot_offset, self.log_end, self.resumed_at
            ),
            MismatchKind::BelowStart => format!(
                "the snapshot's next offset {} is below the log's start offset {}: records {}..{} \
                 were removed before any snapshot covered them and cannot be read",
                self.snapshot_offset, self.log_start, self.snapshot_offset, self.log_start
            ),
        }
    }
}

/// Where to start reading a partition restored from a snapshot whose next offset is
/// `snapshot_offset` (0 without a snapshot) taken on topic id `snapshot_topic_id`, on the log
/// `log`; with the mismatch when the log contradicts the snapshot.
pub fn start_offset(
    snapshot_offset: i64,
    snapshot_topic_id: Option<&str>,
    log: &LogPosition,
) -> (i64, Option<OffsetMismatch>) {
    let kind = if snapshot_topic_id.is_some_and(|id| id != log.topic_id) {
        Some(MismatchKind::OtherTopicId)
    } else if snapshot_offset > log.end {
        Some(MismatchKind::AboveEnd)
    } else if snapshot_offset < log.start {
        Some(MismatchKind::BelowStart)
    } else {
        None
    };
    match kind {
        None => (snapshot_offset, None),
        Some(kind) => (
            log.start,
            Some(OffsetMismatch {
                kind,
                snapshot_offset,
                snapshot_topic_id: snapshot_topic_id.map(str::to_owned),
                log_start: log.start,
                log_end: log.end,
                topic_id: log.topic_id.clone(),
                resumed_at: log.start,
            }),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(start: i64, end: i64, id: &str) -> LogPosition {
        LogPosition {
            start,
            end,
            topic_id: id.to_owned(),
        }
    }

    #[test]
    fn a_snapshot_within_the_log_of_its_topic_is_trusted() {
        assert_eq!(start_offset(37, Some("A"), &log(0, 40, "A")), (37, None));
        assert_eq!(start_offset(40, Some("A"), &log(10, 40, "A")), (40, None));
        assert_eq!(start_offset(10, Some("A"), &log(10, 40, "A")), (10, None));
        // No snapshot: the log's start.
        assert_eq!(start_offset(0, None, &log(0, 5, "A")), (0, None));
        // Snapshots stored before topic ids were recorded are checked by offsets alone.
        assert_eq!(start_offset(3, None, &log(0, 5, "A")), (3, None));
    }

    #[test]
    fn a_recreated_topic_is_read_from_its_start_whatever_the_offsets() {
        let (start, m) = start_offset(37, Some("A"), &log(0, 0, "B"));
        assert_eq!(start, 0);
        let m = m.expect("mismatch");
        assert_eq!(m.kind, MismatchKind::OtherTopicId);
        // Even when the new log has grown past the snapshot's offset.
        let (start, m) = start_offset(5, Some("A"), &log(0, 50, "B"));
        assert_eq!(
            (start, m.map(|m| m.kind)),
            (0, Some(MismatchKind::OtherTopicId))
        );
    }

    #[test]
    fn offsets_outside_the_log_are_named() {
        let (start, m) = start_offset(37, None, &log(0, 12, "A"));
        assert_eq!(
            (start, m.as_ref().map(|m| m.kind)),
            (0, Some(MismatchKind::AboveEnd))
        );
        assert!(m
            .expect("mismatch")
            .describe()
            .contains("above the log's end offset 12"));
        let (start, m) = start_offset(3, Some("A"), &log(8, 12, "A"));
        assert_eq!(
            (start, m.as_ref().map(|m| m.kind)),
            (8, Some(MismatchKind::BelowStart))
        );
        assert!(m.expect("mismatch").describe().contains("records 3..8"));
        // No snapshot while retention removed the log's first records: those were never
        // processed here, and that is reported too.
        let (start, m) = start_offset(0, None, &log(8, 12, "A"));
        assert_eq!(
            (start, m.map(|m| m.kind)),
            (8, Some(MismatchKind::BelowStart))
        );
    }
}
