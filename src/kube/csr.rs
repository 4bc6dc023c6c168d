//! A certificate per node in Kubernetes, through the CertificateSigningRequest API: the node
//! plugin asks with its own ServiceAccount token ([`request_node_certificate`]), the
//! controller, which alone holds the CA key, approves and signs ([`sign_node_requests`]).
//!
//! Whom a certificate names is decided from what the API server recorded about the
//! requester, never from the request: the username must be the node plugin's
//! ServiceAccount, and the node is the `authentication.kubernetes.io/node-name` extra that a
//! pod's projected token carries (the node the kubelet runs the pod on). The request
//! contributes only its public key ([`crate::tls::NodeIssuer::sign_node`]).
//!
//! Tested against a real kube-apiserver in tests/csr.rs, rather than through [`ClusterApi`]
//! (super::ClusterApi) and a mock, because what matters here is what the API server records
//! and lets each ServiceAccount do.

use std::{path::Path, time::Duration};

use k8s_openapi::{
    ByteString,
    api::certificates::v1::{
        CertificateSigningRequest, CertificateSigningRequestCondition,
        CertificateSigningRequestSpec, CertificateSigningRequestStatus,
    },
};
use kube::{
    Api, Client,
    api::{ListParams, ObjectMeta, PostParams},
};
use tokio::sync::watch;

use super::client::api_error;
use crate::{
    error::{Error, Result},
    tls::{NodeIssuer, TlsMaterial},
};

/// The signerName of berth's node certificates: the controller signs these and no others,
/// and RBAC lets it approve and sign these and no others.
pub const SIGNER_NAME: &str = "berth.csi.dev/agent";
/// The extra a pod-bound ServiceAccount token carries: the node its pod runs on.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

/// What the signer does with one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Issue a certificate for this node.
    Sign { node: String },
    /// Refuse, saying why (the Denied condition's message).
    Deny { reason: String },
}

/// Whether the request `spec` may have a node certificate, and for which node: only the
/// node plugin's ServiceAccount (`node_username`, `system:serviceaccount:<ns>:<name>`) with
/// a token bound to exactly one node.
pub fn decide(spec: &CertificateSigningRequestSpec, node_username: &str) -> Decision {
    let deny = |reason: String| Decision::Deny { reason };
    let user = spec.username.as_deref().unwrap_or("");
    if user != node_username {
        return deny(format!(
            "{user:?} is not the node plugin's ServiceAccount {node_username:?}"
        ));
    }
    let nodes = spec
        .extra
        .as_ref()
        .and_then(|e| e.get(NODE_NAME_EXTRA))
        .map(Vec::as_slice)
        .unwrap_or_default();
    match nodes {
        [node] if !node.is_empty() => Decision::Sign { node: node.clone() },
        [] => deny(format!(
            "the requester's token is bound to no node (no {NODE_NAME_EXTRA}): only a node plugin pod's own token may ask"
        )),
        _ => deny(format!("{NODE_NAME_EXTRA} is not one node: {nodes:?}")),
    }
}

fn condition(csr: &CertificateSigningRequest, type_: &str) -> bool {
    csr.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == type_ && c.status == "True"))
}

fn issued(csr: &CertificateSigningRequest) -> Option<&ByteString> {
    csr.status
        .as_ref()?
        .certificate
        .as_ref()
        .filter(|c| !c.0.is_empty())
}

/// Node side: a new key, a request for it under [`SIGNER_NAME`] with this pod's token, and
/// the certificate once the controller signed it, as the agent's TLS material with the CA
/// certificate `ca_path`. Waits as long as it takes (the controller may start after the
/// node), polling every `poll`; a request the controller denied is an error.
///
/// The key never leaves memory: a restarted node asks again. The API server deletes issued
/// and denied requests after an hour, pending ones after a day.
pub async fn request_node_certificate(
    client: Client,
    node: &str,
    ca_path: &Path,
    poll: Duration,
) -> Result<TlsMaterial> {
    let ca = std::fs::read(ca_path).map_err(Error::io("read", ca_path))?;
    let (key, request) = crate::tls::node_request(node)?;
    let api: Api<CertificateSigningRequest> = Api::all(client);
    let csr = CertificateSigningRequest {
        metadata: ObjectMeta {
            generate_name: Some(format!("berth-{node}-")),
            ..Default::default()
        },
        spec: CertificateSigningRequestSpec {
            request: ByteString(request.into_bytes()),
            signer_name: SIGNER_NAME.to_string(),
            usages: Some(vec!["client auth".into(), "server auth".into()]),
            expiration_seconds: Some(crate::tls::NODE_CERT_LIFETIME.as_secs() as i32),
            ..Default::default()
        },
        status: None,
    };
    let created = api
        .create(&PostParams::default(), &csr)
        .await
        .map_err(api_error("create CertificateSigningRequest"))?;
    let name = created.metadata.name.unwrap_or_default();
    tracing::info!(csr = %name, signer = SIGNER_NAME, "asked for this node's agent certificate");
    let started = std::time::Instant::now();
    let mut warn_at = Duration::from_secs(60);
    let cert = loop {
        let csr = api.get(&name).await.map_err(api_error(format_args!(
            "get CertificateSigningRequest {name}"
        )))?;
        if let Some(cert) = issued(&csr) {
            break cert.0.clone();
        }
        if condition(&csr, "Denied") || condition(&csr, "Failed") {
            let why = csr
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .into_iter()
                .filter_map(|c| c.message)
                .collect::<Vec<_>>()
                .join("; ");
            return Err(Error::PoolUnavailable(format!(
                "the agent certificate request {name} was refused: {why}"
            )));
        }
        if started.elapsed() >= warn_at {
            tracing::warn!(csr = %name, waited_s = started.elapsed().as_secs(), "the controller has not signed this node's certificate yet");
            warn_at += Duration::from_secs(60);
        }
        tokio::time::sleep(poll).await;
    };
    let label = Path::new("the certificate of CertificateSigningRequest");
    TlsMaterial::from_pem(
        (ca_path, &ca),
        (&label.join(&name), &cert),
        (label, key.serialize_pem().as_bytes()),
    )
}

/// Controller side, one pass: approves and signs every pending request of [`SIGNER_NAME`]
/// that [`decide`] allows, denies the others. Every replica may run it: a request another
/// replica handled in between fails on its resourceVersion and is skipped. Returns how
/// many it signed.
pub async fn sign_node_requests(
    client: Client,
    issuer: &NodeIssuer,
    node_username: &str,
) -> Result<usize> {
    let api: Api<CertificateSigningRequest> = Api::all(client);
    let list = api
        .list(&ListParams::default().fields(&format!("spec.signerName={SIGNER_NAME}")))
        .await
        .map_err(api_error("list CertificateSigningRequests"))?;
    let mut signed = 0;
    for csr in list.items {
        if issued(&csr).is_some() || condition(&csr, "Denied") || condition(&csr, "Failed") {
            continue;
        }
        let name = csr.metadata.name.clone().unwrap_or_default();
        match handle(&api, csr, issuer, node_username).await {
            Ok(true) => signed += 1,
            Ok(false) => {}
            // Another replica got there first: its answer stands.
            Err(e) if e.code() == tonic::Code::Aborted => {}
            Err(e) => tracing::warn!(csr = %name, error = %e, "certificate request not handled"),
        }
    }
    Ok(signed)
}

async fn handle(
    api: &Api<CertificateSigningRequest>,
    mut csr: CertificateSigningRequest,
    issuer: &NodeIssuer,
    node_username: &str,
) -> Result<bool> {
    let name = csr.metadata.name.clone().unwrap_or_default();
    let (node, cert) = match decide(&csr.spec, node_username) {
        Decision::Sign { node } => {
            let request = String::from_utf8_lossy(&csr.spec.request.0).into_owned();
            match issuer.sign_node(&request, &node) {
                Ok(cert) => (node, cert),
                Err(e) => {
                    deny(api, csr, "BadRequest", &e.to_string()).await?;
                    return Ok(false);
                }
            }
        }
        Decision::Deny { reason } => {
            tracing::warn!(csr = %name, %reason, "certificate request denied");
            deny(api, csr, "NotANodePlugin", &reason).await?;
            return Ok(false);
        }
    };
    if !condition(&csr, "Approved") {
        push_condition(
            &mut csr,
            "Approved",
            "NodePlugin",
            &format!("the node plugin on node {node}"),
        );
        csr = replace_approval(api, &name, &csr).await?;
    }
    csr.status.get_or_insert_with(Default::default).certificate =
        Some(ByteString(cert.into_bytes()));
    api.replace_status(&name, &PostParams::default(), &csr)
        .await
        .map_err(api_error(format_args!(
            "sign CertificateSigningRequest {name}"
        )))?;
    tracing::info!(csr = %name, %node, "signed a node's agent certificate");
    Ok(true)
}

fn push_condition(csr: &mut CertificateSigningRequest, type_: &str, reason: &str, msg: &str) {
    let status = csr
        .status
        .get_or_insert_with(CertificateSigningRequestStatus::default);
    status
        .conditions
        .get_or_insert_with(Vec::new)
        .push(CertificateSigningRequestCondition {
            type_: type_.to_string(),
            status: "True".to_string(),
            reason: Some(reason.to_string()),
            message: Some(msg.to_string()),
            ..Default::default()
        });
}

async fn deny(
    api: &Api<CertificateSigningRequest>,
    mut csr: CertificateSigningRequest,
    reason: &str,
    msg: &str,
) -> Result<()> {
    let name = csr.metadata.name.clone().unwrap_or_default();
    push_condition(&mut csr, "Denied", reason, msg);
    replace_approval(api, &name, &csr).await.map(drop)
}

/// PUT on the approval subresource (the `update` verb the chart grants), guarded by the
/// resourceVersion read.
async fn replace_approval(
    api: &Api<CertificateSigningRequest>,
    name: &str,
    csr: &CertificateSigningRequest,
) -> Result<CertificateSigningRequest> {
    api.replace_subresource("approval", name, &PostParams::default(), csr)
        .await
        .map_err(api_error(format_args!(
            "approve or deny CertificateSigningRequest {name}"
        )))
}

/// The controller's signing loop: a pass every `every` until shutdown. A failed pass is
/// logged and retried at the next.
pub async fn signer(
    client: Client,
    issuer: NodeIssuer,
    node_username: String,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        if let Err(e) = sign_node_requests(client.clone(), &issuer, &node_username).await {
            tracing::warn!(error = %e, "signing node certificate requests");
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// The username the API server records for a ServiceAccount's token.
pub fn service_account_username(namespace: &str, name: &str) -> String {
    format!("system:serviceaccount:{namespace}:{name}")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn spec(user: &str, nodes: Option<&[&str]>) -> CertificateSigningRequestSpec {
        CertificateSigningRequestSpec {
            username: Some(user.into()),
            extra: nodes.map(|n| {
                BTreeMap::from([(
                    NODE_NAME_EXTRA.to_string(),
                    n.iter().map(|s| s.to_string()).collect(),
                )])
            }),
            signer_name: SIGNER_NAME.into(),
            ..Default::default()
        }
    }

    #[test]
    fn only_the_node_plugin_bound_to_one_node_gets_a_certificate() {
        let sa = service_account_username("berth-system", "berth-node");
        assert_eq!(sa, "system:serviceaccount:berth-system:berth-node");
        assert_eq!(
            decide(&spec(&sa, Some(&["node-a"])), &sa),
            Decision::Sign {
                node: "node-a".into()
            }
        );
        for (user, nodes) in [
            // Another ServiceAccount, even bound to a node.
            (
                "system:serviceaccount:berth-system:berth-controller",
                Some(&["node-a"][..]),
            ),
            ("system:serviceaccount:other:berth-node", Some(&["node-a"])),
            // A kubelet or an admin.
            ("system:node:node-a", Some(&["node-a"])),
            // The right ServiceAccount, but a token bound to no node, or to several.
            (sa.as_str(), None),
            (sa.as_str(), Some(&[])),
            (sa.as_str(), Some(&[""])),
            (sa.as_str(), Some(&["node-a", "node-b"])),
        ] {
            assert!(
                matches!(decide(&spec(user, nodes), &sa), Decision::Deny { .. }),
                "{user} {nodes:?}"
            );
        }
    }

    #[test]
    fn the_signer_names_the_node_it_decided_not_the_one_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        crate::tls::generate(dir.path(), &[]).unwrap();
        let issuer = NodeIssuer::load(dir.path()).unwrap();
        let (key, request) = crate::tls::node_request("node-b").unwrap();
        let cert = issuer.sign_node(&request, "node-a").unwrap();
        let tls = TlsMaterial::from_pem(
            (Path::new("ca"), issuer.ca_pem().as_bytes()),
            (Path::new("crt"), cert.as_bytes()),
            (Path::new("key"), key.serialize_pem().as_bytes()),
        )
        .unwrap();
        assert_eq!(tls.me(), Some(crate::tls::Peer::Node("node-a".into())));
        assert!(issuer.sign_node("not a request", "node-a").is_err());
    }
}
