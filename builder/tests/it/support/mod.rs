//! Fixtures shared by the test modules of this binary: `use crate::support;`.

pub mod subprocess;
