//! Issue 19's rehearsal, against the `./dev` stack (`./dev test` exports `UDATEST_ADMIN_URL`
//! and `UDATEST_KAFKA_BROKERS`): three `udaconnect serve` pods (the debug binary cargo built
//! for this workspace) rolled one by one, scaled in to two and out to three while a simulated
//! conference streams in through REST and ten persons are followed over SSE.

use std::path::PathBuf;
use std::time::Duration;

use udaconnect::Config;
use udaconnect_bench::rehearsal::{run, Options, Report};
use udaconnect_bench::sim::ConferenceConfig;

/// `udaconnect` in the target directory this test was built into.
fn udaconnect_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's path");
    // target/<profile>/deps/rehearsal-<hash>
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>");
    let binary = profile_dir.join("udaconnect");
    assert!(
        binary.is_file(),
        "{} is missing: build the workspace (cargo test --workspace does)",
        binary.display()
    );
    binary
}

fn options(work_dir: PathBuf) -> Options {
    let base = Config {
        kafka_brokers: std::env::var("UDATEST_KAFKA_BROKERS")
            .unwrap_or_else(|_| "127.0.0.1:19092".to_owned()),
        ..Config::default()
    };
    let admin_url = std::env::var("UDATEST_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:55432/postgres".to_owned());
    let mut conference = ConferenceConfig::for_attendees(400);
    conference.duration_s = 300;
    conference.booths = 100;
    conference.talk_probability = 0.05;
    conference.fit_venue();
    Options {
        binary: udaconnect_binary(),
        base,
        admin_url,
        pods: 3,
        conference,
        preload: 0.5,
        stream_over: Duration::from_secs(30),
        subscribers: 10,
        work_dir,
        keep: false,
    }
}

fn say(text: &str) {
    eprintln!("rehearsal: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_pods_rolled_scaled_in_and_out_lose_nothing() {
    let logs = tempfile::tempdir().expect("a log directory");
    let options = options(logs.path().to_owned());
    let report: Report = run(&options, &say).await.unwrap_or_else(|e| {
        panic!("the rehearsal could not be carried out: {e:#}");
    });
    let figures = serde_json::to_string_pretty(&report).expect("JSON");
    // The stored result equals the reference, every subscriber heard (or recovered from the
    // history) the start and the end of every episode of its person, no REST answer was a
    // 5xx other than a documented 503, and shard_owner names only running pods.
    assert_eq!(report.failures(), Vec::<String>::new(), "{figures}");
    assert_eq!(report.accepted, report.events as u64, "{figures}");
    assert!(report.episodes_expected > 1_000, "{figures}");
    assert_eq!(
        report.owners_at_end.len(),
        16,
        "every partition owned: {figures}"
    );
    assert_eq!(report.running_at_end.len(), 3, "{figures}");
    // The roll happened while reports streamed in, and the subscribers lost their pods.
    assert!(report.streamed_through_roll, "{figures}");
    assert_eq!(
        report.subscribers.len(),
        10,
        "ten persons followed: {figures}"
    );
    assert!(
        report.subscribers.iter().all(|s| s.connects >= 2),
        "every subscriber's pod went away at least once: {figures}"
    );
    let actions: Vec<(&str, &str)> = report
        .steps
        .iter()
        .map(|s| (s.action, s.pod.as_str()))
        .collect();
    assert_eq!(
        actions,
        [
            ("restart", "udaconnect-2"),
            ("restart", "udaconnect-1"),
            ("restart", "udaconnect-0"),
            ("scale-in", "udaconnect-2"),
            ("scale-out", "udaconnect-2"),
        ]
    );
    for step in &report.steps {
        let stopped = step.action != "scale-out";
        let started = step.action != "scale-in";
        assert_eq!(step.handover_s.is_some(), stopped, "{step:?}");
        assert_eq!(step.handover_caught_up_s.is_some(), stopped, "{step:?}");
        // A partition replays after it is restored, never before.
        if let (Some(moved), Some(replayed)) = (step.handover_s, step.handover_caught_up_s) {
            assert!(replayed >= moved, "{step:?}");
        }
        assert_eq!(step.start_to_serving_s.is_some(), started, "{step:?}");
    }
    eprintln!("{figures}");
}
