//! The Rust types of the three custom resources and their shared pieces.
