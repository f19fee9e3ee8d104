//! [`PgStore`] against a real PostgreSQL + pgvector (`DEEP_METRIC_TEST_PG`, started by
//! `.ci/run`; skipped with a message without it): filters give exactly the embedded store's
//! matches, adds and deletes keep ids, duplicates and tombstones as the embedded store does,
//! and the collection's model identity is enforced.

use indexer::remote::{PgStore, RemoteError};
use indexer::{Filter, HnswParams, Metadata, NewItem};
use serde_json::{json, Value};
use trainer::backbone::BackboneKind;
use trainer::checkpoint::ModelIdentity;

fn engine() -> Option<String> {
    match std::env::var("DEEP_METRIC_TEST_PG") {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ => {
            eprintln!("skipping: DEEP_METRIC_TEST_PG is not set (.ci/run starts PostgreSQL + pgvector and sets it)");
            None
        }
    }
}

fn identity(weights: &str) -> ModelIdentity {
    ModelIdentity {
        backbone: BackboneKind::EfficientnetLite0,
        dim: 4,
        weights_sha256: weights.repeat(64),
        preprocess_sha256: "0".repeat(64),
    }
}

fn item(i: usize, label: Option<&str>, metadata: Value) -> NewItem {
    let a = i as f32;
    NewItem {
        path: format!("img{i}.png"),
        label: label.map(str::to_string),
        sha256: format!("sha{i}"),
        metadata: match metadata {
            Value::Object(m) => Some(m),
            _ => None,
        },
        vector: vec![1.0 + a.sin(), a.cos(), 0.5, (a * 0.37).sin()],
    }
}

/// Items whose metadata covers what filters distinguish: numbers (integer and not), strings,
/// booleans, arrays (tags, mixed), nested arrays, missing keys, no metadata.
fn catalogue() -> Vec<NewItem> {
    vec![
        item(
            0,
            Some("shoe"),
            json!({"price": 25, "color": "red", "tags": ["sale", "new"]}),
        ),
        item(
            1,
            Some("shoe"),
            json!({"price": 70.5, "color": "blue", "tags": ["new"]}),
        ),
        item(
            2,
            Some("hat"),
            json!({"price": 10, "color": "red", "stock": true}),
        ),
        item(
            3,
            Some("hat"),
            json!({"price": "10", "color": ["red", "green"]}),
        ),
        item(4, None, json!({"price": [5, 50], "tags": [["sale"]]})),
        item(5, Some("bag"), Value::Null),
        item(
            6,
            Some("bag"),
            json!({"price": 49.999, "stock": false, "tags": "sale"}),
        ),
        item(7, Some("10"), json!({"size": 10, "price": [true, 30]})),
    ]
}

fn matches(filter: &Filter, it: &NewItem) -> bool {
    filter.matches_parts(it.label.as_deref(), it.metadata.as_ref())
}

#[test]
fn filters_match_the_embedded_semantics_and_writes_keep_their_promises() {
    let Some(base) = engine() else { return };
    let url = format!(
        "{base}{}collection=it_store_{}&shards=3",
        if base.contains('?') { '&' } else { '?' },
        std::process::id()
    );
    let _ = PgStore::drop_collection(&url);
    let items = catalogue();
    let (store, report) = PgStore::create(
        &url,
        identity("a"),
        HnswParams::default(),
        None,
        items.clone(),
        2,
    )
    .unwrap();
    assert_eq!(report.added, (0..items.len() as u64).collect::<Vec<_>>());
    assert_eq!(store.count().unwrap(), items.len());

    for text in [
        r#"{"label": "shoe"}"#,
        r#"{"label": ["hat", "bag"]}"#,
        r#"{"label": 10}"#,
        r#"{"label": {"gte": 0}}"#,
        r#"{"color": "red"}"#,
        r#"{"color": ["green", "blue"]}"#,
        r#"{"tags": "sale"}"#,
        r#"{"tags": ["new"]}"#,
        r#"{"price": 10}"#,
        r#"{"price": "10"}"#,
        r#"{"price": {"gte": 10, "lt": 50}}"#,
        r#"{"price": {"gt": 49.999}}"#,
        r#"{"price": {"lte": 5}}"#,
        r#"{"stock": true}"#,
        r#"{"stock": [false]}"#,
        r#"{"size": {"gte": 10}, "label": "10"}"#,
        r#"{"missing": 1}"#,
        r#"{"color": "red", "price": {"lt": 20}}"#,
    ] {
        let filter = Filter::parse(text).unwrap();
        let want: Vec<u64> = items
            .iter()
            .enumerate()
            .filter(|(_, it)| matches(&filter, it))
            .map(|(i, _)| i as u64)
            .collect();
        let (total, page) = store.page(0, 100, Some(&filter)).unwrap();
        let got: Vec<u64> = page.iter().map(|m| m.id).collect();
        assert_eq!(got, want, "page of {text}");
        assert_eq!(total, want.len(), "total of {text}");
        for exact in [true, false] {
            let hits = store
                .search(&[1.0, 0.0, 0.5, 0.0], 100, 40, Some(&filter), exact)
                .unwrap();
            let mut got: Vec<u64> = hits.iter().map(|(h, _)| h.id).collect();
            got.sort_unstable();
            assert_eq!(got, want, "search (exact: {exact}) of {text}");
        }
    }

    // Search order, score and the item travel together.
    let q = &items[3].vector;
    let hits = store.search(q, 3, 40, None, true).unwrap();
    assert_eq!(hits[0].0.id, 3);
    assert!(hits[0].0.score > 0.9999 && hits[0].0.score >= hits[1].0.score);
    assert_eq!(hits[0].1.path, "img3.png");
    assert_eq!(hits[0].1.metadata.as_ref().unwrap()["price"], "10");

    // Duplicates (in the store and within a batch) keep the existing id and spend none.
    let (_, each) = store
        .add_each(vec![
            item(100, Some("new"), json!({"k": 1})),
            item(2, Some("again"), Value::Null),
            item(100, Some("new"), Value::Null),
        ])
        .unwrap();
    assert_eq!(each, vec![(8, false), (2, true), (8, true)]);
    assert_eq!(
        store.item(2).unwrap().unwrap().label.as_deref(),
        Some("hat")
    );

    // Deletes: all or nothing, remembered by content, visible at once.
    let err = store.delete(&[1, 4242]).unwrap_err();
    assert!(matches!(err, RemoteError::NoSuchItem(4242)), "{err}");
    assert!(
        store.item(1).unwrap().is_some(),
        "a failed delete deletes nothing"
    );
    store.delete(&[1, 8]).unwrap();
    assert!(store.item(1).unwrap().is_none() && store.vector(8).unwrap().is_none());
    assert!(store.was_deleted("sha1").unwrap() && !store.was_deleted("sha2").unwrap());
    assert_eq!(store.find_sha256("sha1").unwrap(), None);
    let all = store.search(&items[1].vector, 20, 40, None, false).unwrap();
    assert!(all.iter().all(|(h, _)| h.id != 1 && h.id != 8));
    // Added again, deleted content is a new item and no longer counts as deleted.
    let again = store.add(vec![item(1, Some("shoe"), Value::Null)]).unwrap();
    assert_eq!(again.added, vec![9]);
    assert!(!store.was_deleted("sha1").unwrap());

    // Bad input is refused before anything is written.
    let mut bad = item(200, None, Value::Null);
    bad.vector = vec![1.0, 2.0];
    assert!(matches!(
        store.add(vec![item(201, None, Value::Null), bad]),
        Err(RemoteError::Invalid(_))
    ));
    assert_eq!(store.find_sha256("sha201").unwrap(), None);
    let mut meta = Metadata::new();
    meta.insert("label".into(), json!("x"));
    let mut with_label = item(202, None, Value::Null);
    with_label.metadata = Some(meta);
    assert!(
        store.add(vec![with_label]).is_err(),
        "metadata may not hold 'label'"
    );

    // The model identity: the same model opens it, another is refused; names are unique.
    PgStore::open_for(&url, &identity("a"), 1).unwrap();
    let err = PgStore::open_for(&url, &identity("b"), 1)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("different model") && err.contains("it_store_"),
        "{err}"
    );
    let err = PgStore::create(
        &url,
        identity("a"),
        HnswParams::default(),
        None,
        Vec::new(),
        1,
    )
    .err()
    .unwrap();
    assert!(matches!(err, RemoteError::Exists { .. }), "{err}");
    assert!(PgStore::drop_collection(&url).unwrap());
    assert!(matches!(
        PgStore::open(&url, 1),
        Err(RemoteError::NoCollection { .. })
    ));
}

#[test]
fn an_unreachable_engine_is_unavailable_not_a_crash() {
    // A port nothing listens on: every operation reports the engine unavailable, with where.
    let url = "postgres://postgres@127.0.0.1:9/postgres?collection=nowhere";
    let err = PgStore::open(url, 1).err().unwrap();
    assert!(matches!(err, RemoteError::Unavailable { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("127.0.0.1:9/postgres") && msg.contains("PostgreSQL"),
        "{msg}"
    );
}
