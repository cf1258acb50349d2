//! Host helpers for examples and tests: building the static binaries that example images run.
