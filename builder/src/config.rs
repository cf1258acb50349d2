//! The image config document and how config steps change it.
