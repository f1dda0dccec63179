//! `udaconnect.v1.Connections`: the connection history (the same query as REST) and live
//! notifications from the process's NotificationHub.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tonic::{Request, Response, Status};
use udaconnect_actors::domain::PersonId;

use super::{caller, GrpcState};
use crate::auth::Access;
use crate::error::ApiError;
use crate::input::{self, PageFields};
use crate::proto::convert;
use crate::proto::v1::connections_server::Connections;
use crate::proto::v1::{ConnectionEvent, HistoryPage, HistoryRequest, SubscribeRequest};
use crate::store::queries::{connection_history, HistoryQuery};

/// Most persons one subscription may follow.
pub const MAX_SUBSCRIBED_PERSONS: usize = 1_000;

/// The Connections service.
pub struct ConnectionsService {
    state: Arc<GrpcState>,
}

impl ConnectionsService {
    /// The service over the shared state.
    pub fn new(state: Arc<GrpcState>) -> Self {
        Self { state }
    }
}

/// Checks a history request (the rule REST follows too) and turns it into the store's query;
/// `page_size` 0 and an empty `page_token` mean unset (proto3 has no absent number or string).
pub fn history_query(r: &HistoryRequest) -> Result<HistoryQuery, ApiError> {
    let from = r
        .from
        .as_ref()
        .map(|t| convert::chrono_time(t, "from"))
        .transpose()?;
    let to =
        r.to.as_ref()
            .map(|t| convert::chrono_time(t, "to"))
            .transpose()?;
    let token = r.page_token.trim();
    input::history_query(
        r.person_id,
        (from, to),
        (r.page_size != 0).then_some(i64::from(r.page_size)),
        (!token.is_empty()).then_some(token),
        PageFields {
            size: "page_size",
            cursor: "page_token",
        },
    )
}

/// The persons among `ids` that do not exist.
async fn unknown_persons(
    pool: &deadpool_postgres::Pool,
    ids: &[PersonId],
) -> Result<Vec<PersonId>, ApiError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            "SELECT id FROM unnest($1::int8[]) AS ids(id)
             WHERE NOT EXISTS (SELECT 1 FROM person p WHERE p.id = ids.id)
             ORDER BY id",
            &[&ids],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

type EventStream = Pin<Box<dyn Stream<Item = Result<ConnectionEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Connections for ConnectionsService {
    async fn history(
        &self,
        request: Request<HistoryRequest>,
    ) -> Result<Response<HistoryPage>, Status> {
        caller(&request)?.check(Access::Person {
            person: request.get_ref().person_id,
            field: "person_id",
        })?;
        let query = history_query(request.get_ref())?;
        let page = connection_history(&self.state.pool, &query)
            .await
            .map_err(ApiError::from)?
            .ok_or_else(|| {
                ApiError::not_found(
                    Some("person_id"),
                    format!("no person with id {}", query.person_id),
                )
            })?;
        Ok(Response::new(HistoryPage {
            connections: page.items.iter().map(convert::connection).collect(),
            next_page_token: page.next_cursor.map(|c| c.encode()).unwrap_or_default(),
        }))
    }

    type SubscribeStream = EventStream;

    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let who = caller(&request)?;
        let mut persons = request.into_inner().person_ids;
        persons.sort_unstable();
        persons.dedup();
        if persons.is_empty() || persons.len() > MAX_SUBSCRIBED_PERSONS {
            return Err(ApiError::invalid(
                "person_ids",
                format!(
                    "must name 1 to {MAX_SUBSCRIBED_PERSONS} persons (got {})",
                    persons.len()
                ),
            )
            .into());
        }
        who.check_persons(&persons, "person_ids")?;
        let pipeline = self.state.pipeline()?;
        let unknown = unknown_persons(&self.state.pool, &persons).await?;
        if !unknown.is_empty() {
            return Err(ApiError::not_found(
                Some("person_ids"),
                format!("no person with id {unknown:?}"),
            )
            .into());
        }
        let subscription = pipeline.hub().subscribe(&persons);
        let shutdown = self.state.shutdown.clone();
        let stream = futures::stream::unfold(Some((subscription, shutdown)), |state| async move {
            let (mut subscription, shutdown) = state?;
            let next = tokio::select! {
                n = subscription.recv() => n,
                _ = shutdown.cancelled() => {
                    let status: Status =
                        ApiError::unavailable("the server is shutting down; subscribe again")
                            .into();
                    return Some((Err(status), None));
                }
            };
            match next {
                Some(n) => Some((
                    Ok(convert::connection_event(&n)),
                    Some((subscription, shutdown)),
                )),
                None => {
                    let status: Status = ApiError::unavailable(
                        "the subscriber fell too far behind and was disconnected; \
                             subscribe again and read the gap with History",
                    )
                    .into();
                    Some((Err(status), None))
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::DEFAULT_PAGE_SIZE;
    use crate::store::queries::HistoryCursor;

    fn request() -> HistoryRequest {
        HistoryRequest {
            person_id: 5,
            from: None,
            to: None,
            page_size: 0,
            page_token: String::new(),
        }
    }

    fn field(r: HistoryRequest) -> Option<String> {
        history_query(&r).err().and_then(|e| e.field)
    }

    #[test]
    fn history_requests_are_checked_field_by_field() {
        let q = history_query(&request()).expect("valid");
        assert_eq!(q.limit, DEFAULT_PAGE_SIZE);
        assert_eq!(
            field(HistoryRequest {
                person_id: 0,
                ..request()
            })
            .as_deref(),
            Some("person_id")
        );
        assert_eq!(
            field(HistoryRequest {
                page_size: 1_001,
                ..request()
            })
            .as_deref(),
            Some("page_size")
        );
        assert_eq!(
            history_query(&HistoryRequest {
                page_size: 1_000,
                ..request()
            })
            .map(|q| q.limit),
            Ok(1_000)
        );
        assert_eq!(
            field(HistoryRequest {
                page_token: "nope".to_owned(),
                ..request()
            })
            .as_deref(),
            Some("page_token")
        );
        let later = convert::timestamp(1_700_000_000_000_000);
        let earlier = convert::timestamp(1_600_000_000_000_000);
        assert_eq!(
            field(HistoryRequest {
                from: Some(later),
                to: Some(earlier),
                ..request()
            })
            .as_deref(),
            Some("to")
        );
        let cursor = HistoryCursor {
            started_at_us: 7,
            peer_id: 9,
        };
        let q = history_query(&HistoryRequest {
            page_token: cursor.encode(),
            ..request()
        })
        .expect("valid token");
        assert_eq!(q.cursor, Some(cursor));
    }
}
