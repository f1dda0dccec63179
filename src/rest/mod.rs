//! REST front end (poem + poem-openapi): health and readiness now; the POC `/api` and `/v1` later.

mod health;

use std::sync::Arc;
use std::time::Duration;

use poem::{Endpoint, EndpointExt, Route};
use poem_openapi::OpenApiService;

use crate::kafka::Broker;
use crate::pipeline::Pipeline;

/// What the REST handlers share.
pub struct RestState {
    /// PostgreSQL pool.
    pub pool: deadpool_postgres::Pool,
    /// The broker probe.
    pub broker: Broker,
    /// How long each readiness check may take.
    pub readiness_timeout: Duration,
    /// The pipeline, once it started.
    pub pipeline: Arc<tokio::sync::OnceCell<Arc<Pipeline>>>,
}

/// The OpenAPI service of every documented endpoint.
pub fn api_service(state: Arc<RestState>) -> OpenApiService<health::HealthApi, ()> {
    OpenApiService::new(
        health::HealthApi { state },
        "UdaConnect",
        env!("CARGO_PKG_VERSION"),
    )
    .description("Real-time co-location detection for conference attendees.")
}

/// The whole REST application: the API, `/openapi.json` and Swagger UI at `/docs`.
pub fn app(state: Arc<RestState>) -> impl Endpoint {
    let api = api_service(state);
    let spec = api.spec_endpoint();
    let docs = api.swagger_ui();
    Route::new()
        .at("/openapi.json", spec)
        .nest("/docs", docs)
        .nest("/", api)
        .with(poem::middleware::Tracing)
}
