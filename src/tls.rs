//! Mutual TLS for the node agents, and who is who: every connection, in both directions,
//! presents a certificate signed by the cluster CA, and each certificate names one member.
//!
//! Material lives in one directory in the layout of a Kubernetes TLS Secret plus its CA
//! (`ca.crt`, `tls.crt`, `tls.key`), so the chart mounts a Secret as is; or, for a node in
//! Kubernetes, in memory ([`TlsMaterial::from_pem`]) from a certificate request.
//!
//! A member's identity is a DNS name in its certificate's subject alternative names:
//! `controller.berth` for the cluster controller, `<node-id>.node.berth` for a node (in
//! Kubernetes, signed by the controller for the node a plugin's token is bound to, see
//! crate::kube::csr). DNS names rather than URI (SPIFFE) names, because the chart's
//! templates can only issue DNS names (sprig's `genSignedCert`, for the controller's), and
//! one scheme must serve both. Agents are dialled by address (pod IPs change), so a client
//! checks the chain against the CA and the fixed name [`AGENT_SERVER_NAME`] that only node
//! certificates carry, and then that the identity is the node it meant to dial
//! ([`NodeVerifier`]). The server side reads the caller's identity with
//! [`peer_of`] and authorizes each RPC by it (crate::agent::auth).

use std::{
    fs,
    path::{Path, PathBuf},
    sync::Arc,
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, TrustAnchor, UnixTime, pem::PemObject},
};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::{
    error::{Error, Result},
    util::fsutil,
};

/// The DNS name every node (agent server) certificate carries: the name a client checks the
/// chain against before it checks which node answered.
pub const AGENT_SERVER_NAME: &str = "berth-agent";
/// The name `berth certs` gives the controller's certificate, and its directory.
pub const CONTROLLER: &str = "controller";
const CONTROLLER_DNS: &str = "controller.berth";
const NODE_DNS_SUFFIX: &str = ".node.berth";

/// Who a certificate names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    Controller,
    Node(String),
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Controller => f.write_str("the controller"),
            Peer::Node(id) => write!(f, "node {id}"),
        }
    }
}

/// The identity a certificate (DER) names, or None when it names none or more than one.
/// Only meaningful for a certificate whose chain to the cluster CA was verified.
pub fn peer_of(der: &CertificateDer<'_>) -> Option<Peer> {
    let cert = webpki::EndEntityCert::try_from(der).ok()?;
    let mut found = None;
    for name in cert.valid_dns_names() {
        let peer = if name == CONTROLLER_DNS {
            Peer::Controller
        } else if let Some(id) = name.strip_suffix(NODE_DNS_SUFFIX) {
            Peer::Node(id.to_string())
        } else {
            continue;
        };
        // Two identities in one certificate is no identity: refuse rather than pick one.
        if found.replace(peer).is_some() {
            return None;
        }
    }
    found
}

#[derive(Clone)]
pub struct TlsMaterial {
    ca: Certificate,
    identity: Identity,
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for TlsMaterial {
    // The key never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsMaterial { .. }")
    }
}

fn tls_error(what: &Path, e: impl std::fmt::Display) -> Error {
    Error::PoolUnavailable(format!(
        "TLS material {} is unusable ({e}); `berth certs` makes a CA and certificates",
        what.display()
    ))
}

impl TlsMaterial {
    /// Reads `ca.crt`, `tls.crt` and `tls.key` from `dir`.
    pub fn load(dir: &Path) -> Result<TlsMaterial> {
        let read = |name: &str| -> Result<(PathBuf, Vec<u8>)> {
            let p = dir.join(name);
            let bytes = fs::read(&p).map_err(|e| tls_error(&p, e))?;
            Ok((p, bytes))
        };
        let (ca, crt, key) = (read("ca.crt")?, read("tls.crt")?, read("tls.key")?);
        TlsMaterial::from_pem((&ca.0, &ca.1), (&crt.0, &crt.1), (&key.0, &key.1))
    }

    /// The material from PEM held in memory (a certificate issued through a Kubernetes
    /// CertificateSigningRequest); each part comes with the name its errors give it.
    pub fn from_pem(
        (ca_path, ca): (&Path, &[u8]),
        (crt_path, crt): (&Path, &[u8]),
        (key_path, key): (&Path, &[u8]),
    ) -> Result<TlsMaterial> {
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca) {
            let c = c.map_err(|e| tls_error(ca_path, e))?;
            roots.add(c).map_err(|e| tls_error(ca_path, e))?;
        }
        let chain = CertificateDer::pem_slice_iter(crt)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| tls_error(crt_path, e))?;
        if chain.is_empty() {
            return Err(tls_error(crt_path, "no certificate"));
        }
        let private = PrivateKeyDer::from_pem_slice(key).map_err(|e| tls_error(key_path, e))?;
        Ok(TlsMaterial {
            ca: Certificate::from_pem(ca),
            identity: Identity::from_pem(crt, key),
            roots: Arc::new(roots),
            chain,
            key: Arc::new(private),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        })
    }

    /// Who this material's certificate names.
    pub fn me(&self) -> Option<Peer> {
        peer_of(&self.chain[0])
    }

    /// Server side: a client without a certificate from the CA fails the handshake. Which
    /// RPCs it may call is decided per call from the identity it presented.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity.clone())
            .client_ca_root(self.ca.clone())
    }

    /// Client side, dialling the agent of `node`: the server must present a certificate of
    /// the CA that names `node`.
    pub fn client_for_node(&self, node: &str) -> Result<Arc<ClientConfig>> {
        let bad = |e: &dyn std::fmt::Display| Error::invalid("tls", e.to_string());
        let inner =
            WebPkiServerVerifier::builder_with_provider(self.roots.clone(), self.provider.clone())
                .build()
                .map_err(|e| bad(&e))?;
        let verifier = Arc::new(NodeVerifier {
            inner,
            node: node.to_string(),
        });
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(&e))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| bad(&e))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// Signs `message` with this member's key; returns the signature scheme (its TLS code),
    /// the signature and the certificate (DER) that verifies it.
    pub fn sign(&self, message: &[u8]) -> Result<(u16, Vec<u8>, Vec<u8>)> {
        let bad = |e: &dyn std::fmt::Display| Error::invalid("signing key", e.to_string());
        let key = rustls::crypto::ring::sign::any_supported_type(&self.key).map_err(|e| bad(&e))?;
        let signer = key
            .choose_scheme(SIGNATURE_SCHEMES)
            .ok_or_else(|| bad(&"the key signs none of ECDSA P-256, Ed25519, RSA-PSS"))?;
        let signature = signer.sign(message).map_err(|e| bad(&e))?;
        Ok((
            u16::from(signer.scheme()),
            signature,
            self.chain[0].as_ref().to_vec(),
        ))
    }

    /// Checks that `signature` over `message` was made by the key of `certificate` (DER), and
    /// that the certificate is the CA's and valid now; returns whom it names.
    pub fn verify_signed(
        &self,
        certificate: &[u8],
        scheme: u16,
        message: &[u8],
        signature: &[u8],
    ) -> std::result::Result<Peer, String> {
        let der = CertificateDer::from(certificate);
        let cert = webpki::EndEntityCert::try_from(&der).map_err(|e| e.to_string())?;
        let anchors: Vec<TrustAnchor<'_>> = self.roots.roots.clone();
        cert.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &[],
            UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| format!("the signer's certificate is not the cluster CA's: {e}"))?;
        let alg: &dyn rustls::pki_types::SignatureVerificationAlgorithm =
            match SignatureScheme::from(scheme) {
                SignatureScheme::ECDSA_NISTP256_SHA256 => webpki::ring::ECDSA_P256_SHA256,
                SignatureScheme::ED25519 => webpki::ring::ED25519,
                SignatureScheme::RSA_PSS_SHA256 => {
                    webpki::ring::RSA_PSS_2048_8192_SHA256_LEGACY_KEY
                }
                other => return Err(format!("signature scheme {other:?} is not accepted")),
            };
        cert.verify_signature(alg, message, signature)
            .map_err(|e| format!("bad signature: {e}"))?;
        peer_of(&der).ok_or_else(|| "the signer's certificate names no member".to_string())
    }
}

const SIGNATURE_SCHEMES: &[SignatureScheme] = &[
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ED25519,
    SignatureScheme::RSA_PSS_SHA256,
];

/// The CA's chain and [`AGENT_SERVER_NAME`] (webpki's own checks), then the identity: a
/// node answering at an address the controller or a peer took for another node's is
/// refused, so a misdirected dial cannot hand a snapshot, a fence or a promotion to the
/// wrong node.
#[derive(Debug)]
struct NodeVerifier {
    inner: Arc<WebPkiServerVerifier>,
    node: String,
}

impl ServerCertVerifier for NodeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _address: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let name = ServerName::try_from(AGENT_SERVER_NAME).expect("a valid DNS name");
        self.inner
            .verify_server_cert(end_entity, intermediates, &name, ocsp_response, now)?;
        match peer_of(end_entity) {
            Some(Peer::Node(id)) if id == self.node => Ok(ServerCertVerified::assertion()),
            other => Err(rustls::Error::General(format!(
                "expected node {}'s agent, found {}",
                self.node,
                other.map_or_else(
                    || "a certificate naming no member".into(),
                    |p| p.to_string()
                )
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn ca_params() -> Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(cert_error)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "berth cluster CA");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(p)
}

fn cert_error(e: rcgen::Error) -> Error {
    Error::invalid("certificate", e.to_string())
}

/// A node id goes into a DNS name, so it must be one: lowercase letters, digits, `-` and
/// `.`, as Kubernetes node names are.
fn node_dns_name(id: &str) -> Result<String> {
    let name = format!("{id}{NODE_DNS_SUFFIX}");
    let ok = name.len() <= 253
        && id.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        });
    if !ok {
        return Err(Error::invalid(
            "name",
            format!(
                "{id:?} cannot be a node id in a certificate: use lowercase letters, digits, '-' and '.' (a DNS name, as Kubernetes node names are)"
            ),
        ));
    }
    Ok(name)
}

/// A node's certificate: its identity and [`AGENT_SERVER_NAME`], for serving and dialling
/// peers.
fn node_params(node: &str) -> Result<CertificateParams> {
    let mut p = CertificateParams::new(vec![AGENT_SERVER_NAME.to_string(), node_dns_name(node)?])
        .map_err(cert_error)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, node);
    p.distinguished_name = dn;
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    Ok(p)
}

/// How long a certificate the controller signs for a node is valid. A node asks for one at
/// every start and does not renew it while it runs, so this bounds how long a node plugin
/// may run without a restart; a year is well past any node's upgrade cycle.
pub const NODE_CERT_LIFETIME: std::time::Duration = std::time::Duration::from_secs(365 * 24 * 3600);

/// A node's new key and a PKCS#10 request (PEM) for its certificate. The signer decides the
/// names; the request asks for the ones it will give, for the reader's sake.
pub fn node_request(node: &str) -> Result<(KeyPair, String)> {
    let key = KeyPair::generate().map_err(cert_error)?;
    let csr = node_params(node)?
        .serialize_request(&key)
        .map_err(cert_error)?;
    Ok((key, csr.pem().map_err(cert_error)?))
}

/// The cluster CA as an issuer: what the controller signs node certificates with.
pub struct NodeIssuer {
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
}

impl std::fmt::Debug for NodeIssuer {
    // The CA key never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeIssuer { .. }")
    }
}

impl NodeIssuer {
    /// Reads `ca.crt` and `ca.key` from `dir` (the controller's CA Secret).
    pub fn load(dir: &Path) -> Result<NodeIssuer> {
        let read = |name: &str| -> Result<String> {
            let p = dir.join(name);
            fs::read_to_string(&p).map_err(|e| tls_error(&p, e))
        };
        let (ca_pem, key_pem) = (read("ca.crt")?, read("ca.key")?);
        let key = KeyPair::from_pem(&key_pem).map_err(|e| tls_error(&dir.join("ca.key"), e))?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, key)
            .map_err(|e| tls_error(&dir.join("ca.crt"), e))?;
        Ok(NodeIssuer { issuer, ca_pem })
    }

    /// The CA certificate (PEM).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A certificate (PEM) for `node` on the public key of the PKCS#10 request `csr_pem`,
    /// valid [`NODE_CERT_LIFETIME`] from now. Only the key is taken from the request (its
    /// signature proves the requester holds it): the names, usages and lifetime are the
    /// signer's, so a node that asks for another node's name, or the controller's, gets
    /// its own.
    pub fn sign_node(&self, csr_pem: &str, node: &str) -> Result<String> {
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| Error::invalid("certificate request", e.to_string()))?;
        let mut p = node_params(node)?;
        let now = time::OffsetDateTime::now_utc();
        // A minute back for clocks a little behind the controller's.
        p.not_before = now - time::Duration::minutes(1);
        p.not_after = now + NODE_CERT_LIFETIME;
        let cert = p
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(cert_error)?;
        Ok(cert.pem())
    }
}

/// `berth certs`: a CA in `out` (kept and reused when it already exists, so nodes can be
/// added later) and, for each name, `out/<name>/{ca.crt,tls.crt,tls.key}` usable as a
/// `--tls-dir`. The name [`CONTROLLER`] makes the controller's certificate; every other
/// name is a node id. Returns the directories written.
pub fn generate(out: &Path, names: &[String]) -> Result<Vec<PathBuf>> {
    fs::create_dir_all(out).map_err(Error::io("create", out))?;
    let ca_key_path = out.join("ca.key");
    let ca_key = match fs::read_to_string(&ca_key_path) {
        Ok(pem) => KeyPair::from_pem(&pem).map_err(cert_error)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = KeyPair::generate().map_err(cert_error)?;
            let cert = ca_params()?.self_signed(&key).map_err(cert_error)?;
            write_secret(&ca_key_path, key.serialize_pem().as_bytes())?;
            fsutil::write_atomic(&out.join("ca.crt"), cert.pem().as_bytes())?;
            key
        }
        Err(e) => return Err(Error::io("read", &ca_key_path)(e)),
    };
    let ca_pem = fs::read(out.join("ca.crt")).map_err(Error::io("read", out.join("ca.crt")))?;
    let issuer = Issuer::new(ca_params()?, ca_key);
    let mut dirs = Vec::new();
    for name in names {
        // The controller only dials, so its certificate is for client auth alone: it can
        // never pose as an agent. A node serves and dials peers.
        let p = if name == CONTROLLER {
            let mut p =
                CertificateParams::new(vec![CONTROLLER_DNS.to_string()]).map_err(cert_error)?;
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, name.as_str());
            p.distinguished_name = dn;
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            p
        } else {
            node_params(name)?
        };
        let key = KeyPair::generate().map_err(cert_error)?;
        let cert = p.signed_by(&key, &issuer).map_err(cert_error)?;
        let dir = out.join(name);
        fs::create_dir_all(&dir).map_err(Error::io("create", &dir))?;
        fsutil::write_atomic(&dir.join("ca.crt"), &ca_pem)?;
        fsutil::write_atomic(&dir.join("tls.crt"), cert.pem().as_bytes())?;
        write_secret(&dir.join("tls.key"), key.serialize_pem().as_bytes())?;
        dirs.push(dir);
    }
    Ok(dirs)
}

/// Private keys are written 0600 from the start, never readable by others even briefly.
fn write_secret(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(Error::io("create", &tmp))?;
    f.write_all(bytes).map_err(Error::io("write", &tmp))?;
    f.sync_all().map_err(Error::io("fsync", &tmp))?;
    fsutil::rename_durable(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_must_be_dns_names() {
        for (id, ok) in [
            ("node-a", true),
            ("ip-10-0-0-1.ec2.internal", true),
            ("Node-A", false),
            ("a_b", false),
            ("-a", false),
            ("a..b", false),
            ("", false),
        ] {
            assert_eq!(node_dns_name(id).is_ok(), ok, "{id:?}");
        }
    }

    #[test]
    fn certificates_name_their_member() {
        let dir = tempfile::tempdir().unwrap();
        let names = ["controller", "node-a", "n.example"].map(String::from);
        generate(dir.path(), &names).unwrap();
        let me = |n: &str| TlsMaterial::load(&dir.path().join(n)).unwrap().me();
        assert_eq!(me("controller"), Some(Peer::Controller));
        assert_eq!(me("node-a"), Some(Peer::Node("node-a".into())));
        assert_eq!(me("n.example"), Some(Peer::Node("n.example".into())));
    }

    #[test]
    fn the_old_shared_node_name_names_no_one() {
        // node.berth was every chart node's name before each node had its own: a leftover
        // certificate carrying it is no node's.
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![AGENT_SERVER_NAME.into(), "node.berth".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(peer_of(cert.der()), None);
    }
}
