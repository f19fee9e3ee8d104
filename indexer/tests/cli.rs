//! The `indexer` binary's user-facing errors (this file also makes `cargo test --workspace`
//! build the binary that the end-to-end tests in `tests/` drive).

use std::process::Command;

#[test]
fn a_missing_index_is_a_clear_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-index");
    let out = Command::new(env!("CARGO_BIN_EXE_indexer"))
        .args(["info", "--index"])
        .arg(&missing)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("no-such-index"),
        "the error must name the index: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn hnsw_parameters_are_validated_before_hnsw_rs_sees_them() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_indexer"))
        .args([
            "build",
            "--model",
            "pretrained:efficientnet-lite0",
            "--m",
            "1000",
            "--images",
        ])
        .arg(dir.path())
        .arg("--out")
        .arg(dir.path().join("idx"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("256") || err.contains("--m"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// `query -k 0` used to print an empty list and exit 0: a usage error now, refused before
/// any index or model is opened.
#[test]
fn query_k_zero_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_indexer"))
        .args(["query", "-k", "0", "--index"])
        .arg(dir.path().join("idx"))
        .arg(dir.path().join("q.jpg"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("-k") || err.contains("'0'"), "{err}");
}
