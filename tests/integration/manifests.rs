//! `manifests/` as a cluster would take it: every resource valid against the schemas of a
//! pinned Kubernetes version (kubernetes-validate, strict), no failed checkov check (each skip
//! with its reason in the manifest), every `UDACONNECT_*` setting one that `udaconnect` knows,
//! and no secret value in git (the Secrets come from git-ignored files through kustomize's
//! secretGenerator).

use std::path::{Path, PathBuf};

use figment::providers::Env;
use serde::Deserialize;
use serde_json::Value;
use udaconnect::config::{Config, ENV_PREFIX};

/// The Kubernetes version the manifests are checked against (K3s's stable channel's minor).
const KUBERNETES_VERSION: &str = "1.31.0";

pub fn manifests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests")
}

/// The resource files `kustomization.yaml` lists.
fn resource_files() -> Vec<PathBuf> {
    let text = std::fs::read_to_string(manifests_dir().join("kustomization.yaml"))
        .expect("manifests/kustomization.yaml");
    let kustomization: Value = serde_norway::from_str(&text).expect("kustomization YAML");
    kustomization["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| manifests_dir().join(r.as_str().expect("a file name")))
        .collect()
}

/// Every document of every resource file, with the file it is in.
pub fn documents() -> Vec<(PathBuf, Value)> {
    resource_files()
        .into_iter()
        .flat_map(|path| {
            let text = std::fs::read_to_string(&path).expect("a manifest");
            serde_norway::Deserializer::from_str(&text)
                .map(|doc| Value::deserialize(doc).expect("YAML"))
                .filter(|doc| !doc.is_null())
                .map(|doc| (path.clone(), doc))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Every `(name, value)` a container or a ConfigMap sets, with where.
fn settings(docs: &[(PathBuf, Value)]) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for (path, doc) in docs {
        let at = format!("{} {}", path.display(), doc["metadata"]["name"]);
        if doc["kind"] == "ConfigMap" {
            for (k, v) in doc["data"].as_object().into_iter().flatten() {
                out.push((
                    at.clone(),
                    k.clone(),
                    v.as_str().unwrap_or_default().to_owned(),
                ));
            }
        }
        let containers = doc["spec"]["template"]["spec"]["containers"].as_array();
        for c in containers.into_iter().flatten() {
            for e in c["env"].as_array().into_iter().flatten() {
                let name = e["name"].as_str().expect("env name").to_owned();
                let value = e["value"].as_str().unwrap_or_default().to_owned();
                out.push((at.clone(), name, value));
            }
        }
    }
    out
}

#[test]
fn every_udaconnect_setting_in_the_manifests_is_a_key_udaconnect_knows() {
    let known: Vec<String> = Config::keys()
        .iter()
        .map(|k| format!("{ENV_PREFIX}{}", k.to_uppercase()))
        .collect();
    let set = settings(&documents());
    let ours: Vec<_> = set
        .iter()
        .filter(|(_, name, _)| name.starts_with(ENV_PREFIX))
        .collect();
    assert!(ours.len() >= 5, "{set:?}");
    let unknown: Vec<_> = ours
        .iter()
        .filter(|(_, name, _)| !known.contains(name))
        .collect();
    assert!(unknown.is_empty(), "not configuration keys: {unknown:?}");
}

/// The settings the pods get (the Secret's configuration file, then the ConfigMap and the
/// containers' variables over it) load: every value has its key's type and range, and the
/// keys agree with each other (a pod would exit at start otherwise).
#[test]
fn the_settings_in_the_manifests_are_a_configuration_udaconnect_accepts() {
    let example = manifests_dir().join("secrets/udaconnect.toml.example");
    let mut toml = std::fs::read_to_string(&example).expect("the example file");
    toml.push('\n');
    for (_, name, value) in settings(&documents()) {
        let Some(key) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        // As the environment layer reads it: a number or a boolean when it parses as one.
        let typed = value.parse::<i64>().is_ok()
            || value.parse::<f64>().is_ok()
            || value == "true"
            || value == "false";
        let value = if typed { value } else { format!("{value:?}") };
        toml.push_str(&format!("{} = {value}\n", key.to_lowercase()));
    }
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), &toml).expect("write");
    let config = match Config::load_from(
        Some(file.path()),
        Env::prefixed("UDATEST_NO_SUCH_VARIABLE_"),
    ) {
        Ok(config) => config,
        Err(e) => panic!("the pods' settings do not load: {e}\n{toml}"),
    };
    // `serve` builds its authenticator first: a pod with no key to verify tokens would exit.
    if let Err(e) = udaconnect::auth::Authenticator::from_config(&config) {
        panic!("the pods could not check bearer tokens: {e}\n{toml}");
    }
}

#[test]
fn no_secret_value_is_committed_in_the_manifests() {
    let docs = documents();
    let secrets: Vec<_> = docs
        .iter()
        .filter(|(_, d)| d["kind"] == "Secret")
        .map(|(p, d)| format!("{} {}", p.display(), d["metadata"]["name"]))
        .collect();
    assert!(
        secrets.is_empty(),
        "Secrets in git (generate them from git-ignored files instead): {secrets:?}"
    );
    let secretish = ["PASSWORD", "TOKEN", "SECRET", "DATABASE_URL", "KEY"];
    for (at, name, value) in settings(&docs) {
        let password_in_url = value.split_once("://").is_some_and(|(_, rest)| {
            rest.split('/')
                .next()
                .is_some_and(|authority| authority.contains('@') && authority.contains(':'))
        });
        assert!(!password_in_url, "{at}: {name} holds a URL with a password");
        // `POSTGRES_PASSWORD_FILE=/run/secrets/…` names the file a mounted Secret holds.
        let names_a_file = name.ends_with("_FILE") && value.starts_with('/');
        assert!(
            value.is_empty()
                || names_a_file
                || !secretish.iter().any(|s| name.to_uppercase().contains(s)),
            "{at}: {name} sets a secret's value in git"
        );
    }
    // The generator's inputs are the user's, and git ignores them; only the examples are in git,
    // and they hold placeholders.
    let inputs = generator_inputs();
    assert_eq!(inputs.len(), 2, "{inputs:?}");
    for file in inputs {
        let ignored = std::process::Command::new("git")
            .args(["check-ignore", "-q"])
            .arg(&file)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("git runs");
        assert!(
            ignored.success(),
            "{} is not ignored by git",
            file.display()
        );
        let example = std::fs::read_to_string(example_of(&file))
            .unwrap_or_else(|_| panic!("{}", example_of(&file).display()));
        // `KEY=value` (an env file) or `key = "value"` (TOML).
        for line in example
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        {
            let (key, value) = line.split_once('=').expect("KEY=value");
            if secretish
                .iter()
                .any(|s| key.trim().to_uppercase().contains(s))
            {
                assert!(value.contains('<'), "{line}: a placeholder, not a value");
            }
        }
    }
}

/// The files kustomize's secretGenerator reads (`envs`, and `files` as `[key=]path`).
fn generator_inputs() -> Vec<PathBuf> {
    let kustomization: Value = serde_norway::from_str(
        &std::fs::read_to_string(manifests_dir().join("kustomization.yaml")).expect("file"),
    )
    .expect("YAML");
    let generators = kustomization["secretGenerator"]
        .as_array()
        .expect("generator");
    generators
        .iter()
        .flat_map(|g| {
            let envs = g["envs"].as_array().into_iter().flatten();
            let files = g["files"].as_array().into_iter().flatten();
            envs.chain(files)
                .map(|f| {
                    let f = f.as_str().expect("a path");
                    let path = f.split_once('=').map_or(f, |(_, path)| path);
                    manifests_dir().join(path)
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The committed example of a git-ignored generator input: `<file>.example`.
fn example_of(file: &Path) -> PathBuf {
    PathBuf::from(format!("{}.example", file.display()))
}

#[test]
fn the_configuration_file_the_pods_read_is_one_udaconnect_loads() {
    // The StatefulSet's `--config` file is the Secret `udaconnect`'s one key; its example, with
    // the placeholders as values, must load (known keys, the right types, a PostgreSQL URL).
    let example = manifests_dir().join("secrets/udaconnect.toml.example");
    let config = Config::load_from(Some(&example), Env::prefixed("UDATEST_NO_SUCH_VARIABLE_"))
        .unwrap_or_else(|e| panic!("{}: {e}", example.display()));
    assert!(config.admin_token.is_some(), "{}", example.display());
    assert!(config.jwt_hs256_key.is_some(), "{}", example.display());
    assert!(
        config
            .database_url
            .expose()
            .contains("@postgis.udaconnect.svc.cluster.local:5432/"),
        "{}",
        config.database_url.redacted()
    );
    let (_, statefulset) = documents()
        .into_iter()
        .find(|(_, d)| d["kind"] == "StatefulSet" && d["metadata"]["name"] == "udaconnect")
        .expect("the udaconnect StatefulSet");
    let args = &statefulset["spec"]["template"]["spec"]["containers"][0]["args"];
    assert_eq!(
        args,
        &serde_json::json!(["serve", "--config", "/etc/udaconnect/udaconnect.toml"]),
        "the pods read the Secret's file"
    );
}

#[test]
fn every_manifest_is_valid_for_the_pinned_kubernetes_version_in_strict_mode() {
    let tool = crate::helpers::tool("UDATEST_KUBERNETES_VALIDATE", "kubernetes-validate");
    let out = std::process::Command::new(&tool)
        .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
        .args(resource_files())
        .output()
        .expect("kubernetes-validate runs");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{report}");
    let passed = report.matches(" passed for resource ").count();
    assert_eq!(
        passed,
        documents().len(),
        "every resource checked: {report}"
    );
}

/// checkov's JSON report of `framework`'s checks on `targets` (`--file`/`--directory` and a
/// path each), whether it exited 0, and its stderr; `--skip-download`: offline, no check
/// metadata fetched from Prisma Cloud.
fn checkov<'a>(
    framework: &str,
    targets: impl IntoIterator<Item = (&'a str, &'a Path)>,
) -> (Value, bool, String) {
    let tool = crate::helpers::tool("UDATEST_CHECKOV", "checkov");
    let mut command = std::process::Command::new(&tool);
    for (flag, path) in targets {
        command.arg(flag).arg(path);
    }
    let out = command
        .args([
            "--framework",
            framework,
            "--output",
            "json",
            "--skip-download",
        ])
        .output()
        .expect("checkov runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "checkov's JSON: {e}\n{}\n{stderr}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    (report, out.status.success(), stderr)
}

/// What checkov's secrets scan (detect-secrets' detectors: high-entropy strings, cloud keys,
/// credentials in URLs, private keys) reports in `files`, one line per finding.
fn secrets_found(files: &[PathBuf]) -> Vec<String> {
    let (report, _, _) = checkov("secrets", files.iter().map(|f| ("--file", f.as_path())));
    // A clean scan prints only the summary; findings come under `results`.
    assert_eq!(
        report["summary"]["parsing_errors"].as_u64().unwrap_or(0),
        0,
        "{report}"
    );
    report["results"]["failed_checks"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            format!(
                "{} {}: {} lines {}",
                c["check_id"].as_str().unwrap_or("?"),
                c["check_name"].as_str().unwrap_or("?"),
                c["file_abs_path"].as_str().unwrap_or("?"),
                c["file_line_range"],
            )
        })
        .collect()
}

/// No value in a committed manifest (or the Containerfile) looks like a secret to checkov's
/// secrets scan, whatever its key is called; the name-based test above covers the settings
/// whose names say they are secret. The scan is shown to work here on a planted value first.
#[test]
fn checkov_finds_no_secret_value_in_the_committed_manifests() {
    let dir = tempfile::tempdir().expect("temp dir");
    let planted = dir.path().join("planted.yaml");
    std::fs::write(
        &planted,
        "env:\n  - name: KAFKA_OPTS\n    value: \"-Djavax.net.ssl.keyStorePassword=hunter2-Xk9q\"\n",
    )
    .expect("write");
    assert!(
        !secrets_found(&[planted]).is_empty(),
        "checkov's secrets scan missed a planted keystore password"
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let listed = std::process::Command::new("git")
        .args(["ls-files", "manifests", "Containerfile"])
        .current_dir(root)
        .output()
        .expect("git runs");
    let tracked: Vec<PathBuf> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(|f| root.join(f))
        .collect();
    assert!(tracked.len() >= 8, "{tracked:?}");
    let found = secrets_found(&tracked);
    assert!(
        found.is_empty(),
        "values that look like secrets in committed files (generate them from git-ignored \
         files instead):\n{}",
        found.join("\n")
    );
}

/// Annotation key prefixes checkov reads a skip from (`checkov.io/skip1: CKV_K8S_43=reason`).
const SKIP_PREFIXES: [&str; 3] = ["checkov.io/skip", "bridgecrew.io/skip", "cortex.io/skip"];

#[test]
fn checkov_finds_no_failed_kubernetes_check_in_the_manifests() {
    let manifests = manifests_dir();
    let (report, succeeded, stderr) = checkov("kubernetes", [("--directory", manifests.as_path())]);
    let results = &report["results"];
    let list = |key: &str| results[key].as_array().cloned().unwrap_or_default();
    let failed: Vec<String> = list("failed_checks")
        .iter()
        .map(|c| {
            format!(
                // file_path is relative to the directory checked: `/20-kafka.yaml`.
                "{} {}: {} in manifests{} lines {}",
                c["check_id"].as_str().unwrap_or("?"),
                c["check_name"].as_str().unwrap_or("?"),
                c["resource"].as_str().unwrap_or("?"),
                c["file_path"].as_str().unwrap_or("?"),
                c["file_line_range"],
            )
        })
        .collect();
    assert!(
        failed.is_empty(),
        "checkov's failed checks (fix the manifest, or skip with `checkov.io/skipN: ID=reason` \
         in the resource's annotations when the check cannot apply):\n{}",
        failed.join("\n")
    );
    assert_eq!(list("parsing_errors"), Vec::<Value>::new(), "{report}");
    // As checkov read them, the skips carry their reasons too.
    for skipped in list("skipped_checks") {
        let reason = skipped["check_result"]["suppress_comment"]
            .as_str()
            .unwrap_or_default();
        assert!(
            !reason.trim().is_empty() && reason != "No comment provided",
            "{} skipped without a reason on {}",
            skipped["check_id"],
            skipped["resource"]
        );
    }
    // checkov found and checked every workload (a directory it cannot read passes nothing).
    let checked: Vec<String> = list("passed_checks")
        .iter()
        .filter_map(|c| c["resource"].as_str().map(str::to_owned))
        .collect();
    for (path, doc) in documents() {
        if doc["kind"] == "StatefulSet" {
            let resource = format!(
                "StatefulSet.{}.{}",
                doc["metadata"]["namespace"].as_str().expect("namespace"),
                doc["metadata"]["name"].as_str().expect("name")
            );
            assert!(
                checked.contains(&resource),
                "{resource} ({}) was not checked: {report}",
                path.display()
            );
        }
    }
    assert!(succeeded, "checkov failed: {stderr}");
}

#[test]
fn every_checkov_skip_in_the_manifests_gives_a_reason() {
    let docs = documents();
    let mut skips = 0;
    for (path, doc) in &docs {
        let annotations = doc["metadata"]["annotations"].as_object();
        for (key, value) in annotations.into_iter().flatten() {
            if !SKIP_PREFIXES.iter().any(|p| key.starts_with(p)) {
                continue;
            }
            skips += 1;
            let at = format!("{} {} {key}", path.display(), doc["metadata"]["name"]);
            let value = value.as_str().unwrap_or_default();
            // checkov splits the value on '=': a second one would break its parsing.
            let (check, reason) = value
                .split_once('=')
                .unwrap_or_else(|| panic!("{at}: `{value}` is not CHECK_ID=reason"));
            assert!(
                check.starts_with("CKV_K8S_") || check.starts_with("CKV2_K8S_"),
                "{at}: `{check}` is not a checkov Kubernetes check id"
            );
            assert!(
                !reason.trim().is_empty(),
                "{at}: skips {check} without a reason"
            );
            assert!(!reason.contains('='), "{at}: a reason cannot hold '='");
        }
    }
    // The locally built image can have neither a digest nor a pull policy of Always.
    assert!(skips >= 2, "the skips were not found in the manifests");
}
