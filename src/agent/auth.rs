//! Who may call what on a node's agent port, decided per call from the certificate the
//! caller presented (crate::tls::peer_of).
//!
//! - The controller commands: everything on the port (inventory, snapshots for shipping,
//!   fetch, fence, unfence, promote, settle, forget, and the node's CSI Controller,
//!   GroupController and SnapshotMetadata services).
//! - A node may only pull: `Send`, and only what a grant from the controller names, with the
//!   caller as receiver and this node as source ([`check_grant`]). A node that is broken
//!   into can thus read what the controller asked it to receive anyway, and nothing else,
//!   and can neither command nor delete anything on another node.
//!
//! Anything not listed (a method added later) is the controller's alone.

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use prost::Message;
use tonic::{
    Status,
    codegen::http,
    transport::server::{TcpConnectInfo, TlsConnectInfo},
};
use tower::Service;

use crate::{
    error::{Error, Result},
    proto::agent::v1 as pb,
    tls::{Peer, TlsMaterial, peer_of},
};

/// The one method a node may call on a peer.
const SEND: &str = "/berth.agent.v1.Agent/Send";

/// How long a grant lets its receiver start (or resume) the transfer. Generous, for
/// clocks that differ between nodes: a grant is bound to its receiver, so a longer life
/// lets no one else use it.
pub const GRANT_LIFETIME: Duration = Duration::from_secs(3600);

/// Whether `peer` may call `path` at all (the grant of a Send is checked in the handler).
pub fn authorize(path: &str, peer: Option<&Peer>) -> std::result::Result<(), Status> {
    match (peer, path) {
        (Some(Peer::Controller), _) => Ok(()),
        (Some(Peer::Node(_)), SEND) => Ok(()),
        (Some(p), _) => Err(Status::permission_denied(format!(
            "{p} may not call {path}: only the controller commands a node"
        ))),
        (None, _) => Err(Status::permission_denied(
            "the client certificate names no cluster member",
        )),
    }
}

/// The identity of the TLS peer of a request, as the server saw it in the handshake.
fn peer_of_request<B>(req: &http::Request<B>) -> Option<Peer> {
    let certs = req
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()?
        .peer_certs()?;
    peer_of(certs.first()?)
}

/// The tower layer in front of every service on the agent port: refuses a call its caller
/// may not make, and hands the caller's [`Peer`] to the handler in the request extensions.
#[derive(Debug, Clone)]
pub struct Authorize<S> {
    inner: S,
}

impl<S> Authorize<S> {
    pub fn layer() -> impl tower::Layer<S, Service = Authorize<S>> + Clone {
        tower::layer::layer_fn(|inner| Authorize { inner })
    }
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B, R> Service<http::Request<B>> for Authorize<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Default + Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<std::result::Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let peer = peer_of_request(&req);
        match authorize(req.uri().path(), peer.as_ref()) {
            Ok(()) => {
                req.extensions_mut()
                    .insert(peer.expect("authorized callers are members"));
                Box::pin(self.inner.call(req))
            }
            Err(status) => {
                tracing::warn!(path = req.uri().path(), error = %status.message(), "agent call refused");
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The controller's side: a grant for `receiver` to pull `body`'s snapshot from its source.
pub fn grant(tls: &TlsMaterial, mut body: pb::GrantBody) -> Result<pb::Grant> {
    body.expires_unix_seconds = unix_now() + GRANT_LIFETIME.as_secs() as i64;
    let body = body.encode_to_vec();
    let (scheme, signature, signer_certificate) = tls.sign(&body)?;
    Ok(pb::Grant {
        body,
        signer_certificate,
        scheme: scheme.into(),
        signature,
    })
}

fn denied(reason: impl Into<String>) -> Error {
    Error::PermissionDenied(reason.into())
}

/// The sender's side of a Send from `caller`: the request must carry a grant the
/// controller signed, unexpired, naming this node (`me`) as source, the caller as
/// receiver, and exactly the snapshot, kind and base asked for.
pub fn check_grant(
    tls: &TlsMaterial,
    me: &str,
    caller: &Peer,
    req: &pb::SendRequest,
) -> Result<()> {
    let g = req
        .grant
        .as_ref()
        .ok_or_else(|| denied("a Send needs the controller's grant"))?;
    let scheme = u16::try_from(g.scheme).map_err(|_| denied("unknown signature scheme"))?;
    match tls.verify_signed(&g.signer_certificate, scheme, &g.body, &g.signature) {
        Ok(Peer::Controller) => {}
        Ok(other) => return Err(denied(format!("the grant is signed by {other}"))),
        Err(e) => return Err(denied(format!("the grant does not verify: {e}"))),
    }
    let b = pb::GrantBody::decode(g.body.as_slice())
        .map_err(|e| denied(format!("the grant is malformed: {e}")))?;
    let receiver_ok = match caller {
        Peer::Node(id) => *id == b.receiver_node_id,
        Peer::Controller => false,
    };
    if !receiver_ok {
        return Err(denied(format!(
            "the grant is for node {}, not {caller}",
            b.receiver_node_id
        )));
    }
    if b.source_node_id != me {
        return Err(denied(format!(
            "the grant is for a pull from node {}, not from this node",
            b.source_node_id
        )));
    }
    if (b.snapshot_id.as_str(), b.kind, b.base_snapshot_id.as_str())
        != (
            req.snapshot_id.as_str(),
            req.kind,
            req.base_snapshot_id.as_str(),
        )
    {
        return Err(denied(format!(
            "the grant is for snapshot {} (base {:?}), not {} (base {:?})",
            b.snapshot_id, b.base_snapshot_id, req.snapshot_id, req.base_snapshot_id
        )));
    }
    if b.expires_unix_seconds < unix_now() {
        return Err(denied(
            "the grant has expired; the controller's retry brings a new one",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_controller_commands() {
        let node = Peer::Node("node-a".into());
        for (path, peer, allowed) in [
            (
                "/berth.agent.v1.Agent/Promote",
                Some(&Peer::Controller),
                true,
            ),
            ("/berth.agent.v1.Agent/Send", Some(&node), true),
            ("/berth.agent.v1.Agent/Promote", Some(&node), false),
            ("/berth.agent.v1.Agent/Inventory", Some(&node), false),
            ("/csi.v1.Controller/DeleteVolume", Some(&node), false),
            (
                "/csi.v1.GroupController/CreateVolumeGroupSnapshot",
                Some(&node),
                false,
            ),
            (
                "/csi.v1.SnapshotMetadata/GetMetadataDelta",
                Some(&node),
                false,
            ),
            ("/berth.agent.v1.Agent/Send", None, false),
        ] {
            assert_eq!(authorize(path, peer).is_ok(), allowed, "{path} by {peer:?}");
        }
    }
}
