//! `udaconnect.v1.Ingest`: location events into the pipeline's ingest path, answered only
//! after the broker acknowledged them.

use std::sync::Arc;

use tonic::{Request, Response, Status, Streaming};
use udaconnect_actors::domain::NewLocationEvent;

use super::{caller, GrpcState};
use crate::auth::{Access, Principal};
use crate::error::ApiError;
use crate::proto::convert;
use crate::proto::v1::ingest_server::Ingest;
use crate::proto::v1::{Ack, IngestSummary, LocationEvent, Rejection};

/// Events of a stream sent to the broker together (one ingest call, packed per partition).
pub const STREAM_BATCH: usize = 1_000;

/// The Ingest service.
pub struct IngestService {
    state: Arc<GrpcState>,
}

impl IngestService {
    /// The service over the shared state.
    pub fn new(state: Arc<GrpcState>) -> Self {
        Self { state }
    }
}

/// Sends `batch` (stream index, event) through the ingest path; adds its outcome to `summary`.
async fn flush(
    state: &GrpcState,
    batch: &mut Vec<(u64, NewLocationEvent)>,
    summary: &mut IngestSummary,
) -> Result<(), ApiError> {
    if batch.is_empty() {
        return Ok(());
    }
    let pipeline = state.pipeline()?;
    let events: Vec<NewLocationEvent> = batch.iter().map(|(_, e)| *e).collect();
    let report = pipeline
        .ingestor()
        .ingest(&events)
        .await
        .map_err(ApiError::from)?;
    summary.accepted += report.accepted.len() as u64;
    summary
        .rejections
        .extend(report.rejected.into_iter().map(|r| Rejection {
            index: batch[r.index].0,
            field: r.error.field.to_owned(),
            reason: r.error.reason,
        }));
    batch.clear();
    Ok(())
}

#[tonic::async_trait]
impl Ingest for IngestService {
    async fn record(&self, request: Request<LocationEvent>) -> Result<Response<Ack>, Status> {
        let event = convert::new_location_event(request.get_ref())?;
        caller(&request)?.check(Access::Post {
            person: event.person_id,
        })?;
        let pipeline = self.state.pipeline()?;
        let report = pipeline
            .ingestor()
            .ingest(&[event])
            .await
            .map_err(ApiError::from)?;
        if let Some(r) = report.rejected.first() {
            return Err(r.api_error().into());
        }
        let (_, event_id) = report
            .accepted
            .first()
            .ok_or_else(|| Status::internal("the event was neither accepted nor rejected"))?;
        Ok(Response::new(Ack {
            event_id: event_id.to_string(),
        }))
    }

    async fn record_stream(
        &self,
        request: Request<Streaming<LocationEvent>>,
    ) -> Result<Response<IngestSummary>, Status> {
        // Fail early rather than after reading a whole stream.
        self.state.pipeline()?;
        let who = caller(&request)?;
        let mut stream = request.into_inner();
        let mut summary = IngestSummary::default();
        let mut batch: Vec<(u64, NewLocationEvent)> = Vec::with_capacity(STREAM_BATCH);
        while let Some(event) = stream.message().await? {
            let index = summary.received;
            summary.received += 1;
            match convert::new_location_event(&event).and_then(|e| allowed(&who, e)) {
                Ok(e) => batch.push((index, e)),
                Err(e) => summary.rejections.push(Rejection {
                    index,
                    field: e.field.unwrap_or_default(),
                    reason: e.message,
                }),
            }
            if batch.len() >= STREAM_BATCH {
                flush(&self.state, &mut batch, &mut summary).await?;
            }
        }
        flush(&self.state, &mut batch, &mut summary).await?;
        summary.rejections.sort_by_key(|r| r.index);
        Ok(Response::new(summary))
    }
}

/// `event` when `who` may post it; else the refusal, which rejects that event alone.
fn allowed(who: &Principal, event: NewLocationEvent) -> Result<NewLocationEvent, ApiError> {
    who.check(Access::Post {
        person: event.person_id,
    })?;
    Ok(event)
}
