//! Standard Webhooks 1.0 signatures: `v1,<base64 of HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`,
//! the key being the base64-decoded part of `whsec_<base64>`, so a receiver verifies what the
//! server sends with an off-the-shelf library.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The shortest and longest keys Standard Webhooks allows (24 to 64 bytes).
const KEY_BYTES: std::ops::RangeInclusive<usize> = 24..=64;

/// The signing key; never printed.
#[derive(Clone)]
pub struct Secret {
    mac: Hmac<Sha256>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

impl Secret {
    /// `whsec_<base64 key>` (surrounding white space ignored), or why not.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let Some(encoded) = text.strip_prefix("whsec_") else {
            return Err("it must hold whsec_ followed by the base64 of the key (as \
                        Standard Webhooks secrets are written)"
                .to_owned());
        };
        let key = STANDARD
            .decode(encoded)
            .map_err(|e| format!("the part after whsec_ is not base64: {e}"))?;
        if !KEY_BYTES.contains(&key.len()) {
            return Err(format!(
                "the key is {} bytes; Standard Webhooks keys are 24 to 64 bytes \
                 (e.g. echo whsec_$(head -c 32 /dev/urandom | base64))",
                key.len()
            ));
        }
        let mac = <Hmac<Sha256> as Mac>::new_from_slice(&key)
            .map_err(|e| format!("the key cannot be used: {e}"))?;
        Ok(Self { mac })
    }

    /// The secret in `path`, a file only its owner may read, or a one-line reason.
    pub fn read(path: &Path) -> Result<Self, String> {
        let shown = path.display();
        let meta = std::fs::metadata(path)
            .map_err(|e| format!("--webhook-secret-file {shown}: cannot read it: {e}"))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(format!(
                "--webhook-secret-file {shown}: others may read it (mode {mode:o}); \
                 chmod 600 {shown}"
            ));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--webhook-secret-file {shown}: cannot read it: {e}"))?;
        Self::parse(&text).map_err(|e| format!("--webhook-secret-file {shown}: {e}"))
    }

    /// The `webhook-signature` header's value for a message.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut mac = self.mac.clone();
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test vector the Standard Webhooks reference libraries check against: a receiver's
    /// library verifies what this signs.
    #[test]
    fn signs_the_standard_webhooks_test_vector() {
        let secret = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("secret");
        assert_eq!(
            secret.sign(
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1_614_265_330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn refuses_a_secret_not_in_the_standard_form() {
        let no_prefix = Secret::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect_err("prefix");
        assert!(no_prefix.contains("whsec_"), "{no_prefix}");
        let not_base64 = Secret::parse("whsec_not base64!").expect_err("base64");
        assert!(not_base64.contains("not base64"), "{not_base64}");
        let short = Secret::parse("whsec_c2hvcnQ=").expect_err("short");
        assert!(short.contains("5 bytes"), "{short}");
        assert!(Secret::parse("  whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n").is_ok());
    }

    #[test]
    fn refuses_a_secret_file_others_may_read() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("secret");
        std::fs::write(&path, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let open = Secret::read(&path).expect_err("0644");
        assert!(
            open.contains("mode 644") && open.contains("chmod 600"),
            "{open}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(Secret::read(&path).is_ok());
    }
}
