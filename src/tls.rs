//! Mutual TLS for the node agents: every connection, in both directions, presents a
//! certificate signed by the cluster CA, and nothing else is accepted.
//!
//! Material lives in one directory in the layout of a Kubernetes TLS Secret plus its CA
//! (`ca.crt`, `tls.crt`, `tls.key`), so the chart mounts a Secret as is. Agents are dialled
//! by address (pod IPs change), so a client checks the peer's certificate against the CA and
//! one fixed name, [`AGENT_SERVER_NAME`], rather than against the address.

use std::{
    fs,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::{
    error::{Error, Result},
    util::fsutil,
};

/// The DNS name every agent certificate carries and every client expects.
pub const AGENT_SERVER_NAME: &str = "berth-agent";

#[derive(Clone)]
pub struct TlsMaterial {
    ca: Certificate,
    identity: Identity,
}

impl std::fmt::Debug for TlsMaterial {
    // The key never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsMaterial { .. }")
    }
}

impl TlsMaterial {
    /// Reads `ca.crt`, `tls.crt` and `tls.key` from `dir`.
    pub fn load(dir: &Path) -> Result<TlsMaterial> {
        let read = |name: &str| -> Result<Vec<u8>> {
            let p = dir.join(name);
            fs::read(&p).map_err(|e| {
                Error::PoolUnavailable(format!(
                    "TLS material {} is unreadable ({e}); `berth certs` makes a CA and certificates",
                    p.display()
                ))
            })
        };
        Ok(TlsMaterial {
            ca: Certificate::from_pem(read("ca.crt")?),
            identity: Identity::from_pem(read("tls.crt")?, read("tls.key")?),
        })
    }

    /// Server side: a client without a certificate from the CA fails the handshake.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity.clone())
            .client_ca_root(self.ca.clone())
    }

    pub fn client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .identity(self.identity.clone())
            .domain_name(AGENT_SERVER_NAME)
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

/// `berth certs`: a CA in `out` (kept and reused when it already exists, so nodes can be
/// added later) and, for each name, `out/<name>/{ca.crt,tls.crt,tls.key}` usable as an
/// agent's or the controller's `--tls-dir`. Returns the directories written.
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
        if name.is_empty() || name.contains(['/', '\0']) || name.starts_with('.') {
            return Err(Error::invalid(
                "name",
                format!("{name:?} cannot name a directory"),
            ));
        }
        let mut p = CertificateParams::new(vec![AGENT_SERVER_NAME.to_string(), name.clone()])
            .map_err(cert_error)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name.as_str());
        p.distinguished_name = dn;
        // Agents serve and dial peers; the controller only dials. One certificate per
        // member carries both purposes.
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
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
