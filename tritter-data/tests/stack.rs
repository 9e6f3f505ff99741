//! The Stack v2 as its users receive it: Parquet metadata in its schema, content as gzip
//! blobs named by `blob_id` in their source encodings; and Parquet with a content column.

use parquet::basic::Compression;
use parquet::data_type::{BoolType, ByteArray, ByteArrayType, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use tritter_data::{build_dataset, BuildOptions, DataRecipe, ShardReader, Split, REMOVED_FILE};

enum Col {
    Str(Vec<String>),
    Bool(Vec<bool>),
    Long(Vec<i64>),
}

fn write_parquet(path: &Path, cols: &[(&str, Col)]) {
    let fields: Vec<String> = cols
        .iter()
        .map(|(n, c)| match c {
            Col::Str(_) => format!("REQUIRED BYTE_ARRAY {n} (UTF8);"),
            Col::Bool(_) => format!("REQUIRED BOOLEAN {n};"),
            Col::Long(_) => format!("REQUIRED INT64 {n};"),
        })
        .collect();
    let schema =
        Arc::new(parse_message_type(&format!("message stack {{ {} }}", fields.join(" "))).unwrap());
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build(),
    );
    let file = std::fs::File::create(path).unwrap();
    let mut writer = SerializedFileWriter::new(file, schema, props).unwrap();
    let mut group = writer.next_row_group().unwrap();
    for (_, col) in cols {
        let mut w = group.next_column().unwrap().unwrap();
        match col {
            Col::Str(v) => {
                let values: Vec<ByteArray> =
                    v.iter().map(|s| ByteArray::from(s.as_str())).collect();
                w.typed::<ByteArrayType>()
                    .write_batch(&values, None, None)
                    .unwrap();
            }
            Col::Bool(v) => {
                w.typed::<BoolType>().write_batch(v, None, None).unwrap();
            }
            Col::Long(v) => {
                w.typed::<Int64Type>().write_batch(v, None, None).unwrap();
            }
        }
        w.close().unwrap();
    }
    group.close().unwrap();
    writer.close().unwrap();
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// `(blob_id, path, language, license_type, src_encoding, is_generated, blob bytes or
/// None for a missing blob)`
type Row = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    bool,
    Option<Vec<u8>>,
);

fn rows() -> Vec<Row> {
    let py = b"def area(r):\n    return 3.14159 * r * r\n\n\nprint(area(2.0))\n".to_vec();
    let rs = include_bytes!("../src/document.rs").to_vec();
    let triton = b"import triton\nimport triton.language as tl\n\n\n@triton.jit\ndef add(x, y, out, n):\n    i = tl.program_id(0)\n    tl.store(out + i, tl.load(x + i) + tl.load(y + i))\n".to_vec();
    // "# café" in Latin-1: 0xE9 is not UTF-8.
    let latin1 = b"# caf\xe9 au lait\nprice = 3\nprint(price * 2)\n".to_vec();
    vec![
        (
            "b1",
            "src/area.py",
            "Python",
            "permissive",
            "UTF-8",
            false,
            Some(gzip(&py)),
        ),
        (
            "b2",
            "src/document.rs",
            "Rust",
            "permissive",
            "UTF-8",
            false,
            Some(gzip(&rs)),
        ),
        (
            "b3",
            "kernels/add.py",
            "Python",
            "permissive",
            "UTF-8",
            false,
            Some(gzip(&triton)),
        ),
        (
            "b4",
            "cafe.py",
            "Python",
            "permissive",
            "ISO-8859-1",
            false,
            Some(gzip(&latin1)),
        ),
        (
            "b5",
            "gpl.py",
            "Python",
            "no_license",
            "UTF-8",
            false,
            Some(gzip(&py)),
        ),
        (
            "b6",
            "gen.py",
            "Python",
            "permissive",
            "UTF-8",
            true,
            Some(gzip(b"x = 1\n")),
        ),
        (
            "b7",
            "gone.py",
            "Python",
            "permissive",
            "UTF-8",
            false,
            None,
        ),
        (
            "b8",
            "broken.py",
            "Python",
            "permissive",
            "UTF-8",
            false,
            Some(b"not gzip at all".to_vec()),
        ),
        (
            "b9",
            "app.js",
            "JavaScript",
            "permissive",
            "UTF-8",
            false,
            Some(gzip(b"let a = 1;\n")),
        ),
        (
            "b10",
            "bad.py",
            "Python",
            "permissive",
            "UTF-8",
            false,
            Some(gzip(&latin1)),
        ),
    ]
}

fn write_stack(dir: &Path) {
    let meta = dir.join("stack");
    let blobs = dir.join("content");
    std::fs::create_dir_all(&meta).unwrap();
    std::fs::create_dir_all(&blobs).unwrap();
    let rows = rows();
    for (id, .., blob) in &rows {
        if let Some(bytes) = blob {
            std::fs::write(blobs.join(id), bytes).unwrap();
        }
    }
    let s = |f: fn(&Row) -> String| Col::Str(rows.iter().map(f).collect());
    write_parquet(
        &meta.join("train-00000.parquet"),
        &[
            ("blob_id", s(|r| r.0.into())),
            ("directory_id", s(|r| format!("dir-{}", r.0))),
            ("path", s(|r| r.1.into())),
            ("content_id", s(|r| format!("c-{}", r.0))),
            ("license_type", s(|r| r.3.into())),
            ("repo_name", s(|_| "octo/demo".into())),
            ("src_encoding", s(|r| r.4.into())),
            ("language", s(|r| r.2.into())),
            ("is_vendor", Col::Bool(vec![false; rows.len()])),
            (
                "is_generated",
                Col::Bool(rows.iter().map(|r| r.5).collect()),
            ),
            ("length_bytes", Col::Long(vec![100; rows.len()])),
            ("extension", s(|r| r.1.rsplit('.').next().unwrap().into())),
        ],
    );
}

fn recipe(dir: &Path, sources: &str) -> DataRecipe {
    let path = dir.join("data.toml");
    std::fs::write(
        &path,
        format!("name = \"stack\"\noutput = \"dataset\"\nvalid_fraction = 0.0\n[dedup]\nnear = false\n{sources}"),
    )
    .unwrap();
    DataRecipe::from_file(&path).unwrap()
}

/// What a build of [`write_stack`]'s rows keeps per language and drops while reading,
/// wherever the blobs come from.
fn assert_fixture_read(summary: &tritter_data::BuildSummary) {
    let m = &summary.manifest;
    assert_eq!(m.languages["python"].documents, 2, "{:?}", m.languages);
    assert_eq!(m.languages["rust"].documents, 1);
    assert_eq!(m.languages["triton"].documents, 1);
    let read = &m.stats.stages["read"].dropped;
    assert_eq!(read["missing blob"], 1);
    assert_eq!(read["corrupt blob"], 1);
    assert_eq!(read["invalid encoding"], 1);
}

#[test]
fn stack_v2_rows_are_fetched_decoded_filtered_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    write_stack(dir.path());
    let r = recipe(
        dir.path(),
        "[[sources]]\nname = \"stack\"\nkind = \"parquet\"\npath = \"stack\"\nblobs = \"content\"\n",
    );
    let summary = build_dataset(&r, &BuildOptions::default()).unwrap();
    assert_fixture_read(&summary);
    let m = &summary.manifest;
    let filter = &m.stats.stages["filter"].dropped;
    assert_eq!(filter["license"], 1);
    assert_eq!(filter["auto-generated"], 1);
    assert_eq!(m.stats.stages["language"].dropped["not code"], 1);
    let removed = std::fs::read_to_string(summary.dir.join(REMOVED_FILE)).unwrap();
    assert!(removed.contains("\"stack/b7\"") && removed.contains("missing blob"));

    // Latin-1 content arrives as UTF-8.
    let stream = ShardReader::load(&summary.dir, Split::Train).unwrap();
    let text: Vec<u8> = stream
        .tokens
        .iter()
        .filter(|&&t| (8..264).contains(&t))
        .map(|&t| (t - 8) as u8)
        .collect();
    let text = String::from_utf8(text).unwrap();
    assert!(text.contains("# café au lait"));
}

#[test]
fn parquet_with_a_content_column_and_unreadable_parquet() {
    let dir = tempfile::tempdir().unwrap();
    let derived = dir.path().join("derived.parquet");
    write_parquet(
        &derived,
        &[
            (
                "file_path",
                Col::Str(vec!["a.py".into(), "b.rs".into(), "c.md".into()]),
            ),
            (
                "text",
                Col::Str(vec![
                    "def f():\n    return 1\n".into(),
                    "fn main() {\n    println!(\"hi\");\n}\n".into(),
                    "# title\n".into(),
                ]),
            ),
        ],
    );
    let r = recipe(
        dir.path(),
        "[[sources]]\nname = \"derived\"\nkind = \"parquet\"\npath = \"derived.parquet\"\ncontent_column = \"text\"\npath_column = \"file_path\"\n",
    );
    let summary = build_dataset(&r, &BuildOptions::default()).unwrap();
    assert_eq!(summary.manifest.languages["python"].documents, 1);
    assert_eq!(summary.manifest.languages["rust"].documents, 1);

    // A column that is not there, and a file that is not Parquet: errors naming them.
    std::fs::write(dir.path().join("junk.parquet"), b"PAR1 this is not parquet").unwrap();
    for (source, file, message) in [
        (
            "derived.parquet\"\npath_column = \"file_path",
            "derived.parquet",
            "no `content` column",
        ),
        (
            "junk.parquet",
            "junk.parquet",
            "not a readable Parquet file",
        ),
    ] {
        let r = recipe(
            dir.path(),
            &format!("[[sources]]\nname = \"p\"\nkind = \"parquet\"\npath = \"{source}\"\n"),
        );
        let err = build_dataset(&r, &BuildOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains(file) && err.contains(message), "{err}");
    }
    // The previous dataset is still there, whole.
    assert!(ShardReader::load(&dir.path().join("dataset"), Split::Train).is_ok());
}

#[test]
fn json_lines_with_content_and_a_malformed_line() {
    let dir = tempfile::tempdir().unwrap();
    let lines = [
        serde_json::json!({"path": "x.py", "content": "def x():\n    return 1\n"}),
        serde_json::json!({"path": "y.rs", "content": "fn y() -> u8 {\n    2\n}\n", "is_generated": false}),
        serde_json::json!({"path": "z.py", "content": "z = 3\n", "is_generated": true}),
    ];
    let text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    std::fs::write(dir.path().join("docs.jsonl"), text.join("\n")).unwrap();
    let r = recipe(
        dir.path(),
        "[[sources]]\nname = \"j\"\nkind = \"jsonl\"\npath = \"docs.jsonl\"\n",
    );
    let summary = build_dataset(&r, &BuildOptions::default()).unwrap();
    assert_eq!(summary.manifest.languages["python"].documents, 1);
    assert_eq!(summary.manifest.languages["rust"].documents, 1);
    assert_eq!(
        summary.manifest.stats.stages["filter"].dropped["auto-generated"],
        1
    );

    std::fs::write(
        dir.path().join("docs.jsonl"),
        format!("{}\n{{\"path\": \"w.py\"}}\n", text[0]),
    )
    .unwrap();
    let err = build_dataset(&r, &BuildOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("docs.jsonl:2") && err.contains("`content`"),
        "{err}"
    );
}

/// An S3-compatible server on loopback (`TRITTER_TEST_S3_ENDPOINT`, started by `.ci/run`
/// with moto), or `None` with a note where there is none.
fn s3_endpoint() -> Option<String> {
    let endpoint = std::env::var("TRITTER_TEST_S3_ENDPOINT").ok();
    if endpoint.is_none() {
        eprintln!("note: TRITTER_TEST_S3_ENDPOINT is not set (.ci/run starts moto); S3 not tested");
    }
    endpoint
}

/// Creates `bucket` with a bare S3 `PUT /bucket` (object_store does not create buckets).
fn create_bucket(endpoint: &str, bucket: &str) {
    use std::io::{Read, Write};
    let host = endpoint.trim_start_matches("http://").trim_end_matches('/');
    let mut stream = std::net::TcpStream::connect(host).unwrap();
    write!(
        stream,
        "PUT /{bucket} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
}

#[test]
fn stack_v2_blobs_from_s3() {
    let Some(endpoint) = s3_endpoint() else {
        return;
    };
    for (key, value) in [
        ("AWS_ENDPOINT", endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_ACCESS_KEY_ID", "tritter"),
        ("AWS_SECRET_ACCESS_KEY", "tritter"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ] {
        std::env::set_var(key, value);
    }
    create_bucket(&endpoint, "tritter-stack");
    let dir = tempfile::tempdir().unwrap();
    write_stack(dir.path());

    // Upload the blob directory under a prefix.
    use object_store::ObjectStoreExt;
    let store = object_store::aws::AmazonS3Builder::from_env()
        .with_url("s3://tritter-stack")
        .build()
        .unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    for entry in std::fs::read_dir(dir.path().join("content")).unwrap() {
        let path = entry.unwrap().path();
        let key = format!("v2/content/{}", path.file_name().unwrap().to_string_lossy());
        let bytes = std::fs::read(&path).unwrap();
        runtime
            .block_on(store.put(&object_store::path::Path::from(key), bytes.into()))
            .unwrap();
    }
    std::fs::remove_dir_all(dir.path().join("content")).unwrap();

    let r = recipe(
        dir.path(),
        "[[sources]]\nname = \"stack\"\nkind = \"parquet\"\npath = \"stack\"\nblobs = \"s3://tritter-stack/v2/content\"\n",
    );
    let summary = build_dataset(&r, &BuildOptions::default()).unwrap();
    assert_fixture_read(&summary);

    // A bucket that does not exist, or a prefix with nothing in it, is an error naming
    // the store, not every row skipped.
    for url in [
        "s3://no-such-bucket/content",
        "s3://tritter-stack/v3/content",
    ] {
        let r = recipe(
            dir.path(),
            &format!("[[sources]]\nname = \"stack\"\nkind = \"parquet\"\npath = \"stack\"\nblobs = \"{url}\"\n"),
        );
        let err = build_dataset(&r, &BuildOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains(url), "{err}");
    }
}
