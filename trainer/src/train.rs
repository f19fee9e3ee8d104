//! Training loop (in progress).
