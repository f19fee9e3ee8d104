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
            metadata: None,
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
    for (a, b) in idx.vectors().iter_from(0).flatten().zip(&v) {
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
        good_manifest.replace("\"format_version\": 4", "\"format_version\": 7"),
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
    let g = dir.path().join("graph.g1.layers");
    let mut bytes = std::fs::read(&g).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&g, &bytes).unwrap();
    let mut idx = GalleryIndex::open(dir.path()).unwrap();
    assert_eq!(idx.warnings().len(), 1);
    assert!(
        idx.warnings()[0].contains("graph.g1.layers"),
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
        metadata: None,
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
        metadata: None,
        deleted: false,
    };
    std::fs::write(d.join("wal.g1.log"), crate::wal::encode_v1(&meta, &v[..16])).unwrap();

    let mut idx = GalleryIndex::open(d).unwrap();
    assert_eq!((idx.len(), idx.logged()), (13, 1));
    assert_eq!(idx.item(12).unwrap().path, "v1.jpg");
    idx.append_durable(items(&v[16..32], 16, 900).pop().unwrap())
        .unwrap();
    drop(idx);
    let text = std::fs::read_to_string(&mpath).unwrap();
    assert!(text.contains("\"format_version\": 4") && text.contains("manifest_sha256"));
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

fn with_meta(mut it: NewItem, meta: serde_json::Value) -> NewItem {
    it.metadata = meta.as_object().cloned();
    it
}

#[test]
fn deletes_are_durable_excluded_at_once_and_compacted_by_the_commit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (mut idx, v) = small_index(d, 200);
    let q = |i: usize| v[i * 16..(i + 1) * 16].to_vec();
    assert_eq!(idx.search(&q(5), 1, 64)[0].id, 5);
    idx.delete_durable(&[5, 7]).unwrap();
    assert!(idx.item(5).is_none() && idx.item(6).is_some());
    assert_eq!((idx.len(), idx.live_len()), (200, 198));
    for i in [5, 7] {
        let hits = idx.search(&q(i), 10, 64);
        assert!(hits.iter().all(|h| h.id != 5 && h.id != 7), "{hits:?}");
        assert_eq!(hits.len(), 10);
        assert!(idx
            .search_exact(&q(i), 10)
            .iter()
            .all(|h| h.id != 5 && h.id != 7));
    }
    // Unknown and already-deleted ids are refused and nothing changes.
    for bad in [[5u64, 8], [1000, 8]] {
        assert!(matches!(
            idx.delete_durable(&bad),
            Err(StoreError::NoSuchItem(_))
        ));
    }
    assert!(idx.item(8).is_some());
    let sha5 = idx.items()[5].sha256.clone();
    assert!(idx.was_deleted(&sha5) && idx.find_sha256(&sha5).is_none());
    // Dropped without a commit (as by kill -9): the WAL brings the delete back.
    drop(idx);
    let mut idx = GalleryIndex::open(d).unwrap();
    assert!(idx.item(5).is_none() && idx.item(7).is_none());
    assert_eq!(idx.live_len(), 198);
    assert!(idx.search(&q(5), 10, 64).iter().all(|h| h.id != 5));
    assert!(idx.was_deleted(&sha5));
    // The commit writes the tombstone without label, path or metadata.
    idx.commit().unwrap();
    let items_file =
        std::fs::read_to_string(d.join(format!("items.g{}.jsonl", idx.generation()))).unwrap();
    let line5 = items_file.lines().nth(5).unwrap();
    assert!(
        line5.contains("\"deleted\":true") && !line5.contains("class"),
        "{line5}"
    );
    drop(idx);
    let mut idx = GalleryIndex::open(d).unwrap();
    assert_eq!((idx.live_len(), idx.deleted_len()), (198, 2));
    // The same content added again is a new item with a new id.
    let mut again = items(&q(5), 16, 5).pop().unwrap();
    again.path = "again.jpg".into();
    let report = idx.append_durable(again).unwrap();
    assert_eq!(report.added, vec![200]);
    assert!(!idx.was_deleted(&sha5));
    assert_eq!(idx.search(&q(5), 1, 64)[0].id, 200);
}

#[test]
fn metadata_is_stored_in_the_wal_and_the_commit_and_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (mut idx, v) = small_index(d, 20);
    let meta = serde_json::json!({"price": 12.5, "tags": ["a", "b"]});
    let it = with_meta(items(&v[..16], 16, 500).pop().unwrap(), meta.clone());
    idx.append_durable(it).unwrap();
    let big = serde_json::json!({"x": "y".repeat(filter::MAX_METADATA_BYTES)});
    let too_big = with_meta(items(&v[16..32], 16, 501).pop().unwrap(), big);
    let e = idx.append_durable(too_big).unwrap_err().to_string();
    assert!(e.contains("limit") && e.contains("img/00501.jpg"), "{e}");
    assert_eq!(idx.len(), 21, "a refused add changes nothing");
    drop(idx);
    let mut idx = GalleryIndex::open(d).unwrap();
    assert_eq!(idx.item(20).unwrap().metadata.as_ref(), meta.as_object());
    idx.commit().unwrap();
    drop(idx);
    let idx = GalleryIndex::open(d).unwrap();
    assert_eq!(idx.item(20).unwrap().metadata.as_ref(), meta.as_object());
    assert_eq!(idx.logged(), 0);
}

#[test]
fn a_version_2_index_opens_and_the_first_write_upgrades_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (idx, v) = small_index(d, 12);
    drop(idx);
    // A version-2 manifest is this one with its version (and so its checksum) changed.
    let mpath = d.join("manifest.json");
    let mut m = crate::manifest::Manifest::read(d).unwrap();
    m.format_version = 2;
    m.manifest_sha256 = None;
    let mut value = serde_json::to_value(&m).unwrap();
    let mut canon = value.clone();
    canon.as_object_mut().unwrap().remove("manifest_sha256");
    value["manifest_sha256"] =
        crate::store::sha256_hex(&serde_json::to_vec(&canon).unwrap()).into();
    std::fs::write(&mpath, serde_json::to_string_pretty(&value).unwrap()).unwrap();
    let mut idx = GalleryIndex::open(d).unwrap();
    assert_eq!((idx.format_version(), idx.live_len()), (2, 12));
    idx.delete_durable(&[3]).unwrap();
    assert_eq!(idx.format_version(), crate::manifest::FORMAT_VERSION);
    drop(idx);
    let idx = GalleryIndex::open(d).unwrap();
    assert!(idx.item(3).is_none());
    assert_eq!(idx.search(&v[3 * 16..4 * 16], 1, 32).len(), 1);
}

/// 10,000 clustered items, label `l{i % 100}` (1 % each), a price `i % 50`, `even` and
/// `rare` (every 1,500th).
fn filtered_index(dir: &Path) -> (GalleryIndex, Vec<f32>) {
    let dim = 16;
    let n = 10_000;
    let (v, _) = clustered(n, dim, 20, 0.6, 3);
    let mut idx = GalleryIndex::create(dir, identity(dim), dim, HnswParams::default()).unwrap();
    let its: Vec<NewItem> = items(&v, dim, 0)
        .into_iter()
        .enumerate()
        .map(|(i, mut it)| {
            it.label = Some(format!("l{}", i % 100));
            with_meta(
                it,
                serde_json::json!({"price": i % 50, "even": i % 2 == 0, "rare": i % 1500 == 0}),
            )
        })
        .collect();
    idx.add(its).unwrap();
    idx.commit().unwrap();
    (idx, v)
}

#[test]
fn filtered_search_keeps_recall_through_both_plans() {
    let dir = tempfile::tempdir().unwrap();
    let (mut idx, v) = filtered_index(dir.path());
    idx.delete_durable(&[0, 2, 4]).unwrap();
    use gallery::FilterPlan::{Exact, FilteredGraph};
    // (filter, plan chosen with 10,000 items and EXACT_FILTER_MAX 7,500)
    let cases = [
        (r#"{"label": "l7"}"#, Exact),
        (r#"{"label": ["l1", "l2", "l3"]}"#, Exact),
        (r#"{"even": true, "price": {"lt": 10}}"#, Exact),
        (r#"{"price": {"gte": 5}}"#, FilteredGraph),
    ];
    for (text, plan) in cases {
        let f = Filter::parse(text).unwrap();
        assert_eq!(idx.plan(Some(&f)), plan, "{text}");
    }
    // Every filter through both plans, whichever the planner picks.
    for ((text, _), plan) in cases.iter().flat_map(|c| [(c, Exact), (c, FilteredGraph)]) {
        let f = Filter::parse(text).unwrap();
        let (mut found, mut total) = (0usize, 0usize);
        for qi in (0..10_000).step_by(250) {
            let q = &v[qi * 16..(qi + 1) * 16];
            let exact = idx.search_exact_filtered(q, 10, Some(&f));
            let got = idx.search_with_plan(q, 10, 64, Some(&f), plan).0;
            assert!(
                got.iter().all(|h| f.matches(&idx.items()[h.id as usize])),
                "{text}"
            );
            assert_eq!(got.len(), exact.len());
            total += exact.len();
            found += got
                .iter()
                .filter(|h| exact.iter().any(|e| e.id == h.id))
                .count();
        }
        let recall = found as f64 / total as f64;
        assert!(recall >= 0.98, "{text} {plan:?}: recall {recall}");
    }
    // A filter matching fewer than k items returns all of them.
    let few = Filter::parse(r#"{"rare": true}"#).unwrap();
    for plan in [Exact, FilteredGraph] {
        let hits = idx.search_with_plan(&v[..16], 10, 64, Some(&few), plan).0;
        let mut ids: Vec<u64> = hits.iter().map(|h| h.id).collect();
        ids.sort();
        assert_eq!(
            ids,
            vec![1500, 3000, 4500, 6000, 7500, 9000],
            "id 0 is deleted"
        );
    }
}

#[test]
fn pages_list_live_matching_items_in_id_order() {
    let dir = tempfile::tempdir().unwrap();
    let (mut idx, _) = filtered_index(dir.path());
    idx.delete_durable(&[7]).unwrap();
    let f = Filter::parse(r#"{"label": "l7"}"#).unwrap();
    let p = idx.page(0, 3, Some(&f));
    assert_eq!(p.total, 99);
    let ids: Vec<u64> = p.items.iter().map(|i| i.id).collect();
    assert_eq!(ids, vec![107, 207, 307]);
    let last = idx.page(98, 10, Some(&f));
    assert_eq!(last.items.len(), 1);
    assert_eq!(last.items[0].id, 9907);
    let all = idx.page(9990, 100, None);
    assert_eq!((all.total, all.items.len()), (9999, 9));
}

/// Rewrites the manifest in `d` through `change`, with a valid checksum.
fn rewrite_manifest(d: &Path, change: impl FnOnce(&mut crate::manifest::Manifest)) {
    let mut m = crate::manifest::Manifest::read(d).unwrap();
    change(&mut m);
    m.manifest_sha256 = None;
    let mut value = serde_json::to_value(&m).unwrap();
    let canon = value.clone();
    value["manifest_sha256"] =
        crate::store::sha256_hex(&serde_json::to_vec(&canon).unwrap()).into();
    std::fs::write(
        d.join("manifest.json"),
        serde_json::to_string_pretty(&value).unwrap(),
    )
    .unwrap();
}

#[test]
fn a_version_3_index_with_an_hnsw_rs_graph_opens_searches_and_grows() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (idx, _) = small_index(d, 150);
    let (v, _) = clustered(160, 16, 10, 0.6, 1); // the same first 150 rows, 10 more
    let params = *idx.params();
    drop(idx);
    // What version 3 wrote: the hnsw_rs dump named in `graph`, no layered graph file.
    let store = crate::store::Directory::new(d);
    let g =
        crate::graph::Graph::build_hnsw_rs(&params, crate::vectors::Rows::new(&v[..150 * 16], 16))
            .unwrap();
    let Some(crate::graph::StoredGraph::HnswRs(files)) = g.write(&store, "graph.g1").unwrap()
    else {
        panic!("an hnsw_rs graph is written as a dump")
    };
    std::fs::remove_file(d.join("graph.g1.layers")).unwrap();
    rewrite_manifest(d, |m| {
        m.format_version = 3;
        m.graph = Some(files);
        m.layered_graph = None;
    });
    let mut idx = GalleryIndex::open(d).unwrap();
    assert!(idx.warnings().is_empty(), "{:?}", idx.warnings());
    assert_eq!(idx.format_version(), 3);
    assert!(
        idx.search_hnsw_rs(&v[..16], 1, 16).is_some(),
        "still the hnsw_rs graph"
    );
    assert_eq!(idx.search(&v[7 * 16..8 * 16], 1, 32)[0].id, 7);
    idx.add(items(&v[150 * 16..160 * 16], 16, 150)).unwrap();
    idx.commit().unwrap();
    drop(idx);
    let idx = GalleryIndex::open(d).unwrap();
    assert_eq!(
        (idx.len(), idx.format_version()),
        (160, crate::manifest::FORMAT_VERSION)
    );
    assert!(idx.warnings().is_empty(), "{:?}", idx.warnings());
    assert_eq!(idx.search(&v[155 * 16..156 * 16], 1, 32)[0].id, 155);
}

#[test]
fn an_int8_index_keeps_its_codes_checksummed_and_answers_exactly_ranked() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("q");
    let (v, _) = clustered(420, 16, 6, 1.0, 8);
    let params = HnswParams {
        quantize: crate::params::Quantize::Int8,
        ..Default::default()
    };
    let mut idx = GalleryIndex::create(&d, identity(16), 16, params).unwrap();
    idx.add(items(&v[..400 * 16], 16, 0)).unwrap();
    idx.commit().unwrap();
    drop(idx);
    let codes = d.join("codes.g1.int8");
    assert!(
        files(&d).contains(&"codes.g1.int8".to_string()),
        "{:?}",
        files(&d)
    );
    let mut idx = GalleryIndex::open(&d).unwrap();
    assert!(idx.warnings().is_empty(), "{:?}", idx.warnings());
    assert_eq!(idx.params().quantize, crate::params::Quantize::Int8);
    // A WAL-logged row gets its codes at open too.
    idx.append_durable(items(&v[400 * 16..401 * 16], 16, 400).pop().unwrap())
        .unwrap();
    drop(idx);
    let idx = GalleryIndex::open(&d).unwrap();
    let mut agree = 0;
    for i in (0..401).step_by(20) {
        let q = &v[i * 16..(i + 1) * 16];
        let exact = idx.search_exact(q, 5);
        let got = idx.search(q, 5, 64);
        assert_eq!(got[0].id, i as u64);
        // Re-ranked by the exact distance: the distances are the f32 ones.
        for h in &got {
            let e = crate::distance::squared_l2(q, idx.vector(h.id).unwrap()).sqrt();
            assert!((h.distance - e).abs() < 1e-5);
        }
        agree += usize::from(got.iter().map(|h| h.id).eq(exact.iter().map(|h| h.id)));
    }
    assert!(
        agree >= 19,
        "{agree} of 21 top-5 lists equal the exact ones"
    );
    drop(idx);
    // A damaged codes file is re-encoded from the vectors with a warning, then rewritten.
    let mut bytes = std::fs::read(&codes).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x21;
    std::fs::write(&codes, &bytes).unwrap();
    let mut idx = GalleryIndex::open(&d).unwrap();
    assert_eq!(idx.warnings().len(), 1);
    assert!(
        idx.warnings()[0].contains("codes.g1.int8"),
        "{:?}",
        idx.warnings()
    );
    assert_eq!(idx.search(&v[..16], 1, 32)[0].id, 0);
    idx.commit().unwrap();
    drop(idx);
    assert!(GalleryIndex::open(&d).unwrap().warnings().is_empty());
}

/// An int8 index of the first `n` rows of `v` built the streaming way and committed.
fn streamed_int8_index(d: &Path, v: &[f32], n: usize) -> GalleryIndex {
    let params = HnswParams {
        quantize: crate::params::Quantize::Int8,
        ..Default::default()
    };
    let mut idx = GalleryIndex::create(d, identity(16), 16, params).unwrap();
    idx.add_streamed(items(&v[..n * 16], 16, 0)).unwrap();
    idx.commit().unwrap();
    idx
}

#[test]
fn an_opened_index_reads_vectors_codes_and_graph_from_maps() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("m");
    let (v, _) = clustered(320, 16, 6, 1.0, 3);
    let idx = streamed_int8_index(&d, &v, 300);
    // The streamed vectors file is the generation's: written once, not rewritten.
    assert_eq!(
        files(&d),
        [
            "LOCK",
            "codes.g1.int8",
            "graph.g1.layers",
            "items.g1.jsonl",
            "manifest.json",
            "vectors.g1.f32",
            "wal.g1.log"
        ]
    );
    assert_eq!((idx.heap_rows(), idx.graph_is_mapped()), (0, true));
    drop(idx);
    let mut idx = GalleryIndex::open(&d).unwrap();
    assert!(idx.warnings().is_empty(), "{:?}", idx.warnings());
    assert_eq!(
        (idx.len(), idx.heap_rows(), idx.graph_is_mapped()),
        (300, 0, true)
    );
    for i in (0..300).step_by(30) {
        let q = &v[i * 16..(i + 1) * 16];
        assert_eq!(idx.search(q, 1, 32)[0].id, i as u64);
        let stored = idx.vector(i as u64).unwrap();
        let norm = q.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!(stored
            .iter()
            .zip(q)
            .all(|(s, x)| (s - x / norm).abs() < 1e-6));
    }
    // New rows live on the heap (and link into the mapped graph) until the commit, which
    // maps the new generation instead.
    idx.append_durable(items(&v[300 * 16..301 * 16], 16, 300).pop().unwrap())
        .unwrap();
    assert_eq!(idx.heap_rows(), 1);
    assert_eq!(idx.search(&v[300 * 16..301 * 16], 1, 32)[0].id, 300);
    idx.add(items(&v[301 * 16..320 * 16], 16, 301)).unwrap();
    idx.commit().unwrap();
    assert_eq!((idx.heap_rows(), idx.graph_is_mapped()), (0, true));
    for i in [0usize, 300, 310, 319] {
        assert_eq!(idx.search(&v[i * 16..(i + 1) * 16], 1, 32)[0].id, i as u64);
    }
    drop(idx);
    assert_eq!(GalleryIndex::open(&d).unwrap().len(), 320);
}

#[test]
fn a_truncated_or_flipped_mapped_file_is_an_error_or_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("m");
    let (v, _) = clustered(200, 16, 6, 1.0, 4);
    drop(streamed_int8_index(&d, &v, 200));
    let truncate = |name: &str| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(d.join(name))
            .unwrap();
        let len = f.metadata().unwrap().len();
        f.set_len(len - 3).unwrap();
    };
    let flip = |name: &str| {
        let p = d.join(name);
        let mut b = std::fs::read(&p).unwrap();
        let at = b.len() * 2 / 3;
        b[at] ^= 0x10;
        std::fs::write(&p, &b).unwrap();
    };
    let keep = |name: &str| std::fs::read(d.join(name)).unwrap();

    // The vectors are the source of truth: damage is a typed error naming the file.
    let good = keep("vectors.g1.f32");
    for (damage, what) in [
        (&truncate as &dyn Fn(&str), "truncated"),
        (&flip, "checksum"),
    ] {
        damage("vectors.g1.f32");
        let e = GalleryIndex::open(&d).err().expect("must fail");
        assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("vectors.g1.f32") && msg.contains(what),
            "{msg}"
        );
        std::fs::write(d.join("vectors.g1.f32"), &good).unwrap();
    }

    // Codes and graph are derived: rebuilt from the vectors with a warning naming the
    // file, searched meanwhile, rewritten by the next commit.
    for name in ["codes.g1.int8", "graph.g1.layers"] {
        for damage in [&truncate as &dyn Fn(&str), &flip] {
            let gen = GalleryIndex::open(&d).unwrap().generation();
            let name = name.replace("g1", &format!("g{gen}"));
            damage(&name);
            let mut idx = GalleryIndex::open(&d).unwrap();
            assert_eq!(idx.warnings().len(), 1, "{:?}", idx.warnings());
            assert!(idx.warnings()[0].contains(&name), "{:?}", idx.warnings());
            for i in [0usize, 77, 199] {
                assert_eq!(idx.search(&v[i * 16..(i + 1) * 16], 1, 32)[0].id, i as u64);
            }
            idx.commit().unwrap();
            drop(idx);
            let idx = GalleryIndex::open(&d).unwrap();
            assert!(idx.warnings().is_empty(), "{:?}", idx.warnings());
            assert!(idx.graph_is_mapped());
        }
    }
}

#[test]
fn a_reader_keeps_its_mapped_generation_while_a_writer_replaces_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("m");
    let (v, _) = clustered(260, 16, 6, 1.0, 5);
    drop(streamed_int8_index(&d, &v, 200));
    let reader = GalleryIndex::open(&d).unwrap();
    let before: Vec<Vec<Hit>> = (0..200)
        .step_by(25)
        .map(|i| reader.search(&v[i * 16..(i + 1) * 16], 5, 32))
        .collect();
    // Two commits: generation 1's files are unlinked while the reader maps them.
    let mut writer = GalleryIndex::open(&d).unwrap();
    writer.add(items(&v[200 * 16..230 * 16], 16, 200)).unwrap();
    writer.commit().unwrap();
    writer.add(items(&v[230 * 16..260 * 16], 16, 230)).unwrap();
    writer.commit().unwrap();
    drop(writer);
    assert!(!files(&d).contains(&"vectors.g1.f32".to_string()));
    let after: Vec<Vec<Hit>> = (0..200)
        .step_by(25)
        .map(|i| reader.search(&v[i * 16..(i + 1) * 16], 5, 32))
        .collect();
    assert_eq!(before, after);
    assert_eq!(reader.len(), 200);
    assert_eq!(GalleryIndex::open(&d).unwrap().len(), 260);
}

#[test]
fn a_streamed_add_with_an_invalid_item_leaves_the_index_empty() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("m");
    let (v, _) = clustered(50, 16, 6, 1.0, 6);
    let mut idx = GalleryIndex::create(&d, identity(16), 16, HnswParams::default()).unwrap();
    let mut bad = items(&v, 16, 0);
    bad[30].vector.pop();
    let e = idx.add_streamed(bad).unwrap_err();
    assert!(matches!(e, StoreError::Invalid(_)), "{e}");
    assert!(e.to_string().contains("img/00030.jpg"), "{e}");
    assert_eq!((idx.len(), idx.pending()), (0, 0));
    assert!(!files(&d).contains(&"vectors.g1.f32".to_string()));
    // Duplicates are reported, the rest added.
    let mut good = items(&v, 16, 0);
    good.push(good[3].clone());
    let report = idx.add_streamed(good).unwrap();
    assert_eq!((report.added.len(), report.duplicates.len()), (50, 1));
    idx.commit().unwrap();
    drop(idx);
    let idx = GalleryIndex::open(&d).unwrap();
    assert_eq!(idx.len(), 50);
    assert_eq!(idx.search(&v[20 * 16..21 * 16], 1, 32)[0].id, 20);
}
