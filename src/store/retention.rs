//! Retention of location data (docs/design.md §6): reports whose `recorded_at` is older than
//! `retention_days` are deleted by the service itself, from `location` (the reports) and
//! `halo_copy` (their ghost copies for the late path), in batches, off the hot path.
//!
//! Every process runs a pass hourly; the passes take turns (a PostgreSQL advisory lock: a
//! process that finds another's pass running skips its own); a pass deletes at most [`BATCH`] rows per statement, each statement its own
//! transaction, with a pause between them, so that ingest's writes are never held up behind
//! one large delete. What a pass deletes is counted in `udaconnect_retention_deleted_total`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics::RetentionCounters;
use crate::store::StoreError;

/// Rows one statement deletes at most.
pub const BATCH: i64 = 10_000;
/// Between two passes.
pub const INTERVAL: Duration = Duration::from_secs(3600);
/// Before the first pass after start-up (the pipeline comes first).
const FIRST_PASS_AFTER: Duration = Duration::from_secs(60);
/// Between two batches of a pass.
const PAUSE: Duration = Duration::from_millis(50);
/// The advisory lock that lets one process of the cluster run a pass at a time ("udacRet0").
const LOCK_KEY: i64 = 0x7564_6163_5265_7430;

/// What one retention pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionPass {
    /// Reports deleted from `location`.
    pub locations: u64,
    /// Ghost copies deleted from `halo_copy`.
    pub halo_copies: u64,
    /// Another process was running a pass: this one deleted nothing.
    pub skipped: bool,
}

/// A pooled connection taken out of the pool when dropped: its session ends, and with it any
/// advisory lock it holds.
struct Session(Option<deadpool_postgres::Object>);

impl Session {
    fn client(&self) -> &deadpool_postgres::Object {
        self.0.as_ref().expect("held until dropped")
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(object) = self.0.take() {
            drop(deadpool_postgres::Object::take(object));
        }
    }
}

/// Deletes reports older than a retention period.
#[derive(Clone)]
pub struct Retention {
    pool: Pool,
    keep: chrono::Duration,
    batch: i64,
    counters: RetentionCounters,
}

impl Retention {
    /// Retention of `days` days (at least 1; `Config::validate` keeps it at most 36,500) on
    /// `pool`, counting into `counters`.
    pub fn new(pool: Pool, days: u32, counters: RetentionCounters) -> Self {
        Self {
            pool,
            keep: chrono::Duration::days(i64::from(days.max(1))),
            batch: BATCH,
            counters,
        }
    }

    /// The same with at most `batch` rows per statement (tests exercise several batches).
    pub fn with_batch(mut self, batch: i64) -> Self {
        self.batch = batch.max(1);
        self
    }

    /// The oldest `recorded_at` kept at `now`: rows strictly older are deleted.
    pub fn cutoff(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        now - self.keep
    }

    /// Deletes every report (and ghost copy) recorded before [`Retention::cutoff`] of `now`,
    /// batch after batch until none is left, unless another process holds the pass's lock
    /// (then `skipped`). Stops before its next statement once `stop` is cancelled. Errors:
    /// PostgreSQL's ([`StoreError`]); what was deleted before stays deleted and counted.
    pub async fn pass(
        &self,
        now: DateTime<Utc>,
        stop: &CancellationToken,
    ) -> Result<RetentionPass, StoreError> {
        let cutoff = self.cutoff(now);
        // One session for the whole pass (an advisory lock belongs to the session that took
        // it), closed afterwards, never pooled: closing it releases the lock whatever happened,
        // a panic included.
        let session = Session(Some(self.pool.get().await?));
        let client = session.client();
        let locked: bool = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&LOCK_KEY])
            .await?
            .get(0);
        if !locked {
            return Ok(RetentionPass {
                skipped: true,
                ..RetentionPass::default()
            });
        }
        let mut done = RetentionPass::default();
        for (table, statement, counter, total) in [
            (
                "location",
                "DELETE FROM location WHERE id IN
                     (SELECT id FROM location WHERE recorded_at < $1 LIMIT $2)",
                &self.counters.locations,
                &mut done.locations,
            ),
            (
                "halo_copy",
                "DELETE FROM halo_copy WHERE (zone, event_id) IN
                     (SELECT zone, event_id FROM halo_copy WHERE recorded_at < $1 LIMIT $2)",
                &self.counters.halo_copies,
                &mut done.halo_copies,
            ),
        ] {
            let statement = client.prepare_cached(statement).await?;
            while !stop.is_cancelled() {
                let n = client.execute(&statement, &[&cutoff, &self.batch]).await?;
                counter.inc_by(n);
                *total += n;
                if n < self.batch as u64 {
                    break;
                }
                if *total % (self.batch as u64 * 10) == 0 {
                    info!(table, deleted = *total, %cutoff, "retention pass in progress");
                }
                tokio::time::sleep(PAUSE).await;
            }
        }
        if !stop.is_cancelled() {
            self.counters.passes.inc();
        }
        Ok(done)
    }

    /// Runs a pass a minute after start-up and then every [`INTERVAL`], until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let mut next = FIRST_PASS_AFTER;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(next) => {}
            }
            next = INTERVAL;
            let began = std::time::Instant::now();
            match self.pass(Utc::now(), &stop).await {
                Ok(pass) if pass.skipped => {
                    info!("retention pass skipped: another process is running one")
                }
                Ok(pass) => info!(
                    locations = pass.locations,
                    halo_copies = pass.halo_copies,
                    took_ms = began.elapsed().as_millis() as u64,
                    "retention pass done"
                ),
                Err(e) => warn!(error = %e, "retention pass failed; the next one retries"),
            }
        }
    }
}
