//! The API documents generated from the code: `docs/openapi.yaml` (the OpenAPI 3 document the
//! service serves at `/openapi.json`) and `docs/postman.json` (a Postman v2.1 collection of
//! every operation, with example bodies). `udaconnect docs --out docs` writes both; a test
//! fails when the files drift from the code.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde_json::{json, Value};

use super::{api_service, RestState};
use crate::config::Config;
use crate::kafka::Broker;

/// The file names in the docs folder.
pub const OPENAPI_FILE: &str = "openapi.yaml";
pub const POSTMAN_FILE: &str = "postman.json";

fn offline_state() -> anyhow::Result<Arc<RestState>> {
    let config = Config::default();
    let pool = crate::store::pool(&config, Duration::from_secs(1))?;
    let pipeline: Arc<tokio::sync::OnceCell<_>> = Arc::default();
    // Nothing here connects before it is used.
    Ok(Arc::new(RestState {
        cluster: crate::cluster::Cluster::new(Arc::clone(&pipeline), pool.clone(), None),
        readiness: crate::readiness::ReadinessProbe {
            pool: pool.clone(),
            broker: Broker::new(&config)?,
            pipeline: Arc::clone(&pipeline),
            timeout: Duration::from_secs(1),
        },
        pool,
        pipeline,
        cors_origins: Vec::new(),
        auth: Arc::new(crate::auth::Authenticator::from_config(&Config {
            auth: crate::config::AuthMode::Off,
            ..Config::default()
        })?),
        poc_api: true,
        shutdown: tokio_util::sync::CancellationToken::new(),
    }))
}

/// The OpenAPI document as YAML.
pub fn openapi_yaml() -> anyhow::Result<String> {
    Ok(api_service(offline_state()?).spec_yaml())
}

/// The OpenAPI document as JSON.
pub fn openapi_json() -> anyhow::Result<Value> {
    serde_json::from_str(&api_service(offline_state()?).spec())
        .context("the generated OpenAPI document is not JSON")
}

/// An example value for a path parameter.
fn path_example(name: &str) -> &'static str {
    match name {
        "event_id" => "0b6e3f7c-8a8c-4f55-9d0c-2b8f7e2c1a11",
        "location_id" => "29",
        _ => "5",
    }
}

/// An example value for a query parameter, and whether the collection sends it by default.
fn query_example(path: &str, name: &str) -> (&'static str, bool) {
    match (path, name) {
        (_, "start_date") => ("2020-01-01", true),
        (_, "end_date") => ("2020-12-30", true),
        (_, "distance") => ("5", true),
        (_, "from") => ("2020-08-15T00:00:00Z", false),
        (_, "to") => ("2020-08-19T00:00:00Z", false),
        (_, "limit") => ("20", true),
        (_, "cursor") => ("", false),
        (_, "q") => ("Shenk", false),
        (_, "person_ids") => ("5,6", true),
        _ => ("", false),
    }
}

/// The example body of an operation that takes one.
fn body_example(method: &str, path: &str) -> Option<Value> {
    let location = json!({
        "person_id": 5,
        "lat": 37.553441,
        "lon": -122.290524,
        "recorded_at": "2020-08-18T10:37:06Z"
    });
    Some(match (method, path) {
        ("post", "/api/persons") | ("post", "/v1/persons") => json!({
            "first_name": "Taco",
            "last_name": "Fargo",
            "company_name": "Alpha Omega Upholstery"
        }),
        ("post", "/api/locations") => json!({
            "person_id": 5,
            "latitude": "-122.290524",
            "longitude": "37.553441",
            "creation_time": "2020-08-18T10:37:06"
        }),
        ("post", "/v1/locations") => location,
        ("post", "/v1/locations/batch") => json!({
            "events": [
                location,
                {
                    "event_id": "0b6e3f7c-8a8c-4f55-9d0c-2b8f7e2c1a11",
                    "person_id": 6,
                    "lat": 37.553451,
                    "lon": -122.290534,
                    "recorded_at": "2020-08-18T10:37:08Z"
                }
            ]
        }),
        _ => return None,
    })
}

/// The Postman v2.1 collection of every operation in the OpenAPI document, grouped by tag.
pub fn postman_collection(spec: &Value) -> anyhow::Result<Value> {
    let mut folders: Vec<(String, Vec<Value>)> = Vec::new();
    let paths = spec["paths"]
        .as_object()
        .context("the OpenAPI document has no paths")?;
    for (path, operations) in paths {
        let operations = operations.as_object().context("a path is not an object")?;
        for (method, op) in operations {
            let tag = op["tags"][0].as_str().unwrap_or("Other").to_owned();
            let segments: Vec<String> = path
                .trim_start_matches('/')
                .split('/')
                .map(
                    |s| match s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                        Some(name) => format!(":{name}"),
                        None => s.to_owned(),
                    },
                )
                .collect();
            let params = op["parameters"].as_array().cloned().unwrap_or_default();
            let variables: Vec<Value> = params
                .iter()
                .filter(|p| p["in"] == "path")
                .filter_map(|p| p["name"].as_str())
                .map(|name| json!({"key": name, "value": path_example(name)}))
                .collect();
            let query: Vec<Value> = params
                .iter()
                .filter(|p| p["in"] == "query")
                .filter_map(|p| {
                    let name = p["name"].as_str()?;
                    let (value, on) = query_example(path, name);
                    Some(json!({
                        "key": name,
                        "value": value,
                        "disabled": !on,
                        "description": p["description"].as_str().unwrap_or_default(),
                    }))
                })
                .collect();
            let enabled: Vec<String> = query
                .iter()
                .filter(|q| q["disabled"] == false)
                .map(|q| {
                    format!(
                        "{}={}",
                        q["key"].as_str().unwrap_or_default(),
                        q["value"].as_str().unwrap_or_default()
                    )
                })
                .collect();
            let raw = format!(
                "{{{{baseUrl}}}}/{}{}",
                segments.join("/"),
                if enabled.is_empty() {
                    String::new()
                } else {
                    format!("?{}", enabled.join("&"))
                }
            );
            let mut request = json!({
                "method": method.to_uppercase(),
                "header": [],
                "url": {
                    "raw": raw,
                    "host": ["{{baseUrl}}"],
                    "path": segments,
                    "query": query,
                    "variable": variables,
                },
                "description": op["description"].as_str().or(op["summary"].as_str()).unwrap_or_default(),
            });
            if op.get("requestBody").is_some() {
                let body = body_example(method, path).with_context(|| {
                    format!(
                        "no example body for {} {path}: add one in rest/docs.rs",
                        method.to_uppercase()
                    )
                })?;
                request["header"] = json!([{"key": "Content-Type", "value": "application/json"}]);
                request["body"] = json!({
                    "mode": "raw",
                    "raw": serde_json::to_string_pretty(&body)?,
                    "options": {"raw": {"language": "json"}},
                });
            }
            // The POC's contract has no authentication; every other operation sends the
            // collection's bearer token.
            if op.get("security").is_none() {
                request["auth"] = json!({"type": "noauth"});
            }
            let item = json!({
                "name": op["summary"].as_str().map_or_else(|| format!("{} {path}", method.to_uppercase()), str::to_owned),
                "request": request,
            });
            match folders.iter_mut().find(|(t, _)| *t == tag) {
                Some((_, items)) => items.push(item),
                None => folders.push((tag, vec![item])),
            }
        }
    }
    Ok(json!({
        "info": {
            "name": "UdaConnect",
            "description": format!(
                "Every operation of the UdaConnect REST API {} (generated from the code by `udaconnect docs`). \
                 Set `baseUrl`, and `token` to a bearer JWT (`udaconnect token --role organizer`; \
                 `./dev run` prints one); `/v1/ws` is a WebSocket: open it with a WebSocket request.",
                spec["info"]["version"].as_str().unwrap_or_default()
            ),
            "schema": "https://schema.getpostman.com/json/collection/v2.1.0/collection.json",
        },
        "variable": [
            {"key": "baseUrl", "value": "http://localhost:30001"},
            {"key": "token", "value": ""},
        ],
        "auth": {"type": "bearer", "bearer": [{"key": "token", "value": "{{token}}", "type": "string"}]},
        "item": folders
            .into_iter()
            .map(|(name, item)| json!({"name": name, "item": item}))
            .collect::<Vec<_>>(),
    }))
}

/// Both documents, as written to the docs folder: `(file name, contents)`.
pub fn documents() -> anyhow::Result<Vec<(&'static str, String)>> {
    let collection = postman_collection(&openapi_json()?)?;
    Ok(vec![
        (OPENAPI_FILE, openapi_yaml()?),
        (
            POSTMAN_FILE,
            format!("{}\n", serde_json::to_string_pretty(&collection)?),
        ),
    ])
}
