//! A real Kubernetes API server for tests: etcd and kube-apiserver v1.32 started by
//! `../shared/k8s/up` (see its README) in a temp dir, with an admin kubeconfig, kubectl
//! beside it and clients for ServiceAccount tokens.
//!
//! Needs `../shared/k8s` (relative to the repository), kubectl (`.ci/kube-tools` installs it
//! into /opt/berth-kube-tools, or `$BERTH_KUBE_TOOLS`, or PATH) and what `up` runs: openssl,
//! curl, xz and python3. Without them [`ApiServer::start`] says what is missing on stderr and
//! returns None, so the test passes without running, except under CI (`CI=true`), where it
//! panics: CI must run these tests.
//!
//! The server is stopped (`down DIR --purge`) when the [`ApiServer`] is dropped. A value that
//! is never dropped (one kept in a `static` for every test of a binary) and a test process
//! that is killed are covered too: a reaper process started before the server waits on a pipe
//! from this process and runs `down` once the pipe closes, which the kernel does when the
//! process ends, however it ends.

use std::{
    collections::BTreeSet,
    io::Write,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::Mutex,
};

use kube::config::{KubeConfigOptions, Kubeconfig};

pub struct ApiServer {
    dir: PathBuf,
    kubeconfig: PathBuf,
    kubectl: PathBuf,
    /// The reaper and the write end of its pipe: closing it stops the server.
    reaper: Mutex<Option<(Child, ChildStdin)>>,
}

/// The directory of the kube tools (helm, kubectl).
pub fn kube_tools_dir() -> PathBuf {
    std::env::var_os("BERTH_KUBE_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/berth-kube-tools"))
}

/// `name` in the kube tools' directory or on PATH.
pub fn kube_tool(name: &str) -> Option<PathBuf> {
    let here = kube_tools_dir().join(name);
    if here.is_file() {
        return Some(here);
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// helm from the kube tools, or None after [`skip`].
pub fn helm() -> Option<PathBuf> {
    let helm = kube_tool("helm");
    if helm.is_none() {
        skip(&format!(
            "helm in {} or on PATH (install it with `.ci/kube-tools`)",
            kube_tools_dir().display()
        ));
    }
    helm
}

/// `helm template berth charts/berth --namespace NAMESPACE`, only the chart's `templates`
/// (`--show-only`, e.g. `templates/rbac-node.yaml`).
pub fn helm_template(helm: &Path, namespace: &str, templates: &[&str]) -> String {
    let mut cmd = Command::new(helm);
    cmd.args(["template", "berth"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/berth"))
        .args(["--namespace", namespace]);
    for t in templates {
        cmd.args(["--show-only", t]);
    }
    run(&mut cmd, "")
}

/// Runs `cmd` with `stdin` as its input; its stdout. Panics with its stderr when it fails.
pub fn run(cmd: &mut Command, stdin: &str) -> String {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let mut input = child.stdin.take().expect("piped stdin");
    input.write_all(stdin.as_bytes()).expect("stdin");
    drop(input);
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("prints UTF-8")
}

/// Says on stderr, once per reason, that tests against the API server are skipped and why;
/// panics under CI.
pub fn skip(missing: &str) {
    let msg = format!("a test against a real API server needs {missing}");
    assert!(
        !super::shared::under_ci(),
        "{msg}: CI is set, so it must run"
    );
    static SAID: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    if SAID
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(msg.clone())
    {
        // Straight to stderr: libtest captures the output of passing tests.
        let _ = writeln!(std::io::stderr(), "{msg}; skipping it");
    }
}

impl ApiServer {
    /// Starts an API server (about 5 s), or None after [`skip`] when this machine cannot.
    pub fn start() -> Option<ApiServer> {
        let up = super::shared::path("k8s/up", "a test against a real API server")?;
        let k8s = up.parent().expect("a file has a directory");
        let Some(kubectl) = kube_tool("kubectl") else {
            skip(&format!(
                "kubectl in {} or on PATH (install it with `.ci/kube-tools`)",
                kube_tools_dir().display()
            ));
            return None;
        };
        for tool in ["openssl", "curl", "xz", "python3"] {
            if kube_tool(tool).is_none() {
                skip(&format!(
                    "{tool} (apt-get install openssl curl xz-utils python3)"
                ));
                return None;
            }
        }
        let dir = tempfile::Builder::new()
            .prefix("berth-apiserver-")
            .tempdir()
            .expect("tempdir")
            .keep();
        // Started first, so that whatever `up` starts is stopped even if `up` fails half-way.
        // Its own process group: a ^C to the tests must not kill it before it runs `down`.
        let mut reaper = Command::new("sh")
            .args(["-c", r#"read -r _; exec "$0" "$1" --purge"#])
            .arg(k8s.join("down"))
            .arg(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("cannot start the API server's reaper");
        let pipe = reaper.stdin.take().expect("piped stdin");
        let server = ApiServer {
            kubeconfig: dir.join("admin.kubeconfig"),
            dir,
            kubectl,
            reaper: Mutex::new(Some((reaper, pipe))),
        };
        let out = Command::new(k8s.join("up"))
            .arg(&server.dir)
            .output()
            .expect("cannot run ../shared/k8s/up");
        assert!(
            out.status.success() && server.kubeconfig.is_file(),
            "../shared/k8s/up failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // The API server makes kube-node-lease (where the chart grants the controller a
        // Role) by itself, just after it reports ready.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !server
            .kubectl_command()
            .args(["get", "namespace", "kube-node-lease"])
            .output()
            .expect("kubectl")
            .status
            .success()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "no kube-node-lease namespace"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        Some(server)
    }

    /// The admin (system:masters) kubeconfig.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The server's directory (removed when it stops): room for a test's own files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Sends `signal` to the kube-apiserver process: SIGSTOP freezes it (its clients'
    /// requests hang), SIGCONT thaws it.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = std::fs::read_to_string(self.dir.join("pids/kube-apiserver.pid"))
            .expect("the API server's pid file");
        let pid = pid.trim().parse().expect("a pid");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).expect("kill");
    }

    /// kubectl as admin, to run as the caller likes (e.g. when failing is an answer).
    pub fn kubectl_command(&self) -> Command {
        let mut cmd = Command::new(&self.kubectl);
        cmd.arg("--kubeconfig").arg(&self.kubeconfig);
        cmd
    }

    /// berth's CRDs, namespace `ns`, and the chart's objects of `templates` in it: identities
    /// and rights exactly as the chart grants them.
    pub fn install_chart(&self, helm: &Path, ns: &str, templates: &[&str]) {
        let crds =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/berth/crds/berth.csi.dev.yaml");
        self.kubectl(
            &["apply", "-f", "-"],
            &std::fs::read_to_string(crds).expect("the chart's CRDs"),
        );
        self.kubectl(&["create", "namespace", ns], "");
        self.kubectl(&["apply", "-f", "-"], &helm_template(helm, ns, templates));
    }

    /// What a kubelet and the scheduler would have made: the Nodes `nodes`, and each
    /// `(pod, node, service account)` of `pods` running in `ns` on its node.
    pub fn nodes_and_pods(&self, ns: &str, nodes: &[&str], pods: &[(&str, &str, &str)]) {
        let mut docs: Vec<String> = nodes
            .iter()
            .map(|n| format!("apiVersion: v1\nkind: Node\nmetadata: {{name: {n}}}\n"))
            .collect();
        docs.extend(pods.iter().map(|(pod, node, sa)| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: {ns}}}\n\
                 spec: {{nodeName: {node}, serviceAccountName: {sa}, containers: [{{name: berth, image: berth}}]}}\n"
            )
        }));
        self.kubectl(&["create", "-f", "-"], &docs.join("---\n"));
    }

    /// Runs kubectl as admin with `stdin` as its input; its stdout. Panics when it fails.
    pub fn kubectl(&self, args: &[&str], stdin: &str) -> String {
        run(self.kubectl_command().args(args), stdin)
    }

    /// A client with the admin's rights, for the test's own setup and checks.
    pub async fn admin(&self) -> kube::Client {
        let kc = Kubeconfig::read_from(&self.kubeconfig).expect("admin kubeconfig");
        client(kc).await
    }

    /// A client that authenticates with a bearer `token` (a ServiceAccount's, from
    /// `kubectl create token`) and nothing else.
    pub async fn with_token(&self, token: &str) -> kube::Client {
        let kc = Kubeconfig::read_from(&self.kubeconfig).expect("admin kubeconfig");
        let mut v = serde_json::to_value(kc).expect("kubeconfig serializes");
        let user = v["contexts"][0]["context"]["user"].clone();
        v["users"] = serde_json::json!([{ "name": user, "user": { "token": token.trim() } }]);
        client(serde_json::from_value(v).expect("a kubeconfig")).await
    }

    /// A token of ServiceAccount `namespace/name`, valid for an hour.
    pub fn token(&self, namespace: &str, name: &str) -> String {
        self.kubectl(
            &["create", "token", name, "-n", namespace, "--duration=1h"],
            "",
        )
        .trim()
        .to_string()
    }

    /// A token of ServiceAccount `namespace/name` bound to its pod `pod`, as the kubelet
    /// projects it (so carrying the pod's node), valid for an hour.
    pub fn pod_token(&self, namespace: &str, name: &str, pod: &str) -> String {
        self.kubectl(
            &[
                "create",
                "token",
                name,
                "-n",
                namespace,
                "--duration=1h",
                "--bound-object-kind",
                "Pod",
                "--bound-object-name",
                pod,
            ],
            "",
        )
        .trim()
        .to_string()
    }

    /// A kubeconfig file (in [`ApiServer::dir`]) that authenticates as user `name` with a
    /// bearer `token` and nothing else, as a pod's in-cluster configuration would.
    pub fn kubeconfig_with_token(&self, name: &str, token: &str) -> PathBuf {
        let path = self.dir.join(format!("{name}.kubeconfig"));
        std::fs::copy(&self.kubeconfig, &path).expect("copy the admin kubeconfig");
        let kc = |args: &[&str]| {
            run(
                Command::new(&self.kubectl)
                    .arg("--kubeconfig")
                    .arg(&path)
                    .args(args),
                "",
            )
        };
        kc(&[
            "config",
            "set-credentials",
            name,
            &format!("--token={}", token.trim()),
        ]);
        kc(&[
            "config",
            "set-context",
            "--current",
            &format!("--user={name}"),
        ]);
        path
    }
}

async fn client(kc: Kubeconfig) -> kube::Client {
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("a usable kubeconfig");
    kube::Client::try_from(config).expect("a kube client")
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let reaper = self.reaper.get_mut().map(Option::take);
        if let Ok(Some((mut child, pipe))) = reaper {
            drop(pipe);
            let _ = child.wait();
        }
    }
}
