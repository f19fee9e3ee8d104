//! Dataset loaders and the batch loader, on generated trees and the shared CUB subset.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::test_util::{shared_dir, write_png};
use super::*;
use crate::preprocess::Preprocess;

fn load(kind: DatasetKind, root: &Path, split: &str) -> Result<Dataset> {
    load_dataset(kind, root, &split.parse().unwrap())
}

/// Per-label image counts.
fn counts(ds: &Dataset) -> Vec<usize> {
    let mut c = vec![0; ds.num_classes()];
    for s in &ds.samples {
        c[s.label as usize] += 1;
    }
    c
}

fn cub100() -> Option<PathBuf> {
    Some(shared_dir()?.join("data/cub100/CUB_200_2011"))
}

#[test]
fn cub100_class_split() {
    let Some(root) = cub100() else { return };
    let train = load(DatasetKind::Cub, &root, "train").unwrap();
    let test = load(DatasetKind::Cub, &root, "test").unwrap();
    let all = load(DatasetKind::Cub, &root, "all").unwrap();
    // Classes 1–50 train, 51–100 test (not the official per-image 2,999/2,903 split).
    assert_eq!((train.len(), train.num_classes()), (2949, 50));
    assert_eq!((test.len(), test.num_classes()), (2953, 50));
    assert_eq!((all.len(), all.num_classes()), (5902, 100));
    assert_eq!(train.class_names[0], "001.Black_footed_Albatross");
    assert_eq!(test.class_names[0], "051.Red_breasted_Merganser");
    assert!(counts(&train).iter().all(|&c| c > 0));
    assert!(test.samples.iter().all(|s| s.path.starts_with(root.join("images"))));
    assert!(test.samples[0].path.to_string_lossy().contains("051."), "{:?}", test.samples[0].path);
    assert_eq!(test.samples[0].origin.file, root.join("images.txt"));
    // The parent folder of CUB_200_2011 works too, and explicit class ranges.
    let r = load(DatasetKind::Cub, root.parent().unwrap(), "classes=51-100").unwrap();
    assert_eq!(r.samples, test.samples);
    let one = load(DatasetKind::Cub, &root, "classes=3").unwrap();
    assert_eq!(one.class_names, vec!["003.Parakeet_Auklet".to_string()]);
    let e = load(DatasetKind::Cub, &root, "classes=90-101").unwrap_err().to_string();
    assert!(e.contains("only 100 classes"), "{e}");
}

/// A CUB-layout tree in a temp dir: `classes` classes, 2 images each.
fn tiny_cub(dir: &Path, classes: usize) {
    let mut c = String::new();
    let (mut imgs, mut labels) = (String::new(), String::new());
    for k in 1..=classes {
        c += &format!("{k} {k:03}.Bird_{k}\n");
        for j in 0..2 {
            let id = (k - 1) * 2 + j + 1;
            imgs += &format!("{id} {k:03}.Bird_{k}/img_{j}.png\n");
            labels += &format!("{id} {k}\n");
        }
    }
    std::fs::write(dir.join("classes.txt"), c).unwrap();
    std::fs::write(dir.join("images.txt"), imgs).unwrap();
    std::fs::write(dir.join("image_class_labels.txt"), labels).unwrap();
}

#[test]
fn cub_annotation_errors_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let e = load(DatasetKind::Cub, dir.path(), "train").unwrap_err().to_string();
    assert!(e.contains("classes.txt") && e.contains("not found") && e.contains("CUB-200-2011 layout"), "{e}");
    tiny_cub(dir.path(), 4);
    assert_eq!(load(DatasetKind::Cub, dir.path(), "train").unwrap().len(), 4);
    std::fs::write(dir.path().join("image_class_labels.txt"), "1 1\n2 1\n3 9\n").unwrap();
    let e = load(DatasetKind::Cub, dir.path(), "train").unwrap_err().to_string();
    assert!(e.contains("image_class_labels.txt") && e.contains("line 3") && e.contains("class id 9"), "{e}");
    std::fs::write(dir.path().join("image_class_labels.txt"), "1 1\n2 x\n").unwrap();
    let e = load(DatasetKind::Cub, dir.path(), "train").unwrap_err().to_string();
    assert!(e.contains("line 2") && e.contains("'x'"), "{e}");
    std::fs::write(dir.path().join("image_class_labels.txt"), "1 1\n").unwrap();
    let e = load(DatasetKind::Cub, dir.path(), "train").unwrap_err().to_string();
    assert!(e.contains("images.txt") && e.contains("line 2") && e.contains("no class"), "{e}");
}

#[test]
fn folder_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for (class, files) in [
        ("zebra", vec!["a.png", "b.PNG", "nested/c.png"]),
        ("ant", vec!["x.png", ".hidden.png", "notes.txt"]),
        ("cat", vec!["1.png"]),
        ("dog", vec!["1.png", "2.png"]),
        (".git", vec!["x.png"]),
        ("empty", vec!["readme.txt"]),
    ] {
        for f in files {
            let p = root.join(class).join(f);
            if f.ends_with(".txt") {
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(p, "x").unwrap();
            } else {
                write_png(&p, 8, 8);
            }
        }
    }
    let all = load(DatasetKind::Folder, root, "all").unwrap();
    assert_eq!(all.class_names, vec!["ant", "cat", "dog", "zebra"]);
    assert_eq!(counts(&all), vec![1, 1, 2, 3]);
    let names: Vec<String> =
        all.samples.iter().map(|s| s.path.strip_prefix(root).unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(names, vec!["ant/x.png", "cat/1.png", "dog/1.png", "dog/2.png", "zebra/a.png", "zebra/b.PNG", "zebra/nested/c.png"]);
    assert_eq!(all.samples[0].origin, Origin { file: root.join("ant"), line: None });
    let train = load(DatasetKind::Folder, root, "train").unwrap();
    assert_eq!(train.class_names, vec!["ant", "cat"]);
    assert_eq!(train.labels(), vec![0, 1]);
    let test = load(DatasetKind::Folder, root, "test").unwrap();
    assert_eq!(test.class_names, vec!["dog", "zebra"]);
    assert_eq!(test.labels(), vec![0, 0, 1, 1, 1]);
    let mid = load(DatasetKind::Folder, root, "classes=2-3").unwrap();
    assert_eq!(mid.class_names, vec!["cat", "dog"]);

    let e = load(DatasetKind::Folder, &root.join("nowhere"), "all").unwrap_err().to_string();
    assert!(e.contains("nowhere") && e.contains("one subfolder per class"), "{e}");
}

#[test]
fn list_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("lists/train list.txt");
    std::fs::create_dir_all(list.parent().unwrap()).unwrap();
    std::fs::write(
        &list,
        "# path label\n\nimgs/a.png 10\nimgs/with space.png 2\n  imgs/c.png\t10  \nimgs/d.png 7\r\nimgs/e.png 2\n",
    )
    .unwrap();
    let all = load(DatasetKind::List, &list, "all").unwrap();
    // Integer labels sort numerically: 2, 7, 10.
    assert_eq!(all.class_names, vec!["2", "7", "10"]);
    assert_eq!(all.labels(), vec![2, 0, 2, 1, 0]);
    assert_eq!(all.samples[1].path, dir.path().join("lists/imgs/with space.png"));
    assert_eq!(all.samples[1].origin, Origin { file: list.clone(), line: Some(4) });
    let train = load(DatasetKind::List, &list, "train").unwrap();
    assert_eq!(train.class_names, vec!["2"]);
    let test = load(DatasetKind::List, &list, "test").unwrap();
    assert_eq!(test.class_names, vec!["7", "10"]);
    assert_eq!(test.len(), 3);

    std::fs::write(&list, "a.png cat\nb.png ant\nlonely\n").unwrap();
    let e = load(DatasetKind::List, &list, "all").unwrap_err().to_string();
    assert!(e.contains("train list.txt") && e.contains("line 3") && e.contains("'lonely'"), "{e}");
    std::fs::write(&list, "a.png cat\nb.png ant\n").unwrap();
    assert_eq!(load(DatasetKind::List, &list, "all").unwrap().class_names, vec!["ant", "cat"]);
}

#[test]
fn sop_lists() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::write(
        root.join("Ebay_train.txt"),
        "image_id class_id super_class_id path\n1 1 1 bicycle_final/111_0.JPG\n2 1 1 bicycle_final/111_1.JPG\n\
         3 2 1 bicycle_final/222_0.JPG\n4 3 2 cabinet_final/333_0.JPG\n",
    )
    .unwrap();
    std::fs::write(
        root.join("Ebay_test.txt"),
        "image_id class_id super_class_id path\n5 4 1 bicycle_final/444_0.JPG\n6 5 2 cabinet_final/555_0.JPG\n\
         7 5 2 cabinet_final/555_1.JPG\n",
    )
    .unwrap();
    let train = load(DatasetKind::Sop, root, "train").unwrap();
    assert_eq!((train.len(), train.class_names.clone()), (4, vec!["1".into(), "2".into(), "3".into()]));
    assert_eq!(train.samples[3].path, root.join("cabinet_final/333_0.JPG"));
    assert_eq!(train.samples[3].origin.line, Some(5));
    let test = load(DatasetKind::Sop, root, "test").unwrap();
    assert_eq!((test.len(), test.labels()), (3, vec![0, 1, 1]));
    assert_eq!(load(DatasetKind::Sop, root, "all").unwrap().len(), 7);
    assert_eq!(load(DatasetKind::Sop, root, "classes=3-4").unwrap().len(), 2);

    std::fs::write(root.join("Ebay_test.txt"), "image_id class_id super_class_id path\n5 3 1 x/y.JPG\n").unwrap();
    let e = load(DatasetKind::Sop, root, "all").unwrap_err().to_string();
    assert!(e.contains("Ebay_test.txt") && e.contains("class 3") && e.contains("disjoint"), "{e}");
    std::fs::remove_file(root.join("Ebay_test.txt")).unwrap();
    let e = load(DatasetKind::Sop, root, "test").unwrap_err().to_string();
    assert!(e.contains("Ebay_test.txt") && e.contains("Stanford Online Products layout"), "{e}");
}

#[test]
fn cars196_fixture() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/fixtures/cars196");
    // The fixture: 4 classes, 3 images each, class k = images 3(k-1)+1 ..= 3k.
    let train = load(DatasetKind::Cars196, &fixture, "train").unwrap();
    assert_eq!(train.class_names, vec!["AM General Hummer SUV 2000", "Acura RL Sedan 2012"]);
    assert_eq!(train.labels(), vec![0, 0, 0, 1, 1, 1]);
    assert_eq!(train.samples[0].path, fixture.join("car_ims/000001.jpg"));
    assert_eq!(train.samples[4].origin, Origin { file: fixture.join("cars_annos.mat"), line: Some(5) });
    let test = load(DatasetKind::Cars196, &fixture, "test").unwrap();
    assert_eq!(test.class_names[1], "Škoda Octavia Combi 2011");
    assert_eq!(test.samples[0].path, fixture.join("car_ims/000007.jpg"));
    // The .mat file itself as root; the uncompressed variant reads the same.
    let direct = load(DatasetKind::Cars196, &fixture.join("cars_annos_uncompressed.mat"), "test").unwrap();
    assert_eq!(direct.labels(), test.labels());
    assert_eq!(direct.class_names, test.class_names);

    let dir = tempfile::tempdir().unwrap();
    let e = load(DatasetKind::Cars196, dir.path(), "train").unwrap_err().to_string();
    assert!(e.contains("cars_annos.mat") && e.contains("Stanford Cars layout"), "{e}");
    std::fs::write(dir.path().join("cars_annos.mat"), b"not a mat file at all").unwrap();
    let e = load(DatasetKind::Cars196, dir.path(), "train").unwrap_err().to_string();
    assert!(e.contains("cars_annos.mat") && e.contains("128-byte header"), "{e}");
}

/// A folder dataset of `classes` × `per_class` PNGs of distinct sizes.
fn image_tree(root: &Path, classes: usize, per_class: usize) -> Arc<Dataset> {
    for c in 0..classes {
        for i in 0..per_class {
            write_png(&root.join(format!("class_{c}/{i}.png")), 20 + i as u32, 16 + c as u32);
        }
    }
    Arc::new(load(DatasetKind::Folder, root, "all").unwrap())
}

fn opts(skip: bool) -> LoaderOptions {
    LoaderOptions { threads: 2, prefetch: 2, skip_bad_images: skip }
}

#[test]
fn eval_loader_keeps_order_labels_and_values() {
    let dir = tempfile::tempdir().unwrap();
    let ds = image_tree(dir.path(), 3, 3);
    let pre = Preprocess::imagenet(16, 12);
    let batches: Vec<Batch> =
        BatchLoader::eval(ds.clone(), pre.clone(), 4, opts(false)).unwrap().map(|b| b.unwrap()).collect();
    assert_eq!(batches.iter().map(Batch::len).collect::<Vec<_>>(), vec![4, 4, 1]);
    assert_eq!(batches[0].shape, (4, 3, 12, 12));
    let indices: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
    assert_eq!(indices, (0..9).collect::<Vec<_>>());
    let labels: Vec<u32> = batches.iter().flat_map(|b| b.labels.clone()).collect();
    assert_eq!(labels, ds.labels());
    // Pixel values are exactly the eval view of each file.
    let mut expected = Vec::new();
    for s in &ds.samples[4..8] {
        pre.normalize_into(&pre.eval_view(&decode_image(&s.path).unwrap()), &mut expected);
    }
    assert_eq!(batches[1].images, expected);
}

#[test]
fn train_loader_is_reproducible_and_follows_the_sampler() {
    let dir = tempfile::tempdir().unwrap();
    let ds = image_tree(dir.path(), 4, 3);
    let sampler = PkSampler::new(&ds.labels(), 2, 3, 5).unwrap();
    let aug = Augment::new(Preprocess::imagenet(16, 12), 9);
    let run = |threads| {
        let o = LoaderOptions { threads, ..opts(false) };
        BatchLoader::train(ds.clone(), &sampler, 1, aug.clone(), o).unwrap().map(|b| b.unwrap()).collect::<Vec<_>>()
    };
    let a = run(1);
    assert_eq!(a.len(), 2);
    let plan = sampler.epoch(1);
    for (b, p) in a.iter().zip(&plan) {
        assert_eq!(&b.indices, p);
        assert_eq!(b.labels, p.iter().map(|&i| ds.samples[i].label).collect::<Vec<_>>());
        assert_eq!(b.shape, (6, 3, 12, 12));
    }
    assert_eq!(a, run(2), "same batches with another thread count");
    let other_epoch: Vec<Batch> =
        BatchLoader::train(ds.clone(), &sampler, 2, aug.clone(), opts(false)).unwrap().map(|b| b.unwrap()).collect();
    assert_ne!(a[0].images, other_epoch[0].images);
}

#[test]
fn bad_images_name_the_file_and_line_or_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for i in 0..4 {
        write_png(&root.join(format!("imgs/{i}.png")), 10, 10);
    }
    std::fs::write(root.join("imgs/2.png"), b"garbage").unwrap();
    let list = root.join("list.txt");
    std::fs::write(&list, "imgs/0.png a\nimgs/1.png a\nimgs/2.png b\nimgs/missing.png b\nimgs/3.png b\n").unwrap();
    let ds = Arc::new(load(DatasetKind::List, &list, "all").unwrap());
    let pre = Preprocess::imagenet(8, 8);

    let mut loader = BatchLoader::eval(ds.clone(), pre.clone(), 2, opts(false)).unwrap();
    assert_eq!(loader.next().unwrap().unwrap().indices, vec![0, 1]);
    let e = loader.next().unwrap().unwrap_err().to_string();
    assert!(e.contains("imgs/2.png") && e.contains("list.txt:3"), "{e}");
    assert!(loader.next().is_none(), "the loader stops after an error");

    let mut loader = BatchLoader::eval(ds.clone(), pre.clone(), 2, opts(true)).unwrap();
    let batches: Vec<Batch> = loader.by_ref().map(|b| b.unwrap()).collect();
    let kept: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
    assert_eq!(kept, vec![0, 1, 4], "a batch of two bad images is dropped whole");
    assert_eq!(batches[1].shape, (1, 3, 8, 8));
    assert_eq!(batches[1].images.len(), 3 * 8 * 8);
    let bad = loader.bad_images();
    assert_eq!(bad.len(), 2);
    assert_eq!(bad.images[0].path, root.join("imgs/2.png"));
    assert_eq!(bad.images[1].origin.line, Some(4));
    assert!(bad.images[1].error.contains("not found"), "{}", bad.images[1].error);
    let summary = bad.to_string();
    assert!(summary.starts_with("2 unreadable image(s) skipped") && summary.contains("missing.png"), "{summary}");
    let p = loader.progress();
    assert_eq!((p.batches_total, p.batches_done, p.images_done, p.bad_images), (3, 2, 3, 2));
}

/// Decode + augment throughput on cub100 with 2 threads (`cargo test … -- --ignored
/// --nocapture throughput`); prints images/s for train and eval views.
#[test]
#[ignore = "measurement, not a check; run explicitly"]
fn throughput_cub100() {
    let Some(root) = cub100() else { return };
    let ds = Arc::new(load(DatasetKind::Cub, &root, "train").unwrap());
    let pre = Preprocess::bn_inception();
    let sampler = PkSampler::new(&ds.labels(), 16, 5, 0).unwrap();
    let aug = Augment::new(pre.clone(), 0);
    let o = LoaderOptions { threads: 2, prefetch: 2, skip_bad_images: false };
    let t = std::time::Instant::now();
    let mut n = 0;
    for epoch in 0..2 {
        for b in BatchLoader::train(ds.clone(), &sampler, epoch, aug.clone(), o.clone()).unwrap() {
            n += b.unwrap().len();
        }
    }
    let s = t.elapsed().as_secs_f64();
    println!("train views (256 → RRC 227 → flip, BN-Inception): {n} images in {s:.2} s = {:.1} img/s", n as f64 / s);
    let sub = Arc::new(Dataset { samples: ds.samples[..1000].to_vec(), ..(*ds).clone() });
    let t = std::time::Instant::now();
    let mut n = 0;
    for b in BatchLoader::eval(sub, Preprocess::efficientnet_lite(), 64, o).unwrap() {
        n += b.unwrap().len();
    }
    let s = t.elapsed().as_secs_f64();
    println!("eval views (224 squash, EfficientNet-Lite): {n} images in {s:.2} s = {:.1} img/s", n as f64 / s);
}
