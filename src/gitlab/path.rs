//! References to GitLab groups and projects (`:id` path parameters) and path-segment encoding.

use std::fmt;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

/// Characters left as-is in a path segment: RFC 3986 unreserved characters. Everything else,
/// `/` included, is percent-encoded, which is what GitLab's `:id` and `:tag_name` need.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes one path segment (`my-org/app` → `my-org%2Fapp`).
pub fn encode_segment(segment: &str) -> String {
    utf8_percent_encode(segment, SEGMENT).to_string()
}

/// Characters left as-is in a cache entry id: the segment set plus `=` (base64 padding) and
/// `/`, both legal in a path, and the route is a wildcard (`cache_entries/*id`).
const CACHE_ENTRY_ID: &AsciiSet = &SEGMENT.remove(b'=').remove(b'/');

/// Encodes a cache entry id for `cache_entries/*id`.
pub fn encode_cache_entry_id(id: &str) -> String {
    utf8_percent_encode(id, CACHE_ENTRY_ID).to_string()
}

/// A GitLab `:id` path parameter: a numeric id or a full path (`my-org` or `my-org/app`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PathOrId {
    Id(i64),
    Path(String),
}

/// A group reference (numeric id or full path).
pub type GroupRef = PathOrId;
/// A project reference (numeric id or full path).
pub type ProjectRef = PathOrId;

impl PathOrId {
    /// Parses user input: all digits → id, otherwise a full path (surrounding slashes dropped).
    pub fn parse(input: &str) -> Self {
        let trimmed = input.trim().trim_matches('/');
        match trimmed.parse::<i64>() {
            Ok(id) if !trimmed.starts_with('+') && !trimmed.starts_with('-') => Self::Id(id),
            _ => Self::Path(trimmed.to_owned()),
        }
    }

    /// The value as it goes in a URL path: the id, or the path with `/` encoded as `%2F`.
    pub fn to_path_segment(&self) -> String {
        match self {
            Self::Id(id) => id.to_string(),
            Self::Path(path) => encode_segment(path),
        }
    }
}

impl fmt::Display for PathOrId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Id(id) => write!(formatter, "{id}"),
            Self::Path(path) => formatter.write_str(path),
        }
    }
}

impl From<i64> for PathOrId {
    fn from(id: i64) -> Self {
        Self::Id(id)
    }
}

impl From<&str> for PathOrId {
    fn from(input: &str) -> Self {
        Self::parse(input)
    }
}

impl From<String> for PathOrId {
    fn from(input: String) -> Self {
        Self::parse(&input)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_paths_encode_slashes() {
        assert_eq!(
            PathOrId::parse("my-org/app").to_path_segment(),
            "my-org%2Fapp"
        );
        assert_eq!(
            PathOrId::parse("my-org/sub.group/my_app").to_path_segment(),
            "my-org%2Fsub.group%2Fmy_app"
        );
    }

    #[test]
    fn digits_are_ids() {
        assert_eq!(PathOrId::parse("42"), PathOrId::Id(42));
        assert_eq!(PathOrId::parse(" 42 ").to_path_segment(), "42");
        assert_eq!(PathOrId::from(7), PathOrId::Id(7));
        assert_eq!(PathOrId::parse("-1"), PathOrId::Path("-1".into()));
        assert_eq!(PathOrId::parse("42abc"), PathOrId::Path("42abc".into()));
    }

    #[test]
    fn surrounding_slashes_are_dropped() {
        assert_eq!(PathOrId::parse("/my-org/"), PathOrId::Path("my-org".into()));
    }

    #[test]
    fn tag_names_and_odd_characters_are_encoded() {
        assert_eq!(encode_segment("v1.2.3"), "v1.2.3");
        assert_eq!(encode_segment("feature/x"), "feature%2Fx");
        assert_eq!(encode_segment("a b+c?d#e%"), "a%20b%2Bc%3Fd%23e%25");
        assert_eq!(encode_segment("grüß"), "gr%C3%BC%C3%9F");
    }

    #[test]
    fn cache_entry_ids_keep_base64_characters() {
        assert_eq!(
            encode_cache_entry_id("MTUgbGlicmFyeS9uZ2lueA=="),
            "MTUgbGlicmFyeS9uZ2lueA=="
        );
        assert_eq!(encode_cache_entry_id("ab-_c/d+e"), "ab-_c/d%2Be");
    }

    #[test]
    fn display_is_the_raw_value() {
        assert_eq!(PathOrId::parse("my-org/app").to_string(), "my-org/app");
        assert_eq!(PathOrId::Id(5).to_string(), "5");
    }
}
