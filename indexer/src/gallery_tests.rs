//! Storage, durability and search tests for [`GalleryIndex`] on synthetic vectors.

use std::path::Path;

use trainer::backbone::BackboneKind;

use crate::gallery::CrashPoint;
use crate::synthetic::clustered;
use crate::*;

pub(crate) fn identity(dim: usize) -> ModelIdentity {
    ModelIdentity {
        backbone: BackboneKind::EfficientnetLite0,
        dim,
        weights_sha256: "ab".repeat(32),
        preprocess_sha256: "cd".repeat(32),
    }
}

fn items(vectors: &[f32], dim: usize, start: usize) -> Vec<NewItem> {
    vectors
        .chunks_exact(dim)
        .enumerate()
        .map(|(i, v)| NewItem {
            path: format!("img/{:05}.jpg", start + i),
            label: Some(format!("class{}", (start + i) % 7)),
            sha256: format!("{:064x}", start + i),
            vector: v.to_vec(),
        })
        .collect()
}

fn small_index(dir: &Path, n: usize) -> (GalleryIndex, Vec<f32>) {
    let dim = 16;
    let (v, _) = clustered(n, dim, 10, 0.6, 1);
    let mut idx = GalleryIndex::create(dir, identity(dim), dim, HnswParams::default()).unwrap();
    idx.add(items(&v, dim, 0)).unwrap();
    idx.commit().unwrap();
    (idx, v)
}

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn round_trip_preserves_items_vectors_and_results() {
    let dir = tempfile::tempdir().unwrap();
    let (idx, v) = small_index(dir.path(), 300);
    let q = &v[5 * 16..6 * 16];
    let before = idx.search(q, 5, 64);
    assert_eq!(before[0].id, 5);
    assert!((before[0].score - 1.0).abs() < 1e-5);
    drop(idx);
    let idx = GalleryIndex::open(dir.path()).unwrap();
    assert!(idx.warnings().is_empty(), "{:?}", idx.warnings());
    assert_eq!(idx.len(), 300);
    assert_eq!(idx.dim(), 16);
    assert_eq!(idx.identity(), &identity(16));
    assert_eq!(idx.item(7).unwrap().path, "img/00007.jpg");
    assert_eq!(idx.item(7).unwrap().label.as_deref(), Some("class0"));
    assert!(idx.item(300).is_none());
    assert_eq!(idx.search(q, 5, 64), before);
    assert_eq!(idx.search_exact(q, 5)[0].id, 5);
    for (a, b) in idx.vectors().iter().zip(&v) {
        assert!((a - b).abs() < 1e-6);
    }
}

#[test]
fn loaded_graph_accepts_more_items() {
    let dir = tempfile::tempdir().unwrap();
    let (idx, _) = small_index(dir.path(), 100);
    drop(idx);
    let mut idx = GalleryIndex::open(dir.path()).unwrap();
    let (v2, _) = clustered(150, 16, 10, 0.6, 99);
    idx.add(items(&v2, 16, 1000)).unwrap();
    assert_eq!(idx.len(), 250);
    let q = &v2[3 * 16..4 * 16];
    assert_eq!(idx.search(q, 1, 32)[0].id, 103);
    idx.commit().unwrap();
    drop(idx);
    let idx = GalleryIndex::open(dir.path()).unwrap();
    assert_eq!(idx.len(), 250);
    assert_eq!(idx.search(q, 1, 32)[0].id, 103);
    assert_eq!(idx.generation(), 2);
    // The old generation was deleted.
    assert!(
        !files(dir.path()).iter().any(|f| f.contains(".g1.")),
        "{:?}",
        files(dir.path())
    );
}

#[test]
fn crash_before_manifest_keeps_previous_state() {
    let dir = tempfile::tempdir().unwrap();
    let (mut idx, _) = small_index(dir.path(), 50);
    let (v2, _) = clustered(20, 16, 3, 0.6, 5);
    idx.add(items(&v2, 16, 500)).unwrap();
    idx.crash_at = Some(CrashPoint::BeforeManifest);
    assert!(idx.commit().is_err());
    drop(idx);
    // A half-written temp manifest and a truncated next-generation file on top.
    std::fs::write(
        dir.path().join("manifest.json.tmp-999"),
        b"{\"format\": \"deep-me",
    )
    .unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("vectors.g2.f32"))
        .unwrap();
    f.set_len(10).unwrap();
    let mut idx = GalleryIndex::open(dir.path()).unwrap();
    assert_eq!(idx.len(), 50);
    assert_eq!(idx.generation(), 1);
    idx.add(items(&v2, 16, 500)).unwrap();
    idx.commit().unwrap();
    let names = files(dir.path());
    assert!(
        !names
            .iter()
            .any(|f| f.contains("tmp-999") || f.contains(".g1.")),
        "{names:?}"
    );
    drop(idx);
    assert_eq!(GalleryIndex::open(dir.path()).unwrap().len(), 70);
}

#[test]
fn crash_after_manifest_gives_new_state_and_next_commit_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let (mut idx, _) = small_index(dir.path(), 50);
    let (v2, _) = clustered(20, 16, 3, 0.6, 5);
    idx.add(items(&v2, 16, 500)).unwrap();
    idx.crash_at = Some(CrashPoint::BeforeCleanup);
    assert!(idx.commit().is_err());
    drop(idx);
    assert!(files(dir.path()).iter().any(|f| f == "vectors.g1.f32"));
    let mut idx = GalleryIndex::open(dir.path()).unwrap();
    assert_eq!(idx.len(), 70);
    let (v3, _) = clustered(1, 16, 1, 0.6, 6);
    idx.add(items(&v3, 16, 900)).unwrap();
    idx.commit().unwrap();
    assert!(!files(dir.path())
        .iter()
        .any(|f| f.contains(".g1.") || f.contains(".g2.")));
}

#[test]
fn wal_replays_durable_adds_and_drops_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let (mut idx, _) = small_index(dir.path(), 40);
    let (v2, _) = clustered(3, 16, 3, 0.6, 8);
    for it in items(&v2, 16, 700) {
        let r = idx.append_durable(it).unwrap();
        assert_eq!(r.added.len(), 1);
    }
    assert_eq!(idx.pending(), 0);
    assert_eq!(idx.logged(), 3);
    drop(idx); // no commit: only the WAL holds the 3 items
    let wal = dir.path().join("wal.g1.log");
    let good_len = std::fs::metadata(&wal).unwrap().len();
    // A torn record: a header promising more payload than was written.
    let mut bytes = std::fs::read(&wal).unwrap();
    let rec = bytes[..bytes.len() / 3].to_vec();
    bytes.extend_from_slice(&rec[..rec.len() - 5]);
    std::fs::write(&wal, &bytes).unwrap();

    let mut idx = GalleryIndex::open(dir.path()).unwrap();
    assert_eq!(idx.len(), 43);
    assert_eq!(idx.warnings().len(), 1, "{:?}", idx.warnings());
    assert!(idx.warnings()[0].contains("wal.g1.log"));
    assert_eq!(idx.item(42).unwrap().path, "img/00702.jpg");
    assert_eq!(idx.search(&v2[2 * 16..3 * 16], 1, 32)[0].id, 42);
    // The next durable add cuts the torn tail off before appending.
    let (v3, _) = clustered(1, 16, 1, 0.6, 9);
    idx.append_durable(items(&v3, 16, 800).pop().unwrap())
        .unwrap();
    assert!(std::fs::metadata(&wal).unwrap().len() > good_len);
    drop(idx);
    let mut idx = GalleryIndex::open(dir.path()).unwrap();
    assert!(idx.warnings().is_empty(), "{:?}", idx.warnings());
    assert_eq!(idx.len(), 44);
    idx.commit().unwrap();
    assert!(!wal.exists());
    drop(idx);
    let idx = GalleryIndex::open(dir.path()).unwrap();
    assert_eq!((idx.len(), idx.logged()), (44, 0));
}

#[test]
fn corrupt_wal_record_in_the_middle_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (mut idx, _) = small_index(dir.path(), 10);
    let (v2, _) = clustered(3, 16, 3, 0.6, 8);
    for it in items(&v2, 16, 700) {
        idx.append_durable(it).unwrap();
    }
    drop(idx);
    let wal = dir.path().join("wal.g1.log");
    let mut bytes = std::fs::read(&wal).unwrap();
    bytes[60] ^= 0xff; // inside the first record's payload
    std::fs::write(&wal, &bytes).unwrap();
    let err = GalleryIndex::open(dir.path())
        .err()
        .expect("corrupt WAL must not open")
        .to_string();
    assert!(
        err.contains("wal.g1.log") && err.contains("checksum"),
        "{err}"
    );
}

#[test]
fn corrupt_truncated_and_foreign_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (idx, _) = small_index(dir.path(), 30);
    drop(idx);
    let d = dir.path();
    let open_err = || GalleryIndex::open(d).err().expect("must fail").to_string();

    let vpath = d.join("vectors.g1.f32");
    let good = std::fs::read(&vpath).unwrap();
    let mut bad = good.clone();
    bad[100] ^= 1;
    std::fs::write(&vpath, &bad).unwrap();
    let e = open_err();
    assert!(
        e.contains("vectors.g1.f32") && e.contains("checksum"),
        "{e}"
    );
    std::fs::write(&vpath, &good[..good.len() - 4]).unwrap();
    let e = open_err();
    assert!(
        e.contains("vectors.g1.f32") && e.contains("truncated"),
        "{e}"
    );
    std::fs::write(&vpath, &good).unwrap();

    let ipath = d.join("items.g1.jsonl");
    let good_items = std::fs::read(&ipath).unwrap();
    std::fs::write(&ipath, &good_items[..good_items.len() / 2]).unwrap();
    assert!(open_err().contains("items.g1.jsonl"));
    std::fs::write(&ipath, &good_items).unwrap();

    let mpath = d.join("manifest.json");
    let good_manifest = std::fs::read_to_string(&mpath).unwrap();
    std::fs::write(
        &mpath,
        good_manifest.replace("\"format_version\": 2", "\"format_version\": 7"),
    )
    .unwrap();
    let e = open_err();
    assert!(
        e.contains("manifest.json") && e.contains("version 7"),
        "{e}"
    );
    std::fs::write(&mpath, &good_manifest[..good_manifest.len() / 2]).unwrap();
    let e = open_err();
    assert!(e.contains("manifest.json") && e.contains("JSON"), "{e}");
    // A consistent (re-checksummed) manifest with a wrong dim.
    let mut m: crate::manifest::Manifest = serde_json::from_str(&good_manifest).unwrap();
    m.dim = 17;
    m.write(&crate::store::Directory::new(d)).unwrap();
    let e = open_err();
    assert!(e.contains("dim 17"), "{e}");
    std::fs::write(&mpath, &good_manifest).unwrap();
    GalleryIndex::open(d).unwrap();

    std::fs::remove_file(&mpath).unwrap();
    let e = open_err();
    assert!(
        e.contains("no manifest.json") && e.contains("vectors.g1.f32") && e.contains("Restore"),
        "{e}"
    );
    let empty = d.join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert!(GalleryIndex::open(&empty)
        .err()
        .unwrap()
        .to_string()
        .contains("indexer build"));
    assert!(GalleryIndex::open(&d.join("nope"))
        .err()
        .unwrap()
        .to_string()
        .contains("not found"));
}

#[test]
fn a_corrupt_graph_is_rebuilt_with_a_warning_and_rewritten() {
    let dir = tempfile::tempdir().unwrap();
    let (idx, v) = small_index(dir.path(), 120);
    drop(idx);
    let g = dir.path().join("graph.g1.hnsw.graph");
    let mut bytes = std::fs::read(&g).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&g, &bytes).unwrap();
    let mut idx = GalleryIndex::open(dir.path()).unwrap();
    assert_eq!(idx.warnings().len(), 1);
    assert!(
        idx.warnings()[0].contains("graph.g1.hnsw.graph"),
        "{:?}",
        idx.warnings()
    );
    assert_eq!(idx.search(&v[..16], 1, 32)[0].id, 0);
    idx.commit().unwrap(); // rewrites the graph even though no item changed
    drop(idx);
    assert!(GalleryIndex::open(dir.path())
        .unwrap()
        .warnings()
        .is_empty());
}

#[test]
fn duplicates_by_content_hash_are_reported_not_added() {
    let dir = tempfile::tempdir().unwrap();
    let (mut idx, v) = small_index(dir.path(), 10);
    let mut batch = items(&v[..32], 16, 3); // sha of items 3 and 4: already indexed
    batch.extend(items(&v[..16], 16, 50)); // new
    batch.extend(items(&v[..16], 16, 50)); // repeated within the batch
    let r = idx.add(batch).unwrap();
    assert_eq!(r.added, vec![10]);
    assert_eq!(
        r.duplicates,
        vec![
            ("img/00003.jpg".to_string(), 3),
            ("img/00004.jpg".to_string(), 4),
            ("img/00050.jpg".to_string(), 10)
        ]
    );
    assert_eq!(idx.len(), 11);
    assert_eq!(idx.find_sha256(&format!("{:064x}", 50)), Some(10));
}

#[test]
fn invalid_input_is_rejected_without_changing_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let bad_m = HnswParams {
        m: 300,
        ..Default::default()
    };
    let e = GalleryIndex::create(&dir.path().join("a"), identity(16), 16, bad_m)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("m (max connections"), "{e}");
    assert!(!dir.path().join("a").exists());
    let e = GalleryIndex::create(
        &dir.path().join("b"),
        identity(16),
        8,
        HnswParams::default(),
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("dim"));

    let (mut idx, v) = small_index(&dir.path().join("c"), 10);
    let mut batch = items(&v[..16], 16, 20);
    batch.push(NewItem {
        path: "short.jpg".into(),
        label: None,
        sha256: "x".into(),
        vector: vec![1.0; 15],
    });
    let e = idx.add(batch).unwrap_err().to_string();
    assert!(e.contains("short.jpg") && e.contains("16-d"), "{e}");
    assert_eq!(idx.len(), 10);
    assert!(idx.search(&[1.0; 15], 3, 16).is_empty());
    assert!(idx.validate_query(&[0.0; 16]).is_err());

    let e = GalleryIndex::create(
        &dir.path().join("c"),
        identity(16),
        16,
        HnswParams::default(),
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("already holds an index"));
}

#[test]
fn an_empty_gallery_round_trips_and_searches_to_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut idx = GalleryIndex::create(dir.path(), identity(8), 8, HnswParams::default()).unwrap();
    assert!(idx.search(&[1.0; 8], 5, 16).is_empty());
    idx.commit().unwrap();
    drop(idx);
    let idx = GalleryIndex::open(dir.path()).unwrap();
    assert!(idx.is_empty());
    assert!(idx.search_exact(&[1.0; 8], 5).is_empty());
}

#[test]
fn a_second_writer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (mut first, v) = small_index(dir.path(), 10);
    let mut second = GalleryIndex::open(dir.path()).unwrap();
    let e = second
        .append_durable(items(&v[..16], 16, 99).pop().unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("LOCK") && e.contains("another process"), "{e}");
    // Once the first writer commits and goes away, the stale second one must reopen.
    first.add(items(&v[..16], 16, 77)).unwrap();
    first.commit().unwrap();
    drop(first);
    let e = second.commit().unwrap_err().to_string();
    assert!(e.contains("changed by another process"), "{e}");
}

#[test]
fn hnsw_recall_on_clustered_data() {
    let dir = tempfile::tempdir().unwrap();
    let dim = 32;
    let (v, _) = clustered(3000, dim, 30, 1.0, 3);
    let mut idx =
        GalleryIndex::create(dir.path(), identity(dim), dim, HnswParams::default()).unwrap();
    idx.add(items(&v, dim, 0)).unwrap();
    let (queries, _) = clustered(100, dim, 30, 1.0, 4);
    let mut hits = 0;
    for q in queries.chunks_exact(dim) {
        let exact: Vec<u64> = idx.search_exact(q, 10).iter().map(|h| h.id).collect();
        let approx = idx.search(q, 10, 64);
        assert!(approx.windows(2).all(|w| w[0].distance <= w[1].distance));
        hits += approx.iter().filter(|h| exact.contains(&h.id)).count();
    }
    let recall = hits as f64 / 1000.0;
    assert!(recall >= 0.95, "recall@10 {recall}");
}

/// Three items added with `append_durable` on top of a committed index of `n`: only the WAL
/// holds them.
fn index_with_logged_items(dir: &Path, n: usize) -> Vec<f32> {
    let (mut idx, _) = small_index(dir, n);
    let (v2, _) = clustered(3, 16, 3, 0.6, 8);
    for it in items(&v2, 16, 700) {
        idx.append_durable(it).unwrap();
    }
    v2
}

#[test]
fn a_missing_manifest_beside_index_files_is_an_error_and_nothing_is_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    index_with_logged_items(d, 20);
    std::fs::remove_file(d.join("manifest.json")).unwrap();
    let before = files(d);
    let err = GalleryIndex::exists(d).unwrap_err();
    assert!(matches!(err, StoreError::NoManifest { .. }), "{err}");
    let msg = err.to_string();
    for f in [
        "vectors.g1.f32",
        "items.g1.jsonl",
        "wal.g1.log",
        "manifest.json",
    ] {
        assert!(msg.contains(f), "{f} not named in: {msg}");
    }
    let err = GalleryIndex::open(d).err().unwrap();
    assert!(matches!(err, StoreError::NoManifest { .. }), "{err}");
    let err = GalleryIndex::create(d, identity(16), 16, HnswParams::default())
        .err()
        .unwrap();
    assert!(matches!(err, StoreError::NoManifest { .. }), "{err}");
    assert_eq!(files(d), before, "nothing may be deleted or added");
    // Absent, or an empty directory: no index, and one can be created there.
    assert!(!GalleryIndex::exists(&d.join("new")).unwrap());
    std::fs::create_dir(d.join("new")).unwrap();
    assert!(!GalleryIndex::exists(&d.join("new")).unwrap());
    GalleryIndex::create(&d.join("new"), identity(16), 16, HnswParams::default()).unwrap();
    assert!(GalleryIndex::exists(&d.join("new")).unwrap());
}

#[test]
fn a_deleted_wal_is_named_even_when_it_held_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    index_with_logged_items(d, 10);
    std::fs::remove_file(d.join("wal.g1.log")).unwrap();
    let err = GalleryIndex::open(d).err().unwrap();
    assert!(matches!(err, StoreError::Missing { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("wal.g1.log") && msg.contains("not found") && msg.contains("ids from 10"),
        "{msg}"
    );
    // A commit folds the log in and starts an empty one, which is required all the same.
    let d2 = d.join("b");
    let (idx, _) = small_index(&d2, 5);
    drop(idx);
    std::fs::remove_file(d2.join("wal.g1.log")).unwrap();
    assert!(GalleryIndex::open(&d2)
        .err()
        .unwrap()
        .to_string()
        .contains("wal.g1.log"));
}

#[test]
fn a_flipped_byte_in_the_last_wal_record_is_corruption_not_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    index_with_logged_items(d, 10);
    let wal = d.join("wal.g1.log");
    let mut bytes = std::fs::read(&wal).unwrap();
    // Inside the last record's vector: 32 bytes of commit record, some padding, then floats.
    let at = bytes.len() - 32 - 40;
    bytes[at] ^= 0x01;
    std::fs::write(&wal, &bytes).unwrap();
    let msg = GalleryIndex::open(d).err().unwrap().to_string();
    assert!(
        msg.contains("wal.g1.log") && msg.contains("acknowledged") && !msg.contains("never"),
        "{msg}"
    );
}

#[test]
fn a_flipped_byte_in_the_manifest_is_reported_as_the_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    small_index(d, 10);
    let mpath = d.join("manifest.json");
    let text = std::fs::read_to_string(&mpath).unwrap();
    let m: crate::manifest::Manifest = serde_json::from_str(&text).unwrap();
    // A byte of the vectors file's sha256, as stored in the manifest.
    let sha = &m.vectors.sha256;
    let at = text.find(sha.as_str()).unwrap() + 10;
    let mut bytes = text.into_bytes();
    bytes[at] = if bytes[at] == b'0' { b'1' } else { b'0' };
    std::fs::write(&mpath, &bytes).unwrap();
    let msg = GalleryIndex::open(d).err().unwrap().to_string();
    assert!(
        msg.contains("manifest.json")
            && msg.contains("own checksum")
            && !msg.contains("vectors.g1"),
        "{msg}"
    );
}

#[test]
fn a_failed_create_leaves_nothing_and_a_rerun_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("out");
    let (v, _) = clustered(20, 16, 3, 0.6, 2);
    // Stands for `indexer build` killed after its first commit: the error stops it before
    // the rename.
    let r = GalleryIndex::create_with(&target, identity(16), 16, HnswParams::default(), |idx| {
        idx.add(items(&v, 16, 0))?;
        idx.commit()?;
        Err(StoreError::Invalid("killed".into()))
    });
    assert!(r.is_err());
    assert!(!target.exists(), "no index, not even an empty one");
    let idx = GalleryIndex::create_with(&target, identity(16), 16, HnswParams::default(), |idx| {
        idx.add(items(&v, 16, 0)).map(|_| ())
    })
    .unwrap();
    assert_eq!(idx.dir(), target);
    drop(idx);
    assert_eq!(GalleryIndex::open(&target).unwrap().len(), 20);
    let leftovers: Vec<String> = files(dir.path())
        .into_iter()
        .filter(|f| f != "out")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let e = GalleryIndex::create(&target, identity(16), 16, HnswParams::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("already holds an index"), "{e}");
}

#[test]
fn a_version_1_index_opens_and_the_first_write_upgrades_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (idx, v) = small_index(d, 12);
    drop(idx);
    // Rewrite as version 1: no manifest checksum; a headerless log of DMW1 records.
    let mpath = d.join("manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&mpath).unwrap()).unwrap();
    m["format_version"] = 1.into();
    m.as_object_mut().unwrap().remove("manifest_sha256");
    std::fs::write(&mpath, serde_json::to_string_pretty(&m).unwrap()).unwrap();
    let meta = ItemMeta {
        id: 12,
        path: "v1.jpg".into(),
        label: None,
        sha256: "v1".into(),
    };
    std::fs::write(d.join("wal.g1.log"), crate::wal::encode_v1(&meta, &v[..16])).unwrap();

    let mut idx = GalleryIndex::open(d).unwrap();
    assert_eq!((idx.len(), idx.logged()), (13, 1));
    assert_eq!(idx.item(12).unwrap().path, "v1.jpg");
    idx.append_durable(items(&v[16..32], 16, 900).pop().unwrap())
        .unwrap();
    drop(idx);
    let text = std::fs::read_to_string(&mpath).unwrap();
    assert!(text.contains("\"format_version\": 2") && text.contains("manifest_sha256"));
    let idx = GalleryIndex::open(d).unwrap();
    assert_eq!((idx.len(), idx.generation()), (14, 2));
    assert_eq!(idx.item(12).unwrap().path, "v1.jpg");
    assert!(idx.warnings().is_empty(), "{:?}", idx.warnings());
}

#[test]
fn lock_for_writing_refuses_a_second_writer_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (idx, _) = small_index(dir.path(), 5);
    let mut second = GalleryIndex::open(dir.path()).unwrap();
    let err = second.lock_for_writing().unwrap_err();
    assert!(matches!(err, StoreError::Locked { .. }), "{err}");
    drop(idx);
    second.lock_for_writing().unwrap();
}

#[test]
fn salvaging_a_damaged_or_missing_wal_keeps_what_came_before_and_sets_the_log_aside() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    index_with_logged_items(d, 10);
    let wal = d.join("wal.g1.log");
    let mut bytes = std::fs::read(&wal).unwrap();
    let at = bytes.len() - 32 - 40; // inside the third (last) record
    bytes[at] ^= 0x01;
    std::fs::write(&wal, &bytes).unwrap();
    assert!(GalleryIndex::open(d).is_err());
    let mut idx = GalleryIndex::open_salvaging_wal(d).unwrap();
    assert_eq!((idx.len(), idx.logged()), (12, 2));
    assert!(
        idx.warnings()[0].contains("kept the 2 record(s)"),
        "{:?}",
        idx.warnings()
    );
    idx.lock_for_writing().unwrap();
    idx.commit().unwrap();
    drop(idx);
    let names = files(d);
    assert!(
        names.iter().any(|f| f.starts_with("wal.g1.log.damaged-")),
        "{names:?}"
    );
    let idx = GalleryIndex::open(d).unwrap();
    assert_eq!((idx.len(), idx.generation()), (12, 2));
    assert!(idx.warnings().is_empty());
    drop(idx);

    // A missing log: the committed items only.
    std::fs::remove_file(d.join("wal.g2.log")).unwrap();
    let mut idx = GalleryIndex::open_salvaging_wal(d).unwrap();
    assert_eq!(idx.len(), 12);
    idx.commit().unwrap();
    drop(idx);
    assert_eq!(GalleryIndex::open(d).unwrap().generation(), 3);
}
