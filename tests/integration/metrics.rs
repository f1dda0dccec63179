//! `/metrics` exports the series it always has: the set of series names and labels of a
//! running service is compared with `metrics_series.txt`, so a change of how the metrics are
//! kept or encoded cannot rename, drop or relabel a series that dashboards and alerts use.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::json;

use crate::helpers::{eventually, test_config, TestApp, TestDb};
use crate::rest::{create_person, now_rfc3339, post};

/// The series of a Prometheus or OpenMetrics text: `name{label="value",…}` with the labels
/// sorted and `le` bounds written as numbers (`1` and `1.0` are the same bound).
fn series(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let sample = l.rsplit_once(' ').map_or(l, |(s, _)| s);
            let Some((name, labels)) = sample.split_once('{') else {
                return sample.to_owned();
            };
            let mut labels: Vec<String> = labels
                .trim_end_matches('}')
                .split(',')
                .map(|kv| match kv.strip_prefix("le=\"") {
                    Some(bound) => {
                        let bound = bound.trim_end_matches('"');
                        match bound.parse::<f64>() {
                            Ok(b) if b.is_finite() => format!("le=\"{b}\""),
                            _ => format!("le=\"{bound}\""),
                        }
                    }
                    None => kv.to_owned(),
                })
                .collect();
            labels.sort();
            format!("{name}{{{}}}", labels.join(","))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_exports_the_same_series_names_and_labels() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(test_config(&db)).await;
    app.pipeline(Duration::from_secs(60)).await;
    let a = create_person(&app, "A").await;
    let b = create_person(&app, "B").await;
    for person in [a, b] {
        let (status, body) = post(
            &app.url("/v1/locations"),
            &json!({"person_id": person, "lat": 41.387, "lon": 2.17, "recorded_at": now_rfc3339()}),
        )
        .await;
        assert_eq!(status, 202, "{body}");
    }
    // Once both reports are stored and every owned partition has a snapshot, every series
    // that exists at all exists.
    let text = eventually(
        "both reports stored, every partition snapshotted",
        Duration::from_secs(60),
        || async {
            let text = app.metrics().await;
            let stored = text
                .lines()
                .any(|l| l == "udaconnect_locations_stored_total 2");
            let count = |prefix: &str| text.lines().filter(|l| l.starts_with(prefix)).count();
            let owned = count("udaconnect_partition_lag{");
            let snapshots = count("udaconnect_snapshot_age_seconds{");
            if stored && owned > 0 && snapshots == owned {
                Ok(text)
            } else {
                Err(format!(
                    "stored: {stored}, partitions: {owned}, snapshots: {snapshots}"
                ))
            }
        },
    )
    .await;
    let want: BTreeSet<String> = include_str!("metrics_series.txt")
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    let got = series(&text);
    let missing: Vec<&String> = want.difference(&got).collect();
    let extra: Vec<&String> = got.difference(&want).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing series: {missing:#?}\nnew series: {extra:#?}\n(the whole set, to review and keep in metrics_series.txt:)\n{}",
        got.iter().cloned().collect::<Vec<_>>().join("\n")
    );
    app.stop().await.expect("clean shutdown");
    db.drop_db().await;
}
