//! The Helm chart (charts/berth), the plain manifests rendered from it (manifests/) and its
//! values schema, checked with the real tools: `helm lint --strict`, `helm template`, and
//! `kubernetes-validate --strict` against every Kubernetes release berth supports.
//!
//! The tools come from `.ci/kube-tools`: helm at `$BERTH_KUBE_TOOLS/helm` (default
//! /opt/berth-kube-tools) or on PATH, kubernetes-validate beside it or on PATH. Without them
//! each test says so on stderr and passes, unless `CI` is set: CI must run them.
//!
//! kubernetes-validate knows the built-in kinds only. For any other kind it prints a WARN and
//! passes, which would also hide a built-in kind under a mistyped apiVersion. So every WARN
//! must name one of [`CRD_KINDS`], and those objects are validated here against their fields
//! as the external-snapshotter CRDs define them, with `metadata` checked against the strict
//! ObjectMeta of the same Kubernetes release.

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::Once,
};

/// The Kubernetes releases the chart supports (Chart.yaml: kubeVersion >=1.31.0-0).
const KUBE_VERSIONS: [&str; 5] = ["1.31.0", "1.32.0", "1.33.0", "1.34.0", "1.35.0"];

/// Kinds whose schemas come from CRDs, not from Kubernetes: (apiVersion, kind).
const CRD_KINDS: [(&str, &str); 2] = [
    ("snapshot.storage.k8s.io/v1", "VolumeSnapshotClass"),
    (
        "groupsnapshot.storage.k8s.io/v1",
        "VolumeGroupSnapshotClass",
    ),
];

const ALL_FEATURES: &str = "charts/berth/ci/all-features-values.yaml";

struct Tools {
    helm: PathBuf,
    validate: PathBuf,
    /// The interpreter kubernetes-validate runs on: it has jsonschema, referencing and PyYAML.
    python: PathBuf,
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

fn find(dir: &Path, name: &str) -> Option<PathBuf> {
    let here = dir.join(name);
    if here.is_file() {
        Some(here)
    } else {
        on_path(name)
    }
}

/// The tools, or None (after saying why) when this machine has none and CI is not set.
fn tools() -> Option<Tools> {
    let dir = std::env::var_os("BERTH_KUBE_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/berth-kube-tools"));
    let found = (|| {
        let helm = find(&dir, "helm").ok_or("helm")?;
        let validate = find(&dir, "kubernetes-validate").ok_or("kubernetes-validate")?;
        let script = std::fs::read_to_string(&validate).map_err(|_| "kubernetes-validate")?;
        let python = script
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("#!"))
            .map(|l| PathBuf::from(l.trim()))
            .ok_or("kubernetes-validate's python")?;
        Ok::<_, &str>(Tools {
            helm,
            validate,
            python,
        })
    })();
    match found {
        Ok(t) => Some(t),
        Err(missing) => {
            let msg = format!(
                "tests/chart.rs: {missing} not found in {} or on PATH; install the tools with \
                 `.ci/kube-tools` (or set BERTH_KUBE_TOOLS)",
                dir.display()
            );
            let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty());
            assert!(!ci, "{msg}: CI is set, so the chart tests must run");
            static NOTICE: Once = Once::new();
            // Straight to stderr: libtest captures eprintln! of passing tests.
            NOTICE.call_once(|| {
                let _ = writeln!(std::io::stderr(), "{msg}; skipping the chart tests");
            });
            None
        }
    }
}

fn run(cmd: &mut Command) -> Output {
    cmd.current_dir(root())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn lint(t: &Tools, values: Option<&str>) {
    let mut cmd = Command::new(&t.helm);
    cmd.args(["lint", "--strict", "charts/berth"]);
    if let Some(v) = values {
        cmd.args(["-f", v]);
    }
    let out = run(&mut cmd);
    assert!(
        out.status.success(),
        "helm lint --strict ({}) failed:\n{}{}",
        values.unwrap_or("default values"),
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// `helm template` as `helm install berth charts/berth -n berth-system` would render it.
fn template(t: &Tools, args: &[&str]) -> Output {
    run(Command::new(&t.helm)
        .args([
            "template",
            "berth",
            "charts/berth",
            "--namespace",
            "berth-system",
        ])
        .args(args))
}

fn render(t: &Tools, values: Option<&str>, kube_version: &str) -> String {
    let mut args = vec!["--kube-version", kube_version];
    if let Some(v) = values {
        args.extend(["-f", v]);
    }
    let out = template(t, &args);
    assert!(
        out.status.success(),
        "helm template ({}, Kubernetes {kube_version}) failed:\n{}",
        values.unwrap_or("default values"),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Counts the objects of each kind in a multi-document YAML stream (top-level `kind:` lines).
fn kinds(yaml: &str) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for kind in yaml.lines().filter_map(|l| l.strip_prefix("kind: ")) {
        *m.entry(kind.trim().to_string()).or_default() += 1;
    }
    m
}

/// Validates the objects of each CRD_KINDS kind: fields as the external-snapshotter CRDs'
/// openAPIV3Schema defines them (driver and deletionPolicy required, parameters a string map,
/// nothing else), metadata as the given Kubernetes release's strict ObjectMeta. Prints
/// "OK <kind>" per object; fails on the first invalid one.
const CRD_CHECK: &str = r#"
import json, sys, yaml, jsonschema, importlib_resources
from referencing import Registry, Resource

path, version = sys.argv[1], sys.argv[2]
defs = json.loads(importlib_resources.files("kubernetes_validate").joinpath(
    f"kubernetes-json-schema/v{version}-local-strict/_definitions.json").read_text())
registry = Resource.from_contents(defs) @ Registry()
def class_schema(api_version, kind):
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://kubernetes.io/api/berth-crd-check",
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "driver", "deletionPolicy"],
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": {"$ref": "/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"},
            "driver": {"type": "string", "minLength": 1},
            "deletionPolicy": {"enum": ["Delete", "Retain"]},
            "parameters": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    }
kinds = {(a, k): class_schema(a, k) for a, k in json.loads(sys.argv[3])}
for obj in yaml.safe_load_all(open(path)):
    if not obj or (obj.get("apiVersion"), obj.get("kind")) not in kinds:
        continue
    schema = kinds[(obj["apiVersion"], obj["kind"])]
    try:
        jsonschema.Draft202012Validator(schema, registry=registry).validate(obj)
    except jsonschema.ValidationError as e:
        sys.exit(f"ERROR {obj['kind']}/{obj['metadata'].get('name')} against {version}: "
                 f"{'.'.join(map(str, e.path))}: {e.message}")
    print("OK", obj["kind"])
"#;

/// Validates every object of `yaml` strictly against Kubernetes `version`.
fn validate(t: &Tools, dir: &Path, label: &str, yaml: &str, version: &str) {
    let file = dir.join(format!("{label}-{version}.yaml"));
    std::fs::write(&file, yaml).unwrap();
    let out = run(Command::new(&t.validate)
        .args(["--strict", "--quiet", "--kubernetes-version", version])
        .arg(&file));
    let report = text(&out.stdout);
    assert!(
        out.status.success() && !report.contains("ERROR"),
        "{label} does not validate against Kubernetes {version}:\n{report}{}",
        text(&out.stderr)
    );
    // What kubernetes-validate skipped: it must be exactly the CRD-backed objects.
    let mut skipped: BTreeMap<String, usize> = BTreeMap::new();
    for line in report.lines().filter(|l| l.starts_with("WARN")) {
        let known = CRD_KINDS
            .iter()
            .find(|(api, kind)| line.contains(&format!("kind {kind} with api version {api} ")));
        let (_, kind) = known.unwrap_or_else(|| {
            panic!(
                "{label}, Kubernetes {version}: kubernetes-validate has no schema for an \
                 object that is not a known custom resource (a mistyped apiVersion?):\n{line}"
            )
        });
        *skipped.entry(kind.to_string()).or_default() += 1;
    }
    let rendered_crd_objects: BTreeMap<String, usize> = kinds(yaml)
        .into_iter()
        .filter(|(k, _)| CRD_KINDS.iter().any(|(_, c)| c == k))
        .collect();
    assert_eq!(
        skipped, rendered_crd_objects,
        "{label}, Kubernetes {version}: kubernetes-validate skipped other objects than the \
         custom resources rendered"
    );
    if skipped.is_empty() {
        return;
    }
    let api_kinds: Vec<[&str; 2]> = CRD_KINDS.iter().map(|&(a, k)| [a, k]).collect();
    let out = run(Command::new(&t.python)
        .args(["-c", CRD_CHECK])
        .arg(&file)
        .arg(version)
        .arg(serde_json::to_string(&api_kinds).unwrap()));
    assert!(
        out.status.success(),
        "{label}, Kubernetes {version}: a custom resource does not match its CRD:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let mut checked: BTreeMap<String, usize> = BTreeMap::new();
    for kind in text(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("OK "))
    {
        *checked.entry(kind.to_string()).or_default() += 1;
    }
    assert_eq!(
        checked, skipped,
        "{label}, Kubernetes {version}: not every custom resource was checked"
    );
}

/// Renders with `values` for each supported release and validates each render against it.
fn render_and_validate(values: Option<&str>) -> Option<BTreeMap<String, usize>> {
    let t = tools()?;
    let dir = tempfile::tempdir().unwrap();
    let label = if values.is_some() {
        "all-features"
    } else {
        "default"
    };
    let mut last = BTreeMap::new();
    for version in KUBE_VERSIONS {
        let yaml = render(&t, values, version);
        validate(&t, dir.path(), label, &yaml, version);
        last = kinds(&yaml);
    }
    Some(last)
}

/// `helm template` with `set` must fail naming the offending key (`key`) and saying what is
/// wrong (one of `hints`, which cover Helm 3's and Helm 4's schema validators).
fn assert_rejected(set: &str, key: &str, hints: &[&str]) {
    let Some(t) = tools() else { return };
    let out = template(&t, &["--set", set]);
    let err = text(&out.stderr);
    assert!(
        !out.status.success(),
        "--set {set} was accepted; the values schema should refuse it"
    );
    assert!(
        err.contains(key) && hints.iter().any(|h| err.contains(h)),
        "--set {set}: the error should name {key:?} and say one of {hints:?}, got:\n{err}"
    );
}

fn chart_field(field: &str) -> String {
    let chart = std::fs::read_to_string(root().join("charts/berth/Chart.yaml")).unwrap();
    chart
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().trim_matches('"').to_string())
        .unwrap_or_else(|| panic!("Chart.yaml has no {field}"))
}

#[test]
fn chart_version_and_app_version_are_the_crate_version() {
    assert_eq!(
        chart_field("apiVersion"),
        "v2",
        "Helm 3 and 4 both read v2 charts"
    );
    assert_eq!(chart_field("version"), env!("CARGO_PKG_VERSION"));
    assert_eq!(chart_field("appVersion"), env!("CARGO_PKG_VERSION"));
}

#[test]
fn helm_lint_strict_passes_with_default_values() {
    if let Some(t) = tools() {
        lint(&t, None);
    }
}

#[test]
fn helm_lint_strict_passes_with_every_optional_feature() {
    if let Some(t) = tools() {
        lint(&t, Some(ALL_FEATURES));
    }
}

#[test]
fn default_render_validates_strictly_against_kubernetes_1_31_to_1_35() {
    let Some(kinds) = render_and_validate(None) else {
        return;
    };
    for kind in [
        "CSIDriver",
        "Deployment",
        "DaemonSet",
        "PodDisruptionBudget",
        "Secret",
        "NetworkPolicy",
        "StorageClass",
        "ServiceAccount",
        "ClusterRole",
        "Role",
    ] {
        assert!(kinds.contains_key(kind), "default render lacks a {kind}");
    }
}

#[test]
fn all_features_render_validates_strictly_against_kubernetes_1_31_to_1_35() {
    let Some(kinds) = render_and_validate(Some(ALL_FEATURES)) else {
        return;
    };
    for kind in [
        "VolumeSnapshotClass",
        "VolumeGroupSnapshotClass",
        "VolumeAttributesClass",
    ] {
        assert!(
            kinds.contains_key(kind),
            "all-features render lacks a {kind}"
        );
    }
}

#[test]
fn values_schema_rejects_a_wrong_type() {
    assert_rejected(
        "controller.replicas=two",
        "replicas",
        &["Expected: integer", "want integer"],
    );
}

#[test]
fn values_schema_rejects_an_unknown_key() {
    assert_rejected(
        "controller.replicaz=3",
        "replicaz",
        &["Additional property", "additional properties"],
    );
}

#[test]
fn values_schema_rejects_a_value_outside_its_enum() {
    assert_rejected(
        "storageClasses.default.fsType=btrfs",
        "fsType",
        &["must be one of"],
    );
}

#[test]
fn values_schema_rejects_a_size_without_a_binary_suffix() {
    assert_rejected(
        "node.pool.size=64GB",
        "size",
        &["Does not match pattern", "does not match pattern"],
    );
}

#[test]
fn values_schema_rejects_an_integer_below_its_minimum() {
    assert_rejected(
        "controller.replicas=0",
        "replicas",
        &["greater than or equal to 1", "minimum"],
    );
}

#[test]
fn chart_refuses_both_a_pool_device_and_a_pool_dir() {
    assert_rejected(
        "node.pool.device=/dev/sdb,node.pool.dir=/srv/pool",
        "node.pool.device and node.pool.dir",
        &["mutually exclusive"],
    );
}

#[test]
fn generated_agent_certificate_is_for_berth_agent_both_ways() {
    let Some(t) = tools() else { return };
    let dir = tempfile::tempdir().unwrap();
    let yaml = render(&t, None, KUBE_VERSIONS[KUBE_VERSIONS.len() - 1]);
    let file = dir.path().join("render.yaml");
    std::fs::write(&file, yaml).unwrap();
    // Write the Secret's three keys out as PEM files.
    let out = run(Command::new(&t.python)
        .arg("-c")
        .arg(
            "import base64, sys, yaml\n\
             [s] = [o for o in yaml.safe_load_all(open(sys.argv[1])) if o and o['kind'] == 'Secret']\n\
             assert s['metadata']['name'] == 'berth-agent-tls', s['metadata']['name']\n\
             for k in ('ca.crt', 'tls.crt', 'tls.key'):\n\
             \x20   open(sys.argv[2] + '/' + k, 'wb').write(base64.b64decode(s['data'][k]))\n",
        )
        .arg(&file)
        .arg(dir.path()));
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Agents are servers and clients of each other, and check the name berth-agent.
    for purpose in ["sslserver", "sslclient"] {
        let out = run(Command::new("openssl")
            .args([
                "verify",
                "-purpose",
                purpose,
                "-verify_hostname",
                "berth-agent",
            ])
            .arg("-CAfile")
            .arg(dir.path().join("ca.crt"))
            .arg(dir.path().join("tls.crt")));
        assert!(
            out.status.success(),
            "the generated certificate does not verify for {purpose} as berth-agent:\n{}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
    }
}

#[test]
fn manifests_are_identical_to_a_fresh_render() {
    let Some(t) = tools() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = run(Command::new(root().join(".ci/render-manifests"))
        .arg(dir.path())
        .env("HELM", &t.helm));
    assert!(
        out.status.success(),
        ".ci/render-manifests failed:\n{}",
        text(&out.stderr)
    );
    let hint = "run .ci/render-manifests and commit manifests/";
    let mut fresh = Vec::new();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        let want = std::fs::read_to_string(dir.path().join(&name)).unwrap();
        let have = std::fs::read_to_string(root().join("manifests").join(&name))
            .unwrap_or_else(|_| panic!("manifests/{name} is missing: {hint}"));
        if have != want {
            let line = have
                .lines()
                .zip(want.lines())
                .position(|(a, b)| a != b)
                .unwrap_or(have.lines().count().min(want.lines().count()));
            panic!(
                "manifests/{name} differs from a fresh render of charts/berth from line {}: {hint}",
                line + 1
            );
        }
        fresh.push(name);
    }
    for entry in std::fs::read_dir(root().join("manifests")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(
            !name.ends_with(".yaml") || fresh.contains(&name),
            "manifests/{name} is not rendered any more: remove it, or {hint}"
        );
    }
}

#[test]
fn manifests_kustomization_builds_and_validates() {
    let Some(t) = tools() else { return };
    let Some(kubectl) = find(t.helm.parent().unwrap(), "kubectl") else {
        panic!("kubectl not found beside helm or on PATH: install it with .ci/kube-tools");
    };
    let out = run(Command::new(kubectl).args(["kustomize", "manifests"]));
    assert!(
        out.status.success(),
        "kubectl kustomize manifests failed:\n{}",
        text(&out.stderr)
    );
    let yaml = text(&out.stdout);
    let dir = tempfile::tempdir().unwrap();
    for version in KUBE_VERSIONS {
        validate(&t, dir.path(), "manifests", &yaml, version);
    }
    let built = kinds(&yaml);
    assert_eq!(built.get("Namespace"), Some(&1), "{built:?}");
    assert_eq!(built.get("DaemonSet"), Some(&1), "{built:?}");
    assert_eq!(
        built.get("Secret"),
        None,
        "manifests/ must not carry a key pair"
    );
}

#[test]
fn manifests_agent_tls_script_makes_a_valid_secret() {
    let Some(t) = tools() else { return };
    let out = run(Command::new(root().join("manifests/create-agent-tls.sh")).arg("--print"));
    assert!(
        out.status.success(),
        "manifests/create-agent-tls.sh --print failed (it needs openssl):\n{}",
        text(&out.stderr)
    );
    let yaml = text(&out.stdout);
    assert!(yaml.contains("name: berth-agent-tls") && yaml.contains("namespace: berth-system"));
    let dir = tempfile::tempdir().unwrap();
    validate(&t, dir.path(), "agent-tls", &yaml, KUBE_VERSIONS[0]);
}
