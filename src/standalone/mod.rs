//! Standalone mode (`apply`, `plan`): reconcile manifests on disk against GitLab once, with the
//! same `sync` engines the controllers use, without a cluster. With no GitLab URL, an embedded
//! simulator seeded with demo data stands in for GitLab, so a fresh machine can run the whole
//! product on `examples/`.

pub mod manifests;
pub mod run;
pub mod tenancy;

use std::path::PathBuf;

use secrecy::SecretString;
use url::Url;

use crate::gitlab::{ClientConfig, GitLabClient};
use crate::sim::{Seed, SimConfig, SimHandle, Simulator};
use crate::sync::Mode;

pub use manifests::{ManifestErrors, Manifests};
pub use run::{Report, render_table};

/// What `apply`/`plan` were asked to do.
#[derive(Debug)]
pub struct Options {
    pub paths: Vec<PathBuf>,
    pub mode: Mode,
    /// GitLab URL and token; `None` starts the embedded simulator.
    pub gitlab: Option<(Url, SecretString)>,
    pub extra_ca_pem: Option<Vec<u8>>,
    /// Send upstream credentials even when GitLab already has the declared username.
    pub resend_credentials: bool,
    /// `--access-policy`: objects outside it are reported `NotPermitted` and not sent.
    pub access_policy: Option<crate::tenancy::AccessPolicy>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Manifests(#[from] ManifestErrors),
    #[error("cannot start the embedded GitLab simulator: {0}")]
    Simulator(String),
    #[error("GitLab client: {0}")]
    Client(#[from] crate::gitlab::Error),
}

/// The note printed when the embedded simulator answers instead of a real GitLab.
pub const EMBEDDED_NOTE: &str = "No GitLab URL given (--gitlab-url / GITLAB_URL): using the embedded GitLab simulator with demo data. \
Upstream connection tests are answered by its built-in stub registry; no network is used.";

/// The GitLab the claims of manifests name when the embedded simulator stands in.
const EMBEDDED_GITLAB: &str = "http://embedded-gitlab-simulator";

/// Loads, validates and reconciles (or plans) the manifests once.
pub async fn execute(options: &Options) -> Result<Report, Error> {
    let mut manifests = manifests::load(&options.paths)?;
    let claimed_gitlab = match &options.gitlab {
        Some((url, _)) => url.clone(),
        // Claims only compare: any one url stands for the embedded simulator.
        None => Url::parse(EMBEDDED_GITLAB).map_err(|error| Error::Simulator(error.to_string()))?,
    };
    tenancy::check_claims(&manifests, &claimed_gitlab)?;
    let withheld = match &options.access_policy {
        Some(policy) => tenancy::withhold_not_permitted(&mut manifests, policy),
        None => Vec::new(),
    };
    let mut simulator: Option<SimHandle> = None;
    let (url, token) = match &options.gitlab {
        Some((url, token)) => (url.clone(), token.clone()),
        None => {
            let config = SimConfig::embedded_demo();
            let token = config.token.clone();
            let handle = Simulator::start(config, Seed::demo())
                .await
                .map_err(|error| Error::Simulator(error.to_string()))?;
            let url = Url::parse(&handle.base_url())
                .map_err(|error| Error::Simulator(error.to_string()))?;
            simulator = Some(handle);
            (url, token)
        }
    };
    let mut config = ClientConfig::new(url, token);
    config.extra_ca_pem = options.extra_ca_pem.clone();
    let client = GitLabClient::new(config)?;
    let mut withheld = withheld;
    if let Some(policy) = &options.access_policy {
        withheld.extend(tenancy::withhold_group_expansions(&client, &mut manifests, policy).await);
    }
    let mut report = run::reconcile_all(
        &client,
        &manifests,
        options.mode,
        options.resend_credentials,
    )
    .await;
    report.objects.extend(withheld);
    if simulator.is_some() {
        report.notes.push(EMBEDDED_NOTE.into());
    }
    for skipped in &manifests.skipped {
        report.notes.push(format!(
            "passed over (not a kind this tool manages): {skipped}"
        ));
    }
    if let Some(handle) = simulator {
        handle.shutdown().await;
    }
    Ok(report)
}
