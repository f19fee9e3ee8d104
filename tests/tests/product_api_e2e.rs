//! The product API against the real `search-server` binary and weights: batch add with
//! metadata, filtered search, more like this, paging, delete — and a delete that survives
//! `kill -9` and a restart over the same `--gallery` folder (it never comes back).

mod server_support;

use search_server::client::{Client, Part};
use server_support::{make_gallery, server_binary, shape_png, weights, Server};

const CLASSES: [(&str, [u8; 3]); 2] = [("red", [230, 30, 30]), ("blue", [30, 40, 230])];
const KEY: &str = "s3cret";

fn field<'a>(name: &'static str, data: &'a [u8]) -> Part<'a> {
    Part {
        name,
        filename: (name == "image").then_some("x.png"),
        content_type: None,
        data,
    }
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn ids(v: &serde_json::Value, key: &str) -> Vec<u64> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("no {key} in {v}"))
        .iter()
        .map(|r| r["id"].as_u64().unwrap())
        .collect()
}

fn delete(c: &mut Client, id: u64) -> search_server::client::Response {
    c.request(
        "DELETE",
        &format!("/api/images/{id}"),
        &[("X-Api-Key", KEY)],
        b"",
    )
    .unwrap()
}

#[test]
fn metadata_filters_similar_paging_and_deletes_that_survive_kill_9() {
    let (Some(bin), Some(weights)) = (server_binary(), weights()) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let gallery = tmp.path().join("gallery");
    let files = make_gallery(&gallery, &CLASSES, 2);
    let data = tmp.path().join("data");
    let args = [
        "--data-dir",
        data.to_str().unwrap(),
        "--weights",
        weights.to_str().unwrap(),
        "--gallery",
        gallery.to_str().unwrap(),
        "--api-key",
        KEY,
    ];
    let server = Server::start(&bin, &args);
    let mut c = server.client();
    let n0 = files.len() as u64;

    // A batch of two with labels and metadata, paired by order.
    let green = shape_png(2, [20, 200, 40], [250, 250, 250], 150);
    let purple = shape_png(3, [150, 30, 200], [20, 20, 20], 150);
    let parts = [
        field("image", &green),
        field("image", &purple),
        field("label", b"shoe"),
        field("label", b"hat"),
        field("metadata", br#"{"price": 25, "color": "green"}"#),
        field("metadata", br#"{"price": 70, "color": "purple"}"#),
    ];
    let r = c
        .post_form("/api/images", &parts, &[("X-Api-Key", KEY)])
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let added = ids(&r.json(), "items");
    assert_eq!(added, vec![n0, n0 + 1]);
    let (green_id, purple_id) = (added[0], added[1]);

    // Filtered search finds only matches, with their metadata.
    let f = enc(r#"{"price": {"gte": 10, "lt": 50}}"#);
    let r = c
        .post_image(&format!("/api/search?k=5&filter={f}"), &purple)
        .unwrap()
        .json();
    assert_eq!(ids(&r, "results"), vec![green_id], "{r}");
    assert_eq!(r["results"][0]["metadata"]["color"], "green");
    let rec = c
        .request(
            "GET",
            &format!("/api/images/{purple_id}"),
            &[("Accept", "application/json")],
            b"",
        )
        .unwrap()
        .json();
    assert_eq!(
        (rec["label"].as_str(), rec["metadata"]["price"].as_u64()),
        (Some("hat"), Some(70))
    );

    // More like a red gallery image: the other red one first, never itself.
    let r = c.get("/api/images/0/similar?k=3").unwrap().json();
    let similar = ids(&r, "results");
    assert!(!similar.contains(&0), "{r}");
    assert_eq!(r["results"][0]["label"], "red", "{r}");

    // Paging through the gallery.
    let page = c.get("/api/images?offset=1&limit=2").unwrap().json();
    assert_eq!(
        (page["total"].as_u64(), ids(&page, "items")),
        (Some(n0 + 2), vec![1, 2])
    );

    // Bad input: clear 4xx.
    for (what, status, r) in [
        (
            "malformed filter",
            400,
            c.post_image("/api/search?filter=%7Bx", &green).unwrap(),
        ),
        (
            "range of strings",
            400,
            c.get(&format!(
                "/api/images?filter={}",
                enc(r#"{"price":{"lt":"9"}}"#)
            ))
            .unwrap(),
        ),
        (
            "unknown id",
            404,
            c.get("/api/images/4242/similar").unwrap(),
        ),
        ("delete unknown", 404, delete(&mut c, 4242)),
        (
            "delete without key",
            401,
            c.request("DELETE", "/api/images/0", &[], b"").unwrap(),
        ),
    ] {
        assert_eq!(r.status, status, "{what}: {}", r.text());
        assert!(r.json()["error"].is_string(), "{what}");
    }

    // Delete an upload and a file of the --gallery folder; 200, then 404.
    let red0 = std::fs::read(&files[0]).unwrap();
    for id in [purple_id, 0] {
        assert_eq!(delete(&mut c, id).status, 200);
        assert_eq!(delete(&mut c, id).status, 404);
    }
    let r = c.post_image("/api/search?k=10", &purple).unwrap().json();
    assert!(!ids(&r, "results").contains(&purple_id) && !ids(&r, "results").contains(&0));
    server.kill9();

    // After kill -9 and a restart that rescans the folder, neither comes back.
    let server = Server::start(&bin, &args);
    let mut c = server.client();
    assert_eq!(c.get("/healthz").unwrap().json()["gallery_items"], n0);
    for q in [&purple, &red0] {
        let r = c.post_image("/api/search?k=10", q).unwrap().json();
        let found = ids(&r, "results");
        assert!(!found.contains(&purple_id) && !found.contains(&0), "{r}");
        assert!(found.contains(&green_id));
    }
    assert_eq!(c.get("/api/images/0").unwrap().status, 404);
    // Added again through the API, the deleted content is a new item.
    let r = c
        .post_form(
            "/api/images",
            &[field("image", &purple)],
            &[("X-Api-Key", KEY)],
        )
        .unwrap()
        .json();
    assert_eq!(
        (r["id"].as_u64(), r["duplicate"].as_bool()),
        (Some(n0 + 2), Some(false)),
        "{r}"
    );
    // A clean stop commits: the tombstones move from the WAL into the index files.
    assert!(server.terminate().success());
    let server = Server::start(&bin, &args);
    let mut c = server.client();
    assert_eq!(c.get("/healthz").unwrap().json()["gallery_items"], n0 + 1);
    assert_eq!(c.get("/api/images/0").unwrap().status, 404);
    let page = c.get("/api/images?limit=100").unwrap().json();
    assert_eq!(ids(&page, "items"), vec![1, 2, 3, green_id, n0 + 2]);
}
