//! Readiness, one rule for REST `/readyz` and the gRPC health service: a process is ready when
//! PostgreSQL answers (`SELECT 1` through the pool), the broker answers (a metadata request),
//! each within `readiness_timeout_ms`, and its pipeline has started (the topics exist and both
//! stages joined their consumer groups). Until then it takes no traffic: ingest and live state
//! need the pipeline.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;

use crate::kafka::Broker;
use crate::pipeline::Pipeline;
use crate::store;

/// Why a process is not ready, or a request needing the pipeline is refused (503), before the
/// pipeline started.
pub const PIPELINE_NOT_STARTED: &str =
    "the pipeline has not started yet (the broker or its topics are not available); retry later";

/// What a readiness check asks; cheap to clone.
#[derive(Clone)]
pub struct ReadinessProbe {
    pub pool: Pool,
    pub broker: Broker,
    /// The pipeline, once it started.
    pub pipeline: Arc<tokio::sync::OnceCell<Arc<Pipeline>>>,
    /// How long each dependency may take to answer.
    pub timeout: Duration,
}

/// One dependency's state: `postgres`, `kafka` or `pipeline`, and why it is not there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub error: Option<String>,
}

impl ReadinessProbe {
    /// Asks PostgreSQL and the broker concurrently and looks at the pipeline; the checks in
    /// that order.
    pub async fn check(&self) -> Vec<Check> {
        let timeout = self.timeout;
        let postgres = async {
            match tokio::time::timeout(timeout, store::ping(&self.pool)).await {
                Ok(result) => result.map_err(|e| e.to_string()),
                Err(_) => Err(format!("postgres did not answer within {timeout:?}")),
            }
        };
        let kafka = async { self.broker.ping(timeout).await.map_err(|e| e.to_string()) };
        let (postgres, kafka) = tokio::join!(postgres, kafka);
        let pipeline = match self.pipeline.get() {
            Some(_) => Ok(()),
            None => Err(PIPELINE_NOT_STARTED.to_owned()),
        };
        [
            ("postgres", postgres),
            ("kafka", kafka),
            ("pipeline", pipeline),
        ]
        .into_iter()
        .map(|(name, result)| Check {
            name,
            error: result.err(),
        })
        .collect()
    }

    /// Whether every check passes.
    pub async fn ready(&self) -> bool {
        self.check().await.iter().all(|c| c.error.is_none())
    }
}
