//! Live notification streams from the process's NotificationHub: Server-Sent Events for one
//! person, and a WebSocket on which a client subscribes to several persons. A client that
//! reconnects naming the last notification it received (SSE `Last-Event-ID`, which browsers
//! send by themselves; the WebSocket's `last_event_id`) first gets the ones it missed, from
//! the hub's resume buffer ([`crate::pipeline::hub::RESUME_BUFFER`]), each once.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use futures::{SinkExt, StreamExt};
use poem::web::websocket::{Message, WebSocket, WebSocketStream, WebSocketUpgraded};
use poem_openapi::param::{Header, Path, Query};
use poem_openapi::payload::EventStream;
use poem_openapi::{ApiResponse, Object, OpenApi, Tags, Union};
use serde::Deserialize;
use udaconnect_actors::domain::{Notification, PersonId};
use uuid::Uuid;

use super::auth::StreamCaller;
use super::errors::{ErrorBody, RestResult};
use super::v1::unknown_person;
use super::RestState;
use crate::auth::{Access, Principal};
use crate::error::ApiError;
use crate::pipeline::hub::{NotificationHub, Resume, Subscription};
use crate::store::{queries, timestamp};

#[derive(Tags)]
enum ApiTags {
    /// Connection history and live streams.
    Connections,
}

/// The streaming endpoints.
pub struct StreamsApi {
    pub(super) state: Arc<RestState>,
}

/// `connection.started`, `connection.updated` or `connection.ended` for one person.
#[derive(Debug, Clone, Object, serde::Serialize)]
pub struct ConnectionEvent {
    /// Deterministic: a replay carries the same id, so repeats can be dropped.
    id: Uuid,
    /// `connection.started`, `connection.updated` or `connection.ended`.
    #[oai(rename = "type")]
    #[serde(rename = "type")]
    kind: String,
    /// Whom the notification is for.
    person_id: i64,
    /// Whom they met.
    peer_id: i64,
    started_at: DateTime<Utc>,
    last_seen_at: DateTime<Utc>,
    /// Set on `connection.ended`.
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    ended_at: Option<DateTime<Utc>>,
    colocations: u32,
    min_distance_m: f64,
    /// Where the person was at the closest co-location.
    lat: f64,
    lon: f64,
    /// For `connection.updated`: the `started_at` of the episodes it replaces.
    replaces: Vec<DateTime<Utc>>,
}

impl From<&Notification> for ConnectionEvent {
    fn from(n: &Notification) -> Self {
        let e = &n.episode;
        Self {
            id: n.id,
            kind: n.kind.as_str().to_owned(),
            person_id: e.person,
            peer_id: e.peer,
            started_at: timestamp(e.started_at),
            last_seen_at: timestamp(e.last_seen_at),
            ended_at: e.ended_at.map(timestamp),
            colocations: e.colocations,
            min_distance_m: e.min_distance_m,
            lat: e.lat,
            lon: e.lon,
            replaces: n.replaces.iter().map(|t| timestamp(*t)).collect(),
        }
    }
}

/// Sent first on a stream resumed from a notification this process does not hold (older than
/// its resume buffer, or from before it started): what followed it is not replayed, and the
/// client reads the gap from the history (`/v1/persons/{id}/connections`).
#[derive(Debug, Clone, Object, serde::Serialize)]
pub struct ResumeGap {
    /// `resume.gap`.
    #[oai(rename = "type")]
    #[serde(rename = "type")]
    kind: String,
    /// The id the client resumed from.
    last_event_id: Uuid,
    /// What happened, in one sentence.
    message: String,
}

impl ResumeGap {
    fn new(last_event_id: Uuid) -> Self {
        Self {
            kind: "resume.gap".to_owned(),
            last_event_id,
            message: format!(
                "notification {last_event_id} is not among those this process keeps; the \
                 stream starts from now: read what was missed from the connection history"
            ),
        }
    }
}

/// One event of a notification stream: a notification, or the gap of a resume.
#[derive(Debug, Clone, Union, serde::Serialize)]
#[serde(untagged)]
pub enum StreamItem {
    Connection(ConnectionEvent),
    Gap(ResumeGap),
}

type Events = BoxStream<'static, StreamItem>;

#[derive(ApiResponse)]
enum StreamOk {
    /// Server-Sent Events: each `event:` is the notification's type, `id:` its id, `data:`
    /// a `ConnectionEvent`; a comment every 15 s keeps the connection open. A resume from an
    /// id this process does not hold starts with one `resume.gap` event (a `ResumeGap`).
    #[oai(status = 200)]
    Events(EventStream<Events>),
}

type Upgrade = WebSocketUpgraded<
    Box<dyn FnOnce(WebSocketStream) -> futures::future::BoxFuture<'static, ()> + Send + Sync>,
>;

/// A subscription to `persons` (everyone's when `everyone`), and what the stream sends before
/// its notifications: nothing from now on; resumed `after` a notification, the ones that
/// followed it, or the gap of a resume this process cannot make.
fn open(
    hub: &NotificationHub,
    persons: &[PersonId],
    everyone: bool,
    after: Option<Uuid>,
) -> (Subscription, Vec<StreamItem>) {
    let Some(id) = after else {
        let sub = if everyone {
            hub.subscribe_all()
        } else {
            hub.subscribe(persons)
        };
        return (sub, Vec::new());
    };
    let (sub, resume) = hub.subscribe_after(persons, everyone, id);
    let first = match resume {
        Resume::After(missed) => missed
            .iter()
            .map(|n| StreamItem::Connection(ConnectionEvent::from(n.as_ref())))
            .collect(),
        Resume::Unknown => vec![StreamItem::Gap(ResumeGap::new(id))],
    };
    (sub, first)
}

/// `first`, then `sub`'s notifications, until `until` completes (the process's shutdown).
fn events(
    first: Vec<StreamItem>,
    sub: Subscription,
    until: impl std::future::Future<Output = ()> + Send + 'static,
) -> Events {
    let live = futures::stream::unfold(sub, |mut sub| async move {
        sub.recv().await.map(|n| {
            (
                StreamItem::Connection(ConnectionEvent::from(n.as_ref())),
                sub,
            )
        })
    });
    futures::stream::iter(first)
        .chain(live)
        .take_until(until)
        .boxed()
}

/// The id a client resumes from (`Last-Event-ID`, `last_event_id`), named `field` when it is
/// not a notification id.
fn resume_point(value: Option<&str>, field: &str) -> Result<Option<Uuid>, ApiError> {
    match value.map(str::trim).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(text) => crate::input::parse_uuid(text, field).map(Some),
    }
}

/// What a WebSocket client may send.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientMessage {
    #[serde(default)]
    subscribe: Vec<PersonId>,
    #[serde(default)]
    unsubscribe: Vec<PersonId>,
}

/// The server's answer to a (un)subscription.
#[derive(Debug, serde::Serialize)]
struct Subscribed<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    person_ids: &'a BTreeSet<PersonId>,
}

/// Most persons one WebSocket may follow.
pub const MAX_WS_PERSONS: usize = 1_000;

fn parse_ids(text: &str) -> Result<Vec<PersonId>, ApiError> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<PersonId>().map_err(|_| {
                ApiError::invalid(
                    "person_ids",
                    format!("must be comma-separated ids (got {s:?})"),
                )
            })
        })
        .collect()
}

#[OpenApi(prefix_path = "/v1", tag = "ApiTags::Connections")]
impl StreamsApi {
    /// Live `connection.started` / `connection.updated` / `connection.ended` notifications for
    /// one person, as Server-Sent Events, from now on. An attendee follows only itself; the
    /// token may come as `access_token` in the query, since `EventSource` sends no headers.
    #[oai(path = "/persons/:person_id/connections/stream", method = "get")]
    async fn stream(
        &self,
        auth: StreamCaller,
        person_id: Path<i64>,
        /// The id of the last notification received: the stream starts with those after it
        /// (browsers send it by themselves when they reconnect).
        #[oai(name = "Last-Event-ID")]
        last_event_id: Header<Option<String>>,
    ) -> RestResult<StreamOk> {
        auth.0.check(super::v1::person_access(person_id.0))?;
        let after = resume_point(last_event_id.0.as_deref(), "Last-Event-ID")?;
        let pipeline = self.state.pipeline()?;
        if queries::person(&self.state.pool, person_id.0)
            .await?
            .is_none()
        {
            return Err(unknown_person(person_id.0));
        }
        let (sub, first) = open(pipeline.hub(), &[person_id.0], false, after);
        Ok(self.sse(first, sub))
    }

    /// Every person's live notifications (the connection feed of the console), as Server-Sent
    /// Events in the shape of the per-person stream, from now on: an episode is announced to
    /// each of its two persons, so it appears twice, once per `person_id`. A client too slow
    /// for the rate is disconnected (`udaconnect_hub_slow_subscribers_dropped_total`).
    /// Organizers only; the token may come as `access_token` in the query.
    #[oai(path = "/connections/stream", method = "get")]
    async fn stream_all(
        &self,
        auth: StreamCaller,
        /// The id of the last notification received: the stream starts with those after it.
        #[oai(name = "Last-Event-ID")]
        last_event_id: Header<Option<String>>,
    ) -> RestResult<StreamOk> {
        auth.0.check(Access::Everyone)?;
        let after = resume_point(last_event_id.0.as_deref(), "Last-Event-ID")?;
        let (sub, first) = open(self.state.pipeline()?.hub(), &[], true, after);
        Ok(self.sse(first, sub))
    }

    /// A WebSocket of live notifications for several persons. Subscribe at connect time with
    /// `?person_ids=1,2` and later by sending `{"subscribe": [3]}` or `{"unsubscribe": [1]}`;
    /// the server answers `{"type": "subscribed", "person_ids": [...]}`, sends each
    /// notification as a `ConnectionEvent` JSON text message, and reports a bad message as
    /// `{"type": "error", "code", "message", "field"}` without closing. An attendee follows
    /// only itself (403 at connect time, an error message later); the token may come as
    /// `access_token` in the query, since a browser's WebSocket sends no headers.
    #[oai(path = "/ws", method = "get")]
    async fn ws(
        &self,
        auth: StreamCaller,
        websocket: WebSocket,
        /// Comma-separated person ids to follow from the start.
        person_ids: Query<Option<String>>,
        /// The id of the last notification received on an earlier socket: after `subscribed`,
        /// the socket first sends those of `person_ids` that followed it (or a `resume.gap`
        /// message when this process does not hold it).
        last_event_id: Query<Option<String>>,
    ) -> RestResult<Upgrade> {
        let after = resume_point(last_event_id.0.as_deref(), "last_event_id")?;
        let pipeline = self.state.pipeline()?.clone();
        let initial = match person_ids.0.as_deref() {
            Some(text) => parse_ids(text)?,
            None => Vec::new(),
        };
        let caller = auth.0;
        caller.check_persons(&initial, "person_ids")?;
        let missing = queries::missing_persons(&self.state.pool, &initial).await?;
        if let Some(id) = missing.first() {
            return Err(
                ApiError::not_found(Some("person_ids"), format!("no person with id {id}")).into(),
            );
        }
        if initial.len() > MAX_WS_PERSONS {
            return Err(ApiError::invalid(
                "person_ids",
                format!("at most {MAX_WS_PERSONS} persons per socket"),
            )
            .into());
        }
        let state = Arc::clone(&self.state);
        let start = Start {
            caller,
            persons: initial.into_iter().collect(),
            after,
        };
        let run: Box<
            dyn FnOnce(WebSocketStream) -> futures::future::BoxFuture<'static, ()> + Send + Sync,
        > = Box::new(move |socket| {
            Box::pin(async move {
                serve_socket(socket, state, pipeline, start).await;
            })
        });
        Ok(websocket.on_upgrade(run))
    }
}

impl StreamsApi {
    /// `first`, then `sub`, as Server-Sent Events until the process shuts down (the client
    /// then reconnects, to any process, with `Last-Event-ID`).
    fn sse(&self, first: Vec<StreamItem>, sub: Subscription) -> StreamOk {
        let until = self.state.shutdown.clone().cancelled_owned();
        StreamOk::Events(
            EventStream::new(events(first, sub, until))
                .keep_alive(Duration::from_secs(15))
                .to_event(|item| match item {
                    StreamItem::Connection(e) => {
                        let data = serde_json::to_string(&e).unwrap_or_default();
                        poem::web::sse::Event::message(data)
                            .event_type(e.kind.clone())
                            .id(e.id.to_string())
                    }
                    // No `id:`: the client keeps resuming from its last notification.
                    StreamItem::Gap(gap) => {
                        let data = serde_json::to_string(&gap).unwrap_or_default();
                        poem::web::sse::Event::message(data).event_type(gap.kind.clone())
                    }
                }),
        )
    }
}

fn error_text(e: &ApiError) -> String {
    let mut v = serde_json::to_value(ErrorBody::from(e)).unwrap_or_default();
    v["type"] = serde_json::json!("error");
    v.to_string()
}

/// How a socket starts: who is calling, whom it follows, and where it resumes.
struct Start {
    caller: Principal,
    persons: BTreeSet<PersonId>,
    after: Option<Uuid>,
}

async fn serve_socket(
    socket: WebSocketStream,
    state: Arc<RestState>,
    pipeline: Arc<crate::pipeline::Pipeline>,
    start: Start,
) {
    let Start {
        caller,
        mut persons,
        after,
    } = start;
    let (mut sink, mut incoming) = socket.split();
    let ids = |persons: &BTreeSet<PersonId>| -> Vec<PersonId> { persons.iter().copied().collect() };
    let (mut sub, first) = open(pipeline.hub(), &ids(&persons), false, after);
    let ack = |persons: &BTreeSet<PersonId>| {
        serde_json::to_string(&Subscribed {
            kind: "subscribed",
            person_ids: persons,
        })
        .unwrap_or_default()
    };
    if sink.send(Message::Text(ack(&persons))).await.is_err() {
        return;
    }
    for item in first {
        let text = serde_json::to_string(&item).unwrap_or_default();
        if sink.send(Message::Text(text)).await.is_err() {
            return;
        }
    }
    loop {
        tokio::select! {
            // At shutdown: a close frame, and the client reconnects to another process.
            () = state.shutdown.cancelled() => {
                let _ = sink.send(Message::Close(None)).await;
                return;
            }
            message = incoming.next() => {
                let text = match message {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                    Some(Ok(_)) => continue,
                };
                let reply = match change(&state, &caller, &mut persons, &text).await {
                    // In place: what is queued for the earlier persons is still sent.
                    Ok(()) if pipeline.hub().resubscribe(&sub, &ids(&persons)) => ack(&persons),
                    Ok(()) => {
                        let e = ApiError::unavailable("the notification stream ended; reconnect");
                        let _ = sink.send(Message::Text(error_text(&e))).await;
                        return;
                    }
                    Err(e) => error_text(&e),
                };
                if sink.send(Message::Text(reply)).await.is_err() {
                    return;
                }
            }
            notification = sub.recv() => {
                let Some(n) = notification else {
                    // The hub stopped or dropped this subscriber for being too slow.
                    let e = ApiError::unavailable("the notification stream ended; reconnect");
                    let _ = sink.send(Message::Text(error_text(&e))).await;
                    return;
                };
                let text = serde_json::to_string(&ConnectionEvent::from(n.as_ref())).unwrap_or_default();
                if sink.send(Message::Text(text)).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Applies one client message to the subscribed set.
async fn change(
    state: &RestState,
    caller: &Principal,
    persons: &mut BTreeSet<PersonId>,
    text: &str,
) -> Result<(), ApiError> {
    let message: ClientMessage = serde_json::from_str(text).map_err(|e| {
        ApiError::invalid(
            "message",
            format!("must be {{\"subscribe\": [ids]}} or {{\"unsubscribe\": [ids]}}: {e}"),
        )
    })?;
    caller.check_persons(&message.subscribe, "subscribe")?;
    let missing = queries::missing_persons(&state.pool, &message.subscribe).await?;
    if let Some(id) = missing.first() {
        return Err(ApiError::not_found(
            Some("subscribe"),
            format!("no person with id {id}"),
        ));
    }
    let mut next = persons.clone();
    next.extend(message.subscribe);
    for id in message.unsubscribe {
        next.remove(&id);
    }
    if next.len() > MAX_WS_PERSONS {
        return Err(ApiError::invalid(
            "subscribe",
            format!("at most {MAX_WS_PERSONS} persons per socket"),
        ));
    }
    *persons = next;
    Ok(())
}
