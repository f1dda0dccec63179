//! `/healthz` (the process is alive), `/readyz` (PostgreSQL and the broker answer, the pipeline
//! runs) and
//! `/metrics` (Prometheus).

use std::sync::Arc;

use poem_openapi::payload::{Json, PlainText};
use poem_openapi::{ApiResponse, Object, OpenApi, Tags};

use super::RestState;

#[derive(Tags)]
enum ApiTags {
    /// Liveness and readiness probes, metrics.
    Health,
}

/// The health endpoints.
pub struct HealthApi {
    pub(super) state: Arc<RestState>,
}

/// Liveness answer.
#[derive(Debug, Object)]
struct Liveness {
    /// Always `alive`.
    status: String,
}

/// One dependency's state.
#[derive(Debug, Object)]
struct DependencyCheck {
    /// `postgres`, `kafka` or `pipeline`.
    name: String,
    /// Whether it answered in time.
    ok: bool,
    /// Why not, when it did not.
    #[oai(skip_serializing_if_is_none)]
    error: Option<String>,
}

/// Readiness answer: which dependencies answer.
#[derive(Debug, Object)]
struct Readiness {
    /// `ready` or `unavailable`.
    status: String,
    /// Names of the dependencies that did not answer.
    missing: Vec<String>,
    /// Every dependency checked.
    checks: Vec<DependencyCheck>,
}

#[derive(ApiResponse)]
enum ReadinessResponse {
    /// PostgreSQL and the broker answer, and the pipeline runs.
    #[oai(status = 200)]
    Ready(Json<Readiness>),
    /// At least one dependency does not answer; `missing` names it.
    #[oai(status = 503)]
    Unavailable(Json<Readiness>),
}

#[OpenApi(tag = "ApiTags::Health")]
impl HealthApi {
    /// Liveness: 200 while the process serves requests.
    #[oai(path = "/healthz", method = "get")]
    async fn healthz(&self) -> Json<Liveness> {
        Json(Liveness {
            status: "alive".to_owned(),
        })
    }

    /// Readiness (`crate::readiness`, the rule gRPC health follows too): 200 only when
    /// PostgreSQL and the Kafka broker answer and the pipeline has started, else 503 naming
    /// what is missing (`postgres`, `kafka`, `pipeline`).
    #[oai(path = "/readyz", method = "get")]
    async fn readyz(&self) -> ReadinessResponse {
        let checks: Vec<DependencyCheck> = self
            .state
            .readiness
            .check()
            .await
            .into_iter()
            .map(|c| DependencyCheck {
                name: c.name.to_owned(),
                ok: c.error.is_none(),
                error: c.error,
            })
            .collect();
        let missing: Vec<String> = checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| c.name.clone())
            .collect();
        if missing.is_empty() {
            ReadinessResponse::Ready(Json(Readiness {
                status: "ready".to_owned(),
                missing,
                checks,
            }))
        } else {
            tracing::warn!(missing = missing.join(","), "not ready");
            ReadinessResponse::Unavailable(Json(Readiness {
                status: "unavailable".to_owned(),
                missing,
                checks,
            }))
        }
    }

    /// Prometheus metrics (text format 0.0.4): ingest, both stages (records, backpressure,
    /// batch sizes, lag, actors, watermarks, co-locations, episodes, notifications), dead
    /// letters, snapshots and the notification hub. `udaconnect_pipeline_up` is 0 until the
    /// pipeline has started (the broker or its topics are not there yet).
    #[oai(path = "/metrics", method = "get")]
    async fn metrics(&self) -> PlainText<String> {
        match self.state.pipeline.get() {
            Some(pipeline) => PlainText(pipeline.prometheus().await),
            None => PlainText(crate::metrics::render(&[&crate::metrics::pipeline_up(
                false,
            )])),
        }
    }
}
