//! `manifests/` as a cluster would take it: every resource valid against the schemas of a
//! pinned Kubernetes version (kubernetes-validate, strict), every `UDACONNECT_*` setting one
//! that `udaconnect` knows, and no secret value in git (the Secrets come from git-ignored env
//! files through kustomize's secretGenerator).

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;
use udaconnect::config::{Config, ENV_PREFIX};

/// The Kubernetes version the manifests are checked against (K3s's stable channel's minor).
const KUBERNETES_VERSION: &str = "1.31.0";

fn manifests_dir() -> PathBuf {
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
fn documents() -> Vec<(PathBuf, Value)> {
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
        assert!(
            value.is_empty() || !secretish.iter().any(|s| name.to_uppercase().contains(s)),
            "{at}: {name} sets a secret's value in git"
        );
    }
    // The generator's inputs are the user's, and git ignores them; only the examples are in git,
    // and they hold placeholders.
    let kustomization: Value = serde_norway::from_str(
        &std::fs::read_to_string(manifests_dir().join("kustomization.yaml")).expect("file"),
    )
    .expect("YAML");
    let generated = kustomization["secretGenerator"]
        .as_array()
        .expect("generator");
    assert_eq!(generated.len(), 2, "{kustomization}");
    for g in generated {
        for env in g["envs"].as_array().expect("envs") {
            let file = manifests_dir().join(env.as_str().expect("a path"));
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
            let example = std::fs::read_to_string(file.with_extension("env.example"))
                .unwrap_or_else(|_| panic!("{}.example", file.display()));
            for line in example
                .lines()
                .filter(|l| !l.starts_with('#') && !l.is_empty())
            {
                let (key, value) = line.split_once('=').expect("KEY=value");
                if secretish.iter().any(|s| key.contains(s)) {
                    assert!(value.contains('<'), "{line}: a placeholder, not a value");
                }
            }
        }
    }
}

#[test]
fn every_manifest_is_valid_for_the_pinned_kubernetes_version_in_strict_mode() {
    // `./dev test` exports where `./dev setup` put it; the same place by default.
    let tool = std::env::var("UDATEST_KUBERNETES_VALIDATE").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/.dev/tools/bin/kubernetes-validate"
        )
        .to_owned()
    });
    assert!(
        Path::new(&tool).exists(),
        "no kubernetes-validate at {tool}: run ./dev setup, or set UDATEST_KUBERNETES_VALIDATE"
    );
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
