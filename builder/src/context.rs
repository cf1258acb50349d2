//! Build contexts: opened with cap-std, walked in sorted order, filtered by `.dockerignore`.
