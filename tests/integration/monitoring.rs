//! `manifests/monitoring/` against what the service exports: every metric a Grafana panel's
//! PromQL names is a series `/metrics` exports, with the labels the query selects and groups by,
//! and the Prometheus scrape configuration finds the pods the StatefulSet labels and annotates.
//!
//! What `/metrics` exports is `metrics_series.txt`: metrics.rs compares that file with a running
//! service's `/metrics`, so it is the live set without starting a service here.

use std::collections::{BTreeMap, BTreeSet};

use promql_parser::label::MatchOp;
use promql_parser::parser::{Expr, VectorSelector};
use serde_json::Value;

use crate::manifests::{documents, manifests_dir};

/// A vector selector of a query: a metric and its label matchers `(label, op, value)`.
#[derive(Debug)]
struct Selector {
    metric: String,
    matchers: Vec<(String, String, String)>,
}

/// What a PromQL expression refers to.
#[derive(Debug, Default)]
struct Query {
    selectors: Vec<Selector>,
    /// Label names of `by`, `without`, `on`, `ignoring`, `group_left`, `group_right`.
    grouping: Vec<String>,
}

/// Grafana's interval variables, replaced by a duration before parsing (PromQL has none).
const GRAFANA_INTERVALS: [&str; 3] = ["$__rate_interval", "$__interval", "$__range"];

/// Reads the metrics, matchers and grouping labels of a PromQL expression with
/// `promql-parser` (which also refuses unknown functions); errors name what does not parse.
fn parse_query(expr: &str) -> Result<Query, String> {
    let mut text = expr.to_owned();
    for variable in GRAFANA_INTERVALS {
        text = text.replace(variable, "5m");
    }
    let mut query = Query::default();
    walk(&promql_parser::parser::parse(&text)?, &mut query);
    Ok(query)
}

fn walk(expr: &Expr, query: &mut Query) {
    match expr {
        Expr::Aggregate(a) => {
            if let Some(m) = &a.modifier {
                query.grouping.extend(m.labels().labels.iter().cloned());
            }
            if let Some(p) = &a.param {
                walk(p, query);
            }
            walk(&a.expr, query);
        }
        Expr::Binary(b) => {
            if let Some(m) = &b.modifier {
                if let Some(on) = &m.matching {
                    query.grouping.extend(on.labels().labels.iter().cloned());
                }
                if let Some(group) = m.card.labels() {
                    query.grouping.extend(group.labels.iter().cloned());
                }
            }
            walk(&b.lhs, query);
            walk(&b.rhs, query);
        }
        Expr::Unary(u) => walk(&u.expr, query),
        Expr::Paren(p) => walk(&p.expr, query),
        Expr::Subquery(s) => walk(&s.expr, query),
        Expr::Call(c) => c.args.args.iter().for_each(|a| walk(a, query)),
        Expr::VectorSelector(v) => query.selectors.push(selector(v)),
        Expr::MatrixSelector(m) => query.selectors.push(selector(&m.vs)),
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
    }
}

fn selector(v: &VectorSelector) -> Selector {
    Selector {
        metric: v.name.clone().unwrap_or_default(),
        matchers: v
            .matchers
            .matchers
            .iter()
            .filter(|m| m.name != "__name__")
            .map(|m| {
                let op = match &m.op {
                    MatchOp::Equal => "=",
                    MatchOp::NotEqual => "!=",
                    MatchOp::Re(_) => "=~",
                    MatchOp::NotRe(_) => "!~",
                };
                (m.name.clone(), op.to_owned(), m.value.clone())
            })
            .collect(),
    }
}

/// The series `/metrics` exports: each metric with its `(label, value)` pairs.
fn exported() -> BTreeMap<String, BTreeSet<(String, String)>> {
    let mut metrics: BTreeMap<String, BTreeSet<(String, String)>> = BTreeMap::new();
    for line in include_str!("metrics_series.txt")
        .lines()
        .filter(|l| !l.is_empty())
    {
        let (name, labels) = line.split_once('{').unwrap_or((line, ""));
        let pairs = metrics.entry(name.to_owned()).or_default();
        for pair in labels
            .trim_end_matches('}')
            .split(',')
            .filter(|p| !p.is_empty())
        {
            let (label, value) = pair.split_once('=').expect("label=\"value\"");
            pairs.insert((label.to_owned(), value.trim_matches('"').to_owned()));
        }
    }
    metrics
}

/// Every `(panel title, expression)` of the dashboard, rows' panels included.
fn dashboard_queries() -> Vec<(String, String)> {
    fn walk(panels: &Value, out: &mut Vec<(String, String)>) {
        for panel in panels.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("?").to_owned();
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"].as_str().expect("a PromQL expr");
                out.push((title.clone(), expr.to_owned()));
            }
            walk(&panel["panels"], out);
        }
    }
    let path = manifests_dir().join("monitoring/grafana-dashboard.json");
    let text = std::fs::read_to_string(&path).expect("the dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("dashboard JSON");
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// The Prometheus scrape configuration, as JSON.
fn scrape_config() -> Value {
    let path = manifests_dir().join("monitoring/prometheus.yml");
    let text = std::fs::read_to_string(&path).expect("prometheus.yml");
    serde_norway::from_str(&text).expect("prometheus.yml is YAML")
}

/// Labels the scrape configuration puts on every series (relabelling's `target_label`s that
/// are not Prometheus's own `__…`), and `job` and `instance`, which Prometheus adds itself.
fn target_labels() -> BTreeSet<String> {
    let config = scrape_config();
    let mut labels: BTreeSet<String> = ["job", "instance"].map(str::to_owned).into();
    for job in config["scrape_configs"].as_array().into_iter().flatten() {
        for relabel in job["relabel_configs"].as_array().into_iter().flatten() {
            if let Some(label) = relabel["target_label"].as_str() {
                if !label.starts_with("__") {
                    labels.insert(label.to_owned());
                }
            }
        }
    }
    labels
}

#[test]
fn every_dashboard_query_uses_series_that_metrics_exports() {
    let exported = exported();
    let added = target_labels();
    let queries = dashboard_queries();
    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    for (panel, expr) in &queries {
        let query = match parse_query(expr) {
            Ok(q) => q,
            Err(e) => {
                problems.push(format!("{panel}: `{expr}` is not PromQL: {e}"));
                continue;
            }
        };
        if query.selectors.is_empty() {
            problems.push(format!("{panel}: no metric in `{expr}`"));
        }
        let mut labels_here = added.clone();
        for selector in &query.selectors {
            used.insert(selector.metric.clone());
            let Some(series) = exported.get(&selector.metric) else {
                problems.push(format!(
                    "{panel}: `{}` is not a metric /metrics exports (`{expr}`)",
                    selector.metric
                ));
                continue;
            };
            let labels: BTreeSet<&String> = series.iter().map(|(l, _)| l).collect();
            labels_here.extend(labels.iter().map(|l| (*l).clone()));
            for (label, op, value) in &selector.matchers {
                if !labels.contains(label) && !added.contains(label) {
                    problems.push(format!(
                        "{panel}: `{}` has no label `{label}` (`{expr}`)",
                        selector.metric
                    ));
                } else if op == "="
                    && labels.contains(label)
                    && !series.contains(&(label.clone(), value.clone()))
                {
                    problems.push(format!(
                        "{panel}: no `{}` series has {label}=\"{value}\" (`{expr}`)",
                        selector.metric
                    ));
                }
            }
        }
        for label in &query.grouping {
            if !labels_here.contains(label) {
                problems.push(format!(
                    "{panel}: groups by `{label}`, which neither its metrics nor the scrape \
                     configuration have (`{expr}`)"
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // The figures issue 19 asks the dashboard for.
    for wanted in [
        "udaconnect_ingest_events_total",
        "udaconnect_dead_letters_total",
        "udaconnect_partition_lag",
        "udaconnect_partition_colocations_total",
        "udaconnect_partition_notifications_total",
        "udaconnect_snapshot_age_seconds",
        "udaconnect_hub_subscribers",
    ] {
        assert!(
            used.contains(wanted),
            "no panel shows {wanted}: {queries:?}"
        );
    }
}

#[test]
fn the_query_reader_finds_metrics_matchers_and_grouping_labels() {
    let query = parse_query(
        "histogram_quantile(0.99, sum by (le, stage) (rate(udaconnect_stage_batch_records_bucket\
         {stage=~\"zo.*\", kind!=\"x,}\"}[$__rate_interval] offset 5m))) / on (pod) \
         group_left (node) udaconnect_pipeline_up > bool 0 or absent(nope_total)",
    )
    .expect("PromQL");
    let metrics: Vec<&str> = query.selectors.iter().map(|s| s.metric.as_str()).collect();
    assert_eq!(
        metrics,
        [
            "udaconnect_stage_batch_records_bucket",
            "udaconnect_pipeline_up",
            "nope_total",
        ]
    );
    assert_eq!(
        query.selectors[0].matchers,
        [
            ("stage".to_owned(), "=~".to_owned(), "zo.*".to_owned()),
            ("kind".to_owned(), "!=".to_owned(), "x,}".to_owned()),
        ]
    );
    let grouping: BTreeSet<&str> = query.grouping.iter().map(String::as_str).collect();
    assert_eq!(grouping, BTreeSet::from(["le", "stage", "pod", "node"]));
    let wrong = parse_query("wrong_fn(udaconnect_pipeline_up)").expect_err("not PromQL");
    assert!(wrong.contains("wrong_fn"), "{wrong}");
}

#[test]
fn the_scrape_configuration_finds_the_pods_the_statefulset_annotates() {
    let config = scrape_config();
    let job = config["scrape_configs"]
        .as_array()
        .and_then(|jobs| jobs.iter().find(|j| j["job_name"] == "udaconnect"))
        .expect("a scrape job udaconnect");
    let discovery = &job["kubernetes_sd_configs"][0];
    assert_eq!(discovery["role"], "pod", "{job}");
    assert_eq!(
        discovery["namespaces"]["names"],
        serde_json::json!(["udaconnect"])
    );
    assert_eq!(
        discovery["selectors"][0]["label"], "app=udaconnect",
        "{job}"
    );

    let (_, statefulset) = documents()
        .into_iter()
        .find(|(_, d)| d["kind"] == "StatefulSet" && d["metadata"]["name"] == "udaconnect")
        .expect("the udaconnect StatefulSet");
    let pod = &statefulset["spec"]["template"];
    assert_eq!(pod["metadata"]["labels"]["app"], "udaconnect");
    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
    // The scraped port: the container port named in the relabelling, the annotated port and
    // the REST address the ConfigMap sets are one port.
    let port_name = job["relabel_configs"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| {
            r["source_labels"] == serde_json::json!(["__meta_kubernetes_pod_container_port_name"])
        })
        .and_then(|r| r["regex"].as_str())
        .expect("a relabelling that keeps one container port");
    let port = pod["spec"]["containers"][0]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == port_name)
        .unwrap_or_else(|| panic!("no container port named {port_name}"))["containerPort"]
        .to_string();
    assert_eq!(annotations["prometheus.io/port"], port.as_str());
    let (_, configmap) = documents()
        .into_iter()
        .find(|(_, d)| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "udaconnect")
        .expect("the udaconnect ConfigMap");
    let rest_addr = configmap["data"]["UDACONNECT_REST_ADDR"]
        .as_str()
        .expect("REST address");
    assert!(
        rest_addr.ends_with(&format!(":{port}")),
        "{rest_addr} is not port {port}"
    );
}
