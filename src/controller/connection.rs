//! Reading what an object references in its own namespace: the GitLab connection (default or
//! `spec.gitlab` with a token Secret) and credential Secrets. Secrets are only ever read from
//! the object's own namespace.

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use secrecy::SecretString;

use super::{Context, Error, Result};
use crate::crd::GitLabConnection;
use crate::gitlab::GitLabClient;

/// A Secret's value with the version that identifies it.
pub struct SecretValue {
    pub value: SecretString,
    pub resource_version: String,
}

/// Reads Secret `name` in `namespace` (the object's own: there is no other).
pub async fn read_secret(ctx: &Context, namespace: &str, name: &str) -> Result<Secret> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    api.get_opt(name)
        .await?
        .ok_or_else(|| Error::SecretNotFound {
            namespace: namespace.into(),
            name: name.into(),
        })
}

/// Reads `key` of Secret `name` in `namespace`.
pub async fn read_secret_key(
    ctx: &Context,
    namespace: &str,
    name: &str,
    key: &str,
) -> Result<SecretValue> {
    secret_key(&read_secret(ctx, namespace, name).await?, namespace, key)
}

/// Reads `key` of an already fetched Secret (`data`, or `stringData` as written in a manifest).
pub fn secret_key(secret: &Secret, namespace: &str, key: &str) -> Result<SecretValue> {
    let name = secret.metadata.name.clone().unwrap_or_default();
    let missing = || Error::SecretKeyMissing {
        namespace: namespace.into(),
        name: name.clone(),
        key: key.into(),
    };
    let value = match secret.data.as_ref().and_then(|data| data.get(key)) {
        Some(bytes) => String::from_utf8(bytes.0.clone()).map_err(|_| missing())?,
        None => secret
            .string_data
            .as_ref()
            .and_then(|data| data.get(key))
            .cloned()
            .ok_or_else(missing)?,
    };
    Ok(SecretValue {
        value: SecretString::from(value.trim_end_matches(['\n', '\r']).to_owned()),
        resource_version: secret.metadata.resource_version.clone().unwrap_or_default(),
    })
}

/// Names a GitLab connection, as the client pool, the shared listings and the registry views
/// key it: the url, the token's source (the operator's default, or a Secret of the object's
/// own namespace) and, for a token Secret, its resource version. What one token read is
/// only ever used for objects reading GitLab with that same token, and a rotated token
/// starts afresh. Pure.
pub fn connection_key(
    url: &url::Url,
    namespace: &str,
    connection: Option<&GitLabConnection>,
    token_version: Option<&str>,
) -> String {
    let source = token_source(namespace, connection);
    match token_version {
        Some(version) => format!("{url}|{source}#{version}"),
        None => format!("{url}|{source}"),
    }
}

/// Where the token comes from: the operator's default, or a Secret of the object's namespace.
fn token_source(namespace: &str, connection: Option<&GitLabConnection>) -> String {
    match connection {
        Some(connection) => format!("{namespace}/{}", connection.token_secret_ref.name),
        None => "default".into(),
    }
}

/// A GitLab client and the name of the connection it stands for ([`connection_key`]).
pub struct Connection {
    pub client: GitLabClient,
    pub key: String,
}

/// The GitLab client an object uses: its `spec.gitlab` (token from a Secret in its own
/// namespace), else the operator's default.
pub async fn gitlab_client(
    ctx: &Context,
    namespace: &str,
    connection: Option<&GitLabConnection>,
) -> Result<GitLabClient> {
    Ok(gitlab_connection(ctx, namespace, connection).await?.client)
}

/// As [`gitlab_client`], with the connection's name.
pub async fn gitlab_connection(
    ctx: &Context,
    namespace: &str,
    connection: Option<&GitLabConnection>,
) -> Result<Connection> {
    let (url, token, key) = match connection {
        Some(connection) => {
            let url = url::Url::parse(&connection.url).map_err(|error| {
                Error::InvalidSpec(format!("spec.gitlab.url {:?}: {error}", connection.url))
            })?;
            let secret_ref = &connection.token_secret_ref;
            let token = read_secret_key(ctx, namespace, &secret_ref.name, &secret_ref.key).await?;
            // The resource version changes with the token, so a rotated token gets a new client.
            let key = connection_key(
                &url,
                namespace,
                Some(connection),
                Some(&token.resource_version),
            );
            (url, token.value, key)
        }
        None => {
            let default = ctx
                .config
                .default_gitlab
                .as_ref()
                .ok_or(Error::ConnectionMissing)?;
            let key = connection_key(&default.url, namespace, None, None);
            (default.url.clone(), default.token.clone(), key)
        }
    };
    let client = ctx
        .gitlab
        .get_or_create(&key, || GitLabClient::new(ctx.client_config(url, token)))
        .map_err(|error| Error::Sync(error.into()))?;
    Ok(Connection { client, key })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use secrecy::ExposeSecret;

    #[test]
    fn reads_data_and_string_data_and_names_a_missing_key() {
        let mut secret = Secret::default();
        secret.metadata.name = Some("creds".into());
        secret.metadata.resource_version = Some("7".into());
        secret.data = Some([("password".to_string(), ByteString(b"s3cret\n".to_vec()))].into());
        secret.string_data = Some([("username".to_string(), "robot".to_string())].into());
        let password = secret_key(&secret, "team", "password").expect("data key");
        assert_eq!(password.value.expose_secret(), "s3cret");
        assert_eq!(password.resource_version, "7");
        assert_eq!(
            secret_key(&secret, "team", "username")
                .expect("stringData key")
                .value
                .expose_secret(),
            "robot"
        );
        let error = secret_key(&secret, "team", "token")
            .err()
            .expect("missing key");
        assert_eq!(error.reason(), "SecretNotFound");
        assert!(error.to_string().contains("team/creds") && error.to_string().contains("token"));
    }
}
