//! REST front end (poem + poem-openapi): the POC contract under `/api`, the `/v1` API, live
//! streams, health and metrics, `/openapi.json`, Swagger UI at `/docs`, and the web console at
//! `/`.

mod auth;
mod console;
pub mod docs;
mod errors;
mod health;
mod input;
mod poc;
mod streams;
mod v1;

use std::sync::Arc;

use poem::http::StatusCode;
use poem::middleware::Cors;
use poem::{Endpoint, EndpointExt, IntoResponse, Request, Response, Route};
use poem_openapi::OpenApiService;

use crate::error::ApiError;
use crate::pipeline::Pipeline;

/// Largest accepted request body: a full batch of 10,000 events fits with room to spare.
pub const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

/// What the REST handlers share.
pub struct RestState {
    /// PostgreSQL pool.
    pub pool: deadpool_postgres::Pool,
    /// Readiness, the rule gRPC health follows too.
    pub readiness: crate::readiness::ReadinessProbe,
    /// The pipeline, once it started.
    pub pipeline: Arc<tokio::sync::OnceCell<Arc<Pipeline>>>,
    /// Origins a browser page may call the API from (`*` for any); empty: no CORS headers.
    pub cors_origins: Vec<String>,
    /// Live actor state across the cluster (local, or forwarded to the owner over gRPC).
    pub cluster: crate::cluster::Cluster,
    /// Who is calling ([`crate::auth`]); the `/v1` operations ask it through [`auth::Caller`].
    pub auth: Arc<crate::auth::Authenticator>,
    /// Whether the POC's `/api` is served (`poc_api`); else it answers 404.
    pub poc_api: bool,
    /// Cancelled when the process shuts down: the live streams (SSE, WebSocket) end then, so
    /// that the graceful drain does not wait for clients that never hang up.
    pub shutdown: tokio_util::sync::CancellationToken,
}

impl RestState {
    /// The pipeline, or a 503 while it has not started (see [`crate::cluster::Cluster::pipeline`]).
    pub fn pipeline(&self) -> Result<Arc<Pipeline>, ApiError> {
        self.cluster.pipeline()
    }
}

/// Every documented API.
pub type Apis = (
    poc::PocApi,
    v1::V1Api,
    streams::StreamsApi,
    health::HealthApi,
);

/// The OpenAPI service of every documented endpoint.
pub fn api_service(state: Arc<RestState>) -> OpenApiService<Apis, ()> {
    OpenApiService::new(
        (
            poc::PocApi {
                state: Arc::clone(&state),
            },
            v1::V1Api {
                state: Arc::clone(&state),
            },
            streams::StreamsApi {
                state: Arc::clone(&state),
            },
            health::HealthApi { state },
        ),
        "UdaConnect",
        env!("CARGO_PKG_VERSION"),
    )
    .description(
        "Real-time co-location detection for conference attendees. `/api` is the proof of \
         concept's contract, kept for its frontend and served only when `poc_api = true` (it has \
         no authentication); `/v1` is the real API, which needs a bearer JWT (*Authorize*): an \
         `attendee` reads and posts only its own data, a `gateway` posts for anyone and reads \
         nothing, an `organizer` may do everything. Every error is `{code, message, field?}`.",
    )
}

/// The whole REST application: the API, `/openapi.json` and Swagger UI at `/docs`; every
/// error in the JSON shape, bodies above [`MAX_BODY_BYTES`] refused with 413, CORS for the
/// configured origins, and for any origin under `/api` ([`poc_cors`]).
pub fn app(state: Arc<RestState>) -> impl Endpoint {
    let cors = cors(&state.cors_origins);
    let poc_api = state.poc_api;
    let inner = Arc::new(inner_app(state));
    let poc = Arc::new(Arc::clone(&inner).with(poc_cors()));
    inner
        .with_if(cors.is_some(), cors.unwrap_or_default())
        .around(move |next, req| {
            let poc = Arc::clone(&poc);
            async move {
                let path = req.uri().path();
                Ok(if path == "/api" || path.starts_with("/api/") {
                    if !poc_api {
                        return Ok(poc_off());
                    }
                    poc.call(req).await?.into_response()
                } else {
                    next.call(req).await?.into_response()
                })
            }
        })
        .around(trace_request)
}

/// The 404 of `/api` while `poc_api` is off.
fn poc_off() -> Response {
    let body = errors::ErrorBody {
        code: crate::error::ErrorCode::NotFound.as_str().to_owned(),
        message: "the proof of concept's /api is not served here (poc_api = false): it has no \
                  authentication; use /v1"
            .to_owned(),
        field: None,
    };
    poem::web::Json(body)
        .with_status(StatusCode::NOT_FOUND)
        .into_response()
}

/// poem's request tracing (a span per request, then its status and duration), with the
/// streams' `access_token` query parameter redacted from the logged URI.
async fn trace_request<E: Endpoint>(next: Arc<E>, req: Request) -> poem::Result<Response> {
    use tracing::Instrument;
    let span = tracing::info_span!(
        "request",
        remote_addr = %req.remote_addr(),
        version = ?req.version(),
        method = %req.method(),
        uri = %auth::redact_uri(req.uri()),
    );
    async move {
        let started = std::time::Instant::now();
        let result = next.call(req).await;
        let duration = started.elapsed();
        match result {
            Ok(response) => {
                let response = response.into_response();
                tracing::info!(status = %response.status(), duration = ?duration, "response");
                Ok(response)
            }
            Err(e) => {
                tracing::info!(status = %e.status(), error = %e, duration = ?duration, "error");
                Err(e)
            }
        }
    }
    .instrument(span)
    .await
}

/// CORS of the POC's contract: its frontend is a page on another origin (port 30000) that
/// calls `/api` from the browser, and the POC answered every origin (flask-cors with its
/// defaults: any origin, the usual methods, any request header, no credentials). Only `/api`
/// is opened so; `/v1` answers the configured `cors_origins` alone.
fn poc_cors() -> Cors {
    Cors::new()
        .allow_methods(["GET", "HEAD", "POST", "OPTIONS"])
        .allow_credentials(false)
}

/// [`app`] without CORS and request tracing.
fn inner_app(state: Arc<RestState>) -> impl Endpoint {
    let authenticator = Arc::clone(&state.auth);
    let api = api_service(state);
    let templates = Arc::new(errors::PathTemplates::from_spec(&api.spec()));
    let spec = api.spec_endpoint();
    let docs = api.swagger_ui();
    console::route(Route::new())
        .at("/openapi.json", spec)
        .nest("/docs", docs)
        .nest("/", api)
        .around(limit_body)
        .data(authenticator)
        .around(move |next, req| {
            let templates = Arc::clone(&templates);
            async move {
                let path = req.uri().path().to_owned();
                // The console's page: poem's router gives `/` to the API nested there.
                if path == "/"
                    && [poem::http::Method::GET, poem::http::Method::HEAD].contains(req.method())
                {
                    return Ok(console::page());
                }
                Ok(match next.call(req).await {
                    Ok(response) => response.into_response(),
                    Err(e) => errors::poem_error_response(e, &templates, &path),
                })
            }
        })
}

fn cors(origins: &[String]) -> Option<Cors> {
    if origins.is_empty() {
        return None;
    }
    let cors = Cors::new().allow_methods(["GET", "POST", "OPTIONS"]);
    Some(if origins.iter().any(|o| o == "*") {
        cors
    } else {
        origins.iter().fold(cors, |c, o| c.allow_origin(o.as_str()))
    })
}

/// Refuses a body whose declared length is above [`MAX_BODY_BYTES`] with 413, before it is
/// read; a body sent without a length is cut there (and then fails to parse as JSON). The body
/// is kept, so that a JSON body that does not parse is answered naming the field where it
/// fails ([`crate::input::parse_json`]: `lat` for `"lat": 1e999`), not just `body`.
async fn limit_body<E: Endpoint>(next: Arc<E>, mut req: Request) -> poem::Result<Response> {
    let declared = req
        .headers()
        .get(poem::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES) {
        return Err(poem::Error::from_status(StatusCode::PAYLOAD_TOO_LARGE));
    }
    if declared.is_none() {
        use tokio::io::AsyncReadExt;
        let body = req
            .take_body()
            .into_async_read()
            .take(MAX_BODY_BYTES as u64);
        req.set_body(poem::Body::from_async_read(body));
    }
    let body = req.take_body().into_bytes().await?;
    req.set_body(body.clone());
    match next.call(req).await {
        Ok(response) => Ok(response.into_response()),
        Err(e) if e.is::<poem_openapi::error::ParseRequestPayloadError>() => {
            match crate::input::parse_json(&body) {
                Err(named) => Err(poem::Error::from_response(
                    errors::ErrorResponse::from(named).into_response(),
                )),
                Ok(_) => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}
