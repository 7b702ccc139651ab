//! Standalone mode (`apply`, `plan`): reconcile manifests on disk against GitLab once, with the
//! same `sync` engines the controllers use, without a cluster. With no GitLab URL, an embedded
//! simulator seeded with demo data stands in for GitLab, so a fresh machine can run the whole
//! product on `examples/`. `export` writes the manifests of what a GitLab group already holds.

pub mod export;
pub mod manifests;
pub mod run;
pub mod tenancy;

use std::collections::BTreeSet;
use std::path::PathBuf;

use secrecy::SecretString;
use url::Url;

use crate::gitlab::{ClientConfig, GitLabClient, PathOrId};
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
    /// Cleanup fingerprints approved past `maxDeletionPercent` (`--approve`), for every
    /// CleanupPolicy of the manifests.
    pub approved_deletions: BTreeSet<String>,
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
    #[error("export: {0}")]
    Export(String),
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// What `export` was asked to do.
#[derive(Debug)]
pub struct ExportOptions {
    /// The top-level group: full path or numeric id.
    pub group: String,
    /// `metadata.namespace` of every manifest; `None` leaves it unset.
    pub namespace: Option<String>,
    /// GitLab URL and token; `None` starts the embedded simulator.
    pub gitlab: Option<(Url, SecretString)>,
    pub extra_ca_pem: Option<Vec<u8>>,
}

/// A client for the given GitLab, or for the embedded simulator (returned so that the caller
/// shuts it down) when none is given.
async fn connect(
    gitlab: Option<&(Url, SecretString)>,
    extra_ca_pem: Option<&Vec<u8>>,
) -> Result<(GitLabClient, Option<SimHandle>), Error> {
    let mut simulator: Option<SimHandle> = None;
    let (url, token) = match gitlab {
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
    config.extra_ca_pem = extra_ca_pem.cloned();
    Ok((GitLabClient::new(config)?, simulator))
}

/// Reads the group from GitLab and turns it into manifests.
pub async fn execute_export(
    options: &ExportOptions,
) -> Result<(export::Export, export::Provenance), Error> {
    let (client, simulator) =
        connect(options.gitlab.as_ref(), options.extra_ca_pem.as_ref()).await?;
    let read = export::read_group(&client, &PathOrId::parse(&options.group)).await;
    let gitlab_url = simulator.is_none().then(|| client.base_url().to_string());
    if let Some(handle) = simulator {
        handle.shutdown().await;
    }
    let contents = match read {
        Ok(contents) => contents,
        // Virtual registries belong to top-level groups; GitLab's refusal does not say so.
        Err(error) if options.group.trim_matches('/').contains('/') => {
            return Err(Error::Export(format!(
                "{error} (virtual registries exist only on top-level groups, and {} is a subgroup)",
                options.group
            )));
        }
        Err(error) => return Err(error),
    };
    let exported = export::export_group(&options.group, options.namespace.as_deref(), &contents)?;
    Ok((
        exported,
        export::Provenance {
            group: options.group.clone(),
            gitlab_url,
            at: jiff::Timestamp::now(),
        },
    ))
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
    let mut withheld = match &options.access_policy {
        Some(policy) => tenancy::withhold_not_permitted(&mut manifests, policy),
        None => Vec::new(),
    };
    let (client, simulator) =
        connect(options.gitlab.as_ref(), options.extra_ca_pem.as_ref()).await?;
    if let Some(policy) = &options.access_policy {
        withheld.extend(tenancy::withhold_group_expansions(&client, &mut manifests, policy).await);
    }
    let mut report = run::reconcile_all(
        &client,
        &manifests,
        options.mode,
        options.resend_credentials,
        &options.approved_deletions,
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
