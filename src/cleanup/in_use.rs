//! Which container images Pods run, for `safety.keepInUse`.
//!
//! Kubernetes shows an image twice per container: `image` as written in the Pod spec
//! (`nginx`, `gitlab.example.com:5000/group/project/app:1.2`, `registry/x@sha256:…`,
//! `registry/x:tag@sha256:…`) and, once running, `imageID` as the runtime resolved it
//! (`docker-pullable://registry/x@sha256:…`, `docker.io/library/nginx@sha256:…`, or a bare
//! `sha256:…`). [`ImageReference::parse`] reads both the way the Docker distribution
//! reference grammar does, including Docker Hub's normalisation (`nginx` →
//! `docker.io/library/nginx:latest`).
//!
//! [`InUseIndex`] answers "is this tag of this repository in use?" by
//! - (repository location, tag), and
//! - digest alone, whatever the location: a digest names content, and the same content under
//!   another name (a mirror, a virtual registry, a retag) is still the image a Pod runs.
//!
//! Matching is deliberately wide: registry host and repository path compare
//! case-insensitively (registries treat hosts so, and an upper-case path cannot be pulled
//! anyway); tags compare exactly (`V1` and `v1` are different images). A string that is not
//! a valid reference still contributes any `sha256:` digest found in it.

use std::collections::{HashMap, HashSet};
use std::fmt;

use super::{Error, Result};

const DOCKER_HUB: &str = "docker.io";
const DEFAULT_TAG: &str = "latest";

/// A parsed image reference, normalised: `registry/repository[:tag][@digest]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageReference {
    /// Registry host (and port), lower case; `docker.io` for Docker Hub.
    pub registry: String,
    /// Repository path, e.g. `group/project/app` or `library/nginx`.
    pub repository: String,
    /// The tag; `latest` when neither tag nor digest was written.
    pub tag: Option<String>,
    /// The manifest digest (`sha256:…`), lower case.
    pub digest: Option<String>,
}

/// What a Pod's `image` or `imageID` field names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodImage {
    Reference(ImageReference),
    /// A bare digest (`sha256:…`), as some runtimes report `imageID`.
    Digest(String),
}

impl PodImage {
    /// Parses a Pod's `image` or `imageID`, stripping a runtime scheme such as
    /// `docker-pullable://`.
    pub fn parse(input: &str) -> Result<Self> {
        let text = strip_scheme(input.trim());
        if let Some(digest) = bare_digest(text) {
            return Ok(PodImage::Digest(digest));
        }
        ImageReference::parse_text(input, text).map(PodImage::Reference)
    }

    pub fn digest(&self) -> Option<&str> {
        match self {
            PodImage::Reference(reference) => reference.digest.as_deref(),
            PodImage::Digest(digest) => Some(digest),
        }
    }
}

impl ImageReference {
    /// Parses an image reference (a runtime scheme prefix is tolerated).
    pub fn parse(input: &str) -> Result<Self> {
        Self::parse_text(input, strip_scheme(input.trim()))
    }

    fn parse_text(input: &str, text: &str) -> Result<Self> {
        let fail = |message: &str| Error::InvalidImageReference {
            input: input.to_owned(),
            message: message.to_owned(),
        };
        if text.is_empty() {
            return Err(fail("empty"));
        }
        if text
            .chars()
            .any(|character| character.is_whitespace() || character.is_control())
        {
            return Err(fail("contains whitespace"));
        }
        let (name_and_tag, digest) = match text.rsplit_once('@') {
            Some((name, digest)) => (
                name,
                Some(parse_digest(digest).ok_or_else(|| fail("invalid digest after '@'"))?),
            ),
            None => (text, None),
        };
        let last_slash = name_and_tag.rfind('/');
        let (name, tag) = match name_and_tag.rfind(':') {
            Some(colon) if last_slash.is_none_or(|slash| colon > slash) => {
                let tag = &name_and_tag[colon + 1..];
                if !valid_tag(tag) {
                    return Err(fail("invalid tag"));
                }
                (&name_and_tag[..colon], Some(tag.to_owned()))
            }
            _ => (name_and_tag, None),
        };
        let (registry, repository) = split_registry(name);
        if repository.is_empty() || repository.split('/').any(str::is_empty) {
            return Err(fail("empty repository path component"));
        }
        if registry.is_empty() {
            return Err(fail("empty registry host"));
        }
        let tag = match (tag, &digest) {
            (None, None) => Some(DEFAULT_TAG.to_owned()),
            (tag, _) => tag,
        };
        Ok(Self {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// `registry/repository`, comparable with GitLab's repository `location`.
    pub fn location(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }
}

impl fmt::Display for ImageReference {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(formatter, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(formatter, "@{digest}")?;
        }
        Ok(())
    }
}

fn strip_scheme(text: &str) -> &str {
    match text.split_once("://") {
        Some((_, rest)) => rest,
        None => text,
    }
}

/// `sha256:<64 hex>` and friends, as a whole string.
fn bare_digest(text: &str) -> Option<String> {
    if text.contains('/') || text.contains('@') {
        return None;
    }
    let (algorithm, hex) = text.split_once(':')?;
    let expected_length = match algorithm.to_ascii_lowercase().as_str() {
        "sha256" => 64,
        "sha384" => 96,
        "sha512" => 128,
        _ => return None,
    };
    (hex.len() == expected_length && hex.bytes().all(|byte| byte.is_ascii_hexdigit()))
        .then(|| text.to_ascii_lowercase())
}

/// `algorithm:hex` with a plausible algorithm and at least 32 hex digits, lower-cased.
fn parse_digest(text: &str) -> Option<String> {
    let (algorithm, hex) = text.split_once(':')?;
    let algorithm_ok = !algorithm.is_empty()
        && algorithm
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || b"+._-".contains(&byte));
    let hex_ok = hex.len() >= 32 && hex.bytes().all(|byte| byte.is_ascii_hexdigit());
    (algorithm_ok && hex_ok).then(|| text.to_ascii_lowercase())
}

fn valid_tag(tag: &str) -> bool {
    let bytes = tag.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 128
        && (bytes[0].is_ascii_alphanumeric() || bytes[0] == b'_')
        && bytes
            .iter()
            .all(|byte| byte.is_ascii_alphanumeric() || b"_.-".contains(byte))
}

/// Splits `name` into registry and repository as Docker does: the first component is a
/// registry when it contains `.` or `:`, is `localhost`, or has upper case; otherwise the
/// registry is Docker Hub, where single-component names live under `library/`.
fn split_registry(name: &str) -> (String, String) {
    let (registry, repository) = match name.split_once('/') {
        Some((first, rest))
            if first.contains('.')
                || first.contains(':')
                || first == "localhost"
                || first.bytes().any(|byte| byte.is_ascii_uppercase()) =>
        {
            (first.to_ascii_lowercase(), rest)
        }
        _ => (DOCKER_HUB.to_owned(), name),
    };
    let registry = match registry.as_str() {
        "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_owned(),
        _ => registry,
    };
    let repository = if registry == DOCKER_HUB && !repository.contains('/') {
        format!("library/{repository}")
    } else {
        repository.to_owned()
    };
    (registry, repository)
}

/// Normalises a GitLab repository `location` (or any `registry/path`) for comparison.
pub fn normalize_location(location: &str) -> String {
    let text = strip_scheme(location.trim()).trim_end_matches('/');
    let (registry, repository) = split_registry(text);
    format!("{registry}/{repository}").to_ascii_lowercase()
}

/// Every (location, tag) and digest that Pods run.
#[derive(Debug, Clone, Default)]
pub struct InUseIndex {
    tags_by_location: HashMap<String, HashSet<String>>,
    digests: HashSet<String>,
    unparsed: Vec<String>,
}

impl InUseIndex {
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds the index from the `(image, imageID)` pairs of every container (init and
    /// ephemeral included); an empty `imageID` (container not started) is fine.
    pub fn from_images<I, A, B>(pairs: I) -> Self
    where
        I: IntoIterator<Item = (A, B)>,
        A: AsRef<str>,
        B: AsRef<str>,
    {
        let mut index = Self::new();
        for (image, image_id) in pairs {
            index.add(image.as_ref());
            index.add(image_id.as_ref());
        }
        index
    }

    /// Adds one `image` or `imageID` string (blank ones are ignored).
    pub fn add(&mut self, image: &str) {
        if image.trim().is_empty() {
            return;
        }
        match PodImage::parse(image) {
            Ok(PodImage::Digest(digest)) => {
                self.digests.insert(digest);
            }
            Ok(PodImage::Reference(reference)) => {
                let location = reference.location().to_ascii_lowercase();
                if let Some(digest) = reference.digest {
                    self.digests.insert(digest);
                }
                if let Some(tag) = reference.tag {
                    self.tags_by_location
                        .entry(location)
                        .or_default()
                        .insert(tag);
                }
            }
            Err(_) => {
                // Unreadable, but any digest in it still names content that runs.
                for digest in find_digests(image) {
                    self.digests.insert(digest);
                }
                self.unparsed.push(image.to_owned());
            }
        }
    }

    /// Whether a Pod runs `tag` of the repository at `repository_location` (GitLab's
    /// `location`, e.g. `gitlab.example.com:5000/group/project`), or the content `digest`
    /// under any name.
    pub fn is_in_use(&self, repository_location: &str, tag: &str, digest: Option<&str>) -> bool {
        self.repository(repository_location).is_in_use(tag, digest)
    }

    /// A view for one repository, normalising its location once.
    pub fn repository(&self, repository_location: &str) -> RepositoryInUse<'_> {
        RepositoryInUse {
            tags: self
                .tags_by_location
                .get(&normalize_location(repository_location)),
            digests: &self.digests,
        }
    }

    /// Strings that were not valid image references (worth a log line).
    pub fn unparsed(&self) -> &[String] {
        &self.unparsed
    }

    pub fn is_empty(&self) -> bool {
        self.tags_by_location.is_empty() && self.digests.is_empty()
    }

    /// How many distinct digests Pods run.
    pub fn digest_count(&self) -> usize {
        self.digests.len()
    }
}

/// [`InUseIndex`] seen from one repository; cheap to copy, no allocation per lookup.
#[derive(Debug, Clone, Copy)]
pub struct RepositoryInUse<'a> {
    tags: Option<&'a HashSet<String>>,
    digests: &'a HashSet<String>,
}

impl RepositoryInUse<'_> {
    pub fn is_in_use(&self, tag: &str, digest: Option<&str>) -> bool {
        if self.tags.is_some_and(|tags| tags.contains(tag)) {
            return true;
        }
        match digest {
            Some(digest) if digest.bytes().any(|byte| byte.is_ascii_uppercase()) => {
                self.digests.contains(&digest.to_ascii_lowercase())
            }
            Some(digest) => self.digests.contains(digest),
            None => false,
        }
    }
}

/// Every `sha256:<64 hex>` inside a string.
fn find_digests(text: &str) -> Vec<String> {
    let lower = text.to_ascii_lowercase();
    let mut found = Vec::new();
    let mut rest = lower.as_str();
    while let Some(start) = rest.find("sha256:") {
        let candidate = &rest[start..];
        let hex_length = candidate["sha256:".len()..]
            .bytes()
            .take_while(u8::is_ascii_hexdigit)
            .count();
        if hex_length == 64 {
            found.push(candidate[.."sha256:".len() + 64].to_owned());
        }
        rest = &candidate["sha256:".len()..];
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DIGEST: &str = "sha256:4b5e2a1f0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f";
    const OTHER_DIGEST: &str =
        "sha256:0000000000000000000000000000000000000000000000000000000000000001";

    fn reference(input: &str) -> ImageReference {
        ImageReference::parse(input).unwrap()
    }

    #[test]
    fn parses_pod_image_forms() {
        let gitlab = reference("gitlab.example.com:5000/group/project/app:1.2");
        assert_eq!(gitlab.registry, "gitlab.example.com:5000");
        assert_eq!(gitlab.repository, "group/project/app");
        assert_eq!(gitlab.tag.as_deref(), Some("1.2"));
        assert_eq!(gitlab.digest, None);

        let pinned = reference(&format!("registry.example.com/x@{DIGEST}"));
        assert_eq!(pinned.location(), "registry.example.com/x");
        assert_eq!(pinned.tag, None);
        assert_eq!(pinned.digest.as_deref(), Some(DIGEST));

        let both = reference(&format!("registry.example.com/x:v2@{DIGEST}"));
        assert_eq!(both.tag.as_deref(), Some("v2"));
        assert_eq!(both.digest.as_deref(), Some(DIGEST));

        let port_no_tag = reference("localhost:5000/app");
        assert_eq!(port_no_tag.registry, "localhost:5000");
        assert_eq!(port_no_tag.tag.as_deref(), Some("latest"));
    }

    #[test]
    fn docker_hub_normalisation() {
        assert_eq!(
            reference("nginx").to_string(),
            "docker.io/library/nginx:latest"
        );
        assert_eq!(
            reference("nginx:1.27").to_string(),
            "docker.io/library/nginx:1.27"
        );
        assert_eq!(
            reference("bitnami/redis").to_string(),
            "docker.io/bitnami/redis:latest"
        );
        assert_eq!(
            reference("docker.io/nginx").to_string(),
            "docker.io/library/nginx:latest"
        );
        assert_eq!(
            reference("index.docker.io/library/nginx:1").to_string(),
            "docker.io/library/nginx:1"
        );
        assert_eq!(reference("localhost/app").registry, "localhost");
        assert_eq!(reference("Registry/app").registry, "registry");
    }

    #[test]
    fn parses_image_ids() {
        let pullable = PodImage::parse(&format!(
            "docker-pullable://gitlab.example.com:5000/group/project@{DIGEST}"
        ))
        .unwrap();
        match &pullable {
            PodImage::Reference(reference) => {
                assert_eq!(
                    reference.location(),
                    "gitlab.example.com:5000/group/project"
                );
                assert_eq!(reference.tag, None);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(pullable.digest(), Some(DIGEST));
        assert_eq!(
            PodImage::parse(DIGEST).unwrap(),
            PodImage::Digest(DIGEST.to_owned())
        );
        assert_eq!(
            PodImage::parse(&format!(
                "docker://{}",
                DIGEST.to_uppercase().replace("SHA256", "sha256")
            ))
            .unwrap(),
            PodImage::Digest(DIGEST.to_owned())
        );
        let containerd = PodImage::parse(&format!("docker.io/library/nginx@{DIGEST}")).unwrap();
        assert_eq!(containerd.digest(), Some(DIGEST));
    }

    #[test]
    fn rejects_garbage_with_the_input_named() {
        for input in [
            "",
            "   ",
            "a b",
            "x@sha256:12",
            "repo:",
            "repo:-bad",
            "host.example.com//x",
            "/x",
        ] {
            let error = ImageReference::parse(input).expect_err(input);
            assert!(error.to_string().contains(&format!("{input:?}")), "{error}");
        }
    }

    #[test]
    fn index_matches_by_location_and_tag_or_by_digest_anywhere() {
        let index = InUseIndex::from_images([
            ("GitLab.Example.com:5000/group/project:1.2", ""),
            (
                "mirror.example.com/cache/project:9",
                &*format!("docker-pullable://mirror.example.com/cache/project@{DIGEST}"),
            ),
            ("nginx", ""),
            (
                "not a reference",
                "garbage sha256:00000000000000000000000000000000000000000000000000000000000000aa",
            ),
        ]);
        let location = "gitlab.example.com:5000/group/project";
        assert!(index.is_in_use(location, "1.2", None));
        assert!(index.is_in_use("GITLAB.EXAMPLE.COM:5000/group/project", "1.2", None));
        assert!(!index.is_in_use(location, "1.3", None));
        assert!(!index.is_in_use("gitlab.example.com:5000/group/other", "1.2", None));
        // Content-addressed: the mirror's digest protects the tag in GitLab too.
        assert!(index.is_in_use(location, "anything", Some(DIGEST)));
        assert!(index.is_in_use(
            location,
            "anything",
            Some(&DIGEST.to_uppercase().replace("SHA256", "sha256"))
        ));
        assert!(!index.is_in_use(location, "anything", Some(OTHER_DIGEST)));
        // Tags compare exactly.
        assert!(!index.is_in_use(location, "1.2 ", None));
        assert!(index.is_in_use("docker.io/library/nginx", "latest", None));
        assert!(index.is_in_use("nginx", "latest", None));
        // Unparsable strings still contribute their digests.
        assert_eq!(index.unparsed().len(), 2);
        assert!(index.is_in_use(
            location,
            "x",
            Some("sha256:00000000000000000000000000000000000000000000000000000000000000aa")
        ));
        assert!(!index.is_empty());
        assert_eq!(index.digest_count(), 2);
    }

    proptest! {
        #[test]
        fn parse_never_panics(input in "\\PC{0,60}") {
            let _ = PodImage::parse(&input);
            let _ = normalize_location(&input);
        }

        #[test]
        fn display_round_trips(
            host in "[a-z]{1,8}\\.example\\.com(:[0-9]{2,4})?",
            path in "[a-z0-9]{1,6}(/[a-z0-9]{1,6}){0,3}",
            tag in proptest::option::of("[A-Za-z0-9_][A-Za-z0-9_.-]{0,10}"),
            with_digest in any::<bool>(),
        ) {
            let mut text = format!("{host}/{path}");
            if let Some(tag) = &tag {
                text.push(':');
                text.push_str(tag);
            }
            if with_digest {
                text.push('@');
                text.push_str(DIGEST);
            }
            let parsed = reference(&text);
            let rendered = parsed.to_string();
            prop_assert_eq!(rendered.trim_end_matches(":latest"), text.trim_end_matches(":latest"));
            prop_assert_eq!(reference(&parsed.to_string()), parsed);
        }
    }
}
