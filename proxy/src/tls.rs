//! The crypto provider: aws-lc-rs, TLS 1.3 only, with the X25519MLKEM768
//! hybrid key exchange preferred. Every rustls config in Strait is built from
//! [`provider()`], never from the process default, so a second provider
//! linked in by accident can never make a builder panic.

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;

/// The ALPN protocol spoken on gateway tunnels.
pub const TUNNEL_ALPN: &[u8] = b"strait/1";

/// ALPN of the control plane's gRPC services over TLS (destination
/// discovery, identity): HTTP/2.
pub const CONTROL_PLANE_ALPN: &[u8] = b"h2";

/// The protocol versions Strait accepts: TLS 1.3 and nothing else.
pub static PROTOCOL_VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// Returns Strait's crypto provider, the same `Arc` every time.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .clone()
}

/// Installs [`provider()`] as the process default, idempotently. Call it at
/// every entry point (binaries, test setup) so that third-party code that
/// asks for the default gets the same provider.
pub fn install_default_provider() {
    // An error only means a provider is installed already; if it is another
    // one, our own configs still use ours explicitly.
    let _ = CryptoProvider::install_default((*provider()).clone());
}

/// A TLS 1.3 client config presenting `identity` and verifying the peer
/// with `verifier`.
pub fn client_config(
    verifier: Arc<dyn rustls::client::danger::ServerCertVerifier>,
    identity: Arc<crate::identity::CertStore>,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, rustls::Error> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(identity);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // A resumed session skips certificate verification: with peers that
    // can be unlinked at run time, every handshake verifies in full.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// A TLS 1.3 server config presenting `identity` and requiring client
/// certificates accepted by `verifier`.
pub fn server_config(
    verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    identity: Arc<crate::identity::CertStore>,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, rustls::Error> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(identity);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// A TLS 1.3 server config presenting `identity` to clients that need not
/// have a certificate yet (the identity service: proxies come to it to get
/// one).
pub fn server_auth_only_config(
    identity: Arc<crate::identity::CertStore>,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, rustls::Error> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)?
        .with_no_client_auth()
        .with_cert_resolver(identity);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}
