//! Connections to the control plane (the cluster's gateway): its address
//! as given on the command line, and one lazily connected gRPC channel,
//! in plaintext or over TLS pinned on the control plane's SPIFFE ID. The
//! destination resolver ([`crate::discovery::GrpcResolver`]) and the
//! identity client ([`crate::identity::Certifier`]) both use them.

use std::sync::Arc;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

/// Why a control-plane address was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlPlaneAddrError {
    /// Not `host:port` nor `http://host:port`.
    #[error("{0:?} is not host:port or http://host:port")]
    Invalid(String),
}

/// Parses `host:port` or `http://host:port` (a command-line flag's value);
/// the host may be a DNS name, resolved at every (re)connect.
pub fn parse_addr(addr: &str) -> Result<http::Uri, ControlPlaneAddrError> {
    let invalid = || ControlPlaneAddrError::Invalid(addr.to_string());
    let text = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let uri: http::Uri = text.parse().map_err(|_| invalid())?;
    let ok = uri.scheme_str() == Some("http")
        && uri.port_u16().is_some_and(|p| p > 0)
        && uri.host().is_some_and(|h| !h.is_empty())
        && uri.path_and_query().is_none_or(|p| p.as_str() == "/");
    if !ok {
        return Err(invalid());
    }
    Ok(uri)
}

/// A gRPC channel to `uri` that connects on first use (and again after a
/// failure), with `timeout` for the TCP connect and TLS handshake. With
/// `tls` (see [`crate::tls::client_config`]: it pins the control plane's
/// identity) the channel speaks TLS; without, plaintext HTTP/2.
pub fn channel(
    uri: &http::Uri,
    tls: Option<Arc<rustls::ClientConfig>>,
    timeout: Duration,
) -> Channel {
    let endpoint = Endpoint::from(uri.clone())
        .connect_timeout(timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    let Some(tls) = tls else {
        return endpoint.connect_lazy();
    };
    let connector = tower::service_fn(move |uri: http::Uri| {
        let tls = tokio_rustls::TlsConnector::from(tls.clone());
        async move {
            let host = uri
                .host()
                .unwrap_or_default()
                .trim_matches(['[', ']'])
                .to_string();
            let Some(port) = uri.port_u16() else {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "control plane address without a port",
                ));
            };
            let connect = async {
                let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
                tcp.set_nodelay(true)?;
                // A constant name: the control plane is known by its
                // SPIFFE ID, pinned in the config.
                let name = rustls::pki_types::ServerName::try_from("strait-gateway")
                    .map_err(std::io::Error::other)?;
                tls.connect(name, tcp).await
            };
            let stream = crate::net::timed(timeout, connect).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    endpoint.connect_with_connector_lazy(connector)
}
