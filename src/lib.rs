//! Workspace root: holds the cross-crate tests and benchmarks.
