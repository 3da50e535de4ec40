//! The credential the runner presents. Its own, saved in `<work dir>/credential` (mode 0600)
//! once the server issued it, is presented from then on, registrations included; the
//! registration token given on the command line is needed only the first time, or once the
//! server no longer knows the saved credential (it lost its database, or the runner was
//! forgotten).

use std::path::{Path, PathBuf};

use crate::wire::Bearer;

pub(super) struct Credential {
    /// What every call presents.
    bearer: Bearer,
    /// Where the runner's own credential is kept between runs.
    saved: PathBuf,
    /// The registration token (or a credential) given on the command line.
    token: Option<String>,
}

impl Credential {
    /// Presents the saved credential, else `token`; fails when there is neither.
    pub(super) fn load(work_dir: &Path, token: Option<String>) -> anyhow::Result<Self> {
        let credential = Self {
            bearer: Bearer::default(),
            saved: work_dir.join("credential"),
            token,
        };
        match credential.load_saved().or_else(|| credential.token.clone()) {
            Some(token) => credential.bearer.set(&token),
            None => anyhow::bail!(
                "no credential: pass the runner registration token with --token or \
                 PIPELINE_RUNNER_TOKEN (the server's log says where it is)"
            ),
        }
        Ok(credential)
    }

    /// What the client presents.
    pub(super) fn bearer(&self) -> Bearer {
        self.bearer.clone()
    }

    fn load_saved(&self) -> Option<String> {
        std::fs::read_to_string(&self.saved)
            .ok()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
    }

    /// Whether, the credential presented refused, the runner has another to try: it presented
    /// its saved one, and a different registration token was given.
    pub(super) fn can_fall_back(&self) -> bool {
        match (self.load_saved(), &self.token) {
            (Some(saved), Some(token)) => saved != token.trim(),
            _ => false,
        }
    }

    /// Forgets the saved credential and presents the registration token instead.
    pub(super) fn fall_back(&self) {
        if let Some(token) = &self.token {
            let _ = std::fs::remove_file(&self.saved);
            self.bearer.set(token);
        }
    }

    /// The server issued the runner its own credential: from now on the runner is itself,
    /// never the shared token, and it keeps the credential for its next start.
    pub(super) fn issued(&self, credential: &str) {
        self.bearer.set(credential);
        if let Err(e) = self.store(credential) {
            tracing::warn!(error = %e, "cannot save the runner's credential; the next start needs the registration token again");
        }
    }

    fn store(&self, credential: &str) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = self.saved.with_extension("new");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(format!("{credential}\n").as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.saved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_saved_credential_wins_and_falls_back_to_a_different_token() {
        let dir = tempfile::tempdir().expect("dir");
        assert!(
            Credential::load(dir.path(), None).is_err(),
            "nothing to present"
        );
        let c = Credential::load(dir.path(), Some("reg".into())).expect("token");
        assert!(!c.can_fall_back(), "nothing saved");
        c.issued("own");
        let file = dir.path().join("credential");
        assert_eq!(std::fs::read_to_string(&file).expect("saved"), "own\n");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = Credential::load(dir.path(), Some("own".into())).expect("saved");
        assert!(!again.can_fall_back(), "the token is the saved credential");
        let again = Credential::load(dir.path(), Some("reg".into())).expect("saved");
        assert!(again.can_fall_back());
        again.fall_back();
        assert!(!file.exists(), "forgotten");
        assert!(!again.can_fall_back(), "once");
    }
}
