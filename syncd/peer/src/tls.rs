//! Identities and QUIC configuration of `podfs-peer/1`.
//!
//! Every daemon generates a self-signed certificate when it starts; its peer id is the BLAKE3
//! hash of that certificate. Both ends present one (mutual TLS 1.3, ring provider, no 0-RTT):
//! - a client accepts a server only if the certificate hashes to the id the gateway's plan
//!   named for that address, and the handshake proves the server holds its key;
//! - a server accepts any client certificate whose key signs the handshake, and serves only
//!   requests whose gateway-signed capability names that certificate's id.
//!
//! The gateway vouches for ids (in plans and capabilities) instead of running a CA, as iroh
//! does with node ids: there is no CA key to share between gateway replicas or rotate, and an
//! id is as strong as the handshake signature that proves it.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use podfs_protocol::peer::{ALPN, PeerId};
use rustls::DigitallySignedStruct;
use rustls::SignatureScheme;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};

/// The name a client asks for in its handshake (identity is the certificate's hash, not a name).
pub const SERVER_NAME: &str = "podfs-peer";

/// Receive windows sized for a zone's bandwidth-delay product (10 Gbit/s x 5 ms is 6 MiB),
/// not quinn's WAN defaults.
const STREAM_WINDOW: u32 = 8 << 20;
const CONNECTION_WINDOW: u32 = 32 << 20;
/// Streams one requester may have open on one server at once.
pub const STREAMS_PER_REQUESTER: u32 = 8;

/// This daemon's certificate, key and id.
pub struct Identity {
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
    id: PeerId,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").field("id", &self.id).finish_non_exhaustive()
    }
}

impl Identity {
    /// A fresh ECDSA P-256 key and a self-signed certificate for it.
    pub fn generate() -> anyhow::Result<Self> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).context("cannot generate a key")?;
        let params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])?;
        let cert = params.self_signed(&key).context("cannot sign a certificate")?;
        let cert = CertificateDer::from(cert.der().to_vec());
        let id = PeerId::of_certificate(&cert);
        Ok(Self { cert, key: PrivatePkcs8KeyDer::from(key.serialize_der()), id })
    }

    pub fn id(&self) -> PeerId {
        self.id
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }

    /// What a server endpoint accepts with.
    pub fn server_config(&self) -> anyhow::Result<quinn::ServerConfig> {
        let provider = provider();
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(AnyClient(provider.signature_verification_algorithms)))
            .with_single_cert(vec![self.cert.clone()], self.key())?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        tls.max_early_data_size = 0;
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let mut transport = transport();
        transport.max_concurrent_bidi_streams(STREAMS_PER_REQUESTER.into());
        transport.max_concurrent_uni_streams(0u8.into());
        config.transport_config(Arc::new(transport));
        Ok(config)
    }

    /// What connecting to the peer `expected` takes: its certificate must hash to that id.
    pub fn client_config(&self, expected: PeerId) -> anyhow::Result<quinn::ClientConfig> {
        let provider = provider();
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned {
                expected,
                algorithms: provider.signature_verification_algorithms,
            }))
            .with_client_auth_cert(vec![self.cert.clone()], self.key())?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        tls.enable_early_data = false;
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(Arc::new(transport()));
        Ok(config)
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window(STREAM_WINDOW.into());
    t.receive_window(CONNECTION_WINDOW.into());
    t.send_window(CONNECTION_WINDOW.into());
    t.keep_alive_interval(Some(Duration::from_secs(2)));
    if let Ok(idle) = Duration::from_secs(10).try_into() {
        t.max_idle_timeout(Some(idle));
    }
    t
}

/// The peer id of the other end of a connection (its first certificate's hash).
pub fn remote_id(conn: &quinn::Connection) -> Option<PeerId> {
    let certs = conn.peer_identity()?.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    certs.first().map(|c| PeerId::of_certificate(c))
}

/// A client: the server must present the certificate the plan named.
#[derive(Debug)]
struct Pinned {
    expected: PeerId,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if PeerId::of_certificate(end_entity) == self.expected {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!("the peer is not {}", self.expected)))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A server: any client whose key signs the handshake; rights come from its capability.
#[derive(Debug)]
struct AnyClient(WebPkiSupportedAlgorithms);

impl ClientCertVerifier for AnyClient {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}
