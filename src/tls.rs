//! The TLS crypto provider for every HTTPS client Proxi builds (LLM providers, a
//! remote Proxi server): rustls with `ring`.
//!
//! reqwest is built with `rustls-no-provider`, so that the C-heavy default
//! (`aws-lc-sys`) is not compiled; it then needs a process-wide provider before
//! the first client is built, and panics without one. Every constructor in this
//! crate that builds a reqwest client (directly or through rmcp or genai) calls
//! [`install_crypto_provider`] first; code outside the crate that builds its own
//! reqwest clients must call it too.

/// Makes rustls' `ring` provider the process default, unless one is installed already.
///
/// Idempotent and cheap after the first call.
pub fn install_crypto_provider() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        // An error means another provider was installed first, which serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_clients_can_be_built_once_the_provider_is_installed() {
        install_crypto_provider();
        install_crypto_provider();
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
        reqwest::Client::builder()
            .https_only(true)
            .build()
            .expect("a TLS client builds");
    }
}
