//! A throwaway CA and a server certificate it signed, for PostgreSQL and Kafka listeners.

use std::fs;
use std::path::PathBuf;

use tempfile::TempDir;

/// A throwaway CA and a server certificate it signed, as PEM text and files.
pub struct TestPki {
    dir: TempDir,
    /// The CA certificate (PEM), for `sslrootcert` / `ssl.ca.location`.
    pub ca_pem: String,
    /// The server certificate (PEM).
    pub cert_pem: String,
    /// The server's private key (PEM).
    pub key_pem: String,
}

impl TestPki {
    /// A CA (ECDSA P-256) and a server certificate for `names` (DNS names and IP addresses).
    pub fn new(names: &[&str]) -> TestPki {
        TestPki::with_ca_algorithm(names, &rcgen::PKCS_ECDSA_P256_SHA256)
    }

    /// Like [`TestPki::new`] with a CA key of `algorithm`, which also decides how the server
    /// certificate is signed (and so the hash SCRAM channel binding uses).
    pub fn with_ca_algorithm(
        names: &[&str],
        algorithm: &'static rcgen::SignatureAlgorithm,
    ) -> TestPki {
        let dir = tempfile::Builder::new()
            .prefix("outbox-relay-pki-")
            .tempdir()
            .expect("create temp dir for certificates");
        let ca_key = rcgen::KeyPair::generate_for(algorithm).expect("generate CA key");
        let mut ca_params =
            rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "outbox-relay test CA");
        let ca_cert = ca_params.self_signed(&ca_key).expect("self-sign CA");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().expect("generate server key");
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = rcgen::CertificateParams::new(names).expect("server parameters");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "outbox-relay test server");
        let cert = params.signed_by(&key, &issuer).expect("sign server cert");
        let pki = TestPki {
            dir,
            ca_pem: ca_cert.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        fs::write(pki.ca_path(), &pki.ca_pem).expect("write ca.pem");
        pki
    }

    /// The CA certificate's file.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }
}
